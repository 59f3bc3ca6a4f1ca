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

Layers are stacked on a leading L axis and run with `lax.scan`, so compile time does not
grow with depth; remat applies per layer.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

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
    ) -> tuple[jax.Array, KVCache | None]:
        """Returns (hidden_BTE after the final norm, updated cache or None).

        With a cache, the T new tokens are written to slots [cache_index, cache_index + T)
        of every row and attend to every filled slot of the same segment.
        `input_embeddings_BTE` replaces the embedding lookup (NEFTune adds noise there).
        `shared_BT` (bool, no cache): keys any non-padding query of the row may attend to
        when not after it, whatever its segment (a shared prompt; module doc).
        """
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids_BT is None:
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

        graphdef, layer_params = nnx.split(self.layers)
        layer_fn = _layer_fn(cfg, graphdef, cos_BTD, sin_BTD, mask_B1TS)
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
    """Masked GQA attention. With remat="attention" the B x N x T x S probabilities are
    recomputed in the backward instead of stored (what flash attention does): that memory
    grows with T^2 while the recompute is a small share of a layer's FLOPs."""

    def attend(q_BTND, k_BTKD, v_BTKD, mask_B1TS):
        return jax.nn.dot_product_attention(
            q_BTND, k_BTKD, v_BTKD, mask=mask_B1TS, scale=cfg.head_dim**-0.5
        )

    return jax.checkpoint(attend) if cfg.remat == "attention" else attend


def _matmul(x_MX: jax.Array, w_XY: jax.Array) -> jax.Array:
    """x (M, X) times a weight whose leading axes multiply to X, as one 2-D matmul.
    Every projection runs on rows flattened to M = B*T: einsums contracting both b and t
    made XLA:CPU emit transposing copies in the backward."""
    return x_MX @ w_XY.reshape(x_MX.shape[-1], -1)


def _layer_fn(cfg: ModelConfig, graphdef, cos_BTD, sin_BTD, mask_B1TS):
    """One layer as a pure function of (x, layer params, cache slice) for lax.scan."""
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

        attn_BTND = _attention(cfg)(q_BTND, k_BTKD, v_BTKD, mask_B1TS)
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
