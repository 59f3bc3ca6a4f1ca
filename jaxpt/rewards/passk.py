"""Evaluation metrics over ``n`` samples per problem: unbiased pass@k and maj@k.

* pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): with ``c``
  correct among ``n`` samples, ``pass@k = 1 - C(n - c, k) / C(n, k)``, the probability that
  a random size-``k`` subset holds at least one correct sample. Computed stably as
  ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` (no large binomials), and exactly 1 when
  ``n - c < k``.
* maj@k: majority vote over the normalized final answers of the first ``k`` samples (answers
  that parse to the same number vote together; ``None`` answers do not vote; ties go to the
  answer seen first); the problem counts as solved when the voted answer matches the
  reference (:func:`jaxpt.rewards.math.answers_match`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from jaxpt.rewards.math import answers_match
from jaxpt.rewards.numbers import normalize_answer, parse_number

__all__ = [
    "pass_at_k",
    "pass_at_k_per_problem",
    "mean_pass_at_k",
    "majority_answer",
    "maj_at_k",
    "maj_at_k_per_problem",
    "mean_maj_at_k",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct out of ``n`` samples."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n; got c={c}, n={n}.")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n; got k={k}, n={n}.")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_per_problem(correct: Sequence[Sequence[bool]], k: int) -> np.ndarray:
    """pass@k for each problem from its per-sample correctness (any ``n >= k`` per problem)."""
    out = []
    for i, samples in enumerate(correct):
        flags = np.asarray(samples, bool)
        if flags.size < k:
            raise ValueError(f"problem {i} has {flags.size} samples; pass@{k} needs >= {k}.")
        out.append(pass_at_k(int(flags.size), int(flags.sum()), k))
    return np.asarray(out, np.float64)


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems."""
    return float(np.mean(pass_at_k_per_problem(correct, k)))


def _vote_key(answer: str) -> str:
    value = parse_number(answer)
    if value is not None:
        return f"num:{float(f'{value:.9g}')!r}"
    return "str:" + normalize_answer(answer).replace(" ", "").lower()


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer (grouped by value); ties go to the earliest; None if none."""
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for a in answers:
        if a is None:
            continue
        key = _vote_key(a)
        if not key.removeprefix("str:"):
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, a)
    if not counts:
        return None
    best = max(counts, key=lambda key: counts[key])  # max keeps the first of equal counts
    return first[best]


def maj_at_k(
    answers: Sequence[str | None],
    reference: str,
    k: int,
    match: Callable[[str | None, str], bool] = answers_match,
) -> float:
    """1.0 when the majority answer of the first ``k`` samples matches ``reference``."""
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj@k needs 1 <= k <= {len(answers)} samples; got k={k}.")
    return 1.0 if match(majority_answer(answers[:k]), reference) else 0.0


def maj_at_k_per_problem(
    answers: Sequence[Sequence[str | None]], references: Sequence[str], k: int
) -> np.ndarray:
    """maj@k for each problem."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answer lists for {len(references)} references.")
    return np.asarray(
        [maj_at_k(a, r, k) for a, r in zip(answers, references, strict=True)], np.float64
    )


def mean_maj_at_k(
    answers: Sequence[Sequence[str | None]], references: Sequence[str], k: int
) -> float:
    """maj@k averaged over problems."""
    return float(np.mean(maj_at_k_per_problem(answers, references, k)))
