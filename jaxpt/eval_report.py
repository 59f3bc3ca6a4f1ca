"""What an evaluation reports: verified samples, pass@1 / pass@k / maj@k over them, and the
completions file and metrics table that ``jaxpt eval`` writes.

Axis legend: N prompts, K samples per prompt.

Metrics (:func:`summarize`), over prompts (each prompt weighs the same):

- ``pass@1``: mean over prompts of ``c_i / K`` (``c_i`` correct of K samples). With one
  greedy sample this is plain accuracy; with K samples it is the unbiased estimate of the
  one-sample success rate.
- ``pass@k`` for k in ``ks`` (default 1, 2, 4, ... up to K, and K): the unbiased estimator
  of Chen et al. (2021), ``1 - C(K - c, k) / C(K, k)`` (:func:`jaxpt.rewards.passk.pass_at_k`).
- ``maj@K`` (math verifier only): the majority final answer of the K samples
  (:func:`jaxpt.rewards.passk.majority_answer`) matches the reference
  (``jaxpt.rewards.answers.parse_reference`` of the ``answer`` column).
- ``answer_rate``: completions with an extractable final answer; ``mean_tokens``;
  ``clipped_ratio``: completions that hit ``max_new_tokens`` without a stop token.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxpt.data.pipeline import PromptExample
from jaxpt.rewards.math import answers_match
from jaxpt.rewards.passk import majority_answer, mean_pass_at_k


class EvalError(ValueError):
    """Bad evaluation inputs; the message names the file, row or argument."""


@dataclasses.dataclass(frozen=True)
class EvalSample:
    """One verified completion of ``prompts[index]``."""

    index: int  # position of the prompt in the evaluated list
    row: int  # the prompt's 1-based row in its source file
    sample: int  # sample number for this prompt (0-based)
    text: str  # decoded without the stop token, special tokens skipped
    token_ids: tuple[int, ...]  # new tokens, including the stop token if any
    answer: str | None  # final answer extracted from the text (math extractor)
    reward: float  # verifier value (NaN when the verifier returned None)
    correct: bool  # reward >= threshold
    finish_reason: str  # "stop" | "length"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass
class EvalResult:
    """``samples[i]`` holds the samples of ``prompts[i]`` (prompt order, not batch order)."""

    samples: list[list[EvalSample]]
    references: list[str | None]  # parsed reference answer of each prompt (None: none)
    metrics: dict[str, float]

    @property
    def num_prompts(self) -> int:
        return len(self.samples)

    def correct(self) -> list[list[bool]]:
        return [[s.correct for s in row] for row in self.samples]


def default_ks(num_samples: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``num_samples``, and ``num_samples`` itself."""
    ks, k = [], 1
    while k <= num_samples:
        ks.append(k)
        k *= 2
    if ks[-1] != num_samples:
        ks.append(num_samples)
    return tuple(ks)


def summarize(
    samples: Sequence[Sequence[EvalSample]],
    references: Sequence[str | None],
    *,
    ks: Sequence[int] | None = None,
    with_majority: bool = True,
) -> dict[str, float]:
    """Metrics of verified samples (module doc). Every prompt needs the same K >= 1."""
    n = len(samples)
    if n == 0:
        raise EvalError("no prompts to summarize")
    sizes = {len(s) for s in samples}
    if len(sizes) != 1 or 0 in sizes:
        raise EvalError(
            f"every prompt needs the same number (>= 1) of samples; got {sorted(sizes)}"
        )
    K = sizes.pop()
    ks = default_ks(K) if ks is None else tuple(ks)
    for k in ks:
        if not 1 <= k <= K:
            raise EvalError(f"pass@{k} needs 1 <= k <= num_samples={K}")
    correct = [[x.correct for x in row] for row in samples]
    flat = [x for row in samples for x in row]
    metrics: dict[str, float] = {
        "num_prompts": float(n),
        "num_samples": float(K),
        "pass@1": float(np.mean([np.mean(c) for c in correct])),
    }
    for k in ks:
        metrics[f"pass@{k}"] = mean_pass_at_k(correct, k) if k > 1 else metrics["pass@1"]
    if with_majority and all(r is not None for r in references):
        votes = [majority_answer([x.answer for x in row]) for row in samples]
        metrics[f"maj@{K}"] = float(
            np.mean([answers_match(v, r) for v, r in zip(votes, references, strict=True)])
        )
    metrics["num_correct"] = float(sum(x.correct for x in flat))
    metrics["answer_rate"] = float(np.mean([x.answer is not None for x in flat]))
    metrics["mean_tokens"] = float(np.mean([x.num_tokens for x in flat]))
    metrics["clipped_ratio"] = float(np.mean([x.finish_reason == "length" for x in flat]))
    return metrics


def completion_rows(result: EvalResult, prompts: Sequence[PromptExample]) -> Iterator[dict]:
    """One JSON-ready dict per completion, prompt order then sample order."""
    for i, row in enumerate(result.samples):
        for x in row:
            yield {
                "index": i,
                "row": x.row,
                "sample": x.sample,
                "prompt": prompts[i].columns.get("prompt"),
                "completion": x.text,
                "answer": x.answer,
                "reference": result.references[i],
                "reward": x.reward,
                "correct": x.correct,
                "num_tokens": x.num_tokens,
                "finish_reason": x.finish_reason,
            }


def write_completions(result: EvalResult, prompts: Sequence[PromptExample], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in completion_rows(result, prompts):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def format_metrics(metrics: dict[str, float]) -> str:
    """One line per metric, rates with 4 decimals."""
    lines = []
    for k, v in metrics.items():
        if k.startswith(("pass@", "maj@")) or k in ("answer_rate", "clipped_ratio"):
            lines.append(f"{k:<18} {v:.4f}")
        elif k in ("num_prompts", "num_samples", "num_correct"):
            lines.append(f"{k:<18} {int(v)}")
        else:
            lines.append(f"{k:<18} {v:.4g}")
    return "\n".join(lines)
