"""Preference pairs -> typed rows: the two layouts a run can train on, which one it takes,
and the pairs of its train / held-out splits.

Axis legend: B pairs, T tokens per row, C trained tokens per side (shared layout).

* :class:`PairRows` (flat): pair b as two right-padded rows of ``max_length``, prompt +
  chosen and prompt + rejected (``packing.collate_preference``: the SFT row contract per
  side, prefixed ``chosen_`` / ``rejected_``).
* :class:`SharedPairRows`: pair b as ONE row [common prefix | rest of chosen | rest of
  rejected] (``packing.collate_preference_shared``): the prompt, and any tokens both sides
  start with, goes through the decoder once; each side's trained tokens are read from the
  hidden states that predict them. Same log-probs as the two flat rows. T and C are
  bucketed from the longest pair of the run, so one compiled program serves every batch.

:func:`choose_layout` decides once per run, from every pair the run will see (train and
held-out). The loader batches with the layout's ``collate`` (dicts, with each pair's
``example_index``); ``layout.rows.from_dict`` makes the typed rows of a batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxpt.data.packing import (
    BATCH_KEYS,
    SHARED_PAIR_KEYS,
    bucket_length,
    collate_preference,
    collate_preference_shared,
    shared_pair_shape,
)
from jaxpt.data.pipeline import Loader, preference_loader, prepare_preference
from jaxpt.data.sources import read_with_holdout
from jaxpt.data.tokenize import TokenizedPreference

SIDES = ("chosen", "rejected")
SHARE_PROMPT = ("auto", "always", "never")  # dpo.share_prompt


class _Rows:
    @classmethod
    def ndims(cls):
        """Every field's ndim (all rows are [B, ·]), for ``batch_shardings``."""
        return cls(**{f.name: 2 for f in dataclasses.fields(cls)})

    def num_tokens(self) -> int:
        """Non-padding tokens of this process's rows (a batch's ``Trainer.tokens_fn``):
        nonzero segment ids in the device arrays' addressable shards, one replica of each,
        so that the loop's sum over processes counts every row once."""
        return sum(
            int(np.count_nonzero(shard.data))
            for f in dataclasses.fields(self)
            if f.name.endswith("segment_ids")
            for shard in getattr(self, f.name).addressable_shards
            if shard.replica_id == 0
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairRows(_Rows):
    """Flat layout: each side's padded rows [B, T], the SFT row contract (``packing.py``)."""

    chosen_input_ids: Any
    chosen_targets: Any
    chosen_loss_mask: Any
    chosen_positions: Any
    chosen_segment_ids: Any
    rejected_input_ids: Any
    rejected_targets: Any
    rejected_loss_mask: Any
    rejected_positions: Any
    rejected_segment_ids: Any

    @classmethod
    def from_dict(cls, d) -> PairRows:
        return cls(**{f"{s}_{k}": d[f"{s}_{k}"] for s in SIDES for k in BATCH_KEYS})

    def side(self, side: str) -> dict[str, Any]:
        """One side's rows as the SFT row dict (``input_ids``, ``targets`` ...)."""
        return {k: getattr(self, f"{side}_{k}") for k in BATCH_KEYS}

    def trained(self):
        """(chosen, rejected) masks of the trained tokens [B, T]."""
        return self.chosen_loss_mask > 0, self.rejected_loss_mask > 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedPairRows(_Rows):
    """Shared-prompt layout: one row per pair [B, T] and, per side, the row index whose
    hidden state predicts each trained token, the token, and whether the column holds one
    [B, C]."""

    input_ids: Any
    positions: Any
    segment_ids: Any  # prefix 1, chosen 2, rejected 3, padding 0
    prefix: Any  # 1 where both continuations see the token
    chosen_source: Any
    chosen_targets: Any
    chosen_valid: Any
    rejected_source: Any
    rejected_targets: Any
    rejected_valid: Any

    @classmethod
    def from_dict(cls, d) -> SharedPairRows:
        return cls(**{k.removeprefix("shared_"): d[k] for k in SHARED_PAIR_KEYS})

    def trained(self):
        """(chosen, rejected) masks of the trained-token columns [B, C]."""
        return self.chosen_valid > 0, self.rejected_valid > 0


@dataclasses.dataclass(frozen=True)
class PairLayout:
    """How a run's pairs become rows: ``shared`` (one row of ``length`` tokens and ``width``
    trained-token columns per side) or flat (two rows of ``length``)."""

    shared: bool
    length: int
    width: int = 0
    pad_id: int = 0

    @property
    def rows(self) -> type[PairRows] | type[SharedPairRows]:
        return SharedPairRows if self.shared else PairRows

    def collate(self, pairs: Sequence[TokenizedPreference]) -> dict[str, np.ndarray]:
        if self.shared:
            return collate_preference_shared(pairs, self.length, self.width, pad_id=self.pad_id)
        return collate_preference(pairs, self.length, pad_id=self.pad_id)

    def loader(self, pairs: Sequence[TokenizedPreference], **kw) -> Loader:
        """``preference_loader`` of ``pairs`` in this layout (``kw``: its options)."""
        return preference_loader(
            pairs, max_length=self.length, collate=self.collate, pad_id=self.pad_id, **kw
        )


def choose_layout(
    share_prompt: str,
    pairs: Sequence[TokenizedPreference],
    *,
    max_length: int,
    pad_id: int,
    forward_flops: Callable[[int, int], int],
) -> PairLayout:
    """The layout ``share_prompt`` (one of ``SHARE_PROMPT``) picks for ``pairs``: ``auto``
    shares when one row of the bucketed longest shared length costs fewer
    ``forward_flops(rows, length)`` (the model's decoder) than two rows of ``max_length``."""
    if share_prompt != "never":
        shapes = np.asarray([shared_pair_shape(p) for p in pairs])
        length = bucket_length(int(shapes[:, 0].max()))
        width = bucket_length(int(shapes[:, 1].max()))
        if share_prompt == "always" or forward_flops(1, length) < forward_flops(2, max_length):
            return PairLayout(True, length, width, pad_id)
    return PairLayout(False, max_length, pad_id=pad_id)


def read_pairs(read: Callable[..., list], tokenizer, data, *, holdout: int, source: str):
    """(train pairs, train stats, held-out pairs | None), validated and tokenized, from
    ``read(which, stats=...)`` (the records of ``data.train`` / ``data.eval``) and the
    ``data`` config; ``holdout`` > 0 holds out the last rows of ``data.train`` instead of
    ``data.eval``. ``source`` (the config file) prefixes every error."""

    def prepare(records, stats, what):
        pairs, stats = prepare_preference(
            records,
            tokenizer,
            max_length=data.max_length,
            truncation=data.truncation,
            skip_invalid=data.skip_invalid,
            stats=stats,
        )
        if not pairs:
            raise ValueError(f"{source}: {what} has no usable preference pairs ({stats})")
        return pairs, stats

    return read_with_holdout(read, prepare, data, holdout=holdout, source=source, section="dpo")
