"""Rollouts: prompts -> sampled completions -> rewards -> advantages -> flat rollout rows.

Axis legend: B prompts, G generations per prompt, R = B*G rollout rows, P prompt length
(left padded), C completion length (right padded).

:class:`RolloutSampler` holds what sampling needs besides the params (the model's graph,
tokenizer, special tokens, reward functions, decode shardings) and the advantage estimator,
a parameter (``advantages(rewards_R) -> (advantages_R, metrics)``: GRPO's group-relative
ones, or anything else), so on-policy algorithms share the sampler and differ in what they
make of the rewards. Rows come out in the flat layout (``jaxpt.rl.layout``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxpt.engine.state import identity_params
from jaxpt.losses.grpo import mask_truncated
from jaxpt.rewards.registry import compute_rewards
from jaxpt.rl import processes
from jaxpt.rl.episodes import (
    EpisodeConfig,
    Episodes,
    episode_rows,
    run_rollout_episodes,
    session_decoder,
)
from jaxpt.rl.layout import TokenRows, rollout_sequences
from jaxpt.sampling import FINISH_LENGTH, Sampler, generate
from jaxpt.sampling.continuous import ENGINES, generate_continuous
from jaxpt.sharding import decode_sharding

AdvantageFn = Callable[[np.ndarray], tuple[np.ndarray, dict[str, float]]]


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    num_generations: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    reward_funcs: tuple[str, ...] = ("math",)
    reward_weights: tuple[float, ...] | None = None
    reward_timeout_s: float = 60.0
    skip_nonfinite_rewards: bool = False  # NaN / inf reward: None + counted, not an error
    mask_truncated_completions: bool = False
    # Decode loop (`jaxpt.sampling.continuous`): "static" decodes all R rows until the
    # longest is done; "continuous" decodes `slots` rows at a time (0: all R), a finished
    # row's slot taking the next pending (prompt, sample). One device only.
    engine: str = "static"
    slots: int = 0
    # Multi-turn rollouts with an environment (`jaxpt.rl.episodes`); None: one completion.
    episodes: EpisodeConfig | None = None

    def __post_init__(self):
        if self.engine not in ENGINES or self.slots < 0:
            raise ValueError(f"rollout_engine={self.engine!r} / rollout_slots={self.slots}: "
                             f"use one of {ENGINES} and slots >= 0")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} entries for "
                f"{len(self.reward_funcs)} reward_funcs"
            )

    def sampler(self) -> Sampler:
        return Sampler(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p
        )


@dataclasses.dataclass
class Rollout:
    """Host-side result of one sampling round (numpy arrays, R rows)."""

    rows: TokenRows
    advantages_R: np.ndarray  # float32
    prefix_lengths_R: np.ndarray | None  # demonstration prefixes (Prefix-RFT), else None
    completions: list[Any]
    rewards_R: np.ndarray
    metrics: dict[str, float]
    # [R, C] float32: each sampled token's log-prob as the decode loop computed it (at the
    # sampling temperature, before top-k/p truncation); NaN on demonstration-prefix tokens
    # (not sampled), 0 on padding. The rollout-vs-trainer correction compares them with
    # the trainer's (`jaxpt.rl.correction`).
    sampling_logprobs_RC: np.ndarray | None = None


def special_token_ids(tokenizer, generation_eos_ids: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """(pad id, the sorted ids that end a completion) of a model's tokenizer."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_ids = set(generation_eos_ids)
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return pad_id, tuple(sorted(eos_ids))


def decode_policy(train_state, params, mesh, *, group: str | None = None):
    """(``params_of_state(state)``: the policy's params in the decode preset (tensor-only
    weights, rows over data x fsdp), the preset). ``train_state`` is the engine's
    ``TrainableState`` (its ``params_fn``), ``params`` the model's params (their tree);
    ``group``: the policy is that param group of several (PPO's ``policy`` beside its
    ``value`` head)."""
    decode_sh = decode_sharding(mesh)
    params_sh = decode_sh.params(params)
    pick = (lambda p: p) if group is None else (lambda p: p[group])
    if train_state.params_fn is identity_params:
        # The policy is the trained params themselves: device_put hands the same buffers
        # over where the decode layout is the train layout (one device), with no copy of
        # the weights per rollout (~0.3 s for SmolLM2-135M on CPU), and reshards otherwise.
        return (lambda s: jax.device_put(pick(s.params), params_sh)), decode_sh
    fn = train_state.params_fn
    return (jax.jit(lambda s: pick(fn(s.params, s.frozen, None)), out_shardings=params_sh),
            decode_sh)


def _decode(tokenizer, tokens_RC, lengths_R) -> list[str]:
    rows = [list(map(int, t[:n])) for t, n in zip(tokens_RC, lengths_R, strict=True)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def _repeat(values: Sequence[Any], n: int) -> list[Any]:
    return [v for v in values for _ in range(n)]


@dataclasses.dataclass
class RolloutSampler:
    graphdef: Any
    tokenizer: Any
    cfg: RolloutConfig
    eos_ids: tuple[int, ...]
    pad_id: int
    reward_funcs: Sequence[Callable]
    advantages: AdvantageFn
    shardings: Any = None  # the decode preset (`jaxpt.sharding.DecodeSharding`)

    def sample(self, params, prompt_batch: dict[str, Any], *, rng,
               prefixes_R: Sequence[Sequence[int]] | None = None) -> Rollout:
        """Sample G completions per prompt, score them, and build the rollout rows.

        prefixes_R (Prefix-RFT): per rollout row, demonstration tokens the completion starts
        with (empty: a plain rollout). The policy continues after the prefix; the completion
        (prefix + continuation, up to `len(prefix) + max_new_tokens` tokens) is what rewards
        see, and the rollout gets `prefix_lengths_R` so the loss can give the prefix the SFT
        loss and the continuation the RL loss (`jaxpt.losses.grpo.prefix_rft_masks`).
        """
        cfg, G = self.cfg, self.cfg.num_generations
        t0 = time.perf_counter()
        columns = dict(prompt_batch.get("columns", {}))
        prompts = columns.pop("prompt", [None] * len(prompt_batch["prompt_ids"]))
        if cfg.episodes is not None:
            if prefixes_R is not None and any(len(p) for p in prefixes_R):
                raise ValueError("Prefix-RFT (prefix_rft_ratio > 0) continues single-turn "
                                 "demonstrations; it does not run with an environment")
            ep = self._run_episodes(params, prompt_batch, rng=rng)
            return self._score(
                prompt_batch, prompts, columns, ep.prompt_ids_RP, ep.prompt_mask_RP,
                ep.tokens_RC, ep.lengths_R, ep.truncated_R, ep.sampling_logprobs_RC,
                completions=ep.completions, train_mask_RC=ep.train_mask_RC,
                extra_rewards_R=ep.env_rewards_R, extra_metrics=ep.metrics,
                prefix_len_R=None, rollout_time=time.perf_counter() - t0, t0=t0)
        if prefixes_R is None or not any(len(p) for p in prefixes_R):
            prefixes_R = None
            gen = self._generate(params, prompt_batch, rng=rng)
            tokens_RC, lengths_R = processes.host_rows(gen.tokens), processes.host_rows(gen.lengths)
            sampled_lp_RC = processes.host_rows(gen.logprobs).astype(np.float32)
            prefix_len_R = np.zeros(len(lengths_R), np.int32)
        else:
            tokens_RC, lengths_R, prefix_len_R, sampled_lp_RC, gen = (
                self._generate_after_prefixes(params, prompt_batch, prefixes_R, rng=rng))
        truncated_R = processes.host_rows(gen.finish_reason) == FINISH_LENGTH
        rollout_time = time.perf_counter() - t0

        texts = _decode(self.tokenizer, tokens_RC, lengths_R)
        conversational = bool(prompts) and isinstance(prompts[0], list)
        # TRL's convention: conversational prompts get message-list completions.
        completions = (
            [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        )
        return self._score(
            prompt_batch, prompts, columns,
            np.repeat(np.asarray(prompt_batch["prompt_ids"]), G, axis=0),
            np.repeat(np.asarray(prompt_batch["prompt_mask"]), G, axis=0),
            tokens_RC, lengths_R, truncated_R, sampled_lp_RC, completions=completions,
            prefix_len_R=prefix_len_R if prefixes_R is not None else None,
            rollout_time=rollout_time, t0=t0)

    def _score(self, prompt_batch, prompts, columns, prompt_ids_RP, prompt_mask_RP, tokens_RC,
               lengths_R, truncated_R, sampled_lp_RC, *, completions, prefix_len_R,
               rollout_time, t0, train_mask_RC=None, extra_rewards_R=None,
               extra_metrics=None) -> Rollout:
        """Rewards, advantages, rollout rows and metrics of sampled completions.
        ``train_mask_RC``: which completion tokens train (default: every real one);
        ``extra_rewards_R``: added to the reward functions' (an environment's)."""
        cfg, G = self.cfg, self.cfg.num_generations
        row_numbers = prompt_batch.get("rows")
        # Several processes: each scores its block of the rows, then every process gets
        # every reward (`jaxpt.rl.processes`); one process: the block is every row.
        if self.reward_funcs:
            mine = processes.row_block(len(lengths_R), what="rollout rows")
            rewards_R, per_function, reward_metrics = compute_rewards(
                self.reward_funcs, cfg.reward_weights, _repeat(prompts, G)[mine],
                completions[mine],
                [list(map(int, t[:n])) for t, n in zip(tokens_RC[mine], lengths_R[mine],
                                                       strict=True)],
                {k: _repeat(v, G)[mine] for k, v in columns.items()},
                _repeat(row_numbers, G)[mine] if row_numbers is not None else None,
                timeout_s=cfg.reward_timeout_s, skip_nonfinite=cfg.skip_nonfinite_rewards,
            )
            rewards_R, _, reward_metrics = processes.gather_rewards(rewards_R, per_function,
                                                                    reward_metrics)
        elif extra_rewards_R is None:
            raise ValueError("reward_funcs is empty: rollouts without an environment need at "
                             "least one reward function")
        else:  # an environment's rewards alone
            rewards_R, reward_metrics = np.zeros(len(lengths_R), np.float32), {}
        if extra_rewards_R is not None:
            rewards_R = (np.nan_to_num(rewards_R) + extra_rewards_R).astype(np.float32)
        advantages_R, adv_metrics = self.advantages(rewards_R)

        completion_mask_RC = np.arange(tokens_RC.shape[1])[None, :] < lengths_R[:, None]
        train_mask_RC = completion_mask_RC if train_mask_RC is None else train_mask_RC > 0
        if cfg.mask_truncated_completions:
            train_mask_RC = np.asarray(mask_truncated(train_mask_RC, truncated_R))
        rows = rollout_sequences(prompt_ids_RP, prompt_mask_RP, tokens_RC, completion_mask_RC,
                                 pad_id=self.pad_id)
        rows = dataclasses.replace(rows, completion_mask=train_mask_RC.astype(np.float32))

        terminated = lengths_R[~truncated_R]
        metrics = {
            **{k: float(v) for k, v in adv_metrics.items()},
            **{k: float(v) for k, v in reward_metrics.items()},
            "completions/mean_length": float(lengths_R.mean()),
            "completions/min_length": float(lengths_R.min()),
            "completions/max_length": float(lengths_R.max()),
            "completions/clipped_ratio": float(truncated_R.mean()),
            "completions/mean_terminated_length":
                float(terminated.mean()) if len(terminated) else 0.0,
            **({"prefix/rows_frac": float(np.mean(prefix_len_R > 0)),
                "prefix/mean_length": float(prefix_len_R[prefix_len_R > 0].mean())}
               if prefix_len_R is not None else {}),
            **(extra_metrics or {}),
            "time/rollout": rollout_time,
            "time/rewards": time.perf_counter() - t0 - rollout_time,
        }
        return Rollout(rows=rows, advantages_R=np.asarray(advantages_R, np.float32),
                       prefix_lengths_R=prefix_len_R, completions=completions,
                       rewards_R=rewards_R, metrics=metrics, sampling_logprobs_RC=sampled_lp_RC)

    def _run_episodes(self, params, prompt_batch, *, rng) -> Episodes:
        """Every rollout row's multi-turn trajectory (``jaxpt.rl.episodes``)."""
        cfg, G = self.cfg, self.cfg.num_generations
        rows = episode_rows(prompt_batch, G)
        decode = session_decoder(self.graphdef, params, sampler=cfg.sampler(),
                                 max_new_tokens=cfg.max_new_tokens,
                                 max_total_tokens=cfg.episodes.max_total_tokens,
                                 eos_ids=self.eos_ids, pad_id=self.pad_id, rng=rng,
                                 shardings=self.shardings)
        return run_rollout_episodes(cfg.episodes, rows, decode, self.tokenizer,
                                    eos_ids=self.eos_ids, pad_id=self.pad_id)

    def _generate(self, params, prompt_batch, *, rng):
        cfg, G = self.cfg, self.cfg.num_generations
        kw = dict(sampler=cfg.sampler(), max_new_tokens=cfg.max_new_tokens,
                  eos_ids=tuple(self.eos_ids), rng=rng, num_samples=G, pad_id=self.pad_id,
                  bucket=False)
        ids, mask = prompt_batch["prompt_ids"], prompt_batch["prompt_mask"]
        if cfg.engine == "continuous":
            if self.shardings is not None and self.shardings.mesh.size > 1:
                raise ValueError(
                    f"rollout_engine: continuous decodes on one device, the mesh has "
                    f"{self.shardings.mesh.size}; use rollout_engine: static")
            return generate_continuous(self.graphdef, params, ids, mask,
                                       num_slots=cfg.slots or None, **kw)
        return generate(self.graphdef, params, ids, mask, shardings=self.shardings, **kw)

    def _generate_after_prefixes(self, params, prompt_batch, prefixes_R, *, rng):
        """Decode every rollout row from its own prompt + demonstration prefix (one row per
        sample: rows of a group no longer share a prompt). Returns completion tokens
        [R, max_prefix + max_new] = prefix then continuation, their lengths, the prefix
        lengths, the sampled tokens' log-probs (NaN on the prefix) and the generation
        result (finish reasons)."""
        cfg, G, pad_id = self.cfg, self.cfg.num_generations, self.pad_id
        ids_BP = np.asarray(prompt_batch["prompt_ids"])
        mask_BP = np.asarray(prompt_batch["prompt_mask"]).astype(bool)
        rows = []
        for r, prefix in enumerate(prefixes_R):
            b = r // G
            rows.append(list(ids_BP[b][mask_BP[b]]) + [int(t) for t in prefix])
        width = max(len(x) for x in rows)
        ids_RP = np.full((len(rows), width), pad_id, np.int32)
        mask_RP = np.zeros((len(rows), width), np.int32)
        for r, x in enumerate(rows):  # left padded
            ids_RP[r, width - len(x) :] = x
            mask_RP[r, width - len(x) :] = 1
        gen = generate(
            self.graphdef, params, ids_RP, mask_RP, sampler=cfg.sampler(),
            max_new_tokens=cfg.max_new_tokens, eos_ids=tuple(self.eos_ids), rng=rng,
            num_samples=1, pad_id=pad_id, bucket=True, shardings=self.shardings,
        )
        new_RC, new_len_R = processes.host_rows(gen.tokens), processes.host_rows(gen.lengths)
        prefix_len_R = np.asarray([len(p) for p in prefixes_R], np.int32)
        # Completion width rounded up to a multiple of 16 so that prefix lengths do not
        # compile a new train step each rollout.
        C = -(-int(prefix_len_R.max()) // 16) * 16 + cfg.max_new_tokens
        tokens_RC = np.full((len(rows), C), pad_id, np.int32)
        new_lp_RC = processes.host_rows(gen.logprobs)
        lp_RC = np.zeros((len(rows), C), np.float32)
        for r, prefix in enumerate(prefixes_R):
            n, m = len(prefix), new_len_R[r]
            tokens_RC[r, :n] = prefix
            tokens_RC[r, n : n + m] = new_RC[r, :m]
            lp_RC[r, :n] = np.nan  # demonstration tokens: not sampled
            lp_RC[r, n : n + m] = new_lp_RC[r, :m]
        return tokens_RC, prefix_len_R + new_len_R, prefix_len_R, lp_RC, gen
