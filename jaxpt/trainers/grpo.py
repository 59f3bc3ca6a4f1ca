"""The GRPO run: prompts, the rollout sampler on the policy's decode view, rewards and group
advantages (``jaxpt.rl``), the old / reference scorer, the hybrids' demonstrations and
prefixes, the train step of ``jaxpt.algorithms.grpo``'s loss, and the programs ``jaxpt plan
--compile`` compiles (train step, rollout prefill and decode).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpt.algorithms.grpo import GRPOBatch, GRPOSection, make_batch_stats, make_grpo_loss_fn
from jaxpt.config import RunConfig
from jaxpt.engine import build as eb
from jaxpt.engine import state as es
from jaxpt.engine.loop import Trainer
from jaxpt.rl import layout, processes
from jaxpt.rl.correction import correction_weights
from jaxpt.rl.hybrids import Demonstrations, PrefixRFT, SASRMixer
from jaxpt.rl.rollout import decode_policy
from jaxpt.rl.run import start_on_policy
from jaxpt.rl.scoring import make_score_fn
from jaxpt.rl.source import RolloutSource
from jaxpt.rl.streams import RandomStreams
from jaxpt.trainers.registry import register_builder


@dataclasses.dataclass
class GRPOParts(eb.RunParts):
    share_prompt: bool  # the train step packs each group as one shared-prompt row


def grpo_program(cfg: RunConfig, bundle, total_steps: int):
    """(shared-prompt layout?, the batch's shardings, the ``TrainProgram``) of a run."""
    grpo: GRPOSection = cfg.section("grpo")
    t = cfg.train
    loss_fn = make_grpo_loss_fn(bundle.graphdef, grpo, impl=t.logprob_impl,
                                with_entropy=t.with_entropy)
    share = layout.use_shared_prompt(grpo.share_prompt, group_size=grpo.num_generations,
                                     batch_size=t.batch_size, grad_accum=t.grad_accum,
                                     mesh=bundle.mesh, where=cfg.source)
    batch_sh = es.batch_shardings(GRPOBatch.ndims(grpo, share), bundle.mesh)
    program = eb.train_program(cfg, bundle, total_steps, loss_fn, batch_sh,
                               batch_stats_fn=make_batch_stats(grpo), reference=grpo.beta > 0)
    return share, batch_sh, program


def aot_programs(cfg: RunConfig, bundle) -> list:
    """The train step on a rollout batch at the section's full widths (in the layout the run
    would use) and the rollout's prefill and decode loop, for ``jaxpt plan --compile``
    (``bundle``: ``engine.build.abstract_bundle``)."""
    from jaxpt.rl.aot import full_rows, rollout_programs, train_step_program

    grpo: GRPOSection = cfg.section("grpo")
    G, R = grpo.num_generations, cfg.train.batch_size
    share, batch_sh, program = grpo_program(cfg, bundle, cfg.train.max_steps or 1000)
    P, C = grpo.max_prompt_length, grpo.max_completion_length
    if grpo.prefix_rft_ratio > 0:  # prefix + continuation, the prefix width rounded to 16
        C += -(-grpo.max_demo_length // 16) * 16
    per_token, used = np.zeros((R, C), np.float32), grpo.optional_parts()
    parts = {"old_logprobs": per_token, "ref_logprobs": per_token,
             "prefix_lengths": np.zeros(R, np.int32), "sft_mode": np.zeros(R, np.float32),
             "demo": full_rows(R, P, grpo.max_demo_length), "sampling_weights": per_token}
    batch = GRPOBatch(full_rows(R, P, C), np.zeros(R, np.float32),
                      **{k: v if used[k][0] else None for k, v in parts.items()})
    if share:
        batch = layout.to_shared_prompt(batch, G)
    return [train_step_program(program, batch, batch_sh, bundle, rows=R, length=P + C,
                               forwards=int(grpo.beta > 0)),
            *rollout_programs(grpo, bundle, R * grpo.steps_per_generation)]


def build_grpo_trainer(cfg: RunConfig, *, mesh=None) -> Trainer:
    grpo: GRPOSection = cfg.section("grpo")
    t, G = cfg.train, grpo.num_generations
    run = start_on_policy(cfg, "grpo", mesh=mesh, multi_process=True,
                          demonstrations=grpo.sft_weight > 0 or grpo.prefix_rft_ratio > 0)
    bundle, mesh, tok = run.bundle, run.mesh, run.bundle.tokenizer
    share, batch_sh, program = grpo_program(cfg, bundle, run.total_steps)
    ts = program.trainable
    params_of_state, decode_sh = decode_policy(ts, bundle.params, mesh)
    sampler = run.sampler(decode_sh, grpo.advantages)
    score_fn = make_score_fn(bundle.graphdef, ts.params_fn, impl=t.logprob_impl,
                             temperature=grpo.temperature if grpo.temperature > 0 else 1.0,
                             rows_sh=batch_sh.rows, mesh=mesh,
                             rows_per_call=processes.rows_per_process(
                                 t.batch_size, G if share else None, where=cfg.source),
                             group_size=G if share else None)
    demos = Demonstrations(tok, run.pad_id, grpo.max_demo_length, G)
    corrected = grpo.rollout_correction != "none"

    def make_batch(ro, chosen, pb) -> GRPOBatch:
        prefix_R = ro.prefix_lengths_R if grpo.prefix_rft_ratio > 0 else None
        demo = demos.rows(chosen, pb) if grpo.sft_weight > 0 else None
        sampled = ro.sampling_logprobs_RC if corrected else None
        return GRPOBatch(ro.rows, ro.advantages_R, prefix_lengths=prefix_R, demo=demo,
                         sampling_logprobs=sampled)

    def correct(batch: GRPOBatch):  # the scored rollout -> its importance weights
        w_RC, metrics = correction_weights(
            batch.old_logprobs, batch.sampling_logprobs, batch.rows.completion_mask,
            mode=grpo.rollout_correction, cap=grpo.rollout_correction_cap)
        return dataclasses.replace(batch, sampling_weights=w_RC, sampling_logprobs=None), metrics

    prefixes = mixer = None
    if grpo.prefix_rft_ratio > 0:
        prefixes = PrefixRFT(demos, max(1, round(grpo.prefix_rft_ratio * G)),
                             grpo.prefix_min_fraction, grpo.prefix_max_fraction,
                             RandomStreams(t.seed))
    if grpo.sft_schedule == "adaptive":
        mixer = SASRMixer(grpo.sft_warmup_steps, grpo.sasr_gamma, t.seed)
    source = RolloutSource(
        grpo, prompts=run.train_prompts, sampler=sampler, make_batch=make_batch,
        rows_per_step=t.batch_size, params_of_state=params_of_state, score_fn=score_fn,
        score_ref=grpo.beta > 0, seed=t.seed, prefixes=prefixes, mixer=mixer,
        correct=correct if corrected else None,
        score_old=grpo.optional_parts()["old_logprobs"][0])
    return run.trainer(
        state=ts.state, step_fn=program.step_fn, source=source,
        put_batch=run.put_batch(batch_sh, share_prompt=share),
        parts=GRPOParts(bundle, ts, program.tx, share_prompt=share),
        sampler=sampler, params_of_state=params_of_state)


train_grpo = register_builder("grpo", build_grpo_trainer, summary=("reward", "eval_accuracy"))
