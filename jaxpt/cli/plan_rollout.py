"""The rollout's memory in ``jaxpt plan``: what an on-policy step holds while it samples,
beside the train state (params, reference, optimizer state stay resident).

Axis legend: R rollout rows (``train.batch_size * steps_per_generation``), N decoded rows
at once (R for the static engine; ``rollout_slots`` for the continuous one), B = R / G
prompts, P prompt width (bucketed, as the decode loop pads it), M new tokens
(``max_completion_length``), S = P + M - 1 cache slots per row, L layers, K kv heads, D
head dim, V vocab, c bytes of the compute dtype.

Exact per device, from the same shardings the decode loop uses (``DecodeSharding``):

* KV cache: keys and values N x L x S x K x D x 2 x c (rows over data x fsdp, kv heads over
  tensor where they divide) plus the positions and segment ids N x S int32 each;
* the prompts' prefill cache, B x L x P x K x D x 2 x c (alive while it is copied into the
  decode cache; the continuous engine keeps it for the whole rollout: a slot takes a new
  prompt's rows from it);
* decode params: the policy in the decode preset (weights over tensor only), a copy beside
  the train params on a mesh of more than one device or with LoRA (merged weights);
* completion tokens and log-probs, R x M x (4 + 4); one step's fp32 logits, N x V x 4.

These are logical bytes: on a TPU the cache's minor dimension is padded to 128 lanes, so a
head_dim of 64 takes twice the plan's figure there (``jaxpt plan --compile`` shows it;
BENCHMARKS.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpt.models.decoder import KVCache
from jaxpt.rl.config import OnPolicySection
from jaxpt.sampling import bucket_length
from jaxpt.sampling.step import DecodeCache


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def rollout_memory(cfg, model_cfg, mesh, params, local_bytes) -> dict[str, int]:
    """Per-device bytes of the rollout of ``cfg``'s on-policy section (empty for other
    algorithms). ``params``: the abstract model params; ``local_bytes(tree, shardings)``."""
    from jaxpt.sharding import decode_sharding

    try:
        sec = cfg.section(cfg.algorithm)
    except (KeyError, ValueError):  # an algorithm without a section of its own
        return {}
    if not isinstance(sec, OnPolicySection):
        return {}
    m, t = model_cfg, cfg.train
    G, M = sec.num_generations, sec.max_completion_length
    R, P = t.batch_size * sec.steps_per_generation, bucket_length(sec.max_prompt_length)
    B, S = R // G, P + M - 1
    N = min(sec.rollout_slots or R, R) if sec.rollout_engine == "continuous" else R
    L, K, D, c = m.num_layers, m.num_kv_heads, m.head_dim, jnp.dtype(m.dtype)
    ds = decode_sharding(mesh)
    cache = DecodeCache(_sds((L, N, K, S, D), c), _sds((L, N, K, S, D), c),
                        _sds((N, S), jnp.int32), _sds((N, S), jnp.int32))
    prompts = KVCache(_sds((L, B, P, K, D), c), _sds((L, B, P, K, D), c),
                      _sds((B, P), jnp.int32), _sds((B, P), jnp.int32))
    rows = lambda n: ds.batch_divisor if n % ds.batch_divisor == 0 else 1  # noqa: E731
    engine = f"{sec.rollout_engine}, {N} rows"
    parts = {
        f"KV cache ({engine}, {S} slots)": local_bytes(cache, ds.cache(cache)),
        f"prompts' prefill cache ({B} x {P})": local_bytes(prompts, ds.cache(prompts)),
    }
    if mesh.size > 1 or cfg.lora.rank > 0:
        parts["decode params (decode preset)"] = local_bytes(params, ds.params(params))
    parts["completion tokens + log-probs"] = R * M * 8 // rows(R)
    parts["one decode step's logits (fp32)"] = N * m.vocab_size * 4 // rows(N)
    return parts
