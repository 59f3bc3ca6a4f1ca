"""How every on-policy run is assembled, so an algorithm module holds only what is its own.

An on-policy trainer (GRPO, online DPO, PPO, distillation) is, in order::

    run = start_on_policy(cfg, "grpo", mesh=mesh, demonstrations=...)  # model, prompts, steps
    program = eb.train_program(cfg, run.bundle, run.total_steps, loss_fn, batch_sh, ...)
    params_of_state, decode_sh = decode_policy(program.trainable, run.bundle.params, run.mesh)
    sampler = run.sampler(decode_sh)                   # + the algorithm's advantage estimator
    source = RolloutSource(section, prompts=run.train_prompts, sampler=sampler, ...)
    return run.trainer(state=..., step_fn=..., source=source, put_batch=..., parts=...,
                       sampler=sampler, params_of_state=params_of_state)

:func:`start_on_policy` checks the batch against the group size (and refuses several
processes where the algorithm does not gather its rollouts yet), loads the model, the reward
functions and the train prompts, and counts the run's optimizer steps;
:meth:`OnPolicyRun.trainer` adds the held-out evaluation (greedy accuracy of the first
reward function) when the run has held-out prompts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxpt.config import RunConfig
from jaxpt.engine import build as eb
from jaxpt.engine import state as es
from jaxpt.engine.loop import Trainer
from jaxpt.rewards.registry import check_reward_columns, get_reward_function
from jaxpt.rl import layout
from jaxpt.rl.config import OnPolicySection
from jaxpt.rl.evaluation import make_eval_fn
from jaxpt.rl.prompts import PromptSpec, load_prompts
from jaxpt.rl.rollout import AdvantageFn, RolloutSampler, special_token_ids


def no_advantages(rewards_R) -> tuple[np.ndarray, dict[str, float]]:
    """The advantage hook of an algorithm that makes its own of the rewards (online DPO
    ranks them, PPO needs the critic, distillation ignores them): zeros."""
    return np.zeros(len(rewards_R), np.float32), {}


@dataclasses.dataclass
class OnPolicyRun:
    cfg: RunConfig
    section: OnPolicySection
    bundle: eb.ModelBundle
    pad_id: int
    eos_ids: tuple[int, ...]
    reward_funcs: list[Callable]
    spec: PromptSpec
    train_prompts: list
    data_stats: Any
    total_steps: int

    @property
    def mesh(self):
        return self.bundle.mesh

    @property
    def group_size(self) -> int:
        return self.section.num_generations

    def sampler(self, decode_sh, advantages: AdvantageFn = no_advantages) -> RolloutSampler:
        """The rollout sampler of the current policy (decode preset ``decode_sh``)."""
        b = self.bundle
        return RolloutSampler(b.graphdef, b.tokenizer, self.section.rollout(), self.eos_ids,
                              self.pad_id, self.reward_funcs, advantages, decode_sh)

    def put_batch(self, batch_sh, *, share_prompt: bool = False) -> Callable:
        """``put_batch(batch)``: a rollout batch onto the mesh, each group packed as one
        shared-prompt row first where ``share_prompt`` (``rl.layout``)."""
        G = self.group_size
        if share_prompt:
            return lambda b: es.put_batch(layout.to_shared_prompt(b, G), batch_sh)
        return lambda b: es.put_batch(b, batch_sh)

    def trainer(self, *, state, step_fn, source, put_batch, parts, sampler: RolloutSampler,
                params_of_state: Callable) -> Trainer:
        """The run's Trainer; held-out evaluation where the run has held-out prompts
        (``task: arithmetic``, or ``data.eval``)."""
        cfg, sec = self.cfg, self.section
        eval_fn = None
        if sec.task == "arithmetic" or cfg.data.eval is not None:
            eval_prompts, _ = load_prompts(cfg, self.spec, self.bundle.tokenizer, "eval")
            eval_fn = make_eval_fn(sampler, params_of_state, eval_prompts, sec.held_out())
        return Trainer(
            cfg=cfg, mesh=self.mesh, state=state, step_fn=step_fn, source=source,
            put_batch=put_batch, total_steps=self.total_steps, eval_fn=eval_fn,
            tokens_fn=layout.rollout_tokens, num_params=self.bundle.num_params, parts=parts,
            data_stats=self.data_stats,
        )


def start_on_policy(cfg: RunConfig, name: str, *, mesh=None, demonstrations: bool = False,
                    multi_process: bool = False) -> OnPolicyRun:
    """Section ``name`` of ``cfg``: the checks, the model bundle, reward functions, train
    prompts (with their demonstrations as ``completion`` where ``demonstrations``) and the
    optimizer steps (``train.max_steps``, else ``num_epochs`` passes over the prompts, each
    rollout trained ``num_iterations`` times). ``multi_process``: the algorithm gathers its
    rollouts over processes (``rl.processes``); otherwise several processes are refused."""
    sec: OnPolicySection = cfg.section(name)
    t, G = cfg.train, sec.num_generations
    if t.batch_size % G:
        raise ValueError(f"{cfg.source}: train.batch_size={t.batch_size} (completions per step)"
                         f" must be a multiple of {name}.num_generations={G}")
    if not multi_process and jax.process_count() > 1:
        raise NotImplementedError(f"multi-process {name} rollouts are not supported yet")
    episodes = sec.episodes()
    if episodes is not None:
        episodes.env_factory()  # a bad environment or tool fails here, before the model loads
    if episodes is not None and name not in ("grpo", "online_dpo"):
        raise ValueError(f"{cfg.source}: {name}.environment / tools: multi-turn rollouts are "
                         f"wired into grpo and online_dpo; not into {name} yet")
    if not sec.reward_funcs and episodes is None:
        raise ValueError(f"{cfg.source}: {name}.reward_funcs is empty (allowed only with an "
                         "environment that gives rewards)")
    bundle = eb.start_run(cfg, mesh)
    pad_id, eos_ids = special_token_ids(bundle.tokenizer, bundle.resolved.generation_eos_ids())
    reward_funcs = [get_reward_function(f) for f in sec.reward_funcs]
    spec = sec.prompts(section=name, demonstrations=demonstrations)
    train_prompts, data_stats = load_prompts(cfg, spec, bundle.tokenizer, "train")
    check_reward_columns(reward_funcs, train_prompts)  # before the first rollout
    total = t.max_steps
    if total is None:
        steps_per_epoch = len(train_prompts) * G / t.batch_size
        total = max(1, math.ceil(t.num_epochs * steps_per_epoch * sec.num_iterations))
    return OnPolicyRun(cfg, sec, bundle, pad_id, eos_ids, reward_funcs, spec, train_prompts,
                       data_stats, total)
