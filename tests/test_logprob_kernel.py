"""Tests for jaxpt.kernels.logprob.token_logprobs (issue #4: the log-prob core).

Axis legend: N tokens, H hidden, V vocab.

The parity suite compares each implementation with the materialized-logits reference
(values and gradients w.r.t. hidden and lm_head); subclasses rerun it for the Pallas
kernels in interpret mode on CPU (GPU/Triton layout, and TPU layout in TPU interpret mode).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from tolerances import assert_reordered_close, rejects

from jaxpt.kernels import logprob_pallas_gpu, logprob_pallas_tpu
from jaxpt.kernels.logprob import (
    BlockSizes,
    TokenLogProbs,
    default_block_sizes,
    token_logprobs,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (N, V, H, dtype, temperature, with_entropy): N and V never multiples of the blocks;
# V = 1000 / 1519 are scaled-down stand-ins for 49,152 (SmolLM2) and 151,936 (Qwen).
CASES = [
    pytest.param(13, 1000, 32, jnp.float32, 1.0, False, id="fp32-V1000"),
    pytest.param(13, 1519, 40, jnp.float32, 0.7, True, id="fp32-V1519-T0.7-entropy"),
    pytest.param(21, 1519, 40, jnp.bfloat16, 1.3, True, id="bf16-V1519-T1.3-entropy"),
]


def _inputs(N, V, H, dtype, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k1, (N, H), jnp.float32)
    lm_head = jax.random.normal(k2, (V, H), jnp.float32) * (2.0 / math.sqrt(H))
    targets = jax.random.randint(k3, (N,), 0, V)
    return hidden.astype(dtype), lm_head.astype(dtype), targets


def _objective(fn, N, with_entropy):
    """A scalar mixing all outputs with distinct per-token weights (non-trivial cotangents)."""
    w_lp = jnp.linspace(-1.0, 2.0, N)
    w_lse = jnp.cos(jnp.arange(N, dtype=jnp.float32))
    w_ent = jnp.sin(1.0 + jnp.arange(N, dtype=jnp.float32))

    def f(hidden, lm_head):
        out = fn(hidden, lm_head)
        total = jnp.sum(w_lp * out.logprobs_N) + 0.5 * jnp.sum(w_lse * out.lse_N)
        if with_entropy:
            total = total + 0.3 * jnp.sum(w_ent * out.entropy_N)
        return total, out

    return f


_REFERENCE_CACHE = {}


class TestChunkedParity:
    impl = "chunked"
    interpret = False
    block_sizes = BlockSizes(block_n=8, block_v=128)

    def call(self, hidden, lm_head, targets, **kw):
        return token_logprobs(
            hidden,
            lm_head,
            targets,
            impl=self.impl,
            interpret=self.interpret,
            block_sizes=self.block_sizes,
            **kw,
        )

    @pytest.mark.parametrize("N,V,H,dtype,temperature,with_entropy", CASES)
    def test_values_and_grads_match_reference(self, N, V, H, dtype, temperature, with_entropy):
        hidden, lm_head, targets = _inputs(N, V, H, dtype)
        kw = dict(temperature=temperature, with_entropy=with_entropy)

        def run(fn):
            f = _objective(lambda h, w: fn(h, w, targets, **kw), N, with_entropy)
            return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hidden, lm_head)

        (_, got), (dh, dw) = run(self.call)
        key = (N, V, H, jnp.dtype(dtype).name, temperature, with_entropy)
        if key not in _REFERENCE_CACHE:  # shared by the subclasses: compile it once
            _REFERENCE_CACHE[key] = run(
                lambda h, w, t, **k: token_logprobs(h, w, t, impl="reference", **k)
            )
        (_, want), (dh_ref, dw_ref) = _REFERENCE_CACHE[key]

        assert isinstance(got, TokenLogProbs)
        assert got.logprobs_N.dtype == got.lse_N.dtype == jnp.float32
        assert got.logprobs_N.shape == got.lse_N.shape == (N,)
        assert (got.entropy_N is None) == (not with_entropy)
        assert dh.dtype == hidden.dtype and dw.dtype == lm_head.dtype

        # Rounding model (tests/tolerances.py): logits sum H terms, the log-sum-exp and
        # entropy V; the gradients add the backward sums (over V for d_hidden, N for
        # d_lm_head). Both sides accumulate in fp32; bf16 gradients are rounded once.
        n = max(N, V, H)
        assert_reordered_close(got.logprobs_N, want.logprobs_N, n=n, depth=2)
        assert_reordered_close(got.lse_N, want.lse_N, n=n, depth=2)
        if with_entropy:
            assert got.entropy_N.dtype == jnp.float32
            assert_reordered_close(got.entropy_N, want.entropy_N, n=n, depth=2)
        for g, g_ref in ((dh, dh_ref), (dw, dw_ref)):
            assert np.abs(np.asarray(g_ref, np.float32)).max() > 0
            assert_reordered_close(g, g_ref, n=n, depth=3)
        # Mutation: a kernel that skips the last, partial vocab block (7 of V entries)
        # must fail the comparison.
        short = token_logprobs(hidden, lm_head[: V - 7], jnp.minimum(targets, V - 8),
                               impl="reference", **kw)
        assert rejects(assert_reordered_close, got.lse_N, short.lse_N, n=n, depth=2)

    def test_hand_computed_tiny_case(self):
        # N=2, H=2, V=3: logits row 0 = [1, 0, -1], row 1 = [2, 1, 0.5]; T = 2.
        hidden = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        lm_head = jnp.array([[1.0, 2.0], [0.0, 1.0], [-1.0, 0.5]])
        targets = jnp.array([0, 2])
        out = self.call(hidden, lm_head, targets, temperature=2.0, with_entropy=True)

        z = np.array([[0.5, 0.0, -0.5], [1.0, 0.5, 0.25]])  # logits / 2, written out
        lse = np.array(
            [
                math.log(math.exp(0.5) + 1.0 + math.exp(-0.5)),
                math.log(math.exp(1.0) + math.exp(0.5) + math.exp(0.25)),
            ]
        )
        p = np.exp(z - lse[:, None])
        entropy = np.array([-sum(q * math.log(q) for q in row) for row in p])
        np.testing.assert_allclose(out.lse_N, lse, rtol=1e-6)
        np.testing.assert_allclose(out.logprobs_N, [0.5 - lse[0], 0.25 - lse[1]], rtol=1e-6)
        np.testing.assert_allclose(out.entropy_N, entropy, rtol=1e-6)

        # d logprob_0 / d hidden_0 = (W[target] - sum_j p_j W_j) / T; token 1 untouched.
        dh = jax.grad(lambda h: self.call(h, lm_head, targets, temperature=2.0).logprobs_N[0])(
            hidden
        )
        w = np.asarray(lm_head)
        np.testing.assert_allclose(dh[0], (w[0] - p[0] @ w) / 2.0, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dh[1], [0.0, 0.0], atol=1e-7)


    def test_valid_mask_zeroes_outputs_and_their_gradients(self):
        # 21 tokens; with block_n = 8 the third chunk (tokens 16-20) holds no valid token.
        N, V, H = 21, 1000, 32
        hidden, lm_head, targets = _inputs(N, V, H, jnp.float32, seed=3)
        valid = np.zeros(N, bool)
        valid[[0, 1, 2, 5, 8, 9, 15]] = True
        kw = dict(temperature=0.8, with_entropy=True)

        def run(fn):
            f = _objective(lambda h, w: fn(h, w, targets, **kw), N, True)
            return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hidden, lm_head)

        (_, got), (dh, dw) = run(lambda h, w, t, **k: self.call(h, w, t, valid_N=valid, **k))
        # Oracle: the reference on the valid tokens only, written back in place.
        idx = np.flatnonzero(valid)

        def masked_reference(h, w, t, **k):
            out = token_logprobs(h[idx], w, t[idx], impl="reference", **k)
            put = lambda x: jnp.zeros((N,), jnp.float32).at[idx].set(x)  # noqa: E731
            return TokenLogProbs(put(out.logprobs_N), put(out.lse_N), put(out.entropy_N))

        (_, want), (dh_ref, dw_ref) = run(masked_reference)
        for a, b in zip(got, want, strict=True):
            assert_reordered_close(a, b, n=V, depth=2)
        assert np.all(np.asarray(got.logprobs_N)[~valid] == 0.0)
        assert_reordered_close(dh, dh_ref, n=V, depth=3)
        assert_reordered_close(dw, dw_ref, n=V, depth=3)
        assert np.all(np.asarray(dh)[~valid] == 0.0)


class TestPallasGPUInterpretParity(TestChunkedParity):
    """The Triton-layout kernels, run by the generic Pallas interpreter on CPU."""

    impl = "pallas"
    interpret = True
    block_sizes = BlockSizes(block_n=16, block_v=128, block_h=16)


class TestPallasTPUInterpretParity(TestChunkedParity):
    """The Mosaic-layout kernels, run in TPU interpret mode on CPU."""

    impl = "pallas"
    interpret = pltpu.InterpretParams()
    block_sizes = BlockSizes(block_n=8, block_v=128)


def test_chunked_skips_token_chunks_without_valid_tokens():
    # NaN hidden states in a chunk with no valid token: had the chunk been computed, the
    # LM-head gradient would be NaN (0 * NaN); skipped, everything stays finite.
    N, V, H = 24, 1000, 16
    hidden, lm_head, targets = _inputs(N, V, H, jnp.float32, seed=1)
    hidden = hidden.at[8:16].set(jnp.nan)
    valid = jnp.arange(N) % 8 < 3
    valid = valid.at[8:16].set(False)

    def loss(h, w):
        out = token_logprobs(
            h, w, targets, impl="chunked", block_sizes=BlockSizes(8, 256), valid_N=valid
        )
        return jnp.sum(out.logprobs_N)

    value, (dh, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, lm_head)
    assert np.isfinite(value) and np.all(np.isfinite(dw))
    assert np.all(np.isfinite(np.asarray(dh)[np.asarray(valid)]))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU-only behaviour")
def test_auto_is_chunked_on_cpu():
    hidden, lm_head, targets = _inputs(5, 300, 16, jnp.float32)
    f = lambda impl: token_logprobs(hidden, lm_head, targets, impl=impl)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda: f("auto"))())
    np.testing.assert_array_equal(f("auto").logprobs_N, f("chunked").logprobs_N)
    assert_reordered_close(f("auto").logprobs_N, f("reference").logprobs_N, n=300, depth=2)


def test_mixed_dtypes_give_grads_in_each_input_dtype():
    hidden, lm_head, targets = _inputs(5, 300, 16, jnp.float32)
    hidden = hidden.astype(jnp.bfloat16)  # bf16 activations, fp32 head: computes in fp32

    def loss(h, w):
        return jnp.sum(token_logprobs(h, w, targets, impl="chunked").logprobs_N)

    dh, dw = jax.grad(loss, argnums=(0, 1))(hidden, lm_head)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    dh_ref, dw_ref = jax.grad(
        lambda h, w: jnp.sum(token_logprobs(h, w, targets, impl="reference").logprobs_N),
        argnums=(0, 1),
    )(hidden.astype(jnp.float32), lm_head)
    assert_reordered_close(dw, dw_ref, n=300, depth=3)
    assert_reordered_close(dh, dh_ref, n=300, depth=3, out_dtype=jnp.bfloat16)


def test_chunked_memory_far_below_reference():
    """Compiled temp memory of forward+backward: chunked <= 25% of the reference."""
    N, V, H = 512, 8192, 64
    hidden = jax.ShapeDtypeStruct((N, H), jnp.float32)
    lm_head = jax.ShapeDtypeStruct((V, H), jnp.float32)
    targets = jax.ShapeDtypeStruct((N,), jnp.int32)

    def temp_bytes(impl):
        def loss(h, w, t):
            return jnp.sum(
                token_logprobs(
                    h,
                    w,
                    t,
                    impl=impl,
                    with_entropy=True,
                    block_sizes=BlockSizes(128, 1024) if impl == "chunked" else None,
                ).logprobs_N
            )

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, lm_head, targets).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked, reference = temp_bytes("chunked"), temp_bytes("reference")
    assert reference >= N * V * 4  # the reference really holds N x V fp32 logits
    assert chunked <= 0.25 * reference, (chunked, reference)


@pytest.mark.parametrize(
    "platform,target", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")]
)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_kernels_lower_for_gpu_and_tpu(platform, target, with_entropy):
    """Cross-platform lowering: the Triton / Mosaic kernel bodies lower with the default
    block sizes at a SmolLM2-like H=576 (no GPU/TPU needed; device compilation is not run)."""
    N, H, V = 200, 576, 3000
    layout = "gpu" if platform == "cuda" else "tpu"
    module = logprob_pallas_gpu if layout == "gpu" else logprob_pallas_tpu
    kw = dict(
        inv_temp=0.9,
        with_entropy=with_entropy,
        interpret=False,
        block_sizes=default_block_sizes(layout, N, V, H),
    )
    h = jax.ShapeDtypeStruct((N, H), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((V, H), jnp.bfloat16)
    cols = jax.ShapeDtypeStruct((1, V), jnp.int32)
    vec_i, vec_f = jax.ShapeDtypeStruct((N,), jnp.int32), jax.ShapeDtypeStruct((N,), jnp.float32)
    stats = getattr(module, f"{layout}_stats")
    grads = getattr(module, f"{layout}_grads")
    for fn, args in ((stats, (h, w, cols, vec_i)), (grads, (h, w, cols, vec_i, (vec_f,) * 4))):
        lowered = jax.jit(lambda *a, fn=fn: fn(*a, **kw)).trace(*args)
        text = lowered.lower(lowering_platforms=(platform,)).as_text()
        assert f"custom_call @{target}" in text


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from jaxpt.kernels.logprob import BlockSizes, token_logprobs
    from tolerances import reorder_atol
    assert jax.device_count() == 8, jax.devices()
    results = {}
    cases = [((2, 4), ("data", "vocab"), 12, 1519, 40), ((8,), ("vocab",), 10, 1000, 32)]
    for shape, names, N, V, H in cases:
        mesh = Mesh(np.array(jax.devices()).reshape(shape), names)
        k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
        h = jax.random.normal(k1, (N, H))
        w = jax.random.normal(k2, (V, H)) * 0.3
        t = jax.random.randint(k3, (N,), 0, V)
        wl, we = jnp.linspace(-1, 1, N), jnp.cos(jnp.arange(N) * 1.0)
        impls = [("chunked", dict(block_sizes=BlockSizes(8, 128)))]
        if len(shape) == 2:
            impls.append(("pallas", dict(interpret=True, block_sizes=BlockSizes(16, 128, 16))))
        for impl, kw in impls:
            def f(h, w, **sh):
                o = token_logprobs(h, w, t, temperature=0.8, with_entropy=True, impl=impl,
                                   **kw, **sh)
                return jnp.sum(wl * o.logprobs_N) + jnp.sum(we * o.entropy_N), o
            vg = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
            (_, a), ga = jax.jit(lambda h, w: vg(h, w, mesh=mesh, vocab_axis="vocab"))(h, w)
            (_, b), gb = jax.jit(vg)(h, w)
            # The share of the reordering tolerance each output uses (tests/tolerances.py):
            # sums of <= V terms, 2 deep forward, 3 with the backward.
            def used(x, y, depth):
                tol = reorder_atol(jnp.float32, V, depth=depth, scale=float(jnp.max(jnp.abs(y))))
                return float(jnp.max(jnp.abs(x - y))) / tol
            results[f"{impl}-{'x'.join(map(str, shape))}"] = {
                "logprobs": used(a.logprobs_N, b.logprobs_N, 2), "lse": used(a.lse_N, b.lse_N, 2),
                "entropy": used(a.entropy_N, b.entropy_N, 2),
                "d_hidden": used(ga[0], gb[0], 3), "d_lm_head": used(ga[1], gb[1], 3),
                "grad_scale": float(jnp.max(jnp.abs(gb[1]))),
            }
    print("RESULT " + json.dumps(results))
    """
)


def test_sharded_vocab_matches_unsharded_on_8_cpu_devices():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT ") :])
    assert set(results) == {"chunked-2x4", "pallas-2x4", "chunked-8"}
    for name, r in results.items():
        assert r["grad_scale"] > 0, name
        for key in ("logprobs", "lse", "entropy", "d_hidden", "d_lm_head"):
            assert r[key] <= 1.0, (name, key, r)  # within the reordering tolerance


class TestErrors:
    def setup_method(self):
        self.h, self.w, self.t = _inputs(4, 50, 8, jnp.float32)

    def test_bad_impl_name(self):
        with pytest.raises(ValueError, match="impl='triton' is not one of"):
            token_logprobs(self.h, self.w, self.t, impl="triton")

    @pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU-only behaviour")
    def test_pallas_on_cpu_needs_interpret(self):
        with pytest.raises(ValueError, match="interpret=True"):
            token_logprobs(self.h, self.w, self.t, impl="pallas")

    @pytest.mark.parametrize(
        "kw,match",
        [
            (dict(block_n=0, block_v=128), "block_n must be a positive int"),
            (dict(block_n=8, block_v=-128), "block_v must be a positive int"),
            (dict(block_n=8.0, block_v=128), "block_n must be a positive int"),
            (dict(block_n=8, block_v=128, block_h=0), "block_h must be a positive int"),
        ],
    )
    def test_bad_block_sizes_rejected_at_construction(self, kw, match):
        with pytest.raises(ValueError, match=match):
            BlockSizes(**kw)

    @pytest.mark.parametrize(
        "bs,interpret,match",
        [
            (BlockSizes(24, 128, 16), True, "block_n=24.*power of two"),
            (BlockSizes(16, 128), True, "block_h is required"),
            (BlockSizes(16, 128, 8), True, "block_h=8.*>= 16"),
            (BlockSizes(8, 100), pltpu.InterpretParams(), "block_v=100.*multiple of 128"),
            (BlockSizes(12, 128), pltpu.InterpretParams(), "block_n=12.*multiple of 8"),
            (BlockSizes(8, 128, 128), pltpu.InterpretParams(), "leave block_h=None"),
        ],
    )
    def test_block_sizes_checked_for_backend(self, bs, interpret, match):
        with pytest.raises(ValueError, match=match):
            token_logprobs(
                self.h, self.w, self.t, impl="pallas", interpret=interpret, block_sizes=bs
            )

    def test_hidden_size_mismatch_names_shapes(self):
        with pytest.raises(ValueError, match=r"hidden size H differs.*\(4, 8\).*\(50, 9\)"):
            token_logprobs(self.h, jnp.zeros((50, 9)), self.t, impl="chunked")

    def test_token_count_mismatch_names_shapes(self):
        with pytest.raises(ValueError, match=r"token count N differs.*targets_N \(5,\)"):
            token_logprobs(self.h, self.w, jnp.zeros((5,), jnp.int32), impl="chunked")

    def test_leading_dims_rejected(self):
        with pytest.raises(ValueError, match="reshape leading dims"):
            token_logprobs(self.h[None], self.w, self.t[None], impl="chunked")

    def test_float_targets_rejected(self):
        with pytest.raises(ValueError, match="targets_N must be integer"):
            token_logprobs(self.h, self.w, self.t.astype(jnp.float32), impl="chunked")

    def test_nonpositive_temperature_rejected(self):
        with pytest.raises(ValueError, match="temperature must be"):
            token_logprobs(self.h, self.w, self.t, impl="chunked", temperature=0.0)

    def test_mesh_without_vocab_axis_rejected(self):
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
        with pytest.raises(ValueError, match="mesh and vocab_axis together"):
            token_logprobs(self.h, self.w, self.t, impl="chunked", mesh=mesh)
        with pytest.raises(ValueError, match="not an axis of the mesh"):
            token_logprobs(self.h, self.w, self.t, impl="chunked", mesh=mesh, vocab_axis="v")
        with pytest.raises(ValueError, match="unsharded oracle"):
            token_logprobs(self.h, self.w, self.t, impl="reference", mesh=mesh, vocab_axis="vocab")


def test_tpu_blocks_fit_scoped_vmem_by_dtype_and_hidden_size():
    """The TPU blocks shrink (vocab first) until their VMEM fits the budget: (256, 512) at
    H = 2,048 in bf16 (Qwen3-1.7B), (256, 256) in fp32, (256, 128) at H = 4,096 in bf16
    (Llama-3.1-8B); hand-computed bytes at the edges."""
    from jaxpt.kernels.logprob import TPU_VMEM_BUDGET, tpu_vmem_bytes

    assert tpu_vmem_bytes(256, 512, 2048, 2) == 768 * 2048 * 4 + 512 * 2048 * 8  # 14.7 MB
    assert tpu_vmem_bytes(256, 512, 2048, 2) <= TPU_VMEM_BUDGET
    assert tpu_vmem_bytes(256, 512, 2048, 4) > TPU_VMEM_BUDGET  # 21 MB: Mosaic's OOM
    big = 1 << 20
    assert default_block_sizes("tpu", big, big, 2048, 2) == BlockSizes(256, 512)
    assert default_block_sizes("tpu", big, big, 2048, 4) == BlockSizes(256, 256)
    assert default_block_sizes("tpu", big, big, 4096, 2) == BlockSizes(256, 128)
    assert default_block_sizes("tpu", big, big, 4096, 4) == BlockSizes(128, 128)
    assert default_block_sizes("tpu", 40, 300, 576, 4) == BlockSizes(40, 384)


def test_fp32_tpu_backward_compiles_for_a_slice_with_the_default_blocks():
    """libtpu's compiler (compile-only, from this CPU) on one v5e chip: the fp32 backward at
    H = 2,048 runs out of scoped VMEM with the bf16 blocks (256, 512) and compiles with
    the default fp32 blocks. Skipped without libtpu (the [tpu] extra)."""
    pytest.importorskip("libtpu")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxpt.engine.aot import compile_lowered, topology, topology_devices

    N, H, V = 512, 2048, 1024
    mesh = Mesh(np.array(topology_devices(topology("v5e-4"))[:1]), ("x",))
    rep = NamedSharding(mesh, PartitionSpec())
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)  # noqa: E731
    args = (spec((N, H), jnp.float32), spec((V, H), jnp.float32), spec((1, V), jnp.int32),
            spec((N,), jnp.int32), (spec((N,), jnp.float32),) * 4)

    def compile_grads(bs):
        fn = lambda *a: logprob_pallas_tpu.tpu_grads(  # noqa: E731
            *a, inv_temp=1.0, with_entropy=True, block_sizes=bs, interpret=False)
        return compile_lowered(jax.jit(fn).lower(*args))

    with pytest.raises(Exception, match="VmemOom|vmem"):
        compile_grads(BlockSizes(256, 512))
    compiled = compile_grads(default_block_sizes("tpu", N, V, H, 4))
    assert compiled.memory_analysis().output_size_in_bytes >= (N + V) * H * 4
