"""GRPO-family policy losses (GRPO, BNPO, Dr. GRPO, DAPO, CISPO; token or GSPO sequence ratios).

Small pure `jnp` functions of per-token log-probabilities and masks. They never see text or
models; the trainer gathers log-probs (with the log-prob kernel), rewards and advantages and
calls :func:`grpo_loss` inside its jitted step. Definitions, defaults and metric names follow
TRL 1.16's ``GRPOTrainer._compute_loss`` so runs can be compared with TRL's.

Axis legend
-----------
B  completions in the (micro-)batch (prompts x generations, flattened)
T  completion tokens (right-padded; padding is zero in every mask)

Shapes in names: ``logprobs_BT`` is ``[B, T]``, ``advantages_B`` is ``[B]``; advantages may
also be given per token as ``[B, T]``.

How the pieces fit
------------------
``r`` is the importance weight of the current policy against the policy that sampled the
completion ("old"); ``A`` the advantage; ``m`` the completion mask.

* token level (GRPO/DAPO): ``r_bt = exp(logp_bt - old_bt)``.
* sequence level (GSPO): ``r_b = exp(sum_t m_bt (logp_bt - old_bt) / max(sum_t m_bt, 1))``,
  the same value for every token of the sequence; the gradient flows through every token's
  ``logp`` inside the mean (``old`` is data, so it carries no gradient).
* clipped surrogate (grpo, bnpo, dr_grpo, dapo):
  ``l_bt = -min(r A, clip(r, 1 - eps, 1 + eps_high) A)``.
* cispo: ``l_bt = -stop_gradient(min(r, eps_max)) * A * logp_bt``. As in TRL (and the
  ScaleRL write-up of CISPO) ``eps_max`` caps the ratio itself, it is not ``1 + eps``;
  TRL's recommended value is 5.0.
* KL (``beta > 0``, k3 estimator against the reference policy):
  ``kl_bt = exp(ref_bt - logp_bt) - (ref_bt - logp_bt) - 1``, added as ``l_bt += beta kl_bt``
  before the reduction.

Reductions (``L`` = ``max_completion_length``, ``N`` = ``num_items_in_batch``):

* ``grpo``:    ``mean_b [ sum_t m_bt l_bt / max(sum_t m_bt, 1) ]``  (sequence mean, then batch mean)
* ``bnpo``:    ``sum_bt m_bt l_bt / max(sum_bt m_bt, 1)``          (tokens of this batch)
* ``dr_grpo``: ``sum_bt m_bt l_bt / (B * L)``                        (constant, length-free)
* ``dapo``, ``cispo``: ``sum_bt m_bt l_bt / max(N, 1)``; ``N`` defaults to this batch's
  token count ``sum_bt m_bt``.

Gradient accumulation: for ``grpo``/``bnpo``/``dr_grpo`` the loss of each micro-batch is a
mean, so the trainer *averages* the micro-batch losses (as TRL divides by the accumulation
steps). For ``dapo``/``cispo`` pass ``num_items_in_batch`` = the completion-token count of the
whole accumulated batch; each micro-batch loss is then a share of the full-batch loss and
the trainer *sums* them, which makes accumulated gradients equal full-batch gradients.
Under ``jax.jit`` with a sharded batch the function sees the global batch, so no
cross-device token count is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# Weight schedules of the SFT term of SFT+RL hybrids. `grpo.sft_schedule: adaptive` (SASR)
# is not a weight: it picks SFT or RL for each step (`jaxpt.rl.hybrids.SASRMixer`).
SFT_SCHEDULES = ("constant", "linear", "warmup_then_rl")


@dataclass(frozen=True)
class GRPOLossConfig:
    """Static configuration of :func:`grpo_loss` (hashable, so it can be a jit static arg).

    Attributes:
        loss_type: ``"grpo" | "bnpo" | "dr_grpo" | "dapo" | "cispo"`` (see module docstring).
        epsilon: lower clip ``eps``: the ratio is clipped below at ``1 - epsilon``.
        epsilon_high: upper clip (DAPO clip-higher; DAPO recommends 0.28). ``None`` means
            ``epsilon``. Not used by ``cispo`` (see ``cispo_epsilon_max``).
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
        beta: KL coefficient for the k3 estimator; 0 means no reference model is needed.
        max_completion_length: ``L``, the constant normalizer of ``dr_grpo`` (required there).
        cispo_epsilon_max: cap on the (stop-gradient) ratio of ``cispo``. TRL passes this value
            as ``epsilon_high`` when ``loss_type="cispo"``; jaxpt keeps a separate name so that
            ``epsilon_high`` has one meaning, and setting ``epsilon_high`` with ``cispo`` is an
            error rather than a silent reinterpretation.
    """

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    importance_sampling_level: str = "token"
    beta: float = 0.0
    max_completion_length: int | None = None
    cispo_epsilon_max: float = 5.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"GRPOLossConfig.loss_type={self.loss_type!r} is not supported; "
                f"choose one of {', '.join(LOSS_TYPES)}."
            )
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                "GRPOLossConfig.importance_sampling_level="
                f"{self.importance_sampling_level!r} is not supported; choose 'token' or "
                "'sequence' (GSPO)."
            )
        if not 0.0 <= self.epsilon < 1.0:
            raise ValueError(
                f"GRPOLossConfig.epsilon={self.epsilon} must be in [0, 1): the lower clip "
                "bound is 1 - epsilon."
            )
        if self.epsilon_high is not None and self.epsilon_high < 0.0:
            raise ValueError(f"GRPOLossConfig.epsilon_high={self.epsilon_high} must be >= 0.")
        if self.beta < 0.0:
            raise ValueError(f"GRPOLossConfig.beta={self.beta} must be >= 0.")
        if self.loss_type == "dr_grpo":
            if self.max_completion_length is None or self.max_completion_length <= 0:
                raise ValueError(
                    "GRPOLossConfig.loss_type='dr_grpo' normalizes by the constant "
                    "B * max_completion_length; set max_completion_length to a positive int "
                    f"(got {self.max_completion_length!r})."
                )
        if self.max_completion_length is not None and self.max_completion_length <= 0:
            raise ValueError(
                f"GRPOLossConfig.max_completion_length={self.max_completion_length} must be > 0."
            )
        if self.cispo_epsilon_max <= 0.0:
            raise ValueError(
                f"GRPOLossConfig.cispo_epsilon_max={self.cispo_epsilon_max} must be > 0."
            )
        if self.loss_type == "cispo" and self.epsilon_high is not None:
            raise ValueError(
                "GRPOLossConfig: loss_type='cispo' caps the ratio at cispo_epsilon_max "
                f"(TRL calls this value epsilon_high); got epsilon_high={self.epsilon_high}. "
                "Set cispo_epsilon_max instead and leave epsilon_high=None."
            )

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def effective_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


# ----------------------------------------------------------------------------- helpers


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def masked_mean(x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """``sum(x * m) / max(sum(m), 1)`` over all elements (a token mean; 0 if the mask is empty)."""
    mask_BT = _f32(mask_BT)
    return jnp.sum(_f32(x_BT) * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)


def mask_truncated(completion_mask_BT: jax.Array, is_truncated_B: jax.Array) -> jax.Array:
    """Zero the completion mask of truncated rows (TRL's ``mask_truncated_completions``).

    A row is truncated when it hit ``max_completion_length`` without an EOS token. Its
    tokens then count in no loss term and in no token normalizer (DAPO recommends this).
    Returns an array with the dtype of ``completion_mask_BT``.
    """
    keep_B1 = jnp.logical_not(jnp.asarray(is_truncated_B, bool))[:, None]
    return jnp.where(keep_B1, completion_mask_BT, jnp.zeros_like(completion_mask_BT))


def prefix_rft_masks(
    prefix_lengths_B: jax.Array, completion_mask_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Split a completion into a demonstration prefix (SFT) and a sampled continuation (RL).

    Prefix-RFT style: the first ``prefix_lengths_B[b]`` completion positions of row ``b`` hold
    a demonstration prefix and get the SFT loss; the positions after it were sampled by the
    policy and get the RL loss. Positions where ``completion_mask_BT`` is 0 are in neither.

    Returns ``(sft_mask_BT, rl_mask_BT)`` with the dtype of ``completion_mask_BT``; the two
    masks are disjoint and their sum is ``completion_mask_BT``.
    """
    T = completion_mask_BT.shape[1]
    pos_1T = jnp.arange(T)[None, :]
    in_prefix_BT = pos_1T < jnp.asarray(prefix_lengths_B)[:, None]
    zeros = jnp.zeros_like(completion_mask_BT)
    sft_mask_BT = jnp.where(in_prefix_BT, completion_mask_BT, zeros)
    rl_mask_BT = jnp.where(in_prefix_BT, zeros, completion_mask_BT)
    return sft_mask_BT, rl_mask_BT


def k3_kl(logprobs_BT: jax.Array, ref_logprobs_BT: jax.Array) -> jax.Array:
    """Per-token k3 estimator of KL(pi || pi_ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    d_BT = _f32(ref_logprobs_BT) - _f32(logprobs_BT)
    return jnp.exp(d_BT) - d_BT - 1.0


def importance_log_weights(
    logprobs_BT: jax.Array,
    old_logprobs_BT: jax.Array,
    completion_mask_BT: jax.Array,
    level: str,
) -> jax.Array:
    """Log importance weights: ``[B, T]`` per token, or ``[B, 1]`` per sequence (GSPO).

    token:    ``logp_bt - old_bt``
    sequence: ``sum_t m_bt (logp_bt - old_bt) / max(sum_t m_bt, 1)`` (length-normalized)
    """
    log_ratio_BT = _f32(logprobs_BT) - _f32(old_logprobs_BT)
    if level == "token":
        return log_ratio_BT
    if level == "sequence":
        mask_BT = _f32(completion_mask_BT)
        n_B = jnp.maximum(jnp.sum(mask_BT, axis=-1), 1.0)
        return (jnp.sum(log_ratio_BT * mask_BT, axis=-1) / n_B)[:, None]
    raise ValueError(
        f"importance sampling level {level!r} is not supported; choose 'token' or 'sequence'."
    )


def clipped_surrogate(
    ratio: jax.Array, advantages: jax.Array, epsilon_low: float, epsilon_high: float
) -> jax.Array:
    """PPO/GRPO per-token loss ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``."""
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    return -jnp.minimum(ratio * advantages, clipped * advantages)


def cispo_surrogate(
    ratio: jax.Array, advantages: jax.Array, logprobs_BT: jax.Array, epsilon_max: float
) -> jax.Array:
    """CISPO per-token loss ``-stop_gradient(min(r, eps_max)) * A * logp``.

    The ratio is a constant weight (no gradient through it), so every token keeps a
    REINFORCE-style gradient ``-w A grad(logp)``; no token is dropped by clipping.
    """
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, epsilon_max))
    return -weight * advantages * _f32(logprobs_BT)


def reduce_token_loss(
    per_token_loss_BT: jax.Array,
    completion_mask_BT: jax.Array,
    loss_type: str,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: jax.Array | float | None = None,
) -> jax.Array:
    """Reduce a ``[B, T]`` per-token loss to a scalar as ``loss_type`` says (module docstring)."""
    mask_BT = _f32(completion_mask_BT)
    masked_BT = _f32(per_token_loss_BT) * mask_BT
    if loss_type == "grpo":
        n_B = jnp.maximum(jnp.sum(mask_BT, axis=-1), 1.0)
        return jnp.mean(jnp.sum(masked_BT, axis=-1) / n_B)
    if loss_type == "bnpo":
        return jnp.sum(masked_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length.")
        return jnp.sum(masked_BT) / float(mask_BT.shape[0] * max_completion_length)
    if loss_type in ("dapo", "cispo"):
        n = jnp.sum(mask_BT) if num_items_in_batch is None else _f32(num_items_in_batch)
        return jnp.sum(masked_BT) / jnp.maximum(n, 1.0)
    raise ValueError(f"loss_type {loss_type!r} is not supported; choose one of {LOSS_TYPES}.")


def sft_nll(logprobs_BT: jax.Array, mask_BT: jax.Array, num_tokens: jax.Array | float,
            min_tokens: float = 1.0) -> jax.Array:
    """Negative log-likelihood of the masked tokens ``-sum(m logp) / max(num_tokens,
    min_tokens)``: ``num_tokens`` counts the whole (accumulated) batch, so the terms of its
    micro-batches add up to the batch's token mean (the SFT terms of SFT+RL hybrids: the
    demonstrations, Prefix-RFT's prefixes)."""
    return -jnp.sum(logprobs_BT * mask_BT) / jnp.maximum(num_tokens, min_tokens)


def _level_mean(x, mask_BT):
    """Masked token mean of a ``[B, T]`` array, or mean over non-empty rows of a ``[B, 1]`` one.

    A ``[B, 1]`` array holds one value per sequence (sequence-level ratios), so it is averaged
    over the sequences that have at least one completion token.
    """
    mask_BT = _f32(mask_BT)
    if x.shape[1] == 1 and mask_BT.shape[1] != 1:
        w_B = _f32(jnp.sum(mask_BT, axis=-1) > 0)
        return jnp.sum(_f32(x[:, 0]) * w_B) / jnp.maximum(jnp.sum(w_B), 1.0)
    return masked_mean(jnp.broadcast_to(x, mask_BT.shape), mask_BT)


def _clip_metrics(is_low, is_high, mask_BT):
    """Fractions of clipped tokens (token level) or sequences (sequence level), TRL names."""
    mask_BT = _f32(mask_BT)
    n_B = jnp.sum(mask_BT, axis=-1)
    has_tokens_B = n_B > 0
    is_region = jnp.logical_or(is_low, is_high)

    def per_seq(x):
        if x.shape[1] == 1:  # sequence level: already one value per sequence
            return _f32(x[:, 0])
        return jnp.sum(_f32(x) * mask_BT, -1) / jnp.maximum(n_B, 1.0)

    any_rows = jnp.any(has_tokens_B)
    low_min = jnp.min(jnp.where(has_tokens_B, per_seq(is_low), jnp.inf))
    high_max = jnp.max(jnp.where(has_tokens_B, per_seq(is_high), -jnp.inf))
    return {
        "clip_ratio/low_mean": _level_mean(is_low, mask_BT),
        "clip_ratio/high_mean": _level_mean(is_high, mask_BT),
        "clip_ratio/region_mean": _level_mean(is_region, mask_BT),
        "clip_ratio/low_min": jnp.where(any_rows, low_min, jnp.nan),
        "clip_ratio/high_max": jnp.where(any_rows, high_max, jnp.nan),
    }


# ----------------------------------------------------------------------------- the loss


def grpo_loss(
    cfg: GRPOLossConfig,
    logprobs_BT: jax.Array,
    old_logprobs_BT: jax.Array | None,
    advantages_B: jax.Array,
    completion_mask_BT: jax.Array,
    *,
    ref_logprobs_BT: jax.Array | None = None,
    num_items_in_batch: jax.Array | float | None = None,
    entropy_BT: jax.Array | None = None,
    rl_weight: jax.Array | float = 1.0,
    sampling_weights_BT: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO-family policy loss and its metrics.

    Args:
        cfg: static :class:`GRPOLossConfig`.
        logprobs_BT: log-probs of the sampled completion tokens under the current policy
            (differentiable).
        old_logprobs_BT: log-probs under the sampling policy. ``None`` means
            ``stop_gradient(logprobs_BT)``, the on-policy case (one update per generation
            batch, as TRL does when it skips computing them): every ratio is then exactly 1
            with the gradient of ``logp``.
        advantages_B: ``[B]`` (broadcast over tokens) or ``[B, T]`` advantages.
        completion_mask_BT: 1 for completion tokens that get the RL loss, 0 for padding
            (and for truncated rows, see :func:`mask_truncated`; and for demonstration
            prefixes, see :func:`prefix_rft_masks`).
        ref_logprobs_BT: reference-policy log-probs; required when ``cfg.beta > 0``.
        num_items_in_batch: completion tokens of the whole accumulated batch, used by
            ``dapo``/``cispo`` (default: this batch's token count).
        entropy_BT: optional per-token entropies (from the log-prob kernel); reported as
            the masked mean ``entropy``.
        rl_weight: multiplier of the RL term (float or traced scalar; 0 during an SFT
            warm-up, see :func:`rl_weight_schedule`). The SFT terms of hybrids are added by
            the caller (:func:`sft_nll`).
        sampling_weights_BT: optional rollout-vs-trainer importance weights (no gradient;
            ``jaxpt.rl.correction``) multiplying each token's policy term before the KL
            term is added (TRL's ``importance_sampling_ratio``).

    Returns:
        ``(loss, metrics)`` with ``loss = rl_weight * rl_loss``. Metrics (all scalar, fp32,
        TRL names): ``rl_loss``; ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_max`` for the
        clipped losses, ``cispo_clip_ratio`` for cispo; ``kl`` when ``beta > 0``;
        ``entropy`` when ``entropy_BT`` is given.

        Clip ratios (TRL's definitions): a token is low-clipped when ``r < 1 - eps`` and
        ``A < 0``, high-clipped when ``r > 1 + eps_high`` and ``A > 0`` (there the clipped
        branch is the minimum and its gradient is zero); ``region`` is either. The
        ``*_mean`` metrics are fractions of masked tokens (of sequences with at least one
        token, at sequence level); ``low_min``/``high_max`` are the min/max over sequences
        of the per-sequence fraction. ``cispo_clip_ratio`` is the fraction with
        ``r > eps_max`` and ``A > 0``.
    """
    if logprobs_BT.ndim != 2:
        raise ValueError(f"logprobs_BT must be [B, T]; got shape {logprobs_BT.shape}.")
    if completion_mask_BT.shape != logprobs_BT.shape:
        raise ValueError(
            f"completion_mask_BT shape {completion_mask_BT.shape} != logprobs_BT shape "
            f"{logprobs_BT.shape}."
        )
    if old_logprobs_BT is not None and old_logprobs_BT.shape != logprobs_BT.shape:
        raise ValueError(
            f"old_logprobs_BT shape {old_logprobs_BT.shape} != logprobs_BT shape "
            f"{logprobs_BT.shape}."
        )
    B = logprobs_BT.shape[0]
    advantages = _f32(advantages_B)
    if advantages.ndim == 1:
        if advantages.shape[0] != B:
            raise ValueError(f"advantages_B has {advantages.shape[0]} rows, logprobs_BT has {B}.")
        advantages = advantages[:, None]
    elif advantages.shape != logprobs_BT.shape:
        raise ValueError(
            f"advantages must be [B] or [B, T] = {logprobs_BT.shape}; got {advantages.shape}."
        )
    if cfg.beta > 0.0 and ref_logprobs_BT is None:
        raise ValueError(
            f"GRPOLossConfig.beta={cfg.beta} > 0 needs ref_logprobs_BT (reference-policy "
            "log-probs); pass them or set beta=0."
        )
    logprobs_BT = _f32(logprobs_BT)
    mask_BT = _f32(completion_mask_BT)
    if old_logprobs_BT is None:
        old_logprobs_BT = jax.lax.stop_gradient(logprobs_BT)

    log_w = importance_log_weights(
        logprobs_BT, old_logprobs_BT, mask_BT, cfg.importance_sampling_level
    )
    ratio = jnp.exp(log_w)  # [B, T] (token) or [B, 1] (sequence)

    metrics: dict[str, jax.Array] = {}
    if cfg.loss_type == "cispo":
        per_token_BT = cispo_surrogate(ratio, advantages, logprobs_BT, cfg.cispo_epsilon_max)
        is_clipped = jnp.logical_and(ratio > cfg.cispo_epsilon_max, advantages > 0)
        metrics["cispo_clip_ratio"] = _level_mean(is_clipped, mask_BT)
    else:
        eps_lo, eps_hi = cfg.epsilon_low, cfg.effective_epsilon_high
        per_token_BT = clipped_surrogate(ratio, advantages, eps_lo, eps_hi)
        per_token_BT = jnp.broadcast_to(per_token_BT, logprobs_BT.shape)
        # [B, 1] at sequence level with [B] advantages; else [B, T]
        is_low = jnp.logical_and(ratio < 1.0 - eps_lo, advantages < 0)
        is_high = jnp.logical_and(ratio > 1.0 + eps_hi, advantages > 0)
        metrics.update(_clip_metrics(is_low, is_high, mask_BT))

    if sampling_weights_BT is not None:
        per_token_BT = per_token_BT * jax.lax.stop_gradient(_f32(sampling_weights_BT))
    if cfg.beta > 0.0:
        kl_BT = k3_kl(logprobs_BT, ref_logprobs_BT)
        per_token_BT = per_token_BT + cfg.beta * kl_BT
        metrics["kl"] = masked_mean(kl_BT, mask_BT)

    rl_loss = reduce_token_loss(
        per_token_BT,
        mask_BT,
        cfg.loss_type,
        max_completion_length=cfg.max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )
    loss = _f32(rl_weight) * rl_loss
    metrics["rl_loss"] = rl_loss

    if entropy_BT is not None:
        metrics["entropy"] = masked_mean(entropy_BT, mask_BT)
    return loss, metrics


# ----------------------------------------------------------------------------- SFT+RL schedules


def sft_weight_schedule(
    step,
    kind: str = "constant",
    *,
    initial_weight: float = 1.0,
    final_weight: float = 0.0,
    decay_steps: int | None = None,
    warmup_steps: int = 0,
) -> jax.Array:
    """Weight of the SFT term at ``step`` (a traced or Python int); pure and jit-friendly.

    kinds (``w0`` = ``initial_weight``, ``w1`` = ``final_weight``):

    * ``constant``: ``w0``.
    * ``linear``: ``w0 + (w1 - w0) * clip(step / decay_steps, 0, 1)`` (linear decay, then flat).
    * ``warmup_then_rl`` (ReFT): ``w0`` while ``step < warmup_steps`` (pure SFT: the RL weight
      from :func:`rl_weight_schedule` is 0), then ``w1`` (default 0: pure RL).

    SASR (``grpo.sft_schedule: adaptive``) is no weight schedule: it chooses an SFT or an RL
    step at random each step, see :class:`jaxpt.rl.hybrids.SASRMixer`.
    """
    step = _f32(step)
    w0, w1 = _f32(initial_weight), _f32(final_weight)
    if kind == "constant":
        return w0
    if kind == "linear":
        if decay_steps is None or decay_steps <= 0:
            raise ValueError("sft_weight_schedule(kind='linear') needs decay_steps > 0.")
        frac = jnp.clip(step / float(decay_steps), 0.0, 1.0)
        return w0 + (w1 - w0) * frac
    if kind == "warmup_then_rl":
        return jnp.where(step < warmup_steps, w0, w1)
    raise ValueError(f"schedule kind {kind!r} is not supported; choose one of {SFT_SCHEDULES}.")


def rl_weight_schedule(step, kind: str = "constant", *, warmup_steps: int = 0) -> jax.Array:
    """The RL-term weight matching :func:`sft_weight_schedule` (pass it as ``rl_weight``):
    0 during the warm-up of ``warmup_then_rl`` and 1 after; 1 for the other kinds."""
    if kind not in SFT_SCHEDULES:
        raise ValueError(f"schedule kind {kind!r} is not supported; choose one of "
                         f"{SFT_SCHEDULES}.")
    if kind == "warmup_then_rl":
        return (jnp.asarray(step) >= warmup_steps).astype(jnp.float32)
    return jnp.float32(1.0)
