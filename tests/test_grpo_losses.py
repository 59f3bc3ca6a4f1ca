"""GRPO-family losses against hand-computed values and an independent per-element numpy loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.losses.grpo import (
    GRPOLossConfig,
    clipped_surrogate,
    grpo_loss,
    importance_log_weights,
    k3_kl,
    mask_truncated,
    prefix_rft_masks,
    rl_weight_schedule,
    sft_nll,
    sft_weight_schedule,
)

# B=3 completions, T=4 tokens; row lengths 3, 2, 4
LOGP = np.array(
    [[-1.0, -0.5, -2.0, -0.3], [-0.7, -1.2, -0.1, -0.9], [-0.4, -0.8, -1.5, -2.2]], np.float32
)
# old = logp - delta: ratios exp(delta) cover unclipped, above 1+eps and below 1-eps
DELTA = np.array(
    [[0.1, 0.4, -0.5, 0.0], [-0.4, 0.05, 0.3, 0.0], [0.3, -0.3, 0.0, 0.25]], np.float32
)
OLD = LOGP - DELTA
MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
ADV = np.array([1.0, -0.5, 2.0], np.float32)
REF = LOGP + np.array(
    [[0.2, -0.1, 0.3, 0.0], [0.0, 0.5, -0.2, 0.1], [-0.3, 0.1, 0.2, 0.4]], np.float32
)


def numpy_loop_loss(
    loss_type,
    lp,
    old,
    adv,
    mask,
    *,
    eps_lo=0.2,
    eps_hi=0.2,
    level="token",
    beta=0.0,
    ref=None,
    max_len=None,
    n_items=None,
    cispo_max=5.0,
):
    """Per-element Python loop written from the papers' formulas, independent of the jnp code."""
    B, T = lp.shape
    per_tok = np.zeros((B, T))
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t] > 0]
        seq_log_ratio = sum(float(lp[b, t]) - float(old[b, t]) for t in toks) / max(len(toks), 1)
        for t in range(T):
            if level == "sequence":
                r = math.exp(seq_log_ratio)
            else:
                r = math.exp(float(lp[b, t]) - float(old[b, t]))
            a = float(adv[b])
            if loss_type == "cispo":
                loss = -min(r, cispo_max) * a * float(lp[b, t])
            else:
                clipped = min(max(r, 1 - eps_lo), 1 + eps_hi)
                loss = -min(r * a, clipped * a)
            if beta:
                d = float(ref[b, t]) - float(lp[b, t])
                loss += beta * (math.exp(d) - d - 1)
            per_tok[b, t] = loss
    n_tok = float(mask.sum())
    total = float((per_tok * mask).sum())
    if loss_type == "grpo":
        return sum((per_tok[b] * mask[b]).sum() / max(mask[b].sum(), 1) for b in range(B)) / B
    if loss_type == "bnpo":
        return total / n_tok
    if loss_type == "dr_grpo":
        return total / (B * max_len)
    return total / (n_tok if n_items is None else n_items)


def test_clipped_surrogate_hand_values():
    # r=1.5, A=1, eps=0.2: -min(1.5, 1.2) = -1.2 ; r=0.5, A=-1: -min(-0.5, -0.8) = 0.8
    # r=1.5, A=-1: -min(-1.5, -1.2) = 1.5 (no clip on the pessimistic side) ; r=1.1, A=2: -2.2
    r = jnp.array([1.5, 0.5, 1.5, 1.1])
    a = jnp.array([1.0, -1.0, -1.0, 2.0])
    np.testing.assert_allclose(clipped_surrogate(r, a, 0.2, 0.2), [-1.2, 0.8, 1.5, -2.2], rtol=1e-6)
    # clip-higher: eps_high=0.28 lets r=1.25 through unclipped
    np.testing.assert_allclose(clipped_surrogate(jnp.array([1.25]), 1.0, 0.2, 0.28), [-1.25])


def test_reductions_hand_numbers_on_policy():
    # old=None: ratio exactly 1, per-token loss = -A. Token counts per row: 3, 2, 4 (9 total).
    # sum_bt m*(-A) = -(1*3 - 0.5*2 + 2*4) = -10
    cases = {
        "grpo": -(1.0 - 0.5 + 2.0) / 3,  # per-row mean is -A_b, then batch mean
        "bnpo": -10.0 / 9,
        "dr_grpo": -10.0 / (3 * 8),  # B * max_completion_length = 24
        "dapo": -10.0 / 9,
    }
    for loss_type, expected in cases.items():
        cfg = GRPOLossConfig(loss_type=loss_type, max_completion_length=8)
        loss, metrics = grpo_loss(cfg, jnp.asarray(LOGP), None, ADV, MASK)
        np.testing.assert_allclose(loss, expected, rtol=1e-6, err_msg=loss_type)
        np.testing.assert_allclose(metrics["rl_loss"], expected, rtol=1e-6)
        assert float(metrics["clip_ratio/region_mean"]) == 0.0
    # dapo with the global token count of an accumulated batch
    loss, _ = grpo_loss(GRPOLossConfig("dapo"), LOGP, None, ADV, MASK, num_items_in_batch=20.0)
    np.testing.assert_allclose(loss, -0.5, rtol=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
def test_loss_matches_numpy_loop(loss_type, level):
    eps_hi = None if loss_type == "cispo" else 0.28
    cfg = GRPOLossConfig(
        loss_type=loss_type,
        epsilon=0.2,
        epsilon_high=eps_hi,
        importance_sampling_level=level,
        max_completion_length=6,
        cispo_epsilon_max=1.3,
    )
    loss, _ = grpo_loss(cfg, LOGP, OLD, ADV, MASK)
    expected = numpy_loop_loss(
        loss_type, LOGP, OLD, ADV, MASK, eps_hi=0.28, level=level, max_len=6, cispo_max=1.3
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_kl_term_and_value(loss_type):
    # k3 by hand: logp=-1, ref=-2 -> d=-1 -> e^-1 + 1 - 1 = 0.36787944
    #             logp=-2, ref=-1 -> d=+1 -> e - 1 - 1 = 0.71828183 ; equal -> 0
    kl = k3_kl(jnp.array([-1.0, -2.0, -0.5]), jnp.array([-2.0, -1.0, -0.5]))
    np.testing.assert_allclose(kl, [0.36787944, 0.71828183, 0.0], rtol=1e-6, atol=1e-7)

    cfg = GRPOLossConfig(loss_type=loss_type, beta=0.04)
    loss, metrics = grpo_loss(cfg, LOGP, OLD, ADV, MASK, ref_logprobs_BT=REF)
    expected = numpy_loop_loss(loss_type, LOGP, OLD, ADV, MASK, beta=0.04, ref=REF)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    d = REF - LOGP
    kl_mean = ((np.exp(d) - d - 1) * MASK).sum() / MASK.sum()
    np.testing.assert_allclose(metrics["kl"], kl_mean, rtol=1e-5)
    with pytest.raises(ValueError, match="ref_logprobs_BT"):
        grpo_loss(cfg, LOGP, OLD, ADV, MASK)
    # beta == 0: no reference needed, no kl metric
    _, m0 = grpo_loss(GRPOLossConfig(loss_type=loss_type), LOGP, OLD, ADV, MASK)
    assert "kl" not in m0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
def test_on_policy_gradient_is_policy_gradient(loss_type):
    """mu=1 (old == current, no clipping): grad equals that of -sum(A logp m) / normalizer."""
    cfg = GRPOLossConfig(loss_type=loss_type, max_completion_length=5)
    lens = MASK.sum(-1)
    B = LOGP.shape[0]

    def pg(lp):  # plain policy-gradient surrogate, normalized as each loss type says
        w = ADV[:, None] * lp * MASK
        if loss_type == "grpo":
            return -jnp.mean(jnp.sum(w, -1) / lens)
        if loss_type == "dr_grpo":
            return -jnp.sum(w) / (B * 5)
        return -jnp.sum(w) / MASK.sum()

    expected = jax.grad(pg)(jnp.asarray(LOGP))
    for old in (None, jnp.asarray(LOGP)):  # stop-gradient default, and explicit equal values
        got = jax.grad(lambda lp, old=old: grpo_loss(cfg, lp, old, ADV, MASK)[0])(jnp.asarray(LOGP))
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)


def test_dr_grpo_normalizer_is_length_free():
    cfg = GRPOLossConfig(loss_type="dr_grpo", max_completion_length=10)
    adv = np.array([1.0, 1.0], np.float32)
    lp = np.full((2, 10), -1.0, np.float32)
    short = np.zeros((2, 10), np.float32)
    short[:, :2] = 1  # 2 tokens per row
    long = np.zeros((2, 10), np.float32)
    long[:, :8] = 1  # 8 tokens per row
    g_short = jax.grad(lambda x: grpo_loss(cfg, x, None, adv, short)[0])(jnp.asarray(lp))
    g_long = jax.grad(lambda x: grpo_loss(cfg, x, None, adv, long)[0])(jnp.asarray(lp))
    # per-token gradient -A / (B * L) = -1/20 whatever the completion lengths
    np.testing.assert_allclose(g_short[0, 0], -0.05, rtol=1e-6)
    np.testing.assert_allclose(g_long[0, 0], -0.05, rtol=1e-6)
    # loss = -sum(A * len) / (B * L): 4 tokens -> -0.2, 16 tokens -> -0.8
    np.testing.assert_allclose(grpo_loss(cfg, lp, None, adv, short)[0], -4 / 20, rtol=1e-6)
    np.testing.assert_allclose(grpo_loss(cfg, lp, None, adv, long)[0], -16 / 20, rtol=1e-6)
    # extra padding columns change nothing
    lp_pad = np.concatenate([lp, np.full((2, 5), -3.0, np.float32)], 1)
    mask_pad = np.concatenate([long, np.zeros((2, 5), np.float32)], 1)
    np.testing.assert_allclose(grpo_loss(cfg, lp_pad, None, adv, mask_pad)[0], -0.8, rtol=1e-6)
    # grpo, by contrast, gives the short rows larger per-token gradients (-1/(B*len))
    g_grpo = jax.grad(lambda x: grpo_loss(GRPOLossConfig("grpo"), x, None, adv, short)[0])(
        jnp.asarray(lp)
    )
    np.testing.assert_allclose(g_grpo[0, 0], -1 / (2 * 2), rtol=1e-6)


def test_gspo_sequence_ratio_and_gradient():
    # row 0 log ratios over its 3 tokens: 0.1, 0.4, -0.5 -> mean 0.0 -> s = 1
    # row 1 over 2 tokens: -0.4, 0.05 -> mean -0.175 -> s = exp(-0.175)
    # row 2 over 4 tokens: 0.3, -0.3, 0.0, 0.25 -> mean 0.0625
    log_w = importance_log_weights(LOGP, OLD, MASK, "sequence")
    assert log_w.shape == (3, 1)
    np.testing.assert_allclose(log_w[:, 0], [0.0, -0.175, 0.0625], atol=1e-6)

    # wide clip range: unclipped, grpo reduction; loss = -mean_b(s_b A_b)
    cfg = GRPOLossConfig("grpo", epsilon=0.5, importance_sampling_level="sequence")
    s = np.exp([0.0, -0.175, 0.0625])
    loss = grpo_loss(cfg, LOGP, OLD, ADV, MASK)[0]
    np.testing.assert_allclose(loss, -np.mean(s * ADV), rtol=1e-5)
    # d loss / d logp_bt = -A_b s_b / (B len_b) on valid tokens, 0 on padding
    grad = jax.grad(lambda lp: grpo_loss(cfg, lp, OLD, ADV, MASK)[0])(jnp.asarray(LOGP))
    lens = MASK.sum(-1)
    expected = (-ADV * s / (3 * lens))[:, None] * MASK
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


def test_gspo_sequence_clipping_drops_whole_sequence():
    # every token of row 0 has log ratio 0.3 -> s = e^0.3 = 1.35 > 1.2 with A > 0: clipped,
    # so the whole sequence has zero gradient; row 1 unclipped
    lp = np.zeros((2, 3), np.float32) - 1.0
    old = lp - np.array([[0.3, 0.3, 0.3], [0.05, 0.05, 0.05]], np.float32)
    mask = np.ones((2, 3), np.float32)
    adv = np.array([1.0, 1.0], np.float32)
    cfg = GRPOLossConfig("grpo", importance_sampling_level="sequence")
    grad = jax.grad(lambda x: grpo_loss(cfg, x, old, adv, mask)[0])(jnp.asarray(lp))
    np.testing.assert_allclose(grad[0], 0.0)
    np.testing.assert_allclose(grad[1], -np.exp(0.05) / (2 * 3), rtol=1e-5)
    _, m = grpo_loss(cfg, lp, old, adv, mask)
    np.testing.assert_allclose(m["clip_ratio/high_mean"], 0.5)  # one of two sequences


def test_cispo_stop_gradient_weight():
    # ratios e^0.5 = 1.6487 (capped at eps_max=1.5) and e^-0.2 = 0.8187 (not capped)
    lp = np.array([[-1.0, -2.0]], np.float32)
    old = lp - np.array([[0.5, -0.2]], np.float32)
    mask = np.ones((1, 2), np.float32)
    adv = np.array([2.0], np.float32)
    cfg = GRPOLossConfig("cispo", cispo_epsilon_max=1.5)
    loss, m = grpo_loss(cfg, lp, old, adv, mask)
    w = np.array([1.5, math.exp(-0.2)])
    # loss = -sum(w A logp) / 2 = -(1.5*2*-1 + 0.81873*2*-2)/2
    np.testing.assert_allclose(loss, -(w * 2.0 * lp[0]).sum() / 2, rtol=1e-6)
    grad = jax.grad(lambda x: grpo_loss(cfg, x, old, adv, mask)[0])(jnp.asarray(lp))
    # the weight is a constant: d/dlogp = -w A / N (no d(ratio)/dlogp term)
    np.testing.assert_allclose(grad[0], -w * 2.0 / 2, rtol=1e-6)
    np.testing.assert_allclose(m["cispo_clip_ratio"], 0.5)
    assert "clip_ratio/low_mean" not in m
    with pytest.raises(ValueError, match="cispo_epsilon_max"):
        GRPOLossConfig("cispo", epsilon_high=0.28)


def test_clip_ratio_metrics_hand_case():
    # 2 rows x 4 tokens, eps = 0.2 (both sides). Ratios:
    #   row 0 (A=+1): 1.5 (high), 0.5 (low side but A>0: not counted), 1.0, 1.3 (high)
    #   row 1 (A=-1): 0.5 (low), 1.5 (A<0: not counted), 0.7 (low), [padding 0.1]
    r = np.array([[1.5, 0.5, 1.0, 1.3], [0.5, 1.5, 0.7, 0.1]], np.float32)
    lp = np.full((2, 4), -1.0, np.float32)
    old = lp - np.log(r)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
    adv = np.array([1.0, -1.0], np.float32)
    _, m = grpo_loss(GRPOLossConfig("dapo"), lp, old, adv, mask)
    np.testing.assert_allclose(m["clip_ratio/high_mean"], 2 / 7, rtol=1e-6)
    np.testing.assert_allclose(m["clip_ratio/low_mean"], 2 / 7, rtol=1e-6)
    np.testing.assert_allclose(m["clip_ratio/region_mean"], 4 / 7, rtol=1e-6)
    np.testing.assert_allclose(m["clip_ratio/low_min"], 0.0)  # row 0 has no low clip
    np.testing.assert_allclose(m["clip_ratio/high_max"], 0.5)  # row 0: 2 of 4
    # clip-higher eps_high = 0.4 un-clips the 1.3 token
    _, m2 = grpo_loss(GRPOLossConfig("dapo", epsilon_high=0.4), lp, old, adv, mask)
    np.testing.assert_allclose(m2["clip_ratio/high_mean"], 1 / 7, rtol=1e-6)


def test_entropy_metric_and_jit_matches_eager():
    ent = np.arange(12, dtype=np.float32).reshape(3, 4)
    cfg = GRPOLossConfig("dapo", epsilon_high=0.28, beta=0.01)

    def f(lp, old, adv, mask, ref, ent):
        return grpo_loss(cfg, lp, old, adv, mask, ref_logprobs_BT=ref, entropy_BT=ent)

    eager_loss, eager_m = f(LOGP, OLD, ADV, MASK, REF, ent)
    jit_loss, jit_m = jax.jit(f)(LOGP, OLD, ADV, MASK, REF, ent)
    np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-6)
    for k in eager_m:
        np.testing.assert_allclose(jit_m[k], eager_m[k], rtol=1e-6, err_msg=k)
    # masked mean of 0..11 over the mask: (0+1+2 + 4+5 + 8+9+10+11) / 9 = 50/9
    np.testing.assert_allclose(eager_m["entropy"], 50 / 9, rtol=1e-6)


def test_sft_hybrid_term():
    """The SFT term of the hybrids (demonstrations, Prefix-RFT prefixes) beside the RL loss:
    ``-sum(m logp) / max(num_tokens, min_tokens)``, num_tokens of the whole batch."""
    sft_mask, rl_mask = prefix_rft_masks(jnp.array([2, 0, 1]), jnp.asarray(MASK))
    # SFT tokens: row0 t0,t1 (-1.0, -0.5), row2 t0 (-0.4): NLL mean = 1.9 / 3
    np.testing.assert_allclose(sft_nll(LOGP, sft_mask, jnp.sum(sft_mask)), 1.9 / 3, rtol=1e-6)
    # two micro-batches with the batch's token count add up to the batch's mean
    halves = sum(float(sft_nll(LOGP[r], sft_mask[r], 3.0)) for r in (slice(0, 1), slice(1, 3)))
    assert halves == pytest.approx(1.9 / 3, rel=1e-6)
    # no tokens: the floor keeps it finite (0); fractional weights use a smaller floor
    assert float(sft_nll(LOGP, jnp.zeros_like(sft_mask), 0.0)) == 0.0
    np.testing.assert_allclose(sft_nll(LOGP[:1, :1], jnp.array([[0.5]]), 0.5, 1e-6), 1.0)
    _, m = grpo_loss(GRPOLossConfig("dapo"), LOGP, None, ADV, rl_mask)
    # RL tokens (ratio 1, loss -A): row0 t2 (A=1), row1 t0,t1 (A=-.5), row2 t1..t3 (A=2)
    np.testing.assert_allclose(m["rl_loss"], -(1.0 - 0.5 * 2 + 2.0 * 3) / 6, rtol=1e-6)
    assert "sft_loss" not in m

    @jax.jit
    def f(step):  # a traced schedule weight
        return sft_weight_schedule(step, "linear", initial_weight=1.0, final_weight=0.0,
                                   decay_steps=4) * sft_nll(LOGP, sft_mask, 3.0)

    np.testing.assert_allclose([f(0), f(2), f(10)], [1.9 / 3, 1.9 / 6, 0.0], rtol=1e-6)


def test_prefix_rft_masks_hand_example():
    mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
    sft, rl = prefix_rft_masks(jnp.array([2, 3, 0]), mask)
    np.testing.assert_array_equal(sft, [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rl, [[0, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert sft.dtype == jnp.int32


def test_mask_truncated():
    out = mask_truncated(jnp.asarray(MASK), jnp.array([False, True, False]))
    np.testing.assert_array_equal(out, [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    # a fully masked row contributes nothing to dapo/bnpo: loss = -(1*3 + 2*4) / 7
    loss, _ = grpo_loss(GRPOLossConfig("bnpo"), LOGP, None, ADV, out)
    np.testing.assert_allclose(loss, -11 / 7, rtol=1e-6)


def test_schedules():
    f = lambda s, kind, **kw: float(sft_weight_schedule(s, kind, **kw))  # noqa: E731
    assert f(7, "constant", initial_weight=0.3) == pytest.approx(0.3)
    lin = dict(initial_weight=1.0, final_weight=0.2, decay_steps=10)
    assert [f(s, "linear", **lin) for s in (0, 5, 10, 20)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    wu = dict(initial_weight=1.0, warmup_steps=3)
    assert [f(s, "warmup_then_rl", **wu) for s in (0, 2, 3, 9)] == [1.0, 1.0, 0.0, 0.0]
    rl = [float(rl_weight_schedule(s, "warmup_then_rl", warmup_steps=3)) for s in (0, 2, 3)]
    assert rl == [0.0, 0.0, 1.0]
    assert float(rl_weight_schedule(5, "linear")) == float(rl_weight_schedule(0)) == 1.0
    with pytest.raises(ValueError, match="decay_steps"):
        sft_weight_schedule(5, "linear")
    # SASR ("adaptive") is a per-step SFT-or-RL choice (SASRMixer), never a weight here.
    for kind in ("adaptive", "cosine"):
        with pytest.raises(ValueError, match="kind"):
            sft_weight_schedule(0, kind)
        with pytest.raises(ValueError, match="kind"):
            rl_weight_schedule(0, kind)



def test_config_validation():
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLossConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        GRPOLossConfig(importance_sampling_level="tokens")
    with pytest.raises(ValueError, match="max_completion_length"):
        GRPOLossConfig(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="epsilon"):
        GRPOLossConfig(epsilon=1.0)
    with pytest.raises(ValueError, match="beta"):
        GRPOLossConfig(beta=-0.1)
    assert GRPOLossConfig(epsilon=0.2).effective_epsilon_high == 0.2
    assert GRPOLossConfig(epsilon=0.2, epsilon_high=0.28).effective_epsilon_high == 0.28
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(GRPOLossConfig(), LOGP, None, np.ones(4, np.float32), MASK)
