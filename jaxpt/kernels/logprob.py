"""Per-token log-probs, log-sum-exp and entropy of an LM head, without N x V logits.

Axis legend: N tokens, H hidden, V vocab.

SFT (token NLL), DPO (summed sequence log-probs) and GRPO (per-token log-probs, entropy
bonus) all reduce to `token_logprobs`. Implementations, chosen by name:

  reference  plain jnp with materialized logits; the test oracle (logprob_reference.py)
  chunked    plain JAX over token chunks x vocab tiles (logprob_chunked.py); CPU + fallback
  pallas     Pallas kernels: Triton on GPU (logprob_pallas_gpu.py), Mosaic on TPU
             (logprob_pallas_tpu.py); on CPU only with `interpret`
  auto       pallas on GPU / TPU, chunked on CPU

chunked and pallas share one `jax.custom_vjp` whose backward recomputes logits tiles.
With `mesh` and `vocab_axis`, lm_head is sharded over V: each shard reduces its columns
and the per-token statistics are combined with pmax / psum.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxpt.kernels import logprob_chunked, logprob_pallas_gpu, logprob_pallas_tpu
from jaxpt.kernels.logprob_common import (
    BlockSizes,
    TokenLogProbs,
    chunk_skipping_is_safe,
    finalize,
    round_up,
)
from jaxpt.kernels.logprob_reference import reference_token_logprobs

__all__ = ["BlockSizes", "TokenLogProbs", "token_logprobs"]

IMPLS = ("auto", "pallas", "chunked", "reference")
_WHERE = "jaxpt/kernels/logprob.token_logprobs"

_STATS = {
    "chunked": logprob_chunked.chunked_stats,
    "gpu": logprob_pallas_gpu.gpu_stats,
    "tpu": logprob_pallas_tpu.tpu_stats,
}
_GRADS = {
    "chunked": logprob_chunked.chunked_grads,
    "gpu": logprob_pallas_gpu.gpu_grads,
    "tpu": logprob_pallas_tpu.tpu_grads,
}


@dataclasses.dataclass(frozen=True)
class _Config:
    layout: str  # "chunked" | "gpu" | "tpu"
    inv_temp: float
    with_entropy: bool
    block_sizes: BlockSizes
    interpret: Any
    mesh: Mesh | None
    vocab_axis: str | None

    def kernel_kwargs(self):
        kw = dict(
            inv_temp=self.inv_temp, with_entropy=self.with_entropy, block_sizes=self.block_sizes
        )
        if self.layout != "chunked":
            kw["interpret"] = self.interpret
        return kw


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# Scoped VMEM the TPU kernels' blocks may use: Mosaic's default scoped limit is 16 MiB on
# v5e (32 MiB on v6e); the rest is its own scratch. See `tpu_vmem_bytes`.
TPU_VMEM_BUDGET = 15 * 2**20


def tpu_vmem_bytes(block_n: int, block_v: int, H: int, itemsize: int) -> int:
    """VMEM of the TPU kernels' blocks (`logprob_pallas_tpu`), the largest of the three:
    the hidden and LM-head input blocks (full H, padded to 128), double-buffered, plus
    the output block of the backward kernels (d hidden [n, H] or d W [v, H]): fp32
    double-buffered, or (written in the inputs' dtype) bf16 double-buffered plus an fp32
    accumulator, the same 8 bytes per element. Checked against libtpu's compiler:
    (256, 512) at H = 2,048 compiles in bf16 (14.7 MB) and runs out of scoped VMEM in
    fp32 (21 MB)."""
    Hp = -(-H // 128) * 128
    return (block_n + block_v) * Hp * 2 * itemsize + max(block_n, block_v) * Hp * 2 * 4


def default_block_sizes(layout: str, N: int, V: int, H: int, itemsize: int = 2) -> BlockSizes:
    """Block sizes that fit `layout`, shrunk for tiny inputs; on TPU also shrunk (vocab
    block first, down to 128, then token block, down to 8) until the blocks fit
    ``TPU_VMEM_BUDGET`` for inputs of ``itemsize`` bytes."""
    if layout == "chunked":
        return logprob_chunked.DEFAULT_BLOCKS
    if layout == "gpu":
        return BlockSizes(
            block_n=min(64, max(16, _next_pow2(N))),
            block_v=min(128, max(16, _next_pow2(V))),
            block_h=min(64, max(16, _next_pow2(H))),
        )
    block_n, block_v = min(256, round_up(N, 8)), min(512, round_up(V, 128))
    while tpu_vmem_bytes(block_n, block_v, H, itemsize) > TPU_VMEM_BUDGET:
        if block_v > 128:
            block_v //= 2
        elif block_n > 8:
            block_n = max(8, block_n // 2)
        else:
            break  # the smallest tiles; a hidden size this large fails in Mosaic, by name
    return BlockSizes(block_n=block_n, block_v=block_v)


def _cols(V: int, Vp: int) -> jax.Array:
    """Global vocab id of each (padded) lm_head row, -1 for padding, as a (1, Vp) row."""
    ids = jnp.arange(Vp, dtype=jnp.int32)
    return jnp.where(ids < V, ids, -1)[None, :]


def _token_axes(cfg: _Config, N: int) -> tuple[str, ...] | None:
    """Mesh axes other than vocab_axis that split the tokens (None: tokens replicated).

    Under the shard_map every mesh axis is manual (Pallas interpret callbacks and custom
    calls need that), so tokens are split over the other axes when N divides evenly.
    """
    others = tuple(a for a in cfg.mesh.axis_names if a != cfg.vocab_axis)
    size = 1
    for a in others:
        size *= cfg.mesh.shape[a]
    return others if others and N % size == 0 else None


def _sharded(cfg: _Config, fn, in_specs, out_specs):
    return jax.shard_map(fn, mesh=cfg.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _vocab_padded(cfg: _Config, w_VH):
    """Pad V to a multiple of the vocab-shard count; return (w, cols)."""
    V = w_VH.shape[0]
    shards = 1 if cfg.mesh is None else cfg.mesh.shape[cfg.vocab_axis]
    Vp = round_up(V, shards)
    w = w_VH if Vp == V else jnp.pad(w_VH, ((0, Vp - V), (0, 0)))
    return w, _cols(V, Vp)


def _masked(out, valid_N):
    """Zero every output at invalid tokens (all layouts agree, whether or not they skip)."""
    if valid_N is None:
        return out
    return tuple(None if x is None else jnp.where(valid_N, x, 0.0) for x in out)


def _skip_kwargs(cfg: _Config, valid_N) -> dict:
    """Only `chunked` skips token chunks that hold no valid token, where that is safe."""
    if cfg.layout != "chunked" or valid_N is None or not chunk_skipping_is_safe():
        return {}
    return {"valid_N": valid_N}


def _forward(cfg: _Config, h_NH, w_VH, tgt_N, valid_N):
    stats_fn = functools.partial(_STATS[cfg.layout], **cfg.kernel_kwargs())
    w, cols = _vocab_padded(cfg, w_VH)
    if cfg.mesh is None:
        stats = stats_fn(h_NH, w, cols, tgt_N, **_skip_kwargs(cfg, valid_N))
        return _masked(finalize(*stats, cfg.with_entropy), valid_N)

    def local(h, w, cols, tgt):
        return finalize(*stats_fn(h, w, cols, tgt), cfg.with_entropy, cfg.vocab_axis)

    ax, tok = cfg.vocab_axis, _token_axes(cfg, h_NH.shape[0])
    out_specs = (P(tok), P(tok), P(tok) if cfg.with_entropy else None)
    in_specs = (P(tok, None), P(ax, None), P(None, ax), P(tok))
    out = _sharded(cfg, local, in_specs, out_specs)(h_NH, w, cols, tgt_N)
    return _masked(out, valid_N)


def _grads(cfg: _Config, h_NH, w_VH, tgt_N, coeffs, valid_N):
    grads_fn = functools.partial(_GRADS[cfg.layout], **cfg.kernel_kwargs())
    V = w_VH.shape[0]
    w, cols = _vocab_padded(cfg, w_VH)
    tok = None if cfg.mesh is None else _token_axes(cfg, h_NH.shape[0])
    if cfg.layout == "tpu":
        # The TPU kernel writes a gradient in its input's dtype where no sum over shards
        # follows (d hidden sums over vocab shards, d lm_head over token shards); else fp32.
        shards = 1 if cfg.mesh is None else cfg.mesh.shape[cfg.vocab_axis]
        grads_fn = functools.partial(
            grads_fn, dh_dtype=h_NH.dtype if shards == 1 else jnp.float32,
            dw_dtype=w_VH.dtype if tok is None else jnp.float32)
    if cfg.mesh is None:
        return grads_fn(h_NH, w, cols, tgt_N, coeffs, **_skip_kwargs(cfg, valid_N))
    ax = cfg.vocab_axis

    def local(h, w, cols, tgt, *coeffs):
        dh, dw = grads_fn(h, w, cols, tgt, coeffs)
        # d hidden sums over vocab shards; d lm_head sums over token shards.
        return jax.lax.psum(dh, ax), (dw if tok is None else jax.lax.psum(dw, tok))

    in_specs = (P(tok, None), P(ax, None), P(None, ax), P(tok), *[P(tok)] * len(coeffs))
    dh, dw = _sharded(cfg, local, in_specs, (P(tok, None), P(ax, None)))(
        h_NH, w, cols, tgt_N, *coeffs
    )
    return dh, dw[:V]


def _outputs(out, with_entropy):
    logp, lse, ent = out
    return (logp, lse, ent) if with_entropy else (logp, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: _Config, h_NH, w_VH, tgt_N, valid_N):
    return _outputs(_forward(cfg, h_NH, w_VH, tgt_N, valid_N), cfg.with_entropy)


def _core_fwd(cfg: _Config, h_NH, w_VH, tgt_N, valid_N):
    logp, lse, ent = _forward(cfg, h_NH, w_VH, tgt_N, valid_N)
    out = _outputs((logp, lse, ent), cfg.with_entropy)
    return out, (h_NH, w_VH, tgt_N, valid_N, lse, ent)


def _core_bwd(cfg: _Config, res, g):
    h_NH, w_VH, tgt_N, valid_N, lse, ent = res
    g_lp, g_lse = g[0], g[1]
    a = g_lse - g_lp
    if cfg.with_entropy:
        g_ent = g[2]
        a = a + g_ent * (lse - ent)
    else:
        g_ent = jnp.zeros_like(g_lp)
    coeffs = (lse, g_lp * cfg.inv_temp, a * cfg.inv_temp, g_ent * cfg.inv_temp)
    if valid_N is not None:  # the outputs are constant 0 there: no gradient flows back
        coeffs = (coeffs[0], *(jnp.where(valid_N, c, 0.0) for c in coeffs[1:]))
    dh, dw = _grads(cfg, h_NH, w_VH, tgt_N, coeffs, valid_N)
    return dh.astype(h_NH.dtype), dw.astype(w_VH.dtype), None, None


_core.defvjp(_core_fwd, _core_bwd)
_core_jit = jax.jit(_core, static_argnums=0)


def _platform(mesh: Mesh | None) -> str:
    p = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


def _layout(impl: str, interpret, mesh) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{_WHERE}: impl={impl!r} is not one of {IMPLS}")
    platform = _platform(mesh)
    if impl == "auto":
        impl = "pallas" if platform in ("gpu", "tpu") else "chunked"
    if impl in ("chunked", "reference"):
        return impl
    from jax.experimental.pallas import tpu as pltpu

    if isinstance(interpret, pltpu.InterpretParams) or platform == "tpu":
        return "tpu"
    if platform == "gpu" or interpret:
        return "gpu"
    raise ValueError(
        f"{_WHERE}: impl='pallas' has no kernel for platform {platform!r}; pass "
        "interpret=True to run the kernel in interpret mode (tests), or use impl='chunked'"
    )


def _check_inputs(hidden_NH, lm_head_VH, targets_N, temperature):
    shapes = (
        f"hidden_NH {tuple(hidden_NH.shape)}, lm_head_VH {tuple(lm_head_VH.shape)}, "
        f"targets_N {tuple(targets_N.shape)}"
    )
    if hidden_NH.ndim != 2 or lm_head_VH.ndim != 2 or targets_N.ndim != 1:
        raise ValueError(
            f"{_WHERE}: expected 2-D hidden, 2-D lm_head, 1-D targets; got "
            f"{shapes} (reshape leading dims into N first)"
        )
    if hidden_NH.shape[1] != lm_head_VH.shape[1]:
        raise ValueError(f"{_WHERE}: hidden size H differs: {shapes}")
    if hidden_NH.shape[0] != targets_N.shape[0]:
        raise ValueError(f"{_WHERE}: token count N differs: {shapes}")
    for name, x in (("hidden_NH", hidden_NH), ("lm_head_VH", lm_head_VH)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{_WHERE}: {name} must be floating point, got {x.dtype}")
    if not jnp.issubdtype(targets_N.dtype, jnp.integer):
        raise ValueError(f"{_WHERE}: targets_N must be integer token ids, got {targets_N.dtype}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{_WHERE}: temperature must be a Python number > 0, got {temperature!r}")


def token_logprobs(
    hidden_NH: jax.Array,
    lm_head_VH: jax.Array,
    targets_N: jax.Array,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    impl: str = "auto",
    block_sizes: BlockSizes | None = None,
    interpret: Any = False,
    mesh: Mesh | None = None,
    vocab_axis: str | None = None,
    valid_N: jax.Array | None = None,
) -> TokenLogProbs:
    """Per-token log p(target), logsumexp and (optionally) entropy of softmax(logits / T).

    logits = hidden_NH @ lm_head_VH.T with lm_head_VH in Hugging Face (V, H) layout.
    Inputs may be fp32 or bf16 (mixed dtypes compute in the promoted dtype); matmuls
    accumulate in fp32 and all outputs are fp32 of shape (N,). Nothing is reduced over
    tokens: callers mask and sum. `targets_N` must lie in [0, V) (replace masked targets
    by 0 first). Differentiable w.r.t. hidden_NH and lm_head_VH (cotangents on logprobs,
    lse and entropy); gradients come back in the input dtypes.

    impl: "auto" | "pallas" | "chunked" | "reference" (see module docstring); an
    unsupported combination raises ValueError. block_sizes: tiles for chunked / pallas.
    interpret: run the Pallas kernel in interpret mode (True: GPU kernel on CPU, a
    `pltpu.InterpretParams`: TPU kernel in TPU interpret mode). mesh / vocab_axis: shard
    lm_head's V over that mesh axis (V is zero-padded to a multiple of the shard count);
    hidden and targets are replicated over vocab_axis and split over the other mesh axes
    when N divides their size (else replicated). valid_N: optional bool (N,); outputs
    are 0 at invalid tokens and no gradient flows from them, and `chunked` (on a single
    device) skips every block_n chunk of tokens that holds no valid one, so putting the valid
    tokens first saves their share of the work. Call it inside or outside jit.
    """
    _check_inputs(hidden_NH, lm_head_VH, targets_N, temperature)
    layout = _layout(impl, interpret, mesh)
    if (mesh is None) != (vocab_axis is None):
        raise ValueError(
            f"{_WHERE}: pass mesh and vocab_axis together (got mesh={mesh}, "
            f"vocab_axis={vocab_axis!r})"
        )
    if mesh is not None and vocab_axis not in mesh.axis_names:
        raise ValueError(
            f"{_WHERE}: vocab_axis={vocab_axis!r} is not an axis of the mesh {mesh.axis_names}"
        )
    targets_N = targets_N.astype(jnp.int32)
    if layout == "reference":
        if mesh is not None:
            raise ValueError(
                f"{_WHERE}: impl='reference' is the unsharded oracle; it takes no mesh / vocab_axis"
            )
        out = reference_token_logprobs(
            hidden_NH, lm_head_VH, targets_N, temperature=temperature, with_entropy=with_entropy
        )
        return TokenLogProbs(*_masked(tuple(out), valid_N))
    if block_sizes is None:
        itemsize = jnp.promote_types(hidden_NH.dtype, lm_head_VH.dtype).itemsize
        block_sizes = default_block_sizes(
            layout, hidden_NH.shape[0], lm_head_VH.shape[0], hidden_NH.shape[1], itemsize
        )
    elif not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"{_WHERE}: block_sizes must be a BlockSizes, got {block_sizes!r}")
    block_sizes.check(layout)
    dtype = jnp.promote_types(hidden_NH.dtype, lm_head_VH.dtype)
    cfg = _Config(
        layout,
        1.0 / float(temperature),
        bool(with_entropy),
        block_sizes,
        interpret,
        mesh,
        vocab_axis,
    )
    if valid_N is not None:
        if valid_N.shape != targets_N.shape:
            raise ValueError(
                f"{_WHERE}: valid_N has shape {tuple(valid_N.shape)}, expected "
                f"{tuple(targets_N.shape)} (one flag per token)"
            )
        valid_N = valid_N.astype(bool)
    out = _core_jit(cfg, hidden_NH.astype(dtype), lm_head_VH.astype(dtype), targets_N, valid_N)
    return TokenLogProbs(out[0], out[1], out[2] if with_entropy else None)
