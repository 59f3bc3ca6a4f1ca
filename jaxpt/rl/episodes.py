"""Multi-turn rollouts of the on-policy trainers: each rollout row talks to an environment.

Axis legend: R rollout rows (B prompts x G samples), P prompt length (left padded),
C trajectory length after the prompt (right padded).

With ``environment`` set (or ``tools``) in an on-policy section, every (prompt, sample) row
gets its own environment (``jaxpt.rl.environments``) and runs to the end through
``jaxpt.rl.multiturn.run_episodes``: model turn, environment turn (tool results, feedback),
model turn, ... The trajectory the trainer sees is the prompt as the environment opened it
(with the tool list where it has tools), then every token after it, as sampled or as the
environment added it; the loss mask is 1 on the sampled tokens only (tool outputs and the
environment's turns are never trained on), as TRL's tool rollouts (``tool_mask``) and verl's
agent loop mask them. Rewards: the run's reward functions judge the whole conversation after
the prompt (TRL's convention for tool rollouts: the completion is the list of messages,
assistant and tool turns), plus the environment's reward parts summed over the trajectory
(``self_correction``'s shaping, for instance).

Each turn is one jitted decode loop over the rollout's R rows (``jaxpt.sampling.session``):
a row that goes on is fed the environment's new tokens into its own KV cache and samples
its next turn; rows that are done sit idle. Nothing is re-tokenized or re-prefilled.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxpt.rl import processes
from jaxpt.rl.environments import make_environment
from jaxpt.rl.multiturn import Trajectory, multiturn_metrics, run_episodes
from jaxpt.sampling import Sampler
from jaxpt.sampling.session import DecodeSession
from jaxpt.sampling.state import bucket_length
from jaxpt.sampling.text import left_pad

ROUND_COMPLETION = 32  # trajectory widths are rounded up to this: few train-step shapes


@dataclasses.dataclass(frozen=True)
class EpisodeConfig:
    """How a multi-turn rollout runs (the section's ``environment`` keys)."""

    environment: str
    options: tuple[tuple[str, Any], ...] = ()
    max_turns: int = 4  # model turns per trajectory
    max_total_tokens: int = 1024  # prompt + every turn
    step_workers: int = 1  # threads for the environments' steps (tools run in processes)

    def env_factory(self) -> Callable:
        return make_environment(self.environment, **dict(self.options))


@dataclasses.dataclass
class Episodes:
    """A rollout's trajectories as the arrays the rollout rows are built from."""

    prompt_ids_RP: np.ndarray
    prompt_mask_RP: np.ndarray
    tokens_RC: np.ndarray
    lengths_R: np.ndarray  # real tokens after the prompt (sampled and environment's)
    train_mask_RC: np.ndarray  # 1 on the sampled tokens
    sampling_logprobs_RC: np.ndarray  # the decode loop's, 0 off the sampled tokens
    truncated_R: np.ndarray  # a turn hit max_new_tokens, or the trajectory max_total_tokens
    completions: list[list[dict]]  # the messages after the prompt (what rewards judge)
    env_rewards_R: np.ndarray  # the environment's reward parts, summed
    metrics: dict[str, float]
    trajectories: list[Trajectory]


def episode_rows(prompt_batch: Mapping[str, Any], G: int) -> list[dict]:
    """One environment row per rollout row: the prompt's columns, each prompt G times."""
    columns = prompt_batch["columns"]
    B = len(prompt_batch["prompt_ids"])
    rows = [{k: v[b] for k, v in columns.items()} for b in range(B)]
    return [dict(r) for r in rows for _ in range(G)]


def session_decoder(graphdef, params, *, sampler: Sampler, max_new_tokens: int,
                    max_total_tokens: int, eos_ids: Sequence[int], pad_id: int, rng,
                    shardings=None) -> DecodeSession:
    """The decoder ``run_episodes`` drives: each row keeps its KV cache between turns and
    only the environment's new tokens are fed into it (``jaxpt.sampling.session``); token
    t of row r's k-th turn is drawn from (rng, r, k, t)."""
    return DecodeSession(graphdef, params, sampler=sampler, max_new_tokens=max_new_tokens,
                         max_total_tokens=max_total_tokens, eos_ids=tuple(eos_ids),
                         pad_id=pad_id, seed=rng, shardings=shardings)


def to_episodes(trajs: Sequence[Trajectory], *, pad_id: int) -> Episodes:
    """Trajectories -> left-padded prompts, right-padded trajectory tokens and masks."""
    R = len(trajs)
    ids_RP, mask_RP = left_pad([t.prompt_ids for t in trajs], pad_id,
                               bucket_length(max(len(t.prompt_ids) for t in trajs)))
    lengths_R = np.asarray([len(t.completion_ids) for t in trajs], np.int32)
    C = max(ROUND_COMPLETION, -(-int(lengths_R.max()) // ROUND_COMPLETION) * ROUND_COMPLETION)
    tokens_RC = np.full((R, C), pad_id, np.int32)
    train_RC = np.zeros((R, C), np.float32)
    lp_RC = np.zeros((R, C), np.float32)
    for r, t in enumerate(trajs):
        n = len(t.completion_ids)
        tokens_RC[r, :n] = t.completion_ids
        train_RC[r, :n] = t.loss_mask
        lp_RC[r, :n] = t.logprobs  # 0 on the environment's tokens (run_episodes)
    completions = [[dict(m) for m in t.messages[t.prompt_messages:]] for t in trajs]
    env_R = np.asarray([sum(t.reward_parts.values()) for t in trajs], np.float32)
    return Episodes(
        prompt_ids_RP=np.asarray(ids_RP, np.int32), prompt_mask_RP=np.asarray(mask_RP, np.int32),
        tokens_RC=tokens_RC, lengths_R=lengths_R, train_mask_RC=train_RC,
        sampling_logprobs_RC=lp_RC,
        truncated_R=np.asarray([t.finish in ("truncated", "length") for t in trajs]),
        completions=completions, env_rewards_R=env_R, metrics=multiturn_metrics(trajs),
        trajectories=list(trajs))


def run_rollout_episodes(cfg: EpisodeConfig, rows: Sequence[Mapping[str, Any]], decode,
                         tokenizer, *, eos_ids: Sequence[int], pad_id: int) -> Episodes:
    """Every row's trajectory, to the end (``decode``: a ``session_decoder``).

    With several processes every process drives the same decode (one SPMD program over
    the mesh, every row's tokens gathered onto every host) and opens every row's
    environment, but a row's ``step`` runs only on the process that owns the row
    (``processes.map_owned``) and its results are gathered: a tool runs once, an
    environment's own state stays on one process, and every process builds the same
    trajectories. ``reset`` must therefore depend only on the row (it runs everywhere)."""
    trajs = run_episodes(cfg.env_factory(), rows, decode, tokenizer, max_turns=cfg.max_turns,
                         max_total_tokens=cfg.max_total_tokens, stop_token_ids=eos_ids,
                         step_workers=cfg.step_workers,
                         map_steps=functools.partial(processes.map_owned, num_rows=len(rows)))
    return to_episodes(trajs, pad_id=pad_id)

