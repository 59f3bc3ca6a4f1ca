"""Multiple-choice reward (``choice``): the letter the completion states vs the ``answer`` column.

A choice is a letter ``A``-``Z`` written ``B``, ``(B)``, ``B)``, ``B.``, ``B:``, ``**B**``,
``\\text{(B)}`` / ``\\textbf{B}`` or ``$B$`` (lower case only in parentheses: ``(b)``; a
bare ``a`` is an article). The reference may be written any of these ways.

Which text is the answer follows the math rule (:func:`jaxpt.rewards.answers.select_answer`)
in its strict form: the last ``\\boxed{}``, else the last ``answer is`` / ``Answer:`` /
``####`` statement, else the whole completion when it is a lone letter or begins with a
punctuated choice (``(B) 42``, ``B) 42``; not ``A store ...``).
There is no last-letter fallback: a model that lists the options ``(A) ... (D)`` would
otherwise be credited with ``D``.
"""

from __future__ import annotations

import re
from typing import Any

from jaxpt.rewards.answers import extract_boxed, extract_stated_span
from jaxpt.rewards.text import score_against_answers

__all__ = ["parse_choice", "extract_choice", "ChoiceReward", "choice_reward"]

_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
# "(B)" / "(b)" anywhere at the start; "B", "B)", "B.", "B:" only as a capital followed by
# the end or a non-word character
_CHOICE_RE = re.compile(r"^(?:\(([A-Za-z])\)|([A-Z])(?:[).:,]|\s|$))")


_BARE_RE = re.compile(r"^(?:\([A-Za-z]\)|[A-Z][).:])")


def _unwrap(s: str) -> str:
    s = s.strip()
    for _ in range(3):  # \text{\textbf{(B)}}, $\text{B}$, **B**
        s = _WRAPPER_RE.sub(r"\1", s).strip().strip("*$").strip()
    return s


def parse_choice(text: Any) -> str | None:
    """The choice letter (upper case) that ``text`` begins with, or None."""
    if text is None:
        return None
    m = _CHOICE_RE.match(_unwrap(str(text)))
    if not m:
        return None
    return (m.group(1) or m.group(2)).upper()


def extract_choice(text: str) -> str | None:
    """The choice a completion states (module docstring), or None."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return parse_choice(boxed)
    span = extract_stated_span(text)
    if span is not None:
        return parse_choice(span)
    s = _unwrap(text)
    if _BARE_RE.match(s) or re.fullmatch(r"[A-Z]\.?", s):  # not "A store sells ..."
        return parse_choice(s)
    return None


class ChoiceReward:
    """1.0 when the stated choice equals the ``answer`` column's letter, else 0.0; None
    where the reference is missing or is not a choice letter."""

    __name__ = "choice_reward"
    required_columns = ("answer",)

    def __call__(
        self, prompts=None, completions=None, answer=None, **kwargs
    ) -> list[float | None]:
        return score_against_answers(
            self.__name__, completions, answer, kwargs, parse_choice,
            lambda text, ref: 1.0 if extract_choice(text) == ref else 0.0,
            what="the letter of the right option",
        )


choice_reward = ChoiceReward()
