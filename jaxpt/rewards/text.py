"""Text helpers shared by the reward functions (host-side, plain Python)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def completion_text(completion: Any) -> str:
    """The text of one completion, standard or conversational.

    A standard completion is a ``str``. A conversational one is a list of messages
    (``{"role": ..., "content": ...}``), as TRL passes them; their contents are joined with
    newlines. A message content may itself be a list of parts (``{"type": "text",
    "text": ...}``); the text parts are joined.
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        texts = []
        for message in completion:
            if isinstance(message, str):
                texts.append(message)
                continue
            if not isinstance(message, dict):
                raise TypeError(
                    f"a conversational completion must hold message dicts; got {type(message)}"
                )
            content = message.get("content", "")
            if isinstance(content, list):
                content = "".join(
                    p.get("text", "") if isinstance(p, dict) else str(p) for p in content
                )
            texts.append("" if content is None else str(content))
        return "\n".join(texts)
    raise TypeError(
        f"a completion must be a str or a list of messages; got {type(completion).__name__}"
    )


def score_against_answers(
    name: str,
    completions: list | None,
    answer: list | None,
    columns: dict,
    parse_reference: Callable[[Any], Any],
    score: Callable[[str, Any], float],
    what: str = "the reference answer of each row",
) -> list[float | None]:
    """The loop of a reward that checks each completion against the ``answer`` column:
    ``score(completion text, parsed reference)`` per row, None where the reference does
    not parse. Missing completions or ``answer`` are errors naming the reward."""
    if completions is None:
        raise ValueError(f"{name} needs completions.")
    if answer is None:
        raise ValueError(
            f"{name} needs a dataset column 'answer' ({what}); the columns passed were: "
            f"{sorted(columns)}."
        )
    out: list[float | None] = []
    for completion, raw in zip(completions, answer, strict=True):
        reference = parse_reference(raw)
        out.append(None if reference is None else score(completion_text(completion), reference))
    return out
