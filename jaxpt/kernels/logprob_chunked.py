"""Portable token log-prob core in plain JAX: token chunks x vocab tiles, never N x V.

Axis legend: N tokens, H hidden, V vocab; n / v a block of tokens / vocab columns.
The forward maps over token chunks and scans vocab tiles with the online statistics of
`logprob_common`; the backward scans vocab tiles (outer) and token chunks (inner),
recomputing each logits tile, so the largest temporaries are a few block_n x block_v
tiles plus the fp32 gradient accumulators.

With `valid_N`, a token chunk holding no valid token is skipped (`lax.cond`) in both
passes: callers that need log-probs only at some positions (completion tokens, loss
targets) put those first in each row and pay for little more than them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxpt.kernels.logprob_common import (
    BlockSizes,
    dlogits,
    init_stats,
    online_update,
    pad_axis,
    round_up,
)

# 128 tokens x 4096 columns: on a 2-core x86 CPU within 4% of the fastest tile for full
# fwd+bwd (N 1024, H 576, V 49152), and half a 256-token row, so a row whose loss targets
# fit in 128 positions skips half of its LM-head work (fwd+bwd 1.44 s -> 0.79 s there).
DEFAULT_BLOCKS = BlockSizes(block_n=128, block_v=4096)


def _tiles(h_NH, w_VH, cols_1V, vecs_N, bs: BlockSizes):
    """Pad to whole tiles; h (nN, n, H), w (nV, v, H), cols (nV, 1, v), vecs (nN, n, 1)."""
    N, H = h_NH.shape
    V = w_VH.shape[0]
    bn, bv = min(bs.block_n, N), min(bs.block_v, V)
    Np, Vp = round_up(N, bn), round_up(V, bv)
    h = pad_axis(h_NH, 0, Np).reshape(Np // bn, bn, H)
    w = pad_axis(w_VH, 0, Vp).reshape(Vp // bv, bv, H)
    cols = pad_axis(cols_1V, 1, Vp, value=-1).reshape(1, Vp // bv, bv).transpose(1, 0, 2)
    vecs = [pad_axis(x, 0, Np).reshape(Np // bn, bn, 1) for x in vecs_N]
    return h, w, cols, vecs


def _logits(h_nH, w_vH, inv_temp):
    z = lax.dot_general(h_nH, w_vH, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return z * inv_temp


def _live(valid_N, N: int) -> jax.Array:
    """Per-token int32 liveness: the valid mask, or every token when there is none."""
    return jnp.ones((N,), jnp.int32) if valid_N is None else valid_N.astype(jnp.int32)


def _skipped_stats(shape):
    """Stats of a skipped chunk: finite and giving log p = lse = entropy = 0."""
    zero = jnp.zeros(shape, jnp.float32)
    return zero, jnp.ones(shape, jnp.float32), zero, zero


def chunked_stats(h_NH, w_VH, cols_1V, tgt_N, *, inv_temp, with_entropy, block_sizes, valid_N=None):
    """Per-token (m, s, t, zt), each (N,) fp32, over the columns of w_VH."""
    N = h_NH.shape[0]
    h, w, cols, (tgt, live) = _tiles(h_NH, w_VH, cols_1V, [tgt_N, _live(valid_N, N)], block_sizes)

    def one_chunk(args):
        h_nH, tgt_n1, live_n1 = args

        def compute():
            def one_tile(stats, tile):
                w_vH, cols_1v = tile
                z = _logits(h_nH, w_vH, inv_temp)
                return online_update(stats, z, cols_1v, tgt_n1, with_entropy), None

            stats, _ = lax.scan(one_tile, init_stats(tgt_n1.shape), (w, cols))
            return stats

        if valid_N is None:
            return compute()
        return lax.cond(jnp.any(live_n1 > 0), compute, lambda: _skipped_stats(tgt_n1.shape))

    stats = lax.map(one_chunk, (h, tgt, live))
    return tuple(x.reshape(-1)[:N] for x in stats)


def chunked_grads(
    h_NH, w_VH, cols_1V, tgt_N, coeffs_N, *, inv_temp, with_entropy, block_sizes, valid_N=None
):
    """(d hidden (N, H), d lm_head (V, H)), both fp32, for the coefficients ``coeffs_N``
    = (lse, b_lp, b_a, b_ent) (see ``logprob_common.dlogits``)."""
    N, H = h_NH.shape
    V = w_VH.shape[0]
    h, w, cols, vecs = _tiles(
        h_NH,
        w_VH,
        cols_1V,
        [tgt_N, *coeffs_N, _live(valid_N, N)],
        block_sizes,
    )
    bv = w.shape[1]

    def one_tile(dh_nNnH, tile):
        w_vH, cols_1v = tile

        def one_chunk(dw_vH, chunk):
            h_nH, tgt, lse, b_lp, b_a, b_ent, live = chunk

            def compute():
                z = _logits(h_nH, w_vH, inv_temp)
                dz = dlogits(z, cols_1v, tgt, lse, b_lp, b_a, b_ent, with_entropy)
                dw = dw_vH + lax.dot_general(
                    dz.astype(h_nH.dtype),
                    h_nH,
                    (((0,), (0,)), ((), ())),
                    preferred_element_type=jnp.float32,
                )
                dh_nH = jnp.dot(dz.astype(w_vH.dtype), w_vH, preferred_element_type=jnp.float32)
                return dw, dh_nH

            if valid_N is None:
                return compute()
            skip = lambda: (dw_vH, jnp.zeros(h_nH.shape, jnp.float32))  # noqa: E731
            return lax.cond(jnp.any(live > 0), compute, skip)

        dw_vH, dh_parts = lax.scan(one_chunk, jnp.zeros((bv, H), jnp.float32), (h, *vecs))
        return dh_nNnH + dh_parts, dw_vH

    dh, dw = lax.scan(one_tile, jnp.zeros(h.shape, jnp.float32), (w, cols))
    return dh.reshape(-1, H)[:N], dw.reshape(-1, H)[:V]
