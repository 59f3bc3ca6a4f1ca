"""Row formats (TRL names), row validation, data errors and data statistics.

A *row* is one dict read from a dataset. jaxpt accepts the TRL dataset formats, so a dataset
that works with TRL works here:

* language_modeling: ``{"text": str}`` or ``{"messages": [msg, ...]}``.
* prompt_completion: ``{"prompt": str, "completion": str}`` or both message lists.
* preference: ``{"prompt", "chosen", "rejected"}`` (strings, or message lists); for
  conversations the prompt may be implicit: ``chosen``/``rejected`` are whole conversations
  sharing a prefix, which becomes the prompt.
* prompt_only: ``{"prompt": str or [msg, ...], **other columns}``.

A message is ``{"role": str, "content": str}`` (other keys are allowed and passed to the
chat template). Which kinds a task accepts:

* ``task="sft"``: language_modeling, prompt_completion.
* ``task="preference"``: preference (explicit or implicit prompt).
* ``task="prompt"`` (GRPO / eval prompts): any row with a ``prompt``; every other column
  (``answer``, ...) is kept for reward functions.

Every error a user can hit is a :class:`DataError` whose message names the source file,
the 1-based row number and the key. ``skip_invalid=True`` skips such rows instead and counts
them in :class:`DataStats`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Task = Literal["sft", "preference", "prompt"]
Kind = Literal["language_modeling", "prompt_completion", "preference", "prompt_only"]

TASKS: tuple[str, ...] = ("sft", "preference", "prompt")


class DataError(ValueError):
    """A bad row. ``str(err)`` reads ``"<source> row <n>, key '<key>': <message>"``.

    Functions that see a single row raise it with only ``key`` set; the functions that loop
    over records add the location with :meth:`at`.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        row: int | None = None,
        key: str | None = None,
    ):
        self.message = message
        self.source = source
        self.row = row
        self.key = key
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.source is not None:
            where.append(str(self.source))
        if self.row is not None:
            where.append(f"row {self.row}")
        loc = " ".join(where)
        if self.key is not None:
            loc = f"{loc}, key {self.key!r}" if loc else f"key {self.key!r}"
        return f"{loc}: {self.message}" if loc else self.message

    def at(self, source: str | None, row: int | None) -> DataError:
        """A copy of this error located at ``source`` row ``row`` (keeps the key and type)."""
        err = type(self).__new__(type(self))
        DataError.__init__(
            err,
            self.message,
            source=source if self.source is None else self.source,
            row=row if self.row is None else self.row,
            key=self.key,
        )
        return err


class IdenticalPairError(DataError):
    """A preference pair whose chosen equals its rejected: its DPO loss is log 2 with zero
    gradient whatever the model, so it only dilutes the batch."""


class ChatTemplateError(DataError):
    """The chat template cannot be used to compute loss masks incrementally (see tokenize.py)."""


@dataclass(frozen=True)
class Record:
    """One row and where it came from: ``source`` (file or dataset name), ``row`` (1-based)."""

    data: dict[str, Any]
    source: str
    row: int


def records_from_rows(rows: Iterable[dict[str, Any]], source: str = "<memory>") -> list[Record]:
    """Wrap in-memory rows as records numbered from 1 (for tests and Python callers)."""
    return [Record(data=r, source=source, row=i) for i, r in enumerate(rows, start=1)]


def convert_records(
    records: Iterable[Record],
    fn: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    skip_invalid: bool = False,
    stats: DataStats | None = None,
    skip_reason: str = "invalid row",
) -> list[Record]:
    """``fn`` applied to every record's row, keeping source and row; a row where ``fn``
    raises DataError raises it again naming file and row, or with ``skip_invalid`` is
    skipped and counted in ``stats`` under ``skip_reason``."""
    out = []
    for rec in records:
        try:
            out.append(Record(fn(rec.data), rec.source, rec.row))
        except DataError as e:
            if not skip_invalid:
                raise e.at(rec.source, rec.row) from None
            if stats is not None:
                stats.skip(skip_reason)
    return out


@dataclass
class DataStats:
    """Counts reported before training starts (``str(stats)`` is a one-line summary).

    rows_read: rows read from the sources (including invalid ones).
    invalid_skipped: rows skipped because they were invalid (``skip_invalid=True``).
    examples: examples kept after validation and truncation.
    truncated: examples shortened to ``max_length`` (``truncation="keep_start"``/``"keep_end"``).
    dropped_too_long: examples removed because they were longer than ``max_length``
        (``truncation="drop"``), or whose prompt alone fills ``max_length``.
    dropped_no_targets: examples removed because no training target was left after truncation.
    tokens: tokens in the kept examples; target_tokens: of those, training targets.
    rows: packed or padded rows built (0 until a loader builds them).
    beyond_max_rows: valid rows read but not used, past ``data.max_train_rows`` /
        ``max_eval_rows``.
    skipped_by_reason: ``invalid_skipped`` by reason ("not UTF-8", "invalid JSON", ...).
    """

    rows_read: int = 0
    invalid_skipped: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_targets: int = 0
    tokens: int = 0
    target_tokens: int = 0
    rows: int = 0
    beyond_max_rows: int = 0
    skipped_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str) -> None:
        """Count one row skipped under ``skip_invalid`` (in total and by ``reason``)."""
        self.invalid_skipped += 1
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in self.as_dict().items() if k != "skipped_by_reason"]
        if self.skipped_by_reason:
            why = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped_by_reason.items()))
            parts.append(f"skipped ({why})")
        return ", ".join(parts)


@dataclass(frozen=True)
class RowFormat:
    """kind: TRL dataset type; conversational: message lists instead of strings;
    implicit_prompt: preference rows without a ``prompt`` key (prompt = shared prefix)."""

    kind: Kind
    conversational: bool
    implicit_prompt: bool = False

    def describe(self) -> str:
        style = "conversational" if self.conversational else "standard"
        extra = ", implicit prompt" if self.implicit_prompt else ""
        return f"{style} {self.kind}{extra}"


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and (
        len(value) == 0 or all(isinstance(m, dict) and "role" in m for m in value)
    )


def detect_format(row: dict[str, Any]) -> RowFormat:
    """Guess the format of one row from its keys (raises DataError when no format fits)."""
    if not isinstance(row, dict):
        raise DataError(f"row must be a JSON object / dict, got {type(row).__name__}")
    if "chosen" in row and "rejected" in row:
        if "prompt" in row:
            return RowFormat("preference", _is_messages(row["prompt"]))
        return RowFormat("preference", _is_messages(row["chosen"]), implicit_prompt=True)
    if "prompt" in row and "completion" in row:
        return RowFormat("prompt_completion", _is_messages(row["prompt"]))
    if "messages" in row:
        return RowFormat("language_modeling", True)
    if "text" in row:
        return RowFormat("language_modeling", False)
    if "prompt" in row:
        return RowFormat("prompt_only", _is_messages(row["prompt"]))
    raise DataError(
        f"no known format fits keys {sorted(row)}; expected 'text', 'messages', "
        "'prompt'+'completion', 'prompt'+'chosen'+'rejected' or 'prompt'"
    )


def check_messages(value: Any, key: str, *, allow_empty_content: bool = True) -> list[dict]:
    """Validate a message list: non-empty list of ``{"role": str, "content": str}``."""
    if not isinstance(value, list):
        raise DataError(f"expected a list of messages, got {type(value).__name__}", key=key)
    if not value:
        raise DataError("empty message list", key=key)
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"message {i} is a {type(m).__name__}, expected a dict", key=key)
        for field in ("role", "content"):
            if field not in m:
                raise DataError(f"message {i} has no {field!r}", key=key)
        if not isinstance(m["role"], str) or not m["role"]:
            raise DataError(f"message {i} role must be a non-empty string", key=key)
        if not isinstance(m["content"], str):
            raise DataError(
                f"message {i} content must be a string, got {type(m['content']).__name__} "
                "(multimodal content parts are not supported)",
                key=key,
            )
        if not allow_empty_content and m["role"] == "assistant" and not m["content"]:
            raise DataError(f"message {i} is an empty assistant turn", key=key)
    return value


def _check_str(row: dict, key: str, *, allow_empty: bool) -> str:
    if key not in row:
        raise DataError("missing", key=key)
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", key=key)
    if not allow_empty and not value:
        raise DataError("empty string", key=key)
    return value


def _require(row: dict, key: str) -> Any:
    if key not in row:
        raise DataError("missing", key=key)
    return row[key]


def split_implicit_prompt(
    chosen: list[dict], rejected: list[dict]
) -> tuple[list[dict], list[dict], list[dict]]:
    """Split two conversations into (shared prompt, chosen tail, rejected tail).

    The prompt is the longest common message prefix, shortened so it does not end with an
    assistant turn (the completions then start with the differing assistant turn). Raises
    DataError when nothing is shared or a tail is empty.
    """
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and chosen[k - 1]["role"] == "assistant":
        k -= 1
    if k == 0:
        raise DataError(
            "implicit prompt: chosen and rejected share no leading non-assistant message",
            key="chosen",
        )
    if len(chosen) == k:
        raise DataError("implicit prompt: nothing left after the shared prompt", key="chosen")
    if len(rejected) == k:
        raise DataError("implicit prompt: nothing left after the shared prompt", key="rejected")
    return chosen[:k], chosen[k:], rejected[k:]


def _check_pair_differs(row: dict[str, Any]) -> None:
    if row["chosen"] == row["rejected"]:
        raise IdenticalPairError(
            "chosen and rejected are identical (the pair has zero DPO gradient); fix or "
            "drop it, or set data.skip_invalid: true to skip and count such pairs",
            key="rejected",
        )


def validate_row(row: dict[str, Any], task: Task) -> RowFormat:
    """Check one row for ``task``; return its format or raise DataError naming the key."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not isinstance(row, dict):
        raise DataError(f"row must be a JSON object / dict, got {type(row).__name__}")
    if task == "prompt":
        prompt = _require(row, "prompt")
        if isinstance(prompt, list):
            check_messages(prompt, "prompt")
            return RowFormat("prompt_only", True)
        _check_str(row, "prompt", allow_empty=False)
        return RowFormat("prompt_only", False)

    fmt = detect_format(row)
    if task == "preference":
        if fmt.kind != "preference":
            raise DataError(
                f"preference data needs 'chosen' and 'rejected'; row has keys {sorted(row)}",
                key="chosen" if "chosen" not in row else "rejected",
            )
        if fmt.implicit_prompt:
            if not isinstance(row["chosen"], list):
                raise DataError(
                    "missing (an implicit prompt is only supported for conversational rows)",
                    key="prompt",
                )
            check_messages(row["chosen"], "chosen", allow_empty_content=False)
            check_messages(row["rejected"], "rejected", allow_empty_content=False)
            split_implicit_prompt(row["chosen"], row["rejected"])
            _check_pair_differs(row)
            return fmt
        if fmt.conversational:
            check_messages(row["prompt"], "prompt")
            check_messages(row["chosen"], "chosen", allow_empty_content=False)
            check_messages(row["rejected"], "rejected", allow_empty_content=False)
        else:
            _check_str(row, "prompt", allow_empty=True)
            _check_str(row, "chosen", allow_empty=False)
            _check_str(row, "rejected", allow_empty=False)
        _check_pair_differs(row)
        return fmt

    # task == "sft"
    if fmt.kind == "language_modeling":
        if fmt.conversational:
            check_messages(row["messages"], "messages")
        else:
            _check_str(row, "text", allow_empty=False)
        return fmt
    if fmt.kind == "prompt_completion":
        if fmt.conversational:
            check_messages(row["prompt"], "prompt")
            check_messages(row["completion"], "completion", allow_empty_content=False)
        else:
            _check_str(row, "prompt", allow_empty=True)
            if isinstance(row["completion"], list):
                raise DataError("a string prompt needs a string completion", key="completion")
            _check_str(row, "completion", allow_empty=False)
        return fmt
    missing = "completion" if fmt.kind == "prompt_only" else "text"
    raise DataError(
        f"SFT needs 'text', 'messages' or 'prompt'+'completion'; got a {fmt.describe()} row "
        f"with keys {sorted(row)}",
        key=missing,
    )


def validate_records(
    records: Sequence[Record],
    task: Task,
    *,
    skip_invalid: bool = False,
    stats: DataStats | None = None,
) -> tuple[list[Record], RowFormat | None]:
    """Validate every record (before training starts); return the valid ones and the format.

    All rows of a dataset must share one format (that of the first valid row). Invalid rows
    raise DataError naming file, row and key, or with ``skip_invalid`` are dropped and counted
    in ``stats.invalid_skipped``.
    """
    valid: list[Record] = []
    fmt: RowFormat | None = None
    for rec in records:
        try:
            row_fmt = validate_row(rec.data, task)
            if fmt is not None and row_fmt != fmt:
                raise DataError(
                    f"row is {row_fmt.describe()} but the dataset is {fmt.describe()} "
                    "(all rows must share one format)"
                )
        except DataError as e:
            if not skip_invalid:
                raise e.at(rec.source, rec.row) from None
            if stats is not None:
                identical = isinstance(e, IdenticalPairError)
                stats.skip("identical chosen and rejected" if identical else "invalid row")
            continue
        fmt = row_fmt if fmt is None else fmt
        valid.append(rec)
    return valid, fmt
