"""PPO with a critic: per-token rewards, GAE, whitening and the clipped policy / value losses.

Small pure ``jnp`` functions of per-token arrays and masks (no models, no text); the PPO
trainer (``jaxpt.trainers.ppo``) calls the reward / GAE ones on a whole rollout and the
losses inside its jitted step. Definitions follow TRL's ``PPOTrainer.train``
(``trl/experimental/ppo/ppo_trainer.py``: "4. compute rewards", "6. compute advantages and
returns" and the mini-batch loop) and its ``masked_whiten``; where jaxpt differs it says so.

Axis legend: R rollout rows, C completion tokens (right padded; every mask is 0 on
padding). ``mask_RC`` marks a row's real completion tokens ``t < L_r`` (L_r its length).

Where the score lands. jaxpt adds a row's score to the reward of its LAST completion token
(t = L - 1: the EOS token, or the last token of a truncated row), as verl's
``token_level_rewards`` and OpenRLHF do, and the critic is trained on the same tokens as the
policy. TRL adds it one position later (``actual_end = sequence_lengths + 1``, a padding
position when there is one) and trains the critic on one extra position
(``padding_mask_p1``); jaxpt has no step after the last token.

Terminal vs truncated rows in GAE. The value after a row's last token is ``next_value_R``:
0 for a row that ended (EOS: the episode is over). TRL treats every row as terminal,
truncated ones included (``nextvalues = 0`` at the sequence end), and so does jaxpt by
default; ``ppo.truncation: bootstrap`` instead passes the critic's value of the state after
the last token of a truncated row (the row could have gone on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k3")


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def masked_mean(x, mask):
    mask = _f32(mask)
    return jnp.sum(_f32(x) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_whiten(x, mask, *, shift_mean: bool = True):
    """TRL's ``masked_whiten``: ``(x - mean) / sqrt(var + 1e-8)`` over the masked entries,
    the variance unbiased (``n / (n - 1)``); ``shift_mean=False`` adds the mean back. Entries
    outside the mask are transformed too (callers zero them). A mask of one entry (no
    unbiased variance; TRL raises) whitens with the biased variance 0."""
    mask = _f32(mask)
    n = jnp.sum(mask)
    mean = masked_mean(x, mask)
    var = masked_mean((_f32(x) - mean) ** 2, mask) * jnp.where(n > 1, n / jnp.maximum(n - 1, 1), 1)
    out = (_f32(x) - mean) * jax.lax.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def kl_per_token(logprobs_RC, ref_logprobs_RC, estimator: str = "k1"):
    """Per-token KL(pi || ref) estimate of the sampled tokens (Schulman's k1 / k3, TRL's
    ``kl_estimator``): with ``logr = ref - logp``, k1 = ``-logr``, k3 = ``exp(logr) - 1 - logr``."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={estimator!r}: choose one of {KL_ESTIMATORS}")
    logr = _f32(ref_logprobs_RC) - _f32(logprobs_RC)
    return -logr if estimator == "k1" else jnp.expm1(logr) - logr


def token_rewards(scores_R, kl_RC, mask_RC, *, kl_coef: float):
    """(rewards_RC, non_score_reward_RC): ``-kl_coef * kl`` on every completion token, plus
    the row's score on its last one (module doc)."""
    mask = _f32(mask_RC)
    non_score = -kl_coef * _f32(kl_RC) * mask
    lengths_R = jnp.sum(mask, axis=1).astype(jnp.int32)
    last_RC = (jnp.arange(mask.shape[1])[None, :] == (lengths_R - 1)[:, None]) & (mask > 0)
    return non_score + jnp.where(last_RC, _f32(scores_R)[:, None], 0.0), non_score


def gae(rewards_RC, values_RC, mask_RC, *, gamma: float, lam: float, next_value_R=None):
    """Generalized advantage estimation over each row's tokens ``t < L``:
    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V_L = next_value_R`` (0: terminal; see
    the module doc), ``A_t = delta_t + gamma * lam * A_{t+1}``, returns ``A + V``. Returns
    (advantages_RC, returns_RC), 0 on padding."""
    mask = _f32(mask_RC)
    R, C = mask.shape
    values = _f32(values_RC) * mask
    rewards = _f32(rewards_RC) * mask
    boot_R = jnp.zeros((R,), jnp.float32) if next_value_R is None else _f32(next_value_R)
    lengths_R = jnp.sum(mask, axis=1).astype(jnp.int32)
    t_1C = jnp.arange(C)[None, :]
    shifted = jnp.concatenate([values[:, 1:], jnp.zeros((R, 1), jnp.float32)], axis=1)
    next_RC = jnp.where(t_1C == (lengths_R - 1)[:, None], boot_R[:, None], shifted)
    delta_RC = (rewards + gamma * next_RC - values) * mask

    def back(carry_R, x):
        d_R, m_R = x
        a_R = (d_R + gamma * lam * carry_R) * m_R
        return a_R, a_R

    _, adv_CR = jax.lax.scan(back, jnp.zeros((R,), jnp.float32), (delta_RC.T, mask.T),
                             reverse=True)
    adv_RC = adv_CR.T
    return adv_RC, (adv_RC + values) * mask


def policy_loss_terms(logprobs_RC, old_logprobs_RC, advantages_RC, *, cliprange: float):
    """TRL's clipped surrogate per token: ``max(-A r, -A clip(r, 1 - e, 1 + e))``,
    ``r = exp(logp - old)``. Returns (loss_RC, clipped_RC (the clipped term was larger),
    ratio_RC, logratio_RC)."""
    logratio = _f32(logprobs_RC) - _f32(old_logprobs_RC)
    ratio = jnp.exp(logratio)
    adv = _f32(advantages_RC)
    l1 = -adv * ratio
    l2 = -adv * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return jnp.maximum(l1, l2), l2 > l1, ratio, logratio


def value_loss_terms(values_RC, old_values_RC, returns_RC, *, cliprange_value: float):
    """TRL's clipped value loss per token (before its 0.5 and the mean):
    ``max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)``. Returns (loss_RC,
    clipped_RC)."""
    v, old, ret = _f32(values_RC), _f32(old_values_RC), _f32(returns_RC)
    v_clipped = jnp.clip(v, old - cliprange_value, old + cliprange_value)
    l1, l2 = (v - ret) ** 2, (v_clipped - ret) ** 2
    return jnp.maximum(l1, l2), l2 > l1
