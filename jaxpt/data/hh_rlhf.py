"""Anthropic hh-rlhf rows -> conversational preference rows (TRL format).

An hh-rlhf row holds two full transcripts, ``chosen`` and ``rejected``::

    "\\n\\nHuman: How do I ...?\\n\\nAssistant: You could ...
     \\n\\nHuman: ...\\n\\nAssistant: <final>"

They share everything up to the final assistant turn. :func:`hh_rlhf_to_preference` turns a
row into::

    {"prompt": [{"role": "user", ...}, {"role": "assistant", ...}, ..., {"role": "user", ...}],
     "chosen": [{"role": "assistant", "content": <final turn of chosen>}],
     "rejected": [{"role": "assistant", "content": <final turn of rejected>}]}

Turn contents are stripped of surrounding whitespace. A transcript is malformed (DataError
naming the key) when text precedes the first ``Human:`` turn, the first turn is not
``Human:``, the last turn is not ``Assistant:`` or is empty, or the two transcripts differ
before their final assistant turns. Consecutive turns of the same role occur in the real
data and are kept as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from jaxpt.data.formats import DataError, DataStats, Record, convert_records

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: Any, key: str = "chosen") -> list[dict[str, str]]:
    """Split a ``\\n\\nHuman: ...\\n\\nAssistant: ...`` transcript into messages."""
    if not isinstance(text, str):
        raise DataError(f"expected a transcript string, got {type(text).__name__}", key=key)
    parts = _TURN.split(text)
    if parts[0].strip():
        raise DataError(f"text before the first '\\n\\nHuman:' turn: {parts[0][:60]!r}", key=key)
    roles, contents = parts[1::2], parts[2::2]
    if not roles:
        raise DataError("no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found", key=key)
    if roles[0] != "Human":
        raise DataError("transcript must start with a '\\n\\nHuman:' turn", key=key)
    if roles[-1] != "Assistant":
        raise DataError("transcript must end with an '\\n\\nAssistant:' turn", key=key)
    messages = [
        {"role": _ROLES[r], "content": c.strip()} for r, c in zip(roles, contents, strict=True)
    ]
    if not messages[-1]["content"]:
        raise DataError("the final assistant turn is empty", key=key)
    return messages


def hh_rlhf_to_preference(row: dict[str, Any]) -> dict[str, Any]:
    """One hh-rlhf row -> ``{"prompt": [...], "chosen": [assistant], "rejected": [assistant]}``."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError("missing", key=key)
    chosen = parse_hh_transcript(row["chosen"], "chosen")
    rejected = parse_hh_transcript(row["rejected"], "rejected")
    if chosen[:-1] != rejected[:-1]:
        i = next(
            (j for j, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=False)) if a != b),
            min(len(chosen), len(rejected)) - 1,
        )
        raise DataError(
            f"chosen and rejected transcripts differ before their final assistant turn "
            f"(first at turn {i})",
            key="rejected",
        )
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def convert_hh_rlhf(
    records: Sequence[Record], *, skip_invalid: bool = False, stats: DataStats | None = None
) -> list[Record]:
    """Convert records (keeping source and row); malformed rows raise or are skipped + counted."""
    return convert_records(records, hh_rlhf_to_preference, skip_invalid=skip_invalid,
                           stats=stats, skip_reason="invalid hh-rlhf transcript")
