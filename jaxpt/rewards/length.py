"""Length shaping rewards on ``completion_ids`` (lists of token ids, one per completion).

* :func:`soft_overlong_punishment` (DAPO, Eq. 13; TRL's ``get_soft_overlong_punishment``),
  with ``L = max_completion_length``, ``C = overlong_buffer``, ``p = penalty_factor``::

      r(y) = 0                       if |y| <= L - C
             p * ((L - C) - |y|) / C  if L - C < |y| <= L      (linear from 0 down to -p)
             -p                      if |y| > L

  With ``C = 0`` only completions longer than ``L`` are punished (``-p``).

* :func:`length_penalty`: a linear penalty beyond a target length,
  ``-coef * max(0, |y| - target) / (L - target)``, clipped at ``-coef``.
"""

from __future__ import annotations

__all__ = [
    "soft_overlong_punishment",
    "OverlongReward",
    "length_penalty",
    "LengthPenaltyReward",
]


def _lengths(completion_ids) -> list[int]:
    if completion_ids is None:
        raise ValueError("length rewards need completion_ids (one list of token ids each).")
    return [len(ids) for ids in completion_ids]


def soft_overlong_punishment(
    completion_ids, max_completion_length: int, overlong_buffer: int, penalty_factor: float = 1.0
) -> list[float]:
    """DAPO soft overlong punishment of each completion (see module docstring)."""
    L, C = int(max_completion_length), int(overlong_buffer)
    if L <= 0 or C < 0 or C > L:
        raise ValueError(
            f"overlong reward needs 0 <= overlong_buffer ({C}) <= max_completion_length ({L}) "
            "and max_completion_length > 0."
        )
    out = []
    for n in _lengths(completion_ids):
        if n <= L - C:
            out.append(0.0)
        elif n <= L:
            out.append(penalty_factor * ((L - C) - n) / C)
        else:
            out.append(-float(penalty_factor))
    return out


class OverlongReward:
    """Reward-function form of :func:`soft_overlong_punishment` (picklable)."""

    __name__ = "overlong_reward"

    def __init__(
        self, max_completion_length: int, overlong_buffer: int, penalty_factor: float = 1.0
    ):
        soft_overlong_punishment([], max_completion_length, overlong_buffer)  # validate
        self.max_completion_length = max_completion_length
        self.overlong_buffer = overlong_buffer
        self.penalty_factor = penalty_factor

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs):
        return soft_overlong_punishment(
            completion_ids, self.max_completion_length, self.overlong_buffer, self.penalty_factor
        )


def length_penalty(
    completion_ids, max_completion_length: int, target_length: int = 0, coef: float = 1.0
) -> list[float]:
    """``-coef * clip((|y| - target) / (L - target), 0, 1)`` for each completion."""
    L, target = int(max_completion_length), int(target_length)
    if not 0 <= target < L:
        raise ValueError(
            f"length penalty needs 0 <= target_length ({target}) < max_completion_length ({L})."
        )
    return [-coef * min(max(n - target, 0) / (L - target), 1.0) for n in _lengths(completion_ids)]


class LengthPenaltyReward:
    """Reward-function form of :func:`length_penalty` (picklable)."""

    __name__ = "length_penalty"

    def __init__(self, max_completion_length: int, target_length: int = 0, coef: float = 1.0):
        length_penalty([], max_completion_length, target_length, coef)  # validate
        self.max_completion_length = max_completion_length
        self.target_length = target_length
        self.coef = coef

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs):
        return length_penalty(
            completion_ids, self.max_completion_length, self.target_length, self.coef
        )
