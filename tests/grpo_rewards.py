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


class AskTwiceEnv:
    """A two-turn environment the multi-turn GRPO tests load by import path
    (`grpo_rewards:AskTwiceEnv`): after the model's first turn it asks again with a fixed
    user turn; the second turn ends the trajectory, with an environment reward part
    ``second_turn_digits`` = the digit fraction of the second turn."""

    tool_schemas = ()

    def __init__(self, follow_up: str = "Say it again, with digits."):
        self.follow_up = follow_up
        self.turn = 0

    def reset(self, row):
        self.turn = 0
        prompt = row["prompt"]
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    def step(self, messages, completion):
        from jaxpt.rl.environments import StepResult

        self.turn += 1
        if self.turn == 1:
            return StepResult(messages=({"role": "user", "content": self.follow_up},))
        (digits,) = digit_fraction([completion])
        return StepResult(done=True, reward_parts={"second_turn_digits": digits})
