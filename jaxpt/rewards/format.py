"""Format rewards: 1.0 when a completion matches a regular expression, else 0.0."""

from __future__ import annotations

import re

from jaxpt.rewards.text import completion_text

__all__ = [
    "THINK_THEN_ANSWER_PATTERN",
    "THINK_ANSWER_TAGS_PATTERN",
    "FormatReward",
    "format_reward",
    "make_format_reward",
]

# One <think>...</think> block at the start (no nested/second <think>), then a non-empty
# answer with no further think tags.
THINK_THEN_ANSWER_PATTERN = (
    r"^\s*<think>(?:(?!<think>|</think>).)*</think>\s*(?:(?!<think>|</think>)\S)"
    r"(?:(?!<think>|</think>).)*$"
)
# DeepSeek-R1 style: <think>...</think> then <answer>...</answer> and nothing else.
THINK_ANSWER_TAGS_PATTERN = (
    r"^\s*<think>(?:(?!<think>|</think>).)*</think>\s*"
    r"<answer>(?:(?!<answer>|</answer>).)+</answer>\s*$"
)


class FormatReward:
    """Reward 1.0 when ``re.search(pattern, text, flags)`` matches the completion text.

    Use ``^...$`` anchors in the pattern to require a full match. The default flags are
    ``re.DOTALL`` so ``.`` spans lines. A class (not a closure) so it pickles.
    """

    def __init__(self, pattern: str = THINK_THEN_ANSWER_PATTERN, flags: int = re.DOTALL):
        try:
            self.regex = re.compile(pattern, flags)
        except re.error as e:
            raise ValueError(f"format reward pattern {pattern!r} is not a valid regex: {e}") from e
        self.pattern = pattern
        self.__name__ = "format_reward"

    def __call__(self, prompts=None, completions=None, **kwargs) -> list[float]:
        if completions is None:
            raise ValueError("format_reward needs completions.")
        return [1.0 if self.regex.search(completion_text(c)) else 0.0 for c in completions]

    def __repr__(self) -> str:
        return f"FormatReward(pattern={self.pattern!r})"


def make_format_reward(pattern: str = THINK_THEN_ANSWER_PATTERN, flags: int = re.DOTALL):
    """A format reward for ``pattern`` (see :class:`FormatReward`)."""
    return FormatReward(pattern, flags)


_DEFAULT = FormatReward()


def format_reward(prompts=None, completions=None, **kwargs) -> list[float]:
    """1.0 for ``<think>reasoning</think> answer`` completions (default pattern), else 0.0."""
    return _DEFAULT(prompts=prompts, completions=completions, **kwargs)
