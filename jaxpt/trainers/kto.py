"""The KTO run: unpaired desirable / undesirable rows as DPO's sources serve them, the
mismatched-pair KL rows and the reference, the train step of ``jaxpt.algorithms.kto``'s
loss and the held-out metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import numpy as np

from jaxpt.algorithms.kto import (
    KTOBatch,
    KTOSection,
    KTOSource,
    kto_batch_stats,
    make_kto_eval_step,
    make_kto_loss_fn,
)
from jaxpt.config import RunConfig
from jaxpt.data.pairs import PairLayout, PairRows, choose_layout
from jaxpt.data.unpaired import read_unpaired, with_mismatched
from jaxpt.engine import build
from jaxpt.engine.aot import AotProgram
from jaxpt.engine.loop import Trainer
from jaxpt.engine.state import batch_shardings
from jaxpt.models.config import decoder_forward_flops
from jaxpt.rl.scoring import RefLogps, make_ref_logps_fn, precompute_ref_table
from jaxpt.sharding import replicated
from jaxpt.trainers.dpo import make_eval_fn as pairs_eval_fn
from jaxpt.trainers.dpo import pair_aot_programs
from jaxpt.trainers.registry import register_builder


@dataclasses.dataclass
class KTOParts(build.RunParts):
    layout: PairLayout
    batch_sh: KTOBatch
    train_rows: list  # TokenizedPreference (own, mismatched) per row
    train_labels: np.ndarray


def kto_programs(cfg: RunConfig, bundle, total: int, batch_sh, *, ref_logps, with_eval: bool,
                 eval_bs: int):
    """The jitted programs of a KTO run: the train program (with the reference copy unless
    ``kto.precompute_ref_logps``), the online reference forward on ``state.frozen`` for
    train and eval batches (None when precomputed) and the eval step (None without
    ``with_eval``): what the trainer runs and ``jaxpt plan --compile`` compiles."""
    kto, t = cfg.section("kto"), cfg.train
    online_ref = not kto.precompute_ref_logps
    loss_fn = make_kto_loss_fn(bundle.graphdef, kto, impl=t.logprob_impl,
                               with_entropy=t.with_entropy)
    program = build.train_program(cfg, bundle, total, loss_fn, batch_sh,
                                  batch_stats_fn=kto_batch_stats, reference=online_ref)
    ts = program.trainable

    def online(fn):  # jitted reference forward on state.frozen, run by the source
        return jax.jit(fn, in_shardings=(ts.shardings.frozen, batch_sh.pairs),
                       out_shardings=batch_sh.ref)

    train_ref = online(ref_logps) if online_ref else None
    eval_ref = eval_step = None
    if with_eval:
        eval_ref = train_ref
        if online_ref and eval_bs != t.batch_size:  # ref_logps splits train micro-batches
            eval_ref = online(make_ref_logps_fn(bundle.graphdef, impl=t.logprob_impl))
        eval_step = jax.jit(make_kto_eval_step(bundle.graphdef, ts.params_fn, kto,
                                               impl=t.logprob_impl),
                            in_shardings=(ts.shardings, batch_sh),
                            out_shardings=replicated(bundle.mesh))
    return program, train_ref, eval_ref, eval_step


def aot_programs(cfg: RunConfig, bundle) -> list[AotProgram]:
    """For ``jaxpt plan --compile``: the train step, the reference forward (online, or the
    precompute pass over the same rows) and, with held-out rows, the eval step, on
    ``train.batch_size`` rows in the flat layout (each row and its mismatched completion:
    two rows of ``data.max_length``; the shared-prompt layout is never larger)."""
    kto, t = cfg.section("kto"), cfg.train
    ndims = KTOBatch(PairRows.ndims(), 1, RefLogps(1, 1))
    batch_sh = batch_shardings(ndims, bundle.mesh)
    ref_logps = make_ref_logps_fn(bundle.graphdef, impl=t.logprob_impl, grad_accum=t.grad_accum)
    with_eval = cfg.data.eval is not None or kto.eval_holdout > 0
    eval_bs = build.eval_batch_size(cfg)
    program, train_ref, _, eval_step = kto_programs(
        cfg, bundle, t.max_steps or 1000, batch_sh, ref_logps=ref_logps, with_eval=with_eval,
        eval_bs=eval_bs)
    return pair_aot_programs(cfg, bundle, ndims, batch_sh, program, eval_step, eval_bs,
                             ref_logps=ref_logps, train_ref=train_ref)


def build_kto_trainer(cfg: RunConfig, *, mesh=None) -> Trainer:
    """Data, model, state (with the reference where online), reference log-probs, jitted step
    and eval of a KTO run (module doc)."""
    kto: KTOSection = cfg.section("kto")
    t, n_proc = cfg.train, jax.process_count()
    bundle = build.start_run(cfg, mesh)
    mesh = bundle.mesh
    local_bs = t.batch_size // n_proc
    train_ex, train_stats, eval_ex = read_unpaired(
        functools.partial(build.read_data_records, cfg), bundle.tokenizer, cfg.data,
        holdout=kto.eval_holdout, source=cfg.source)
    eval_bs = build.eval_batch_size(cfg, mesh if eval_ex is not None else None)
    rows, labels = with_mismatched(train_ex, chunk=local_bs, max_length=cfg.data.max_length)
    eval_rows = eval_labels = None
    if eval_ex is not None:
        eval_rows, eval_labels = with_mismatched(eval_ex, chunk=eval_bs // n_proc,
                                                 max_length=cfg.data.max_length)
    pad_id = bundle.tokenizer.pad_token_id
    layout = choose_layout(kto.share_prompt, [*rows, *(eval_rows or ())],
                           max_length=cfg.data.max_length, pad_id=0 if pad_id is None else pad_id,
                           forward_flops=functools.partial(decoder_forward_flops, bundle.model_cfg))
    loader = layout.loader(rows, batch_size=local_bs, seed=t.seed, shuffle=cfg.data.shuffle,
                           stats=train_stats)
    total = t.max_steps or max(1, math.ceil(t.num_epochs * loader.batches_per_epoch))
    batch_sh = batch_shardings(KTOBatch(layout.rows.ndims(), 1, RefLogps(1, 1)), mesh)
    ref_logps = make_ref_logps_fn(bundle.graphdef, impl=t.logprob_impl, grad_accum=t.grad_accum)
    tables: dict[str, np.ndarray] = {}
    if kto.precompute_ref_logps:
        splits = {"train": rows, **({"eval": eval_rows} if eval_rows else {})}
        t0 = time.perf_counter()
        tables = precompute_ref_table(
            ref_logps, bundle.params, splits,
            rows_of=lambda pairs: layout.rows.from_dict(layout.collate(pairs)),
            rows_per_call=local_bs, rows_sh=batch_sh.pairs, params_sh=bundle.params_sh)
        print(f"kto: precomputed reference log-probs of {sum(map(len, splits.values()))} rows "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
    program, online_ref, eval_ref, eval_step = kto_programs(
        cfg, bundle, total, batch_sh, ref_logps=ref_logps,
        with_eval=eval_rows is not None, eval_bs=eval_bs)
    ts = program.trainable
    eval_fn = None
    if eval_rows is not None:
        eval_loader = layout.loader(eval_rows, batch_size=eval_bs // n_proc, shuffle=False,
                                    num_epochs=1)
        per_pair = pairs_eval_fn(
            eval_step,
            lambda: KTOSource(eval_loader, layout, eval_labels, batch_sh, ref_fn=eval_ref,
                              table=tables.get("eval")),
            t.eval_batches if t.eval_batches is not None else eval_loader.batches_per_epoch,
            eval_bs)

        def eval_fn(state):  # DPO's held-out loop; its rows are KTO rows, not pairs
            out = per_pair(state)
            out["eval_num_rows"] = out.pop("eval_num_pairs")
            return out

    source = KTOSource(loader, layout, labels, batch_sh, ref_fn=online_ref,
                       table=tables.get("train"))
    return Trainer(
        cfg=cfg, mesh=mesh, state=ts.state, step_fn=program.step_fn, source=source,
        put_batch=lambda batch: batch,  # the source serves device batches (online reference)
        total_steps=total, eval_fn=eval_fn, tokens_fn=KTOBatch.num_tokens,
        num_params=bundle.num_params, batches_per_epoch=loader.batches_per_epoch,
        data_stats=train_stats,
        parts=KTOParts(bundle, ts, program.tx, layout, batch_sh, rows, labels),
    )


train_kto = register_builder("kto", build_kto_trainer)
