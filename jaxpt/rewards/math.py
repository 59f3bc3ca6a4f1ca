"""Verifiable math rewards: extract a final answer, normalize it, compare it numerically.

Answer extraction from a completion, in order:

1. the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces;
2. the last GSM8K-style ``#### <answer>`` line;
3. the last number in the text (integers, ``1,234.5``, ``-7``, ``3/4``, ``\\frac{3}{4}``).

Strict mode (``strict=True``, the ``math_strict`` reward) drops step 3, which rewards
rambling that happens to end on the right number; it accepts instead an explicit final
answer (``The answer is 6``, ``Answer: 6``) or a completion that is nothing but the
answer (``6``, ``6.``, ``**6**``, ``6 coins``).

Normalization drops ``$``, ``\\$``, ``\\text{...}`` wrappers, thousands separators, ``%``,
degree marks, a leading ``x =``, trailing words after a number (units: ``18 dollars``,
``5 cm``) and trailing periods. Two answers match when both parse as numbers equal within
``rel_tol=1e-6`` / ``abs_tol=1e-9`` (fractions and ``\\frac`` included), else when their
normalized strings are equal (case- and whitespace-insensitive).

Reference answers (the dataset column ``answer``) are parsed the same way: GSM8K answers
end with ``#### N``; a bare answer such as ``"72"`` or ``"\\frac{1}{2}"`` is used whole.
"""

from __future__ import annotations

import math
import re
from typing import Any

from jaxpt.rewards.text import completion_text

__all__ = [
    "extract_boxed",
    "extract_gsm8k_answer",
    "extract_last_number",
    "extract_answer",
    "extract_strict_answer",
    "normalize_answer",
    "parse_number",
    "answers_match",
    "parse_reference",
    "math_reward",
    "math_strict_reward",
    "answer_format_reward",
]

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
_GSM8K_RE = re.compile(r"####\s*([^\n]*)")
_NUM = r"\d+(?:\.\d+)?"
# a minus sign counts only when it does not follow a word or a closing bracket (16-3 is a
# subtraction, "= -6" is negative six)
_SIGN = r"(?:(?<![\w)\]}])-\s?)?"
_NUMBER_RE = re.compile(
    _SIGN
    + r"(?:"
    + r"\\[dt]?frac\{\s*-?" + _NUM + r"\s*\}\{\s*-?" + _NUM + r"\s*\}"  # \frac{3}{4}
    + r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?"  # 1,234,567.89
    + r"|" + _NUM + r"(?:\s*/\s*" + _NUM + r")?"  # 12, 12.5, 3/4
    + r"|\.\d+"  # .5
    + r")"
)  # fmt: skip


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
    matches = _NUMBER_RE.findall(text)
    return matches[-1].strip() if matches else None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: boxed, else ``####``, else the last number."""
    for extract in (extract_boxed, extract_gsm8k_answer, extract_last_number):
        answer = extract(text)
        if answer is not None:
            return answer
    return None


_ANSWER_IS_RE = re.compile(
    r"(?:final answer|answer)\s*(?:is|:|=)\s*[:=]?\s*([^\n]*)", re.IGNORECASE
)


def extract_strict_answer(text: str) -> str | None:
    """A final answer the completion states explicitly: boxed, ``####``, ``answer is`` /
    ``answer:``, or the whole completion when it is a lone number (markdown bold, a
    trailing period and unit words allowed). Never a number picked out of prose."""
    for extract in (extract_boxed, extract_gsm8k_answer):
        answer = extract(text)
        if answer is not None:
            return answer
    stated = _ANSWER_IS_RE.findall(text)
    if stated:
        value = stated[-1].split("=")[-1].strip().strip("*").strip()
        number = _NUMBER_RE.match(value)
        return number.group(0).strip() if number else (value or None)
    whole = text.strip().strip("*").strip()
    if whole and parse_number(whole) is not None:
        return whole
    return None


_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_REMOVE = (
    "\\left",
    "\\right",
    "\\!",
    "\\,",
    "\\;",
    "\\:",
    "\\$",
    "$",
    "\\%",
    "%",
    "^\\circ",
    "^{\\circ}",
    "°",
    "\\displaystyle",
)
_NUMBER_THEN_WORDS_RE = re.compile(
    r"^(-?(?:\\frac\{[^{}]*\}\{[^{}]*\}|\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|\.\d+))"
    r"\s*[A-Za-z][A-Za-z .'/-]*$"
)


def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer (see module docstring); ``''`` for empty input."""
    s = str(answer).strip()
    if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
        s = s[2:-2]
    s = _TEXT_WRAPPER_RE.sub(r"\1", s)
    for token in _REMOVE:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators
    s = re.sub(r"^[A-Za-z]\w*\s*=\s*", "", s.strip())  # "x = 5" -> "5"
    s = s.strip().rstrip(".").strip()
    m = _NUMBER_THEN_WORDS_RE.match(s)  # "18 dollars" -> "18"
    if m:
        s = m.group(1)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    return s


_FLOAT_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")


def _to_float(s: str) -> float | None:
    return float(s) if _FLOAT_RE.match(s) else None


def _ratio(num: str, den: str) -> float | None:
    n, d = _to_float(num), _to_float(den)
    if n is None or d is None or d == 0:
        return None
    return n / d


def parse_number(answer: str) -> float | None:
    """The value of a normalized numeric answer, or None if it is not a number.

    Accepts ``12``, ``-7``, ``12.50``, ``1e3``, ``3/4``, ``\\frac{3}{4}``, ``-\\frac{3}{4}``,
    ``\\frac34``, mixed numbers ``2 1/2`` and ``2\\frac{1}{2}``.
    """
    s = normalize_answer(answer)
    if not s:
        return None
    m = re.match(r"^(-?)(\d+)\s*\\frac\{([^{}]+)\}\{([^{}]+)\}$", s) or re.match(
        r"^(-?)(\d+)\s+(\d+)\s*/\s*(\d+)$", s
    )
    if m:  # mixed number
        frac = _ratio(m.group(3).strip(), m.group(4).strip())
        if frac is None:
            return None
        value = float(m.group(2)) + frac
        return -value if m.group(1) else value
    compact = s.replace(" ", "")
    sign = 1.0
    if compact.startswith("-"):
        sign, compact = -1.0, compact[1:]
    m = re.match(r"^\\frac\{([^{}]+)\}\{([^{}]+)\}$", compact) or re.match(
        r"^\\frac(\d)(\d)$", compact
    )
    if m:
        value = _ratio(m.group(1), m.group(2))
        return None if value is None else sign * value
    m = re.match(r"^([^/]+)/([^/]+)$", compact)
    if m:
        value = _ratio(m.group(1), m.group(2))
        return None if value is None else sign * value
    value = _to_float(compact)
    return None if value is None else sign * value


def answers_match(
    predicted: str | None, reference: str | None, rel_tol: float = 1e-6, abs_tol: float = 1e-9
) -> bool:
    """True when two answers agree numerically (within tolerance) or as normalized strings."""
    if predicted is None or reference is None:
        return False
    p, r = parse_number(predicted), parse_number(reference)
    if p is not None and r is not None:
        return math.isclose(p, r, rel_tol=rel_tol, abs_tol=abs_tol)
    if (p is None) != (r is None):
        return False
    np_, nr = normalize_answer(predicted), normalize_answer(reference)
    if not np_ or not nr:
        return False
    return np_.replace(" ", "").lower() == nr.replace(" ", "").lower()


def parse_reference(answer: Any) -> str | None:
    """The reference final answer of a dataset ``answer`` value.

    ``\\boxed{...}`` or GSM8K ``#### N`` when present; else the whole value when it is a
    number or a short expression without spaces; else its last number; else None.
    """
    if answer is None:
        return None
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return repr(answer)
    text = str(answer).strip()
    if not text:
        return None
    for extract in (extract_boxed, extract_gsm8k_answer):
        found = extract(text)
        if found is not None:
            return found
    normalized = normalize_answer(text)
    if parse_number(text) is not None or (normalized and " " not in normalized):
        return text
    return extract_last_number(text) or text


def math_reward(
    prompts: list | None = None,
    completions: list | None = None,
    answer: list | None = None,
    strict: bool = False,
    **kwargs,
) -> list[float | None]:
    """1.0 when the completion's final answer matches the dataset ``answer``, else 0.0.

    ``strict``: the answer must be stated explicitly (:func:`extract_strict_answer`), no
    last-number fallback. ``None`` (not applicable) for rows whose reference answer is
    missing or empty.
    """
    if completions is None:
        raise ValueError("math_reward needs completions.")
    if answer is None:
        raise ValueError(
            "math_reward needs a dataset column 'answer' (the reference answer of each row); "
            f"the columns passed were: {sorted(kwargs)}."
        )
    rewards: list[float | None] = []
    for completion, ref_raw in zip(completions, answer, strict=True):
        reference = parse_reference(ref_raw)
        if reference is None:
            rewards.append(None)
            continue
        extract = extract_strict_answer if strict else extract_answer
        predicted = extract(completion_text(completion))
        rewards.append(1.0 if answers_match(predicted, reference) else 0.0)
    return rewards


def math_strict_reward(
    prompts: list | None = None,
    completions: list | None = None,
    answer: list | None = None,
    **kwargs,
) -> list[float | None]:
    """:func:`math_reward` with ``strict=True`` (the built-in ``math_strict``)."""
    return math_reward(prompts, completions, answer, strict=True, **kwargs)


def answer_format_reward(completions: list | None = None, **kwargs) -> list[float]:
    """1.0 when the completion states a final answer in a form the strict verifier reads
    (:func:`extract_strict_answer` finds one), right or wrong; else 0.0. The format
    companion of ``math_strict``: it rewards answering over rambling."""
    if completions is None:
        raise ValueError("answer_format_reward needs completions.")
    return [0.0 if extract_strict_answer(completion_text(c)) is None else 1.0 for c in completions]
