"""How numbers are written in answers: the number pattern, LaTeX / Unicode cleaning, the
canonical string of an answer (:func:`normalize_answer`) and the exact value of a plain
number (:func:`parse_number`).

Plain numbers are integers, decimals, ``1,234``, ``$1,000,000``, fractions ``3/4`` /
``\\frac{3}{4}``, mixed numbers, scientific notation (``1.5e3``, ``3\\times10^{8}``), with
units, ``%``, degree marks and ``x =`` dropped; they are read as exact fractions. Used by
answer selection (:mod:`jaxpt.rewards.answers`) and comparison
(:func:`jaxpt.rewards.math.answers_match`).
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["normalize_answer", "parse_number"]

_NUM = r"\d+(?:\.\d+)?"
# a minus sign counts only when it does not follow a word or a closing bracket (16-3 is a
# subtraction, "= -6" is negative six)
_SIGN = r"(?:(?<![\w)\]}])-\s?)?"
# scientific notation: 1.5e3, 1.5E-3, 3\times10^{8}, 6.02 \cdot 10^23
_EXP = (
    r"(?:[eE][+-]?\d+(?![\w.])"
    r"|\s*(?:\\times|\\cdot|×)\s*10\s*\^\s*(?:\{\s*[+-]?\d+\s*\}|[+-]?\d+))?"
)
_NUMBER_RE = re.compile(
    _SIGN
    + r"(?:"
    + r"\\[dt]?frac\{\s*-?" + _NUM + r"\s*\}\{\s*-?" + _NUM + r"\s*\}"  # \frac{3}{4}
    + r"|(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?"  # 1,234,567.89
    + r"|" + _NUM + r"(?:\s*/\s*" + _NUM + r")?"  # 12, 12.5, 3/4
    + r"|\.\d+)" + _EXP  # .5
    + r")"
)  # fmt: skip


# ----------------------------------------------------------------------------- cleaning

_THOUSANDS_LATEX_RE = re.compile(r"(?<=\d)(?:\\,|\\!|\\ |\{,\}|\u2009|\u202f)(?=\d{3}(?!\d))")


def _clean_text(text: str) -> str:
    """Unicode minus -> ``-``; LaTeX / Unicode thousands separators joined or made commas."""
    text = text.replace("\u2212", "-")
    return _THOUSANDS_LATEX_RE.sub(lambda m: "," if m.group(0) == "{,}" else "", text)


_NUMBER_THEN_WORDS_RE = re.compile(
    r"^(-?(?:\\frac\{[^{}]*\}\{[^{}]*\}|\d[\d,]*(?:\.\d+)?(?:[eE][+-]?\d+)?"
    r"(?:\s*/\s*\d+(?:\.\d+)?)?|\.\d+))"
    r"\s*(?:\\?%\s*)?[A-Za-z][A-Za-z .'/-]*$"
)


# ----------------------------------------------------------------------------- normalizing

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
_SCI_LATEX_RE = re.compile(
    r"^([+-]?(?:\d+\.?\d*|\.\d+))\s*(?:\\times|\\cdot|×)\s*10\s*\^\s*\{?\s*([+-]?\d+)\s*\}?$"
)


def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer (see module docstring); ``''`` for empty input."""
    s = _clean_text(str(answer)).strip()
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
    m = _SCI_LATEX_RE.match(s)  # 3\times10^{8} -> 3e8
    if m:
        s = f"{m.group(1)}e{m.group(2)}"
    return s


_FLOAT_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")


def _to_fraction(s: str) -> Fraction | None:
    m = _FLOAT_RE.match(s)
    if not m:
        return None
    exponent = re.search(r"[eE]([+-]?\d+)$", s)
    if exponent and abs(int(exponent.group(1))) > 400:  # not a plain number: math-verify
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def _ratio(num: str, den: str) -> Fraction | None:
    n, d = _to_fraction(num), _to_fraction(den)
    if n is None or d is None or d == 0:
        return None
    return n / d


def _parse_normalized(s: str) -> Fraction | None:
    """The exact value of a normalized plain-number answer, or None."""
    if not s or len(s) > 100:
        return None
    m = re.match(r"^(-?)(\d+)\s*\\frac\{([^{}]+)\}\{([^{}]+)\}$", s) or re.match(
        r"^(-?)(\d+)\s+(\d+)\s*/\s*(\d+)$", s
    )
    if m:  # mixed number
        frac = _ratio(m.group(3).strip(), m.group(4).strip())
        if frac is None:
            return None
        value = int(m.group(2)) + frac
        return -value if m.group(1) else value
    compact = s.replace(" ", "")
    sign = 1
    if compact.startswith("-"):
        sign, compact = -1, compact[1:]
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
    value = _to_fraction(compact)
    return None if value is None else sign * value


def parse_number(answer: str) -> float | None:
    """The value of an answer that is a plain number, or None (then it is an expression).

    Accepts ``12``, ``-7``, ``12.50``, ``1,000``, ``$18``, ``1e3``, ``3\\times10^{8}``,
    ``3/4``, ``\\frac{3}{4}``, ``-\\frac{3}{4}``, ``\\frac34``, mixed numbers ``2 1/2`` and
    ``2\\frac{1}{2}``, with units, ``%`` and degree marks dropped.
    """
    value = _parse_normalized(normalize_answer(answer))
    return None if value is None else float(value)
