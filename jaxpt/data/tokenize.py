"""Rows -> token ids + loss masks, for any `transformers` tokenizer and chat template.

Axis legend: T = tokens of one example, P = prompt tokens, C = completion tokens.

Loss-mask semantics: ``loss_mask[t]`` is True when token ``t`` is a training target, i.e. the
model is trained to predict ``input_ids[t]`` from ``input_ids[:t]``. The first token of an
example is never a target (nothing precedes it), so ``loss_mask[0]`` is always False, and
trailing tokens that are not targets are trimmed from SFT examples (they would only waste
space in a packed row).

Conversations (assistant-only loss, any chat template)
------------------------------------------------------
The trained and untrained text of a conversation comes from
:func:`jaxpt.data.chat.conversation_segments` (its module doc says how, and which template
rules it checks).

The rendered text is tokenized piece by piece (untrained piece, trained piece, ...), with
``add_special_tokens=False`` (templates write their own BOS), so every token lies wholly in
one piece and the prompt pieces tokenize exactly as the prompt does at generation time. For
templates whose pieces meet at special tokens (ChatML and most others) this equals
tokenizing the full rendering in one go.

Bounded tokenizing
------------------
With ``max_length`` given, text that cannot survive truncation is cut before the tokenizer
sees it (a 50 MB row with ``max_length: 128`` used to be tokenized whole): see
:func:`encode_bounded`. The tokens truncation keeps are the same, and the cut row is still
longer than ``max_length``, so it is truncated (or dropped) and counted as before.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxpt.data.chat import (
    conversation_segments,
    divergence,
    render_chat,
    special_token_strings,
    turn_end,
)
from jaxpt.data.formats import (
    ChatTemplateError,
    DataError,
    split_implicit_prompt,
    validate_row,
)


@dataclass
class TokenizedExample:
    """One SFT example: ``input_ids`` int32 [T], ``loss_mask`` bool [T] (see module doc)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray

    def __post_init__(self):
        self.input_ids = np.asarray(self.input_ids, dtype=np.int32)
        self.loss_mask = np.asarray(self.loss_mask, dtype=bool)
        if self.input_ids.ndim != 1 or self.input_ids.shape != self.loss_mask.shape:
            raise ValueError(
                f"input_ids {self.input_ids.shape} and loss_mask {self.loss_mask.shape} "
                "must be 1-D of the same length"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.loss_mask[1:].sum())


@dataclass
class TokenizedPreference:
    """One preference pair: the shared prompt and the two completions (int32 1-D each).

    The training sequences are ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids``
    with the loss mask on the completion tokens only. ``margin``: the row's optional
    ``margin`` column (reward models: how much chosen should beat rejected by).
    """

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    margin: float | None = None

    def __post_init__(self):
        self.prompt_ids = np.asarray(self.prompt_ids, dtype=np.int32)
        self.chosen_ids = np.asarray(self.chosen_ids, dtype=np.int32)
        self.rejected_ids = np.asarray(self.rejected_ids, dtype=np.int32)

    def sequence(self, which: str) -> TokenizedExample:
        """``which`` in {"chosen", "rejected"}: prompt + completion with its completion mask."""
        completion = self.chosen_ids if which == "chosen" else self.rejected_ids
        ids = np.concatenate([self.prompt_ids, completion])
        mask = np.concatenate(
            [np.zeros(len(self.prompt_ids), bool), np.ones(len(completion), bool)]
        )
        mask[:1] = False
        return TokenizedExample(ids, mask)


# ----------------------------------------------------------------------------- helpers


def encode(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text`` (no truncation, no padding)."""
    if not text:
        return list(tokenizer("", add_special_tokens=add_special_tokens)["input_ids"])
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


# Tokens between the last kept token and a cut: a cut changes how the text next to it is
# split and merged, never the tokens this far from it.
MARGIN_TOKENS = 64
_MAX_CHARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Whitespace then a non-space character in reversed text: the start of the text's last
# whitespace run, where pre-tokenizers start a new piece (or, after punctuation that takes
# the newlines with it, resynchronize a piece or two later).
_RUN_START_REVERSED = re.compile(r"\s(?=\S)")


def max_chars_per_token(tokenizer: Any) -> int:
    """The most characters one token stands for: the longest vocabulary entry (cached).

    A raw entry is never shorter than the text it decodes to (byte-level BPE writes one
    character per byte, sentencepiece one ``▁`` per space and ``<0x41>`` per fallback
    byte, WordPiece adds ``##``), so ``n`` characters are at least ``n / max_chars``
    tokens, unless a normalizer shortens the text (checked in :func:`encode_bounded`).
    """
    try:
        return _MAX_CHARS[tokenizer]
    except (KeyError, TypeError):
        pass
    n = max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))
    try:
        _MAX_CHARS[tokenizer] = n
    except TypeError:  # not weak-referenceable: computed again next time
        pass
    return n


def char_bound(tokenizer: Any, max_length: int) -> int:
    """Characters beyond which a text is certainly cut by truncation to ``max_length``
    tokens: ``(max_length + MARGIN_TOKENS) * max_chars_per_token``."""
    return (max_length + MARGIN_TOKENS) * max_chars_per_token(tokenizer)


def encode_bounded(
    tokenizer: Any,
    text: str,
    *,
    add_special_tokens: bool,
    max_length: int | None,
    keep_end: bool = False,
) -> list[int]:
    """:func:`encode`, reading no more of ``text`` than truncation to ``max_length`` keeps.

    Text within :func:`char_bound` characters (or ``max_length=None``) is encoded whole.
    Longer text is more than ``max_length + MARGIN_TOKENS`` tokens, so truncation cuts it
    anyway, and only its first ``bound`` characters are encoded (``keep_end``: its last
    ``bound`` to ``2 * bound``, from the start of a whitespace run, so the pieces the
    pre-tokenizer splits the kept end into are those of the whole text). The kept tokens
    lie ``MARGIN_TOKENS`` tokens or more from the cut, so they are the whole text's.

    Falls back to encoding the whole text when the cut part gives fewer than
    ``max_length + MARGIN_TOKENS`` tokens (a normalizer that shortens text, e.g. NFC
    composing accents) or, with ``keep_end``, has no whitespace to start at.
    """
    if max_length is None:
        return encode(tokenizer, text, add_special_tokens=add_special_tokens)
    bound = char_bound(tokenizer, max_length)
    if len(text) <= bound:
        return encode(tokenizer, text, add_special_tokens=add_special_tokens)
    if keep_end:
        last = len(text) - bound
        lo = max(1, last - bound)
        m = _RUN_START_REVERSED.search(text[lo : last + 1][::-1])
        part = text[last - m.start() :] if m else None
    else:
        part = text[:bound]
    if part is not None:
        ids = encode(tokenizer, part, add_special_tokens=add_special_tokens)
        if len(ids) >= max_length + MARGIN_TOKENS:
            return ids
    return encode(tokenizer, text, add_special_tokens=add_special_tokens)


def _with_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = [*ids, int(eos)]
    return ids


def _example_from_pieces(tokenizer: Any, pieces: list[tuple[list[int], bool]]) -> TokenizedExample:
    ids: list[int] = []
    mask: list[bool] = []
    for piece_ids, trained in pieces:
        ids.extend(piece_ids)
        mask.extend([trained] * len(piece_ids))
    mask_T = np.asarray(mask, dtype=bool)
    if mask_T.size:
        mask_T[0] = False
    targets = np.flatnonzero(mask_T)
    if targets.size == 0:
        raise DataError("no training targets (nothing to learn after tokenization)")
    end = int(targets[-1]) + 1
    return TokenizedExample(np.asarray(ids[:end], np.int32), mask_T[:end])


def _tokenize_conversation(
    tokenizer, messages, trained_turns, key, kw, max_length
) -> TokenizedExample:
    pieces = conversation_segments(
        tokenizer, messages, trained_turns, key=key, chat_template_kwargs=kw
    )
    # Each piece is bounded on its own: a piece cut short fills max_length by itself, so
    # the pieces after it are past the kept tokens, yet still say whether targets follow.
    return _example_from_pieces(
        tokenizer,
        [
            (encode_bounded(tokenizer, t, add_special_tokens=False, max_length=max_length), m)
            for t, m in pieces
        ],
    )


# ----------------------------------------------------------------------------- public API


def tokenize_sft(
    tokenizer: Any,
    row: dict[str, Any],
    *,
    completion_only: bool = True,
    assistant_only: bool = True,
    chat_template_kwargs: dict | None = None,
    max_length: int | None = None,
) -> TokenizedExample:
    """Tokenize one SFT row (raises DataError naming the key; callers add file and row).

    * ``{"text"}``: every token is a target; EOS appended if the tokenizer has one and the
      text does not already end with it; BOS as the tokenizer adds it.
    * ``{"prompt", "completion"}`` strings: prompt tokenized with the tokenizer's special
      tokens, completion without them plus EOS; targets = completion tokens
      (``completion_only=False``: all tokens).
    * ``{"messages"}``: targets = every assistant turn, computed incrementally (module doc);
      ``assistant_only=False`` trains the whole rendering.
    * conversational ``{"prompt", "completion"}``: targets = the assistant turns of the
      completion; ``completion_only=False`` falls back to ``assistant_only`` over the
      whole conversation.

    ``max_length`` (the length ``truncate_example`` cuts to, keeping the start): text
    longer than can survive it is cut before tokenizing (:func:`encode_bounded`; every
    string, or every rendered piece of a conversation, on its own). The first
    ``max_length`` tokens and their mask are those of the whole row.
    """
    fmt = validate_row(row, "sft")
    kw = chat_template_kwargs
    enc = lambda text, special: encode_bounded(
        tokenizer, text, add_special_tokens=special, max_length=max_length
    )
    if fmt.kind == "language_modeling" and not fmt.conversational:
        ids = _with_eos(tokenizer, enc(row["text"], True))
        return _example_from_pieces(tokenizer, [(ids, True)])
    if fmt.kind == "prompt_completion" and not fmt.conversational:
        p = enc(row["prompt"], True)
        c = _with_eos(tokenizer, enc(row["completion"], False))
        return _example_from_pieces(tokenizer, [(p, not completion_only), (c, True)])

    if fmt.kind == "language_modeling":
        messages, n_prompt, key = row["messages"], 0, "messages"
    else:
        messages = [*row["prompt"], *row["completion"]]
        n_prompt, key = len(row["prompt"]), "completion"
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if fmt.kind == "prompt_completion" and completion_only:
        turns = [i for i in assistant if i >= n_prompt]
    elif assistant_only:
        turns = assistant
    else:
        turns = None
    if turns is not None and not turns:
        raise DataError("no assistant message to train on", key=key)
    return _tokenize_conversation(tokenizer, messages, turns, key, kw, max_length)


def _completion_text(tokenizer, prompt_text, prompt, completion, key, kw) -> str:
    full = render_chat(
        tokenizer, [*prompt, *completion], add_generation_prompt=False, chat_template_kwargs=kw
    )
    if not full.startswith(prompt_text):
        raise ChatTemplateError(
            "chat template issue: the prompt rendered with add_generation_prompt=True is not a "
            f"prefix of prompt + {key} rendered; {divergence(prompt_text, full)}",
            key=key,
        )
    end = turn_end(full, len(prompt_text), special_token_strings(tokenizer))
    text = full[len(prompt_text) : end]
    if not text:
        raise DataError("empty completion after rendering", key=key)
    return text


def tokenize_preference(
    tokenizer: Any,
    row: dict[str, Any],
    *,
    chat_template_kwargs: dict | None = None,
    max_length: int | None = None,
) -> TokenizedPreference:
    """Tokenize one preference row into prompt / chosen / rejected ids.

    Strings: prompt with the tokenizer's special tokens, completions without them plus EOS.
    Conversational (explicit or implicit prompt): prompt = chat template with
    ``add_generation_prompt=True``; each completion = the rest of the rendering of
    prompt + completion, ending at its end-of-turn (trailing whitespace after a final
    special token dropped, as in :func:`tokenize_sft`).

    ``max_length`` (that of ``truncate_preference``): prompt, chosen and rejected text is
    each cut before tokenizing where it cannot survive truncation (:func:`encode_bounded`),
    which keeps the tokens truncation keeps.
    """
    fmt = validate_row(row, "preference")
    margin = _margin(row)
    kw = chat_template_kwargs
    enc = lambda text, special: encode_bounded(
        tokenizer, text, add_special_tokens=special, max_length=max_length
    )
    if not fmt.conversational:
        p = enc(row["prompt"], True)
        c = _with_eos(tokenizer, enc(row["chosen"], False))
        r = _with_eos(tokenizer, enc(row["rejected"], False))
        return TokenizedPreference(p, c, r, margin)
    if fmt.implicit_prompt:
        prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
    else:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    prompt_text = render_chat(
        tokenizer, prompt, add_generation_prompt=True, chat_template_kwargs=kw
    )
    c_text = _completion_text(tokenizer, prompt_text, prompt, chosen, "chosen", kw)
    r_text = _completion_text(tokenizer, prompt_text, prompt, rejected, "rejected", kw)
    return TokenizedPreference(
        enc(prompt_text, False), enc(c_text, False), enc(r_text, False), margin
    )


def _margin(row: dict[str, Any]) -> float | None:
    """A preference row's optional ``margin`` column as a float (None when absent)."""
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise DataError(f"margin must be a finite number, got {value!r}", key="margin")
    return float(value)


def tokenize_prompt(
    tokenizer: Any,
    row: dict[str, Any],
    *,
    chat_template_kwargs: dict | None = None,
    max_length: int | None = None,
) -> np.ndarray:
    """Prompt ids (int32 [P]) for generation: a string prompt is tokenized with the
    tokenizer's special tokens; a message list is rendered with ``add_generation_prompt=True``.

    ``max_length`` (that of ``truncate_prompt``): a prompt that cannot survive it is cut
    before tokenizing, keeping its end (:func:`encode_bounded`), so the last ``max_length``
    tokens (what ``keep_end`` keeps) are the whole prompt's and ``drop`` still drops it."""
    fmt = validate_row(row, "prompt")
    if fmt.conversational:
        text = render_chat(
            tokenizer,
            row["prompt"],
            add_generation_prompt=True,
            chat_template_kwargs=chat_template_kwargs,
        )
        special = False
    else:
        text, special = row["prompt"], True
    ids = encode_bounded(
        tokenizer, text, add_special_tokens=special, max_length=max_length, keep_end=True
    )
    if not ids:
        raise DataError("prompt tokenizes to nothing", key="prompt")
    return np.asarray(ids, dtype=np.int32)
