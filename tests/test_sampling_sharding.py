"""The decode preset of the sharding table (`jaxpt.sharding.DECODE_RULES`) on 8 fake CPU
devices (in a subprocess, since the device count is fixed when jax starts): the specs it
gives parameters and KV caches, and sharded decoding == unsharded decoding."""

from __future__ import annotations

from conftest import run_with_devices

SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import KVCache, init_model
from jaxpt.sampling import Sampler, ShardingError, decode_sharding, generate, left_pad
from jaxpt.sampling.step import DecodeCache, split_cache
from jaxpt.sharding import make_mesh
from tolerances import assert_reordered_close

assert jax.device_count() == 8, jax.devices()
cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32,
                  intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8)
graphdef, params = nnx.split(init_model(cfg, seed=1))
params = jax.tree.map(lambda x: x * 8.0, params)  # sharper logits
ids, mask = left_pad([[5, 9, 13], [7, 3, 22, 41, 8], [11], [60, 2, 33, 19]], 0)
kw = dict(max_new_tokens=6, eos_ids=(), rng=4, pad_id=0, num_samples=2)
samplers = [Sampler.greedy(), Sampler(temperature=1.0, top_k=8)]
ref = [generate(graphdef, params, ids, mask, sampler=s, **kw) for s in samplers]

def abstract_caches(rows, slots):
    model = jax.eval_shape(lambda: KVCache.init(cfg, rows, slots))
    dec = jax.eval_shape(lambda: DecodeCache(
        jnp.zeros((2, rows, 2, slots, 8)), jnp.zeros((2, rows, 2, slots, 8)),
        jnp.zeros((rows, slots), jnp.int32), jnp.zeros((rows, slots), jnp.int32)))
    return model, dec, jax.eval_shape(split_cache, dec)

# (data, fsdp, tensor), sampler, expected batch spec entry, kv heads split?
cases = [((2, 1, 4), 0, "data", False), ((2, 2, 2), 1, ("data", "fsdp"), True)]
for (d, f, t), si, rows, kv_split in cases:
    ds = decode_sharding(make_mesh(d, f, t))
    specs = {".".join(str(getattr(k, "key", k)) for k in path[:-1]): s.spec
             for path, s in jax.tree_util.tree_leaves_with_path(ds.params(params))}
    kv = "tensor" if kv_split else None  # 2 kv heads: split on tensor=2, replicated on 4
    # Tensor-only weights: no fsdp anywhere, embed never split.
    assert specs["layers.wq_END"] == P(None, None, "tensor", None), specs["layers.wq_END"]
    assert specs["layers.wk_EKD"] == P(None, None, kv, None), specs["layers.wk_EKD"]
    assert specs["layers.wo_NDE"] == P(None, "tensor", None, None)
    assert specs["layers.w_down_FE"] == P(None, "tensor", None)
    assert specs["embed_VE"] == P("tensor", None)
    assert specs["layers.attn_norm_E"] == P(None, None)
    model_c, dec_c, split_c = abstract_caches(8, 20)
    assert ds.cache(model_c).k_LBSKD.spec == P(None, rows, None, kv, None)
    assert ds.cache(model_c).positions_BS.spec == P(rows, None)
    assert ds.cache(dec_c).k_LRKSD.spec == P(None, rows, kv, None, None)
    assert ds.cache(split_c).v_LRKSD[1].spec == P(rows, kv, None, None)
    # 2 rows do not divide data x fsdp = 4: the cache's rows keep the axes that divide.
    assert ds.cache(abstract_caches(2, 20)[1]).k_LRKSD.spec == P(None, "data", kv, None, None)
    sharded = ds.place_params(params)
    assert sharded["layers"]["w_gate_EF"].sharding.spec == P(None, None, "tensor")
    sid, smask = ds.place_rows(jnp.asarray(ids)), ds.place_rows(jnp.asarray(mask))
    out = generate(graphdef, sharded, sid, smask, sampler=samplers[si], shardings=ds, **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref[si].tokens))
    # Sums of <= 64 terms (hidden 32, MLP 64, vocab 64), 2 layers + head + softmax.
    assert_reordered_close(out.logprobs, ref[si].logprobs, n=64, depth=4)
    assert out.tokens.sharding.spec[0] == rows, out.tokens.sharding
    print("ok", (d, f, t))

# GRPO's shape: 2 prompts x 4 samples on data=8. The prompts do not divide the batch axes
# (their prefill is replicated), the 8 decoded rows do.
ds = decode_sharding(make_mesh(8, 1, 1))
kw4 = {**kw, "num_samples": 4}
want = generate(graphdef, params, ids[:2], mask[:2], sampler=samplers[0], **kw4)
got = generate(graphdef, ds.place_params(params), ids[:2], mask[:2], sampler=samplers[0],
               shardings=ds, **kw4)
np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
print("ok rows")

# Decoded rows that do not divide the batch axes name the sizes and axes.
try:
    generate(graphdef, params, ids[:3], mask[:3], sampler=samplers[0], shardings=ds, **kw)
except ShardingError as e:
    msg = str(e)
    assert "prompt batch 3 x num_samples 2" in msg and "batch size 6" in msg, msg
    assert "data=8" in msg and "fsdp=1" in msg, msg
else:
    raise AssertionError("expected ShardingError")
# A foreign mesh without fsdp / tensor axes: rows over data, every parameter replicated.
ds = decode_sharding(jax.make_mesh((8,), ("data",)))
assert ds.batch_axes == ("data",)
assert all(all(a is None for a in s.spec) for s in jax.tree.leaves(ds.params(params)))
print("done")
"""


def test_sharded_decode_matches_unsharded():
    out = run_with_devices(SCRIPT, n_devices=8, timeout=600)
    for line in ("ok (2, 1, 4)", "ok (2, 2, 2)", "ok rows", "done"):
        assert line in out, out
