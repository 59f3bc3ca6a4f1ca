"""Decoder attention by name: jax's splash attention (TPU), cuDNN (NVIDIA GPU), or the
decoder's written-out XLA attention (CPU, and the oracle every kernel is tested against).

Axis legend: B batch, T query length, S key length (= T here), N query heads, K kv heads,
D head_dim.

  xla     ``models.decoder``: masked scores written out in XLA (B x N x T x S per layer)
  splash  ``jax.experimental.pallas.ops.tpu.splash_attention``: block-sparse flash
          attention on TPU (Mosaic), causal + segment ids + a static mask, GQA, its own
          backward; in Pallas interpret mode anywhere (tests)
  cudnn   ``jax.nn.dot_product_attention(implementation="cudnn")``: causal only (below)
  auto    splash when the mesh's devices are TPUs, cudnn when they are NVIDIA GPUs and it
          covers the call, else xla. Chosen from the mesh the program is compiled for
          (``ModelConfig.mesh``; abstract TPU devices included), never from the host.

We write no attention kernel: both are jax's own (DESIGN principle 16); this module maps
the decoder's masks onto theirs and runs splash inside ``shard_map`` over the batch (and
heads over ``tensor``), since GSPMD cannot partition a custom call.

The decoder's rule is by position (a query sees a key of its segment whose position is
not after its own); the kernels mask by index (causal). They agree wherever, among the keys
a query may see, positions grow with the index, which every layout jaxpt builds has:
packing restarts positions at 0 per segment, left / right padding is segment 0, and a
completion block continues its prompt's positions. Padding queries (segment 0) may see
other padding keys than in the XLA path; their outputs are never read (losses mask them,
and only padding queries see padding keys), so real outputs and all gradients agree.

What each kernel covers (an explicit choice that does not cover a call raises; ``auto``
then takes xla):

* splash: causal rows with or without segment ids (packing, left padding); the
  shared-prompt layout (``prefix_blocks=(P, C)`` with the prompt's real tokens as the
  shared keys, as ``rl.rollout.group_rollout_rows`` builds it) as one static mask, a
  ``PrefixBlockMask``, whose empty blocks the kernel skips. Not covered: ``shared_BT``
  without ``prefix_blocks`` (DPO's shared prefix: a rejected token sees the prompt but not
  the chosen side before it, which neither a static mask nor segment-id equality says).
  Rows are padded to a multiple of 128 (the kernel's lane width) with a segment of their
  own and sliced back.
* cudnn: jax 0.10's ``jax.nn.dot_product_attention`` masks only by ``is_causal``, right
  padding lengths and a local window; any other mask is turned into a dense [B, 1, T, S]
  additive bias (T x S again), and segment ids (packed rows) exist only in jax's private
  cuDNN API. So it covers causal rows without segment ids, shared keys or prefix blocks,
  in bf16 / fp16. It is partitioned by jax itself (``custom_partitioning``), so it runs
  without ``shard_map``.
* The KV-cache forward (prefill, decode) always uses xla: its masks come from the cache's
  slots, and decode's T = 1 scores are small.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxpt.sharding import TRAIN_RULES, axis_size, spec_for

IMPLS = ("auto", "xla", "splash", "cudnn")
LANES = 128  # splash's kv blocks are multiples of the TPU's 128 lanes
_PAD_SEGMENT = -1  # the padded tail: attends only to itself


def mesh_platform(mesh: Mesh | None) -> str | None:
    """'tpu', 'cuda', 'rocm', 'cpu', ... for the mesh's devices (None: no mesh)."""
    if mesh is None:
        return None
    device = mesh.devices.flat[0]
    if device.platform in ("gpu", "cuda", "rocm"):
        version = str(getattr(getattr(device, "client", None), "platform_version", ""))
        rocm = device.platform == "rocm" or "rocm" in version.lower()
        return "rocm" if rocm else "cuda"
    return device.platform


def _splash_gap(*, shared: bool, prefix_blocks) -> str | None:
    if shared and prefix_blocks is None:
        return (
            "shared_BT without prefix_blocks (a shared prefix before sides that must not "
            "see each other) is not a splash mask"
        )
    return None


def _cudnn_gap(*, dtype, segmented: bool, shared: bool, prefix_blocks) -> str | None:
    if segmented or shared or prefix_blocks is not None:
        return (
            "jax.nn.dot_product_attention(implementation='cudnn') masks by is_causal and "
            "right-padding lengths only; segment ids, shared keys and prefix blocks would "
            "need a dense T x S mask"
        )
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN attention needs bf16 / fp16 inputs, not {jnp.dtype(dtype).name}"
    return None


def choose_attention(
    impl: str,
    mesh: Mesh | None,
    *,
    dtype,
    cache: bool = False,
    segmented: bool = False,
    shared: bool = False,
    prefix_blocks: tuple[int, int] | None = None,
    interpret: bool = False,
) -> str:
    """'xla' | 'splash' | 'cudnn' for one decoder call (module doc). Raises ValueError for
    an unknown name, or an explicit kernel that does not cover the call or the devices."""
    if impl not in IMPLS:
        raise ValueError(f"model.attention={impl!r} is not one of {IMPLS}")
    platform = mesh_platform(mesh)
    if impl == "xla" or cache:
        return "xla"
    splash_gap = _splash_gap(shared=shared, prefix_blocks=prefix_blocks)
    cudnn_gap = _cudnn_gap(
        dtype=dtype, segmented=segmented, shared=shared, prefix_blocks=prefix_blocks
    )
    if impl == "auto":
        if platform == "tpu" and splash_gap is None:
            return "splash"
        if platform == "cuda" and cudnn_gap is None:
            return "cudnn"
        return "xla"
    gap, wants = (splash_gap, "tpu") if impl == "splash" else (cudnn_gap, "cuda")
    if gap is not None:
        raise ValueError(f"model.attention={impl!r}: {gap}; use 'auto' or 'xla'")
    if platform not in (None, wants) and not (impl == "splash" and interpret):
        raise ValueError(
            f"model.attention={impl!r} is a {wants} kernel but the mesh's devices are "
            f"{platform}; use 'auto' or 'xla'"
            + (" (or attention_interpret for CPU tests)" if impl == "splash" else "")
        )
    return impl


# -- splash --------------------------------------------------------------------------------


class PrefixBlockMask(masks._ComputableMask):
    """The shared-prompt layout as a splash mask over a (padded) row: P prefix tokens then
    blocks of C tokens; query i sees key j <= i when j is in the prefix or in i's block.
    Indices at or past the row's end form further blocks (the padded tail). Computed in
    the kernel from indices (no T x S array; the base class of splash's own CausalMask and
    ChunkedCausalMask), and blocks no query uses are skipped."""

    def __init__(self, length: int, prefix: int, block: int):
        self.prefix, self.block = prefix, block
        shift = -prefix % block  # (i + shift) // C is i's block for i >= P, never negative

        def fn(q_ids, kv_ids):
            same = (q_ids + shift) // block == (kv_ids + shift) // block
            return (q_ids >= kv_ids) & ((kv_ids < prefix) | same)

        super().__init__(shape=(length, length), mask_function=fn)

    def __eq__(self, other: object):
        if not isinstance(other, type(self)):
            return NotImplemented
        return (self.shape, self.prefix, self.block) == (other.shape, other.prefix, other.block)

    def __hash__(self):
        return hash((type(self), self.shape, self.prefix, self.block))


def block_sizes(length: int) -> splash.BlockSizes:
    """One block size for every pass: the largest of 512 / 256 / 128 dividing ``length``
    (a multiple of 128)."""
    if length % LANES:
        raise ValueError(f"splash: row length {length} is not a multiple of {LANES}")
    b = next(b for b in (512, 256, LANES) if length % b == 0)
    return splash.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b,
        block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip


def _splash_rows(q_BTND, k_BSKD, v_BSKD, seg_BT, *, scale, prefix_blocks, interpret) -> jax.Array:
    """Splash over rows on one device (or one shard): pad to a multiple of 128, heads
    first, vmap the kernel over rows, back to [B, T, N, D]."""
    B, T, N, D = q_BTND.shape
    Tp = -(-T // LANES) * LANES
    pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
    heads_first = lambda x: jnp.pad(x, pad).transpose(0, 2, 1, 3)  # noqa: E731
    q = heads_first((q_BTND * scale).astype(q_BTND.dtype))
    k, v = heads_first(k_BSKD), heads_first(v_BSKD)
    if prefix_blocks is None:
        mask = masks.CausalMask((Tp, Tp))
    else:
        mask = PrefixBlockMask(Tp, *prefix_blocks)
    kernel = splash.make_splash_mha(
        masks.MultiHeadMask([mask] * N),
        block_sizes=block_sizes(Tp),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    if seg_BT is None:  # causal alone: the padded tail comes after every real query
        out = jax.vmap(kernel)(q, k, v)
    else:
        seg = jnp.pad(seg_BT.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=_PAD_SEGMENT)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(s, s)))(q, k, v, seg)
    return out.transpose(0, 2, 1, 3)[:, :T]


def splash_attention(
    q_BTND: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    segment_ids_BT: jax.Array | None = None,
    *,
    scale: float,
    prefix_blocks: tuple[int, int] | None = None,
    shared_prefix: bool = False,
    mesh: Mesh | None = None,
    interpret: Any = False,
) -> jax.Array:
    """softmax(q k^T * scale, masked) v with jax's splash kernel, GQA (N over K heads).

    Mask: causal by index, and same segment id when ``segment_ids_BT`` is given.
    ``prefix_blocks=(P, C)``: the shared-prompt layout (``PrefixBlockMask``); with
    ``shared_prefix`` the prompt's real tokens are the shared keys, so segment ids only
    separate real tokens (id > 0) from padding. With ``mesh`` the kernel runs in
    ``shard_map``: rows over the batch axes that divide B, heads over ``tensor`` when N
    and K divide it, everything else replicated."""
    seg = segment_ids_BT
    if shared_prefix:
        if prefix_blocks is None:
            raise ValueError(f"splash_attention: {_splash_gap(shared=True, prefix_blocks=None)}")
        seg = (seg > 0).astype(jnp.int32)
    fn = functools.partial(
        _splash_rows, scale=scale, prefix_blocks=prefix_blocks, interpret=interpret
    )
    if mesh is None:
        return fn(q_BTND, k_BSKD, v_BSKD, seg)
    B, _, N, _ = q_BTND.shape
    K = k_BSKD.shape[2]
    rows = spec_for((B,), ("batch",), mesh, TRAIN_RULES, replicate_indivisible=True)[0]
    t = axis_size(mesh, "tensor")
    heads = "tensor" if t > 1 and N % t == 0 and K % t == 0 else None
    x_spec = P(rows, None, heads, None)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(x_spec,) * 3 + (P(rows, None),), out_specs=x_spec,
        check_vma=False,
    )(q_BTND, k_BSKD, v_BSKD, seg)  # fmt: skip


# -- cuDNN ---------------------------------------------------------------------------------


def cudnn_attention(q_BTND, k_BSKD, v_BSKD, *, scale: float) -> jax.Array:
    """Causal GQA attention with cuDNN's fused kernel (bf16 / fp16; jax partitions it)."""
    return jax.nn.dot_product_attention(
        q_BTND, k_BSKD, v_BSKD, scale=scale, is_causal=True, implementation="cudnn"
    )
