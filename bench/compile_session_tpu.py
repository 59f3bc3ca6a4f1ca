"""The multi-turn decode session's programs (`jaxpt.sampling.session`: the prompts' prefill,
one turn) compiled for a v5e-8 slice at Qwen3-1.7B (libtpu's compile-only path, on this
CPU): 16 rows, 2,048 cache slots, 64 forced tokens and 512 new tokens per turn, the decode
preset, layers scanned, bf16 compute. Prints MiB per device as JSON lines.

    PYTHONPATH=$PWD python bench/compile_session_tpu.py   # from the repo, ../shared beside it
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxpt.config_load import load_config  # noqa: E402
from jaxpt.engine import aot  # noqa: E402
from jaxpt.engine.build import abstract_bundle  # noqa: E402
from jaxpt.models.config import ModelConfig  # noqa: E402
from jaxpt.rl.aot import _abstract  # noqa: E402
from jaxpt.sampling import Sampler  # noqa: E402
from jaxpt.sampling.session import _prefill_rows, _run_turn  # noqa: E402
from jaxpt.sharding import decode_sharding, make_mesh, replicated  # noqa: E402

QWEN = "../shared/models/qwen3-1.7b/config.json"
R, P, S, F, M = 16, 512, 2048, 64, 512  # rows, prompt, cache slots, forced, new per turn


def report(name: str, lowered) -> None:
    m = aot.compile_lowered(lowered).memory_analysis()
    mib = {k: round(getattr(m, f"{k}_size_in_bytes") / 2**20)
           for k in ("argument", "temp", "output", "alias", "generated_code")}
    mib["total"] = mib["argument"] + mib["temp"] + mib["output"] + mib["generated_code"] \
        - mib["alias"]
    print(json.dumps({"program": name, "topology": "v5e-8", **mib}), flush=True)


def main() -> None:
    cfg = load_config("configs/grpo_tools_arithmetic_tiny.yaml",
                      [f"model.name={QWEN}", "model.compute_dtype=bfloat16", "mesh.fsdp=8"])
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor,
                     devices=aot.topology_devices(aot.topology("v5e-8")))
    bundle = abstract_bundle(cfg, mesh, ModelConfig.from_hf_file(QWEN, compute_dtype="bfloat16"))
    sh = decode_sharding(mesh)
    params = _abstract(bundle.params, sh.params(bundle.params))
    ids = jax.ShapeDtypeStruct((R, P), jnp.int32, sharding=sh.rows(2, R))
    report(f"session prefill ({R} x {P}, {S} slots)",
           _prefill_rows.lower(bundle.graphdef, params, ids, ids, num_slots=S, shardings=sh))
    cache, _ = jax.eval_shape(lambda p, i: _prefill_rows(bundle.graphdef, p, i, i, num_slots=S,
                                                         shardings=sh), params, ids)
    vec = jax.ShapeDtypeStruct((R,), jnp.int32, sharding=sh.rows(1, R))
    forced = jax.ShapeDtypeStruct((R, F), jnp.int32, sharding=sh.rows(2, R))
    k = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=replicated(mesh))
    report(f"session turn ({F} forced + {M} new per row)", _run_turn.lower(
        bundle.graphdef, params, _abstract(cache, sh.cache(cache)), vec, forced, vec, vec, vec,
        key, sampler=Sampler(temperature=0.7), max_new_tokens=M, eos_ids=(0,), pad_id=0,
        shardings=sh, layer_loop="scan"))


if __name__ == "__main__":
    main()
