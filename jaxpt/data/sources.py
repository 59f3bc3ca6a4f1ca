"""Read rows from JSONL / JSON / Parquet files and Hugging Face ``datasets``.

Every row becomes a :class:`~jaxpt.data.formats.Record` that remembers its source (file path
or dataset name) and 1-based row number (the line number for JSONL), so every later error
names where the bad row is.

``read_records(spec)`` dispatches on ``spec``:

* ``*.jsonl``, ``*.jsonl.gz``, ``*.json`` (JSON lines, or one JSON array), ``*.json.gz``;
* ``*.parquet`` (pyarrow);
* a directory written by ``datasets.Dataset.save_to_disk`` (``datasets.load_from_disk``;
  a ``DatasetDict`` needs ``split``);
* any other directory or a hub name: ``datasets.load_dataset(spec, split=split or "train")``.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable
from typing import Any

from jaxpt.data.formats import DataError, DataStats, Record


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _object_row(value: Any, source: str, row: int) -> dict:
    if not isinstance(value, dict):
        raise DataError(
            f"expected a JSON object, got {type(value).__name__}", source=source, row=row
        )
    return value


def read_jsonl(
    path: str, *, skip_invalid: bool = False, stats: DataStats | None = None
) -> list[Record]:
    """Read a JSON-lines file (optionally gzipped). Row numbers are line numbers; blank lines
    are ignored. Invalid JSON raises DataError (file + row) or is skipped and counted."""
    source = str(path)
    records: list[Record] = []
    with _open_text(source) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if stats is not None:
                stats.rows_read += 1
            try:
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"invalid JSON: {e}", source=source, row=line_no) from None
                records.append(Record(_object_row(value, source, line_no), source, line_no))
            except DataError:
                if not skip_invalid:
                    raise
                if stats is not None:
                    stats.invalid_skipped += 1
    return records


def _records_from_rows(
    rows: Iterable[Any], source: str, *, skip_invalid: bool, stats: DataStats | None
) -> list[Record]:
    records = []
    for i, value in enumerate(rows, start=1):
        if stats is not None:
            stats.rows_read += 1
        try:
            records.append(Record(_object_row(value, source, i), source, i))
        except DataError:
            if not skip_invalid:
                raise
            if stats is not None:
                stats.invalid_skipped += 1
    return records


def read_json(
    path: str, *, skip_invalid: bool = False, stats: DataStats | None = None
) -> list[Record]:
    """A ``.json`` file holding one JSON array of rows, or JSON lines."""
    with _open_text(path) as f:
        head = f.read(4096).lstrip()
    if not head.startswith("["):
        return read_jsonl(path, skip_invalid=skip_invalid, stats=stats)
    with _open_text(path) as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e}", source=str(path)) from None
    return _records_from_rows(rows, str(path), skip_invalid=skip_invalid, stats=stats)


def read_parquet(
    path: str, *, skip_invalid: bool = False, stats: DataStats | None = None
) -> list[Record]:
    """A Parquet file (pyarrow); row numbers count from 1 in file order."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return _records_from_rows(table.to_pylist(), str(path), skip_invalid=skip_invalid, stats=stats)


def read_hf_dataset(
    name_or_path: str,
    *,
    split: str | None = None,
    skip_invalid: bool = False,
    stats: DataStats | None = None,
    **load_kwargs: Any,
) -> list[Record]:
    """A Hugging Face dataset: a ``save_to_disk`` directory, or anything
    ``datasets.load_dataset`` takes (hub name, data directory) with ``split``."""
    import datasets

    is_saved = os.path.isdir(name_or_path) and any(
        os.path.exists(os.path.join(name_or_path, f))
        for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )
    if is_saved:
        ds = datasets.load_from_disk(name_or_path)
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                raise DataError(
                    f"dataset has splits {sorted(ds)}; pass split=...", source=name_or_path
                )
            if split not in ds:
                raise DataError(f"no split {split!r}; has {sorted(ds)}", source=name_or_path)
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name_or_path, split=split or "train", **load_kwargs)
    source = f"{name_or_path}[{split}]" if split else str(name_or_path)
    return _records_from_rows(iter(ds), source, skip_invalid=skip_invalid, stats=stats)


def read_records(
    spec: str | os.PathLike,
    *,
    split: str | None = None,
    skip_invalid: bool = False,
    stats: DataStats | None = None,
) -> list[Record]:
    """Read every row of ``spec`` (file, saved dataset directory or hub name) as records."""
    path = os.fspath(spec)
    lower = path.lower()
    if os.path.isfile(path):
        if lower.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            return read_jsonl(path, skip_invalid=skip_invalid, stats=stats)
        if lower.endswith((".json", ".json.gz")):
            return read_json(path, skip_invalid=skip_invalid, stats=stats)
        if lower.endswith(".parquet"):
            return read_parquet(path, skip_invalid=skip_invalid, stats=stats)
        raise DataError(
            "unknown file type; expected .jsonl, .jsonl.gz, .json or .parquet", source=path
        )
    return read_hf_dataset(path, split=split, skip_invalid=skip_invalid, stats=stats)
