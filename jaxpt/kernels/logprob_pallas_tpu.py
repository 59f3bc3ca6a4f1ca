"""Pallas TPU (Mosaic) kernels for the token log-prob core.

Axis legend: N tokens, H hidden, V vocab; n / v a block of tokens / vocab columns.

TPU grids run sequentially per core, so the vocabulary loop is the last grid axis
("arbitrary") and the running statistics live in the output blocks, which stay resident
in VMEM while their block index does not change:

  forward   grid (N/n, V/v): fold each n x v logits tile into (m, s, t, zt).
  d hidden  grid (N/n, V/v): recompute the tile, d_hidden[n] += d_logits @ W[v].
  d W       grid (V/v, N/n): recompute the tile, d_W[v] += d_logits.T @ hidden[n].

Blocks hold the full (padded to 128) hidden size; the wrapper pads N and V to whole
blocks (padded vocab columns carry id -1 and are masked out).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxpt.kernels.logprob_common import (
    BlockSizes,
    dlogits,
    init_stats,
    online_update,
    pad_operands,
)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _logits(h_ref, w_ref, inv_temp):
    z = lax.dot_general(h_ref[...], w_ref[...], _NT, preferred_element_type=jnp.float32)
    return z * inv_temp


def _fwd_kernel(
    h_ref, w_ref, cols_ref, tgt_ref, m_ref, s_ref, t_ref, zt_ref, *, inv_temp, with_entropy
):
    refs = (m_ref, s_ref, t_ref, zt_ref)

    @pl.when(pl.program_id(1) == 0)
    def _():
        for ref, x in zip(refs, init_stats(m_ref.shape), strict=True):
            ref[...] = x

    z = _logits(h_ref, w_ref, inv_temp)
    stats = online_update(tuple(r[...] for r in refs), z, cols_ref[...], tgt_ref[...], with_entropy)
    for ref, x in zip(refs, stats, strict=True):
        ref[...] = x


def _dz(
    h_ref, w_ref, cols_ref, tgt_ref, lse_ref, blp_ref, ba_ref, bent_ref, inv_temp, with_entropy
):
    z = _logits(h_ref, w_ref, inv_temp)
    return dlogits(
        z,
        cols_ref[...],
        tgt_ref[...],
        lse_ref[...],
        blp_ref[...],
        ba_ref[...],
        bent_ref[...],
        with_entropy,
    )


def _dh_kernel(*refs, inv_temp, with_entropy):
    *ins, dh_ref = refs

    @pl.when(pl.program_id(1) == 0)
    def _():
        dh_ref[...] = jnp.zeros_like(dh_ref)

    w_ref = ins[1]
    dz = _dz(*ins, inv_temp, with_entropy).astype(w_ref.dtype)
    dh_ref[...] += jnp.dot(dz, w_ref[...], preferred_element_type=jnp.float32)


def _dw_kernel(*refs, inv_temp, with_entropy):
    *ins, dw_ref = refs

    @pl.when(pl.program_id(1) == 0)
    def _():
        dw_ref[...] = jnp.zeros_like(dw_ref)

    h_ref = ins[0]
    dz = _dz(*ins, inv_temp, with_entropy).astype(h_ref.dtype)
    dw_ref[...] += jnp.dot(dz.T, h_ref[...], preferred_element_type=jnp.float32)


def _padded(h_NH, w_VH, cols_1V, vecs_N, bs: BlockSizes):
    return pad_operands(
        h_NH, w_VH, cols_1V, vecs_N, block_n=bs.block_n, block_v=bs.block_v, block_h=128
    )


def _specs(bn, bv, Hp, n_vecs, token_major: bool):
    """BlockSpecs for (h, w, cols, *vecs); the grid is (n, v) or, if not token_major, (v, n)."""
    ij = (lambda i, j: (i, j)) if token_major else (lambda j, i: (i, j))
    on = lambda f: lambda a, b: f(*ij(a, b))
    return [
        pl.BlockSpec((bn, Hp), on(lambda i, j: (i, 0))),
        pl.BlockSpec((bv, Hp), on(lambda i, j: (j, 0))),
        pl.BlockSpec((1, bv), on(lambda i, j: (0, j))),
        *[pl.BlockSpec((bn, 1), on(lambda i, j: (i, 0)))] * n_vecs,
    ]


_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def tpu_stats(h_NH, w_VH, cols_1V, tgt_N, *, inv_temp, with_entropy, block_sizes, interpret):
    """Per-token (m, s, t, zt), each (N,) fp32, over the columns of w_VH."""
    bs = block_sizes.check("tpu")
    N = h_NH.shape[0]
    h, w, cols, (tgt,) = _padded(h_NH, w_VH, cols_1V, [tgt_N], bs)
    (Np, Hp), Vp = h.shape, w.shape[0]
    bn, bv = bs.block_n, bs.block_v
    kernel = functools.partial(_fwd_kernel, inv_temp=inv_temp, with_entropy=with_entropy)
    stats = pl.pallas_call(
        kernel,
        grid=(Np // bn, Vp // bv),
        in_specs=_specs(bn, bv, Hp, 1, token_major=True),
        out_specs=[pl.BlockSpec((bn, 1), lambda i, j: (i, 0))] * 4,
        out_shape=[jax.ShapeDtypeStruct((Np, 1), jnp.float32)] * 4,
        compiler_params=_PARAMS,
        interpret=interpret,
        name="jaxpt_logprob_fwd",
    )(h, w, cols, tgt)
    return tuple(x[:N, 0] for x in stats)


def tpu_grads(
    h_NH, w_VH, cols_1V, tgt_N, coeffs_N, *, inv_temp, with_entropy, block_sizes, interpret
):
    """(d hidden (N, H), d lm_head (V, H)), both fp32, for the coefficients ``coeffs_N``
    = (lse, b_lp, b_a, b_ent) (see ``logprob_common.dlogits``)."""
    bs = block_sizes.check("tpu")
    (N, H), V = h_NH.shape, w_VH.shape[0]
    h, w, cols, vecs = _padded(h_NH, w_VH, cols_1V, [tgt_N, *coeffs_N], bs)
    (Np, Hp), Vp = h.shape, w.shape[0]
    bn, bv = bs.block_n, bs.block_v
    kw = dict(inv_temp=inv_temp, with_entropy=with_entropy)
    dh = pl.pallas_call(
        functools.partial(_dh_kernel, **kw),
        grid=(Np // bn, Vp // bv),
        in_specs=_specs(bn, bv, Hp, 5, token_major=True),
        out_specs=pl.BlockSpec((bn, Hp), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((Np, Hp), jnp.float32),
        compiler_params=_PARAMS,
        interpret=interpret,
        name="jaxpt_logprob_bwd_dh",
    )(h, w, cols, *vecs)
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, **kw),
        grid=(Vp // bv, Np // bn),
        in_specs=_specs(bn, bv, Hp, 5, token_major=False),
        out_specs=pl.BlockSpec((bv, Hp), lambda j, i: (j, 0)),
        out_shape=jax.ShapeDtypeStruct((Vp, Hp), jnp.float32),
        compiler_params=_PARAMS,
        interpret=interpret,
        name="jaxpt_logprob_bwd_dw",
    )(h, w, cols, *vecs)
    return dh[:N, :H], dw[:V, :H]
