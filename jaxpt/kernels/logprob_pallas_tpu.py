"""Pallas TPU (Mosaic) kernels for the token log-prob core.

Axis legend: N tokens, H hidden, V vocab; n / v a block of tokens / vocab columns.

TPU grids run sequentially per core, so the vocabulary loop is the last grid axis
("arbitrary") and the running statistics live in the output blocks, which stay resident
in VMEM while their block index does not change:

  forward   grid (N/n, V/v): fold each n x v logits tile into (m, s, t, zt).
  d hidden  grid (N/n, V/v): recompute the tile, d_hidden[n] += d_logits @ W[v].
  d W       grid (V/v, N/n): recompute the tile, d_W[v] += d_logits.T @ hidden[n].

Blocks hold the full hidden size. The LM head is never copied: the vocab grid is
cdiv(V, v) and the last block reads past V (undefined values on the chip, NaN in
interpret mode; d W's rows there are not written). Only the cheap operands are padded:
the column ids to whole blocks with -1 (no column), and the tokens (hidden rows and
per-token vectors) to whole token blocks. Each tile's logits at id -1 are set to 0
before any use, and the d hidden kernel zeroes the LM-head rows past V, so nothing
read out of bounds reaches a result.
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
    pad_axis,
    round_up,
)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _logits(h_ref, w_ref, cols_ref, inv_temp):
    """The n x v logits tile; 0 at columns past the vocabulary (id -1), whose LM-head rows
    were read out of bounds."""
    z = lax.dot_general(h_ref[...], w_ref[...], _NT, preferred_element_type=jnp.float32)
    return jnp.where(cols_ref[...] >= 0, z * inv_temp, 0.0)


def _fwd_kernel(
    h_ref, w_ref, cols_ref, tgt_ref, m_ref, s_ref, t_ref, zt_ref, *, inv_temp, with_entropy
):
    refs = (m_ref, s_ref, t_ref, zt_ref)

    @pl.when(pl.program_id(1) == 0)
    def _():
        for ref, x in zip(refs, init_stats(m_ref.shape), strict=True):
            ref[...] = x

    z = _logits(h_ref, w_ref, cols_ref, inv_temp)
    stats = online_update(tuple(r[...] for r in refs), z, cols_ref[...], tgt_ref[...], with_entropy)
    for ref, x in zip(refs, stats, strict=True):
        ref[...] = x


def _dz(
    h_ref, w_ref, cols_ref, tgt_ref, lse_ref, blp_ref, ba_ref, bent_ref, inv_temp, with_entropy
):
    z = _logits(h_ref, w_ref, cols_ref, inv_temp)
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


def _split_acc(refs, scratch: bool):
    """(inputs, output, accumulator): an fp32 output accumulates in place; any other dtype
    in an fp32 VMEM scratch written out once (same VMEM: 2 x 2 + 4 bytes vs 2 x 4)."""
    if scratch:
        *ins, out_ref, acc_ref = refs
        return ins, out_ref, acc_ref
    *ins, out_ref = refs
    return ins, out_ref, out_ref


def _dh_kernel(*refs, inv_temp, with_entropy, vocab, scratch):
    ins, dh_ref, acc_ref = _split_acc(refs, scratch)
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    w_ref = ins[1]
    dz = _dz(*ins, inv_temp, with_entropy).astype(w_ref.dtype)
    # dz is 0 past the vocabulary, but 0 x (an out-of-bounds NaN / inf) is not: zero the
    # LM-head rows there (a select over one block; only the last block has any).
    bv = w_ref.shape[0]
    row_v1 = j * bv + lax.broadcasted_iota(jnp.int32, (bv, 1), 0)
    w = jnp.where(row_v1 < vocab, w_ref[...], jnp.zeros((), w_ref.dtype))
    acc_ref[...] += jnp.dot(dz, w, preferred_element_type=jnp.float32)

    if scratch:
        @pl.when(j == pl.num_programs(1) - 1)  # fp32 sums, written once in the output dtype
        def _():
            dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _dw_kernel(*refs, inv_temp, with_entropy, scratch):
    ins, dw_ref, acc_ref = _split_acc(refs, scratch)
    i = pl.program_id(1)

    @pl.when(i == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    h_ref = ins[0]
    dz = _dz(*ins, inv_temp, with_entropy).astype(h_ref.dtype)
    acc_ref[...] += jnp.dot(dz.T, h_ref[...], preferred_element_type=jnp.float32)

    if scratch:
        @pl.when(i == pl.num_programs(1) - 1)
        def _():
            dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def _padded(h_NH, cols_1V, vecs_N, bs: BlockSizes):
    """Token rows padded to whole token blocks, column ids to whole vocab blocks (-1);
    the LM head is left as it is (see the module docstring)."""
    Np, Vp = round_up(h_NH.shape[0], bs.block_n), round_up(cols_1V.shape[1], bs.block_v)
    vecs = [pad_axis(x, 0, Np)[:, None] for x in vecs_N]
    return pad_axis(h_NH, 0, Np), pad_axis(cols_1V, 1, Vp, value=-1), vecs


def _specs(bn, bv, H, n_vecs, token_major: bool):
    """BlockSpecs for (h, w, cols, *vecs); the grid is (n, v) or, if not token_major, (v, n)."""
    ij = (lambda i, j: (i, j)) if token_major else (lambda j, i: (i, j))
    on = lambda f: lambda a, b: f(*ij(a, b))
    return [
        pl.BlockSpec((bn, H), on(lambda i, j: (i, 0))),
        pl.BlockSpec((bv, H), on(lambda i, j: (j, 0))),
        pl.BlockSpec((1, bv), on(lambda i, j: (0, j))),
        *[pl.BlockSpec((bn, 1), on(lambda i, j: (i, 0)))] * n_vecs,
    ]


_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def tpu_stats(h_NH, w_VH, cols_1V, tgt_N, *, inv_temp, with_entropy, block_sizes, interpret):
    """Per-token (m, s, t, zt), each (N,) fp32, over the columns of w_VH."""
    bs = block_sizes.check("tpu")
    N = h_NH.shape[0]
    h, cols, (tgt,) = _padded(h_NH, cols_1V, [tgt_N], bs)
    (Np, H), Vp = h.shape, cols.shape[1]
    bn, bv = bs.block_n, bs.block_v
    kernel = functools.partial(_fwd_kernel, inv_temp=inv_temp, with_entropy=with_entropy)
    stats = pl.pallas_call(
        kernel,
        grid=(Np // bn, Vp // bv),
        in_specs=_specs(bn, bv, H, 1, token_major=True),
        out_specs=[pl.BlockSpec((bn, 1), lambda i, j: (i, 0))] * 4,
        out_shape=[jax.ShapeDtypeStruct((Np, 1), jnp.float32)] * 4,
        compiler_params=_PARAMS,
        interpret=interpret,
        name="jaxpt_logprob_fwd",
    )(h, w_VH, cols, tgt)
    return tuple(x[:N, 0] for x in stats)


def tpu_grads(
    h_NH, w_VH, cols_1V, tgt_N, coeffs_N, *, inv_temp, with_entropy, block_sizes, interpret,
    dh_dtype=jnp.float32, dw_dtype=jnp.float32,
):
    """(d hidden (N, H), d lm_head (V, H)) for the coefficients ``coeffs_N`` = (lse, b_lp,
    b_a, b_ent) (see ``logprob_common.dlogits``). Each sums in fp32 in a VMEM accumulator
    and is written once as ``dh_dtype`` / ``dw_dtype``: the caller asks for its inputs'
    dtype where nothing is summed afterwards, so no fp32 copy of d W (V x H) exists."""
    bs = block_sizes.check("tpu")
    N, V = h_NH.shape[0], w_VH.shape[0]
    h, cols, vecs = _padded(h_NH, cols_1V, [tgt_N, *coeffs_N], bs)
    (Np, H), Vp = h.shape, cols.shape[1]
    bn, bv = bs.block_n, bs.block_v
    kw = dict(inv_temp=inv_temp, with_entropy=with_entropy)
    dh_scratch = jnp.dtype(dh_dtype) != jnp.float32
    dw_scratch = jnp.dtype(dw_dtype) != jnp.float32
    dh = pl.pallas_call(
        functools.partial(_dh_kernel, vocab=V, scratch=dh_scratch, **kw),
        grid=(Np // bn, Vp // bv),
        in_specs=_specs(bn, bv, H, 5, token_major=True),
        out_specs=pl.BlockSpec((bn, H), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((Np, H), dh_dtype),
        scratch_shapes=[pltpu.VMEM((bn, H), jnp.float32)] if dh_scratch else [],
        compiler_params=_PARAMS,
        interpret=interpret,
        name="jaxpt_logprob_bwd_dh",
    )(h, w_VH, cols, *vecs)
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, scratch=dw_scratch, **kw),
        grid=(Vp // bv, Np // bn),
        in_specs=_specs(bn, bv, H, 5, token_major=False),
        out_specs=pl.BlockSpec((bv, H), lambda j, i: (j, 0)),
        out_shape=jax.ShapeDtypeStruct((V, H), dw_dtype),  # the last block's rows past V
        scratch_shapes=[pltpu.VMEM((bv, H), jnp.float32)] if dw_scratch else [],  # not written
        compiler_params=_PARAMS,
        interpret=interpret,
        name="jaxpt_logprob_bwd_dw",
    )(h, w_VH, cols, *vecs)
    return dh[:N], dw
