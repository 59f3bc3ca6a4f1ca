"""Group-relative advantages (GRPO, Dr. GRPO, RLOO) and DAPO dynamic sampling (host, numpy).

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
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "SCALE_REWARDS",
    "ESTIMATORS",
    "compute_advantages",
    "groups_with_signal",
    "DynamicSampler",
    "dynamic_sample",
]

SCALE_REWARDS = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo")


def _grouped(rewards_G, num_generations: int, name: str = "rewards_G") -> np.ndarray:
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
    r_PN = _grouped(rewards_G, num_generations)
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


def groups_with_signal(rewards_G, num_generations: int, atol: float = 1e-6) -> np.ndarray:
    """Bool ``[P]``: True for groups whose scorable rewards are not all equal (within ``atol``).

    DAPO's dynamic sampling drops the other groups (all correct or all wrong): their
    advantages are zero, so they only dilute the batch. A group with fewer than two
    scorable (non-NaN) rewards has no signal.
    """
    r_PN = _grouped(rewards_G, num_generations)
    valid_PN = ~np.isnan(r_PN)
    hi = np.where(valid_PN, r_PN, -np.inf).max(axis=1)
    lo = np.where(valid_PN, r_PN, np.inf).min(axis=1)
    return (valid_PN.sum(axis=1) >= 2) & (hi - lo > atol)


def _take_group(value: Any, j: int, n: int, key: str):
    if isinstance(value, (list, tuple)):
        return list(value[j * n : (j + 1) * n])
    arr = np.asarray(value)
    if arr.ndim == 0:
        raise ValueError(f"rollout field '{key}' must have a leading completion axis.")
    return arr[j * n : (j + 1) * n]


def _concat(parts: list, key: str):
    if all(isinstance(p, list) for p in parts):
        return [x for p in parts for x in p]
    try:
        return np.concatenate([np.asarray(p) for p in parts], axis=0)
    except ValueError as e:
        raise ValueError(
            f"rollout field '{key}' has different trailing shapes across sampling rounds "
            f"({sorted({np.asarray(p).shape[1:] for p in parts})}); pad every round to the "
            "same shape."
        ) from e


class DynamicSampler:
    """DAPO dynamic sampling: keep groups with reward signal until the batch is full.

    Feed it one sampling round at a time with :meth:`add`, while ``not sampler.done``.
    ``done`` becomes True when ``num_groups`` signal groups are kept or after
    ``max_rounds`` rounds, so a caller loop always terminates (at most ``max_rounds``
    generation calls). :meth:`result` always returns exactly ``num_groups`` groups
    (``num_groups * num_generations`` completions), so the train step keeps its shape.

    Policy when the cap is hit before the batch is full (``fill``):

    * ``"repeat"`` (default): re-use the kept signal groups cyclically (duplicates count
      twice in the loss); if no group had signal, fall back to ``"zero_advantage"``.
    * ``"zero_advantage"``: fill with the most recent groups that were dropped for having no
      signal. Their advantage is zero (all rewards agree), so they add no policy gradient;
      they still count in token normalizers and in the KL term. ``info["completion_is_padding"]``
      marks them so the caller can also zero their advantages (exactly) or their mask.

    If even that is not enough (rounds returned fewer groups than ``num_groups``), everything
    seen is cycled. Extra signal groups beyond ``num_groups`` are dropped (first kept first).
    Rollout fields (``data``) are arrays or lists with a leading axis of
    ``groups_in_round * num_generations``; each prompt's generations are contiguous.
    """

    FILLS = ("repeat", "zero_advantage")

    def __init__(
        self,
        num_groups: int,
        num_generations: int,
        max_rounds: int,
        fill: str = "repeat",
        atol: float = 1e-6,
    ):
        if num_groups < 1 or num_generations < 1 or max_rounds < 1:
            raise ValueError(
                f"DynamicSampler needs num_groups ({num_groups}), num_generations "
                f"({num_generations}) and max_rounds ({max_rounds}) >= 1."
            )
        if fill not in self.FILLS:
            raise ValueError(f"DynamicSampler fill={fill!r}; choose one of {self.FILLS}.")
        self.num_groups, self.num_generations = num_groups, num_generations
        self.max_rounds, self.fill, self.atol = max_rounds, fill, atol
        self.rounds = 0
        self.num_signal_groups_seen = 0
        self._kept: list[tuple[np.ndarray, dict]] = []
        self._dropped: list[tuple[np.ndarray, dict]] = []  # most recent last, bounded

    @property
    def num_kept(self) -> int:
        return len(self._kept)

    @property
    def full(self) -> bool:
        return len(self._kept) >= self.num_groups

    @property
    def done(self) -> bool:
        return self.full or self.rounds >= self.max_rounds

    def add(self, rewards_G, data: dict[str, Any] | None = None) -> np.ndarray:
        """Add one round of rollouts; returns its ``groups_with_signal`` mask."""
        if self.done:
            raise RuntimeError(
                f"DynamicSampler is done (kept {len(self._kept)}/{self.num_groups} groups after "
                f"{self.rounds}/{self.max_rounds} rounds); call result()."
            )
        n = self.num_generations
        r_PN = _grouped(rewards_G, n)
        data = dict(data or {})
        for key, value in data.items():
            length = len(value)
            if length != r_PN.size:
                raise ValueError(
                    f"rollout field '{key}' has {length} entries for {r_PN.size} rewards."
                )
        signal_P = groups_with_signal(r_PN.reshape(-1), n, self.atol)
        self.rounds += 1
        self.num_signal_groups_seen += int(signal_P.sum())
        for j, has_signal in enumerate(signal_P):
            group = (r_PN[j].copy(), {k: _take_group(v, j, n, k) for k, v in data.items()})
            if has_signal:
                if len(self._kept) < self.num_groups:
                    self._kept.append(group)
            else:
                self._dropped.append(group)
                if len(self._dropped) > self.num_groups:
                    self._dropped.pop(0)
        return signal_P

    def result(self) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
        """``(rewards_G, data, info)`` for exactly ``num_groups`` groups (see class docstring).

        ``info``: ``rounds``, ``num_signal_groups`` (seen in all rounds), ``num_padded_groups``,
        ``group_is_padding`` (bool ``[P]``), ``completion_is_padding`` (bool ``[G]``).
        """
        if self.rounds == 0:
            raise RuntimeError("DynamicSampler.result() before any round was added.")
        groups = list(self._kept[: self.num_groups])
        padding = [False] * len(groups)
        missing = self.num_groups - len(groups)
        if missing:
            if self.fill == "repeat" and self._kept:
                pool = self._kept
            else:
                pool = list(reversed(self._dropped))  # most recent first
                if len(pool) < missing:
                    pool = pool + self._kept
            for i in range(missing):
                groups.append(pool[i % len(pool)])
                padding.append(True)
        rewards_G = np.concatenate([g[0] for g in groups]).astype(np.float32)
        keys = groups[0][1].keys()
        data = {k: _concat([g[1][k] for g in groups], k) for k in keys}
        group_is_padding = np.asarray(padding, bool)
        info = {
            "rounds": self.rounds,
            "num_signal_groups": self.num_signal_groups_seen,
            "num_padded_groups": int(group_is_padding.sum()),
            "group_is_padding": group_is_padding,
            "completion_is_padding": np.repeat(group_is_padding, self.num_generations),
        }
        return rewards_G, data, info


def dynamic_sample(
    generate_round: Callable[[int], tuple[Any, dict[str, Any]]], sampler: DynamicSampler
) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """Run ``generate_round(round_index) -> (rewards_G, data)`` until ``sampler.done``.

    Makes at most ``sampler.max_rounds`` calls, then returns ``sampler.result()``.
    """
    while not sampler.done:
        rewards_G, data = generate_round(sampler.rounds)
        sampler.add(rewards_G, data)
    return sampler.result()
