"""The reward-model run: a score head on the decoder trained on preference pairs with
``jaxpt.algorithms.reward``'s Bradley-Terry loss, its held-out accuracy, and the export of
a trained checkpoint as a transformers sequence-classification model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import jax

from jaxpt.algorithms.reward import (
    HEAD,
    MODEL,
    RewardBatch,
    RewardSection,
    RewardSource,
    check_margins,
    make_reward_eval_step,
    make_reward_loss_fn,
    pair_collate,
    reward_batch_stats,
)
from jaxpt.config import RunConfig
from jaxpt.data.pairs import PairRows, read_pairs
from jaxpt.data.pipeline import preference_loader
from jaxpt.engine import build
from jaxpt.engine.aot import AotProgram, abstract_rows_batch
from jaxpt.engine.loop import Trainer
from jaxpt.engine.state import batch_shardings, is_abstract, with_shardings
from jaxpt.models.config import decoder_forward_flops
from jaxpt.models.scalar_head import (
    SCORE,
    export_reward_model,
    init_score_head,
    resolve_pad_id,
    score_head_shapes,
)
from jaxpt.sharding import replicated
from jaxpt.trainers.dpo import make_eval_fn
from jaxpt.trainers.registry import register_builder


@dataclasses.dataclass
class RewardParts(build.RunParts):
    loader: Any
    batch_sh: RewardBatch
    pad_id: int
    train_pairs: list
    eval_pairs: list | None


def score_head(cfg: RunConfig, bundle):
    """The score head's params (shapes only for an abstract bundle) and their shardings
    (replicated: one [1, E] row)."""
    sh = {SCORE: replicated(bundle.mesh)}
    if is_abstract(bundle.params):
        return with_shardings(score_head_shapes(bundle.model_cfg), sh), sh
    return jax.device_put(init_score_head(bundle.model_cfg, seed=cfg.train.seed), sh), sh


def reward_programs(cfg: RunConfig, bundle, total: int, batch_sh, *, pad_id: int,
                    with_eval: bool):
    """The jitted programs of a reward-model run: the train program (decoder and score
    head, two param groups, ``reward.head_lr`` for the head) and the eval step (None
    without ``with_eval``): what the trainer runs and ``jaxpt plan --compile`` compiles."""
    section: RewardSection = cfg.section("reward")
    head_optim = cfg.optim
    if section.head_lr is not None:
        head_optim = dataclasses.replace(cfg.optim, lr=section.head_lr)
    program = build.train_program(
        cfg, bundle, total, make_reward_loss_fn(bundle.graphdef, section, pad_id=pad_id),
        batch_sh, batch_stats_fn=reward_batch_stats, heads={HEAD: score_head(cfg, bundle)},
        optim={MODEL: cfg.optim, HEAD: head_optim}, model_group=MODEL)
    eval_step = None
    if with_eval:
        ts = program.trainable
        eval_step = jax.jit(
            make_reward_eval_step(bundle.graphdef, ts.params_fn, section, pad_id=pad_id),
            in_shardings=(ts.shardings, batch_sh), out_shardings=replicated(bundle.mesh))
    return program, eval_step


def aot_programs(cfg: RunConfig, bundle) -> list[AotProgram]:
    """For ``jaxpt plan --compile``: the train step and, with held-out pairs, the eval step,
    on ``train.batch_size`` pairs (two rows of ``data.max_length`` each, with a margin
    column: the larger batch). The pad id only moves where each row's score is read."""
    section: RewardSection = cfg.section("reward")
    t, T = cfg.train, cfg.data.max_length
    ndims = RewardBatch(PairRows.ndims(), 1)
    batch_sh = batch_shardings(ndims, bundle.mesh)
    with_eval = cfg.data.eval is not None or section.eval_holdout > 0
    program, eval_step = reward_programs(cfg, bundle, t.max_steps or 1000, batch_sh, pad_id=0,
                                         with_eval=with_eval)
    batch = lambda rows: abstract_rows_batch(ndims, batch_sh, rows, T)  # noqa: E731
    state, m = program.trainable.state, bundle.model_cfg
    # forward + backward of the decoder; the score head reads one position (no LM head)
    flops = lambda rows: 3.0 * decoder_forward_flops(m, 2 * rows, T)  # noqa: E731
    out = [AotProgram("train step", program.step_fn, (state, batch(t.batch_size)),
                      flops(t.batch_size))]
    if eval_step is not None:
        eval_bs = build.eval_batch_size(cfg)
        out.append(AotProgram("eval step", eval_step, (state, batch(eval_bs)), flops(eval_bs) / 3))
    return out


def build_reward_trainer(cfg: RunConfig, *, mesh=None) -> Trainer:
    """Data, decoder + score head, their two-group state, jitted step and held-out eval of a
    reward-model run (see the module doc)."""
    section: RewardSection = cfg.section("reward")
    t, n_proc = cfg.train, jax.process_count()
    bundle = build.start_run(cfg, mesh)
    mesh = bundle.mesh
    pad_id = resolve_pad_id(bundle.tokenizer)
    read = functools.partial(build.read_data_records, cfg)
    try:
        train_pairs, train_stats, eval_pairs = read_pairs(
            read, bundle.tokenizer, cfg.data, holdout=section.eval_holdout, source=cfg.source
        )
    except ValueError as e:  # read_pairs names DPO's key; here it is reward.eval_holdout
        raise ValueError(str(e).replace("dpo.eval_holdout", "reward.eval_holdout")) from None
    with_margin = check_margins(train_pairs, f"{cfg.source}: data.train")
    if eval_pairs is not None and check_margins(eval_pairs, f"{cfg.source}: held-out") != (
        with_margin
    ):
        raise ValueError(
            f"{cfg.source}: the training pairs {'have' if with_margin else 'have no'} "
            "'margin' column but the held-out pairs do not agree; give both or neither"
        )
    eval_bs = build.eval_batch_size(cfg, mesh if eval_pairs is not None else None)
    length = cfg.data.max_length
    collate = pair_collate(length, pad_id, with_margin)
    loader = preference_loader(
        train_pairs, batch_size=t.batch_size // n_proc, max_length=length, collate=collate,
        seed=t.seed, shuffle=cfg.data.shuffle, pad_id=pad_id, stats=train_stats,
    )
    total = t.max_steps or max(1, math.ceil(t.num_epochs * loader.batches_per_epoch))
    batch_sh = batch_shardings(RewardBatch(PairRows.ndims(), 1 if with_margin else None), mesh)

    program, eval_step = reward_programs(cfg, bundle, total, batch_sh, pad_id=pad_id,
                                         with_eval=eval_pairs is not None)
    ts, tx, step_fn = program.trainable, program.tx, program.step_fn

    eval_fn = None
    if eval_pairs is not None:
        eval_loader = preference_loader(
            eval_pairs, batch_size=eval_bs // n_proc, max_length=length, collate=collate,
            shuffle=False, num_epochs=1, pad_id=pad_id,
        )
        eval_fn = make_eval_fn(
            eval_step,
            lambda: RewardSource(eval_loader, batch_sh),
            t.eval_batches if t.eval_batches is not None else eval_loader.batches_per_epoch,
            eval_bs,
        )
    parts = RewardParts(bundle, ts, tx, loader, batch_sh, pad_id, train_pairs, eval_pairs)
    return Trainer(
        cfg=cfg,
        mesh=mesh,
        state=ts.state,
        step_fn=step_fn,
        source=RewardSource(loader, batch_sh),
        put_batch=lambda batch: batch,  # the source serves device batches
        total_steps=total,
        eval_fn=eval_fn,
        tokens_fn=RewardBatch.num_tokens,
        num_params=bundle.num_params,
        batches_per_epoch=loader.batches_per_epoch,
        data_stats=train_stats,
        parts=parts,
    )


def export_reward_checkpoint(checkpoint, out_dir, *, dtype=None, overwrite=False, protect=()):
    """A reward run's checkpoint -> a Hugging Face ``AutoModelForSequenceClassification``
    dir (LoRA merged; ``score.weight``; ``pad_token_id`` the one training read rows with).
    Returns (out dir, step)."""
    from jaxpt.engine.export import restore_model_params

    params, bundle, step = restore_model_params(
        checkpoint, heads={HEAD: score_head_shapes}, model_group=MODEL
    )
    out = export_reward_model(
        params[MODEL], params[HEAD], bundle.model_cfg, out_dir,
        pad_id=resolve_pad_id(bundle.tokenizer), tokenizer=bundle.tokenizer, dtype=dtype,
        overwrite=overwrite, protect=protect,
    )
    return Path(out), step


train_reward = register_builder("reward", build_reward_trainer)
