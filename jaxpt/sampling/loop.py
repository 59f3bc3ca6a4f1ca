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

The prefill and its packed variant live in `jaxpt.sampling.prefill`, the result and the
loop carry in `jaxpt.sampling.state`.

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

from jaxpt.sampling.prefill import (
    pack_prompts,
    prefill,
    prefill_packed,
)
from jaxpt.sampling.samplers import Sampler
from jaxpt.sampling.state import (
    FINISH_LENGTH,
    FINISH_STOP,
    DecodeState,
    GenerationError,
    GenerationResult,
    _constrain,
    _is_stop,
    bucket_length,
)
from jaxpt.sampling.step import (
    LAYER_LOOPS,
    decode_step,
    layer_weights,
    split_cache,
    stack_cache,
    unstack_layers,
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


def check_sampling_args(sampler, max_new_tokens, num_samples) -> None:
    """The argument checks `generate` and `generate_continuous` share."""
    if not isinstance(sampler, Sampler):
        raise GenerationError(f"sampler: expected a jaxpt Sampler, got {type(sampler).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise GenerationError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise GenerationError(f"num_samples={num_samples!r}: must be an int >= 1")


def check_ids_and_loop(params, eos_ids, pad_id, layer_loop: str) -> tuple[tuple[int, ...], str]:
    """(the stop ids without repeats, the layer loop with "auto" resolved for this backend);
    ids outside the vocab and unknown loops are errors."""
    vocab = params_vocab(params)
    eos = tuple(dict.fromkeys(int(e) for e in eos_ids))
    for e in (*eos, int(pad_id)):
        if vocab is not None and not 0 <= e < vocab:
            raise GenerationError(f"token id {e} (eos_ids / pad_id) is outside vocab [0, {vocab})")
    if layer_loop == "auto":
        layer_loop = {"tpu": "scan", "cpu": "unroll_out_in"}.get(jax.default_backend(), "unroll")
    if layer_loop not in LAYER_LOOPS:
        raise GenerationError(f"layer_loop={layer_loop!r}: use one of {('auto', *LAYER_LOOPS)}")
    return eos, layer_loop


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
    check_sampling_args(sampler, max_new_tokens, num_samples)
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
    eos, layer_loop = check_ids_and_loop(params, eos_ids, pad_id, layer_loop)
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
        state = prefill(params=params, prompt_ids_BP=ids, prompt_mask_BP=mask, rng=key,
                        max_new_tokens=M, num_samples=num_samples, shardings=shardings,
                        **static)
    state = decode(params=params, state=state, max_new_tokens=M, shardings=shardings,
                   layer_loop=layer_loop, **static)
    return result_from_state(state)


def params_vocab(params) -> int | None:
    """The vocab size from the embedding table in `params` (None if not found)."""
    try:
        return int(params["embed_VE"].shape[0])
    except (KeyError, TypeError, AttributeError, IndexError):
        return None
