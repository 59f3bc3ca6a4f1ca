"""One decode step (one new token per row) against a decode-layout KV cache.

Axis legend:
  R rows   S cache slots   L layers   E embed   V vocab   F mlp
  N query heads   K kv heads   G = N // K query heads per kv head   D head_dim
  H = N * D   J = K * D (attention projections as matrices)

The prompt goes through the model's own forward (`Decoder.__call__`, cache layout
[L, B, S, K, D]). Decoding then runs this step, the same math as the decoder's layer
(`jaxpt.models.decoder._layer_fn`: pre-norm attention with optional q/k/v bias and q/k
RMSNorm, RoPE, GQA, SwiGLU MLP) specialized to T = 1, with the cache stored as
[L, R, K, S, D]: the slots of one kv head sit next to each other, so attention reads a
layer's keys and values where they are instead of transposing the cache every step.
Masking is the model's rule: a query sees a slot iff both carry the same segment id and
the slot's position is not after the query's. Parity with the model's forward is tested
for Llama, Qwen2 (bias) and Qwen3 (qk-norm) configs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import KVCache, apply_rope, rms_norm, rope_inv_freq, rope_tables

# "unroll_out_in": "unroll" with the projections stored [out, in] (`_rows_times_out_in`).
LAYER_LOOPS = ("unroll", "unroll_out_in", "scan")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeCache:
    """Decode-layout cache; segment 0 = empty / padding / finished row (never attended
    by a live row)."""

    k_LRKSD: jax.Array
    v_LRKSD: jax.Array
    positions_RS: jax.Array
    segment_ids_RS: jax.Array

    @property
    def max_len(self) -> int:
        return self.positions_RS.shape[1]


def cache_from_prefill(cache: KVCache, num_samples: int, extra_slots: int) -> DecodeCache:
    """Repeat each prompt's rows `num_samples` times (row r = prompt r // num_samples),
    add `extra_slots` empty slots and move to the decode layout: one copy in all."""
    n = num_samples
    rep = lambda x, axis: jnp.repeat(x, n, axis=axis) if n > 1 else x  # noqa: E731

    def kv(x_LBSKD):
        x_LRKSD = jnp.swapaxes(rep(x_LBSKD, 1), 2, 3)
        return jnp.pad(x_LRKSD, ((0, 0), (0, 0), (0, 0), (0, extra_slots), (0, 0)))

    grow = ((0, 0), (0, extra_slots))
    return DecodeCache(
        k_LRKSD=kv(cache.k_LBSKD),
        v_LRKSD=kv(cache.v_LBSKD),
        positions_RS=jnp.pad(rep(cache.positions_BS, 0), grow),
        segment_ids_RS=jnp.pad(rep(cache.segment_ids_BS, 0), grow),
    )


def _qkv(cfg: ModelConfig, w: dict, x_RE, cos_RD, sin_RD):
    """The new token's query, key and value (bias, q/k norm and RoPE applied)."""
    cdt, eps = cfg.dtype, cfg.rms_norm_eps
    R, N, K, D = x_RE.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    c = lambda name: w[name].astype(cdt)  # noqa: E731
    h_RE = rms_norm(x_RE, w["attn_norm_E"], eps)
    q_RND = _project(h_RE, w, "wq_EH", cdt).reshape(R, N, D)
    k_RKD = _project(h_RE, w, "wk_EJ", cdt).reshape(R, K, D)
    v_RKD = _project(h_RE, w, "wv_EJ", cdt).reshape(R, K, D)
    if cfg.attention_bias:
        q_RND, k_RKD, v_RKD = q_RND + c("bq_ND"), k_RKD + c("bk_KD"), v_RKD + c("bv_KD")
    if cfg.qk_norm:
        q_RND = rms_norm(q_RND, w["q_norm_D"], eps)
        k_RKD = rms_norm(k_RKD, w["k_norm_D"], eps)
    q_RND = apply_rope(q_RND[:, None], cos_RD[:, None], sin_RD[:, None])[:, 0]
    k_RKD = apply_rope(k_RKD[:, None], cos_RD[:, None], sin_RD[:, None])[:, 0]
    return q_RND, k_RKD, v_RKD


def _attend_mlp(cfg: ModelConfig, w: dict, x_RE, q_RND, k_RKSD, v_RKSD, mask_R11S):
    """Attention of the new token over one layer's cache, output projection, MLP."""
    cdt, eps = cfg.dtype, cfg.rms_norm_eps
    R, K, D = x_RE.shape[0], cfg.num_kv_heads, cfg.head_dim
    G = cfg.num_heads // K
    q_RKGD = q_RND.reshape(R, K, G, D)  # query head n uses kv head n // G
    scores_RKGS = jnp.einsum(
        "rkgd,rksd->rkgs", q_RKGD, k_RKSD.astype(cdt), preferred_element_type=jnp.float32
    ) * (D**-0.5)
    scores_RKGS = jnp.where(mask_R11S, scores_RKGS, jnp.finfo(jnp.float32).min)
    probs_RKGS = jax.nn.softmax(scores_RKGS, axis=-1).astype(cdt)
    attn_RH = jnp.einsum("rkgs,rksd->rkgd", probs_RKGS, v_RKSD.astype(cdt)).reshape(R, -1)
    x_RE = x_RE + _project(attn_RH, w, "wo_HE", cdt)
    h_RE = rms_norm(x_RE, w["mlp_norm_E"], eps)
    gate_RF = _project(h_RE, w, "w_gate_EF", cdt)
    up_RF = _project(h_RE, w, "w_up_EF", cdt)
    return x_RE + _project(jax.nn.silu(gate_RF) * up_RF, w, "w_down_FE", cdt)


def layer_weights(params, cfg: ModelConfig) -> dict:
    """The stacked layer weights {name: [L, ...]} of a model's param state, with the
    attention projections as matrices (H = N * D, J = K * D; free reshapes)."""
    layers = params["layers"]
    # Params come as an nnx.State (nnx.split) or as a plain dict (the trainers' state).
    w = dict(nnx.to_pure_dict(layers) if isinstance(layers, nnx.State) else layers)
    L, E = cfg.num_layers, cfg.hidden_size
    w["wq_EH"] = w.pop("wq_END").reshape(L, E, -1)
    w["wk_EJ"] = w.pop("wk_EKD").reshape(L, E, -1)
    w["wv_EJ"] = w.pop("wv_EKD").reshape(L, E, -1)
    w["wo_HE"] = w.pop("wo_NDE").reshape(L, -1, E)
    return w


# The projections as `layer_weights` stores them ([in, out]) -> as `unstack_layers`
# stores them ([out, in]).
_OUT_IN = {
    "wq_EH": "wq_HE",
    "wk_EJ": "wk_JE",
    "wv_EJ": "wv_JE",
    "wo_HE": "wo_EH",
    "w_gate_EF": "w_gate_FE",
    "w_up_EF": "w_up_FE",
    "w_down_FE": "w_down_EF",
}


def _rows_times_out_in(x_RI: jax.Array, w_OI: jax.Array, out_dtype=None) -> jax.Array:
    """x_RI @ w_OI.T, computed as (w_OI @ x_RI.T).T. A decode step has few rows, and
    XLA:CPU multiplies a weight matrix by a skinny right-hand side faster than a skinny
    left-hand side by a weight matrix (SmolLM2's MLP over 30 layers at 8 rows: 16.4 vs
    22.3 ms). The barrier keeps XLA from folding the transposes back into that form."""
    y_OR = jnp.matmul(w_OI, x_RI.T, preferred_element_type=out_dtype)
    return jax.lax.optimization_barrier(y_OR).T


def _project(x_RI: jax.Array, w: dict, name: str, cdt) -> jax.Array:
    """x_RI @ w[name] ([in, out]), or through the [out, in] copy `unstack_layers` made."""
    if name in w:
        return x_RI @ w[name].astype(cdt)
    return _rows_times_out_in(x_RI, w[_OUT_IN[name]].astype(cdt))


def unstack_layers(stacked: dict, num_layers: int, *, out_in: bool = False) -> list[dict]:
    """Per-layer weights for the unrolled loop, made once, outside the while loop: sliced
    out of the stack and, with ``out_in``, the projections stored [out, in] for
    `_rows_times_out_in` (slicing copies anyway, so transposing in the same copy costs
    nothing more)."""
    layers = []
    for l in range(num_layers):
        w = {k: v[l] for k, v in stacked.items()}
        if out_in:
            for name, transposed in _OUT_IN.items():
                w[transposed] = w.pop(name).T
        layers.append(w)
    return layers


def split_cache(cache: DecodeCache) -> DecodeCache:
    """The same cache with k/v as tuples of per-layer [R, K, S, D] buffers: the unrolled
    step then updates and reads each layer's buffer in place (no per-step slicing)."""
    L = cache.k_LRKSD.shape[0]
    return dataclasses.replace(
        cache,
        k_LRKSD=tuple(cache.k_LRKSD[l] for l in range(L)),
        v_LRKSD=tuple(cache.v_LRKSD[l] for l in range(L)),
    )


def stack_cache(cache: DecodeCache) -> DecodeCache:
    if not isinstance(cache.k_LRKSD, tuple):
        return cache
    return dataclasses.replace(
        cache, k_LRKSD=jnp.stack(cache.k_LRKSD), v_LRKSD=jnp.stack(cache.v_LRKSD)
    )


def _write_slot(buf, new_R, index, middle: tuple, layer=None):
    """buf[(layer,) r, *middle, index] = new_R[r] for every row r: `index` is one cache
    slot for all rows (a scalar: the static loop) or one per row ([R]: the continuous
    loop, `jaxpt.sampling.continuous`, where each slot's row started at its own step)."""
    lead = () if layer is None else (layer,)
    m = len(middle)
    if jnp.ndim(index) == 0:
        zero = jnp.zeros((), jnp.int32)
        rest = buf.ndim - len(lead) - m - 2
        start = (*lead, zero, *(zero,) * m, index, *(zero,) * rest)
        shape = (*(1,) * len(lead), *new_R.shape[: 1 + m], 1, *new_R.shape[1 + m :])
        return jax.lax.dynamic_update_slice(buf, new_R.reshape(shape), start)
    rows = jnp.arange(new_R.shape[0])
    return buf.at[(*lead, rows, *middle, index)].set(new_R)


def decode_step(
    cfg: ModelConfig,
    params,
    layers,
    tokens_R: jax.Array,
    positions_R: jax.Array,
    segment_ids_R: jax.Array,
    cache: DecodeCache,
    index: jax.Array,
    *,
    layer_loop: str,
) -> tuple[jax.Array, DecodeCache]:
    """Feed one token per row (at `positions_R`, into cache slot `index`); returns fp32
    logits_RV for the next token and the updated cache.

    layers / cache: for layer_loop="unroll" / "unroll_out_in", per-layer weight dicts
    (`unstack_layers`, with ``out_in`` for the second)
    and a `split_cache`; for "scan", the stacked `layer_weights` and a stacked cache.
    """
    embed_VE = params["embed_VE"][...]
    x_RE = jnp.take(embed_VE, tokens_R, axis=0).astype(cfg.dtype)
    cos_R1D, sin_R1D = rope_tables(positions_R[:, None], rope_inv_freq(cfg))
    cos_RD, sin_RD = cos_R1D[:, 0], sin_R1D[:, 0]
    key_pos_RS = _write_slot(cache.positions_RS, positions_R, index, ())
    key_seg_RS = _write_slot(cache.segment_ids_RS, segment_ids_R, index, ())
    mask_RS = (key_seg_RS == segment_ids_R[:, None]) & (key_pos_RS <= positions_R[:, None])
    mask_R11S = mask_RS[:, None, None, :]

    if layer_loop in ("unroll", "unroll_out_in"):
        if not isinstance(cache.k_LRKSD, tuple):
            raise ValueError("layer_loop='unroll' takes a split_cache(...) cache")
        ks, vs = list(cache.k_LRKSD), list(cache.v_LRKSD)
        for l, w in enumerate(layers):
            q_RND, k_RKD, v_RKD = _qkv(cfg, w, x_RE, cos_RD, sin_RD)
            ks[l] = _write_slot(ks[l], k_RKD.astype(ks[l].dtype), index, (slice(None),))
            vs[l] = _write_slot(vs[l], v_RKD.astype(vs[l].dtype), index, (slice(None),))
            x_RE = _attend_mlp(cfg, w, x_RE, q_RND, ks[l], vs[l], mask_R11S)
        k_new, v_new = tuple(ks), tuple(vs)
    elif layer_loop == "scan":

        def body(carry, xs):
            x, k_all, v_all = carry
            w, l = xs
            q_RND, k_RKD, v_RKD = _qkv(cfg, w, x, cos_RD, sin_RD)
            k_all = _write_slot(k_all, k_RKD, index, (slice(None),), layer=l)
            v_all = _write_slot(v_all, v_RKD, index, (slice(None),), layer=l)
            k_RKSD = jax.lax.dynamic_index_in_dim(k_all, l, 0, keepdims=False)
            v_RKSD = jax.lax.dynamic_index_in_dim(v_all, l, 0, keepdims=False)
            x = _attend_mlp(cfg, w, x, q_RND, k_RKSD, v_RKSD, mask_R11S)
            return (x, k_all, v_all), None

        ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        carry = (x_RE, cache.k_LRKSD, cache.v_LRKSD)
        (x_RE, k_new, v_new), _ = jax.lax.scan(body, carry, (layers, ids))
    else:
        raise ValueError(f"layer_loop={layer_loop!r}: use one of {LAYER_LOOPS}")

    h_RE = rms_norm(x_RE, params["final_norm_E"][...], cfg.rms_norm_eps)
    lm_head_VE = params["embed_VE" if cfg.tie_word_embeddings else "lm_head_VE"][...]
    if layer_loop == "unroll_out_in":  # the same skinny-rows form as the layers
        logits_RV = _rows_times_out_in(h_RE, lm_head_VE.astype(h_RE.dtype), jnp.float32)
    else:
        logits_RV = jnp.einsum(
            "re,ve->rv", h_RE, lm_head_VE.astype(h_RE.dtype), preferred_element_type=jnp.float32
        )
    return logits_RV, DecodeCache(k_new, v_new, key_pos_RS, key_seg_RS)
