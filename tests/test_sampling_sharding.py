"""The decode sharding preset on 8 fake CPU devices (in a subprocess, since the device
count is fixed when jax starts): sharded decoding == unsharded decoding."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from jaxpt.models.config import ModelConfig
    from jaxpt.models.decoder import init_model
    from jaxpt.sampling import Sampler, ShardingError, decode_sharding, generate, left_pad

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

    for shape, si in [((2, 4), 0), ((4, 2), 1)]:
        mesh = jax.make_mesh(shape, ("data", "tensor"))
        ds = decode_sharding(mesh)
        specs = {".".join(str(getattr(k, "key", k)) for k in path[:-1]): s.spec
                 for path, s in jax.tree_util.tree_leaves_with_path(ds.params(params))}
        t = "tensor" if shape[1] > 1 else None
        kv = "tensor" if shape[1] > 1 and cfg.num_kv_heads % shape[1] == 0 else None
        assert specs["layers.wq_END"] == P(None, None, t, None), specs["layers.wq_END"]
        assert specs["layers.wk_EKD"] == P(None, None, kv, None), specs["layers.wk_EKD"]
        assert specs["layers.wo_NDE"] == P(None, t, None, None)
        assert specs["layers.w_down_FE"] == P(None, t, None)
        assert specs["embed_VE"] == P(t, None)
        assert specs["layers.attn_norm_E"] == P(None, None)
        assert ds.cache(cfg, 8, 20).k_LRKSD.spec == P(None, "data", kv, None, None)
        assert ds.cache(cfg, 8, 20, layout="model").k_LBSKD.spec == P(None, "data", None, kv, None)
        sharded = ds.place_params(params)
        assert sharded["layers"]["w_gate_EF"].sharding.spec == P(None, None, t)
        sid, smask = ds.place_rows(jnp.asarray(ids)), ds.place_rows(jnp.asarray(mask))
        out = generate(graphdef, sharded, sid, smask, sampler=samplers[si], shardings=ds, **kw)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref[si].tokens))
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref[si].logprobs),
                                   atol=1e-4)
        assert out.tokens.sharding.spec[0] == "data", out.tokens.sharding
        print("ok", shape)

    # A prompt batch that does not divide the data axis names the axis and sizes.
    ds = decode_sharding(jax.make_mesh((8, 1), ("data", "tensor")))
    try:
        generate(graphdef, params, ids[:3], mask[:3], sampler=samplers[0], shardings=ds, **kw)
    except ShardingError as e:
        assert "batch 3" in str(e) and "'data'" in str(e) and "8" in str(e), e
    else:
        raise AssertionError("expected ShardingError")
    # A mesh without a tensor axis replicates every parameter.
    ds = decode_sharding(jax.make_mesh((8,), ("data",)))
    assert ds.tensor_axis is None
    assert all(s.spec == P() or all(a is None for a in s.spec)
               for s in jax.tree.leaves(ds.params(params)))
    print("done")
    """
)


def test_sharded_decode_matches_unsharded():
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "ok (2, 4)" in proc.stdout and "ok (4, 2)" in proc.stdout and "done" in proc.stdout
