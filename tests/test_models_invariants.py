"""Invariants of the decoder: packing, jit, causality, KV cache, remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import assert_reordered_close, assert_trees_reordered_close, rejects

from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import KVCache, init_model
from jaxpt.sharding import make_mesh

CFG = ModelConfig(
    model_type="qwen3",
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=12,
    qk_norm=True,
    attention_bias=True,
    rope_theta=500.0,
)


# Rounding model (tests/tolerances.py): sums of <= 97 terms (hidden 48, MLP 80, vocab 97),
# 3 layers + the LM head.
N_RED, DEPTH = 97, CFG.num_layers + 1


def assert_logits_close(actual, desired):
    assert_reordered_close(actual, desired, n=N_RED, depth=DEPTH)


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=3)


def logits(model, ids, positions=None, segments=None):
    hidden, _ = model(jnp.asarray(ids), positions, segments)
    return np.asarray(model.logits(hidden))


def test_packed_row_equals_each_sequence_alone(model):
    rng = np.random.RandomState(0)
    a, b = rng.randint(0, 97, 9), rng.randint(0, 97, 6)
    pad = 3
    ids = np.concatenate([a, b, np.zeros(pad, int)])[None]
    segments = np.array([[1] * 9 + [2] * 6 + [0] * pad])
    positions = np.array([list(range(9)) + list(range(6)) + [0] * pad])
    packed = logits(model, ids, jnp.asarray(positions), jnp.asarray(segments))
    alone_a, alone_b = logits(model, a[None]), logits(model, b[None])
    assert_logits_close(packed[0, :9], alone_a[0])
    assert_logits_close(packed[0, 9:15], alone_b[0])
    # Mutation: b's tokens also seeing a's (one segment for the row) must fail.
    leaky = logits(model, ids, jnp.asarray(positions), jnp.asarray((segments > 0) * 1))
    assert rejects(assert_logits_close, leaky[0, 9:15], alone_b[0])


def test_jit_equals_no_jit(model):
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 97, (2, 11)))
    graphdef, params = nnx.split(model)

    def f(params, ids):
        m = nnx.merge(graphdef, params)
        return m.logits(m(ids)[0])

    assert_logits_close(jax.jit(f)(params, ids), f(params, ids))


def test_causality_through_gradients(model):
    """Logits at t have zero gradient w.r.t. the embeddings of every later token."""
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 97, (1, 8)))
    emb = model.embed(ids)
    t = 4

    def out_at_t(emb):
        hidden, _ = model(ids, input_embeddings_BTE=emb)
        return model.logits(hidden)[0, t].sum()

    g = np.asarray(jax.grad(out_at_t)(emb))[0]
    assert np.all(g[t + 1 :] == 0)
    assert np.all(np.abs(g[: t + 1]).sum(-1) > 0)  # and it does depend on the past


def test_cached_decode_equals_full_forward(model):
    rng = np.random.RandomState(4)
    B, P, new = 2, 7, 5
    lengths = [7, 4]  # row 1 left padded by 3
    prompt = rng.randint(1, 97, (B, P))
    mask = np.zeros((B, P), np.int32)
    for i, n in enumerate(lengths):
        mask[i, P - n :] = 1
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    cont = rng.randint(1, 97, (B, new))
    full_ids = np.concatenate([prompt, cont], 1)
    full_mask = np.concatenate([mask, np.ones((B, new), np.int32)], 1)
    full_pos = np.maximum(np.cumsum(full_mask, 1) - 1, 0)
    full = logits(model, full_ids, jnp.asarray(full_pos), jnp.asarray(full_mask))

    cache = KVCache.init(CFG, B, P + new)
    hidden, cache = model(
        jnp.asarray(prompt), jnp.asarray(pos), jnp.asarray(mask), cache=cache, cache_index=0
    )
    step_logits = [np.asarray(model.logits(hidden))[:, -1]]
    for t in range(new - 1):
        tok = jnp.asarray(cont[:, t : t + 1])
        p = jnp.asarray(np.array(lengths)[:, None] + t)
        hidden, cache = model(tok, p, jnp.ones((B, 1), jnp.int32), cache=cache, cache_index=P + t)
        step_logits.append(np.asarray(model.logits(hidden))[:, 0])
    cached = np.stack(step_logits, 1)
    assert_logits_close(cached, full[:, P - 1 : P - 1 + new])
    # Mutation: new tokens of the padded row one position off (the bookkeeping a cached
    # decode gets wrong under left padding) must fail.
    off = full_pos.copy()
    off[1, P:] += 1
    shifted = logits(model, full_ids, jnp.asarray(off), jnp.asarray(full_mask))
    assert rejects(assert_logits_close, cached, shifted[:, P - 1 : P - 1 + new])


@pytest.mark.parametrize("policy", ["attention", "full", "dots"])
def test_remat_keeps_values_and_gradients(model, policy):
    ids = jnp.asarray(np.random.RandomState(5).randint(0, 97, (2, 6)))
    graphdef, params = nnx.split(model)
    remat_graphdef, _ = nnx.split(init_model(CFG.replace(remat=policy)))

    def loss(params, gd):
        m = nnx.merge(gd, params)
        return jnp.mean(m.logits(m(ids)[0]) ** 2)

    v0, g0 = jax.value_and_grad(loss)(params, graphdef)
    v1, g1 = jax.value_and_grad(loss)(params, remat_graphdef)
    assert_reordered_close(v1, v0, n=N_RED, depth=DEPTH)
    assert_trees_reordered_close(g1, g0, n=N_RED, depth=DEPTH)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_recomputing_attention_matches_autodiff(dtype, tol):
    """The written-out attention backward (remat != none) against autodiff of
    jax.nn.dot_product_attention, on a mask with packed segments, padding, GQA and keys
    shared with later segments (the GRPO shared-prompt layout)."""
    from jaxpt.models.decoder import recomputing_attention

    B, T, N, K, D = 2, 10, 6, 2, 8
    rng = np.random.RandomState(0)
    q, k, v, do = (jnp.asarray(rng.randn(B, T, n, D), dtype) for n in (N, K, K, N))
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0], [1, 1, 1, 1, 2, 2, 3, 3, 0, 0]])
    pos = np.array([[0, 1, 2, 0, 1, 2, 3, 0, 1, 0], [0, 1, 2, 3, 4, 5, 4, 5, 0, 0]])
    shared = np.zeros((B, T), bool)
    shared[1, :4] = True  # row 1: a 4-token prompt shared by segments 2 and 3
    same = (seg[:, :, None] == seg[:, None, :]) | (shared[:, None, :] & (seg[:, :, None] > 0))
    mask = jnp.asarray((same & (pos[:, None, :] <= pos[:, :, None]))[:, None])

    def ref(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=D**-0.5)

    def ours(q, k, v):
        return recomputing_attention(q, k, v, mask, D**-0.5)

    def f32(x):
        return np.asarray(x, np.float32)

    out_ref, vjp_ref = jax.vjp(ref, q, k, v)
    out, vjp = jax.vjp(ours, q, k, v)
    assert out.dtype == dtype
    np.testing.assert_allclose(f32(out), f32(out_ref), atol=tol)
    for a, b in zip(vjp(do), vjp_ref(do), strict=True):
        assert a.dtype == dtype
        np.testing.assert_allclose(f32(a), f32(b), atol=tol * 4)


def test_auto_attention_on_a_cpu_mesh_is_the_xla_program():
    """`model.attention: auto` keeps CPU runs on the written-out attention: the same program
    as `xla` (so metrics stay bit-identical); an explicit kernel changes it."""
    mesh = make_mesh(1, -1, 1, devices=jax.devices()[:1])
    ids, seg = jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32)

    def hlo(cfg):
        graphdef, params = nnx.split(init_model(cfg, seed=0))
        fn = jax.jit(lambda p, x, s: nnx.merge(graphdef, p)(x, None, s)[0])
        return fn.lower(params, ids, seg).as_text()

    xla = hlo(CFG.replace(attention="xla"))
    assert hlo(CFG.replace(attention="auto", mesh=mesh)) == xla
    assert hlo(CFG.replace(attention="splash", attention_interpret=True, mesh=mesh)) != xla
