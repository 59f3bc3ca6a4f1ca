"""Group-relative advantages (GRPO, Dr. GRPO, RLOO) (host, numpy).

Axis legend: ``G`` completions in the batch (prompts x generations, each prompt's
generations contiguous), ``P`` prompt groups, ``N`` = ``num_generations`` per group.

Advantages (``r`` rewards of one group, NaN = unscorable):

* ``estimator="grpo"``: ``a_i = r_i - mean(r)``;
* ``estimator="rloo"``: ``a_i = r_i - mean_{j != i}(r_j)`` (leave-one-out baseline,
  ``= N / (N - 1) * (r_i - mean(r))``);

then scaled by ``scale_rewards``:

* ``"group"``: ``a / (std(r) + 1e-4)`` with the group's sample std (ddof=1), as TRL;
* ``"batch"``: ``a / (std(all rewards) + 1e-4)`` (PPO-Lite);
* ``"none"``: unscaled (Dr. GRPO; use this for plain RLOO).

NaN rewards are left out of means and stds; their advantage is 0. Metrics (TRL names):
``reward`` (mean), ``reward_std`` (sample std), ``frac_reward_zero_std`` (fraction of
completions whose group std — the batch std for ``"batch"`` — is ~0; a group with fewer
than two scorable rewards counts as zero-std).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["SCALE_REWARDS", "ESTIMATORS", "compute_advantages", "group_rewards"]

SCALE_REWARDS = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo")


def group_rewards(rewards_G, num_generations: int, name: str = "rewards_G") -> np.ndarray:
    """Rewards [G] as [P, N] (one row per prompt group), float64; raises on a ragged group."""
    r = np.asarray(rewards_G, np.float64)
    if r.ndim != 1:
        raise ValueError(f"{name} must be 1-D [G]; got shape {r.shape}.")
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1; got {num_generations}.")
    if r.shape[0] % num_generations:
        raise ValueError(
            f"{name} has {r.shape[0]} completions, not divisible by num_generations="
            f"{num_generations}; each prompt needs exactly num_generations completions."
        )
    return r.reshape(-1, num_generations)


def _nanstd_rows(x_PN: np.ndarray) -> np.ndarray:
    """Row-wise sample std (ddof=1) ignoring NaN; 0 for rows with fewer than two values."""
    count_P = np.sum(~np.isnan(x_PN), axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_P = np.nanmean(x_PN, axis=1, keepdims=True)
        ss_P = np.nansum((x_PN - mean_P) ** 2, axis=1)
    std_P = np.sqrt(ss_P / np.maximum(count_P - 1, 1))
    return np.where(count_P >= 2, std_P, 0.0)


def compute_advantages(
    rewards_G,
    num_generations: int,
    scale_rewards: str = "group",
    estimator: str = "grpo",
    eps: float = 1e-4,
) -> tuple[np.ndarray, dict[str, float]]:
    """Per-completion advantages ``[G]`` (float32) and reward metrics (module docstring)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}; choose one of {SCALE_REWARDS}.")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}; choose one of {ESTIMATORS}.")
    r_PN = group_rewards(rewards_G, num_generations)
    valid_PN = ~np.isnan(r_PN)
    n_P1 = valid_PN.sum(axis=1, keepdims=True)
    sum_P1 = np.nansum(r_PN, axis=1, keepdims=True)

    if estimator == "grpo":
        baseline_PN = np.broadcast_to(sum_P1 / np.maximum(n_P1, 1), r_PN.shape)
    else:
        if num_generations < 2:
            raise ValueError("estimator='rloo' needs num_generations >= 2.")
        # mean of the other scorable rewards of the group; no others -> no signal
        others_PN = np.where(n_P1 >= 2, (sum_P1 - r_PN) / np.maximum(n_P1 - 1, 1), r_PN)
        baseline_PN = others_PN
    adv_PN = r_PN - baseline_PN

    group_std_P = _nanstd_rows(r_PN)
    batch_std = float(_nanstd_rows(r_PN.reshape(1, -1))[0])
    if scale_rewards == "group":
        adv_PN = adv_PN / (group_std_P[:, None] + eps)
    elif scale_rewards == "batch":
        adv_PN = adv_PN / (batch_std + eps)
    adv_G = np.nan_to_num(adv_PN.reshape(-1), nan=0.0).astype(np.float32)

    if scale_rewards == "batch":
        zero_std_frac = float(np.isclose(batch_std, 0.0))
    else:
        zero_std_frac = float(np.mean(np.isclose(group_std_P, 0.0)))
    flat = r_PN.reshape(-1)
    valid = flat[~np.isnan(flat)]
    metrics = {
        "reward": float(valid.mean()) if valid.size else math.nan,
        "reward_std": float(valid.std(ddof=1)) if valid.size >= 2 else math.nan,
        "frac_reward_zero_std": zero_std_frac,
    }
    return adv_G, metrics
