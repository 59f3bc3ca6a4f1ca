"""Rollout-vs-trainer mismatch correction (``grpo.rollout_correction``): the importance
weights of each mode against hand-computed cases, the GRPO loss they scale, and a tiny run
whose decode-loop log-probs line up with the trainer's token for token."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import make_tiny_model_dir, make_tiny_tokenizer, read_metrics, tiny_run_config

from jaxpt.config_load import load_config
from jaxpt.losses.grpo import GRPOLossConfig, grpo_loss
from jaxpt.rl.correction import correction_weights

# Two rows of 4 completion tokens. Row 0: 3 sampled tokens then padding; row 1: a
# 1-token demonstration prefix (NaN: not sampled) then 3 sampled tokens.
OLD = np.array([[-1.0, -2.0, -0.5, 0.0], [-0.3, -1.0, -1.5, -2.0]])
SAMPLED = np.array([[-1.5, -1.0, -0.5, 0.0], [np.nan, -1.2, -0.5, -2.1]])
MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
# d = old - sampled on sampled tokens, 0 elsewhere:
D = np.array([[0.5, -1.0, 0.0, 0.0], [0.0, 0.2, -1.0, 0.1]])


def test_token_truncate_and_token_mask_by_hand():
    w, m = correction_weights(OLD, SAMPLED, MASK, mode="token_truncate", cap=1.5)
    ratio = np.exp(D)  # e^0.5 = 1.649 > 1.5 is the one capped token
    np.testing.assert_allclose(w, np.minimum(ratio, 1.5), rtol=1e-6)
    sampled = [ratio[0, 0], ratio[0, 1], ratio[0, 2], ratio[1, 1], ratio[1, 2], ratio[1, 3]]
    kept = np.minimum(sampled, 1.5)
    assert m["sampling/importance_sampling_ratio/max"] == pytest.approx(1.5)
    assert m["sampling/importance_sampling_ratio/min"] == pytest.approx(math.exp(-1.0))
    assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(kept.mean())
    assert m["sampling/importance_sampling_ratio/capped_frac"] == pytest.approx(1 / 6)
    absd = [0.5, 1.0, 0.0, 0.2, 1.0, 0.1]  # the prefix token and padding are not sampled
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx(np.mean(absd))
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(1.0)

    w, m = correction_weights(OLD, SAMPLED, MASK, mode="token_mask", cap=1.5)
    expect = np.where(ratio > 1.5, 0.0, ratio)
    np.testing.assert_allclose(w, expect, rtol=1e-6)
    assert w[0, 0] == 0.0 and m["sampling/importance_sampling_ratio/min"] == 0.0


def test_sequence_modes_by_hand():
    # Row sums of d: -0.5 and -0.7; with cap 0.55, exp(-0.5) = 0.607 exceeds it.
    w, m = correction_weights(OLD, SAMPLED, MASK, mode="sequence_truncate", cap=0.55)
    np.testing.assert_allclose(w[0], np.full(4, 0.55), rtol=1e-6)
    np.testing.assert_allclose(w[1], np.full(4, math.exp(-0.7)), rtol=1e-6)
    assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(
        (0.55 + math.exp(-0.7)) / 2)
    assert m["sampling/importance_sampling_ratio/capped_frac"] == pytest.approx(0.5)
    w, _ = correction_weights(OLD, SAMPLED, MASK, mode="sequence_mask", cap=0.55)
    np.testing.assert_allclose(w, [[0.0] * 4, [math.exp(-0.7)] * 4], rtol=1e-6)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="token_truncate"):
        correction_weights(OLD, SAMPLED, MASK, mode="token", cap=2.0)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_the_weights_scale_each_tokens_policy_term_not_the_kl(loss_type):
    """On-policy (ratio 1) the policy term of token t is -A * w_t: the loss is the weighted
    token mean (dapo: over the batch's tokens; grpo: per sequence, then over rows); the
    k3 KL term is added unweighted, as TRL does."""
    rng = np.random.default_rng(0)
    lp = jnp.asarray(rng.normal(-1.0, 0.3, (2, 4)), jnp.float32)
    ref = jnp.asarray(rng.normal(-1.0, 0.3, (2, 4)), jnp.float32)
    adv = jnp.asarray([0.7, -1.3], jnp.float32)
    w = jnp.asarray([[1.0, 0.5, 2.0, 1.0], [0.0, 1.5, 1.0, 0.25]], jnp.float32)
    mask = jnp.asarray(MASK)
    cfg = GRPOLossConfig(loss_type=loss_type, beta=0.04, max_completion_length=4)
    loss, _ = grpo_loss(cfg, lp, None, adv, mask, ref_logprobs_BT=ref, sampling_weights_BT=w)
    kl = np.exp(np.asarray(ref - lp)) - np.asarray(ref - lp) - 1.0
    per_token = -np.asarray(adv)[:, None] * np.asarray(w) + 0.04 * kl
    m = np.asarray(mask)
    if loss_type == "dapo":
        expect = (per_token * m).sum() / m.sum()
    else:
        expect = ((per_token * m).sum(1) / m.sum(1)).mean()
    assert float(loss) == pytest.approx(expect, rel=1e-5)
    # The weights carry no gradient and scale the policy gradient token by token.
    g = jax.grad(lambda x: grpo_loss(GRPOLossConfig(loss_type="dapo"), x, None, adv, mask,
                                     sampling_weights_BT=w)[0])(lp)
    expect_g = -np.asarray(adv)[:, None] * np.asarray(w) * m / m.sum()
    np.testing.assert_allclose(np.asarray(g), expect_g, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("correction_tiny")
    tok = make_tiny_tokenizer(d / "tok", data_dir)
    return make_tiny_model_dir(d / "model", tok, seed=0), data_dir


@pytest.mark.parametrize("grpo", [
    {"rollout_correction": "token_truncate"},
    # Prefix-RFT rollouts (demonstration tokens first, never sampled) with dynamic sampling
    # (rounds of different completion widths re-padded), at sequence level.
    {"rollout_correction": "sequence_mask", "prefix_rft_ratio": 0.25, "dynamic_sampling": True},
], ids=["token_truncate", "sequence_mask_prefix_rft"])
def test_a_run_lines_up_the_decode_loops_logprobs_with_the_trainers(tmp_path, tiny, grpo):
    """The decode loop (KV cache, one token at a time) and the train step (whole rows)
    compute the same fp32 policy: every sampled token's log-probs agree to float error, so
    the ratios are 1 (a token shifted by one position would be off by whole nats)."""
    from jaxpt.trainers.grpo import train_grpo

    model_dir, data_dir = tiny
    section = {"num_generations": 4, "max_completion_length": 8, "max_prompt_length": 128,
               "reward_funcs": ["grpo_rewards:digit_fraction"], "temperature": 1.0,
               "eval_prompts": 8, "eval_batch_size": 8, **grpo}
    path = tiny_run_config(
        tmp_path / "grpo.yaml", model_dir, data_dir, tmp_path / "run", algorithm="grpo",
        grpo=section, train={"max_steps": 1, "batch_size": 8, "seed": 0,
                             "logprob_impl": "chunked", "eval_every": 0},
        optim={"lr": 1e-2, "schedule": "constant", "warmup_steps": 0},
        checkpoint={"every": 0})
    cfg = load_config(path)
    train_grpo(cfg)
    steps = [r for r in read_metrics(cfg.out_dir) if "loss" in r]
    assert len(steps) == 1
    for r in steps:
        assert np.isfinite(r["loss"])
        assert 0 <= r["sampling/sampling_logp_difference/mean"] < 1e-4, r
        assert r["sampling/sampling_logp_difference/max"] < 1e-3, r
        for k in ("min", "mean", "max"):
            assert r[f"sampling/importance_sampling_ratio/{k}"] == pytest.approx(1.0, abs=2e-3)
        assert r["sampling/importance_sampling_ratio/capped_frac"] == 0.0


def test_cap_must_be_positive(tmp_path):
    from jaxpt.algorithms.grpo import GRPOSection

    with pytest.raises(ValueError, match="rollout_correction_cap"):
        GRPOSection(rollout_correction="token_truncate", rollout_correction_cap=0.0)
    with pytest.raises(ValueError, match="rollout_correction_cap"):
        GRPOSection(rollout_correction_cap=float("inf"))
