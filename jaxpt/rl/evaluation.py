"""Held-out evaluation of an on-policy run: greedy completions of the held-out prompts,
verified by the run's first reward function, with ``jaxpt.evaluate.sample_and_verify`` (the
same code as ``jaxpt eval``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jaxpt.rl.rollout import RolloutSampler
from jaxpt.sampling import Sampler


@dataclasses.dataclass(frozen=True)
class HeldOutEval:
    prompts: int  # the first this many held-out prompts
    batch_size: int
    max_new_tokens: int
    verifier: str  # a reward function's name
    reward_timeout_s: float
    engine: str = "static"  # `jaxpt.sampling.text.sample_completions(engine=...)`


def make_eval_fn(sampler: RolloutSampler, params_of_state: Callable, prompts: Sequence,
                 spec: HeldOutEval) -> Callable[..., dict[str, float]]:
    """``eval_fn(state)``: ``eval_accuracy`` (reward >= 1), ``eval_mean_length``,
    ``eval_clipped_ratio``; with the strict math verifier also ``eval_accuracy_lenient``
    (last-number fallback), so both readings are on record. ``sampler`` gives the model's
    graph, tokenizer and special tokens."""
    from jaxpt.evaluate import sample_and_verify
    from jaxpt.rewards.math import math_reward

    eval_prompts = prompts[:spec.prompts]

    def eval_fn(state) -> dict[str, float]:
        samples = sample_and_verify(
            sampler.graphdef, params_of_state(state), sampler.tokenizer, eval_prompts, 1,
            sampler=Sampler.greedy(), max_new_tokens=spec.max_new_tokens,
            eos_ids=list(sampler.eos_ids), pad_id=sampler.pad_id,
            batch_size=spec.batch_size, verifier=spec.verifier,
            reward_timeout_s=spec.reward_timeout_s, engine=spec.engine)
        first = [row[0] for row in samples]
        out = {
            "eval_accuracy": float(np.mean([s.correct for s in first])),
            "eval_mean_length": float(np.mean([len(s.token_ids) for s in first])),
            "eval_clipped_ratio": float(np.mean([s.finish_reason == "length" for s in first])),
        }
        if spec.verifier == "math_strict":
            answers = [p.columns.get("answer") for p in eval_prompts]
            lenient = math_reward(None, [s.text for s in first], answer=answers)
            out["eval_accuracy_lenient"] = float(np.mean([r == 1.0 for r in lenient]))
        return out

    return eval_fn
