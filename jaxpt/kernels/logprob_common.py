"""Shared pieces of the token log-prob core: result type, block sizes, tile math.

Axis legend (used in every logprob_* file):
  N  tokens (flattened batch x sequence)      n  a block of tokens   (block_n)
  H  hidden size                              h  a block of hidden   (block_h)
  V  vocabulary                               v  a block of vocab    (block_v)

Every implementation reduces the vocabulary with the same four running statistics per
token, written for logits z = (hidden @ lm_head.T) / temperature:

  m   running max of z over the valid vocab columns seen so far
  s   sum_j exp(z_j - m)
  t   sum_j exp(z_j - m) * (z_j - m)        (only when the entropy is asked for)
  zt  z[target]  (0 until the tile that holds the target is seen)

so that lse = m + log s, log p(target) = zt - lse and entropy = log s - t / s.
Vocabulary columns are identified by a `cols_1V` int32 row holding each column's global
token id, -1 for padding; a column is valid iff its id >= 0. This one array handles
block padding and vocab sharding alike (a shard holds its slice of the global ids).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Finite stand-in for -inf: exp(NEG - NEG) = 1 instead of NaN when a token has seen no
# valid column yet (an all-padding tile), and exp(NEG - real) underflows to exactly 0.
NEG = -1e30


class TokenLogProbs(NamedTuple):
    """Per-token results of `token_logprobs`, all float32 with shape (N,)."""

    logprobs_N: jax.Array  # log softmax(logits / temperature)[target]
    lse_N: jax.Array  # logsumexp(logits / temperature)
    entropy_N: jax.Array | None  # entropy of softmax(logits / temperature), or None


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes for the `chunked` and `pallas` implementations.

    block_n: tokens per tile. block_v: vocab columns per tile. block_h: hidden columns per
    matmul step (Pallas GPU only; the TPU kernel and `chunked` contract the full H).
    Construction checks that the values are positive ints; `check(layout)` adds what a
    backend requires (powers of two >= 16 on GPU/Triton, multiples of 8 / 128 on TPU).
    """

    block_n: int
    block_v: int
    block_h: int | None = None

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_h"):
            value = getattr(self, name)
            if value is None and name == "block_h":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"jaxpt/kernels/logprob: BlockSizes.{name} must be a positive int, "
                    f"got {value!r}"
                )

    def check(self, layout: str) -> BlockSizes:
        """Raise ValueError if these sizes cannot run on `layout`; returns self."""
        where = "jaxpt/kernels/logprob: BlockSizes"
        if layout == "gpu":
            for name in ("block_n", "block_v", "block_h"):
                value = getattr(self, name)
                if value is None:
                    raise ValueError(f"{where}.{name} is required for the Pallas GPU kernel")
                if not _is_pow2(value) or value < 16:
                    raise ValueError(
                        f"{where}.{name}={value}: the Pallas GPU (Triton) kernel needs a "
                        "power of two >= 16"
                    )
        elif layout == "tpu":
            if self.block_n % 8:
                raise ValueError(f"{where}.block_n={self.block_n}: TPU needs a multiple of 8")
            if self.block_v % 128:
                raise ValueError(f"{where}.block_v={self.block_v}: TPU needs a multiple of 128")
            if self.block_h is not None:
                raise ValueError(
                    f"{where}.block_h={self.block_h}: the TPU kernel contracts the full "
                    "hidden size; leave block_h=None"
                )
        elif layout != "chunked":
            raise ValueError(f"{where}: unknown layout {layout!r}")
        return self


def chunk_skipping_is_safe() -> bool:
    """Whether token chunks may be skipped with a per-chunk `lax.cond`: only on a single
    device. Under SPMD partitioning over several devices the branches may hold collectives
    that devices with different predicates would not all join (a hang)."""
    return jax.device_count() == 1


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pad `x` along `axis` up to `size` with `value` (no copy when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def pad_operands(h_NH, w_VH, cols_1V, vecs_N, *, block_n: int, block_v: int, block_h: int):
    """Pad hidden, LM head, vocab column ids and per-token vectors to whole blocks for the
    Pallas kernels: h (Np, Hp), w (Vp, Hp), cols (1, Vp) padded with -1 (no column), and
    each vector as (Np, 1)."""
    N, H = h_NH.shape
    V = w_VH.shape[0]
    Np, Vp, Hp = round_up(N, block_n), round_up(V, block_v), round_up(H, block_h)
    h = pad_axis(pad_axis(h_NH, 0, Np), 1, Hp)
    w = pad_axis(pad_axis(w_VH, 0, Vp), 1, Hp)
    cols = pad_axis(cols_1V, 1, Vp, value=-1)
    vecs = [pad_axis(x, 0, Np)[:, None] for x in vecs_N]
    return h, w, cols, vecs


# --------------------------------------------------------------------------- tile math
# These act on values (not refs), so the Pallas kernels and `chunked` share them.


def init_stats(shape) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(m, s, t, zt) before any vocab column is seen."""
    m = jnp.full(shape, NEG, jnp.float32)
    zero = jnp.zeros(shape, jnp.float32)
    return m, zero, zero, zero


def online_update(stats, z_nv, cols_1v, tgt_n1, with_entropy: bool):
    """Fold one logits tile z_nv (fp32, already divided by temperature) into the stats."""
    m, s, t, zt = stats
    valid = cols_1v >= 0
    zm = jnp.where(valid, z_nv, NEG)
    m_new = jnp.maximum(m, jnp.max(zm, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    e = jnp.where(valid, jnp.exp(zm - m_new), 0.0)
    s_new = s * alpha + jnp.sum(e, axis=1, keepdims=True)
    if with_entropy:
        # t is kept relative to the running max: re-base the old part, then add the tile.
        t = alpha * (t + s * (m - m_new)) + jnp.sum(e * (zm - m_new), axis=1, keepdims=True)
    zt = zt + jnp.sum(jnp.where(cols_1v == tgt_n1, z_nv, 0.0), axis=1, keepdims=True)
    return m_new, s_new, t, zt


def dlogits(z_nv, cols_1v, tgt_n1, lse_n1, b_lp_n1, b_a_n1, b_ent_n1, with_entropy: bool):
    """d(loss)/d(raw logits) for one tile, given the per-token backward coefficients.

    With p = softmax(z) and the cotangents g_lp, g_lse, g_ent of logprob, lse, entropy:
      dz_j = g_lp * (onehot_j - p_j) + g_lse * p_j - g_ent * p_j * (log p_j + entropy)
           = g_lp * onehot_j + p_j * (a - g_ent * z_j),  a = g_lse - g_lp + g_ent*(lse - entropy)
    and d/d(raw logits) = dz / temperature; the b_* inputs already carry that factor
    (b_lp = g_lp / T, b_a = a / T, b_ent = g_ent / T).
    """
    valid = cols_1v >= 0
    p = jnp.where(valid, jnp.exp(jnp.where(valid, z_nv, NEG) - lse_n1), 0.0)
    coef = b_a_n1 - b_ent_n1 * z_nv if with_entropy else b_a_n1
    return jnp.where(cols_1v == tgt_n1, b_lp_n1, 0.0) + p * coef


def finalize(m, s, t, zt, with_entropy: bool, axis_name=None):
    """Per-token stats (possibly one vocab shard's) -> (logprobs, lse, entropy or None)."""
    if axis_name is not None:
        m_all = jax.lax.pmax(m, axis_name)
        scale = jnp.exp(m - m_all)
        if with_entropy:
            t = jax.lax.psum(scale * (t + s * (m - m_all)), axis_name)
        s = jax.lax.psum(s * scale, axis_name)
        zt = jax.lax.psum(zt, axis_name)
        m = m_all
    log_s = jnp.log(s)
    lse = m + log_s
    entropy = log_s - t / s if with_entropy else None
    return zt - lse, lse, entropy
