"""The DPO run: preference pairs in the layout chosen from their lengths, the reference
log-probs (a table before training, or a jitted forward of the frozen copy before each
step), the train and eval programs of ``jaxpt.algorithms.dpo``'s loss, and the held-out
metrics averaged over pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import numpy as np

from jaxpt.algorithms.dpo import (
    DPOBatch,
    DPOSection,
    DPOSource,
    dpo_batch_stats,
    make_dpo_eval_step,
    make_dpo_loss_fn,
)
from jaxpt.config import RunConfig
from jaxpt.data.pairs import (
    PairLayout,
    PairRows,
    choose_layout,
    read_pairs,
)
from jaxpt.engine import build
from jaxpt.engine.aot import AotProgram, abstract_rows_batch, train_step_flops
from jaxpt.engine.loop import Trainer
from jaxpt.engine.state import (
    batch_shardings,
)
from jaxpt.losses.dpo import needs_reference
from jaxpt.models.config import decoder_forward_flops
from jaxpt.rl.scoring import RefLogps, make_ref_logps_fn, precompute_ref_table
from jaxpt.sharding import replicated
from jaxpt.trainers.registry import register_builder


def make_eval_fn(eval_step, new_source, num_batches: int, pairs_per_batch: int):
    """Evaluate on the held-out pairs: every ``dpo_loss`` metric averaged over the batches of
    a fresh ``new_source()`` (all of one size, so over pairs), prefixed ``eval_``
    (``eval_loss``, ``eval_rewards/accuracies`` ...), and ``eval_num_pairs``."""

    def eval_fn(state) -> dict[str, float]:
        source, outs = new_source(), []
        for _ in range(num_batches):
            try:
                outs.append(eval_step(state, source.next(state)))
            except StopIteration:
                break
        sums: dict[str, float] = {}
        for o in jax.device_get(outs):
            for k, v in o.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        res = {f"eval_{k}": v / max(len(outs), 1) for k, v in sums.items()}
        return {**res, "eval_num_pairs": float(len(outs) * pairs_per_batch)}

    return eval_fn


@dataclasses.dataclass
class DPOParts(build.RunParts):
    loader: Any  # the train pairs' loader
    layout: PairLayout
    batch_sh: DPOBatch  # the step batch's shardings (``ref`` None: the step takes none)
    ref_logps: Any  # jitted online reference (ref params, pairs) -> RefLogps, or None
    ref_tables: dict  # split -> precomputed reference log-probs [N, 2]
    train_pairs: list
    eval_pairs: list | None


def dpo_programs(cfg, bundle, total, batch_sh, *, online_ref, with_eval, eval_bs, ref_logps):
    """The jitted programs of a DPO run: the train program (state with the reference copy
    when ``online_ref``), the online reference forward on ``state.frozen`` for train and
    eval batches (None without ``online_ref``) and the eval step (None without
    ``with_eval``): what the trainer runs and ``jaxpt plan --compile`` compiles."""
    dpo, t = cfg.section("dpo"), cfg.train
    train_opts = dict(with_entropy=t.with_entropy, with_accuracy=t.token_accuracy)
    loss_fn = make_dpo_loss_fn(bundle.graphdef, dpo, impl=t.logprob_impl, **train_opts)
    program = build.train_program(cfg, bundle, total, loss_fn, batch_sh,
                                  batch_stats_fn=dpo_batch_stats, reference=online_ref)
    ts = program.trainable

    def online(fn):  # jitted reference forward on state.frozen, run by the source
        sh = (ts.shardings.frozen, batch_sh.pairs)
        return jax.jit(fn, in_shardings=sh, out_shardings=batch_sh.ref)

    train_ref = online(ref_logps) if online_ref else None
    eval_ref = eval_step = None
    if with_eval:
        eval_ref = train_ref
        if online_ref and eval_bs != t.batch_size:  # ref_logps splits train micro-batches
            eval_ref = online(make_ref_logps_fn(bundle.graphdef, impl=t.logprob_impl))
        eval_step = jax.jit(
            make_dpo_eval_step(bundle.graphdef, ts.params_fn, dpo, impl=t.logprob_impl),
            in_shardings=(ts.shardings, batch_sh),
            out_shardings=replicated(bundle.mesh),
        )
    return program, train_ref, eval_ref, eval_step


def aot_programs(cfg: RunConfig, bundle) -> list[AotProgram]:
    """For ``jaxpt plan --compile``: the train step, the reference forward (online, or the
    precompute pass over the same rows) and, with held-out pairs, the eval step, on
    ``train.batch_size`` pairs in the flat layout (two rows of ``data.max_length``; the
    shared-prompt layout, chosen from the data's lengths, is never larger)."""
    dpo, t = cfg.section("dpo"), cfg.train
    use_ref = needs_reference(dpo)
    precompute = use_ref and dpo.precompute_ref_logps
    ndims = DPOBatch(PairRows.ndims(), RefLogps(1, 1) if use_ref else None)
    batch_sh = batch_shardings(ndims, bundle.mesh)
    ref_logps = make_ref_logps_fn(bundle.graphdef, impl=t.logprob_impl, grad_accum=t.grad_accum)
    with_eval = cfg.data.eval is not None or dpo.eval_holdout > 0
    eval_bs = build.eval_batch_size(cfg)
    program, train_ref, _, eval_step = dpo_programs(
        cfg, bundle, t.max_steps or 1000, batch_sh, online_ref=use_ref and not precompute,
        with_eval=with_eval, eval_bs=eval_bs, ref_logps=ref_logps,
    )
    return pair_aot_programs(cfg, bundle, ndims, batch_sh, program, eval_step, eval_bs,
                             ref_logps=ref_logps if use_ref else None, train_ref=train_ref)


def pair_aot_programs(cfg: RunConfig, bundle, ndims, batch_sh, program, eval_step, eval_bs: int,
                      *, ref_logps=None, train_ref=None) -> list[AotProgram]:
    """The ``aot_programs`` of a run on pair rows (DPO, KTO): the train step on
    ``train.batch_size`` pairs of two ``data.max_length`` rows, the reference forward
    (``train_ref`` on ``state.frozen`` when online, else ``ref_logps`` on the params: the
    precompute pass; none when ``ref_logps`` is None) and the eval step when given."""
    t, T = cfg.train, cfg.data.max_length
    batch = lambda rows: abstract_rows_batch(ndims, batch_sh, rows, T)  # noqa: E731
    state, m = program.trainable.state, bundle.model_cfg
    flops = lambda rows: train_step_flops(m, 2 * rows, T)  # noqa: E731
    out = [AotProgram("train step", program.step_fn, (state, batch(t.batch_size)),
                      flops(t.batch_size))]
    if ref_logps is not None:
        fn = train_ref or jax.jit(ref_logps, in_shardings=(bundle.params_sh, batch_sh.pairs),
                                  out_shardings=batch_sh.ref)
        params = state.frozen if train_ref is not None else bundle.params
        out.append(AotProgram("reference", fn, (params, batch(t.batch_size).pairs),
                              flops(t.batch_size) / 3))
    if eval_step is not None:
        out.append(AotProgram("eval step", eval_step, (state, batch(eval_bs)), flops(eval_bs) / 3))
    return out


def build_dpo_trainer(cfg: RunConfig, *, mesh=None) -> Trainer:
    """Data, model, state (with the reference where needed), reference log-probs, jitted step
    and eval of a DPO run (see the module doc)."""
    dpo: DPOSection = cfg.section("dpo")
    t, n_proc = cfg.train, jax.process_count()
    bundle = build.start_run(cfg, mesh)
    mesh = bundle.mesh
    read = functools.partial(build.read_data_records, cfg)
    train_pairs, train_stats, eval_pairs = read_pairs(
        read, bundle.tokenizer, cfg.data, holdout=dpo.eval_holdout, source=cfg.source
    )
    eval_bs = build.eval_batch_size(cfg, mesh if eval_pairs is not None else None)
    pad_id = bundle.tokenizer.pad_token_id
    layout = choose_layout(
        dpo.share_prompt,
        [*train_pairs, *(eval_pairs or ())],
        max_length=cfg.data.max_length,
        pad_id=0 if pad_id is None else pad_id,
        forward_flops=functools.partial(decoder_forward_flops, bundle.model_cfg),
    )
    local_bs = t.batch_size // n_proc
    loader = layout.loader(
        train_pairs, batch_size=local_bs, seed=t.seed, shuffle=cfg.data.shuffle, stats=train_stats
    )
    total = t.max_steps or max(1, math.ceil(t.num_epochs * loader.batches_per_epoch))
    use_ref = needs_reference(dpo)
    precompute = use_ref and dpo.precompute_ref_logps
    ndims = DPOBatch(layout.rows.ndims(), RefLogps(1, 1) if use_ref else None)
    batch_sh = batch_shardings(ndims, mesh)
    ref_logps = make_ref_logps_fn(bundle.graphdef, impl=t.logprob_impl, grad_accum=t.grad_accum)
    tables: dict[str, np.ndarray] = {}
    if precompute:
        # One pass with the initial params (the reference) before they become the trained
        # state; afterwards no reference is kept (full FT) or it is the LoRA base anyway.
        splits = {"train": train_pairs, **({"eval": eval_pairs} if eval_pairs else {})}
        t0 = time.perf_counter()
        tables = precompute_ref_table(
            ref_logps,
            bundle.params,
            splits,
            rows_of=lambda pairs: layout.rows.from_dict(layout.collate(pairs)),
            rows_per_call=local_bs,
            rows_sh=batch_sh.pairs,
            params_sh=bundle.params_sh,
        )
        print(
            f"dpo: precomputed reference log-probs of {sum(map(len, splits.values()))} pairs "
            f"in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
    program, online_ref, eval_ref, eval_step = dpo_programs(
        cfg, bundle, total, batch_sh, online_ref=use_ref and not precompute,
        with_eval=eval_pairs is not None, eval_bs=eval_bs, ref_logps=ref_logps,
    )
    ts = program.trainable
    eval_fn = None
    if eval_pairs is not None:
        eval_loader = layout.loader(
            eval_pairs, batch_size=eval_bs // n_proc, shuffle=False, num_epochs=1
        )
        eval_fn = make_eval_fn(
            eval_step,
            lambda: DPOSource(
                eval_loader, layout, batch_sh, ref_fn=eval_ref, table=tables.get("eval")
            ),
            t.eval_batches if t.eval_batches is not None else eval_loader.batches_per_epoch,
            eval_bs,
        )
    source = DPOSource(loader, layout, batch_sh, ref_fn=online_ref, table=tables.get("train"))
    parts = DPOParts(
        bundle, ts, program.tx, loader, layout, batch_sh, online_ref, tables, train_pairs,
        eval_pairs,
    )
    return Trainer(
        cfg=cfg,
        mesh=mesh,
        state=ts.state,
        step_fn=program.step_fn,
        source=source,
        put_batch=lambda batch: batch,  # the source serves device batches (online reference)
        total_steps=total,
        eval_fn=eval_fn,
        tokens_fn=DPOBatch.num_tokens,
        num_params=bundle.num_params,
        batches_per_epoch=loader.batches_per_epoch,
        data_stats=train_stats,
        parts=parts,
    )


train_dpo = register_builder("dpo", build_dpo_trainer)
