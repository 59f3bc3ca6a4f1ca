"""One decoder for Llama, SmolLM2, Qwen2 and Qwen3, in flax.nnx.

Axis legend (used in every name below):
  B batch   T query length   S key length (cache slots)   L layers
  E embed (hidden_size)      V vocab   F mlp (intermediate)
  N query heads   K kv heads   G = N // K query heads per kv head   D head_dim

Attention is masked by segment ids and explicit positions: a query attends to a key iff
both carry the same segment id and the key's position is not after the query's. That one
rule covers causal training, packed rows (segments never see each other, RoPE restarts
at 0), left-padded prompts (padding is segment 0) and a KV cache (empty slots are
segment 0), so there is no special case for any of them. One extension: keys flagged in
`shared_BT` are seen by every non-padding query of their row (position rule still
applies), which lets G completions packed after one copy of their prompt share it.
With `prefix_blocks=(P, C)` such a row (a prefix of P tokens, then blocks of C tokens that
each see only the prefix and themselves) computes attention over those key ranges only.

That mask is written out here in XLA (B x N x T x S scores per layer): the CPU path and the
oracle. `cfg.attention` may instead pick jax's splash (TPU) or cuDNN (GPU) kernel for the
forward without a KV cache, which apply the same mask without the T x S scores
(jaxpt/kernels/attention.py says what each covers).

Layers are stacked on a leading L axis and run with `lax.scan`, so compile time does not
grow with depth; remat applies per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpt.kernels.attention import choose_attention, cudnn_attention, splash_attention
from jaxpt.models.config import ModelConfig

_INIT = nnx.initializers.normal(0.02)


# -- RoPE ----------------------------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies (D/2,), with Hugging Face's llama3 / linear scaling rules."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    scaling = cfg.rope_scaling_dict
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions_BT: jax.Array, inv_freq: jax.Array):
    angles_BTd = positions_BT[..., None].astype(jnp.float32) * inv_freq
    angles_BTD = jnp.concatenate([angles_BTd, angles_BTd], axis=-1)
    return jnp.cos(angles_BTD), jnp.sin(angles_BTD)


def apply_rope(x_BTnD: jax.Array, cos_BTD: jax.Array, sin_BTD: jax.Array) -> jax.Array:
    """Hugging Face's rotate-half convention (GGUF's interleaved q/k are un-permuted on load)."""
    half = x_BTnD.shape[-1] // 2
    x1, x2 = x_BTnD[..., :half], x_BTnD[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BTD[:, :, None, :], sin_BTD[:, :, None, :]
    out = x_BTnD.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x_BTnD.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


# -- KV cache ------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Static-shape cache. Slot s of row b holds the key/value of one token, with that
    token's position and segment id (segment 0 = empty or padding, never attended)."""

    k_LBSKD: jax.Array
    v_LBSKD: jax.Array
    positions_BS: jax.Array
    segment_ids_BS: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        dtype = dtype or cfg.dtype
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k_LBSKD=jnp.zeros(shape, dtype),
            v_LBSKD=jnp.zeros(shape, dtype),
            positions_BS=jnp.zeros((batch, max_len), jnp.int32),
            segment_ids_BS=jnp.zeros((batch, max_len), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.positions_BS.shape[1]


# -- Modules -------------------------------------------------------------------------------


class DecoderLayer(nnx.Module):
    """Pre-norm attention + SwiGLU MLP. Weights are stored in param_dtype and cast to
    compute_dtype on use (fp32 master weights with bf16 compute)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        E, F, N, K, D = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        pd = cfg.weight_dtype
        self.attn_norm_E = nnx.Param(jnp.ones((E,), pd))
        self.wq_END = nnx.Param(_INIT(rngs.params(), (E, N, D), pd))
        self.wk_EKD = nnx.Param(_INIT(rngs.params(), (E, K, D), pd))
        self.wv_EKD = nnx.Param(_INIT(rngs.params(), (E, K, D), pd))
        self.wo_NDE = nnx.Param(_INIT(rngs.params(), (N, D, E), pd))
        if cfg.attention_bias:
            self.bq_ND = nnx.Param(jnp.zeros((N, D), pd))
            self.bk_KD = nnx.Param(jnp.zeros((K, D), pd))
            self.bv_KD = nnx.Param(jnp.zeros((K, D), pd))
        if cfg.qk_norm:
            self.q_norm_D = nnx.Param(jnp.ones((D,), pd))
            self.k_norm_D = nnx.Param(jnp.ones((D,), pd))
        self.mlp_norm_E = nnx.Param(jnp.ones((E,), pd))
        self.w_gate_EF = nnx.Param(_INIT(rngs.params(), (E, F), pd))
        self.w_up_EF = nnx.Param(_INIT(rngs.params(), (E, F), pd))
        self.w_down_FE = nnx.Param(_INIT(rngs.params(), (F, E), pd))


class Decoder(nnx.Module):
    """Token ids -> final hidden states. `logits` and `lm_head_VE` give the LM head; the
    training losses take hidden states and the LM head to the fused log-prob kernel so the
    B x T x V logits are never materialized."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = cfg.weight_dtype
        self.embed_VE = nnx.Param(_INIT(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pd))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return DecoderLayer(cfg, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm_E = nnx.Param(jnp.ones((cfg.hidden_size,), pd))
        if not cfg.tie_word_embeddings:
            self.lm_head_VE = nnx.Param(_INIT(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pd))

    @property
    def lm_head(self) -> jax.Array:
        """LM-head weight (V, E), Hugging Face layout; the embedding table when tied."""
        return (self.embed_VE if self.cfg.tie_word_embeddings else self.lm_head_VE)[...]

    def embed(self, tokens_BT: jax.Array, *, input_embeddings_BTE: jax.Array | None = None):
        if input_embeddings_BTE is not None:
            return input_embeddings_BTE.astype(self.cfg.dtype)
        return jnp.take(self.embed_VE[...], tokens_BT, axis=0).astype(self.cfg.dtype)

    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
        cache_index: jax.Array | int | None = None,
        input_embeddings_BTE: jax.Array | None = None,
        shared_BT: jax.Array | None = None,
        prefix_blocks: tuple[int, int] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Returns (hidden_BTE after the final norm, updated cache or None).

        With a cache, the T new tokens are written to slots [cache_index, cache_index + T)
        of every row and attend to every filled slot of the same segment.
        `input_embeddings_BTE` replaces the embedding lookup (NEFTune adds noise there).
        `shared_BT` (bool, no cache): keys any non-padding query of the row may attend to
        when not after it, whatever its segment (a shared prompt; module doc).
        `prefix_blocks=(P, C)` (static, no cache): the row is a prefix of P tokens then
        blocks of C tokens, and the mask lets a block's queries see only prefix keys and
        keys of their own block (the shared-prompt layout); attention then runs over those
        key ranges only (`prefix_block_attention`), not over the whole row.
        `cfg.attention` picks the kernel that applies the mask (module doc).
        """
        cfg = self.cfg
        B, T = tokens_BT.shape
        segmented = segment_ids_BT is not None
        impl = choose_attention(
            cfg.attention,
            cfg.mesh,
            dtype=cfg.dtype,
            cache=cache is not None,
            segmented=segmented,
            shared=shared_BT is not None,
            prefix_blocks=prefix_blocks,
            interpret=cfg.attention_interpret,
        )
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if not segmented:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        x_BTE = self.embed(tokens_BT, input_embeddings_BTE=input_embeddings_BTE)
        cos_BTD, sin_BTD = rope_tables(positions_BT, rope_inv_freq(cfg))

        if cache is None:
            key_pos_BS, key_seg_BS = positions_BT, segment_ids_BT
        else:
            cache_index = jnp.asarray(cache_index, jnp.int32)
            key_pos_BS = jax.lax.dynamic_update_slice(
                cache.positions_BS, positions_BT.astype(jnp.int32), (0, cache_index)
            )
            key_seg_BS = jax.lax.dynamic_update_slice(
                cache.segment_ids_BS, segment_ids_BT.astype(jnp.int32), (0, cache_index)
            )
        same_BTS = segment_ids_BT[:, :, None] == key_seg_BS[:, None, :]
        if shared_BT is not None:
            if cache is not None:
                raise ValueError("Decoder: shared_BT is for training rows, not the KV cache")
            same_BTS = same_BTS | (shared_BT[:, None, :] & (segment_ids_BT[:, :, None] > 0))
        mask_B1TS = (same_BTS & (key_pos_BS[:, None, :] <= positions_BT[:, :, None]))[:, None]

        if prefix_blocks is not None:
            if cache is not None:
                raise ValueError("Decoder: prefix_blocks is for training rows, not the KV cache")
            P, C = prefix_blocks
            if P < 1 or C < 1 or (T - P) % C:
                raise ValueError(
                    f"Decoder: prefix_blocks=(P={P}, C={C}) does not split a row of {T} "
                    "tokens into a prefix and whole blocks"
                )
        scale = cfg.head_dim**-0.5
        if impl == "splash":
            attend = functools.partial(
                splash_attention,
                segment_ids_BT=segment_ids_BT if segmented or shared_BT is not None else None,
                scale=scale,
                prefix_blocks=prefix_blocks,
                shared_prefix=shared_BT is not None,
                mesh=cfg.mesh,
                interpret=cfg.attention_interpret,
            )
        elif impl == "cudnn":
            attend = functools.partial(cudnn_attention, scale=scale)
        elif prefix_blocks is not None:
            attend = prefix_block_attention(_attention(cfg), mask_B1TS, *prefix_blocks)
        else:
            attend = functools.partial(_with_mask, _attention(cfg), mask_B1TS)
        graphdef, layer_params = nnx.split(self.layers)
        layer_fn = _layer_fn(cfg, graphdef, cos_BTD, sin_BTD, attend)
        if cfg.remat not in ("none", "attention"):
            policy = {
                "full": jax.checkpoint_policies.nothing_saveable,
                "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            }[cfg.remat]
            layer_fn = jax.checkpoint(layer_fn, policy=policy, prevent_cse=False)

        if cache is None:

            def body(x, params_l):
                x, _ = layer_fn(x, params_l, None)
                return x, None

            x_BTE, _ = jax.lax.scan(body, x_BTE, layer_params)
            new_cache = None
        else:
            # The whole cache rides in the carry and is updated in place one layer slice at
            # a time, so a decode step never copies the cache.
            def body(carry, xs):
                x, k_all, v_all = carry
                params_l, l = xs
                x, (k_all, v_all) = layer_fn(x, params_l, (k_all, v_all, l, cache_index))
                return (x, k_all, v_all), None

            layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            (x_BTE, k_all, v_all), _ = jax.lax.scan(
                body, (x_BTE, cache.k_LBSKD, cache.v_LBSKD), (layer_params, layer_ids)
            )
            new_cache = KVCache(k_all, v_all, key_pos_BS, key_seg_BS)

        hidden_BTE = rms_norm(x_BTE, self.final_norm_E[...], cfg.rms_norm_eps)
        return hidden_BTE, new_cache

    def logits(self, hidden_BTE: jax.Array) -> jax.Array:
        """Full fp32 logits: for sampling and tests; training goes through the kernel."""
        return jnp.einsum(
            "bte,ve->btv",
            hidden_BTE,
            self.lm_head.astype(hidden_BTE.dtype),
            preferred_element_type=jnp.float32,
        )


def _attention(cfg: ModelConfig):
    """Masked GQA attention. With remat="none" it is left to autodiff, which stores the
    B x N x T x S probabilities for the backward. Every other policy uses
    `recomputing_attention`: it keeps only the output and the log-sum-exp and recomputes
    the probabilities in its own backward (what a flash-attention kernel does), so that
    memory no longer grows with T^2, and on XLA:CPU the written-out backward is also ~1.7x
    faster per layer than autodiff's."""
    scale = cfg.head_dim**-0.5
    if cfg.remat == "none":
        return lambda q, k, v, mask: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    return lambda q, k, v, mask: recomputing_attention(q, k, v, mask, scale)


def _with_mask(attend, mask_B1TS, q_BTND, k_BSKD, v_BSKD):
    return attend(q_BTND, k_BSKD, v_BSKD, mask_B1TS)


def prefix_block_attention(attend, mask_B1TS, P: int, C: int):
    """``attend(q, k, v, mask)`` over rows of a P-token prefix and G blocks of C tokens,
    as (q, k, v) -> out, computing only the scores the layout can use.

    In the shared-prompt layout block i's queries see the prefix and block i, never
    another block, so the dense T x T scores are mostly masked (2 prompts of 96 and 4
    completions of 64: 40% used; G=16, C=256: 9%). Here the prefix attends to itself
    ([P, P]) and each block to prefix ++ itself ([C, P + C], the prefix keys broadcast
    to every block; autodiff sums their gradients back). Masked entries come from
    ``mask_B1TS`` itself, so the result equals ``attend`` on the whole row whenever the
    mask has nothing outside those ranges, which the layout guarantees."""
    B, _, T, _ = mask_B1TS.shape
    G = (T - P) // C
    m_BGCT = mask_B1TS[:, 0, P:].reshape(B, G, C, T)
    own_BGCC = jnp.moveaxis(  # block g's queries against block g's keys: the diagonal
        jnp.diagonal(m_BGCT[..., P:].reshape(B, G, C, G, C), axis1=1, axis2=3), -1, 1
    )
    mask_prefix = mask_B1TS[:, :, :P, :P]
    mask_blocks = jnp.concatenate([m_BGCT[..., :P], own_BGCC], axis=-1).reshape(
        B * G, 1, C, P + C
    )

    def blocks(x_BTX):  # [B, P + G*C, ...] -> [B*G, C, ...]
        return x_BTX[:, P:].reshape(B * G, C, *x_BTX.shape[2:])

    def prefix_and_block(x_BSKD):  # keys / values -> [B*G, P + C, K, D]
        rest = x_BSKD.shape[2:]
        prefix = jnp.broadcast_to(x_BSKD[:, None, :P], (B, G, P, *rest))
        own = x_BSKD[:, P:].reshape(B, G, C, *rest)
        return jnp.concatenate([prefix, own], axis=2).reshape(B * G, P + C, *rest)

    def fn(q_BTND, k_BSKD, v_BSKD):
        out_prefix = attend(q_BTND[:, :P], k_BSKD[:, :P], v_BSKD[:, :P], mask_prefix)
        out_blocks = attend(
            blocks(q_BTND), prefix_and_block(k_BSKD), prefix_and_block(v_BSKD), mask_blocks
        )
        return jnp.concatenate([out_prefix, out_blocks.reshape(B, G * C, *out_blocks.shape[2:])], 1)

    return fn


_MASKED = -1e30  # score of a masked key: exp() underflows to 0, no inf - inf NaN


def _grouped_heads(x_BTND: jax.Array, K: int) -> jax.Array:
    """[B, T, N, D] -> [B, K, G*T, D]: the G query heads sharing kv head k, stacked along
    the row axis so each (b, k) is one plain matmul against that kv head."""
    B, T, N, D = x_BTND.shape
    G = N // K
    return x_BTND.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, D)


def _ungrouped_heads(x_BKMD: jax.Array, T: int) -> jax.Array:
    B, K, M, D = x_BKMD.shape
    G = M // T
    return x_BKMD.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, D)


def _masked_scores(q_BKMD, k_BKSD, mask_B1TS, scale):
    """fp32 scores [B, K, G*T, S] with masked keys at _MASKED."""
    B, K, M, _ = q_BKMD.shape
    T, S = mask_B1TS.shape[-2:]
    s_BKMS = jnp.einsum("bkmd,bksd->bkms", q_BKMD, k_BKSD, preferred_element_type=jnp.float32)
    mask_B1MS = jnp.broadcast_to(mask_B1TS[:, :, None], (B, 1, M // T, T, S)).reshape(B, 1, M, S)
    return jnp.where(mask_B1MS, s_BKMS * scale, _MASKED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def recomputing_attention(q_BTND, k_BSKD, v_BSKD, mask_B1TS, scale: float):
    """softmax(q k^T * scale, masked) v for GQA (N query heads over K kv heads), saving
    only the output and the per-row log-sum-exp for the backward."""
    return _attention_fwd(q_BTND, k_BSKD, v_BSKD, mask_B1TS, scale)[0]


def _attention_fwd(q_BTND, k_BSKD, v_BSKD, mask_B1TS, scale):
    T, K = q_BTND.shape[1], k_BSKD.shape[2]
    q, k, v = _grouped_heads(q_BTND, K), k_BSKD.transpose(0, 2, 1, 3), v_BSKD.transpose(0, 2, 1, 3)
    s_BKMS = _masked_scores(q, k, mask_B1TS, scale)
    max_BKM1 = jnp.max(s_BKMS, axis=-1, keepdims=True)
    p_BKMS = jnp.exp(s_BKMS - max_BKM1)
    sum_BKM1 = jnp.sum(p_BKMS, axis=-1, keepdims=True)
    o_BKMD = (
        jnp.einsum("bkms,bksd->bkmd", p_BKMS.astype(v.dtype), v, preferred_element_type=jnp.float32)
        / sum_BKM1
    )
    lse_BKM1 = max_BKM1 + jnp.log(sum_BKM1)
    # The output is saved in the layout the output projection saves it in: one copy.
    o_BTND = _ungrouped_heads(o_BKMD.astype(q_BTND.dtype), T)
    return o_BTND, (q_BTND, k_BSKD, v_BSKD, mask_B1TS, o_BTND, lse_BKM1)


def _attention_bwd(scale, res, do_BTND):
    q_BTND, k_BSKD, v_BSKD, mask_B1TS, o_BTND, lse_BKM1 = res
    T, K = q_BTND.shape[1], k_BSKD.shape[2]
    q, k, v = _grouped_heads(q_BTND, K), k_BSKD.transpose(0, 2, 1, 3), v_BSKD.transpose(0, 2, 1, 3)
    do_BKMD = _grouped_heads(do_BTND, K)
    p_BKMS = jnp.exp(_masked_scores(q, k, mask_B1TS, scale) - lse_BKM1)
    f32 = jnp.float32
    dv_BKSD = jnp.einsum(
        "bkms,bkmd->bksd", p_BKMS.astype(do_BKMD.dtype), do_BKMD, preferred_element_type=f32
    )
    dp_BKMS = jnp.einsum("bkmd,bksd->bkms", do_BKMD, v, preferred_element_type=f32)
    # d softmax: p * (dp - sum_s p dp), and sum_s p dp = sum_d do * o.
    delta_BTN1 = jnp.sum(do_BTND.astype(f32) * o_BTND.astype(f32), axis=-1, keepdims=True)
    delta_BKM1 = _grouped_heads(delta_BTN1, K)
    ds_BKMS = (p_BKMS * (dp_BKMS - delta_BKM1) * scale).astype(q.dtype)
    dq_BKMD = jnp.einsum("bkms,bksd->bkmd", ds_BKMS, k, preferred_element_type=f32)
    dk_BKSD = jnp.einsum("bkms,bkmd->bksd", ds_BKMS, q, preferred_element_type=f32)
    return (
        _ungrouped_heads(dq_BKMD, T).astype(q_BTND.dtype),
        dk_BKSD.transpose(0, 2, 1, 3).astype(k_BSKD.dtype),
        dv_BKSD.transpose(0, 2, 1, 3).astype(v_BSKD.dtype),
        None,
    )


recomputing_attention.defvjp(_attention_fwd, _attention_bwd)


def _matmul(x_MX: jax.Array, w_XY: jax.Array) -> jax.Array:
    """x (M, X) times a weight whose leading axes multiply to X, as one 2-D matmul.
    Every projection runs on rows flattened to M = B*T: einsums contracting both b and t
    made XLA:CPU emit transposing copies in the backward."""
    return x_MX @ w_XY.reshape(x_MX.shape[-1], -1)


def _layer_fn(cfg: ModelConfig, graphdef, cos_BTD, sin_BTD, attend):
    """One layer as a pure function of (x, layer params, cache slice) for lax.scan;
    ``attend(q, k, v)`` is the masked attention."""
    cdt = cfg.dtype
    eps = cfg.rms_norm_eps

    def fn(x_BTE, params_l, kv):
        layer = nnx.merge(graphdef, params_l)
        w = lambda p: p[...].astype(cdt)  # noqa: E731

        B, T, E = x_BTE.shape
        N, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h_ME = rms_norm(x_BTE, layer.attn_norm_E[...], eps).reshape(B * T, E)
        q_BTND = _matmul(h_ME, w(layer.wq_END)).reshape(B, T, N, D)
        k_BTKD = _matmul(h_ME, w(layer.wk_EKD)).reshape(B, T, K, D)
        v_BTKD = _matmul(h_ME, w(layer.wv_EKD)).reshape(B, T, K, D)
        if cfg.attention_bias:
            q_BTND = q_BTND + w(layer.bq_ND)
            k_BTKD = k_BTKD + w(layer.bk_KD)
            v_BTKD = v_BTKD + w(layer.bv_KD)
        if cfg.qk_norm:
            q_BTND = rms_norm(q_BTND, layer.q_norm_D[...], eps)
            k_BTKD = rms_norm(k_BTKD, layer.k_norm_D[...], eps)
        q_BTND = apply_rope(q_BTND, cos_BTD, sin_BTD)
        k_BTKD = apply_rope(k_BTKD, cos_BTD, sin_BTD)

        new_kv = None
        if kv is not None:
            k_all, v_all, l, index = kv
            zero = jnp.zeros((), jnp.int32)
            start = (l, zero, index, zero, zero)
            k_all = jax.lax.dynamic_update_slice(k_all, k_BTKD[None].astype(k_all.dtype), start)
            v_all = jax.lax.dynamic_update_slice(v_all, v_BTKD[None].astype(v_all.dtype), start)
            k_BTKD = jax.lax.dynamic_index_in_dim(k_all, l, 0, keepdims=False).astype(cdt)
            v_BTKD = jax.lax.dynamic_index_in_dim(v_all, l, 0, keepdims=False).astype(cdt)
            new_kv = (k_all, v_all)

        attn_BTND = attend(q_BTND, k_BTKD, v_BTKD)
        x_ME = x_BTE.reshape(B * T, E) + _matmul(attn_BTND.reshape(B * T, N * D), w(layer.wo_NDE))

        h_ME = rms_norm(x_ME, layer.mlp_norm_E[...], eps)
        gate_MF = _matmul(h_ME, w(layer.w_gate_EF))
        up_MF = _matmul(h_ME, w(layer.w_up_EF))
        x_ME = x_ME + _matmul(jax.nn.silu(gate_MF) * up_MF, w(layer.w_down_FE))
        x_BTE = x_ME.reshape(B, T, E)
        return x_BTE, new_kv

    return fn


def init_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """A randomly initialized model (for tests and from-scratch configs)."""
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> Decoder:
    """The model's structure with ShapeDtypeStruct leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
