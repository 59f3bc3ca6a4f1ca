"""KV-cache prefill and a jitted `lax.while_loop` decode loop.

Axis legend:
  B prompts   R = B * num_samples decoded rows   P prompt length (bucketed)
  M max new tokens   S cache slots = P + M - 1   V vocab   E embed   L layers

How a batch is decoded:
  1. `prefill` (one jit): the B prompts run through the model once, writing their keys
     and values into cache slots [0, P). A prompt row may be padded anywhere (left
     padding is what `generate` adds): padding gets segment id 0 and is never attended;
     real tokens get segment 1 and positions 0..len-1. The cache is then repeated
     `num_samples` times on the batch axis (row r of the result belongs to prompt
     r // num_samples), padded to S slots, and the first token of each row is sampled.
     The cache moves to the decode layout (`jaxpt.sampling.step.DecodeCache`) on the way.
     `prefill_packed` is the same with the prompts packed several to a row of P slots
     (`pack_prompts`: fewer rows when lengths differ, so padding costs no compute); each
     prompt's keys and values are then gathered to slots [0, len) of its own row.
  2. `decode` (one jit, state donated): `lax.while_loop` runs `step.decode_step`: it
     feeds token t-1 of every row at slot P + t - 1 with position len_row + t - 1 and
     samples token t, until
     max_new_tokens or until every row has emitted a stop id. A finished row keeps
     stepping (static shapes) with segment id 0 and writes `pad_id` / log-prob 0, so it
     counts nowhere. The cache is updated in place in the loop carry.

The step RNG is `fold_in(rng, t)` for token t, so a run is a pure function of `rng`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.data.packing import best_fit_decreasing
from jaxpt.data.packing import bucket_length as _packing_bucket_length
from jaxpt.models.decoder import KVCache
from jaxpt.sampling.samplers import Sampler
from jaxpt.sampling.step import (
    LAYER_LOOPS,
    DecodeCache,
    cache_from_prefill,
    decode_step,
    layer_weights,
    split_cache,
    stack_cache,
    unstack_layers,
)

FINISH_REASONS = ("length", "stop")  # index = code in GenerationResult.finish_reason
FINISH_LENGTH = 0
FINISH_STOP = 1


class GenerationError(ValueError):
    """Bad inputs to `generate`; the message names the argument and dimension."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GenerationResult:
    """Completions of B prompts x num_samples, row r = prompt r // num_samples.

    tokens: [R, max_new_tokens] int32; after a row's stop token (and for unused steps)
        every entry is `pad_id`.
    logprobs: [R, max_new_tokens] fp32, log_softmax(logits / temperature) of each sampled
        token before top-k/top-p/min-p truncation (temperature 1 when greedy); 0 where
        `tokens` is padding.
    lengths: [R] int32, number of new tokens including the stop token.
    finish_reason: [R] int32, FINISH_STOP (1) if the row emitted a stop id, else
        FINISH_LENGTH (0); `finish_reason_names` maps them to "stop" / "length".
    """

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    finish_reason: jax.Array

    def mask(self) -> jax.Array:
        """[R, max_new_tokens] bool: True on real (non-padding) completion tokens."""
        steps = jnp.arange(self.tokens.shape[1], dtype=jnp.int32)
        return steps[None, :] < self.lengths[:, None]


def finish_reason_names(codes) -> list[str]:
    return [FINISH_REASONS[int(c)] for c in np.asarray(codes).reshape(-1)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The while_loop carry. `step` = number of tokens sampled so far (>= 1 after
    prefill); `positions_R` = position of the last sampled token (the next one fed)."""

    step: jax.Array
    tokens_RM: jax.Array
    logprobs_RM: jax.Array
    last_token_R: jax.Array
    positions_R: jax.Array
    lengths_R: jax.Array
    done_R: jax.Array
    cache: DecodeCache
    rng: jax.Array


def bucket_length(n: int, *, minimum: int = 16) -> int:
    """Prompt-length bucket (`jaxpt.data.packing.bucket_length`'s "eighths" rule): at most
    4 buckets per doubling of the length, so new prompt lengths reuse a few programs."""
    return _packing_bucket_length(n, bucket="eighths", min_length=minimum)


def _is_stop(tokens_R: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens_R.shape, bool)
    return jnp.isin(tokens_R, jnp.asarray(eos_ids, jnp.int32))


def _constrain(tree, shardings):
    if shardings is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, shardings)


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
    cfg = model.cfg
    B, P = prompt_ids_BP.shape
    M, n = max_new_tokens, num_samples

    mask_BP = prompt_mask_BP.astype(bool)
    segment_ids_BP = mask_BP.astype(jnp.int32)
    positions_BP = jnp.where(mask_BP, jnp.cumsum(segment_ids_BP, axis=1) - 1, 0)
    prompt_len_B = segment_ids_BP.sum(axis=1)
    cache = KVCache.init(cfg, B, P)
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
    logits_BV = model.logits(hidden_B1E)[:, 0]
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


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "sampler",
        "max_new_tokens",
        "eos_ids",
        "pad_id",
        "shardings",
        "layer_loop",
    ),
    donate_argnames=("state",),
)
def decode(
    graphdef,
    params,
    state: DecodeState,
    *,
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    pad_id: int,
    shardings=None,
    layer_loop: str = "unroll",
) -> DecodeState:
    """The decode loop. `state` (from `prefill`) is donated: the final state aliases its
    buffers, so the cache is updated in place and never copied; read the completions with
    `result_from_state`.

    layer_loop: "scan" runs `lax.scan` over the stacked layers each step, and XLA (on
    CPU and GPU) then slices, i.e. copies, every layer's weights out of the stack on
    every step. "unroll" slices the weights once, before the loop, and runs the layers as
    straight-line code on separate per-layer weight and cache buffers, so a step copies
    nothing (faster on CPU), at the cost of one transient copy of the layer weights
    while decoding and a compile time that grows with depth. "unroll_out_in" also
    stores that copy's projections [out, in], the layout XLA:CPU multiplies by a few
    rows fastest (`step._rows_times_out_in`).
    """
    if layer_loop not in LAYER_LOOPS:
        raise GenerationError(f"layer_loop={layer_loop!r}: use one of {LAYER_LOOPS}")
    cfg = nnx.merge(graphdef, params).cfg
    stacked = layer_weights(params, cfg)
    if layer_loop in ("unroll", "unroll_out_in"):
        # Slice every layer's weights and cache out of their stacks once, here, outside
        # the loop; the loop then works on separate per-layer buffers in place.
        layers = unstack_layers(stacked, cfg.num_layers, out_in=layer_loop == "unroll_out_in")
        state = dataclasses.replace(state, cache=split_cache(state.cache))
    else:
        layers = stacked
    M = max_new_tokens
    S = state.cache.max_len
    P = S - M + 1
    pad = jnp.int32(pad_id)
    cache_shardings = None if shardings is None else shardings.cache(state.cache)

    def cond(s: DecodeState):
        return (s.step < M) & ~jnp.all(s.done_R)

    def body(s: DecodeState) -> DecodeState:
        t = s.step
        live_R = ~s.done_R
        logits_RV, cache = decode_step(
            cfg,
            params,
            layers,
            s.last_token_R,
            s.positions_R,
            live_R.astype(jnp.int32),
            s.cache,
            P + t - 1,
            layer_loop=layer_loop,
        )
        cache = _constrain(cache, cache_shardings)
        token_R, logprob_R = sampler.sample(jax.random.fold_in(s.rng, t), logits_RV)
        token_R = jnp.where(live_R, token_R, pad)
        logprob_R = jnp.where(live_R, logprob_R, 0.0)
        zero = jnp.zeros((), jnp.int32)
        return DecodeState(
            step=t + 1,
            tokens_RM=jax.lax.dynamic_update_slice(s.tokens_RM, token_R[:, None], (zero, t)),
            logprobs_RM=jax.lax.dynamic_update_slice(s.logprobs_RM, logprob_R[:, None], (zero, t)),
            last_token_R=token_R,
            positions_R=s.positions_R + 1,
            lengths_R=s.lengths_R + live_R.astype(jnp.int32),
            done_R=s.done_R | (live_R & _is_stop(token_R, eos_ids)),
            cache=cache,
            rng=s.rng,
        )

    final = jax.lax.while_loop(cond, body, state)
    return dataclasses.replace(final, cache=stack_cache(final.cache))


def result_from_state(state: DecodeState) -> GenerationResult:
    """The completions in a finished `DecodeState` (the cache is dropped with it)."""
    return GenerationResult(
        tokens=state.tokens_RM,
        logprobs=state.logprobs_RM,
        lengths=state.lengths_R,
        finish_reason=jnp.where(state.done_R, FINISH_STOP, FINISH_LENGTH).astype(jnp.int32),
    )


def _as_key(rng) -> jax.Array:
    if isinstance(rng, int | np.integer):
        return jax.random.key(int(rng))
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    if rng.dtype == jnp.uint32 and rng.shape == (2,):
        return jax.random.wrap_key_data(rng)
    raise GenerationError(
        f"rng: expected an int seed or a jax.random.key, got dtype {rng.dtype} shape {rng.shape}"
    )


def generate(
    graphdef,
    params,
    prompt_ids_BP,
    prompt_mask_BP,
    *,
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    rng,
    num_samples: int = 1,
    pad_id: int = 0,
    bucket: bool = True,
    shardings=None,
    layer_loop: str = "auto",
    pack: bool = True,
) -> GenerationResult:
    """Sample `num_samples` completions for each of B prompts.

    prompt_ids_BP / prompt_mask_BP: int token ids and a 0/1 mask of real tokens (left
    padding is usual, any padding works). With `bucket`, P is left-padded up to
    `bucket_length(P)` so new prompt lengths reuse a few compiled programs.
    sampler: a `Sampler` (static: each distinct sampler compiles once).
    eos_ids: stop token ids; a row finishes after emitting one (it is included in the
        row's length); empty = always generate max_new_tokens.
    rng: an int seed or a `jax.random.key`.
    shardings: an optional `jaxpt.sharding.DecodeSharding` (the decode preset of the
        sharding table); params and prompts should already be placed with it
        (`place_params`, `place_rows`). B * num_samples must divide its batch axes.
    layer_loop: "unroll" | "unroll_out_in" | "scan" | "auto" (scan on TPU: no transient
        copy of the weights, compile time independent of depth; unroll_out_in on CPU;
        unroll on GPU, where the [out, in] layout is not measured and its transposes
        would be extra small kernels per step); see `decode`.
    pack: prefill prompts of different lengths packed several to a row
        (`pack_prompts`, `prefill_packed`) when that takes fewer rows: the padding then
        costs no compute (8 GSM8K chat prompts: 5 rows instead of 8). Needs concrete
        (host) prompts and no `shardings`; otherwise the padded prefill runs.
    Returns a `GenerationResult` with R = B * num_samples rows, row r = prompt
    r // num_samples.
    """
    if not isinstance(sampler, Sampler):
        raise GenerationError(f"sampler: expected a jaxpt Sampler, got {type(sampler).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise GenerationError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise GenerationError(f"num_samples={num_samples!r}: must be an int >= 1")
    ids = prompt_ids_BP if isinstance(prompt_ids_BP, jax.Array) else jnp.asarray(prompt_ids_BP)
    mask = prompt_mask_BP if isinstance(prompt_mask_BP, jax.Array) else jnp.asarray(prompt_mask_BP)
    if ids.ndim != 2:
        raise GenerationError(f"prompt_ids_BP: expected 2 dims [batch, length], got {ids.shape}")
    if mask.shape != ids.shape:
        raise GenerationError(
            f"prompt_mask_BP shape {mask.shape} != prompt_ids_BP shape {ids.shape}"
        )
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise GenerationError(f"prompt_ids_BP: expected integer token ids, got {ids.dtype}")
    B, P = ids.shape
    if B == 0 or P == 0:
        raise GenerationError(f"prompt_ids_BP: empty batch or length (shape {ids.shape})")
    lens = None  # prompt lengths, when the mask is on the host (not traced)
    if not isinstance(mask, jax.core.Tracer):
        lens = np.asarray(mask).astype(bool).sum(axis=1)
        empty = np.flatnonzero(lens == 0)
        if empty.size:
            raise GenerationError(
                f"prompt_mask_BP: row {int(empty[0])} has no real tokens (every prompt needs >= 1)"
            )
    vocab = params_vocab(params)
    eos = tuple(dict.fromkeys(int(e) for e in eos_ids))
    for e in (*eos, int(pad_id)):
        if vocab is not None and not 0 <= e < vocab:
            raise GenerationError(f"token id {e} (eos_ids / pad_id) is outside vocab [0, {vocab})")
    if layer_loop == "auto":
        layer_loop = {"tpu": "scan", "cpu": "unroll_out_in"}.get(jax.default_backend(), "unroll")
    if layer_loop not in LAYER_LOOPS:
        raise GenerationError(f"layer_loop={layer_loop!r}: use one of {('auto', *LAYER_LOOPS)}")
    if shardings is not None:
        shardings.check_batch(B, num_samples)
    static = dict(graphdef=graphdef, sampler=sampler, eos_ids=eos, pad_id=int(pad_id))
    M, key = int(max_new_tokens), _as_key(rng)
    packed = None
    if pack and shardings is None and lens is not None and not isinstance(ids, jax.core.Tracer):
        # The packed rows and each prompt's cache row get W slots: a bucket, or the width
        # the caller padded to (its own bucketing), so new lengths do not compile a new
        # decode loop.
        width = bucket_length(int(lens.max())) if bucket else P
        packed = pack_prompts(ids, mask, width, int(pad_id))
    if packed is not None:
        state = prefill_packed(
            params=params,
            **{f.name: getattr(packed, f.name) for f in dataclasses.fields(packed)},
            rng=key,
            max_new_tokens=M,
            num_samples=num_samples,
            **static,
        )
    else:
        if bucket:
            target = bucket_length(P)
            if target > P:
                ids = jnp.pad(ids, ((0, 0), (target - P, 0)), constant_values=int(pad_id))
                mask = jnp.pad(mask, ((0, 0), (target - P, 0)))
                if shardings is not None:
                    ids, mask = shardings.place_rows(ids), shardings.place_rows(mask)
        state = prefill(
            params=params,
            prompt_ids_BP=ids,
            prompt_mask_BP=mask,
            rng=key,
            max_new_tokens=M,
            num_samples=num_samples,
            shardings=shardings,
            **static,
        )
    state = decode(
        params=params,
        state=state,
        max_new_tokens=M,
        shardings=shardings,
        layer_loop=layer_loop,
        **static,
    )
    return result_from_state(state)


def params_vocab(params) -> int | None:
    """The vocab size from the embedding table in `params` (None if not found)."""
    try:
        return int(params["embed_VE"].shape[0])
    except (KeyError, TypeError, AttributeError, IndexError):
        return None
