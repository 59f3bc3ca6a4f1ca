"""Pallas GPU (Triton) kernels for the token log-prob core.

Axis legend: N tokens, H hidden, V vocab; n / v / h a block of each (BlockSizes).

Forward, grid (N/n,): each program owns n tokens and walks the whole vocabulary in
v-column tiles with the online statistics of `logprob_common` (running max, sum-exp,
sum p*z, gathered target logit); a logits tile is n x v, accumulated over H in h-column
steps, and is never written to memory.

Backward, grid (N/n, V/v): each program recomputes its n x v logits tile, turns it into
d logits, and atomically adds d_logits @ W[tile] into d hidden and d_logits.T @ hidden
into d W (fp32 accumulators, zero-initialised and aliased in/out). One recompute and two
gradient matmuls per tile, as in cut-cross-entropy style kernels.

Triton loads must have power-of-two sizes and are not bounds-masked here, so the wrapper
pads N, V and H to whole blocks (padded vocab columns carry id -1 and are masked out).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpt.kernels.logprob_common import (
    BlockSizes,
    dlogits,
    init_stats,
    online_update,
    pad_operands,
)

_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_TN = (((0,), (0,)), ((), ()))  # contract the first dims: a.T @ b


def _i32(i):
    """A loop index as int32, like pl.program_id: with JAX_ENABLE_X64 a Python-bounded
    fori_loop counts in int64, and one ref index may not mix the two widths."""
    return lax.convert_element_type(i, jnp.int32)


def _logits_tile(h_ref, w_ref, vs, shape, bh, nh, inv_temp):
    """z = h[block] @ w[vs].T / T as an fp32 (n, v) tile, accumulated over H in bh steps."""

    def step(k, acc):
        hs = pl.ds(pl.multiple_of(_i32(k) * bh, bh), bh)
        return acc + lax.dot_general(
            h_ref[:, hs], w_ref[vs, hs], _NT, preferred_element_type=jnp.float32
        )

    return lax.fori_loop(0, nh, step, jnp.zeros(shape, jnp.float32)) * inv_temp


def _fwd_kernel(
    h_ref,
    w_ref,
    cols_ref,
    tgt_ref,
    m_ref,
    s_ref,
    t_ref,
    zt_ref,
    *,
    bv,
    bh,
    nv,
    nh,
    inv_temp,
    with_entropy,
):
    bn = h_ref.shape[0]
    tgt_n1 = tgt_ref[...]

    def tile(j, stats):
        vs = pl.ds(pl.multiple_of(_i32(j) * bv, bv), bv)
        z = _logits_tile(h_ref, w_ref, vs, (bn, bv), bh, nh, inv_temp)
        return online_update(stats, z, cols_ref[:, vs], tgt_n1, with_entropy)

    m, s, t, zt = lax.fori_loop(0, nv, tile, init_stats((bn, 1)))
    m_ref[...], s_ref[...], t_ref[...], zt_ref[...] = m, s, t, zt


def _bwd_kernel(
    h_ref,
    w_ref,
    cols_ref,
    tgt_ref,
    lse_ref,
    blp_ref,
    ba_ref,
    bent_ref,
    _dh_in,
    _dw_in,
    dh_ref,
    dw_ref,
    *,
    bv,
    bh,
    nh,
    inv_temp,
    with_entropy,
):
    bn = h_ref.shape[0]
    ns = pl.ds(pl.multiple_of(pl.program_id(0) * bn, bn), bn)
    vs = pl.ds(pl.multiple_of(pl.program_id(1) * bv, bv), bv)
    z = _logits_tile(h_ref, w_ref, vs, (bn, bv), bh, nh, inv_temp)
    dz = dlogits(
        z,
        cols_ref[:, vs],
        tgt_ref[...],
        lse_ref[...],
        blp_ref[...],
        ba_ref[...],
        bent_ref[...],
        with_entropy,
    ).astype(h_ref.dtype)

    @pl.loop(0, nh)
    def _(k):
        hs = pl.ds(pl.multiple_of(_i32(k) * bh, bh), bh)
        dh = jnp.dot(dz, w_ref[vs, hs], preferred_element_type=jnp.float32)
        plgpu.atomic_add(dh_ref, (ns, hs), dh)
        dw = lax.dot_general(dz, h_ref[:, hs], _TN, preferred_element_type=jnp.float32)
        plgpu.atomic_add(dw_ref, (vs, hs), dw)


def _padded(h_NH, w_VH, cols_1V, vecs_N, bs: BlockSizes):
    return pad_operands(
        h_NH, w_VH, cols_1V, vecs_N, block_n=bs.block_n, block_v=bs.block_v, block_h=bs.block_h
    )


def gpu_stats(h_NH, w_VH, cols_1V, tgt_N, *, inv_temp, with_entropy, block_sizes, interpret):
    """Per-token (m, s, t, zt), each (N,) fp32, over the columns of w_VH."""
    bs = block_sizes.check("gpu")
    N = h_NH.shape[0]
    h, w, cols, (tgt,) = _padded(h_NH, w_VH, cols_1V, [tgt_N], bs)
    (Np, Hp), Vp = h.shape, w.shape[0]
    bn = bs.block_n
    vec = pl.BlockSpec((bn, 1), lambda i: (i, 0))
    kernel = functools.partial(
        _fwd_kernel,
        bv=bs.block_v,
        bh=bs.block_h,
        nv=Vp // bs.block_v,
        nh=Hp // bs.block_h,
        inv_temp=inv_temp,
        with_entropy=with_entropy,
    )
    stats = pl.pallas_call(
        kernel,
        grid=(Np // bn,),
        in_specs=[
            pl.BlockSpec((bn, Hp), lambda i: (i, 0)),
            pl.BlockSpec((Vp, Hp), lambda i: (0, 0)),
            pl.BlockSpec((1, Vp), lambda i: (0, 0)),
            vec,
        ],
        out_specs=[vec] * 4,
        out_shape=[jax.ShapeDtypeStruct((Np, 1), jnp.float32)] * 4,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="jaxpt_logprob_fwd",
    )(h, w, cols, tgt)
    return tuple(x[:N, 0] for x in stats)


def gpu_grads(
    h_NH, w_VH, cols_1V, tgt_N, coeffs_N, *, inv_temp, with_entropy, block_sizes, interpret
):
    """(d hidden (N, H), d lm_head (V, H)), both fp32, for the coefficients ``coeffs_N``
    = (lse, b_lp, b_a, b_ent) (see ``logprob_common.dlogits``)."""
    bs = block_sizes.check("gpu")
    (N, H), V = h_NH.shape, w_VH.shape[0]
    h, w, cols, vecs = _padded(h_NH, w_VH, cols_1V, [tgt_N, *coeffs_N], bs)
    (Np, Hp), Vp = h.shape, w.shape[0]
    bn, bv = bs.block_n, bs.block_v
    vec = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0, 0))
    kernel = functools.partial(
        _bwd_kernel,
        bv=bv,
        bh=bs.block_h,
        nh=Hp // bs.block_h,
        inv_temp=inv_temp,
        with_entropy=with_entropy,
    )
    dh, dw = pl.pallas_call(
        kernel,
        grid=(Np // bn, Vp // bv),
        in_specs=[
            pl.BlockSpec((bn, Hp), lambda i, j: (i, 0)),
            whole((Vp, Hp)),
            whole((1, Vp)),
            *[vec] * 5,
            whole((Np, Hp)),
            whole((Vp, Hp)),
        ],
        out_specs=[whole((Np, Hp)), whole((Vp, Hp))],
        out_shape=[
            jax.ShapeDtypeStruct((Np, Hp), jnp.float32),
            jax.ShapeDtypeStruct((Vp, Hp), jnp.float32),
        ],
        input_output_aliases={8: 0, 9: 1},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="jaxpt_logprob_bwd",
    )(h, w, cols, *vecs, jnp.zeros((Np, Hp), jnp.float32), jnp.zeros((Vp, Hp), jnp.float32))
    return dh[:N, :H], dw[:V, :H]
