"""The machine's ceiling: fp32 matmul throughput of XLA (what jaxpt runs on) vs torch (what
TRL runs on) on SmolLM2-135M's own training and decode shapes.

    python bench/matmul.py --quick     # the training shapes, 5 repeats
    python bench/matmul.py             # training + 8-row decode shapes, 20 repeats

A train step of the SFT / DPO / GRPO benches is mostly these matmuls (forward x @ W,
backward dX = dY @ W.T and dW = X.T @ dY), so their rate bounds the step time any
implementation can reach at equal work: BENCHMARKS.md turns each bench's FLOP count into
that floor. Rows M = 1024 are one bs4 x 256 step's tokens; E = 576, F = 1536, the kv width
192 and V = 49152 are SmolLM2-135M's. Each case prints one JSON line: ``gflops`` (2*M*K*N
/ median time), jaxpt = XLA (``jax.jit(a @ b)``), peer = torch ``a @ b`` with all cores.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="training shapes, 5 repeats")
    args = ap.parse_args()
    repeats = 5 if args.quick else 20
    shapes = TRAIN_SHAPES if args.quick else TRAIN_SHAPES + DECODE_SHAPES

    import jax
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    dev = jax.devices()[0]
    device = f"cpu x{os.cpu_count()}" if dev.platform == "cpu" else dev.device_kind
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
        row = {
            "bench": "matmul",
            "case": f"{name}_{M}x{K}x{N}_fp32",
            "metric": "gflops",
            "unit": "GFLOP/s",
            "jaxpt": round(flops / t_jax / 1e9, 1),
            "peer": round(flops / t_torch / 1e9, 1),
            "peer_name": f"torch {torch.__version__} matmul",
            "target": None,
            "lower_is_better": False,
            "device": device,
            "date": datetime.date.today().isoformat(),
        }
        row["ratio"] = round(row["jaxpt"] / row["peer"], 3)
        print(json.dumps({k: row[k] for k in KEYS}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
