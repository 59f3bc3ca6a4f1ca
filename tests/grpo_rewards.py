"""Reward functions the GRPO tests load by import path (`grpo_rewards:digit_fraction`)."""


def digit_fraction(completions, **kwargs):
    """Fraction of non-space characters that are digits: a dense reward a tiny random
    policy can learn to raise."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else "".join(m["content"] for m in c)
        chars = [ch for ch in text if not ch.isspace()]
        out.append(sum(ch.isdigit() for ch in chars) / max(len(chars), 1))
    return out


def constant(completions, **kwargs):
    """The same reward for every completion: no group carries a learning signal."""
    return [0.5] * len(completions)
