"""Supervised fine-tuning loss: token-level negative log-likelihood.

Axis legend:
  B  batch (sequences in this micro-batch)
  T  sequence positions (already shifted: position t holds log p(target_t | tokens < t))

The loss never sees logits, text or a model: the caller gathers the per-token log-prob of
each target token (fp32 log-softmax) and passes a loss mask that is 1 on target tokens
(completion / assistant tokens) and 0 on prompt and padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["sft_loss"]


def _check_shape(name: str, x: jax.Array, shape: tuple[int, ...]) -> None:
    if x.shape != shape:
        raise ValueError(
            f"sft_loss: `{name}` has shape {x.shape}, expected {shape} "
            "(the shape of `logprobs_BT`, i.e. [batch B, positions T])"
        )


def sft_loss(
    logprobs_BT: jax.Array,
    loss_mask_BT: jax.Array,
    *,
    num_target_tokens: jax.Array | int | None = None,
    correct_BT: jax.Array | None = None,
    entropy_BT: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Token-level NLL summed over target tokens and divided by a token count.

    .. math::

        \mathcal{L} = \frac{\sum_{b,t} m_{bt}\,(-\log p_{bt})}{\max(N, 1)}

    where ``m = loss_mask_BT`` and ``N = num_target_tokens``.

    Reduction: sum over every masked (b, t) token of this batch, divided by ``N``.
    ``N`` should be the number of target tokens in the GLOBAL batch (all micro-batches of
    one optimizer step, all data-parallel shards): then the micro-batch losses (and their
    gradients) simply add up to the full-batch token-mean loss, so gradient accumulation
    equals one large batch exactly. When ``N`` is None it defaults to this batch's mask sum,
    i.e. the token mean of this batch. ``N`` is clipped to at least 1, so an all-masked
    batch gives loss 0 instead of nan.

    Positions with mask 0 are excluded with ``where`` (not multiplied), so a ``-inf``
    log-prob on a padding position cannot turn the loss into nan.

    Args:
      logprobs_BT: log p(target) per position, any float dtype (computed in fp32).
      loss_mask_BT: 1/True on target tokens, 0/False elsewhere; bool, int or float.
      num_target_tokens: global target-token count (python int or scalar array), or None.
      correct_BT: optional bool, ``target == argmax(logits)`` per position.
      entropy_BT: optional per-position entropy of the predictive distribution.

    Returns:
      ``(loss, metrics)``. Metrics (TRL names), all scalars:
        ``loss``: the value returned;
        ``num_tokens``: mask sum of this batch (float32);
        ``mean_token_accuracy``: mean of ``correct_BT`` over masked tokens (only when given);
        ``entropy``: mean of ``entropy_BT`` over masked tokens (only when given).
      The two means are over this batch's masked tokens (0 when there are none); to combine
      micro-batches weight them by ``num_tokens``.
    """
    if logprobs_BT.ndim != 2:
        raise ValueError(
            "sft_loss: `logprobs_BT` must be 2-D [batch B, positions T], "
            f"got shape {logprobs_BT.shape}"
        )
    shape = logprobs_BT.shape
    _check_shape("loss_mask_BT", loss_mask_BT, shape)
    mask_BT = loss_mask_BT.astype(bool) if loss_mask_BT.dtype != jnp.bool_ else loss_mask_BT
    logprobs_BT = logprobs_BT.astype(jnp.float32)

    nll_sum = jnp.sum(jnp.where(mask_BT, -logprobs_BT, 0.0))
    num_tokens = jnp.sum(mask_BT, dtype=jnp.float32)
    if num_target_tokens is None:
        denom = jnp.maximum(num_tokens, 1.0)
    else:
        denom = jnp.maximum(jnp.asarray(num_target_tokens, jnp.float32), 1.0)
    loss = nll_sum / denom

    metrics: dict[str, jax.Array] = {"loss": loss, "num_tokens": num_tokens}
    safe_count = jnp.maximum(num_tokens, 1.0)
    if correct_BT is not None:
        _check_shape("correct_BT", correct_BT, shape)
        correct = jnp.sum(jnp.where(mask_BT, correct_BT.astype(jnp.float32), 0.0))
        metrics["mean_token_accuracy"] = jax.lax.stop_gradient(correct / safe_count)
    if entropy_BT is not None:
        _check_shape("entropy_BT", entropy_BT, shape)
        ent = jnp.sum(jnp.where(mask_BT, entropy_BT.astype(jnp.float32), 0.0))
        metrics["entropy"] = jax.lax.stop_gradient(ent / safe_count)
    return loss, metrics
