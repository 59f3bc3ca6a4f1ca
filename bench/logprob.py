"""Benchmark the token log-prob core: memory and forward+backward time vs the XLA reference.

    python bench/logprob.py --quick      # N=4096, H=896, V=49152 only (about a minute on CPU)
    python bench/logprob.py              # N {4096, 16384} x H {896, 2048} x V {49152, 151936}

jaxpt is `pallas` on GPU/TPU and `chunked` on CPU (Pallas interpret mode is not a
benchmark); on GPU/TPU `chunked` is reported too (case suffix `_chunked`). The peer is
`reference`, which materializes the N x V logits. Each comparison prints one JSON line:

  peak_memory  compiled forward+backward executable's memory_analysis(): temp + output
  peak_bytes_in_use  (GPU only) device peak after running (inputs included); every
               (case, impl) runs in its own process so each peak is its own
  fwd_bwd_time median wall time of jit(value_and_grad) over --repeats runs after warm-up

Cases whose reference needs more memory than --max-run-gb are compiled (memory rows)
but not run. Axis legend: N tokens, H hidden, V vocab.

    python bench/logprob.py --tpu-compile [--quick]   # compiled for one v5e chip (libtpu)

compiles the same forward+backward for one v5e chip with libtpu's compile-only path (the
`[tpu]` extra; nothing runs), on a 1-device mesh of that chip so `pallas` is the Mosaic
kernel, for fp32 and bf16 at N {4096, 16384} x H {896, 2048, 4096} x V {49152, 128256,
151936} (`--quick`: N=4096, H=2048, V=151936), and prints `temp` (the temporaries: what
an implementation adds beyond its inputs and gradient outputs) and `temp_plus_output` of
`pallas` and `chunked` against `reference`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxpt.kernels.logprob import token_logprobs  # noqa: E402

PEER_NAME = "XLA reference (materialized logits)"
FULL_CASES = [(n, h, v) for n in (4096, 16384) for h in (896, 2048) for v in (49152, 151936)]
QUICK_CASES = [(4096, 896, 49152)]


def _device() -> tuple[str, str]:
    dev = jax.devices()[0]
    platform = "gpu" if dev.platform in ("gpu", "cuda", "rocm") else dev.platform
    if platform == "cpu":
        return platform, f"cpu x{os.cpu_count()}"
    return platform, f"{dev.device_kind} x{jax.device_count()}"


def _fwd_bwd(impl: str):
    def loss(hidden_NH, lm_head_VH, targets_N):
        out = token_logprobs(hidden_NH, lm_head_VH, targets_N, impl=impl)
        return -jnp.mean(out.logprobs_N)  # SFT token NLL

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _inputs(N, H, V, dtype):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = (jax.random.normal(k1, (N, H), jnp.float32)).astype(dtype)
    lm_head = (jax.random.normal(k2, (V, H), jnp.float32) * H**-0.5).astype(dtype)
    return hidden, lm_head, jax.random.randint(k3, (N,), 0, V)


def measure(impl, args, platform, repeats, run: bool) -> dict:
    fn = _fwd_bwd(impl)
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()  # None where a backend does not report it
    result = {}
    if mem is not None:
        result["peak_memory"] = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20
    if not run:
        return result
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    result["fwd_bwd_time"] = statistics.median(times)
    if platform == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            result["peak_bytes_in_use"] = stats["peak_bytes_in_use"] / 2**20
    return result


def _measure_in_subprocess(impl, N, H, V, dtype, repeats, run) -> dict | None:
    """Run `measure` in a fresh process, so the device's peak memory is this run's own."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--measure",
        impl,
        str(N),
        str(H),
        str(V),
        dtype.name,
        str(repeats),
        str(int(run)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"note: {impl} N={N} H={H} V={V} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


TPU_CASES = [(n, h, v) for n in (4096, 16384) for h in (896, 2048, 4096)
             for v in (49152, 128256, 151936)]
TPU_QUICK = [(4096, 2048, 151936)]


def tpu_compile(quick: bool, shapes: list[tuple[int, int, int]] | None = None) -> list[dict]:
    """Temporaries of each implementation's fwd+bwd compiled for one v5e chip."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxpt.engine.aot import compile_lowered, topology, topology_devices

    mesh = Mesh(np.array(topology_devices(topology("v5e-4"))[:1]), ("vocab",))
    rep = NamedSharding(mesh, PartitionSpec())
    date, lines = datetime.date.today().isoformat(), []
    for N, H, V in shapes or (TPU_QUICK if quick else TPU_CASES):
        for dtype in (jnp.float32, jnp.bfloat16):
            args = (jax.ShapeDtypeStruct((N, H), dtype, sharding=rep),
                    jax.ShapeDtypeStruct((V, H), dtype, sharding=rep),
                    jax.ShapeDtypeStruct((N,), jnp.int32, sharding=rep))
            mem, failed = {}, {}
            for impl in ("reference", "pallas", "chunked"):
                sh = {} if impl == "reference" else {"mesh": mesh, "vocab_axis": "vocab"}

                def loss(h, w, t, impl=impl, sh=sh):
                    return -jnp.mean(token_logprobs(h, w, t, impl=impl, **sh).logprobs_N)

                fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
                try:
                    m = compile_lowered(fn.lower(*args)).memory_analysis()
                except Exception as e:  # an out-of-memory compile is a result too
                    failed[impl] = str(e).splitlines()[0][:300]
                    print(f"note: {impl} N={N} H={H} V={V} {jnp.dtype(dtype).name}: "
                          f"{failed[impl]}", file=sys.stderr)
                    continue
                mem[impl] = {"temp": m.temp_size_in_bytes / 2**20,
                             "temp_plus_output": (m.temp_size_in_bytes
                                                  + m.output_size_in_bytes) / 2**20}
            for impl in ("pallas", "chunked"):
                for metric, value in mem.get(impl, {}).items():
                    # A reference that does not fit the chip has no figure: its error is
                    # the result (peer null, peer_error the compiler's message).
                    peer = mem.get("reference", {}).get(metric)
                    line = {"bench": "logprob_tpu_compile",
                            "case": f"N{N}_H{H}_V{V}_{jnp.dtype(dtype).name}_{impl}",
                            "metric": metric, "unit": "MiB", "jaxpt": round(value, 1),
                            "peer": None if peer is None else round(peer, 1),
                            "peer_name": PEER_NAME,
                            **({"peer_error": failed["reference"]} if "reference" in failed
                               else {}),
                            "ratio": round(value / peer, 4) if peer else None,
                            "target": 0.10 if (impl, metric) == ("pallas", "temp") else None,
                            "lower_is_better": True, "device": "v5e x1 (compile-only)",
                            "date": date}
                    lines.append(line)
                    print(json.dumps(line), flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest case only")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (median)")
    parser.add_argument(
        "--dtype", default=None, help="input dtype (default: fp32 on CPU, bf16 on GPU/TPU)"
    )
    parser.add_argument(
        "--max-run-gb",
        type=float,
        default=None,
        help="skip running cases whose N x V fp32 logits exceed this",
    )
    parser.add_argument("--tpu-compile", action="store_true",
                        help="compile for one v5e chip (libtpu) and report memory only")
    parser.add_argument("--shapes", default=None,
                        help="with --tpu-compile: NxHxV,... instead of the grid")
    parser.add_argument("--measure", nargs=7, help=argparse.SUPPRESS)  # internal
    a = parser.parse_args(argv)
    if a.tpu_compile:
        shapes = None if a.shapes is None else [
            tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
        return tpu_compile(a.quick, shapes)
    platform, device = _device()
    if a.measure:
        impl, N, H, V, dtype, repeats, run = a.measure
        N, H, V, repeats, run = int(N), int(H), int(V), int(repeats), bool(int(run))
        args = _inputs(N, H, V, jnp.dtype(dtype))
        print(json.dumps(measure(impl, args, platform, repeats, run)))
        return []
    dtype = jnp.dtype(a.dtype or ("float32" if platform == "cpu" else "bfloat16"))
    repeats = a.repeats or (2 if a.quick else 5)
    max_run_gb = a.max_run_gb or (4.0 if platform == "cpu" else 24.0)
    impls = ["chunked"] if platform == "cpu" else ["pallas", "chunked"]
    if platform == "cpu":
        print("note: pallas skipped on CPU (interpret mode is not a benchmark)", file=sys.stderr)
    targets = {
        "peak_memory": 0.25 if platform == "cpu" else 0.10,
        "peak_bytes_in_use": 0.10,
        "fwd_bwd_time": None if platform == "cpu" else 1.0,
    }
    units = {"peak_memory": "MiB", "peak_bytes_in_use": "MiB", "fwd_bwd_time": "s"}
    date = datetime.date.today().isoformat()
    lines = []
    for N, H, V in QUICK_CASES if a.quick else FULL_CASES:
        run = N * V * 4 / 2**30 <= max_run_gb
        if not run:
            print(
                f"note: N={N} V={V}: compiled memory only (logits > {max_run_gb} GB)",
                file=sys.stderr,
            )
        peer = _measure_in_subprocess("reference", N, H, V, dtype, repeats, run)
        for impl in impls:
            mine = _measure_in_subprocess(impl, N, H, V, dtype, repeats, run)
            if mine is None or peer is None:
                continue
            case = f"N{N}_H{H}_V{V}_{dtype.name}" + ("_chunked" if impl != impls[0] else "")
            for metric, value in mine.items():
                if metric not in peer:
                    continue
                line = {
                    "bench": "logprob",
                    "case": case,
                    "metric": metric,
                    "unit": units[metric],
                    "jaxpt": round(value, 4),
                    "peer": round(peer[metric], 4),
                    "peer_name": PEER_NAME,
                    "ratio": round(value / peer[metric], 4),
                    "target": targets[metric],
                    "lower_is_better": True,
                    "device": device,
                    "date": date,
                }
                lines.append(line)
                print(json.dumps(line), flush=True)
    return lines


if __name__ == "__main__":
    main()
