"""The PPO run: a value head beside the policy (its own param group and learning rate),
the rollout scored by policy, critic and reference in one jitted pass, GAE on the host
(``jaxpt.algorithms.ppo.complete_rollout``), and ReFT's SFT warm-up in the same step.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from jaxpt.algorithms.ppo import (
    PPOBatch,
    PPOSection,
    complete_rollout,
    make_batch_stats,
    make_ppo_loss_fn,
)
from jaxpt.config import RunConfig
from jaxpt.engine import build as eb
from jaxpt.engine import state as es
from jaxpt.engine.loop import Trainer
from jaxpt.rl.critic import init_value_head, policy_and_values
from jaxpt.rl.hybrids import Demonstrations
from jaxpt.rl.layout import (
    TokenRows,
    completion_token_logprobs,
)
from jaxpt.rl.rollout import decode_policy
from jaxpt.rl.run import start_on_policy
from jaxpt.rl.scoring import score_rows
from jaxpt.rl.source import RolloutSource
from jaxpt.sharding import replicated
from jaxpt.trainers.registry import register_builder


def make_rollout_scorer(graphdef, head_gd, params_fn, *, impl: str, temperature: float,
                        rows_sh, mesh, rows_per_call: int, reference: bool):
    """``score(state, rows) -> (logprobs_RC, values_RC1, ref_logprobs_RC | None)`` (numpy) of
    a whole rollout under the state's policy and critic (and its frozen reference), in calls
    of ``rows_per_call`` rows."""

    def fn(params, rows):
        full, ref = params
        model = nnx.merge(graphdef, full["policy"])
        lp, _, values = policy_and_values(model, nnx.merge(head_gd, full["value"]), rows,
                                          impl=impl, temperature=temperature, extra_value=True)
        ref_lp = None
        if reference:
            ref_lp, _ = completion_token_logprobs(nnx.merge(graphdef, ref), rows, impl=impl,
                                                  temperature=temperature)
        return lp, values, ref_lp

    jitted = jax.jit(fn, out_shardings=replicated(mesh))
    current = jax.jit(lambda s: params_fn(s.params, s.frozen, None))

    def score(state, rows: TokenRows):
        params = (current(state), state.frozen if reference else None)
        parts = [out for _, out in score_rows(
            jitted, params, len(rows.input_ids), rows_per_call=rows_per_call,
            host_batch=lambda idx: jax.tree.map(lambda v: v[idx], rows), batch_sh=rows_sh)]
        lp = np.concatenate([p[0] for p in parts]).astype(np.float32)
        values = np.concatenate([p[1] for p in parts]).astype(np.float32)
        ref = np.concatenate([p[2] for p in parts]).astype(np.float32) if reference else None
        return lp, values, ref

    return score


def ppo_program(cfg: RunConfig, bundle, total_steps: int):
    """(the value head's graphdef, the batch's shardings, the ``TrainProgram``: policy and
    value head, one optimizer each) of a run; on an abstract bundle the head is shapes only."""
    ppo: PPOSection = cfg.section("ppo")
    t = cfg.train
    head_gd, head = init_value_head(bundle.model_cfg.hidden_size, t.seed)
    head_sh = jax.tree.map(lambda _: replicated(bundle.mesh), head)
    place = es.with_shardings if es.is_abstract(bundle.params) else jax.device_put
    head = place(head, head_sh)
    value_optim = dataclasses.replace(
        cfg.optim, lr=cfg.optim.lr if ppo.value_lr is None else ppo.value_lr, weight_decay=0.0)
    loss_fn = make_ppo_loss_fn(bundle.graphdef, head_gd, ppo, impl=t.logprob_impl,
                               with_entropy=t.with_entropy)
    batch_sh = es.batch_shardings(PPOBatch.ndims(ppo), bundle.mesh)
    program = eb.train_program(
        cfg, bundle, total_steps, loss_fn, batch_sh, batch_stats_fn=make_batch_stats(ppo),
        reference=ppo.uses_reference(), heads={"value": (head, head_sh)},
        optim={"policy": cfg.optim, "value": value_optim})
    return head_gd, batch_sh, program


def aot_programs(cfg: RunConfig, bundle) -> list:
    """The train step on a rollout's mini-batch at full widths (with ReFT's demonstrations
    when ``sft_warmup_steps`` > 0) and the rollout's prefill and decode loop, for ``jaxpt
    plan --compile``. The whole-rollout scorer (policy, values, reference) is a forward of
    the same rows and is not listed."""
    from jaxpt.rl.aot import full_rows, rollout_programs, train_step_program

    ppo: PPOSection = cfg.section("ppo")
    R, P, C = cfg.train.batch_size, ppo.max_prompt_length, ppo.max_completion_length
    _, batch_sh, program = ppo_program(cfg, bundle, cfg.train.max_steps or 1000)
    per_token = np.zeros((R, C), np.float32)
    demo = full_rows(R, P, ppo.max_demo_length) if ppo.sft_warmup_steps > 0 else None
    batch = PPOBatch(full_rows(R, P, C), np.zeros(R, np.float32), per_token, per_token,
                     per_token, per_token, demo=demo)
    return [train_step_program(program, batch, batch_sh, bundle, rows=R, length=P + C,
                               forwards=int(ppo.uses_reference())),
            *rollout_programs(ppo, bundle, R * ppo.steps_per_generation)]


def build_ppo_trainer(cfg: RunConfig, *, mesh=None) -> Trainer:
    ppo: PPOSection = cfg.section("ppo")
    t, G = cfg.train, ppo.num_generations
    run = start_on_policy(cfg, "ppo", mesh=mesh, demonstrations=ppo.sft_warmup_steps > 0)
    bundle, mesh = run.bundle, run.mesh
    head_gd, batch_sh, program = ppo_program(cfg, bundle, run.total_steps)
    ts = program.trainable
    params_of_state, decode_sh = decode_policy(ts, bundle.params, mesh, group="policy")
    sampler = run.sampler(decode_sh)  # PPO's advantages need the critic: see `complete`
    T = ppo.temperature if ppo.temperature > 0 else 1.0
    scorer = make_rollout_scorer(bundle.graphdef, head_gd, ts.params_fn, impl=t.logprob_impl,
                                 temperature=T, rows_sh=batch_sh.rows, mesh=mesh,
                                 rows_per_call=t.batch_size, reference=ppo.uses_reference())
    demos = Demonstrations(bundle.tokenizer, run.pad_id, ppo.max_demo_length, G)

    def make_batch(ro, chosen, pb) -> PPOBatch:
        demo = demos.rows(chosen, pb) if ppo.sft_warmup_steps > 0 else None
        return PPOBatch(ro.rows, np.asarray(ro.rewards_R, np.float32), demo=demo)

    def complete(state, batch):
        lp, values, ref = scorer(state, batch.rows)
        return complete_rollout(ppo, batch, lp, values, ref, run.eos_ids)

    source = RolloutSource(
        ppo, prompts=run.train_prompts, sampler=sampler, make_batch=make_batch,
        rows_per_step=t.batch_size, params_of_state=params_of_state, score_fn=None,
        score_ref=False, seed=t.seed, complete=complete)
    return run.trainer(
        state=ts.state, step_fn=program.step_fn, source=source,
        put_batch=run.put_batch(batch_sh), parts=eb.RunParts(bundle, ts, program.tx),
        sampler=sampler, params_of_state=params_of_state)


train_ppo = register_builder("ppo", build_ppo_trainer, summary=("reward", "eval_accuracy"))
