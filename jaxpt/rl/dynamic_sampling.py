"""DAPO dynamic sampling: sampling rounds of fresh prompts until a rollout holds enough
groups whose rewards disagree (host, numpy).

Axis legend: ``G`` completions (prompts x generations, each prompt's generations
contiguous), ``P`` prompt groups, ``N`` = ``num_generations`` per group; R rollout rows.

A group whose rewards all agree (all correct or all wrong) has zero advantages and only
dilutes the batch. :class:`DynamicSampler` keeps the groups with signal, round by round, and
fills the batch when a round cap is hit; :func:`dynamic_rounds` drives it with a rollout
source's sampling rounds and assembles the kept rows into one rollout batch (rows
re-padded to the widest round, advantages recomputed over the kept groups).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxpt.rewards.advantages import group_rewards
from jaxpt.rl.layout import TokenRows


def groups_with_signal(rewards_G, num_generations: int, atol: float = 1e-6) -> np.ndarray:
    """Bool ``[P]``: True for groups whose scorable rewards are not all equal (within ``atol``).

    DAPO's dynamic sampling drops the other groups (all correct or all wrong): their
    advantages are zero, so they only dilute the batch. A group with fewer than two
    scorable (non-NaN) rewards has no signal.
    """
    r_PN = group_rewards(rewards_G, num_generations)
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
        r_PN = group_rewards(rewards_G, n)
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


def repad(batches: list, pad_id: int) -> list:
    """Rollout batches of several rounds with every :class:`TokenRows` field (the rollout
    rows, demonstration rows) re-padded to its widest prompt and completion over the
    rounds, so their rows stack; so are per-completion-token fields (a dataclass field
    with ``metadata={"per_token": True}``: [R, C] like ``rows``), right-padded with 0."""
    out = list(batches)
    C = max(b.rows.widths[1] for b in batches)

    def pad_right(v):
        v = np.asarray(v)
        return np.pad(v, ((0, 0), (0, C - v.shape[1])))

    for f in dataclasses.fields(batches[0]):
        if f.metadata.get("per_token") and getattr(batches[0], f.name) is not None:
            out = [dataclasses.replace(b, **{f.name: pad_right(getattr(b, f.name))})
                   for b in out]
            continue
        if not isinstance(getattr(batches[0], f.name), TokenRows):
            continue
        widths = [getattr(b, f.name).widths for b in batches]
        P, C = max(w[0] for w in widths), max(w[1] for w in widths)
        out = [dataclasses.replace(b, **{f.name: getattr(b, f.name).padded(P, C, pad_id)})
               for b in out]
    return out


def dynamic_rounds(
    sample_round: Callable[[], tuple[Any, np.ndarray, dict[str, float]]],
    sampler: DynamicSampler,
    *,
    advantages: Callable[[np.ndarray], tuple[np.ndarray, dict]],
    pad_id: int,
) -> tuple[Any, dict[str, float]]:
    """One rollout batch from ``sample_round() -> (flat rollout batch, rewards_R,
    metrics)`` rounds: the groups ``sampler`` keeps, in its order, with their advantages
    recomputed by ``advantages`` over the kept groups (``zero_advantage`` fill: 0 for the
    filler groups). The batch keeps its shape. Reward metrics are those of the first round
    (the policy as it is); ``time/rollout`` sums the rounds'."""
    rounds = []

    def one_round(r):
        batch, rewards_R, metrics = sample_round()
        rounds.append((batch, metrics))
        R = len(rewards_R)
        return rewards_R, {"round": np.full(R, r), "row": np.arange(R)}

    rewards_R, picked, info = dynamic_sample(one_round, sampler)
    padded = repad([b for b, _ in rounds], pad_id)
    pairs = list(zip(picked["round"], picked["row"], strict=True))
    batch = jax.tree.map(lambda *vs: np.stack([vs[r][i] for r, i in pairs]), *padded)
    advantages_R, _ = advantages(rewards_R)
    if sampler.fill == "zero_advantage":
        advantages_R = np.where(info["completion_is_padding"], 0.0, advantages_R)
    batch = dataclasses.replace(batch, advantages=np.asarray(advantages_R, np.float32))
    metrics = {
        **rounds[0][1],
        "dynamic_sampling/rounds": float(info["rounds"]),
        "dynamic_sampling/signal_groups": float(info["num_signal_groups"]),
        "dynamic_sampling/padded_groups": float(info["num_padded_groups"]),
        "time/rollout": float(sum(m["time/rollout"] for _, m in rounds)),
    }
    return batch, metrics
