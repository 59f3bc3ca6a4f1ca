"""Benchmark the optimizer update of the train step: fused AdamW vs the optax formulation.

    python bench/optimizer.py                  # SmolLM2-135M-Instruct's params, fp32
    python bench/optimizer.py --model qwen2.5-0.5b-instruct --repeats 10

Both sides take (grads, params, optimizer state) and return the new params and state, both
donated, as the train step does: global-norm clipping at 1.0, AdamW with weight
decay on all but norms, and nothing applied on a non-finite step.

  jaxpt  ``FusedAdamW.apply`` (``jaxpt.engine.adamw``): two elementwise passes per leaf
  peer   ``tx.update`` + ``optax.apply_updates`` + ``jnp.where(finite, new, old)`` over
         params and state: what the step ran before the fused update

Metric ``update_time`` (median seconds per call after 2 warm-up calls) and
``update_copies`` (params-sized copies XLA inserts in the compiled update), one JSON line
each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from jaxpt.config import OptimConfig  # noqa: E402
from jaxpt.engine.state import make_optimizer  # noqa: E402
from jaxpt.models import hub  # noqa: E402
from jaxpt.models.decoder import abstract_model  # noqa: E402


def optax_update(tx):
    def update(grads, params, opt_state):
        finite = jnp.isfinite(optax.global_norm(grads))
        updates, new_opt = tx.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        return keep(new_params, params), keep(new_opt, opt_state)

    return update


def fused_update(tx):
    def update(grads, params, opt_state):
        norm = optax.global_norm(grads)
        return tx.apply(grads, opt_state, params, grad_norm=norm, finite=jnp.isfinite(norm))

    return update


def measure(update, params, tx, repeats: int) -> tuple[float, int]:
    """(median seconds per call, params-sized copies in the compiled update)."""
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), params)
    state = tx.init(params)
    params = jax.tree.map(jnp.copy, params)
    # (params, state) in and out in one order, as the step's TrainState: jit pairs donated
    # inputs with outputs of the same shape in order, so each buffer is updated in place.
    fn = jax.jit(update, donate_argnums=(1, 2))
    hlo = fn.lower(grads, params, state).compile().as_text()
    big = {f"{p.dtype.name[0]}{p.dtype.itemsize * 8}[{','.join(map(str, p.shape))}]"
           for p in jax.tree.leaves(params) if p.size >= 2**20}
    copies = sum(1 for line in hlo.splitlines()
                 if " copy(" in line and any(b in line for b in big))
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        params, state = fn(grads, params, state)
        jax.block_until_ready(params)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), copies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=8)
    a = ap.parse_args()
    from flax import nnx

    cfg = hub.resolve(a.model).config()
    shapes = nnx.state(abstract_model(cfg), nnx.Param)
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), nnx.to_pure_dict(shapes))
    tx, _ = make_optimizer(OptimConfig(lr=1e-6, weight_decay=0.01, max_grad_norm=1.0), 100)
    n = sum(p.size for p in jax.tree.leaves(params))
    print(f"{a.model}: {n / 1e6:.1f}M params, {jax.devices()[0].platform}", file=sys.stderr)
    ours = measure(fused_update(tx), params, tx, a.repeats)
    peer = measure(optax_update(tx), params, tx, a.repeats)
    date = datetime.date.today().isoformat()
    device = f"{jax.devices()[0].platform} x{os.cpu_count()}"
    for metric, unit, i in (("update_time", "s", 0), ("update_copies", "arrays", 1)):
        print(json.dumps({
            "bench": "optimizer", "case": f"{a.model}_adamw_clip_fp32", "metric": metric,
            "unit": unit, "jaxpt": round(ours[i], 4), "peer": round(peer[i], 4),
            "peer_name": "optax chain update + apply_updates + where",
            "ratio": round(ours[i] / peer[i], 4) if peer[i] else None, "target": None,
            "lower_is_better": True, "device": device, "date": date,
        }), flush=True)


if __name__ == "__main__":
    main()
