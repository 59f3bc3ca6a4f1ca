"""The online DPO run: completions sampled from the current policy, ranked by the reward
functions into chosen / rejected pairs, and the train step of
``jaxpt.algorithms.online_dpo``'s loss against the frozen reference.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpt.algorithms.online_dpo import (
    OnlineDPOBatch,
    OnlineDPOSection,
    batch_stats,
    make_online_dpo_loss_fn,
    make_pair_batch,
)
from jaxpt.config import RunConfig
from jaxpt.engine import build as eb
from jaxpt.engine import state as es
from jaxpt.engine.loop import Trainer
from jaxpt.rl import layout, processes
from jaxpt.rl.rollout import decode_policy
from jaxpt.rl.run import start_on_policy
from jaxpt.rl.scoring import make_score_fn
from jaxpt.rl.source import RolloutSource
from jaxpt.trainers.registry import register_builder


@dataclasses.dataclass
class OnlineDPOParts(eb.RunParts):
    share_prompt: bool


def online_dpo_program(cfg: RunConfig, bundle, total_steps: int):
    """(shared-prompt layout?, the batch's shardings, the ``TrainProgram``) of a run."""
    sec: OnlineDPOSection = cfg.section("online_dpo")
    t = cfg.train
    share = layout.use_shared_prompt(sec.share_prompt, group_size=2, batch_size=t.batch_size,
                                     grad_accum=t.grad_accum, mesh=bundle.mesh,
                                     where=cfg.source)
    batch_sh = es.batch_shardings(OnlineDPOBatch.ndims(share), bundle.mesh)
    loss_fn = make_online_dpo_loss_fn(bundle.graphdef, sec, impl=t.logprob_impl)
    program = eb.train_program(cfg, bundle, total_steps, loss_fn, batch_sh,
                               batch_stats_fn=batch_stats, reference=True)
    return share, batch_sh, program


def aot_programs(cfg: RunConfig, bundle) -> list:
    """The train step on a step's pairs at full widths and the rollout's prefill and decode
    loop, for ``jaxpt plan --compile``."""
    from jaxpt.rl.aot import full_rows, rollout_programs, train_step_program

    sec: OnlineDPOSection = cfg.section("online_dpo")
    R, P, C = cfg.train.batch_size, sec.max_prompt_length, sec.max_completion_length
    share, batch_sh, program = online_dpo_program(cfg, bundle, cfg.train.max_steps or 1000)
    batch = OnlineDPOBatch(full_rows(R, P, C), np.ones(R, np.float32),
                           np.zeros((R, C), np.float32))
    if share:
        batch = layout.to_shared_prompt(batch, 2)
    return [train_step_program(program, batch, batch_sh, bundle, rows=R, length=P + C,
                               forwards=1),
            *rollout_programs(sec, bundle, R)]


def build_online_dpo_trainer(cfg: RunConfig, *, mesh=None) -> Trainer:
    sec: OnlineDPOSection = cfg.section("online_dpo")
    t, G = cfg.train, 2
    run = start_on_policy(cfg, "online_dpo", mesh=mesh, multi_process=True)
    bundle, mesh = run.bundle, run.mesh
    share, batch_sh, program = online_dpo_program(cfg, bundle, run.total_steps)
    ts = program.trainable
    params_of_state, decode_sh = decode_policy(ts, bundle.params, mesh)
    sampler = run.sampler(decode_sh)  # rewards are ranked in make_batch, not advantages
    score_fn = make_score_fn(bundle.graphdef, ts.params_fn, impl=t.logprob_impl, temperature=1.0,
                             rows_sh=batch_sh.rows, mesh=mesh,
                             rows_per_call=processes.rows_per_process(
                                 t.batch_size, G if share else None, where=cfg.source),
                             group_size=G if share else None)

    def make_batch(ro, chosen, pb) -> OnlineDPOBatch:
        batch, metrics = make_pair_batch(ro, run.eos_ids, sec)
        ro.metrics.update(metrics)  # RolloutSource logs the rollout's metrics with the step
        return batch

    source = RolloutSource(sec, prompts=run.train_prompts, sampler=sampler,
                           make_batch=make_batch, rows_per_step=t.batch_size,
                           params_of_state=params_of_state, score_fn=score_fn, score_ref=True,
                           seed=t.seed)
    return run.trainer(
        state=ts.state, step_fn=program.step_fn, source=source,
        put_batch=run.put_batch(batch_sh, share_prompt=share),
        parts=OnlineDPOParts(bundle, ts, program.tx, share_prompt=share),
        sampler=sampler, params_of_state=params_of_state)


train_online_dpo = register_builder("online_dpo", build_online_dpo_trainer,
                                    summary=("reward", "eval_accuracy"))
