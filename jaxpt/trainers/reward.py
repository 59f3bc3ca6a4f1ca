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
from jaxpt.engine.loop import Trainer
from jaxpt.engine.state import (
    batch_shardings,
    compile_step,
    make_optimizer,
    make_train_step,
)
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

    head_sh = {SCORE: replicated(mesh)}
    head = jax.device_put(init_score_head(bundle.model_cfg, seed=t.seed), head_sh)
    head_optim = cfg.optim
    if section.head_lr is not None:
        head_optim = dataclasses.replace(cfg.optim, lr=section.head_lr)
    tx, schedule = make_optimizer({MODEL: cfg.optim, HEAD: head_optim}, total)
    ts = build.build_train_state(bundle, cfg, tx, heads={HEAD: (head, head_sh)},
                                 model_group=MODEL)
    step = make_train_step(
        make_reward_loss_fn(bundle.graphdef, section, pad_id=pad_id), tx, schedule,
        grad_accum=t.grad_accum, batch_stats_fn=reward_batch_stats, params_fn=ts.params_fn,
    )
    step_fn = compile_step(step, ts.shardings, batch_sh, mesh)

    eval_fn = None
    if eval_pairs is not None:
        eval_loader = preference_loader(
            eval_pairs, batch_size=eval_bs // n_proc, max_length=length, collate=collate,
            shuffle=False, num_epochs=1, pad_id=pad_id,
        )
        eval_step = jax.jit(
            make_reward_eval_step(bundle.graphdef, ts.params_fn, section, pad_id=pad_id),
            in_shardings=(ts.shardings, batch_sh),
            out_shardings=replicated(mesh),
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
