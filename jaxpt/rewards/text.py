"""Text helpers shared by the reward functions (host-side, plain Python)."""

from __future__ import annotations

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
