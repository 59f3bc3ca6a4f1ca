"""The machine's ceiling: fp32 matmul throughput of XLA (what jaxpt runs on) vs torch (what
TRL runs on) on SmolLM2-135M's own training and decode shapes.

    python bench/matmul.py --quick     # the training shapes, 5 repeats
    python bench/matmul.py             # training + 8-row decode shapes, 20 repeats
    python bench/matmul.py --stream    # decode's weight streaming, 1-32 rows (below)

A train step of the SFT / DPO / GRPO benches is mostly these matmuls (forward x @ W,
backward dX = dY @ W.T and dW = X.T @ dY), so their rate bounds the step time any
implementation can reach at equal work: BENCHMARKS.md turns each bench's FLOP count into
that floor. Rows M = 1024 are one bs4 x 256 step's tokens; E = 576, F = 1536, the kv width
192 and V = 49152 are SmolLM2-135M's. Each case prints one JSON line: ``gflops`` (2*M*K*N
/ median time), jaxpt = XLA (``jax.jit(a @ b)``), peer = torch ``a @ b`` with all cores.

``--stream`` measures what bounds a decode step instead: the 90 MLP matrices of SmolLM2's
30 layers (318 MB of fp32, far more than the caches, so every call reads them from
memory), each multiplied by R = 1..32 rows, in the form each side decodes with: XLA
``w_FE @ x_RE.T`` per matrix in one jit (`jaxpt.sampling.step._rows_times_out_in`), torch
``F.linear(x_RE, w_FE)`` as transformers does. Metric: GB/s of weights read. The
reference row is the machine's streaming rate, a plain sum over the same 318 MB (XLA and
torch), which no matmul can beat at these row counts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np

KEYS = ("bench", "case", "metric", "unit", "jaxpt", "peer", "peer_name", "ratio", "target",
        "lower_is_better", "device", "date")  # fmt: skip

# (name, M, K, N) of x_MK @ w_KN.
TRAIN_SHAPES = [
    ("q_o_fwd", 1024, 576, 576),
    ("k_v_fwd", 1024, 576, 192),
    ("gate_up_fwd", 1024, 576, 1536),
    ("down_fwd", 1024, 1536, 576),
    ("gate_up_dW", 576, 1024, 1536),  # X.T @ dY
    ("down_dX", 1024, 576, 1536),  # dY @ W.T
    ("lm_head_fwd", 512, 576, 49152),  # completion tokens only
]
DECODE_SHAPES = [
    ("gate_up_8rows", 8, 576, 1536),
    ("down_8rows", 8, 1536, 576),
    ("lm_head_8rows", 8, 576, 49152),
]


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (and XLA's compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _row(case: str, metric: str, unit: str, jaxpt: float, peer: float, peer_name: str, device):
    row = {
        "bench": "matmul",
        "case": case,
        "metric": metric,
        "unit": unit,
        "jaxpt": round(jaxpt, 1),
        "peer": round(peer, 1),
        "peer_name": peer_name,
        "ratio": round(jaxpt / peer, 3),
        "target": None,
        "lower_is_better": False,
        "device": device,
        "date": datetime.date.today().isoformat(),
    }
    return json.dumps({k: row[k] for k in KEYS})


def stream(device: str, repeats: int) -> None:
    """Decode's weight streaming at 1-32 rows (module doc, ``--stream``)."""
    import jax
    import torch

    E, F, n = 576, 1536, 90  # 30 layers x gate, up, down (down as its [E, F] transpose)
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((F, E), dtype=np.float32) * 0.02 for _ in range(n)]
    gb = n * F * E * 4 / 1e9
    jws = [jax.device_put(w) for w in ws]
    tws = [torch.from_numpy(w) for w in ws]
    flat_j, flat_t = jax.device_put(np.concatenate(ws)), torch.from_numpy(np.concatenate(ws))
    total = jax.jit(lambda x: x.sum())
    t_jax = _median_time(lambda: total(flat_j).block_until_ready(), repeats)
    t_torch = _median_time(lambda: flat_t.sum(), repeats)
    name = f"torch {torch.__version__} sum"
    case = "stream_sum_318MB_fp32"
    print(_row(case, "weight_gbps", "GB/s", gb / t_jax, gb / t_torch, name, device), flush=True)

    def barrier_all(ws, x):  # one product per matrix, kept apart as in the decode step
        return [jax.lax.optimization_barrier(w @ x.T) for w in ws]

    products = jax.jit(barrier_all)
    linear = torch.nn.functional.linear
    for R in (1, 2, 4, 8, 16, 32):
        x = rng.standard_normal((R, E), dtype=np.float32)
        jx, tx = jax.device_put(x), torch.from_numpy(x)
        t_jax = _median_time(lambda: jax.block_until_ready(products(jws, jx)), repeats)  # noqa: B023
        with torch.no_grad():
            t_torch = _median_time(lambda: [linear(tx, w) for w in tws], repeats)  # noqa: B023
        name = f"torch {torch.__version__} F.linear"
        case = f"stream_mlp_weights_{R}rows_fp32"
        print(_row(case, "weight_gbps", "GB/s", gb / t_jax, gb / t_torch, name, device), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="training shapes, 5 repeats")
    ap.add_argument("--stream", action="store_true", help="decode's weight streaming only")
    args = ap.parse_args()
    repeats = 5 if args.quick else 20
    shapes = TRAIN_SHAPES if args.quick else TRAIN_SHAPES + DECODE_SHAPES

    import jax
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    dev = jax.devices()[0]
    device = f"cpu x{os.cpu_count()}" if dev.platform == "cpu" else dev.device_kind
    if args.stream:
        stream(device, repeats=10)
        return 0
    matmul = jax.jit(lambda a, b: a @ b)
    rng = np.random.default_rng(0)
    for name, M, K, N in shapes:
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        ja, jb = jax.device_put(a), jax.device_put(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        t_jax = _median_time(lambda: matmul(ja, jb).block_until_ready(), repeats)  # noqa: B023
        t_torch = _median_time(lambda: ta @ tb, repeats)  # noqa: B023
        flops = 2 * M * K * N
        case, peer_name = f"{name}_{M}x{K}x{N}_fp32", f"torch {torch.__version__} matmul"
        gf_jax, gf_torch = flops / t_jax / 1e9, flops / t_torch / 1e9
        print(_row(case, "gflops", "GFLOP/s", gf_jax, gf_torch, peer_name, device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
