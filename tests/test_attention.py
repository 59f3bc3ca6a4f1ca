"""Attention kernels by name (jaxpt/kernels/attention.py): splash in Pallas interpret mode
against the decoder's XLA attention (values and gradients) for every mask the decoder
builds, the decoder forward with each, and the choice of kernel by the mesh's devices."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export
from jax.sharding import NamedSharding, PartitionSpec
from tolerances import assert_reordered_close, rejects

from jaxpt.config import ConfigError as RunConfigError
from jaxpt.config_load import load_config
from jaxpt.kernels.attention import PrefixBlockMask, choose_attention, splash_attention
from jaxpt.models.config import ConfigError, ModelConfig
from jaxpt.models.decoder import abstract_model, init_model, recomputing_attention
from jaxpt.sharding import make_mesh

B, N, D = 2, 4, 16


def decoder_mask(seg_BT, pos_BT, shared_BT=None):
    """The decoder's rule: same segment (or a shared key, for a real query) and the key's
    position not after the query's, as [B, 1, T, S]."""
    same = seg_BT[:, :, None] == seg_BT[:, None, :]
    if shared_BT is not None:
        same = same | (shared_BT[:, None, :] & (seg_BT[:, :, None] > 0))
    return (same & (pos_BT[:, None, :] <= pos_BT[:, :, None]))[:, None]


def packed(T):
    """Row 0: three packed sequences then padding; row 1: one sequence then padding."""
    seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b, lengths in enumerate([(T // 3, T // 4, T // 5), (T - 7,)]):
        start = 0
        for s, n in enumerate(lengths):
            seg[b, start : start + n], pos[b, start : start + n] = s + 1, np.arange(n)
            start += n
    return seg, pos


def left_padded(T):
    """Prompts left padded (segment 0) by 9 and 30 tokens, positions from 0 at the first
    real token."""
    seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b, pad in enumerate((9, 30)):
        seg[b, pad:], pos[b, pad:] = 1, np.arange(T - pad)
    return seg, pos


def group_layout(P, C, G):
    """The shared-prompt layout of ``rl.rollout.group_rollout_rows``: a left-padded prompt
    (segment 1, its real tokens shared) then G completions of C (segment i + 2, right
    padded), positions continuing the prompt's."""
    T = P + G * C
    seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b, (pad, lengths) in enumerate([(5, (C, 7, 19)), (0, (1, C - 3, C))]):
        seg[b, pad:P], pos[b, pad:P] = 1, np.arange(P - pad)
        for i, n in enumerate(lengths[:G]):
            start, n = P + i * C, min(n, C)
            seg[b, start : start + n] = i + 2
            pos[b, start : start + n] = P - pad + np.arange(n)
    return seg, pos, seg == 1


CASES = {
    # name: (T, K, layout)
    "causal_mha": (128, 4, "causal"),
    "causal_gqa_unaligned": (100, 2, "causal"),  # T padded to 128 inside
    "packed_gqa": (128, 2, "packed"),
    "left_padded_mqa": (128, 1, "left"),
    "prefix_blocks_gqa": (40 + 3 * 30, 2, "blocks"),  # 130 tokens: two 128-blocks
}


def inputs(name, dtype=jnp.float32):
    T, K, layout = CASES[name]
    rng = np.random.RandomState(sum(map(ord, name)))
    q = jnp.asarray(rng.randn(B, T, N, D), dtype)
    k = jnp.asarray(rng.randn(B, T, K, D), dtype)
    v = jnp.asarray(rng.randn(B, T, K, D), dtype)
    shared, blocks = None, None
    if layout == "causal":
        seg, pos = np.ones((B, T), np.int32), np.broadcast_to(np.arange(T), (B, T))
    elif layout == "packed":
        seg, pos = packed(T)
    elif layout == "left":
        seg, pos = left_padded(T)
    else:
        seg, pos, shared = group_layout(40, 30, 3)
        blocks = (40, 30)
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    shared = None if shared is None else jnp.asarray(shared)
    kw = dict(
        segment_ids_BT=None if layout == "causal" else seg,
        prefix_blocks=blocks,
        shared_prefix=shared is not None,
    )
    return (q, k, v), decoder_mask(seg, pos, shared), np.asarray(seg > 0), kw


def splash_fn(**kw):
    return lambda q, k, v: splash_attention(q, k, v, scale=D**-0.5, interpret=True, **kw)


def xla_fn(mask):
    return lambda q, k, v: recomputing_attention(q, k, v, mask, D**-0.5)


def value_and_grads(fn, qkv, real_BT):
    """fn's output and the gradients of a random projection of its real-query outputs
    (padding queries' outputs are never read: module doc of kernels/attention.py)."""
    w = jnp.asarray(np.random.RandomState(1).randn(*qkv[0].shape), jnp.float32)
    keep = jnp.asarray(real_BT)[:, :, None, None]

    def loss(q, k, v):
        return jnp.sum(jnp.where(keep, fn(q, k, v).astype(jnp.float32) * w, 0.0))

    return jax.jit(fn)(*qkv), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*qkv)


@pytest.mark.parametrize("name", sorted(CASES))
def test_splash_matches_xla_values_and_gradients(name):
    qkv, mask, real, kw = inputs(name)
    T = qkv[0].shape[1]
    out, grads = value_and_grads(splash_fn(**kw), qkv, real)
    ref, ref_grads = value_and_grads(xla_fn(mask), qkv, real)
    # Scores reduce over D, the softmax and P.V over T; gradients chain one more of each.
    n = max(T, D)
    assert_reordered_close(np.asarray(out)[real], np.asarray(ref)[real], n=n, depth=2)
    for g, r, what in zip(grads, ref_grads, "qkv", strict=True):
        assert_reordered_close(g, r, n=n, depth=4, err_msg=f"d{what}")


def test_mutation_splash_without_segment_ids_is_rejected():
    qkv, mask, real, kw = inputs("packed_gqa")
    out = np.asarray(jax.jit(splash_fn())(*qkv))  # causal only: segments see each other
    ref = np.asarray(jax.jit(xla_fn(mask))(*qkv))
    assert rejects(assert_reordered_close, out[real], ref[real], n=128, depth=2)


def test_splash_bf16_matches_xla():
    qkv, mask, real, kw = inputs("packed_gqa", jnp.bfloat16)
    out = np.asarray(jax.jit(splash_fn(**kw))(*qkv).astype(jnp.float32))
    ref = np.asarray(jax.jit(xla_fn(mask))(*qkv).astype(jnp.float32))
    # bf16 probabilities and the pre-scaled bf16 q: a few bf16 ulps of the output.
    assert_reordered_close(out[real], ref[real], n=128, depth=2, dtype=jnp.bfloat16)


def test_prefix_block_mask_is_the_layout():
    P, C, T = 3, 2, 9  # prefix 0-2, blocks 3-4, 5-6, 7-8
    dense = PrefixBlockMask(T, P, C)[0:T, 0:T]
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    block = lambda x: (x - P) // C  # noqa: E731
    expected = (j <= i) & ((j < P) | ((i >= P) & (block(i) == block(j))))
    np.testing.assert_array_equal(dense, expected)
    assert PrefixBlockMask(T, P, C) == PrefixBlockMask(T, P, C)
    assert hash(PrefixBlockMask(T, P, C)) != hash(PrefixBlockMask(T, P, 3))


# -- the decoder ---------------------------------------------------------------------------

CFG = ModelConfig(
    model_type="qwen3",
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    qk_norm=True,
    remat="full",
)


@pytest.mark.parametrize("layout", ["causal", "packed", "blocks"])
def test_decoder_forward_splash_equals_xla(layout):
    mesh = make_mesh(1, -1, 1, devices=jax.devices()[:1])
    rng = np.random.RandomState(2)
    kw = {}
    if layout == "causal":
        seg, pos = np.ones((B, 40), np.int32), None
    elif layout == "packed":
        seg, pos = packed(48)
    else:
        seg, pos, shared = group_layout(10, 8, 3)
        kw = dict(shared_BT=jnp.asarray(shared), prefix_blocks=(10, 8))
    ids = jnp.asarray(rng.randint(0, CFG.vocab_size, seg.shape))
    args = (ids,) if pos is None else (ids, jnp.asarray(pos), jnp.asarray(seg))

    def hidden(**attn):
        model = init_model(CFG.replace(mesh=mesh, **attn), seed=4)
        return np.asarray(model(*args, **kw)[0])

    out = hidden(attention="splash", attention_interpret=True)
    ref = hidden(attention="xla")
    real = seg > 0
    # 2 layers of attention (n = T) and projections (n <= 48), then the final norm.
    assert_reordered_close(out[real], ref[real], n=48, depth=2 * CFG.num_layers + 1)


def test_auto_lowers_splash_for_an_abstract_tpu_slice():
    """`auto` follows the mesh being compiled for: on v5e 2x2's abstract devices (libtpu's
    compile-only path, from this CPU) the decoder's attention is the Mosaic kernel, in
    shard_map over the batch. Skipped without libtpu (the [tpu] extra)."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(
        platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1,
    ).devices  # fmt: skip
    mesh = make_mesh(1, -1, 1, devices=devices)
    cfg = CFG.replace(head_dim=128, compute_dtype="bfloat16", mesh=mesh)
    graphdef, params = nnx.split(abstract_model(cfg))
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    ids = jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=rows)

    def loss(p, ids):
        return jnp.sum(nnx.merge(graphdef, p)(ids, None, ids)[0].astype(jnp.float32) ** 2)

    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    text = jax.jit(jax.grad(loss)).lower(params, ids).as_text()
    assert "tpu_custom_call" in text and "splash" in text


def test_decoder_with_cudnn_lowers_for_cuda():
    """jax.export for CUDA from this CPU. jax checks the cuDNN version while tracing, so
    this needs jax-cuda12-plugin and cuDNN's libraries (no GPU); skipped without them."""
    cfg = CFG.replace(attention="cudnn", compute_dtype="bfloat16")
    graphdef, params = nnx.split(abstract_model(cfg))

    def loss(p, ids):
        return jnp.sum(nnx.merge(graphdef, p)(ids)[0].astype(jnp.float32) ** 2)

    targets = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in targets]
    try:
        lower = export.export(jax.jit(jax.grad(loss)), platforms=["cuda"], disabled_checks=checks)
        exported = lower(params, jax.ShapeDtypeStruct((2, 128), jnp.int32))
    except RuntimeError as e:
        if "cuDNN" not in str(e):
            raise
        pytest.skip(f"no cuDNN libraries on this machine ({e})")
    text = exported.mlir_module()
    assert all(f"@{t}(" in text for t in targets)


# -- choosing --------------------------------------------------------------------------------


def fake_mesh(platform, kind="", version=""):
    """What choose_attention reads of a mesh: its first device's platform, kind, client."""
    device = types.SimpleNamespace(
        platform=platform, device_kind=kind, client=types.SimpleNamespace(platform_version=version)
    )
    return types.SimpleNamespace(devices=np.array([device], dtype=object))


TPU = fake_mesh("tpu", "TPU v5 lite")
CUDA = fake_mesh("gpu", "NVIDIA H100 80GB HBM3", "cuda 12080")
ROCM = fake_mesh("gpu", "AMD Instinct MI300X", "rocm 6.2")
BF16 = jnp.bfloat16


def test_auto_follows_the_mesh_devices():
    cpu = make_mesh(1, -1, 1, devices=jax.devices()[:1])
    assert choose_attention("auto", None, dtype=BF16) == "xla"
    assert choose_attention("auto", cpu, dtype=BF16, segmented=True) == "xla"
    assert choose_attention("auto", TPU, dtype=BF16, segmented=True) == "splash"
    assert choose_attention("auto", TPU, dtype=BF16, shared=True, prefix_blocks=(4, 2)) == "splash"
    assert choose_attention("auto", TPU, dtype=BF16, shared=True) == "xla"  # DPO shared prefix
    assert choose_attention("auto", TPU, dtype=BF16, cache=True) == "xla"
    assert choose_attention("auto", CUDA, dtype=BF16) == "cudnn"
    assert choose_attention("auto", CUDA, dtype=BF16, segmented=True) == "xla"
    assert choose_attention("auto", CUDA, dtype=jnp.float32) == "xla"
    assert choose_attention("auto", ROCM, dtype=BF16) == "xla"


def test_explicit_kernel_that_does_not_cover_the_call_raises():
    cpu = make_mesh(1, -1, 1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="attention='splash'.*shared_BT without prefix_blocks"):
        choose_attention("splash", TPU, dtype=BF16, shared=True)
    with pytest.raises(ValueError, match="attention='cudnn'.*segment ids"):
        choose_attention("cudnn", CUDA, dtype=BF16, segmented=True)
    with pytest.raises(ValueError, match="attention='cudnn'.*bf16 / fp16"):
        choose_attention("cudnn", CUDA, dtype=jnp.float32)
    with pytest.raises(ValueError, match="'splash' is a tpu kernel but the mesh's devices are cpu"):
        choose_attention("splash", cpu, dtype=BF16)
    with pytest.raises(ValueError, match="'cudnn' is a cuda kernel but the mesh's devices are tpu"):
        choose_attention("cudnn", TPU, dtype=BF16)
    assert choose_attention("splash", cpu, dtype=BF16, interpret=True) == "splash"
    assert choose_attention("splash", TPU, dtype=BF16, cache=True) == "xla"  # module doc
    with pytest.raises(ValueError, match="attention='splash'.*shared_BT"):
        init_model(CFG.replace(attention="splash", attention_interpret=True))(
            jnp.zeros((1, 8), jnp.int32), shared_BT=jnp.zeros((1, 8), bool)
        )


def test_unknown_attention_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"attention='flash'; use one of"):
        CFG.replace(attention="flash")
    f = tmp_path / "x.yaml"
    f.write_text("model: {attention: flash}\n")
    with pytest.raises(RunConfigError, match=r"model.attention: 'flash' is not one of"):
        load_config(f)
    f.write_text("model: {attention: splash}\n")
    assert load_config(f).model.attention == "splash"
