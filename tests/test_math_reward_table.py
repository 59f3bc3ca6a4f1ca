"""The math rewards on a labelled table: (reward, completion, reference, expected, why).

``math`` is the lenient reward (last-number fallback), ``strict`` is ``math_strict``. A
wrong answer must never score 1. The mutation test at the end swaps the answer-selection
rule for a plausible wrong one and checks that the table notices.
"""

# ruff: noqa: E501  (one labelled case per line)
from __future__ import annotations

import pytest

import jaxpt.rewards.math as math_mod
from jaxpt.rewards.answers import extract_last_number
from jaxpt.rewards.choice import choice_reward
from jaxpt.rewards.math import math_reward, math_strict_reward

GSM8K_REF = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)

M, S = "math", "strict"
# fmt: off
CASES = [
    # --- GSM8K: '#### N', plain numbers, the fast path -------------------------------------
    (M, "48 / 2 = 24 in May, 48 + 24 = 72 in all.\n#### 72", GSM8K_REF, 1.0, "GSM8K marker vs a full GSM8K reference"),
    (M, "\\boxed{72}", GSM8K_REF, 1.0, "reference reduced to its '#### N', not its last number"),
    (M, "So 48 + 24 = 72 clips, wait, 73.\n#### 73", GSM8K_REF, 0.0, "wrong GSM8K answer"),
    (S, "The answer is 13 + 6", "19", 0.0, "the question restated is not its answer (the demo's policy learned this hack)"),
    (M, "\\boxed{6 \\times 3}", "18", 0.0, "an unevaluated product against a plain-number reference"),
    (M, "\\boxed{(4+5)*2}", "18", 0.0, "an unevaluated expression, parenthesized"),
    (S, "The answer is 1/3 + 1/6.", "0.5", 0.0, "a sum of fractions left undone"),
    (M, "\\boxed{2^{10}}", "1024", 1.0, "a power is a closed form, still checked by math-verify"),
    (M, GSM8K_REF, "72", 1.0, "the reference solution itself"),
    (M, "#### 1,000,000", "1000000", 1.0, "thousands commas after ####"),
    (M, "The total is $1,000,000.", "1000000", 1.0, "dollar sign and thousands commas, last number"),
    (M, "He pays \\$1,080 in all.", "1080", 1.0, "escaped dollar"),
    (M, "\\boxed{1\\,000}", "1000", 1.0, "LaTeX thin-space thousands separator"),
    (M, "\\boxed{1{,}000}", "1000", 1.0, "LaTeX {,} thousands separator"),
    (M, "\\boxed{72.00}", "72", 1.0, "trailing zeros"),
    (M, "#### 17", "18", 0.0, "off by one"),
    (M, "She has 5 apples and eats 2, so 3 remain. The answer is 3.", "3", 1.0, "stated answer"),
    (M, "The answer is 12. Then 13 more tries to check it.", "12", 1.0, "a stated answer beats a trailing number"),
    (M, "The answer is 12. Then 13 more tries to check it.", "13", 0.0, "the trailing number is not the answer"),
    (S, "The answer is 12. Then 13 more tries to check it.", "12", 1.0, "strict reads the statement too"),
    (M, "The answer is 12.", "13", 0.0, "wrong stated answer"),
    (M, "The answer is 5. Wait, I made a mistake: the answer is 6.", "6", 1.0, "the last statement wins"),
    (M, "The answer is 5. Wait, I made a mistake: the answer is 6.", "5", 0.0, "a corrected statement is not the answer"),
    (M, "**Answer:** 42", "42", 1.0, "markdown answer label"),
    (M, "Final answer: 42 cookies", "42", 1.0, "final answer label with a unit"),
    (M, "The answer is that she has 5 left.", "5", 1.0, "prose holding one number"),
    (M, "The answer is not 5.", "5", 0.0, "a negated statement"),
    (M, "The answer is the number of eggs she sells. She sells 9 eggs.", "9", 1.0, "a prose statement without a number is skipped"),
    (M, "The answer is 5 or 6.", "5", 0.0, "a hedge of two answers"),
    (M, "The answer is 7, not 6.", "6", 0.0, "the clause after the comma is not the answer"),
    (S, "The answer is 7, not 6.", "7", 1.0, "the answer before the clause"),
    (M, "1. 2 coins: 2\n2. 3 coins: 1 1/3\n5. 6", "6", 1.0, "lenient: the last number"),
    (S, "1. 2 coins: 2\n2. 3 coins: 1 1/3\n5. 6", "6", 0.0, "strict: rambling ending on a number"),
    (M, "16-3-4=9", "9", 1.0, "subtraction chain, last number"),
    (S, "9 - 3 = 6", "6", 0.0, "strict: an equation is not a statement"),
    (S, "Fatima has 6 coins.", "6", 0.0, "strict: a number in prose"),
    (S, "6", "6", 1.0, "strict: a lone number"),
    (S, " **6**.\n", "6", 1.0, "strict: a lone bold number"),
    (S, "6 coins", "6", 1.0, "strict: a lone number with a unit"),
    (S, "9 - 3 = 6\n#### 6", "6", 1.0, "strict: GSM8K marker"),
    (S, "The final answer is 9 - 3 = 6", "6", 1.0, "strict: the part after '='"),
    (M, "", "5", 0.0, "empty completion"),
    (M, "I don't know.", "5", 0.0, "no answer at all"),
    (M, "\\boxed{}", "0", 0.0, "empty box"),
    (M, "\\boxed{5} or maybe \\boxed{6}", "5", 0.0, "the last box counts"),
    (M, "\\boxed{5} is wrong, the answer is 6", "6", 0.0, "a box beats a statement"),
    (M, "The answer is 007.", "7", 1.0, "leading zeros"),
    (M, "#### 3500001", "3,500,000", 0.0, "large integers compare exactly, no relative tolerance"),
    (M, "\\boxed{1234567.5}", "1234568", 0.0, "a rounded decimal is not the answer"),
    (M, "\\boxed{0.3333333}", "\\frac{1}{3}", 1.0, "a decimal approximation of a repeating fraction"),
    (M, "The answer is 1.5 hours, and then we rest for 2 more.", "1.5", 1.0, "number then words, then a clause"),
    # --- the wrong-answer examples ---------------------------------------------------
    (M, "\\boxed{10}", "x^2 + 7x + 10", 0.0, "the reference is one expression, not its last number"),
    (M, "\\boxed{x^2+7x+10}", "x^2 + 7x + 10", 1.0, "same polynomial"),
    (M, "\\boxed{(x+2)(x+5)}", "x^2 + 7x + 10", 1.0, "factored polynomial"),
    (M, "\\boxed{(1, 2)}", "(1, 2)", 1.0, "same tuple"),
    (M, "\\boxed{2}", "(1, 2)", 0.0, "one coordinate of a tuple"),
    (M, "The answer is 1.5e3", "1500", 1.0, "scientific notation stated"),
    (M, "The answer is 1.5e3", "3", 0.0, "the exponent is not the answer"),
    (S, "The answer is \\(\\frac{5}{2}\\).", "2.5", 1.0, "strict: inline LaTeX fraction"),
    (S, "The answer is $\\frac{5}{2}$.", "2.5", 1.0, "strict: dollar-math fraction"),
    # --- MATH-style LaTeX ---------------------------------------------------------------------
    (M, "\\boxed{\\dfrac{1}{8}}", "\\frac18", 1.0, "dfrac vs compact frac"),
    (M, "\\boxed{\\frac{3}{4}}", "0.75", 1.0, "fraction vs decimal"),
    (M, "\\boxed{0.75}", "\\frac{3}{4}", 1.0, "decimal vs fraction"),
    (M, "\\boxed{\\frac{1}{2}}", "\\frac{1}{3}", 0.0, "different fractions"),
    (M, "\\boxed{-\\frac{3}{4}}", "-0.75", 1.0, "negative fraction"),
    (M, "\\boxed{\\frac{\\sqrt2}{2}}", "\\frac{1}{\\sqrt2}", 1.0, "rationalized radical"),
    (M, "\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0.0, "different radicals"),
    (M, "\\boxed{2\\sqrt{3}}", "\\sqrt{12}", 1.0, "simplified radical"),
    (M, "\\boxed{(x+1)^2}", "x^2+2x+1", 1.0, "expanded square"),
    (M, "\\boxed{(x+1)^2}", "x^2+x+1", 0.0, "wrong expansion"),
    (M, "\\boxed{2\\pi}", "2\\pi", 1.0, "same symbolic constant"),
    (M, "\\boxed{\\frac{\\pi}{2}}", "\\pi/2", 1.0, "pi over two, two spellings"),
    (M, "\\boxed{\\pi}", "3.14", 0.0, "pi is not 3.14"),
    (M, "\\boxed{x=5}", "5", 1.0, "an assignment vs its value"),
    (M, "\\boxed{y = 2x + 3}", "2x+3", 1.0, "an equation vs its right side"),
    (M, "\\boxed{\\infty}", "\\infty", 1.0, "infinity"),
    (M, "\\boxed{\\{1, 2, 3\\}}", "\\{3,2,1\\}", 1.0, "sets ignore order"),
    (M, "\\boxed{2^{10}}", "1024", 1.0, "a power vs its value"),
    (M, "\\boxed{\\binom{5}{2}}", "10", 1.0, "a binomial vs its value"),
    (M, "\\boxed{10^\\circ}", "10", 1.0, "degrees"),
    (M, "nested \\boxed{\\frac{\\sqrt{4}}{2}} ignored, final \\boxed{2\\frac{1}{2}}", "2.5", 1.0, "mixed number in the last box"),
    (M, "So $x = \\frac{\\sqrt{2}}{2}$ and we are done.", "\\frac{\\sqrt2}{2}", 0.0, "lenient without a box or statement reads only numbers"),
    (M, "The answer is $\\sqrt{2}$.", "\\sqrt{2}", 1.0, "stated LaTeX answer"),
    (M, "$\\frac{1}{2}$", "0.5", 1.0, "a completion that is one math span"),
    (M, "\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 1.0, "vectors"),
    # --- units and percentages ---------------------------------------------------------------
    (M, "It is \\boxed{\\text{18 dollars}}.", "18", 1.0, "text-wrapped units"),
    (M, "He ran \\boxed{540 \\text{ meters}}", "540", 1.0, "LaTeX unit"),
    (M, "The answer is 12.5 cm.", "12.5", 1.0, "unit after a stated decimal"),
    (M, "\\boxed{5\\text{ cm}^2}", "5", 1.0, "squared unit"),
    (M, "The answer is 3 hours.", "180", 0.0, "units are not converted"),
    (M, "The answer is 3 hours.", "3", 1.0, "unit dropped"),
    (M, "\\boxed{25\\%}", "25", 1.0, "percent vs bare number"),
    (M, "The speed went up by 25%", "25", 1.0, "percent sign in prose"),
    (M, "The answer is 25%", "25\\%", 1.0, "percent vs LaTeX percent"),
    (M, "\\boxed{0.25}", "25\\%", 1.0, "a fraction vs its percent"),
    (M, "\\boxed{30\\%}", "25", 0.0, "wrong percent"),
    (M, "\\boxed{0.3}", "25\\%", 0.0, "wrong fraction of a percent"),
    # --- negative numbers and the Unicode minus ------------------------------------------------
    (M, "The temperature is -6 degrees.", "-6", 1.0, "negative number with unit"),
    (M, "The result is 10 = -6 + 16, so \\boxed{-6}", "-6", 1.0, "boxed negative"),
    (M, "The answer is \u22125.", "-5", 1.0, "Unicode minus stated"),
    (M, "\\boxed{\u22125}", "-5", 1.0, "Unicode minus boxed"),
    (M, "\\boxed{\u22125}", "5", 0.0, "Unicode minus is a sign"),
    (M, "The answer is -5", "5", 0.0, "sign matters"),
    (M, "The difference is 16-3", "-3", 0.0, "a subtraction is not a negative number"),
    (M, "\\boxed{-3}", "\u22123", 1.0, "Unicode minus in the reference"),
    # --- scientific notation -------------------------------------------------------------------
    (M, "\\boxed{3\\times10^{8}}", "300000000", 1.0, "LaTeX power of ten"),
    (M, "The speed of light is about 3 \\times 10^8 m/s.", "3\\times10^{8}", 1.0, "power of ten in prose, last number"),
    (M, "\\boxed{6.02 \\times 10^{23}}", "6.02e23", 1.0, "LaTeX vs e-notation"),
    (M, "\\boxed{1e-3}", "0.001", 1.0, "negative exponent"),
    (M, "The answer is 2.5E+2", "250", 1.0, "capital E"),
    (M, "\\boxed{1.5e3}", "1.5", 0.0, "the mantissa is not the answer"),
    (M, "\\boxed{3\\times10^{7}}", "300000000", 0.0, "wrong power of ten"),
    # --- tuples and intervals ------------------------------------------------------------------
    (M, "\\boxed{(1,2)}", "(1, 2)", 1.0, "tuple spacing"),
    (M, "\\boxed{(2, 1)}", "(1, 2)", 0.0, "tuple order"),
    (M, "\\boxed{(3, -4)}", "(3,-4)", 1.0, "tuple with a negative"),
    (M, "\\boxed{[1, 2)}", "[1,2)", 1.0, "half-open interval"),
    (M, "\\boxed{(1, 2]}", "[1, 2)", 0.0, "interval ends"),
    (M, "\\boxed{(-\\infty, 3]}", "(-\\infty,3]", 1.0, "unbounded interval"),
    (M, "The solution is \\boxed{x \\in [0, 1]}", "[0,1]", 1.0, "membership vs interval"),
    (M, "The answer is (1, 2).", "(1, 2)", 1.0, "stated tuple keeps its comma"),
    (S, "The answer is (1, 2), as shown.", "(1, 2)", 1.0, "strict: stated tuple then a clause"),
    # --- answers that must be rejected ---------------------------------------------------------
    (M, "\\boxed{5, 6}", "5", 0.0, "a set of answers is not one answer"),
    (M, "The answer is x.", "5", 0.0, "a variable is not a number"),
    (M, "\\boxed{\\text{(B)}}", "5", 0.0, "a choice letter is not a number"),
    (M, "\\boxed{9^{9^{9}}}", "1", 0.0, "a huge power is not 1 (and is not computed)"),
    (S, "Let me think step by step about this problem with 12 eggs.", "12", 0.0, "strict: no statement"),
    (M, "The answer is", "5", 0.0, "an empty statement, no number"),
]
# fmt: on

REWARDS = {M: math_reward, S: math_strict_reward}


def _score(case) -> float | None:
    mode, completion, reference, _, _ = case
    return REWARDS[mode](completions=[completion], answer=[reference])[0]


def test_table_is_big_and_labelled():
    assert len(CASES) >= 100
    assert all(len(c) == 5 and c[4] and c[3] in (0.0, 1.0) for c in CASES)
    assert sum(c[3] == 0.0 for c in CASES) >= 30  # plenty of answers that must be rejected


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c[4]}" for i, c in enumerate(CASES)])
def test_math_reward_table(case):
    mode, completion, reference, expected, why = case
    assert _score(case) == expected, f"{why}: {mode} {completion!r} vs {reference!r}"


def _last_number_first(text: str, strict: bool = False) -> str | None:
    """A plausible wrong rule: the last number in the text wins over any box or statement."""
    last = extract_last_number(text)
    return last if last is not None else _REAL_SELECT(text, strict)


def _strict_ignored(text: str, strict: bool = False) -> str | None:
    """Another wrong rule: both modes fall back to the last number."""
    return _REAL_SELECT(text, False)


_REAL_SELECT = math_mod.select_answer


@pytest.mark.parametrize("mutant", [_last_number_first, _strict_ignored])
def test_table_catches_a_mutated_answer_selection_rule(monkeypatch, mutant):
    """The rewards look the rule up as ``jaxpt.rewards.math.select_answer``: replacing it
    with a wrong rule makes table cases fail, so the table tests the rule."""
    monkeypatch.setattr(math_mod, "select_answer", mutant)
    failures = [c for c in CASES if _score(c) != c[3]]
    assert len(failures) >= 3, [c[4] for c in failures]


def test_choice_reward():
    completions = [
        "\\boxed{\\text{(B)}}",
        "The answer is (B).",
        "The correct answer is B: 42 apples",
        "B) 42",
        "(b)",
        "B",
        "**Answer:** C",
        "A store sells 5 apples, so it is B",  # no statement: not read
        "(A) 1 (B) 2 (C) 3",  # lists the options, states none of B
        "The answer is Bob's idea.",  # a name, not a choice
        "",
    ]
    refs = ["B", "(B)", "\\text{(B)}", "B)", "B", "(b)", "C", "B", "B", "B", "B"]
    assert choice_reward(completions=completions, answer=refs) == [
        1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0,
    ]  # fmt: skip
    assert choice_reward(completions=["(B)", "(B)"], answer=["42", None]) == [None, None]
