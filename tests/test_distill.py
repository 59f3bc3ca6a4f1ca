"""On-policy distillation: the generalized JSD against hand-computed values (TRL's
GKDTrainer.generalized_jsd_loss semantics), the tiled loss against full logits, the
per-token reverse-KL reward, the teacher's vocabulary check, a tiny end-to-end run with a
teacher of another size, and the section's checks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import assert_reordered_close
from train_utils import (
    make_tiny_model_dir,
    make_tiny_tokenizer,
    read_metrics,
    tiny_model_config,
    tiny_run_config,
)

from jaxpt.config_load import load_config
from jaxpt.losses.distill import (
    chunked_generalized_jsd,
    generalized_jsd,
    reverse_kl_reward_loss,
)

# A 3-token vocabulary: student p_S = (1/2, 1/4, 1/4), teacher p_T = (0.8, 0.1, 0.1), given
# as logits log p (softmax(log p) = p).
P_S, P_T = (0.5, 0.25, 0.25), (0.8, 0.1, 0.1)
LOGITS_S, LOGITS_T = np.log([P_S]), np.log([P_T])


def jsd(beta, temperature=1.0):
    return float(generalized_jsd(jnp.asarray(LOGITS_S), jnp.asarray(LOGITS_T), beta=beta,
                                 temperature=temperature)[0])


def test_generalized_jsd_hand_computed():
    # beta = 0: KL(p_T || p_S) = 0.8 ln(0.8/0.5) + 2 * 0.1 ln(0.1/0.25)
    forward = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    assert forward == pytest.approx(0.1927447570)
    assert jsd(0.0) == pytest.approx(forward, rel=1e-6)
    # beta = 1: KL(p_S || p_T) = 0.5 ln(0.5/0.8) + 2 * 0.25 ln(0.25/0.1)
    reverse = 0.5 * math.log(0.625) + 0.5 * math.log(2.5)
    assert reverse == pytest.approx(0.2231435513)
    assert jsd(1.0) == pytest.approx(reverse, rel=1e-6)
    # beta = 0.5: mixture m = (0.65, 0.175, 0.175);
    # 0.5 KL(p_T || m) + 0.5 KL(p_S || m)
    kl_t_m = 0.8 * math.log(0.8 / 0.65) + 0.2 * math.log(0.1 / 0.175)
    kl_s_m = 0.5 * math.log(0.5 / 0.65) + 0.5 * math.log(0.25 / 0.175)
    half = 0.5 * kl_t_m + 0.5 * kl_s_m
    assert half == pytest.approx(0.0506718370)
    assert jsd(0.5) == pytest.approx(half, rel=1e-5)


def test_generalized_jsd_temperature_and_asymmetric_beta_hand_computed():
    """Temperature 2 takes square roots: p_S^(1/2) normalized is (sqrt2 - 1, (2 - sqrt2)/2
    twice), p_T^(1/2) normalized is (2 - sqrt2, (sqrt2 - 1)/2 twice). beta = 0.25 weighs
    the TEACHER by beta in the mixture and in the sum (TRL: m = (1-beta) p_S + beta p_T,
    beta KL(p_T || m) + (1-beta) KL(p_S || m))."""
    r2 = math.sqrt(2.0)
    s = (r2 - 1, (2 - r2) / 2, (2 - r2) / 2)
    t = (2 - r2, (r2 - 1) / 2, (r2 - 1) / 2)
    m = tuple(0.75 * a + 0.25 * b for a, b in zip(s, t, strict=True))
    assert m[0] == pytest.approx(0.4571067812)

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))

    want = 0.25 * kl(t, m) + 0.75 * kl(s, m)
    assert want == pytest.approx(0.0111075193)
    assert jsd(0.25, temperature=2.0) == pytest.approx(want, rel=1e-5)
    assert jsd(0.0, temperature=2.0) == pytest.approx(kl(t, s), rel=1e-5)  # 0.0594626274
    # The other mixture weighting (beta on the student) gives another value: beta matters.
    swapped = 0.25 * kl(s, m) + 0.75 * kl(t, m)
    assert abs(swapped - want) > 1e-3


def _kl64(p_logits, q_logits):
    """KL(p || q) per row in float64 from logits (numpy, independent of the module)."""

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def test_beta_0_is_forward_kl_and_beta_1_reverse_kl():
    rs = np.random.RandomState(0)
    s, t = rs.randn(5, 11) * 2, rs.randn(5, 11) * 2
    fwd = np.asarray(generalized_jsd(jnp.asarray(s), jnp.asarray(t), beta=0.0))
    rev = np.asarray(generalized_jsd(jnp.asarray(s), jnp.asarray(t), beta=1.0))
    np.testing.assert_allclose(fwd, _kl64(t, s), rtol=1e-5)
    np.testing.assert_allclose(rev, _kl64(s, t), rtol=1e-5)
    assert np.abs(fwd - rev).max() > 1e-2  # the two directions differ on these logits


@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.5, 0.7), (1.0, 1.3)])
def test_tiled_loss_equals_full_logits(beta, temperature):
    """Tiles of 3 over 7 tokens (one padded tile): the per-token values, the target
    log-probs and the gradients wrt the student's hidden states and head equal the full
    N x V computation."""
    rs = np.random.RandomState(1)
    N, E, F, V = 7, 6, 10, 13
    hs, ws = jnp.asarray(rs.randn(N, E), jnp.float32), jnp.asarray(rs.randn(V, E), jnp.float32)
    ht, wt = jnp.asarray(rs.randn(N, F), jnp.float32), jnp.asarray(rs.randn(V, F), jnp.float32)
    tgt = jnp.asarray(rs.randint(0, V, N))
    weights = jnp.asarray(rs.rand(N), jnp.float32)

    def full(hs, ws):
        ls, lt = hs @ ws.T, ht @ wt.T
        j = generalized_jsd(ls, lt, beta=beta, temperature=temperature)
        lps = jax.nn.log_softmax(ls / temperature)[jnp.arange(N), tgt]
        return jnp.sum(weights * j), (j, lps)

    def tiled(hs, ws):
        j, lps, _ = chunked_generalized_jsd(hs, ws, ht, wt, tgt, beta=beta,
                                            temperature=temperature, chunk=3)
        return jnp.sum(weights * j), (j, lps)

    (v_full, (j_full, lp_full)), g_full = jax.value_and_grad(full, (0, 1), has_aux=True)(hs, ws)
    (v_tile, (j_tile, lp_tile)), g_tile = jax.value_and_grad(tiled, (0, 1), has_aux=True)(hs, ws)
    assert float(v_full) > 0.1
    # Sums of <= 13 terms (the vocab) per token; same math, other fusion.
    assert_reordered_close(np.asarray(j_tile), np.asarray(j_full), n=V, depth=3)
    assert_reordered_close(np.asarray(lp_tile), np.asarray(lp_full), n=V, depth=3)
    for a, b in zip(g_tile, g_full, strict=True):
        assert_reordered_close(np.asarray(a), np.asarray(b), n=V * N, depth=4)


def test_reverse_kl_reward_hand_computed():
    """Advantage = coef * (teacher - old); on-policy (old None) the ratio is 1, the loss
    -sum(mask * A) / num_items and its gradient -mask * A / num_items."""
    lp = jnp.asarray([[-1.0, -2.0, -0.5]])
    teacher = jnp.asarray([[-0.5, -3.0, -9.0]])
    mask = jnp.asarray([[1.0, 1.0, 0.0]])
    loss, metrics = reverse_kl_reward_loss(lp, None, teacher, mask, coef=2.0, num_items=4.0)
    # A = 2 * (0.5, -1.0); loss = -(1.0 - 2.0) / 4
    assert float(loss) == pytest.approx(0.25)
    assert float(metrics["distill/reverse_kl"]) == pytest.approx((-0.5 + 1.0) / 4)
    grad = jax.grad(lambda x: reverse_kl_reward_loss(x, None, teacher, mask, coef=2.0,
                                                     num_items=4.0)[0])(lp)
    np.testing.assert_allclose(np.asarray(grad), [[-0.25, 0.5, 0.0]], rtol=1e-6)
    # Reused rollouts: ratio exp(lp - old) = e^0.1 on the first token.
    old = lp - jnp.asarray([[0.1, 0.0, 0.0]])
    loss2, _ = reverse_kl_reward_loss(lp, old, teacher, mask, coef=1.0, num_items=2.0)
    want = -(math.exp(0.1) * (-0.5 + 1.1) + 1.0 * (-3.0 + 2.0)) / 2
    assert float(loss2) == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    """A tiny student, a bigger teacher with the same tokenizer (3 layers, hidden 48,
    weights x3 so its distributions are far from uniform) and a model with another
    tokenizer."""
    from jaxpt.models.decoder import init_model
    from jaxpt.models.weights import export_hf

    d = tmp_path_factory.mktemp("distill_tiny")
    tok = make_tiny_tokenizer(d / "tok", data_dir)
    student = make_tiny_model_dir(d / "student", tok, seed=0)
    cfg = tiny_model_config(len(tok), num_layers=3, hidden_size=48, intermediate_size=96)
    graphdef, params = nnx.split(init_model(cfg, seed=5))
    params = jax.tree.map(lambda x: x * 3.0, params)
    teacher = export_hf(nnx.merge(graphdef, params), cfg, d / "teacher", tokenizer=tok)
    tok.add_tokens(["<|extra|>"])  # another vocabulary: one token more
    other = make_tiny_model_dir(d / "other", tok, seed=0)
    return student, teacher, other, data_dir


def distill_config(tmp_path, tiny, *, lora=None, **distill):
    student, teacher, _, data_dir = tiny
    extra = {"lora": lora} if lora else {}
    section = {"teacher": str(teacher), "task": "arithmetic", "arithmetic_style": "plain",
               "max_completion_length": 8, "max_prompt_length": 128, "temperature": 1.0,
               "reward_funcs": ["math"], "eval_prompts": 4, "eval_batch_size": 4,
               "chunk_size": 16, **distill}
    path = tiny_run_config(
        tmp_path / "distill.yaml", student, data_dir, tmp_path / "run", algorithm="distill",
        distill=section, data={"max_train_rows": 32, "max_eval_rows": 4},
        train={"max_steps": 6, "batch_size": 4, "seed": 0, "logprob_impl": "chunked",
               "eval_every": 0},
        optim={"lr": 3e-2, "schedule": "constant", "warmup_steps": 0},
        checkpoint={"every": 0}, logging={"every": 1, "progress": False}, **extra)
    return load_config(path)


def test_distill_run_moves_the_student_to_the_teacher(tmp_path, tiny):
    """6 steps, half of the rounds on the dataset's completions: the JSD to a teacher of
    another size falls, both kinds of rounds occur, and the teacher is in state.frozen."""
    from jaxpt.engine.loop import run
    from jaxpt.trainers.distill import build_distill_trainer

    cfg = distill_config(tmp_path, tiny, lmbda=0.5, beta=0.5)
    tr = build_distill_trainer(cfg)
    tr.eval_fn = None  # the held-out evaluation is GRPO's, tested there
    assert tr.state.frozen["student"] is None  # full fine-tuning: no LoRA base
    assert tr.state.frozen["teacher"]["embed_VE"].shape[1] == 48
    run(tr)
    rows = [r for r in read_metrics(cfg.out_dir) if "loss" in r]
    assert len(rows) == 6
    assert {r["distill/on_policy"] for r in rows} == {0.0, 1.0}
    losses = [r["loss"] for r in rows]
    # Seeded and deterministic on CPU: 0.163 -> 0.144.
    assert np.mean(losses[-2:]) < 0.92 * np.mean(losses[:2]), losses
    assert all(r["skipped"] == 0.0 for r in rows)


def test_reverse_kl_reward_run(tmp_path, tiny):
    """The per-token reward variant trains on the student's own samples: every round is
    on-policy, a rollout used once has ratio 1 so the loss is kl_coef times the sampled
    tokens' reverse KL (student log-prob - teacher log-prob, > 0 on average: the student
    samples what it finds likely), and the student moves. With LoRA: the base is
    state.frozen["student"] beside the teacher, and the adapters train."""
    from jaxpt.engine.loop import run
    from jaxpt.trainers.distill import build_distill_trainer

    cfg = distill_config(tmp_path, tiny, loss="reverse_kl_reward", lmbda=1.0, kl_coef=0.5,
                         lora={"rank": 4})
    tr = build_distill_trainer(cfg)
    tr.eval_fn = None
    assert tr.state.frozen["student"]["embed_VE"].shape == (1000, 32)  # the LoRA base
    assert tr.state.frozen["teacher"]["embed_VE"].shape == (1000, 48)
    p0 = jax.device_get(tr.state.params)
    res = run(tr)
    rows = [r for r in read_metrics(cfg.out_dir) if "loss" in r]
    assert len(rows) == 6 and all(r["distill/on_policy"] == 1.0 for r in rows)
    for r in rows:
        assert r["loss"] == pytest.approx(0.5 * r["distill/reverse_kl"], rel=1e-4, abs=1e-6)
        assert r["distill/reverse_kl"] == pytest.approx(
            r["distill/student_logprob"] - r["distill/teacher_logprob"], rel=1e-4, abs=1e-5)
    assert np.mean([r["distill/reverse_kl"] for r in rows]) > 0.1
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
        jax.tree.leaves(jax.device_get(res.state.params)), jax.tree.leaves(p0), strict=True))
    assert moved > 1e-3


def test_teacher_with_another_tokenizer_is_refused(tmp_path, tiny):
    from jaxpt.trainers.distill import build_distill_trainer

    student, _, other, _ = tiny
    cfg = distill_config(tmp_path, tiny, teacher=str(other))
    with pytest.raises(ValueError) as e:
        build_distill_trainer(cfg)
    msg = str(e.value)
    assert msg.startswith(f"{cfg.source}: distill.teacher={str(other)!r} and model.name="
                          f"{str(student)!r} do not share a vocabulary"), msg
    assert "1001 rows" in msg and "1000" in msg, msg


def test_section_checks(tmp_path, tiny):
    from jaxpt.algorithms.distill import DistillSection
    from jaxpt.trainers.distill import build_distill_trainer

    with pytest.raises(ValueError, match=r"distill.beta=1.5: must be in \[0, 1\]"):
        DistillSection(beta=1.5)
    with pytest.raises(ValueError, match="reverse_kl_reward with distill.lmbda=0.5"):
        DistillSection(loss="reverse_kl_reward", lmbda=0.5)
    cfg = distill_config(tmp_path, tiny, teacher=None)
    with pytest.raises(ValueError, match="distill.teacher is not set"):
        build_distill_trainer(cfg)
