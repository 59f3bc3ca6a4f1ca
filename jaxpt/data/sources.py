"""Read rows from JSONL / JSON / Parquet files and Hugging Face ``datasets``.

Every row becomes a :class:`~jaxpt.data.formats.Record` that remembers its source (file path
or dataset name) and 1-based row number (the line number for JSONL), so every later error
names where the bad row is.

``read_records(spec)`` dispatches on ``spec``:

* ``*.jsonl``, ``*.jsonl.gz``, ``*.json`` (JSON lines, or one JSON array), ``*.json.gz``
  (gzip is detected from the first bytes, whatever the name);
* ``*.parquet`` (pyarrow);
* a directory written by ``datasets.Dataset.save_to_disk`` (``datasets.load_from_disk``;
  a ``DatasetDict`` needs ``split``);
* any other directory or a hub name: ``datasets.load_dataset(spec, split=split or "train")``.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from jaxpt.data.formats import DataError, DataStats, Record

GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: str) -> bool:
    """Whether the file is gzip-compressed, from its first bytes (not its name: a gzip file
    named ``.jsonl`` and a plain one named ``.jsonl.gz`` both occur)."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _open_bytes(path: str):
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def _corrupt(source: str, line_no: int, offset: int, e: BaseException) -> DataError:
    return DataError(
        f"corrupt or truncated gzip data after line {line_no - 1} (uncompressed byte offset "
        f"{offset}): {type(e).__name__}: {e}",
        source=source,
        row=line_no,
    )


def _lines(source: str, stats: DataStats | None, skip_invalid: bool):
    """(line number, byte offset of the line in the uncompressed stream, raw bytes) of a
    text file, gzip detected from its content. Corrupt compression raises DataError naming
    the line and offset; with ``skip_invalid`` the rest of the file is skipped and counted
    (there is no way to resynchronize a deflate stream)."""
    offset, line_no = 0, 0
    with _open_bytes(source) as f:
        while True:
            try:
                raw = f.readline()
            except (EOFError, OSError, zlib.error) as e:
                err = _corrupt(source, line_no + 1, offset, e)
                if not skip_invalid:
                    raise err from None
                if stats is not None:
                    stats.skip("corrupt compression")
                return
            if not raw:
                return
            line_no += 1
            yield line_no, offset, raw
            offset += len(raw)


def _decode(raw: bytes, source: str, line_no: int, offset: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"not valid UTF-8: byte {raw[e.start:e.start + 1]!r} at byte offset "
            f"{offset + e.start} ({e.reason}); re-encode the file as UTF-8",
            source=source,
            row=line_no + raw[: e.start].count(b"\n"),
        ) from None
    return text.removeprefix("\ufeff") if line_no == 1 else text


def _object_row(value: Any, source: str, row: int) -> dict:
    if not isinstance(value, dict):
        raise DataError(
            f"expected a JSON object, got {type(value).__name__}", source=source, row=row
        )
    return value


def read_jsonl(
    path: str, *, skip_invalid: bool = False, stats: DataStats | None = None
) -> list[Record]:
    """Read a JSON-lines file (gzip detected from the content). Row numbers are line
    numbers; blank lines are ignored. Undecodable bytes, invalid JSON and corrupt
    compression raise DataError (file + row + byte offset) or are skipped and counted."""
    source = str(path)
    records: list[Record] = []
    for line_no, offset, raw in _lines(source, stats, skip_invalid):
        if not raw.strip():
            continue
        if stats is not None:
            stats.rows_read += 1
        reason = "not UTF-8"
        try:
            line = _decode(raw, source, line_no, offset)
            reason = "invalid JSON"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e}", source=source, row=line_no) from None
            reason = "not a JSON object"
            records.append(Record(_object_row(value, source, line_no), source, line_no))
        except DataError:
            if not skip_invalid:
                raise
            if stats is not None:
                stats.skip(reason)
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
                stats.skip("not a JSON object")
    return records


def read_json(
    path: str, *, skip_invalid: bool = False, stats: DataStats | None = None
) -> list[Record]:
    """A ``.json`` file holding one JSON array of rows, or JSON lines (gzip detected from
    the content). An array is one value: a decode error in it stops the read."""
    source = str(path)
    try:
        with _open_bytes(source) as f:
            head = f.read(4096).lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
    except (EOFError, OSError, zlib.error) as e:
        raise _corrupt(source, 1, 0, e) from None
    if not head.startswith(b"["):
        return read_jsonl(path, skip_invalid=skip_invalid, stats=stats)
    try:
        with _open_bytes(source) as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(
            f"corrupt or truncated gzip data: {type(e).__name__}: {e}", source=source
        ) from None
    text = _decode(data, source, 1, 0)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e}", source=source, row=e.lineno) from None
    return _records_from_rows(rows, source, skip_invalid=skip_invalid, stats=stats)


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


def read_with_holdout(
    read: Callable[..., list[Record]],
    prepare: Callable[[list[Record], DataStats, str], tuple[Any, DataStats]],
    data,
    *,
    holdout: int,
    source: str,
    section: str,
):
    """(train items, train stats, held-out items | None) of a run's data.

    ``read(which, stats=...)`` gives the records of ``data.train`` / ``data.eval``;
    ``prepare(records, stats, what)`` validates and tokenizes them (``what`` names the key in
    its errors). ``holdout`` > 0 holds out the last rows of ``data.train``
    (``<section>.eval_holdout``) instead of ``data.eval``. ``source`` (the config file)
    prefixes every error."""
    stats = DataStats()
    records = read("train", stats=stats)
    eval_records = None
    if holdout:
        if data.eval is not None:
            raise ValueError(f"{source}: set either data.eval or {section}.eval_holdout, not both")
        if holdout >= len(records):
            raise ValueError(
                f"{source}: {section}.eval_holdout={holdout} leaves no training rows "
                f"(data.train has {len(records)} rows after data.max_train_rows)"
            )
        records, eval_records = records[:-holdout], records[-holdout:]
    elif data.eval is not None:
        eval_records = read("eval")
    train, stats = prepare(records, stats, "data.train")
    held_out = None
    if eval_records is not None:
        what = f"{section}.eval_holdout" if holdout else "data.eval"
        held_out, _ = prepare(eval_records, DataStats(rows_read=len(eval_records)), what)
    return train, stats, held_out
