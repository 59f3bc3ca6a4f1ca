"""The rollout source: rollouts from the current policy, served as optimizer mini-batches.

Axis legend: R rollout rows (``rows_per_step * steps_per_generation`` completions), G
completions per prompt, b rows per optimizer step.

One rollout samples R completions (G per prompt) with the jitted decode loop from the
*current* policy (:class:`jaxpt.rl.rollout.RolloutSampler`), then ``num_iterations`` (mu)
passes over it in ``steps_per_generation`` mini-batches, one optimizer step each (TRL's
generation batch / mu semantics). The loop (``jaxpt.engine.loop.run``) sees an ordinary
batch source: :meth:`RolloutSource.next` serves the next mini-batch and rolls out again
when the current rollout is used up.

The source knows no loss. The algorithm gives it ``make_batch(rollout, prompts,
prompt_batch)``, which turns a sampling round into its typed rollout batch (a frozen
dataclass with ``rows``, ``advantages``, ``old_logprobs``, ``ref_logprobs`` and any other
per-row fields, all [R, ...]); the source scores old / reference log-probs into it when
asked, shuffles whole groups and slices mini-batches. The section's keys
(``jaxpt.rl.config.OnPolicySection``) say how many mini-batches and passes, and whether
DAPO dynamic sampling runs; optional parts: ``prefixes`` (demonstration prefixes per row,
Prefix-RFT), ``mixer`` (a per-step choice made on the host, SASR), ``complete`` (the
algorithm scores the rollout itself, PPO) and ``correct`` (a last pass over the scored
rollout: GRPO's rollout-vs-trainer importance weights).

With several processes every process holds the whole rollout (``jaxpt.rl.processes``), so
the shuffles, dynamic-sampling rounds and resume state are the same on each; ``next``
serves this process's block of the mini-batch's rows.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxpt.data.pipeline import prompt_batch
from jaxpt.engine.loop import Served, SourceBase
from jaxpt.rl import processes
from jaxpt.rl.config import OnPolicySection
from jaxpt.rl.dynamic_sampling import DynamicSampler, dynamic_rounds
from jaxpt.rl.rollout import Rollout, RolloutSampler
from jaxpt.rl.streams import RandomStreams


class RolloutSource(SourceBase):
    """Rollouts served as ``steps_per_generation * num_iterations`` mini-batches each.
    Checkpointed state: the rollout count and the prompt cursor (sampling rounds done);
    a resume restarts at the next rollout boundary (the partly used rollout is sampled
    again from the restored policy)."""

    def __init__(self, section: OnPolicySection, *, prompts: Sequence[Any],
                 sampler: RolloutSampler, make_batch: Callable[[Rollout, list, dict], Any],
                 rows_per_step: int, params_of_state: Callable, score_fn: Callable,
                 score_ref: bool, seed: int, prefixes: Callable[[list, int], list] | None = None,
                 mixer=None, complete: Callable[[Any, Any], tuple[Any, dict]] | None = None,
                 correct: Callable[[Any], tuple[Any, dict]] | None = None,
                 score_old: bool | None = None):
        self.section, self.prompts, self.sampler = section, prompts, sampler
        self.make_batch, self.rows_per_step = make_batch, rows_per_step
        G = section.num_generations
        # Mini-batches hold whole groups when they can (the shared-prompt layout needs it;
        # the flat layout uses the same split, so the layout never changes the math).
        self.whole_groups = rows_per_step % G == 0
        self.prompts_per_rollout = rows_per_step * section.steps_per_generation // G
        self.params_of_state, self.score_fn = params_of_state, score_fn
        # Old log-probs are scored only when a rollout is reused (or ``score_old``: the
        # rollout correction needs them); otherwise the loss takes old =
        # stop_gradient(new), as TRL does.
        self.score_old = section.reuses_rollouts() if score_old is None else score_old
        self.score_ref = score_ref
        self.prefixes, self.mixer = prefixes, mixer
        # complete(state, batch) -> (batch, metrics): an algorithm that scores the whole
        # rollout itself (PPO: log-probs, values, KL-penalized rewards, GAE) does it here,
        # in place of the old / reference scoring below.
        self.complete = complete
        # correct(batch) -> (batch, metrics): after scoring, e.g. the rollout-vs-trainer
        # importance weights from the old and the sampling log-probs (`rl.correction`).
        self.correct = correct
        self.seed, self.streams = seed, RandomStreams(seed)
        self.rollouts = 0  # rollouts completed
        self.prompt_batches = 0  # sampling rounds done (the prompt cursor)
        self.served = 0
        self.buffer: list[Any] = []
        self.metrics: dict[str, float] = {}
        self.steps_served = 0
        self.train_times: dict[int, float] = {}  # step -> seconds its update took

    # BatchSource protocol
    def get_state(self) -> dict:
        state = {"rollouts": self.rollouts, "prompt_batches": self.prompt_batches,
                 "seed": self.seed}
        if self.mixer is not None:
            state[self.mixer.name] = self.mixer.get_state()
        return state

    def set_state(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"checkpoint data state was written with train.seed="
                             f"{state.get('seed')}, this run has {self.seed}")
        self.rollouts, self.buffer, self.served = int(state["rollouts"]), [], 0
        self.prompt_batches = int(state.get("prompt_batches", self.rollouts))
        if self.mixer is not None and self.mixer.name in state:
            self.mixer.set_state(state[self.mixer.name])

    def next(self, state) -> Served:
        # Wait for the previous optimizer step here, so that its device time is reported as
        # `time/train` (see `observe`) and never counted as rollout time.
        t0 = time.perf_counter()
        jax.block_until_ready(state.params)
        if self.steps_served:
            self.train_times[self.steps_served] = time.perf_counter() - t0
        self.steps_served += 1
        if not self.buffer:
            self.rollout(state)
        batch = self.buffer.pop(0)
        metrics = dict(self.metrics) if self.served == 0 else {}
        self.served += 1
        if self.mixer is not None:
            batch, mixed = self.mixer.serve(batch)
            metrics.update(mixed)
        # Every process holds the whole mini-batch; it serves its block of the rows.
        return Served(processes.local_rows(batch, self.rows_per_step, what="mini-batch rows"),
                      metrics)

    def observe(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Called by the loop with each step's metrics (one step late); returns metrics to
        add to that step's row (its train time, when measured)."""
        if self.mixer is not None:
            self.mixer.observe(step, metrics)
        train = self.train_times.pop(step, None)
        return {} if train is None else {"time/train": train}

    def prompt_indices(self, k: int) -> np.ndarray:
        """Prompts of sampling round k: a fresh seeded permutation per epoch (stream
        ``prompt_order``) over the prompts."""
        n = len(self.prompts)
        start = k * self.prompts_per_rollout
        idx = []
        for i in range(start, start + self.prompts_per_rollout):
            epoch, pos = divmod(i, n)
            idx.append(self.streams.host("prompt_order", epoch).permutation(n)[pos])
        return np.asarray(idx)

    def rollout(self, state) -> None:
        """Sample the next rollout and fill the buffer with its mini-batches."""
        params = self.params_of_state(state)
        sec, G = self.section, self.section.num_generations
        if sec.dynamic_sampling:
            sampler = DynamicSampler(self.prompts_per_rollout, G, sec.max_sampling_rounds,
                                     fill=sec.dynamic_sampling_fill)
            batch, metrics = dynamic_rounds(lambda: self.sample_round(params), sampler,
                                            advantages=self.sampler.advantages,
                                            pad_id=self.sampler.pad_id)
        else:
            batch, _, metrics = self.sample_round(params)
        if self.complete is not None:
            batch, done = self.complete(state, batch)
            metrics = {**metrics, **done}
        elif self.score_old or self.score_ref:
            old, ref = self.score_fn(state, batch.rows, old=self.score_old, ref=self.score_ref)
            batch = dataclasses.replace(batch, old_logprobs=old, ref_logprobs=ref)
        if self.correct is not None:
            batch, corrected = self.correct(batch)
            metrics = {**metrics, **corrected}
        R = len(batch.advantages)
        rs = self.streams.host("minibatch_shuffle", self.rollouts)
        if self.whole_groups:  # shuffle groups, keep each group's rows together
            order = (rs.permutation(R // G)[:, None] * G + np.arange(G)).reshape(-1)
        else:
            order = rs.permutation(R)
        b = self.rows_per_step
        minis = [jax.tree.map(lambda v, rows=order[s * b:(s + 1) * b]: v[rows], batch)
                 for s in range(sec.steps_per_generation)]
        self.buffer = [m for _ in range(sec.num_iterations) for m in minis]
        self.served = 0
        self.rollouts += 1
        self.metrics = {**metrics, "rollout": float(self.rollouts)}

    def sample_round(self, params) -> tuple[Any, np.ndarray, dict[str, float]]:
        """One sampling round: the next ``prompts_per_rollout`` prompts, G samples each,
        rewards, advantages -> (the algorithm's flat batch, rewards_R, metrics)."""
        k = self.prompt_batches
        chosen = [self.prompts[i] for i in self.prompt_indices(k)]
        pb = prompt_batch(chosen, pad_id=self.sampler.pad_id,
                          max_prompt_length=self.section.max_prompt_length)
        prefixes = self.prefixes(chosen, k) if self.prefixes is not None else None
        ro = self.sampler.sample(params, pb, rng=self.streams.sampling_key(k),
                                 prefixes_R=prefixes)
        self.prompt_batches += 1
        return self.make_batch(ro, chosen, pb), ro.rewards_R, ro.metrics
