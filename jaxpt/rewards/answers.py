"""Which text of a completion is its final answer, and the reference answer of a row.

**Which text is the answer** (:func:`select_answer`, one rule for both modes), first found wins:

1. the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed);
2. the last explicit statement: a GSM8K ``#### <answer>`` line or ``... answer is <answer>``
   / ``Answer: <answer>`` (``final answer``, ``answer would be`` too). The answer runs to
   the end of its sentence or clause (``The answer is 7, not 6.`` -> ``7``); a math span
   right after the marker (``$...$``, ``\\(...\\)``) is taken whole; ``9 - 3 = 6`` gives
   the part after the last ``=``; a number followed only by words gives the number
   (``18 dollars`` -> ``18``), prose holding exactly one number gives it (``she has 5
   left``) unless negated (``not 5``: no credit). A statement whose span is prose without
   a digit or LaTeX (``the answer is the number of eggs``) is skipped. A readable statement
   wins over every number after it, and a hedge (``5 or 6``) is compared whole (no credit);
3. the whole completion, when it is nothing but an answer (``6``, ``**6**``, ``6 coins``,
   ``$\\frac{1}{2}$``);
4. non-strict mode only (``math``): the last number in the text (``1,234.5``, ``-7``,
   ``3/4``, ``\\frac{3}{4}``, ``1.5e3``, ``3\\times10^{8}``). Strict mode (``math_strict``)
   credits only a stated answer (steps 1-3), so rambling that happens to end on the right
   number scores 0.

Before selection, LaTeX thousands separators (``1\\,000``, ``1{,}000``) are joined and the
Unicode minus (U+2212) becomes ``-``.

**The reference** (dataset column ``answer``, :func:`parse_reference`) is its ``\\boxed{}``
or GSM8K ``#### N`` when present, else the whole value, parsed as one expression: it is
never reduced to its last number (``x^2 + 7x + 10`` is a polynomial, not ``10``).
"""

from __future__ import annotations

import re
from typing import Any

from jaxpt.rewards.numbers import (
    _NUMBER_RE,
    _NUMBER_THEN_WORDS_RE,
    _TEXT_WRAPPER_RE,
    _clean_text,
    parse_number,
)

__all__ = [
    "select_answer",
    "extract_boxed",
    "extract_gsm8k_answer",
    "extract_stated_span",
    "extract_last_number",
    "extract_answer",
    "extract_strict_answer",
    "parse_reference",
]

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
_GSM8K_RE = re.compile(r"####\s*([^\n]*)")


# ----------------------------------------------------------------------------- extraction


def _match_braces(text: str, open_idx: int) -> str | None:
    """Content between ``text[open_idx] == '{'`` and its matching ``}`` (None if unbalanced)."""
    depth = 0
    for i in range(open_idx, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last balanced ``\\boxed{...}`` / ``\\fbox{...}`` (``\\boxed 5`` too)."""
    for m in reversed(list(_BOXED_RE.finditer(text))):
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            content = _match_braces(text, j)
            if content is not None:
                return content.strip()
        elif j > m.end():  # "\boxed 5": a space, then one token
            token = re.match(r"[^\s$]+", text[j:])
            if token:
                return token.group(0)
    return None


def extract_gsm8k_answer(text: str) -> str | None:
    """The text after the last ``####`` (GSM8K's final-answer marker), or None."""
    matches = _GSM8K_RE.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip()
    return answer or None


def extract_last_number(text: str) -> str | None:
    """The last number-like span in ``text`` (see module docstring), or None."""
    matches = _NUMBER_RE.findall(_clean_text(text))
    return matches[-1].strip() if matches else None


_ANSWER_IS_RE = re.compile(
    r"(?:####|\banswer\**\s*(?:is|would be|should be|will be|:|=)\s*[:=]?)\**[ \t]*",
    re.IGNORECASE,
)
_MATH_SPAN_RE = re.compile(r"^(?:\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\])", re.DOTALL)
_OPEN, _CLOSE = "([{", ")]}"


def _clause(text: str) -> str:
    """``text`` up to the end of its first sentence or clause, brackets kept whole: a
    newline, ``.`` not inside a number, ``;``, or ``, `` followed by a word."""
    depth = 0
    for i, ch in enumerate(text):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(depth - 1, 0)
        elif ch == "\n":
            return text[:i]
        elif depth == 0:
            rest = text[i + 1 :]
            if ch == "." and not (i > 0 and text[i - 1].isdigit() and rest[:1].isdigit()):
                if not rest or rest[0].isspace():
                    return text[:i]
            elif ch == ";" or (ch == "," and re.match(r"\s+[A-Za-z]{2,}", rest)):
                return text[:i]
    return text


_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")  # a prose word, not a \command
_NEGATION_RE = re.compile(r"\b(?:not|no|never|isn't|cannot)\b|n't\b", re.IGNORECASE)


def _readable(span: str) -> bool:
    """A stated span that can be an answer: it has a digit or LaTeX, or no prose word."""
    return bool(span) and (bool(re.search(r"[\d\\]", span)) or not _WORD_RE.search(span))


def extract_stated_span(text: str) -> str | None:
    """The raw answer span of the last explicit statement (``#### X``, ``answer is X``,
    ``Answer: X``) that can be an answer (it has a digit or LaTeX, or is not prose), up to
    the end of its clause; a math span right after the marker whole. None when the text
    states no readable answer."""
    text = _clean_text(text)
    for m in reversed(list(_ANSWER_IS_RE.finditer(text))):
        rest = text[m.end() :]
        math_span = _MATH_SPAN_RE.match(rest)
        if math_span:
            span = next(g for g in math_span.groups() if g is not None).strip()
        else:
            span = _clause(rest).strip().strip("*").strip()
        if _readable(span):
            return span
    return None


def _answer_from_span(span: str) -> str:
    """A stated span as an answer: after the last top-level ``=``; a number + words -> the
    number (``18 dollars`` -> ``18``); prose holding exactly one number -> that number
    (``she has 5 left`` -> ``5``) unless it is negated (``not 5``: kept whole, no match)."""
    s = span.strip().rstrip(".").strip()
    if "=" in s and not re.search(r"\\[lg]eq?|[<>]", s):
        s = s.rsplit("=", 1)[-1].strip()
    m = _NUMBER_THEN_WORDS_RE.match(s)
    if m:
        return m.group(1)
    if _WORD_RE.search(_TEXT_WRAPPER_RE.sub(" ", s)) and not _NEGATION_RE.search(s):
        numbers = _NUMBER_RE.findall(s)
        if len(numbers) == 1:
            return numbers[0].strip()
    return s


def _bare_answer(text: str) -> str | None:
    """The completion when it is nothing but an answer (a number with optional unit words,
    or one math span), else None."""
    s = text.strip().strip("*").strip().rstrip(".").strip().strip("*").strip()
    if not s:
        return None
    span = _MATH_SPAN_RE.match(s)
    if span and span.end() == len(s):
        return next(g for g in span.groups() if g is not None).strip()
    if parse_number(s) is not None:
        return s
    return None


def select_answer(text: str, strict: bool = False) -> str | None:
    """The final answer of a completion by the rule in the module docstring (steps 1-4;
    ``strict`` stops after step 3). None when there is none."""
    text = _clean_text(text)
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    span = extract_stated_span(text)
    if span is not None:
        return _answer_from_span(span) or None
    bare = _bare_answer(text)
    if bare is not None or strict:
        return bare
    return extract_last_number(text)


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, non-strict (``math``): :func:`select_answer`."""
    return select_answer(text, strict=False)


def extract_strict_answer(text: str) -> str | None:
    """A final answer the completion states (``math_strict``): boxed, ``####``,
    ``answer is`` / ``Answer:``, or the whole completion when it is a lone answer. Never a
    number picked out of prose."""
    return select_answer(text, strict=True)


def parse_reference(answer: Any) -> str | None:
    """The reference final answer of a dataset ``answer`` value: its ``\\boxed{...}`` or
    GSM8K ``#### N`` when present, else the whole value as one expression; None when
    missing or empty."""
    if answer is None:
        return None
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return repr(answer)
    text = _clean_text(str(answer)).strip()
    if not text:
        return None
    for extract in (extract_boxed, extract_gsm8k_answer):
        found = extract(text)
        if found is not None:
            return found
    return text
