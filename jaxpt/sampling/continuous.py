"""Continuous batching: a decode loop with a fixed number of slots that refills a slot
with the next pending (prompt, sample) row as soon as its row finishes.

Axis legend:
  B prompts   R = B * num_samples rows (row r = prompt r // num_samples)
  N slots (decoded together)   P prompt length (bucketed)   M max new tokens
  S cache slots per decode slot = P + M - 1   V vocab   L layers   K kv heads   D head dim

The static loop (`jaxpt.sampling.loop.decode`) decodes all R rows together until the
longest one is done, so a rollout costs R x max(length) row-steps. Here N cache rows
are decoded together; when a row emits a stop id or reaches its budget, its slot is
given the next pending row, so the rollout costs about sum(lengths) row-steps (plus
< N x max(length) for the tail). With N < R the cache holds N rows instead of R.

How it runs:
  1. `prefill_prompts` (one jit): the B prompts run through the model once (left padded
     to P); their keys / values (decode layout, P slots) and last-token logits stay on
     the device as the refill source, so a refill copies a prompt's cache instead of
     running the model again (its num_samples rows share one prefill, as in the static
     loop). That source costs B x P cache entries besides the N x S of the slots.
  2. `run_slots` (one jit, state donated): `lax.while_loop` whose body first refills
     every free slot from the queue (an inner while_loop, one row at a time: copy the
     prompt's cache into slots [0, P) of the slot's cache row, reset its positions and
     segment ids after P to empty, sample token 0 from the prompt's logits), then runs
     one `step.decode_step` for all N slots, each writing its key / value at its own
     cache slot P + t - 1 (t = tokens its row has sampled). A free slot feeds segment
     id 0 and its writes are dropped. `max_steps` bounds the decode steps of one call
     (`chunk_steps`: host-driven chunks; None: the whole rollout in one call).

RNG contract: token t of row r is drawn with `fold_in(fold_in(rng, r), t)`, so a row's
tokens depend on the seed and its (prompt, sample) index only, not on the slot or the
step at which it ran: any number of slots gives the same samples. This differs from the
static loop (one `fold_in(rng, t)` key for the whole [R, V] draw), so sampled tokens
differ between the engines; greedy tokens are the same (tested), and log-probs agree to
rounding (the cache rows hold the same values; only the summation order of attention
over a different number of slots may differ).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.sampling.loop import _as_key, check_ids_and_loop, check_sampling_args
from jaxpt.sampling.prefill import prompt_forward
from jaxpt.sampling.samplers import Sampler
from jaxpt.sampling.state import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationError,
    GenerationResult,
    _is_stop,
    bucket_length,
)
from jaxpt.sampling.step import (
    DecodeCache,
    cache_from_prefill,
    decode_step,
    layer_weights,
    split_cache,
    stack_cache,
    unstack_layers,
)

ENGINES = ("static", "continuous")  # `rollout_engine`, `sample_completions(engine=)`


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PromptSource:
    """The prefilled prompts a slot is refilled from (device arrays)."""

    k_LBKPD: jax.Array
    v_LBKPD: jax.Array
    positions_BP: jax.Array
    segment_ids_BP: jax.Array
    length_B: jax.Array
    logits_BV: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """The while_loop carry. Per slot: the row it decodes (`row_N`, R = free), the
    number of tokens that row has sampled (`sampled_N`), the token to feed next and its
    position. Per row: the outputs. `next_row`: the first row not yet given a slot.
    `steps`: decode steps run; `live_steps`: slot-steps that decoded a live row."""

    row_N: jax.Array
    sampled_N: jax.Array
    last_token_N: jax.Array
    positions_N: jax.Array
    cache: DecodeCache
    tokens_RM: jax.Array
    logprobs_RM: jax.Array
    lengths_R: jax.Array
    stopped_R: jax.Array
    next_row: jax.Array
    steps: jax.Array
    live_steps: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef",))
def prefill_prompts(graphdef, params, prompt_ids_BP, prompt_mask_BP) -> PromptSource:
    """Run the B prompts (any padding) once; keep their cache and last-token logits."""
    model = nnx.merge(graphdef, params)
    cache, logits_BV, prompt_len_B = prompt_forward(model, prompt_ids_BP, prompt_mask_BP)
    dc = cache_from_prefill(cache, 1, 0)  # decode layout [L, B, K, P, D]
    return PromptSource(
        dc.k_LRKSD, dc.v_LRKSD, dc.positions_RS, dc.segment_ids_RS,
        prompt_len_B, logits_BV.astype(jnp.float32),
    )


def _row_keys(rng, num_rows: int) -> jax.Array:
    return jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(num_rows))


def _sample_rows(sampler: Sampler, keys_N, logits_NV):
    """One token per row, each with its own key (so a row's draw ignores the others)."""
    tok, lp = jax.vmap(lambda k, x: sampler.sample(k, x[None]))(keys_N, logits_NV)
    return tok[:, 0], lp[:, 0]


def init_slots(source: PromptSource, *, num_slots: int, num_rows: int,
               max_new_tokens: int, pad_id: int, cache_dtype) -> SlotState:
    """Empty slots (segment 0 everywhere) and empty outputs."""
    L, _, K, P, D = source.k_LBKPD.shape
    N, R, M = num_slots, num_rows, max_new_tokens
    S = P + M - 1
    # Separate buffers for every field: the state is donated to `run_slots`.
    kv = lambda: jnp.zeros((L, N, K, S, D), cache_dtype)  # noqa: E731
    zeros = lambda *shape: jnp.zeros(shape, jnp.int32)  # noqa: E731
    return SlotState(
        row_N=jnp.full((N,), R, jnp.int32),
        sampled_N=zeros(N),
        last_token_N=zeros(N),
        positions_N=zeros(N),
        cache=DecodeCache(kv(), kv(), zeros(N, S), zeros(N, S)),
        tokens_RM=jnp.full((R, M), pad_id, jnp.int32),
        logprobs_RM=jnp.zeros((R, M), jnp.float32),
        lengths_R=jnp.zeros((R,), jnp.int32),
        stopped_R=jnp.zeros((R,), bool),
        next_row=zeros(),
        steps=zeros(),
        live_steps=zeros(),
    )


def _refill(s: SlotState, source: PromptSource, row_keys_R, budget_R, *, sampler, eos_ids,
            num_samples: int) -> SlotState:
    """Give free slots the pending rows, in row order, until no slot or row is left."""
    R = s.tokens_RM.shape[0]
    N, S = s.cache.positions_RS.shape
    P = source.positions_BP.shape[1]
    zero = jnp.zeros((), jnp.int32)

    def cond(s):
        return jnp.any(s.row_N == R) & (s.next_row < R)

    def body(s):
        slot, r = jnp.argmax(s.row_N == R).astype(jnp.int32), s.next_row
        b = r // num_samples
        token, logprob = sampler.sample(
            jax.random.fold_in(row_keys_R[r], 0), source.logits_BV[b][None]
        )
        token, logprob = token[0], logprob[0]
        stop = _is_stop(token, eos_ids)
        done = stop | (budget_R[r] <= 1)

        c = s.cache
        if isinstance(c.k_LRKSD, tuple):  # per-layer buffers (`split_cache`)
            def copy(buf_RKSD, src_LBKPD, l):
                src = jax.lax.dynamic_slice_in_dim(src_LBKPD[l], b, 1, axis=0)
                return jax.lax.dynamic_update_slice(
                    buf_RKSD, src.astype(buf_RKSD.dtype), (slot, zero, zero, zero))

            k = tuple(copy(x, source.k_LBKPD, l) for l, x in enumerate(c.k_LRKSD))
            v = tuple(copy(x, source.v_LBKPD, l) for l, x in enumerate(c.v_LRKSD))
        else:
            def copy(buf_LRKSD, src_LBKPD):
                src = jax.lax.dynamic_slice_in_dim(src_LBKPD, b, 1, axis=1)
                return jax.lax.dynamic_update_slice(
                    buf_LRKSD, src.astype(buf_LRKSD.dtype), (zero, slot, zero, zero, zero))

            k, v = copy(c.k_LRKSD, source.k_LBKPD), copy(c.v_LRKSD, source.v_LBKPD)
        tail = jnp.zeros((S - P,), jnp.int32)  # generated slots start empty (segment 0)
        pos_S = jnp.concatenate([source.positions_BP[b], tail])
        seg_S = jnp.concatenate([source.segment_ids_BP[b], tail])
        cache = DecodeCache(
            k, v,
            jax.lax.dynamic_update_slice(c.positions_RS, pos_S[None], (slot, zero)),
            jax.lax.dynamic_update_slice(c.segment_ids_RS, seg_S[None], (slot, zero)),
        )
        return dataclasses.replace(
            s,
            row_N=s.row_N.at[slot].set(jnp.where(done, R, r)),
            sampled_N=s.sampled_N.at[slot].set(1),
            last_token_N=s.last_token_N.at[slot].set(token),
            positions_N=s.positions_N.at[slot].set(source.length_B[b]),
            cache=cache,
            tokens_RM=s.tokens_RM.at[r, 0].set(token),
            logprobs_RM=s.logprobs_RM.at[r, 0].set(logprob),
            lengths_R=s.lengths_R.at[r].set(1),
            stopped_R=s.stopped_R.at[r].set(stop),
            next_row=r + 1,
        )

    return jax.lax.while_loop(cond, body, s)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "sampler", "eos_ids", "pad_id", "num_samples", "layer_loop"),
    donate_argnames=("state",),
)
def run_slots(graphdef, params, state: SlotState, source: PromptSource, rng, budget_R,
              max_steps, *, sampler: Sampler, eos_ids: tuple[int, ...], pad_id: int,
              num_samples: int, layer_loop: str) -> SlotState:
    """Refill and decode until every row is done or `max_steps` decode steps ran."""
    cfg = nnx.merge(graphdef, params).cfg
    stacked = layer_weights(params, cfg)
    if layer_loop in ("unroll", "unroll_out_in"):
        layers = unstack_layers(stacked, cfg.num_layers, out_in=layer_loop == "unroll_out_in")
        state = dataclasses.replace(state, cache=split_cache(state.cache))
    else:
        layers = stacked
    R = state.tokens_RM.shape[0]
    P = source.positions_BP.shape[1]
    row_keys_R = _row_keys(rng, R)
    pad = jnp.int32(pad_id)
    first_step = state.steps
    refill = functools.partial(_refill, source=source, row_keys_R=row_keys_R, budget_R=budget_R,
                               sampler=sampler, eos_ids=eos_ids, num_samples=num_samples)

    def pending(s):
        return jnp.any(s.row_N < R) | (s.next_row < R)

    def cond(s):
        return pending(s) & (s.steps - first_step < max_steps)

    def body(s):
        s = refill(s)
        live_N = s.row_N < R
        row_N = jnp.minimum(s.row_N, R - 1)
        S = s.cache.positions_RS.shape[1]
        # A free slot writes its (ignored, segment 0) key at the last slot.
        index_N = jnp.where(live_N, P + s.sampled_N - 1, S - 1)
        logits_NV, cache = decode_step(
            cfg, params, layers, s.last_token_N, s.positions_N, live_N.astype(jnp.int32),
            s.cache, index_N, layer_loop=layer_loop,
        )
        keys_N = jax.vmap(jax.random.fold_in)(row_keys_R[row_N], s.sampled_N)
        token_N, logprob_N = _sample_rows(sampler, keys_N, logits_NV)
        token_N = jnp.where(live_N, token_N, pad)
        stop_N = live_N & _is_stop(token_N, eos_ids)
        finished_N = live_N & (stop_N | (s.sampled_N + 1 >= budget_R[row_N]))
        write_N = jnp.where(live_N, s.row_N, R)  # R: out of bounds, dropped
        at = (write_N, s.sampled_N)
        return dataclasses.replace(
            s,
            row_N=jnp.where(finished_N, R, s.row_N),
            sampled_N=s.sampled_N + 1,
            last_token_N=token_N,
            positions_N=s.positions_N + 1,
            cache=cache,
            tokens_RM=s.tokens_RM.at[at].set(token_N, mode="drop"),
            logprobs_RM=s.logprobs_RM.at[at].set(logprob_N, mode="drop"),
            lengths_R=s.lengths_R.at[write_N].set(s.sampled_N + 1, mode="drop"),
            stopped_R=s.stopped_R.at[jnp.where(stop_N, s.row_N, R)].set(True, mode="drop"),
            steps=s.steps + 1,
            live_steps=s.live_steps + live_N.sum(dtype=jnp.int32),
        )

    final = jax.lax.while_loop(cond, body, state)
    return dataclasses.replace(final, cache=stack_cache(final.cache))


@dataclasses.dataclass(frozen=True)
class ContinuousStats:
    """Step counts of one `generate_continuous` call (not timing: exact)."""

    decode_steps: int  # decode steps run (each over all N slots)
    slot_steps: int  # decode_steps x N
    live_slot_steps: int  # slot-steps that decoded a live row
    chunks: int  # jitted calls


def generate_continuous(
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
    num_slots: int | None = None,
    budgets_R=None,
    chunk_steps: int | None = None,
    layer_loop: str = "auto",
    bucket: bool = True,
    return_stats: bool = False,
):
    """`jaxpt.sampling.generate` with continuous batching over `num_slots` slots (default:
    all R rows, i.e. the static loop's cache memory). Same arguments and result
    (`GenerationResult`, row r = prompt r // num_samples); see the module doc for the RNG.

    budgets_R: optional per-row cap on new tokens (<= max_new_tokens); a row that reaches
        it finishes with reason "length" (the benchmark's long-tailed lengths).
    chunk_steps: None runs the whole rollout in one jitted while_loop; an int runs
        chunks of that many decode steps, the host looping until all rows are done.
    return_stats: also return a `ContinuousStats`.
    """
    check_sampling_args(sampler, max_new_tokens, num_samples)
    ids, mask = np.asarray(prompt_ids_BP), np.asarray(prompt_mask_BP)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise GenerationError(
            f"prompt_ids_BP {ids.shape} / prompt_mask_BP {mask.shape}: expected equal 2-dim "
            "[batch, length] shapes"
        )
    B, P = ids.shape
    if B == 0 or P == 0:
        raise GenerationError(f"prompt_ids_BP: empty batch or length (shape {ids.shape})")
    empty = np.flatnonzero(mask.astype(bool).sum(axis=1) == 0)
    if empty.size:
        raise GenerationError(
            f"prompt_mask_BP: row {int(empty[0])} has no real tokens (every prompt needs >= 1)"
        )
    M, R = int(max_new_tokens), B * num_samples
    N = R if num_slots is None else int(num_slots)
    if N < 1:
        raise GenerationError(f"num_slots={num_slots!r}: must be >= 1")
    N = min(N, R)
    budget = np.full((R,), M, np.int32) if budgets_R is None else np.asarray(budgets_R, np.int32)
    if budget.shape != (R,) or budget.min() < 1 or budget.max() > M:
        raise GenerationError(
            f"budgets_R: expected {R} ints in [1, max_new_tokens={M}], got shape {budget.shape}"
        )
    if chunk_steps is not None and chunk_steps < 1:
        raise GenerationError(f"chunk_steps={chunk_steps!r}: must be >= 1 or None")
    eos, layer_loop = check_ids_and_loop(params, eos_ids, pad_id, layer_loop)
    if bucket and bucket_length(P) > P:  # left padding, like `generate`
        extra = bucket_length(P) - P
        ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=int(pad_id))
        mask = np.pad(mask, ((0, 0), (extra, 0)))

    source = prefill_prompts(graphdef, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    state = init_slots(source, num_slots=N, num_rows=R, max_new_tokens=M, pad_id=int(pad_id),
                       cache_dtype=source.k_LBKPD.dtype)
    key, budget = _as_key(rng), jnp.asarray(budget)
    limit = np.int32(np.iinfo(np.int32).max if chunk_steps is None else chunk_steps)
    chunks = 0
    while True:
        state = run_slots(graphdef, params, state, source, key, budget, limit, sampler=sampler,
                          eos_ids=eos, pad_id=int(pad_id), num_samples=num_samples,
                          layer_loop=layer_loop)
        chunks += 1
        if chunk_steps is None or not (
            bool(jnp.any(state.row_N < R)) or int(state.next_row) < R
        ):
            break
    result = GenerationResult(
        tokens=state.tokens_RM,
        logprobs=state.logprobs_RM,
        lengths=state.lengths_R,
        finish_reason=jnp.where(state.stopped_R, FINISH_STOP, FINISH_LENGTH).astype(jnp.int32),
    )
    if not return_stats:
        return result
    steps = int(state.steps)
    stats = ContinuousStats(steps, steps * N, int(state.live_steps), chunks)
    return result, stats
