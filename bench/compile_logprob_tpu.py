"""The Pallas TPU log-prob kernels (forward, d hidden + d LM head) compiled for one v5e chip
(libtpu's compile-only path, on this CPU) at Qwen3's vocabulary: N = 4,096 tokens,
H = 2,048, V = 151,936 (not a multiple of the vocab block), fp32 and bf16, the default
blocks. Prints each program's memory_analysis() in MiB as JSON lines; the inputs are
arguments (not counted in temp), so ``temp`` is what the wrapper and kernels add.

    PYTHONPATH=$PWD python bench/compile_logprob_tpu.py [--n 4096 --h 2048 --v 151936]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from jaxpt.engine.aot import compile_lowered, topology, topology_devices  # noqa: E402
from jaxpt.kernels import logprob_pallas_tpu  # noqa: E402
from jaxpt.kernels.logprob import default_block_sizes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=2048)
    ap.add_argument("--v", type=int, default=151936)
    args = ap.parse_args()
    N, H, V = args.n, args.h, args.v
    mesh = Mesh(np.array(topology_devices(topology("v5e-4"))[:1]), ("x",))
    rep = NamedSharding(mesh, PartitionSpec())
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)  # noqa: E731
    for dtype in (jnp.float32, jnp.bfloat16):
        bs = default_block_sizes("tpu", N, V, H, jnp.dtype(dtype).itemsize)
        base = (spec((N, H), dtype), spec((V, H), dtype), spec((1, V), jnp.int32),
                spec((N,), jnp.int32))
        kw = dict(inv_temp=1.0, with_entropy=True, block_sizes=bs, interpret=False)
        programs = {
            "forward": (functools.partial(logprob_pallas_tpu.tpu_stats, **kw), base),
            "backward": (functools.partial(logprob_pallas_tpu.tpu_grads, **kw),
                         (*base, (spec((N,), jnp.float32),) * 4)),
        }
        for name, (fn, args_) in programs.items():
            m = compile_lowered(jax.jit(fn).lower(*args_)).memory_analysis()
            mib = {k: round(getattr(m, f"{k}_size_in_bytes") / 2**20, 1)
                   for k in ("argument", "temp", "output")}
            print(json.dumps({
                "program": name, "dtype": jnp.dtype(dtype).name, "N": N, "H": H, "V": V,
                "blocks": [bs.block_n, bs.block_v], "topology": "v5e (1 chip)",
                "date": datetime.date.today().isoformat(), **mib}), flush=True)


if __name__ == "__main__":
    main()
