"""The SFT run: packed or padded rows from the chat data (``jaxpt.data``), the train step
of ``jaxpt.algorithms.sft``'s loss, the held-out loss / accuracy and, for ``jaxpt plan
--compile``, the programs it compiles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxpt.algorithms.sft import (
    SFT_BATCH_NDIMS,
    SFTBatch,
    default_mask_token_id,
    make_sft_eval_step,
    make_sft_loss_fn,
    sft_batch_stats,
)
from jaxpt.config import RunConfig, SFTConfig
from jaxpt.data import BATCH_KEYS, DataStats, prepare_sft, sft_loader
from jaxpt.engine.aot import AotProgram, train_step_flops
from jaxpt.engine.build import (
    RunParts,
    eval_batch_size,
    read_data_records,
    start_run,
    train_program,
)
from jaxpt.engine.loop import IteratorSource, Trainer
from jaxpt.engine.state import batch_shardings, put_batch
from jaxpt.sharding import replicated
from jaxpt.trainers.registry import register_builder


@dataclasses.dataclass
class SFTParts(RunParts):
    loader: Any  # the train data loader (grain)


def sft_programs(cfg: RunConfig, bundle, total: int, mask_token_id, *, with_eval: bool):
    """The run's train program (state, optimizer, jitted step), its batch shardings and the
    jitted eval step (None without ``with_eval``): what the trainer runs and what ``jaxpt
    plan --compile`` compiles."""
    t = cfg.train
    common = dict(impl=t.logprob_impl, with_entropy=t.with_entropy, with_accuracy=t.token_accuracy)
    loss_fn = make_sft_loss_fn(
        bundle.graphdef, cfg.section("sft"), mask_token_id=mask_token_id, **common
    )
    batch_sh = batch_shardings(SFT_BATCH_NDIMS, bundle.mesh)
    program = train_program(cfg, bundle, total, loss_fn, batch_sh, batch_stats_fn=sft_batch_stats)
    eval_step = None
    if with_eval:
        ts = program.trainable
        eval_step = jax.jit(
            make_sft_eval_step(bundle.graphdef, ts.params_fn, **common),
            in_shardings=(ts.shardings, batch_sh),
            out_shardings=replicated(bundle.mesh),
        )
    return program, batch_sh, eval_step


def aot_programs(cfg: RunConfig, bundle) -> list[AotProgram]:
    """The train step and (with ``data.eval``) the eval step on ``train.batch_size`` rows of
    ``data.max_length`` tokens (eval: ``train.eval_batch_size`` rows), for ``jaxpt plan
    --compile`` (``bundle``: :func:`~jaxpt.engine.build.abstract_bundle`)."""
    t, T = cfg.train, cfg.data.max_length
    mask_id = 0 if cfg.section("sft").masked_thought > 0 else None  # any id: shapes only
    program, batch_sh, eval_step = sft_programs(
        cfg, bundle, t.max_steps or 1000, mask_id, with_eval=cfg.data.eval is not None
    )

    def batch(rows):
        dtype = lambda k: jnp.float32 if k == "loss_mask" else jnp.int32  # noqa: E731
        return SFTBatch(**{k: jax.ShapeDtypeStruct((rows, T), dtype(k),
                                                   sharding=getattr(batch_sh, k))
                           for k in BATCH_KEYS})

    state, m = program.trainable.state, bundle.model_cfg
    out = [AotProgram("train step", program.step_fn, (state, batch(t.batch_size)),
                      train_step_flops(m, t.batch_size, T))]
    if eval_step is not None:
        rows = eval_batch_size(cfg)
        out.append(AotProgram("eval step", eval_step, (state, batch(rows)),
                              train_step_flops(m, rows, T) / 3))
    return out


def build_sft_trainer(cfg: RunConfig, *, mesh=None) -> Trainer:
    """Data, model, state, jitted step and eval for an SFT run (see module doc)."""
    sft: SFTConfig = cfg.section("sft")
    t = cfg.train
    bundle = start_run(cfg, mesh)
    mesh, tok, n_proc = bundle.mesh, bundle.tokenizer, jax.process_count()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def examples(which):
        stats = DataStats()
        records = read_data_records(cfg, which, stats=stats)
        ex, stats = prepare_sft(
            records,
            tok,
            max_length=cfg.data.max_length,
            truncation=cfg.data.truncation,
            completion_only=cfg.data.completion_only,
            assistant_only=cfg.data.assistant_only,
            skip_invalid=cfg.data.skip_invalid,
            stats=stats,
        )
        if not ex:
            raise ValueError(f"{cfg.source}: data.{which} has no usable examples ({stats})")
        return ex, stats

    train_ex, train_stats = examples("train")
    loader = sft_loader(
        train_ex,
        batch_size=t.batch_size // n_proc,
        max_length=cfg.data.max_length,
        packing=cfg.data.packing,
        seed=t.seed,
        shuffle=cfg.data.shuffle,
        pad_id=pad_id,
        stats=train_stats,
    )
    total = t.max_steps or max(1, math.ceil(t.num_epochs * loader.batches_per_epoch))
    program, batch_sh, eval_step = sft_programs(
        cfg, bundle, total, default_mask_token_id(tok, sft), with_eval=cfg.data.eval is not None
    )
    ts = program.trainable

    def put(host: dict) -> SFTBatch:  # the loaders' dicts -> the step's typed batch
        return put_batch(SFTBatch(**host), batch_sh)

    eval_fn = None
    if cfg.data.eval is not None:
        eval_ex, _ = examples("eval")
        eval_bs = eval_batch_size(cfg, mesh)
        eval_loader = sft_loader(
            eval_ex,
            batch_size=eval_bs // n_proc,
            max_length=cfg.data.max_length,
            packing=cfg.data.packing,
            shuffle=False,
            num_epochs=1,
            pad_id=pad_id,
            seed=0,
        )
        eval_fn = make_eval_fn(eval_step, eval_loader, put, t.eval_batches)

    return Trainer(
        cfg=cfg,
        mesh=mesh,
        state=ts.state,
        step_fn=program.step_fn,
        source=IteratorSource(iter(loader)),
        put_batch=put,
        total_steps=total,
        eval_fn=eval_fn,
        num_params=bundle.num_params,
        batches_per_epoch=loader.batches_per_epoch,
        parts=SFTParts(bundle, ts, program.tx, loader),
        data_stats=train_stats,
    )


def make_eval_fn(eval_step, loader, put, max_batches: int | None):
    """Evaluate on the held-out loader: token-weighted ``eval_loss``,
    ``eval_mean_token_accuracy``, ``eval_entropy`` and ``eval_num_tokens``."""

    def eval_fn(state) -> dict[str, float]:
        outs = []
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            outs.append(eval_step(state, put(batch)))
        sums: dict[str, float] = {}
        for o in jax.device_get(outs):
            for k, v in o.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        n = max(sums.get("n", 0.0), 1.0)
        res = {"eval_loss": sums.get("nll", 0.0) / n, "eval_num_tokens": sums.get("n", 0.0)}
        if "correct" in sums:
            res["eval_mean_token_accuracy"] = sums["correct"] / n
        if "entropy" in sums:
            res["eval_entropy"] = sums["entropy"] / n
        return res

    return eval_fn


train_sft = register_builder("sft", build_sft_trainer)
