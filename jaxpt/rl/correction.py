"""Rollout-vs-trainer mismatch correction: importance weights between the log-probs the decode
loop sampled with and the trainer's log-probs of the same tokens.

Axis legend: R rollout rows, C completion length.

The decode loop (KV cache, one token at a time) and the train step (whole sequences, maybe
another attention kernel, another precision, another mesh) compute the same policy's
log-probs in different ways; in bf16, or with a rollout engine that lags the trainer, the
tokens were sampled from a slightly different distribution than the one the loss assumes.
Truncated importance sampling corrects for it (TRL's ``vllm_importance_sampling_*``
options of GRPOTrainer, TRL 0.2x-1.x; verl's ``rollout_is``). With ``d = old - sampling``
per completion token (``old``: the trainer's log-probs of the rollout, scored before the
first update; prefix tokens of Prefix-RFT, never sampled, count as ``d = 0``):

- ``token_truncate``: ``w_t = min(exp(d_t), cap)``
- ``token_mask``: ``w_t = exp(d_t)``, or 0 where ``exp(d_t) > cap``
- ``sequence_truncate``: ``w = min(exp(sum_t d_t), cap)`` for every token of the row
- ``sequence_mask``: ``w = exp(sum_t d_t)``, or 0 (the whole row) where it exceeds ``cap``

The policy term of each token's loss is multiplied by ``w`` (before the KL term is added,
as TRL does; ``jaxpt.losses.grpo.grpo_loss``'s ``sampling_weights_BT``). Metrics, TRL's
names: ``sampling/sampling_logp_difference/mean`` and ``/max`` (of ``|d|`` over the sampled
completion tokens), ``sampling/importance_sampling_ratio/min``, ``/mean``, ``/max`` (of
``w`` after truncation or masking: over those tokens, or over rows at sequence level); and
jaxpt's ``sampling/importance_sampling_ratio/capped_frac``, the fraction whose ratio
exceeded ``cap`` (truncated or masked).
"""

from __future__ import annotations

import numpy as np

MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def correction_weights(old_RC, sampling_RC, mask_RC, *, mode: str, cap: float):
    """(weights [R, C] float32, metrics) for ``mode`` (module doc). ``sampling_RC`` may hold
    NaN where a token was not sampled (a demonstration prefix): its difference is 0."""
    if mode not in MODES[1:]:
        raise ValueError(f"rollout correction mode {mode!r}: use one of {MODES[1:]}")
    old, sampled = np.asarray(old_RC, np.float64), np.asarray(sampling_RC, np.float64)
    mask = np.asarray(mask_RC) > 0
    was_sampled = mask & np.isfinite(sampled)
    d_RC = np.where(was_sampled, old - np.nan_to_num(sampled), 0.0)
    sequence = mode.startswith("sequence")
    ratio = np.exp(d_RC.sum(axis=1, keepdims=True) if sequence else d_RC)
    capped = ratio > cap
    w = np.minimum(ratio, cap) if mode.endswith("truncate") else np.where(capped, 0.0, ratio)
    over = np.ones(len(w), bool)[:, None] if sequence else was_sampled
    absd = np.abs(d_RC[was_sampled])
    w_over, capped_over = w[over], capped[over]
    metrics = {
        "sampling/sampling_logp_difference/mean": float(absd.mean()) if absd.size else 0.0,
        "sampling/sampling_logp_difference/max": float(absd.max()) if absd.size else 0.0,
        "sampling/importance_sampling_ratio/min": float(w_over.min()) if w_over.size else 1.0,
        "sampling/importance_sampling_ratio/mean": float(w_over.mean()) if w_over.size else 1.0,
        "sampling/importance_sampling_ratio/max": float(w_over.max()) if w_over.size else 1.0,
        "sampling/importance_sampling_ratio/capped_frac":
            float(capped_over.mean()) if capped_over.size else 0.0,
    }
    return np.broadcast_to(w, d_RC.shape).astype(np.float32), metrics
