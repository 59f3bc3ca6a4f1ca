"""Tests for jaxpt.losses.sft: hand-computed values, global-token normalization, metrics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_reordered_close

from jaxpt.losses.sft import sft_loss

# Two sequences, three positions. The last position of row 1 is padding with a -inf
# log-prob, which must not poison the loss because its mask is 0.
LOGPROBS_BT = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -4.0, -jnp.inf]], jnp.float32)
MASK_BT = jnp.array([[0, 1, 1], [1, 1, 0]], jnp.int32)
# masked NLL: 2 + 3 + 0.5 + 4 = 9.5 over 4 tokens
HAND_LOSS = 9.5 / 4.0


def test_hand_computed_token_mean():
    loss, metrics = sft_loss(LOGPROBS_BT, MASK_BT)
    assert float(loss) == pytest.approx(HAND_LOSS, rel=1e-6)
    assert float(metrics["loss"]) == pytest.approx(HAND_LOSS, rel=1e-6)
    assert float(metrics["num_tokens"]) == 4.0
    assert "mean_token_accuracy" not in metrics and "entropy" not in metrics


def test_bool_and_float_masks_agree():
    a, _ = sft_loss(LOGPROBS_BT, MASK_BT.astype(bool))
    b, _ = sft_loss(LOGPROBS_BT, MASK_BT.astype(jnp.float32))
    assert float(a) == pytest.approx(HAND_LOSS, rel=1e-6)
    assert float(b) == pytest.approx(HAND_LOSS, rel=1e-6)


def test_explicit_num_target_tokens_divides_the_sum():
    loss, metrics = sft_loss(LOGPROBS_BT, MASK_BT, num_target_tokens=10)
    assert float(loss) == pytest.approx(9.5 / 10.0, rel=1e-6)
    # num_tokens still reports this batch's mask sum
    assert float(metrics["num_tokens"]) == 4.0


def test_gradient_is_minus_mask_over_count_and_finite_on_padding():
    grad = jax.grad(lambda lp: sft_loss(lp, MASK_BT)[0])(LOGPROBS_BT)
    expected = -np.array([[0, 1, 1], [1, 1, 0]], np.float32) / 4.0
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6)


def test_all_masked_batch_gives_zero_not_nan():
    loss, metrics = sft_loss(LOGPROBS_BT, jnp.zeros_like(MASK_BT))
    assert float(loss) == 0.0
    assert float(metrics["num_tokens"]) == 0.0
    grad = jax.grad(lambda lp: sft_loss(lp, jnp.zeros_like(MASK_BT))[0])(LOGPROBS_BT)
    assert np.all(np.asarray(grad) == 0.0)


def test_micro_batches_with_global_count_sum_to_full_batch():
    rng = np.random.default_rng(0)
    logprobs = jnp.asarray(-rng.uniform(0.1, 5.0, size=(4, 5)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(4, 5)) < 0.6, jnp.int32)
    mask = mask.at[0, 0].set(1)  # at least one target token
    total_tokens = int(mask.sum())

    full, _ = sft_loss(logprobs, mask)
    full_grad = jax.grad(lambda lp: sft_loss(lp, mask)[0])(logprobs)
    # independent numpy reference for the full-batch token mean
    lp_np, m_np = np.asarray(logprobs), np.asarray(mask)
    assert float(full) == pytest.approx(float((-lp_np * m_np).sum() / m_np.sum()), rel=1e-6)

    acc = 0.0
    acc_grad = []
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):  # unequal micro-batches
        fn = lambda lp, m=mask[rows]: sft_loss(lp, m, num_target_tokens=total_tokens)[0]
        part, g = jax.value_and_grad(fn)(logprobs[rows])
        acc += float(part)
        acc_grad.append(np.asarray(g))
    assert acc == pytest.approx(float(full), rel=1e-6)
    assert_reordered_close(np.concatenate(acc_grad), full_grad, n=total_tokens)

    # the per-batch default would NOT sum to the full loss (different token counts)
    naive = sum(float(sft_loss(logprobs[r], mask[r])[0]) for r in (slice(0, 2), slice(2, 4)))
    assert naive != pytest.approx(float(full), rel=1e-3)


def test_accuracy_and_entropy_metrics_are_masked_means():
    correct = jnp.array([[True, True, False], [True, False, True]])
    entropy = jnp.array([[9.0, 1.0, 2.0], [3.0, 4.0, 100.0]])
    _, metrics = sft_loss(LOGPROBS_BT, MASK_BT, correct_BT=correct, entropy_BT=entropy)
    # masked positions: (0,1) (0,2) (1,0) (1,1) -> correct T F T F, entropy 1 2 3 4
    assert float(metrics["mean_token_accuracy"]) == pytest.approx(0.5)
    assert float(metrics["entropy"]) == pytest.approx(2.5)


def test_jit_matches_eager_with_traced_token_count():
    correct = jnp.array([[True, True, False], [True, False, True]])
    fn = lambda lp, m, n, c: sft_loss(lp, m, num_target_tokens=n, correct_BT=c)
    eager_loss, eager_metrics = fn(LOGPROBS_BT, MASK_BT, jnp.asarray(7), correct)
    jit_loss, jit_metrics = jax.jit(fn)(LOGPROBS_BT, MASK_BT, jnp.asarray(7), correct)
    assert float(jit_loss) == pytest.approx(9.5 / 7.0, rel=1e-6)
    assert float(jit_loss) == pytest.approx(float(eager_loss), rel=1e-6)
    assert set(jit_metrics) == set(eager_metrics)
    for k in eager_metrics:
        assert float(jit_metrics[k]) == pytest.approx(float(eager_metrics[k]), rel=1e-6)


def test_bf16_logprobs_are_reduced_in_fp32():
    lp = jnp.full((1, 4096), -1.001, jnp.bfloat16)
    loss, _ = sft_loss(lp, jnp.ones((1, 4096), jnp.int32))
    assert loss.dtype == jnp.float32
    # bf16 rounds -1.001 to -1.0; the fp32 mean of 4096 copies is exactly that value
    assert float(loss) == pytest.approx(float(jnp.asarray(-1.001, jnp.bfloat16)) * -1.0)
    assert math.isfinite(float(loss))


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="loss_mask_BT"):
        sft_loss(LOGPROBS_BT, MASK_BT[:, :2])
    with pytest.raises(ValueError, match="correct_BT"):
        sft_loss(LOGPROBS_BT, MASK_BT, correct_BT=jnp.ones((2, 2), bool))
    with pytest.raises(ValueError, match="entropy_BT"):
        sft_loss(LOGPROBS_BT, MASK_BT, entropy_BT=jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="2-D"):
        sft_loss(LOGPROBS_BT[0], MASK_BT[0])
