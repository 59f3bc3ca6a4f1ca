"""Verifiable math rewards: select the final answer, then compare it with the reference.

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

**Comparison** (:func:`answers_match`):

* fast path, when both answers are plain numbers (:func:`parse_number`: integers, decimals,
  ``1,234``, ``$1,000,000``, fractions ``3/4`` / ``\\frac{3}{4}``, mixed numbers, scientific
  notation, with units, ``%``, degree marks and ``x =`` dropped), read as exact fractions:
  equal when exactly equal (``3500001`` is not ``3500000``, ``1e-10`` is not ``0``), or,
  when one side has no finite decimal expansion (``1/3``), within ``rel_tol=1e-6`` /
  ``abs_tol=1e-9`` (``0.333333`` = ``1/3``); a side written with ``%`` also matches its
  value / 100 (``25%`` = ``0.25``, as math-verify). This is most of the volume (GSM8K) and costs
  microseconds; no sympy is involved;
* otherwise, equal normalized strings, else ``math-verify`` (:mod:`jaxpt.rewards.verify`)
  with a per-call time limit (``timeout_s``; a timeout scores 0): symbolic and numeric
  equivalence, tuples, intervals, sets, equations.

Where jaxpt deliberately differs from math-verify:

* thousands separators: ``1,000``, ``$1,000,000``, ``1\\,000`` and ``1{,}000`` are one
  number everywhere, in prose too (math-verify reads them in LaTeX but not reliably in plain
  text, and extracts from a whole completion by its own priorities);
* scientific notation ``1.5e3`` is 1500 (math-verify reads ``e`` as Euler's number);
* which text is the answer is the rule above, not math-verify's extraction, and the
  reference is one expression, so both modes and :mod:`jaxpt.evaluate` agree on it;
* units are dropped after a number (``18 dollars``, ``5 cm``) but never converted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from jaxpt.rewards.text import completion_text, score_against_answers
from jaxpt.rewards.verify import DEFAULT_TIMEOUT_S, symbolic_equal

__all__ = [
    "select_answer",
    "extract_boxed",
    "extract_gsm8k_answer",
    "extract_stated_span",
    "extract_last_number",
    "extract_answer",
    "extract_strict_answer",
    "normalize_answer",
    "parse_number",
    "answers_match",
    "parse_reference",
    "MathReward",
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


_NUMBER_THEN_WORDS_RE = re.compile(
    r"^(-?(?:\\frac\{[^{}]*\}\{[^{}]*\}|\d[\d,]*(?:\.\d+)?(?:[eE][+-]?\d+)?"
    r"(?:\s*/\s*\d+(?:\.\d+)?)?|\.\d+))"
    r"\s*(?:\\?%\s*)?[A-Za-z][A-Za-z .'/-]*$"
)


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


def _has_percent(answer: str) -> bool:
    return "%" in answer


def _terminates(x: Fraction) -> bool:
    """True when ``x`` has a finite decimal expansion (its denominator is 2^a 5^b)."""
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _numbers_equal(p: Fraction, r: Fraction, rel_tol: float, abs_tol: float) -> bool:
    if p == r:
        return True
    if _terminates(p) and _terminates(r):  # both exact decimals (GSM8K): no tolerance
        return False
    # 0.333333 vs 1/3, as math.isclose but in exact arithmetic (no float overflow)
    return abs(p - r) <= max(Fraction(rel_tol) * max(abs(p), abs(r)), Fraction(abs_tol))


_ARITH_OPS = (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("×", "*"), ("÷", "/"))


def _is_unevaluated_arithmetic(answer: str) -> bool:
    """True for numbers joined by + - * / (``13 + 6``, ``6 \\times 3``, ``(4+5)*2``).

    Against a plain-number reference such an answer restates the computation instead of
    doing it, and crediting it is a reward hack a policy finds within a few steps: the
    arithmetic demo's policy learned to reply "The answer is 13 + 6" to "Calculate
    13 + 6." (held-out accuracy 1.0, every answer the question echoed). math-verify, and so
    TRL's accuracy_reward, evaluates the sum and credits it; jaxpt scores it 0. Powers
    (``2^{10}``) and symbols (``\\sqrt{2}``) still go to math-verify."""
    s = answer
    for latex, op in _ARITH_OPS:
        s = s.replace(latex, op)
    s = s.replace("{", "(").replace("}", ")")
    if not re.fullmatch(r"[\d\s.()+\-*/]+", s):
        return False
    return re.search(r"[\d)]\s*[+\-*/]\s*[\d(+\-]", s) is not None


def answers_match(
    predicted: str | None,
    reference: str | None,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> bool:
    """True when two extracted answers are equal: numerically (fast path) when both are
    plain numbers, else by equal normalized strings or math-verify (module docstring)."""
    if predicted is None or reference is None:
        return False
    predicted, reference = _clean_text(str(predicted)), _clean_text(str(reference))
    np_, nr = normalize_answer(predicted), normalize_answer(reference)
    if not np_ or not nr:
        return False
    p, r = _parse_normalized(np_), _parse_normalized(nr)
    if p is not None and r is not None:
        close = lambda a, b: _numbers_equal(a, b, rel_tol, abs_tol)
        return (
            close(p, r)
            or (_has_percent(predicted) and close(p / 100, r))
            or (_has_percent(reference) and close(p, r / 100))
        )
    if np_.replace(" ", "").lower() == nr.replace(" ", "").lower():
        return True
    if r is not None and _is_unevaluated_arithmetic(np_):
        return False
    return symbolic_equal(predicted, reference, timeout_s=timeout_s)


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


# ----------------------------------------------------------------------------- rewards


def _import_equivalence(spec: str | Callable) -> Callable[[str, str], bool]:
    if callable(spec):
        return spec
    from jaxpt.rewards.registry import import_object  # the registry imports this module

    fn = import_object(spec, what="math equivalence")
    if not callable(fn):
        raise ValueError(f"math equivalence {spec!r} resolved to a non-callable.")
    return fn


class MathReward:
    """The ``math`` reward with options: 1.0 when the completion's final answer
    (:func:`select_answer`) equals the dataset ``answer``, else 0.0; None (not applicable)
    where the reference is missing or empty.

    Args:
        strict: credit only a stated answer (``math_strict``; no last-number fallback).
        equivalence: your own test ``fn(predicted: str, reference: str) -> bool``, a
            callable or an import path ``"package.module:function"``. It receives the
            extracted answer and the parsed reference (strings) and replaces
            :func:`answers_match`; call ``answers_match`` inside it to keep the built-in
            checks. It is not called when the completion has no answer (0.0).
        timeout_s: time limit of each math-verify call (None: no limit).
        name: the name in metrics (``rewards/<name>/mean``); default ``math_reward``,
            ``math_strict_reward``, or ``math_<equivalence function name>``.
    """

    required_columns = ("answer",)

    def __init__(
        self,
        strict: bool = False,
        equivalence: str | Callable[[str, str], bool] | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        name: str | None = None,
    ):
        self.strict = bool(strict)
        self.equivalence = None if equivalence is None else _import_equivalence(equivalence)
        self.timeout_s = timeout_s
        if name is None:
            if self.equivalence is not None:
                fn_name = getattr(self.equivalence, "__name__", type(self.equivalence).__name__)
                name = f"math_{fn_name}"
            else:
                name = "math_strict_reward" if self.strict else "math_reward"
        self.__name__ = name

    def match(self, predicted: str | None, reference: str) -> bool:
        if predicted is None:
            return False
        if self.equivalence is not None:
            return bool(self.equivalence(predicted, reference))
        return answers_match(predicted, reference, timeout_s=self.timeout_s)

    def __call__(
        self,
        prompts: list | None = None,
        completions: list | None = None,
        answer: list | None = None,
        **kwargs,
    ) -> list[float | None]:
        return score_against_answers(
            self.__name__, completions, answer, kwargs, parse_reference,
            lambda text, ref: 1.0 if self.match(select_answer(text, self.strict), ref) else 0.0,
        )

    def __repr__(self) -> str:
        return (
            f"MathReward(strict={self.strict}, equivalence={self.equivalence!r}, "
            f"timeout_s={self.timeout_s})"
        )


_MATH = MathReward()
_MATH_STRICT = MathReward(strict=True)


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
    missing or empty. See :class:`MathReward` for the options.
    """
    fn = _MATH_STRICT if strict else _MATH
    return fn(prompts, completions, answer, **kwargs)


def math_strict_reward(
    prompts: list | None = None,
    completions: list | None = None,
    answer: list | None = None,
    **kwargs,
) -> list[float | None]:
    """:func:`math_reward` with ``strict=True`` (the built-in ``math_strict``)."""
    return _MATH_STRICT(prompts, completions, answer, **kwargs)


math_reward.required_columns = math_strict_reward.required_columns = ("answer",)


def answer_format_reward(completions: list | None = None, **kwargs) -> list[float]:
    """1.0 when the completion states a final answer in a form the strict verifier reads
    (:func:`extract_strict_answer` finds one), right or wrong; else 0.0. The format
    companion of ``math_strict``: it rewards answering over rambling."""
    if completions is None:
        raise ValueError("answer_format_reward needs completions.")
    return [0.0 if extract_strict_answer(completion_text(c)) is None else 1.0 for c in completions]
