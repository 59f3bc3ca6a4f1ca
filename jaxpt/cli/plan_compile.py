"""`jaxpt plan CONFIG --topology NAME --compile`: every program the run executes, compiled by
XLA's TPU compiler for that slice on this machine, with its per-device HBM.

The run's mesh (``mesh:`` of the config, over the slice's devices) and shardings are the
ones training uses; the params are shapes only (``jaxpt.engine.build.abstract_bundle``),
and each algorithm lists its programs (``aot_programs`` in its module, see
``jaxpt.engine.aot``). Per program: arguments, outputs, temporaries, generated code and
their total against the chip's HBM, or the compiler's own message when it does not fit;
then model FLOPs per call from the config and the time a call would take at the chip's
peak (a lower bound: MFU 100%).
"""

from __future__ import annotations

import dataclasses
import json
import sys

from jaxpt.engine import aot

MiB = 2**20


def compile_plan(cfg, model_cfg, topo: aot.Topology) -> list[aot.CompiledProgram]:
    from jaxpt.engine.build import abstract_bundle
    from jaxpt.sharding import make_mesh

    devices = aot.topology_devices(topo)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    bundle = abstract_bundle(cfg, mesh, model_cfg)
    return aot.compile_all(aot.algorithm_programs(cfg, bundle))


def fits(p: aot.CompiledProgram, topo: aot.Topology) -> bool:
    return p.error is None and p.total <= topo.hbm_gib * 2**30


def format_compiled(results, cfg, topo: aot.Topology, n_devices: int) -> str:
    w = max(16, *(len(p.name) + 2 for p in results))  # the name column
    lines = [
        f"jaxpt plan --compile: {cfg.source} ({cfg.algorithm}) on {topo.name} "
        f"({n_devices} devices, {topo.hbm_gib:g} GiB HBM each), mesh data={cfg.mesh.data} "
        f"fsdp={cfg.mesh.fsdp} tensor={cfg.mesh.tensor}, attention {cfg.model.attention}",
        "",
        f"{'program':{w}s}{'args':>10s}{'outputs':>10s}{'temps':>10s}{'code':>8s}"
        f"{'aliased':>10s}{'total':>10s}  MiB per device",
    ]
    for p in results:
        if p.error:
            lines.append(f"{p.name:{w}s}DOES NOT COMPILE: {p.error}")
            continue
        lines.append(
            f"{p.name:{w}s}{p.arguments / MiB:10.0f}{p.outputs / MiB:10.0f}"
            f"{p.temporaries / MiB:10.0f}{p.generated_code / MiB:8.1f}{p.aliased / MiB:10.0f}"
            f"{p.total / MiB:10.0f}  {'fits' if fits(p, topo) else 'DOES NOT FIT'} "
            f"({100 * p.total / (topo.hbm_gib * 2**30):.0f}% of HBM)"
        )
    lines.append("")
    for p in results:
        if p.flops:
            at_peak = p.flops / (n_devices * topo.peak_bf16_flops)
            lines.append(
                f"{p.name:{w}s}{p.flops:.3e} model FLOPs per call; >= {at_peak * 1e3:.1f} ms "
                f"at {topo.peak_bf16_flops / 1e12:g} TFLOP/s x {n_devices} (bf16 peak)"
            )
    return "\n".join(lines)


def run_compile(args, cfg, model_cfg) -> int:
    topo = aot.topology(args.topology)
    try:
        results = compile_plan(cfg, model_cfg, topo)
    except (aot.LibtpuMissing, NotImplementedError) as e:
        print(f"jaxpt plan: {e}", file=sys.stderr, flush=True)
        return 2
    n = len(aot.topology_devices(topo))
    if args.json:
        rows = [{**dataclasses.asdict(p), "total": p.total, "fits": fits(p, topo)}
                for p in results]
        print(json.dumps({"topology": topo.name, "devices": n, "hbm_gib": topo.hbm_gib,
                          "programs": rows}), flush=True)
    else:
        print(format_compiled(results, cfg, topo, n), flush=True)
    return 0 if all(fits(p, topo) for p in results) else 1
