"""Verifiable math rewards: select the final answer, then compare it with the reference.

Which text is the answer, and the reference of a row, are :mod:`jaxpt.rewards.answers`
(:func:`select_answer`, :func:`parse_reference`); how plain numbers are read is
:mod:`jaxpt.rewards.numbers`.

**Comparison** (:func:`answers_match`):

* fast path, when both answers are plain numbers
  (:func:`~jaxpt.rewards.numbers.parse_number`: integers, decimals, ``1,234``,
  ``$1,000,000``, fractions ``3/4`` / ``\\frac{3}{4}``, mixed numbers, scientific notation,
  with units, ``%``, degree marks and ``x =`` dropped), read as exact fractions: equal when
  exactly equal (``3500001`` is not ``3500000``, ``1e-10`` is not ``0``), or, when one side
  has no finite decimal expansion (``1/3``), within ``rel_tol=1e-6`` / ``abs_tol=1e-9``
  (``0.333333`` = ``1/3``); a side written with ``%`` also matches its value / 100
  (``25%`` = ``0.25``, as math-verify). This is most of the volume (GSM8K) and costs
  microseconds; no sympy is involved;
* otherwise, equal normalized strings, else ``math-verify`` (:mod:`jaxpt.rewards.verify`)
  with a per-call time limit (``timeout_s``; a timeout scores 0): symbolic and numeric
  equivalence, tuples, intervals, sets, equations.

Where jaxpt deliberately differs from math-verify:

* thousands separators: ``1,000``, ``$1,000,000``, ``1\\,000`` and ``1{,}000`` are one
  number everywhere, in prose too (math-verify reads them in LaTeX but not reliably in plain
  text, and extracts from a whole completion by its own priorities);
* scientific notation ``1.5e3`` is 1500 (math-verify reads ``e`` as Euler's number);
* which text is the answer is the rule of :mod:`jaxpt.rewards.answers`, not math-verify's
  extraction, and the reference is one expression, so both modes and :mod:`jaxpt.evaluate`
  agree on it;
* units are dropped after a number (``18 dollars``, ``5 cm``) but never converted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

from jaxpt.rewards.answers import extract_strict_answer, parse_reference, select_answer
from jaxpt.rewards.numbers import _clean_text, _parse_normalized, normalize_answer
from jaxpt.rewards.text import completion_text, score_against_answers
from jaxpt.rewards.verify import DEFAULT_TIMEOUT_S, symbolic_equal

__all__ = [
    "answers_match",
    "MathReward",
    "math_reward",
    "math_strict_reward",
    "answer_format_reward",
]


# ----------------------------------------------------------------------------- comparison


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
