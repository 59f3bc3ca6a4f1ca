"""GRPO trainer: rollout layout, log-prob slicing, tiny end-to-end runs (learning, reuse,
reference KL, the SFT+RL hybrid) and config errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import (
    assert_reordered_close,
    assert_trees_reordered_close,
    rejects,
    run_depth,
)
from train_utils import make_tiny_model_dir, make_tiny_tokenizer, read_metrics, tiny_run_config

from jaxpt.algorithms.grpo import GRPOBatch
from jaxpt.config_load import load_config
from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import init_model
from jaxpt.rl.layout import GroupRows, completion_logprobs, rollout_sequences


def test_rollout_sequences_hand_made():
    prompt = np.array([[0, 5, 6], [4, 5, 6]])
    pmask = np.array([[0, 1, 1], [1, 1, 1]])
    comp = np.array([[7, 8, 0], [9, 0, 0]])
    cmask = np.array([[1, 1, 0], [1, 0, 0]])
    b = rollout_sequences(prompt, pmask, comp, cmask, pad_id=0)
    np.testing.assert_array_equal(b.input_ids, [[0, 5, 6, 7, 8, 0], [4, 5, 6, 9, 0, 0]])
    np.testing.assert_array_equal(b.segment_ids, [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b.positions[0, 1:5], [0, 1, 2, 3])
    np.testing.assert_array_equal(b.positions[1, :4], [0, 1, 2, 3])
    # The completion's log-probs are read at positions P-1 .. P-1+C, whose targets are
    # exactly the completion tokens.
    np.testing.assert_array_equal(completion_logprobs(b.targets, 3), [[7, 8, 0], [9, 0, 0]])
    with pytest.raises(ValueError, match="left padded"):
        rollout_sequences(np.array([[5, 0]]), np.array([[1, 0]]), comp[:1], cmask[:1])


def test_completion_logprobs_match_full_logits():
    from jaxpt.engine.logprobs import sequence_token_logprobs

    cfg = ModelConfig(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    model = init_model(cfg, seed=1)
    rng = np.random.RandomState(0)
    pmask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    cmask = np.array([[1, 1, 1], [1, 1, 0]])
    b = rollout_sequences(rng.randint(1, 50, (2, 4)), pmask, rng.randint(1, 50, (2, 3)), cmask)
    jb = {k: jnp.asarray(v) for k, v in dataclasses.asdict(b).items()}
    lp, _, _ = sequence_token_logprobs(model, jb, impl="chunked")
    ours = np.asarray(completion_logprobs(lp, 3))
    # Independently: each row's real tokens alone, full logits, log-softmax, gather.
    for r in range(2):
        real = b.input_ids[r][b.segment_ids[r] > 0]
        hidden, _ = model(jnp.asarray(real[None]))
        logp = np.asarray(jax_log_softmax(model.logits(hidden)[0]))
        n_prompt = int(pmask[r].sum())
        for j in range(int(cmask[r].sum())):
            tok = real[n_prompt + j]
            # Sums of <= 64 terms (hidden 32, MLP 64, vocab 50), 2 layers + head + softmax.
            assert_reordered_close(ours[r, j], logp[n_prompt + j - 1, tok], n=64, depth=4)


def _flat_rollout(G=3, B=2, P=6, C=5, seed=0, V=50):
    """A flat rollout batch: B prompts of different lengths (left padded), G completions
    each of different lengths (right padded)."""
    rng = np.random.RandomState(seed)
    prompt_BP = rng.randint(1, V, (B, P))
    pmask_BP = np.ones((B, P), int)
    pmask_BP[0, :2] = 0  # prompt 0 is 2 tokens shorter
    cmask_RC = np.ones((B * G, C), int)
    for r in range(B * G):
        cmask_RC[r, rng.randint(1, C + 1):] = 0
    rows = rollout_sequences(np.repeat(prompt_BP, G, 0), np.repeat(pmask_BP, G, 0),
                             rng.randint(1, V, (B * G, C)), cmask_RC)
    return GRPOBatch(rows, rng.randn(B * G).astype(np.float32))


@pytest.mark.parametrize("untrained_token", [False, True])
def test_shared_prompt_rows_give_the_flat_rows_logprobs_and_grads(untrained_token):
    """One row [prompt | G completions] with the prompt shared equals G separate rows:
    log-probs, entropies and parameter gradients (fp32, <= 1e-5). ``untrained_token``: the
    second completion token of every row is real but out of the loss mask (an environment's
    turn in a multi-turn rollout): the tokens after it still attend to it."""
    import jax
    from flax import nnx

    from jaxpt.rl.layout import completion_token_logprobs, to_shared_prompt

    cfg = ModelConfig(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    graphdef, params = nnx.split(init_model(cfg, seed=2))
    flat_batch = _flat_rollout()
    if untrained_token:
        mask_RC = np.asarray(flat_batch.rows.completion_mask).copy()
        mask_RC[:, 1] = 0
        flat_batch = dataclasses.replace(flat_batch, rows=dataclasses.replace(
            flat_batch.rows, completion_mask=mask_RC))
    grouped_batch = to_shared_prompt(flat_batch, 3)
    flat, grouped = flat_batch.rows, grouped_batch.rows
    assert grouped.input_ids.shape == (2, 6 + 3 * 5)
    np.testing.assert_array_equal(grouped_batch.advantages.reshape(-1), flat_batch.advantages)
    weights_RC = jnp.asarray(np.random.RandomState(1).randn(6, 5), jnp.float32)

    def objective(fn, rows):
        def f(p):
            lp, ent = fn(nnx.merge(graphdef, p), jax.tree.map(jnp.asarray, rows),
                         impl="chunked", with_entropy=True)
            return jnp.sum(lp * weights_RC) + 0.1 * jnp.sum(ent), (lp, ent)
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (_, (lp_f, ent_f)), g_f = objective(completion_token_logprobs, flat)
    (_, (lp_g, ent_g)), g_g = objective(completion_token_logprobs, grouped)
    mask = flat.completion_mask > 0
    assert np.all(np.asarray(lp_f)[mask] < 0)
    # Sums of <= 64 terms (hidden 32, MLP 64, vocab 50, 21 positions, 30 tokens), 2 layers
    # + head + softmax; the gradients one backward more.
    assert_reordered_close(lp_g, lp_f, n=64, depth=4)
    assert_reordered_close(ent_g, ent_f, n=64, depth=4)
    assert_trees_reordered_close(g_g, g_f, n=64, depth=5)
    # Mutation: completions that no longer see the shared prompt (its `shared` mask lost)
    # must fail.
    blind = dataclasses.replace(grouped, shared=np.zeros_like(grouped.shared))
    (_, (lp_x, _)), _ = objective(completion_token_logprobs, blind)
    assert rejects(assert_reordered_close, lp_x, lp_f, n=64, depth=4)


def _hybrid_batch(seed=0):
    """A flat batch with every optional part (old / reference log-probs, prefixes,
    demonstrations): 2 prompts x 3 completions."""
    rows = _flat_rollout(seed=seed).rows
    rng = np.random.RandomState(seed + 1)
    R, C = rows.completion_mask.shape
    P = rows.input_ids.shape[1] - C
    lp_RC = -rng.rand(R, C).astype(np.float32)
    demo = rollout_sequences(rows.input_ids[:, :P], rows.segment_ids[:, :P],
                             rng.randint(1, 50, (R, 4)), np.arange(4)[None] < [[4], [3]] * 3)
    demo = dataclasses.replace(demo, completion_mask=demo.completion_mask / 3)
    return GRPOBatch(rows, rng.randn(R).astype(np.float32),
                     old_logprobs=lp_RC + 0.2 * rng.randn(R, C).astype(np.float32),
                     ref_logprobs=lp_RC, prefix_lengths=np.array([1, 0, 0, 2, 0, 0], np.int32),
                     demo=demo)


@pytest.mark.parametrize("section", [
    dict(loss_type="dapo", sft_weight=0.5),
    dict(loss_type="grpo", importance_sampling_level="sequence", sft_weight=0.5,
         sft_schedule="adaptive", sft_warmup_steps=1),
])
def test_flat_and_shared_prompt_batches_give_the_same_loss(section):
    """The same rows in the flat layout and in the shared-prompt layout: the same loss,
    metrics and gradients through make_batch_stats + the loss (every optional part on)."""
    from flax import nnx

    from jaxpt.algorithms.grpo import GRPOSection, make_batch_stats, make_grpo_loss_fn
    from jaxpt.rl.layout import to_shared_prompt

    grpo = GRPOSection(num_generations=3, beta=0.04, num_iterations=2, prefix_rft_ratio=0.25,
                       **section)
    cfg = ModelConfig(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    graphdef, params = nnx.split(init_model(cfg, seed=4))
    loss_fn = make_grpo_loss_fn(graphdef, grpo, impl="chunked", with_entropy=True)
    flat = _hybrid_batch()
    if grpo.sft_schedule == "adaptive":
        flat = dataclasses.replace(flat, sft_mode=np.zeros(6, np.float32))  # an RL step

    class S:
        step = jnp.asarray(0)

    @jax.jit
    def loss_and_grads(p, batch):
        def f(p):
            return loss_fn(p, batch, None, make_batch_stats(grpo)(S, batch))
        return jax.value_and_grad(f, has_aux=True)(p)

    (loss_f, m_f), g_f = loss_and_grads(params, jax.tree.map(jnp.asarray, flat))
    grouped = to_shared_prompt(flat, 3)
    assert isinstance(grouped.rows, GroupRows) and grouped.demo.input_ids.shape[:2] == (2, 3)
    (loss_g, m_g), g_g = loss_and_grads(params, jax.tree.map(jnp.asarray, grouped))
    assert set(m_f) == set(m_g) >= {"rl_loss", "kl", "entropy", "prefix_sft_loss", "sft_loss"}
    assert float(m_f["prefix_sft_loss"]) > 0 and float(m_f["kl"]) > 0
    # Sums of <= 64 terms (hidden 32, MLP 64, vocab 50), 2 layers + head + softmax; the
    # gradients one backward more.
    assert_reordered_close(loss_g, loss_f, n=64, depth=4)
    for k in m_f:
        assert_reordered_close(m_g[k], m_f[k], n=64, depth=4, err_msg=k)
    assert_trees_reordered_close(g_g, g_f, n=64, depth=5)


def test_a_batch_without_a_part_its_config_needs_is_refused():
    from jaxpt.algorithms.grpo import GRPOSection, make_batch_stats, make_grpo_loss_fn

    full = _hybrid_batch()
    no_ref = dataclasses.replace(full, old_logprobs=None, prefix_lengths=None, demo=None,
                                 ref_logprobs=None)
    grpo = GRPOSection(num_generations=3, beta=0.1)
    with pytest.raises(ValueError, match=r"GRPOBatch.ref_logprobs is missing: grpo.beta > 0"):
        make_batch_stats(grpo)(None, no_ref)
    with pytest.raises(ValueError, match=r"GRPOBatch.ref_logprobs is missing"):
        make_grpo_loss_fn(None, grpo, impl="chunked", with_entropy=False)(None, no_ref, None, None)
    # A part the config does not use would be ignored by the loss: refused too.
    with pytest.raises(ValueError, match=r"GRPOBatch.old_logprobs is set, but the config does "
                                         r"not use it \(that takes grpo.num_iterations"):
        make_batch_stats(grpo)(None, dataclasses.replace(no_ref, ref_logprobs=full.ref_logprobs,
                                                         old_logprobs=full.old_logprobs))


def test_group_rows_must_share_their_prompt():
    from jaxpt.rl.layout import group_rows

    flat = _flat_rollout().rows
    flat.input_ids[4, 3] += 1  # row 4 (group 1) gets a different prompt token
    with pytest.raises(ValueError, match="rows 3..5 do not share one prompt"):
        group_rows(flat, 3)


@pytest.mark.parametrize("remat", ["attention", "none"])
def test_prefix_block_attention_equals_dense_attention_on_the_shared_layout(remat):
    """Decoder(prefix_blocks=(P, C)) on shared-prompt rows: the same hidden states at every
    real position and the same parameter gradients as dense masked attention over the row
    (fp32, <= 1e-5), with both attention backwards (written-out and autodiff's)."""
    import jax
    from flax import nnx

    from jaxpt.rl.layout import group_rows

    cfg = ModelConfig(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    cfg = dataclasses.replace(cfg, remat=remat)
    graphdef, params = nnx.split(init_model(cfg, seed=3))
    g = jax.tree.map(jnp.asarray, group_rows(_flat_rollout().rows, 3))
    P, C = 6, 5
    real_BT = g.segment_ids > 0
    w_BTE = jnp.asarray(np.random.RandomState(0).randn(2, P + 3 * C, 32), jnp.float32)

    def run(blocks):
        def f(p):
            h, _ = nnx.merge(graphdef, p)(
                g.input_ids, g.positions, g.segment_ids,
                shared_BT=g.shared > 0, prefix_blocks=blocks)
            return jnp.sum(jnp.where(real_BT[..., None], h * w_BTE, 0.0)), h
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (_, h_dense), g_dense = run(None)
    (_, h_block), g_block = run((P, C))
    real = np.asarray(real_BT)
    assert real[:, P:].sum() < real[:, P:].size  # completions with padding are covered
    # Sums of <= 64 terms (hidden 32, MLP 64, 21 positions), 2 layers; the gradients
    # one backward more.
    assert_reordered_close(np.asarray(h_block)[real], np.asarray(h_dense)[real], n=64, depth=2)
    assert_trees_reordered_close(g_block, g_dense, n=64, depth=3)
    with pytest.raises(ValueError, match="does not split a row of 21 tokens"):
        nnx.merge(graphdef, params)(g.input_ids, prefix_blocks=(6, 4))


def test_shared_prompt_step_equals_flat_step(tmp_path, tiny):
    """The trainer with share_prompt=always and =never: same rollouts, same first-step
    loss, gradient norm and entropy (the layout changes the work, not the math)."""
    runs = {}
    from jaxpt.trainers.grpo import build_grpo_trainer

    for mode in ("always", "never"):
        (tmp_path / mode).mkdir()
        cfg = grpo_config(tmp_path / mode, tiny, train={"max_steps": 2},
                          grpo={"share_prompt": mode, "beta": 0.05})
        trainer = build_grpo_trainer(cfg)
        batch = trainer.put_batch(trainer.source.next(trainer.state).batch)
        assert isinstance(batch.rows, GroupRows) == (mode == "always")
        runs[mode] = [r for r in run_grpo(cfg) if "loss" in r]
    for a, b in zip(runs["always"], runs["never"], strict=True):
        assert a["reward"] == b["reward"]
        # The tiny tokenizer's vocab (1000) bounds the sums, a[k] is a[step] steps in. The
        # loss and kl are means of differences of log-probs: their rounding is relative to
        # the log-probs (the entropy's scale), not to the cancelled difference.
        depth = run_depth(a["step"], 2)
        for k in ("loss", "grad_norm", "entropy", "kl"):
            scale = max(abs(b[k]), abs(b["entropy"])) if k in ("loss", "kl") else None
            assert_reordered_close(a[k], b[k], n=1000, depth=depth, scale=scale, err_msg=k)


def jax_log_softmax(x):
    import jax

    return jax.nn.log_softmax(x, axis=-1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("grpo_tiny")
    tok = make_tiny_tokenizer(d / "tok", data_dir)
    model_dir = make_tiny_model_dir(d / "model", tok, seed=0)
    return model_dir, data_dir


def grpo_config(tmp_path, tiny, **sections):
    model_dir, data_dir = tiny
    grpo = {"num_generations": 4, "max_completion_length": 8, "max_prompt_length": 128,
            "reward_funcs": ["grpo_rewards:digit_fraction"], "temperature": 1.0,
            "eval_prompts": 8, "eval_batch_size": 8, **sections.pop("grpo", {})}
    train = {"max_steps": 6, "batch_size": 8, "seed": 0, "logprob_impl": "chunked",
             **sections.pop("train", {})}
    optim = {"lr": 1e-2, "schedule": "constant", "warmup_steps": 0, **sections.pop("optim", {})}
    path = tiny_run_config(
        tmp_path / "grpo.yaml", model_dir, data_dir, tmp_path / "run", algorithm="grpo",
        grpo=grpo, train=train, optim=optim, checkpoint={"every": 0}, **sections,
    )
    return load_config(path)


def run_grpo(cfg):
    from jaxpt.trainers.grpo import train_grpo

    train_grpo(cfg)
    return read_metrics(cfg.out_dir)


def test_grpo_learns_a_dense_reward(tmp_path, tiny):
    rows = run_grpo(grpo_config(tmp_path, tiny, train={"max_steps": 20},
                                grpo={"max_completion_length": 16}, optim={"lr": 3e-2}))
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards) == 20
    # Seeded and deterministic on CPU; the random policy starts near 0.08.
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.04, rewards
    assert all("clip_ratio/region_mean" in r and "completions/mean_length" in r
               for r in rows if "reward" in r)


def test_reused_rollouts_and_reference_kl(tmp_path, tiny):
    """mu=2 passes over 2 mini-batches: old log-probs are scored at rollout time, so the
    first pass has ratio 1 (no clipping, kl 0 at step 1 against the reference copy)."""
    rows = run_grpo(grpo_config(tmp_path, tiny, grpo={"num_iterations": 2,
                                                      "steps_per_generation": 2, "beta": 0.1,
                                                      "loss_type": "grpo"},
                                train={"max_steps": 4, "batch_size": 4}))
    steps = [r for r in rows if "loss" in r]
    assert [r.get("rollout") for r in steps] == [1.0, None, None, None]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert steps[0]["clip_ratio/region_mean"] == 0.0
    assert steps[-1]["kl"] > 0  # the policy moved away from the reference


def test_sft_hybrid_with_sft_warmup_then_rl(tmp_path, tiny):
    rows = run_grpo(grpo_config(tmp_path, tiny, grpo={
        "sft_weight": 1.0, "sft_schedule": "warmup_then_rl", "sft_warmup_steps": 2},
        train={"max_steps": 3}))
    steps = [r for r in rows if "loss" in r]
    assert all(r["sft_loss"] > 0 for r in steps)
    # During the SFT warm-up the RL term is off: the loss is the demonstrations' NLL.
    assert steps[0]["loss"] == pytest.approx(steps[0]["sft_loss"], rel=1e-5)
    assert steps[2]["sft_weight"] == 0.0


def test_batch_must_hold_whole_groups(tmp_path, tiny):
    from jaxpt.trainers.grpo import build_grpo_trainer

    cfg = grpo_config(tmp_path, tiny, train={"batch_size": 6})
    with pytest.raises(ValueError, match="multiple of grpo.num_generations=4"):
        build_grpo_trainer(cfg)


def test_prefix_rft_rollouts_start_from_the_demonstration(tmp_path, tiny):
    """Prefix-RFT: the first rollout of each group starts with a prefix of the prompt's
    demonstration (its tokens are the completion's first tokens), the others are the
    policy's own; the prefix gets the SFT loss and the continuation the RL loss."""
    from jaxpt.trainers.grpo import build_grpo_trainer

    cfg = grpo_config(tmp_path, tiny, grpo={"prefix_rft_ratio": 0.25, "prefix_min_fraction": 0.3,
                                            "prefix_max_fraction": 0.6},
                      train={"max_steps": 2})
    tr = build_grpo_trainer(cfg)
    src = tr.source
    src.rollout(tr.state)
    batch = src.buffer[0]
    prefix_len = batch.prefix_lengths
    chosen = [src.prompts[i] for i in src.prompt_indices(0)]
    G = 4
    C = batch.rows.completion_mask.shape[1]
    P = batch.rows.input_ids.shape[1] - C
    # Mini-batch rows are a permutation of the rollout rows: find them by prefix length.
    assert (prefix_len > 0).sum() == len(chosen)  # one prefixed rollout per group of 4
    assert (prefix_len == 0).sum() == len(chosen) * (G - 1)
    demos = {tuple(src.prefixes.demos.ids(ex)) for ex in chosen}
    for r in np.nonzero(prefix_len)[0]:
        n = int(prefix_len[r])
        completion = batch.rows.input_ids[r, P:P + n].tolist()
        demo = next(d for d in demos if list(d[:n]) == completion)
        assert int(0.3 * len(demo)) <= n <= int(0.6 * len(demo)), (n, len(demo))
        assert batch.rows.completion_mask[r, :n].all()  # the prefix is part of the completion
    rows = run_grpo(cfg)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    assert all(r["prefix_sft_loss"] > 0 and np.isfinite(r["loss"]) for r in steps)
    assert steps[0]["prefix/rows_frac"] == pytest.approx(0.25)


def test_prefix_rft_loss_splits_sft_and_rl_tokens(tiny):
    """The loss of a hand-made batch: prefix tokens add prefix_sft_weight * their mean NLL,
    the RL term sees only the continuation (zero advantages -> the loss is the NLL)."""
    from jaxpt.algorithms.grpo import GRPOSection, make_batch_stats, make_grpo_loss_fn
    from jaxpt.engine.logprobs import sequence_token_logprobs

    cfg = ModelConfig(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    model = init_model(cfg, seed=3)
    from flax import nnx

    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.RandomState(1)
    cmask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    b = rollout_sequences(rng.randint(1, 50, (2, 3)), np.ones((2, 3)), rng.randint(1, 50, (2, 5)),
                          cmask)
    jb = jax.tree.map(jnp.asarray, GRPOBatch(b, np.zeros(2, np.float32),
                                             prefix_lengths=np.array([2, 0], np.int32)))
    grpo = GRPOSection(prefix_rft_ratio=0.5, prefix_sft_weight=0.5, temperature=1.0,
                       loss_type="dapo")
    loss_fn = make_grpo_loss_fn(graphdef, grpo, impl="chunked", with_entropy=False)

    class S:
        step = jnp.asarray(0)

    stats = make_batch_stats(grpo)(S, jb)
    assert float(stats.prefix_tokens) == 2.0 and float(stats.num_items) == 5.0
    loss, metrics = loss_fn(params, jb, None, stats)
    lp, _, _ = sequence_token_logprobs(model, dataclasses.asdict(jb.rows), impl="chunked")
    lp_prefix = np.asarray(completion_logprobs(lp, 5))[0, :2]
    nll = -lp_prefix.mean()
    np.testing.assert_allclose(float(metrics["prefix_sft_loss"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.5 * nll, rtol=1e-5)


@pytest.mark.parametrize("reward, fill", [("grpo_rewards:constant", "repeat"),
                                          ("grpo_rewards:digit_fraction", "zero_advantage")])
def test_dynamic_sampling_keeps_the_batch_shape_and_stops(tmp_path, tiny, reward, fill):
    """With no signal anywhere (constant reward) dynamic sampling stops after
    max_sampling_rounds and fills the batch (zero advantages); with a dense reward the
    first round already fills it."""
    from jaxpt.trainers.grpo import build_grpo_trainer

    cfg = grpo_config(tmp_path, tiny, grpo={"dynamic_sampling": True, "max_sampling_rounds": 3,
                                            "dynamic_sampling_fill": fill,
                                            "reward_funcs": [reward]},
                      train={"max_steps": 1})
    tr = build_grpo_trainer(cfg)
    src = tr.source
    src.rollout(tr.state)
    batch = src.buffer[0]
    assert batch.rows.input_ids.shape[0] == 8 and batch.advantages.shape == (8,)
    m = src.metrics
    if reward.endswith("constant"):
        assert m["dynamic_sampling/rounds"] == 3 and m["dynamic_sampling/signal_groups"] == 0
        assert m["dynamic_sampling/padded_groups"] == 2
        np.testing.assert_array_equal(batch.advantages, 0.0)
        assert src.prompt_batches == 3  # each round drew fresh prompts
    else:
        assert m["dynamic_sampling/rounds"] == 1 and m["dynamic_sampling/padded_groups"] == 0
        assert np.abs(batch.advantages).sum() > 0
    # The row layout survives re-padding: real tokens end where completions start.
    C = batch.rows.completion_mask.shape[1]
    P = batch.rows.input_ids.shape[1] - C
    assert (batch.rows.segment_ids[:, P - 1] == 1).all()


def test_pad_rollout_keeps_the_layout():
    b = rollout_sequences(np.array([[0, 5, 6]]), np.array([[0, 1, 1]]), np.array([[7, 8]]),
                          np.array([[1, 1]]), pad_id=0)
    p = b.padded(5, 4, pad_id=0)
    np.testing.assert_array_equal(p.input_ids, [[0, 0, 0, 5, 6, 7, 8, 0, 0]])
    np.testing.assert_array_equal(p.segment_ids, [[0, 0, 0, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(p.positions[0, 3:7], [0, 1, 2, 3])
    np.testing.assert_array_equal(p.completion_mask, [[1, 1, 0, 0]])
    np.testing.assert_array_equal(completion_logprobs(p.targets, 4), [[7, 8, 0, 0]])


def test_sasr_mixer_rule():
    from jaxpt.rl.hybrids import SASRMixer

    m = SASRMixer(warmup_steps=2, gamma=0.5, seed=0)
    assert m.decide() == (True, 1.0) and m.decide() == (True, 1.0)  # warm-up: SFT
    m.observe(1, {"grad_norm": 4.0})
    assert m.decide() == (True, 1.0)  # g_warmup (step 2) has not arrived yet: still SFT
    m.observe(2, {"grad_norm": 2.0})
    assert m.g_warmup == 2.0 and m.g_last == 2.0
    m.observe(3, {"grad_norm": 3.0})  # an SFT step: its norm is the SFT gradient's
    assert m.probability() == pytest.approx(3.0 / (3.0 + 0.5 * 2.0))
    draws = [m.decide() for _ in range(200)]
    assert all(p == pytest.approx(0.75) for _, p in draws)
    assert 0.6 < np.mean([sft for sft, _ in draws]) < 0.9
    rl_step = next(i for i, (sft, _) in enumerate(draws) if not sft) + 4
    m.observe(rl_step, {"grad_norm": 100.0})  # an RL step's norm is not the SFT gradient's
    assert m.g_last == 3.0


def test_sasr_adaptive_schedule_in_the_trainer(tmp_path, tiny):
    rows = run_grpo(grpo_config(tmp_path, tiny, grpo={
        "sft_weight": 1.0, "sft_schedule": "adaptive", "sft_warmup_steps": 2, "sasr_gamma": 1.0},
        train={"max_steps": 6}))
    steps = [r for r in rows if "loss" in r]
    assert [r["sasr/sft_step"] for r in steps[:3]] == [1.0, 1.0, 1.0]
    for r in steps:
        if r["sasr/sft_step"] == 1.0:  # an SFT step: the RL term is off
            assert r["loss"] == pytest.approx(r["sft_loss"], rel=1e-5)
    # From step 4 on, p = g / (g + g_warmup) with g = the latest SFT step's gradient norm
    # two steps back (metrics arrive one step late) and g_warmup = step 2's.
    g_warmup = steps[1]["grad_norm"]
    for i in range(3, 6):
        sft_before = [r for r in steps[:i - 1] if r["sasr/sft_step"] == 1.0]
        g = sft_before[-1]["grad_norm"]
        assert steps[i]["sasr/p_sft"] == pytest.approx(g / (g + g_warmup), rel=1e-5)
