"""`jaxpt plan` output: the per-device memory table (:func:`format_plan`), the per-param
sharding table of ``--verbose`` (:func:`format_param_table`) and the ``--json`` bytes
(:func:`plan_to_dict`) of a :class:`~jaxpt.cli.plan.MemoryPlan`."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from jaxpt.cli.plan import MemoryPlan, MiB, abstract_params, plan_mesh

__all__ = ["format_param_table", "format_plan", "plan_to_dict"]


def _mib(x: int) -> str:
    return f"{x / MiB:12,.2f}"


def format_plan(plan: MemoryPlan, cfg, model_cfg, memory_gib: float | None = None) -> str:
    m, mesh = model_cfg, plan.mesh
    t = cfg.train
    n_params = m.num_params()
    lines = [
        f"jaxpt plan: {cfg.source} ({cfg.algorithm})",
        f"model       {cfg.model.name}: {m.model_type}, {m.num_layers} layers, hidden "
        f"{m.hidden_size}, mlp {m.intermediate_size}, heads {m.num_heads} (kv {m.num_kv_heads},"
        f" head_dim {m.head_dim}), vocab {m.vocab_size}; {n_params:,} params",
        f"mesh        data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']} over "
        f"{plan.n_devices} devices",
        f"step        {t.batch_size} rows x {plan.seqs_per_row} seq x {plan.seq_len} tokens, "
        f"grad_accum {t.grad_accum}: {plan.rows_per_device} row(s) per device per micro-batch",
        f"dtypes      params {m.param_dtype}, compute {m.compute_dtype}, remat {m.remat}, "
        f"log-prob {t.logprob_impl}",
        "training    "
        + (
            f"LoRA rank {cfg.lora.rank}: {plan.trainable_params:,} trainable params"
            if cfg.lora.rank
            else f"full fine-tuning: {plan.trainable_params:,} trainable params"
        ),
        "",
        f"{'per device':44s}{'MiB':>12s}",
        f"{'  params (' + m.param_dtype + (', frozen base)' if cfg.lora.rank else ')'):44s}"
        f"{_mib(plan.params)}",
    ]
    if plan.frozen:
        lines.append(f"{'  reference model (frozen copy)':44s}{_mib(plan.frozen)}")
    lines += [
        f"{'  optimizer state (AdamW mu + nu)':44s}{_mib(plan.opt_state)}",
        f"{'  gradients' + (' (+ accumulator)' if t.grad_accum > 1 else ''):44s}{_mib(plan.grads)}",
        f"{'  activations (estimate)':44s}{_mib(plan.activations)}",
    ]
    lines += [f"{'    ' + k:44s}{_mib(v)}" for k, v in plan.activation_parts.items()]
    lines.append(f"{'  transient buffers (estimate)':44s}{_mib(plan.transient)}")
    lines += [f"{'    ' + k:44s}{_mib(v)}" for k, v in plan.transient_parts.items()]
    lines.append(f"{'  total':44s}{_mib(plan.total)}")
    if plan.rollout_parts:
        lines.append(f"{'  rollout, beside params + optimizer state':44s}{_mib(plan.rollout)}")
        lines += [f"{'    ' + k:44s}{_mib(v)}" for k, v in plan.rollout_parts.items()]
        lines.append(f"{'  total while sampling':44s}{_mib(plan.rollout_peak)}")
    peak = max(plan.total, plan.rollout_peak)
    if memory_gib:
        cap = memory_gib * 2**30
        verdict = "fits" if peak <= cap else "DOES NOT FIT"
        lines.append(
            f"{verdict} in {memory_gib:g} GiB per device ({100 * peak / cap:.0f}% used; "
            "XLA needs some headroom beyond this estimate)"
        )
    return "\n".join(lines)


def format_param_table(model_cfg, cfg, n_devices: int) -> str:
    import jax

    from jaxpt.sharding import param_shardings
    from jaxpt.tree import path_str

    params = abstract_params(model_cfg)
    sh = param_shardings(params, plan_mesh(cfg.mesh, n_devices))
    rows = ["", f"{'param':32s}{'shape':24s}{'sharding':28s}{'MiB/device':>12s}"]
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for (path, leaf), s in zip(leaves, jax.tree.leaves(sh), strict=True):
        local = math.prod(s.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        rows.append(
            f"{path_str(path):32s}{str(tuple(leaf.shape)):24s}{str(tuple(s.spec)):28s}{_mib(local)}"
        )
    return "\n".join(rows)


def plan_to_dict(plan: MemoryPlan) -> dict[str, Any]:
    """JSON-ready bytes per device (for scripts)."""
    out = dataclasses.asdict(plan)
    out.update(activations=plan.activations, transient=plan.transient, total=plan.total,
               rollout=plan.rollout, rollout_peak=plan.rollout_peak)
    return json.loads(json.dumps(out))
