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
    verifier: str | None  # a reward function's name (None: an environment's rewards)
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
    if sampler.cfg.episodes is not None:
        return _episodes_eval_fn(sampler, params_of_state, eval_prompts, spec)

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


def _episodes_eval_fn(sampler: RolloutSampler, params_of_state: Callable, prompts: Sequence,
                      spec: HeldOutEval) -> Callable[..., dict[str, float]]:
    """The held-out evaluation of a multi-turn run: greedy trajectories with the run's
    environment, in batches of ``batch_size``; ``eval_accuracy`` = the verifier's reward of
    the conversation after the prompt (as the rollouts' rewards judge it) plus the
    environment's reward parts, >= 1; with the tool / turn statistics of the trajectories
    (``eval_tools/call_frequency``, ``eval_turns/mean``...)."""
    from jaxpt.data.pipeline import prompt_batch
    from jaxpt.rewards.registry import compute_rewards, get_reward_function
    from jaxpt.rl.episodes import episode_rows, run_rollout_episodes, session_decoder
    from jaxpt.rl.multiturn import multiturn_metrics

    verifier = get_reward_function(spec.verifier) if spec.verifier else None
    episodes = sampler.cfg.episodes

    def eval_fn(state) -> dict[str, float]:
        params = params_of_state(state)
        correct, lengths, clipped, trajectories = [], [], [], []
        for start in range(0, len(prompts), spec.batch_size):
            chunk = prompts[start:start + spec.batch_size]
            n = len(chunk)
            batch = prompt_batch(chunk, pad_id=sampler.pad_id)  # its columns, as rollouts
            columns = batch["columns"]
            rows = episode_rows(batch, 1)
            if sampler.shardings is not None:  # a short last batch: copies fill the shards
                rows += [rows[0]] * (spec.batch_size - n)
            decode = session_decoder(sampler.graphdef, params, sampler=Sampler.greedy(),
                                     max_new_tokens=spec.max_new_tokens,
                                     max_total_tokens=episodes.max_total_tokens,
                                     eos_ids=sampler.eos_ids, pad_id=sampler.pad_id, rng=0,
                                     shardings=sampler.shardings)
            ep = run_rollout_episodes(episodes, rows, decode, sampler.tokenizer,
                                      eos_ids=sampler.eos_ids, pad_id=sampler.pad_id)
            other = {k: v for k, v in columns.items() if k != "prompt"}
            rewards = np.zeros(n, np.float32)
            if verifier is not None:  # else the environment's reward alone
                rewards, _, _ = compute_rewards(
                    [verifier], None, columns.get("prompt", [None] * n), ep.completions[:n],
                    None, other, batch["rows"], timeout_s=spec.reward_timeout_s,
                    skip_nonfinite=True)
            correct += list(np.nan_to_num(rewards) + ep.env_rewards_R[:n] >= 1.0)
            lengths += list(ep.lengths_R[:n])
            clipped += list(ep.truncated_R[:n])
            trajectories += ep.trajectories[:n]
        out = {"eval_accuracy": float(np.mean(correct)),
               "eval_mean_length": float(np.mean(lengths)),
               "eval_clipped_ratio": float(np.mean(clipped))}
        for key, value in multiturn_metrics(trajectories).items():
            if key.startswith(("tools/", "turns/mean")):
                out[f"eval_{key}"] = value
        return out

    return eval_fn
