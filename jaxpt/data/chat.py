"""Chat templates as text: render messages, and split a rendered conversation into the
text the model is trained on and the text it is not (assistant-only loss, any template).

Masks are computed by rendering the conversation *incrementally* with the tokenizer's chat
template, with no ``{% generation %}`` markers needed. For each trained assistant message
``i``:

* ``before = render(messages[:i], add_generation_prompt=True)`` ends where the model starts
  generating;
* ``upto = render(messages[:i + 1])`` ends after the turn;
* the trained text is ``upto[len(before):]`` (the assistant content plus the template's
  end-of-turn), **minus trailing whitespace that follows a special token**. With ChatML
  templates (SmolLM2, Qwen2.5) an assistant turn renders as
  ``<|im_start|>assistant\\n{content}<|im_end|>\\n``: ``<|im_start|>assistant\\n`` is the
  generation prompt (not trained), ``{content}<|im_end|>`` is trained, and the ``\\n`` after
  ``<|im_end|>`` is not trained (generation stops at ``<|im_end|>``, so the model never
  produces it). TRL's ``assistant_only_loss`` training templates also train that ``\\n`` for
  Qwen2.5; jaxpt counts one token fewer per turn there. When the end-of-turn is plain text
  (no special token, e.g. ``"\\n\\n"``), the whole tail including the whitespace is trained,
  because it *is* the end-of-turn marker the model must learn to emit.

The rendering of every prefix must be a string prefix of the full rendering, and the
generation prompt must be a prefix of the rendered assistant turn; otherwise
:class:`~jaxpt.data.formats.ChatTemplateError` says which of the two the template breaks
(templates that rewrite history, e.g. strip reasoning from earlier turns, break the first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxpt.data.formats import ChatTemplateError, DataError

__all__ = [
    "conversation_segments",
    "divergence",
    "render_chat",
    "special_token_strings",
    "turn_end",
]


def special_token_strings(tokenizer: Any) -> frozenset[str]:
    """The tokenizer's special tokens as text (used to find the end-of-turn of a turn)."""
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    out.update(tok.content for tok in decoder.values() if getattr(tok, "special", False))
    return frozenset(t for t in out if t)


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool,
    chat_template_kwargs: dict | None = None,
) -> str:
    """Render messages with the tokenizer's chat template (text, not ids)."""
    if getattr(tokenizer, "chat_template", None) is None and not (chat_template_kwargs or {}).get(
        "chat_template"
    ):
        raise ChatTemplateError(
            "conversational data needs a tokenizer with a chat template "
            "(tokenizer.chat_template is None)"
        )
    try:
        text = tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **(chat_template_kwargs or {}),
        )
    except Exception as e:  # jinja raise_exception(...) and template errors
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):
        raise ChatTemplateError(f"apply_chat_template returned {type(text).__name__}, not text")
    return text


def turn_end(text: str, start: int, specials: frozenset[str]) -> int:
    """End of the trained part of ``text[start:]``: drop whitespace after a final special token."""
    tail = text[start:]
    stripped = tail.rstrip()
    if stripped != tail and any(stripped.endswith(s) for s in specials):
        return start + len(stripped)
    return len(text)


def divergence(a: str, b: str) -> str:
    """Where two renderings first differ, with 30 characters of each around it (errors)."""
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    lo, hi = max(0, i - 30), i + 30
    return f"they differ at character {i}: {a[lo:hi]!r} vs {b[lo:hi]!r}"


def conversation_segments(
    tokenizer: Any,
    messages: Sequence[dict],
    trained_turns: Sequence[int] | None,
    *,
    key: str = "messages",
    chat_template_kwargs: dict | None = None,
) -> list[tuple[str, bool]]:
    """Split the rendered conversation into ``(text, trained)`` pieces (see module doc).

    ``trained_turns`` are indices of assistant messages to train on; None trains everything.
    The pieces concatenate to ``render_chat(messages, add_generation_prompt=False)``.
    """
    kw = chat_template_kwargs
    full = render_chat(tokenizer, messages, add_generation_prompt=False, chat_template_kwargs=kw)
    if trained_turns is None:
        return [(full, True)]
    specials = special_token_strings(tokenizer)
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for i in sorted(trained_turns):
        if i == 0:
            raise DataError(
                "message 0 is an assistant turn; a trained assistant turn needs a preceding "
                "system or user message (the generation prompt is rendered after it)",
                key=key,
            )
        before = render_chat(
            tokenizer, messages[:i], add_generation_prompt=True, chat_template_kwargs=kw
        )
        upto = render_chat(
            tokenizer, messages[: i + 1], add_generation_prompt=False, chat_template_kwargs=kw
        )
        if not upto.startswith(before):
            raise ChatTemplateError(
                f"chat template issue at message {i}: rendering messages[:{i}] with "
                f"add_generation_prompt=True is not a prefix of rendering messages[:{i + 1}], "
                "so the generation prompt does not match how the template writes an assistant "
                f"turn; {divergence(before, upto)}",
                key=key,
            )
        if not full.startswith(upto):
            raise ChatTemplateError(
                f"chat template issue at message {i}: rendering messages[:{i + 1}] is not a "
                "prefix of rendering the whole conversation; the template renders earlier turns "
                "differently once later turns follow (e.g. it strips reasoning from earlier "
                "assistant turns), so loss masks cannot be computed incrementally; "
                f"{divergence(upto, full)}",
                key=key,
            )
        start, end = len(before), turn_end(upto, len(before), specials)
        if start < cursor:
            raise ChatTemplateError(
                f"chat template issue at message {i}: the generation prompt ends before the "
                "previous assistant turn does",
                key=key,
            )
        pieces.append((full[cursor:start], False))
        pieces.append((full[start:end], True))
        cursor = end
    pieces.append((full[cursor:], False))
    return [(t, m) for t, m in pieces if t]
