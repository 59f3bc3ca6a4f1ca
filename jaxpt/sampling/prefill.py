"""Prefill: the prompts through the model once, their keys and values in the KV cache, and
the first token of every row sampled (step 1 of ``jaxpt.sampling.loop``'s module doc).

Axis legend: B prompts, R = B * num_samples decoded rows, P prompt length (bucketed), Q
packed rows of W slots, M max new tokens, V vocab, E embed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.data.packing import best_fit_decreasing
from jaxpt.models.decoder import KVCache
from jaxpt.sampling.samplers import Sampler
from jaxpt.sampling.state import DecodeState, _constrain, _is_stop
from jaxpt.sampling.step import cache_from_prefill


def prompt_forward(model, prompt_ids_BP, prompt_mask_BP, *, shardings=None):
    """The B prompts (padded anywhere) through ``model`` once: (their KV cache [B, P slots],
    the logits at each row's last real token [B, V], the prompt lengths [B]). Padding gets
    segment id 0 (never attended), real tokens segment 1 and positions 0..len-1."""
    B, P = prompt_ids_BP.shape
    mask_BP = prompt_mask_BP.astype(bool)
    segment_ids_BP = mask_BP.astype(jnp.int32)
    positions_BP = jnp.where(mask_BP, jnp.cumsum(segment_ids_BP, axis=1) - 1, 0)
    cache = KVCache.init(model.cfg, B, P)
    if shardings is not None:
        cache = _constrain(cache, shardings.cache(cache))
    hidden_BPE, cache = model(
        prompt_ids_BP.astype(jnp.int32),
        positions_BP,
        segment_ids_BP,
        cache=cache,
        cache_index=jnp.zeros((), jnp.int32),
    )
    # Logits only at each row's last real token (P-1 for left padding).
    last_B = P - 1 - jnp.argmax(mask_BP[:, ::-1], axis=1)
    hidden_B1E = jnp.take_along_axis(hidden_BPE, last_B[:, None, None], axis=1)
    return cache, model.logits(hidden_B1E)[:, 0], segment_ids_BP.sum(axis=1)


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "sampler",
        "max_new_tokens",
        "eos_ids",
        "num_samples",
        "pad_id",
        "shardings",
    ),
)
def prefill(
    graphdef,
    params,
    prompt_ids_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    rng: jax.Array,
    *,
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    num_samples: int,
    pad_id: int,
    shardings=None,
) -> DecodeState:
    """Run the prompts once, expand to num_samples rows each, sample token 0."""
    model = nnx.merge(graphdef, params)
    M, n = max_new_tokens, num_samples

    cache, logits_BV, prompt_len_B = prompt_forward(model, prompt_ids_BP, prompt_mask_BP,
                                                    shardings=shardings)
    return _first_token_state(
        cache,
        logits_BV,
        prompt_len_B,
        rng,
        sampler=sampler,
        max_new_tokens=M,
        eos_ids=eos_ids,
        num_samples=n,
        pad_id=pad_id,
        shardings=shardings,
    )


@dataclasses.dataclass(frozen=True)
class PackedPrompts:
    """B prompts packed into Q < B rows of W slots (host arrays, for `prefill_packed`).

    ids_QW / positions_QW / segment_ids_QW: the packed rows; a row's prompts get segment
        ids 1, 2, ... (0 = padding) and positions from 0 each.
    row_B / start_B / length_B: where prompt b's tokens sit (row, first slot, count).
    """

    ids_QW: np.ndarray
    positions_QW: np.ndarray
    segment_ids_QW: np.ndarray
    row_B: np.ndarray
    start_B: np.ndarray
    length_B: np.ndarray


def pack_prompts(ids_BP, mask_BP, width: int, pad_id: int = 0) -> PackedPrompts | None:
    """Pack the real tokens of B prompts (any padding) into rows of `width` slots, best fit
    longest first; None when that does not take fewer rows than B."""
    ids_BP, mask_BP = np.asarray(ids_BP), np.asarray(mask_BP).astype(bool)
    length_B = mask_BP.sum(axis=1)
    bins = best_fit_decreasing(length_B.tolist(), width)
    if len(bins) >= len(length_B):
        return None
    Q = len(bins)
    ids_QW = np.full((Q, width), pad_id, np.int32)
    positions_QW = np.zeros((Q, width), np.int32)
    segment_ids_QW = np.zeros((Q, width), np.int32)
    row_B = np.zeros(len(length_B), np.int32)
    start_B = np.zeros(len(length_B), np.int32)
    for q, members in enumerate(bins):
        at = 0
        for seg, b in enumerate(sorted(members), start=1):
            n = int(length_B[b])
            ids_QW[q, at : at + n] = ids_BP[b][mask_BP[b]]
            positions_QW[q, at : at + n] = np.arange(n)
            segment_ids_QW[q, at : at + n] = seg
            row_B[b], start_B[b] = q, at
            at += n
    return PackedPrompts(
        ids_QW, positions_QW, segment_ids_QW, row_B, start_B, length_B.astype(np.int32)
    )


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "sampler", "max_new_tokens", "eos_ids", "num_samples", "pad_id"),
)
def prefill_packed(
    graphdef,
    params,
    ids_QW: jax.Array,
    positions_QW: jax.Array,
    segment_ids_QW: jax.Array,
    row_B: jax.Array,
    start_B: jax.Array,
    length_B: jax.Array,
    rng: jax.Array,
    *,
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    num_samples: int,
    pad_id: int,
) -> DecodeState:
    """`prefill` over packed prompts (`PackedPrompts`): the Q packed rows run through the
    model once, then prompt b's keys and values are gathered to slots [0, len_b) of its
    own row of W slots (the rest: segment 0, never attended), and decoding goes on as
    after `prefill`."""
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    Q, W = ids_QW.shape
    cache = KVCache.init(cfg, Q, W)
    hidden_QWE, cache = model(
        ids_QW, positions_QW, segment_ids_QW, cache=cache, cache_index=jnp.zeros((), jnp.int32)
    )
    hidden_B1E = hidden_QWE[row_B, start_B + length_B - 1][:, None]
    logits_BV = model.logits(hidden_B1E)[:, 0]

    slot_W = jnp.arange(W, dtype=jnp.int32)
    real_BW = slot_W[None, :] < length_B[:, None]
    col_BW = start_B[:, None] + jnp.minimum(slot_W[None, :], length_B[:, None] - 1)
    row_BW = jnp.broadcast_to(row_B[:, None], col_BW.shape)
    cache = KVCache(
        k_LBSKD=cache.k_LBSKD[:, row_BW, col_BW],
        v_LBSKD=cache.v_LBSKD[:, row_BW, col_BW],
        positions_BS=jnp.where(real_BW, slot_W[None, :], 0),
        segment_ids_BS=real_BW.astype(jnp.int32),
    )
    return _first_token_state(
        cache,
        logits_BV,
        length_B,
        rng,
        sampler=sampler,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        num_samples=num_samples,
        pad_id=pad_id,
    )


def _first_token_state(
    cache: KVCache,
    logits_BV: jax.Array,
    prompt_len_B: jax.Array,
    rng: jax.Array,
    *,
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    num_samples: int,
    pad_id: int,
    shardings=None,
) -> DecodeState:
    """The decode state after a prefill: each prompt's cache and last-token logits
    repeated for its `num_samples` rows, and token 0 of every row sampled."""
    n, M = num_samples, max_new_tokens
    # n samples per prompt share one prefill: repeat rows, grow to S slots, and move to
    # the decode layout, in one copy.
    rep = lambda x: jnp.repeat(x, n, axis=0) if n > 1 else x  # noqa: E731
    cache = cache_from_prefill(cache, n, M - 1)
    if shardings is not None:
        cache = _constrain(cache, shardings.cache(cache))
    logits_RV = rep(logits_BV)
    prompt_len_R = rep(prompt_len_B)
    R = logits_RV.shape[0]

    token_R, logprob_R = sampler.sample(jax.random.fold_in(rng, 0), logits_RV)
    tokens_RM = jnp.full((R, M), pad_id, jnp.int32).at[:, 0].set(token_R)
    logprobs_RM = jnp.zeros((R, M), jnp.float32).at[:, 0].set(logprob_R)
    return DecodeState(
        step=jnp.ones((), jnp.int32),
        tokens_RM=tokens_RM,
        logprobs_RM=logprobs_RM,
        last_token_R=token_R,
        positions_R=prompt_len_R.astype(jnp.int32),
        lengths_R=jnp.ones((R,), jnp.int32),
        done_R=_is_stop(token_R, eos_ids),
        cache=cache,
        rng=rng,
    )


