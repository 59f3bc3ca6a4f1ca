"""Truncation, best-fit-decreasing packing and the batch contracts the trainers consume.

Axis legend: B = rows in a batch, T = tokens per row (``max_length``), P = prompt tokens
(bucketed), L = tokens of one example.

SFT / LM batch (``collate_packed``, ``collate_padded``)::

    {"input_ids": int32[B,T], "targets": int32[B,T], "loss_mask": float32[B,T],
     "positions": int32[B,T], "segment_ids": int32[B,T]}

* ``segment_ids``: 1, 2, ... for the examples packed in a row, 0 for padding; attention
  must not cross segments.
* ``positions``: restart at 0 for every segment (0 on padding).
* ``targets[b,t] = input_ids[b,t+1]`` when t+1 is in the same segment, else 0;
  ``loss_mask[b,t] = 1`` iff that next token is a training target (the example's
  ``loss_mask`` at t+1). The last token of every segment and all padding have
  ``loss_mask = 0`` and ``targets = 0``.

Preference batch (``collate_preference``): the same five keys prefixed ``chosen_`` and
``rejected_``; row b holds prompt+chosen and prompt+rejected of pair b, right-padded to T.

Shared-prefix preference batch (``collate_preference_shared``): pair b as ONE row
[common prefix | rest of chosen | rest of rejected], the prefix (the prompt, and any
tokens the two sides start with alike) computed once::

    {"shared_input_ids", "shared_positions", "shared_segment_ids", "shared_prefix": [B,T],
     "<side>_source", "<side>_targets": int32[B,C], "<side>_valid": float32[B,C]}

* segments: prefix 1 (``shared_prefix`` = 1: seen by both continuations), chosen 2,
  rejected 3; positions continue from the prefix in both continuations, so every token
  has the position and the visible keys it has in its own padded row.
* ``<side>_source[b,j]``: the row index whose hidden state predicts ``<side>_targets[b,j]``,
  the j-th trained token of that side (``_valid`` = 1; 0 pads the C columns).

Prompt batch (``collate_prompts``): ``prompt_ids`` int32[B,P] *left*-padded so every prompt
ends at column P-1 (decoding starts at the same slot), ``prompt_mask`` bool[B,P]; P is
bucketed (:func:`bucket_length`) so new prompt lengths reuse a few compiled shapes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Literal

import numpy as np

from jaxpt.data.formats import DataStats
from jaxpt.data.tokenize import TokenizedExample, TokenizedPreference

Truncation = Literal["keep_start", "drop"]
PromptTruncation = Literal["keep_end", "drop"]
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")


def _check_truncation(truncation: str, allowed: tuple[str, ...]) -> None:
    if truncation not in allowed:
        raise ValueError(f"truncation={truncation!r}; expected one of {allowed}")


# ----------------------------------------------------------------------------- truncation


def truncate_example(
    example: TokenizedExample,
    max_length: int,
    truncation: Truncation = "keep_start",
    stats: DataStats | None = None,
) -> TokenizedExample | None:
    """Fit one example into ``max_length`` tokens, or return None (the example is dropped).

    ``keep_start`` keeps the first ``max_length`` tokens (None if no target survives);
    ``drop`` returns None for any example longer than ``max_length``. Counted in ``stats``.
    """
    _check_truncation(truncation, ("keep_start", "drop"))
    if len(example) <= max_length:
        return example
    if truncation == "drop":
        if stats is not None:
            stats.dropped_too_long += 1
        return None
    cut = TokenizedExample(example.input_ids[:max_length], example.loss_mask[:max_length])
    if cut.num_targets == 0:
        if stats is not None:
            stats.dropped_no_targets += 1
        return None
    if stats is not None:
        stats.truncated += 1
    return cut


def truncate_preference(
    pair: TokenizedPreference,
    max_length: int,
    truncation: Truncation = "keep_start",
    stats: DataStats | None = None,
) -> TokenizedPreference | None:
    """Fit prompt+chosen and prompt+rejected into ``max_length`` each, or return None.

    ``keep_start`` keeps the whole prompt and cuts the end of each completion; if the prompt
    alone leaves no room for a completion token the pair is dropped. ``drop`` removes any pair
    with a side longer than ``max_length``. Counted in ``stats``.
    """
    _check_truncation(truncation, ("keep_start", "drop"))
    p = len(pair.prompt_ids)
    if p + max(len(pair.chosen_ids), len(pair.rejected_ids)) <= max_length:
        return pair
    if truncation == "drop" or p >= max_length:
        if stats is not None:
            stats.dropped_too_long += 1
        return None
    room = max_length - p
    if stats is not None:
        stats.truncated += 1
    return TokenizedPreference(
        pair.prompt_ids, pair.chosen_ids[:room], pair.rejected_ids[:room], pair.margin
    )


def truncate_prompt(
    prompt_ids: np.ndarray,
    max_length: int,
    truncation: PromptTruncation = "drop",
    stats: DataStats | None = None,
) -> np.ndarray | None:
    """Fit a generation prompt into ``max_length``: ``drop`` (None) or ``keep_end`` (keep the
    last ``max_length`` tokens so the generation prompt survives; the start is lost)."""
    _check_truncation(truncation, ("keep_end", "drop"))
    if len(prompt_ids) <= max_length:
        return prompt_ids
    if truncation == "drop":
        if stats is not None:
            stats.dropped_too_long += 1
        return None
    if stats is not None:
        stats.truncated += 1
    return prompt_ids[len(prompt_ids) - max_length :]


# ----------------------------------------------------------------------------- packing


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items (by index) into bins of ``capacity`` with best-fit decreasing.

    Items are placed longest first (ties by index) into the open bin with the least room
    that still fits, else a new bin. Deterministic. Raises ValueError for an item longer than
    ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining room, bin index)
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > capacity {capacity}; truncate first")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, b = free.pop(j)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def _empty_batch(num_rows: int, max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.full((num_rows, max_length), pad_id, np.int32),
        "targets": np.zeros((num_rows, max_length), np.int32),
        "loss_mask": np.zeros((num_rows, max_length), np.float32),
        "positions": np.zeros((num_rows, max_length), np.int32),
        "segment_ids": np.zeros((num_rows, max_length), np.int32),
    }


def _fill_row(batch: dict[str, np.ndarray], r: int, examples: Sequence[TokenizedExample]) -> None:
    max_length = batch["input_ids"].shape[1]
    off = 0
    for seg, ex in enumerate(examples, start=1):
        n = len(ex)
        if off + n > max_length:
            raise ValueError(
                f"row {r}: examples of total length {off + n} exceed max_length {max_length}"
            )
        batch["input_ids"][r, off : off + n] = ex.input_ids
        batch["targets"][r, off : off + n - 1] = ex.input_ids[1:]
        batch["loss_mask"][r, off : off + n - 1] = ex.loss_mask[1:]
        batch["positions"][r, off : off + n] = np.arange(n, dtype=np.int32)
        batch["segment_ids"][r, off : off + n] = seg
        off += n


def collate_packed(
    examples: Sequence[TokenizedExample], max_length: int, num_rows: int, *, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Pack examples into ``num_rows`` rows of ``max_length`` (best-fit decreasing).

    Returns the SFT batch dict [num_rows, max_length] (module doc); rows beyond those needed
    are all padding. Raises ValueError when an example is longer than ``max_length`` or the
    examples need more than ``num_rows`` rows.
    """
    bins = best_fit_decreasing([len(e) for e in examples], max_length)
    if len(bins) > num_rows:
        raise ValueError(
            f"{len(examples)} examples need {len(bins)} rows of max_length {max_length}, "
            f"more than num_rows={num_rows}"
        )
    batch = _empty_batch(num_rows, max_length, pad_id)
    for r, b in enumerate(bins):
        _fill_row(batch, r, [examples[i] for i in b])
    return batch


def collate_padded(
    examples: Sequence[TokenizedExample], max_length: int, *, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """One example per row, right-padded to ``max_length``: the SFT batch dict [len, max_length]."""
    batch = _empty_batch(len(examples), max_length, pad_id)
    for r, ex in enumerate(examples):
        _fill_row(batch, r, [ex])
    return batch


def collate_preference(
    pairs: Sequence[TokenizedPreference], max_length: int, *, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Preference batch: ``chosen_<key>`` and ``rejected_<key>`` for the five SFT keys,
    one pair per row (prompt + completion, loss on the completion), right-padded."""
    out: dict[str, np.ndarray] = {}
    for side in ("chosen", "rejected"):
        batch = collate_padded([p.sequence(side) for p in pairs], max_length, pad_id=pad_id)
        out.update({f"{side}_{k}": v for k, v in batch.items()})
    return out


SHARED_PAIR_KEYS = (
    "shared_input_ids",
    "shared_positions",
    "shared_segment_ids",
    "shared_prefix",
    *(f"{side}_{k}" for side in ("chosen", "rejected") for k in ("source", "targets", "valid")),
)


def _shared_pair(pair: TokenizedPreference):
    """(row ids, positions, segment ids, prefix length, {side: (source, targets)}) of one
    pair in the shared-prefix layout (module doc)."""
    c, r = pair.sequence("chosen"), pair.sequence("rejected")
    n = min(len(c), len(r))
    differ = np.flatnonzero(c.input_ids[:n] != r.input_ids[:n])
    L = int(differ[0]) if differ.size else n  # longest common prefix
    ids = np.concatenate([c.input_ids, r.input_ids[L:]])
    positions = np.concatenate([np.arange(len(c)), np.arange(L, len(r))])
    segments = np.repeat([1, 2, 3], [L, len(c) - L, len(r) - L])
    # Flat index t of a side's own row -> its row index here; flat t predicts token t+1.
    t_c, t_r = np.arange(len(c)), np.arange(len(r))
    row_of = {"chosen": t_c, "rejected": np.where(t_r < L, t_r, len(c) + t_r - L)}
    sides = {}
    for side, ex in (("chosen", c), ("rejected", r)):
        t = np.flatnonzero(ex.loss_mask[1:])
        sides[side] = (row_of[side][t], ex.input_ids[t + 1])
    return ids, positions, segments, L, sides


def shared_pair_shape(pair: TokenizedPreference) -> tuple[int, int]:
    """(row length, trained tokens of the longer side) of a pair's shared-prefix row."""
    ids, _, _, _, sides = _shared_pair(pair)
    return len(ids), max(len(src) for src, _ in sides.values())


def collate_preference_shared(
    pairs: Sequence[TokenizedPreference], length: int, width: int, *, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Shared-prefix preference batch (module doc): rows of ``length`` tokens, ``width``
    trained-token columns per side. Log-probs read through ``<side>_source`` equal those
    of ``collate_preference``'s two padded rows (same positions, same visible keys)."""
    B = len(pairs)
    out = {
        "shared_input_ids": np.full((B, length), pad_id, np.int32),
        **{k: np.zeros((B, length), np.int32) for k in SHARED_PAIR_KEYS[1:4]},
    }
    for side in ("chosen", "rejected"):
        out[f"{side}_source"] = np.zeros((B, width), np.int32)
        out[f"{side}_targets"] = np.zeros((B, width), np.int32)
        out[f"{side}_valid"] = np.zeros((B, width), np.float32)
    for b, pair in enumerate(pairs):
        ids, positions, segments, L, sides = _shared_pair(pair)
        if len(ids) > length:
            raise ValueError(f"pair {b}: shared row of {len(ids)} tokens > length {length}")
        n = len(ids)
        out["shared_input_ids"][b, :n] = ids
        out["shared_positions"][b, :n] = positions
        out["shared_segment_ids"][b, :n] = segments
        out["shared_prefix"][b, :L] = 1
        for side, (source, targets) in sides.items():
            k = len(source)
            if k > width:
                raise ValueError(f"pair {b}: {k} trained {side} tokens > width {width}")
            out[f"{side}_source"][b, :k] = source
            out[f"{side}_targets"][b, :k] = targets
            out[f"{side}_valid"][b, :k] = 1.0
    return out


def bucket_length(
    n: int,
    *,
    bucket: int | Literal["eighths", "pow2"] = "eighths",
    min_length: int = 16,
    max_length: int | None = None,
) -> int:
    """The padded length for a longest prompt of ``n`` tokens.

    ``bucket="eighths"`` (default): n rounded up to a multiple of max(min_length, p / 8), p
    the next power of two >= n: at most 4 buckets per doubling (16, 32, 48, 64, 80, 96, 112,
    128, 160, 192, ...), at most 25% padding past 128 tokens, a few compiled programs for
    any mix of lengths. ``"pow2"``: next power of two >= max(n, min_length) (up to 100%
    padding). An int: next multiple of it. Capped at ``max_length`` (which is then a bucket
    itself); n > max_length is an error.
    """
    if max_length is not None and n > max_length:
        raise ValueError(f"prompt length {n} > max_length {max_length}; truncate first")
    pow2 = 1 << max(0, (max(n, min_length, 1) - 1).bit_length())
    if bucket == "eighths":
        step = max(min_length, pow2 // 8)
        b = max(-(-n // step) * step, min_length)
    elif bucket == "pow2":
        b = pow2
    elif isinstance(bucket, int) and bucket > 0:
        b = max(-(-n // bucket) * bucket, bucket)
    else:
        raise ValueError(f"bucket={bucket!r}; expected 'eighths', 'pow2' or a positive int")
    return min(b, max_length) if max_length is not None else b


def collate_prompts(
    prompts: Sequence[np.ndarray],
    *,
    pad_id: int = 0,
    bucket: int | Literal["eighths", "pow2"] = "eighths",
    min_length: int = 16,
    max_length: int | None = None,
) -> dict[str, np.ndarray]:
    """Left-pad prompts: ``prompt_ids`` int32[B,P], ``prompt_mask`` bool[B,P], P bucketed."""
    if not prompts:
        raise ValueError("collate_prompts needs at least one prompt")
    longest = max(len(p) for p in prompts)
    width = bucket_length(longest, bucket=bucket, min_length=min_length, max_length=max_length)
    ids_BP = np.full((len(prompts), width), pad_id, np.int32)
    mask_BP = np.zeros((len(prompts), width), bool)
    for b, p in enumerate(prompts):
        if len(p):
            ids_BP[b, width - len(p) :] = p
            mask_BP[b, width - len(p) :] = True
    return {"prompt_ids": ids_BP, "prompt_mask": mask_BP}
