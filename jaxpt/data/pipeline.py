"""Validated, tokenized examples -> grain loaders of batch dicts with checkpointable state.

Flow for every task (all validation and tokenization happen before training starts, so a bad
row 7,000 fails at startup naming file and row)::

    records = read_records(path, split=..., skip_invalid=..., stats=stats)   # sources.py
    examples, stats = prepare_sft(records, tokenizer, max_length=..., stats=stats)
    loader = sft_loader(examples, batch_size=..., max_length=..., seed=...)
    it = iter(loader); batch = next(it); state = it.get_state(); it.set_state(state)

Loaders are ``grain.MapDataset`` pipelines: items -> seeded shuffle (reshuffled every
epoch) -> global batches of ``batch_size * shard_count`` items (drop remainder) -> this
shard's rows of each global batch, collated -> repeat. Packed SFT packs the whole dataset
once with best-fit decreasing (the packed rows are the items that get shuffled), as TRL
packs once per dataset.

Sharding: ``shard_index``/``shard_count`` default to ``jax.process_index()`` /
``jax.process_count()``; ``batch_size`` is the per-process batch size. Every shard shuffles
the same items with the same seed and takes rows ``[k * batch_size, (k + 1) * batch_size)``
of each global batch, so the global batches (and the training run) are the same for any
number of processes, and the iterator state is the same on every shard (one saved copy
restores them all). Each shard collates only its own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grain
import numpy as np

from jaxpt.data.formats import DataError, DataStats, Record, validate_records
from jaxpt.data.packing import (
    PromptTruncation,
    Truncation,
    _empty_batch,
    _fill_row,
    best_fit_decreasing,
    collate_padded,
    collate_preference,
    collate_prompts,
    truncate_example,
    truncate_preference,
    truncate_prompt,
)
from jaxpt.data.tokenize import (
    TokenizedExample,
    TokenizedPreference,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)


@dataclass
class PromptExample:
    """A generation prompt: ``prompt_ids`` int32 [P] and the row's columns (incl. ``prompt``)."""

    prompt_ids: np.ndarray
    columns: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"  # file the row came from and its 1-based row number, so
    row: int = 0  # reward errors can name the prompt's row


def _new_stats(records: Sequence[Record], stats: DataStats | None) -> DataStats:
    if stats is None:
        stats = DataStats(rows_read=len(records))
    return stats


def _tokenize_all(records, task, fn, skip_invalid, stats, *, with_record=False):
    valid, _ = validate_records(records, task, skip_invalid=skip_invalid, stats=stats)
    out = []
    for rec in valid:
        try:
            out.append(fn(rec) if with_record else fn(rec.data))
        except DataError as e:
            if not skip_invalid:
                raise e.at(rec.source, rec.row) from None
            stats.skip("could not be tokenized")
    return out


def _prepare(records, task, fn, truncate, count, skip_invalid, stats, *, with_record=False):
    """Validate and tokenize every record (`fn`), truncate each result (`truncate(item,
    stats)`, None: dropped) and count the kept ones' (tokens, target tokens) into `stats`."""
    stats = _new_stats(records, stats)
    out = []
    for item in _tokenize_all(records, task, fn, skip_invalid, stats, with_record=with_record):
        item = truncate(item, stats)
        if item is not None:
            out.append(item)
            tokens, targets = count(item)
            stats.tokens += tokens
            stats.target_tokens += targets
    stats.examples = len(out)
    return out, stats


def prepare_sft(
    records: Sequence[Record],
    tokenizer: Any,
    *,
    max_length: int,
    truncation: Truncation = "keep_start",
    completion_only: bool = True,
    assistant_only: bool = True,
    skip_invalid: bool = False,
    stats: DataStats | None = None,
    chat_template_kwargs: dict | None = None,
) -> tuple[list[TokenizedExample], DataStats]:
    """Validate, tokenize (:func:`~jaxpt.data.tokenize.tokenize_sft`) and truncate every row."""
    fn = lambda row: tokenize_sft(
        tokenizer,
        row,
        completion_only=completion_only,
        assistant_only=assistant_only,
        chat_template_kwargs=chat_template_kwargs,
        max_length=max_length,
    )
    truncate = lambda ex, st: truncate_example(ex, max_length, truncation, st)
    count = lambda ex: (len(ex), ex.num_targets)
    return _prepare(records, "sft", fn, truncate, count, skip_invalid, stats)


def prepare_preference(
    records: Sequence[Record],
    tokenizer: Any,
    *,
    max_length: int,
    truncation: Truncation = "keep_start",
    skip_invalid: bool = False,
    stats: DataStats | None = None,
    chat_template_kwargs: dict | None = None,
) -> tuple[list[TokenizedPreference], DataStats]:
    """Validate, tokenize (:func:`~jaxpt.data.tokenize.tokenize_preference`) and truncate pairs.

    ``stats.tokens`` counts both sequences of a pair (prompt counted twice)."""
    fn = lambda row: tokenize_preference(
        tokenizer, row, chat_template_kwargs=chat_template_kwargs, max_length=max_length
    )
    truncate = lambda pair, st: truncate_preference(pair, max_length, truncation, st)

    def count(pair):
        n_c, n_r = len(pair.chosen_ids), len(pair.rejected_ids)
        return 2 * len(pair.prompt_ids) + n_c + n_r, n_c + n_r

    return _prepare(records, "preference", fn, truncate, count, skip_invalid, stats)


def prepare_prompts(
    records: Sequence[Record],
    tokenizer: Any,
    *,
    max_prompt_length: int,
    truncation: PromptTruncation = "drop",
    skip_invalid: bool = False,
    stats: DataStats | None = None,
    chat_template_kwargs: dict | None = None,
) -> tuple[list[PromptExample], DataStats]:
    """Validate and tokenize GRPO / eval prompts; every other column is kept for rewards."""
    fn = lambda rec: PromptExample(
        tokenize_prompt(
            tokenizer,
            rec.data,
            chat_template_kwargs=chat_template_kwargs,
            max_length=max_prompt_length,
        ),
        dict(rec.data),
        rec.source,
        rec.row,
    )

    def truncate(ex, st):
        ids = truncate_prompt(ex.prompt_ids, max_prompt_length, truncation, st)
        return None if ids is None else PromptExample(ids, ex.columns, ex.source, ex.row)

    count = lambda ex: (len(ex.prompt_ids), 0)
    return _prepare(
        records, "prompt", fn, truncate, count, skip_invalid, stats, with_record=True
    )


# ----------------------------------------------------------------------------- loaders


class BatchIterator:
    """Iterator over batch dicts whose position can be saved and restored.

    ``get_state()`` returns a JSON-serializable dict; ``set_state(state)`` on an iterator of
    an identically built loader resumes exactly where the state was taken (it checks that
    the seed, shard and sizes match and raises ValueError naming the field otherwise).
    """

    def __init__(self, dataset: grain.MapDataset, meta: dict[str, Any], read_options):
        self._meta = meta
        self._it = iter(dataset.to_iter_dataset(read_options))

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._it.get_state(), **self._meta}

    def set_state(self, state: dict[str, Any]) -> None:
        for k, v in self._meta.items():
            if state.get(k) != v:
                raise ValueError(
                    f"data iterator state has {k}={state.get(k)!r} but this loader has {k}={v!r}"
                )
        self._it.set_state(state["grain"])


@dataclass
class Loader:
    """A batched, sharded, shuffled, repeated grain dataset; ``iter(loader)`` -> BatchIterator.

    batches_per_epoch: (global) batches per epoch; stats: the data statistics.
    """

    dataset: grain.MapDataset
    batches_per_epoch: int
    stats: DataStats
    meta: dict[str, Any]
    num_threads: int = 2

    def __iter__(self) -> BatchIterator:
        opts = grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=4)
        return BatchIterator(self.dataset, self.meta, opts)


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """Default to this JAX process's index and the process count."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    return shard_index, shard_count


def _make_loader(
    kind: str,
    items: Sequence[Any],
    batch_fn: Callable[[Sequence[Any]], dict[str, Any]],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    shard_index: int | None,
    shard_count: int | None,
    stats: DataStats,
    num_threads: int,
) -> Loader:
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    global_batch = batch_size * shard_count
    if len(items) < global_batch:
        raise ValueError(
            f"{kind}: {len(items)} rows are fewer than one global batch of {global_batch} "
            f"(batch_size={batch_size} per shard x {shard_count} shard(s))"
        )
    lo = shard_index * batch_size

    def shard_batch(rows):
        return batch_fn(rows[lo : lo + batch_size])

    ds = grain.MapDataset.source(list(items))
    if shuffle:
        ds = ds.shuffle(seed)
    ds = ds.batch(global_batch, drop_remainder=True, batch_fn=shard_batch)
    ds = ds.repeat(num_epochs)
    # The position is global: the same state restores every shard (shard_index is left out).
    meta = {
        "kind": kind,
        "seed": seed,
        "shuffle": shuffle,
        "shard_count": shard_count,
        "num_items": len(items),
        "batch_size": batch_size,
    }
    return Loader(ds, len(items) // global_batch, stats, meta, num_threads)


def sft_loader(
    examples: Sequence[TokenizedExample],
    *,
    batch_size: int,
    max_length: int,
    packing: bool = True,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    pad_id: int = 0,
    stats: DataStats | None = None,
    num_threads: int = 2,
) -> Loader:
    """SFT batches (packing.py contract) of ``batch_size`` rows x ``max_length`` tokens.

    ``packing=True`` packs all examples once (best-fit decreasing) and shuffles the packed
    rows; ``packing=False`` puts one example per row. ``num_epochs=None`` repeats forever.
    """
    stats = stats if stats is not None else DataStats(examples=len(examples))
    if packing:
        bins = best_fit_decreasing([len(e) for e in examples], max_length)
        items: list[Any] = [tuple(examples[i] for i in b) for b in bins]

        def batch_fn(rows):
            batch = _empty_batch(len(rows), max_length, pad_id)
            for r, row in enumerate(rows):
                _fill_row(batch, r, row)
            return batch

    else:
        items = list(examples)
        batch_fn = lambda rows: collate_padded(rows, max_length, pad_id=pad_id)
    stats.rows = len(items)
    return _make_loader(
        "sft_packed" if packing else "sft_padded",
        items,
        batch_fn,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
        stats=stats,
        num_threads=num_threads,
    )


INDEX_KEY = "example_index"


def preference_loader(
    pairs: Sequence[TokenizedPreference],
    *,
    batch_size: int,
    max_length: int,
    collate: Callable[[list[TokenizedPreference]], dict[str, np.ndarray]] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    pad_id: int = 0,
    stats: DataStats | None = None,
    num_threads: int = 2,
) -> Loader:
    """Preference batches (``chosen_*`` / ``rejected_*``, one pair per row) plus
    ``example_index`` int32 [B]: each pair's position in ``pairs`` (stable across epochs,
    shuffles and resumes), the key of precomputed reference log-probs. ``collate`` replaces
    ``collate_preference`` (e.g. the shared-prompt layout)."""
    stats = stats if stats is not None else DataStats(examples=len(pairs))
    stats.rows = len(pairs)
    collate = collate or (lambda ps: collate_preference(ps, max_length, pad_id=pad_id))

    def batch_fn(rows):
        batch = collate([p for _, p in rows])
        batch[INDEX_KEY] = np.asarray([i for i, _ in rows], np.int32)
        return batch

    return _make_loader(
        "preference",
        list(enumerate(pairs)),
        batch_fn,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
        stats=stats,
        num_threads=num_threads,
    )


def prompt_batch(
    prompts: Sequence[PromptExample],
    *,
    pad_id: int = 0,
    bucket: int | Literal["eighths", "pow2"] = "eighths",
    min_length: int = 16,
    max_prompt_length: int | None = None,
) -> dict[str, Any]:
    """``collate_prompts`` of the prompts plus ``"columns"``: {column name: list of B values}
    (missing values are None) and ``"rows"`` (each prompt's 1-based row in its file). Pop
    both before sending the batch to a device."""
    batch: dict[str, Any] = collate_prompts(
        [p.prompt_ids for p in prompts],
        pad_id=pad_id,
        bucket=bucket,
        min_length=min_length,
        max_length=max_prompt_length,
    )
    names: list[str] = []
    for p in prompts:
        names.extend(k for k in p.columns if k not in names)
    batch["columns"] = {k: [p.columns.get(k) for p in prompts] for k in names}
    batch["rows"] = [p.row for p in prompts]
    return batch
