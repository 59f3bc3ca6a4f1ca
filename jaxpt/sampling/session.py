"""Decode sessions: each row's KV cache stays on the device between the turns of a
multi-turn rollout, and a turn feeds only the row's NEW tokens (token in / token out).

Axis legend:
  R session rows   S cache slots per row   P prefilled prompt length (bucketed)
  F forced tokens of a turn (bucketed)   M max new tokens per turn   V vocab

    session = DecodeSession(graphdef, params, sampler=..., max_new_tokens=64,
                            max_total_tokens=1024, eos_ids=(2,), pad_id=2, seed=0)
    outs = session.start(prompt_ids)              # turn 1 of every row
    outs = session.resume([0, 3], [cont0, cont3])  # the next turn of rows 0 and 3 only

A row's cache holds every token of its trajectory except the last sampled one (a token is
written to the cache when it is fed, and the last one has not been fed yet). Slot = position
(the prompt is prefilled right-padded), so a row's next slot is its length.

How a turn runs (`_run_turn`, one jit, cache donated): a `lax.while_loop` of
`step.decode_step`, each row feeding one token per step at its own slot (`index` [R], as
`jaxpt.sampling.continuous` does). A row first feeds its *forced* tokens: the last sampled
token of its previous turn, then the environment's continuation ids (written to the cache,
not sampled, no log-prob); the logits of its last forced token give its first sampled
token, and it then samples freely until it emits a stop id or its turn budget ends. Rows
not in the turn feed segment id 0 at their next (empty) slot, which changes nothing they
attend later. `start` prefills each prompt less its last token (`prefill.prompt_forward`,
slots [0, len - 1)) and runs turn 1 with that last token as the one forced token, so the
first turn is the same loop as every later one.

Budgets: a turn samples at most ``max_new_tokens``, and a trajectory (prompt, every turn,
every continuation) holds at most ``max_total_tokens`` tokens: a turn cut by that limit
ends with finish "capacity" (by ``max_new_tokens``: "length"; by a stop id: "stop").
Before a turn the cache grows (by `bucket_length` buckets, a few compiled programs) to
hold every slot the turn may write, so S follows the longest trajectory, up to
``bucket_length(max_total_tokens)``: a decode step's attention reads all S slots, so a
cache sized for the longest possible trajectory from the start would slow every turn.

RNG: token t of row r in its k-th turn is drawn with
``fold_in(fold_in(fold_in(key(seed), r), k), t)``, so a row's samples depend on the seed,
its row index and its own history only, not on which other rows take part in a turn.

Compared with re-submitting the whole history every turn (`jaxpt.rl.multiturn`'s
default), a turn costs its new tokens' decode steps instead of a prefill of the whole
trajectory; the cache costs R x S slots for the session's life. The resumed turn's
log-probs equal a fresh decode of the same history up to summation order (tested).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.distributed import host_rows
from jaxpt.sampling.continuous import _sample_rows
from jaxpt.sampling.loop import check_ids_and_loop, check_sampling_args
from jaxpt.sampling.prefill import prompt_forward
from jaxpt.sampling.samplers import Sampler
from jaxpt.sampling.state import GenerationError, _constrain, _is_stop, bucket_length
from jaxpt.sampling.step import (
    DecodeCache,
    cache_from_prefill,
    decode_step,
    layer_weights,
    split_cache,
    stack_cache,
    unstack_layers,
)

FINISHES = ("stop", "length", "capacity")  # how a turn ended (see the module doc)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TurnCarry:
    """The while_loop carry of one turn. Per row: slots written (= position and slot of
    the next token fed), forced tokens fed so far, the last sampled token, tokens
    sampled this turn, and whether the row is done / stopped on a stop id."""

    cache: DecodeCache
    length_R: jax.Array
    fed_R: jax.Array
    last_token_R: jax.Array
    sampled_R: jax.Array
    done_R: jax.Array
    stop_R: jax.Array
    tokens_RM: jax.Array
    logprobs_RM: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "num_slots", "shardings"))
def _prefill_rows(graphdef, params, ids_RP, mask_RP, *, num_slots: int, shardings=None):
    """Right-padded prompts into slots [0, len) of a decode-layout cache of `num_slots`
    slots per row; returns (cache, len_R)."""
    model = nnx.merge(graphdef, params)
    cache, _, length_R = prompt_forward(model, ids_RP, mask_RP, shardings=shardings)
    cache = cache_from_prefill(cache, 1, num_slots - ids_RP.shape[1])
    if shardings is not None:
        cache = _constrain(cache, shardings.cache(cache))
    return cache, length_R.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_slots", "shardings"))
def _grow_cache(cache: DecodeCache, *, num_slots: int, shardings=None) -> DecodeCache:
    """The same cache with empty slots (segment 0) appended up to `num_slots` per row."""
    extra = num_slots - cache.max_len
    kv = ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0))
    rs = ((0, 0), (0, extra))
    cache = DecodeCache(jnp.pad(cache.k_LRKSD, kv), jnp.pad(cache.v_LRKSD, kv),
                        jnp.pad(cache.positions_RS, rs), jnp.pad(cache.segment_ids_RS, rs))
    return cache if shardings is None else _constrain(cache, shardings.cache(cache))


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef", "sampler", "max_new_tokens", "eos_ids", "pad_id", "shardings", "layer_loop",
    ),
    donate_argnames=("cache", "length_R"),
)
def _run_turn(graphdef, params, cache: DecodeCache, length_R, forced_RF, forced_len_R,
              budget_R, turn_R, key, *, sampler: Sampler, max_new_tokens: int,
              eos_ids: tuple[int, ...], pad_id: int, shardings=None, layer_loop: str):
    """One turn of every row with budget_R > 0 (see the module doc). Returns (cache,
    length_R, tokens_RM, logprobs_RM, sampled_R, stop_R)."""
    cfg = nnx.merge(graphdef, params).cfg
    stacked = layer_weights(params, cfg)
    if layer_loop in ("unroll", "unroll_out_in"):
        layers = unstack_layers(stacked, cfg.num_layers, out_in=layer_loop == "unroll_out_in")
        cache = split_cache(cache)
    else:
        layers = stacked
    cache_shardings = None if shardings is None else shardings.cache(cache)
    R, F = forced_RF.shape
    M = max_new_tokens
    rows_R = jnp.arange(R, dtype=jnp.int32)
    row_keys_R = jax.vmap(lambda r, k: jax.random.fold_in(jax.random.fold_in(key, r), k))(
        rows_R, turn_R)
    pad = jnp.int32(pad_id)
    zeros_R = jnp.zeros((R,), jnp.int32)
    start = TurnCarry(
        cache=cache, length_R=length_R, fed_R=zeros_R, last_token_R=zeros_R, sampled_R=zeros_R,
        done_R=budget_R <= 0, stop_R=jnp.zeros((R,), bool),
        tokens_RM=jnp.full((R, M), pad, jnp.int32), logprobs_RM=jnp.zeros((R, M), jnp.float32),
    )

    def cond(c: TurnCarry):
        return ~jnp.all(c.done_R)

    def body(c: TurnCarry) -> TurnCarry:
        live_R = ~c.done_R
        forcing_R = c.fed_R < forced_len_R
        forced_R = jnp.take_along_axis(forced_RF, jnp.minimum(c.fed_R, F - 1)[:, None], 1)[:, 0]
        token_in_R = jnp.where(forcing_R, forced_R, c.last_token_R)
        logits_RV, cache = decode_step(
            cfg, params, layers, token_in_R, c.length_R, live_R.astype(jnp.int32), c.cache,
            c.length_R, layer_loop=layer_loop,
        )
        cache = _constrain(cache, cache_shardings)
        fed_R = c.fed_R + (live_R & forcing_R)
        # The token just fed was the last forced one or a sampled one: sample the next.
        sampling_R = live_R & (fed_R >= forced_len_R)
        keys_R = jax.vmap(jax.random.fold_in)(row_keys_R, c.sampled_R)
        token_R, logprob_R = _sample_rows(sampler, keys_R, logits_RV)
        token_R = jnp.where(sampling_R, token_R, pad)
        at = (jnp.where(sampling_R, rows_R, R), c.sampled_R)  # row R: dropped
        sampled_R = c.sampled_R + sampling_R
        stop_R = sampling_R & _is_stop(token_R, eos_ids)
        return TurnCarry(
            cache=cache,
            length_R=c.length_R + live_R,
            fed_R=fed_R,
            last_token_R=jnp.where(sampling_R, token_R, c.last_token_R),
            sampled_R=sampled_R,
            done_R=c.done_R | stop_R | (sampling_R & (sampled_R >= budget_R)),
            stop_R=c.stop_R | stop_R,
            tokens_RM=c.tokens_RM.at[at].set(token_R, mode="drop"),
            logprobs_RM=c.logprobs_RM.at[at].set(logprob_R, mode="drop"),
        )

    final = jax.lax.while_loop(cond, body, start)
    return (stack_cache(final.cache), final.length_R, final.tokens_RM, final.logprobs_RM,
            final.sampled_R, final.stop_R)


class DecodeSession:
    """Rows whose KV caches live on the device across turns (see the module doc).

    `start(prompts)` opens R rows and samples their first turn; `resume(rows, new_ids)`
    feeds each listed row its new tokens and samples its next turn. Both return, for each
    row they ran, ``{"token_ids", "logprobs", "finish"}`` (the sampled tokens, stop token
    included; their log-probs as `jaxpt.sampling.generate` returns them; one of
    `FINISHES`). `params` (and, with `shardings`, a `DecodeSharding`) as `generate` takes
    them: placed by the caller (`place_params`); R must divide the mesh's batch axes.
    cache_slots: slots per row to allocate at `start` (the cache still grows past them
    when a turn needs more); None: the prompts' bucket. A cache sized once, e.g.
    ``bucket_length(max_total_tokens)``, compiles one turn program instead of one per
    bucket, at the cost of attention over empty slots in every step.
    """

    def __init__(self, graphdef, params, *, sampler: Sampler, max_new_tokens: int,
                 max_total_tokens: int, eos_ids: Sequence[int], pad_id: int = 0, seed=0,
                 shardings=None, layer_loop: str = "auto", cache_slots: int | None = None):
        check_sampling_args(sampler, max_new_tokens, 1)
        if max_total_tokens < 2:
            raise GenerationError(f"max_total_tokens={max_total_tokens}: must be >= 2")
        self.eos_ids, self.layer_loop = check_ids_and_loop(params, eos_ids, pad_id, layer_loop)
        self.graphdef, self.params, self.sampler = graphdef, params, sampler
        self.max_new_tokens, self.max_total_tokens = int(max_new_tokens), int(max_total_tokens)
        self.pad_id, self.shardings = int(pad_id), shardings
        self.cache_slots = cache_slots
        # `seed`: an int, or a PRNG key (a trainer's per-rollout key)
        self.key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
        self._cache = self._length = None
        self._totals: list[int] = []  # tokens in each row's trajectory so far
        self._pending: list[int] = []  # each row's last token, not yet in its cache
        self._turns: list[int] = []

    @property
    def num_rows(self) -> int:
        return len(self._totals)

    def start(self, prompts: Sequence[Sequence[int]]) -> list[dict]:
        """Open one row per prompt (dropping any earlier rows) and sample turn 1."""
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts:
            raise GenerationError("start: no prompts")
        for r, p in enumerate(prompts):
            if not p or len(p) >= self.max_total_tokens:
                raise GenerationError(
                    f"start: prompt row {r} has {len(p)} tokens; need 1 to "
                    f"max_total_tokens - 1 = {self.max_total_tokens - 1}")
        R = len(prompts)
        if self.shardings is not None:
            self.shardings.check_batch(R)
        heads = [p[:-1] for p in prompts]
        P = bucket_length(max(1, max(len(h) for h in heads)))
        ids = np.full((R, P), self.pad_id, np.int32)
        mask = np.zeros((R, P), np.int32)
        for r, h in enumerate(heads):
            ids[r, : len(h)], mask[r, : len(h)] = h, 1
        ids, mask = self._place(ids), self._place(mask)
        self._cache = self._length = None  # free the previous session's cache first
        self._cache, self._length = _prefill_rows(self.graphdef, self.params, ids, mask,
                                                  num_slots=max(P, self.cache_slots or 0),
                                                  shardings=self.shardings)
        self._totals = [len(h) for h in heads]  # + the forced last token, counted in _turn
        self._pending = [0] * R
        self._turns = [0] * R
        return self._turn(list(range(R)), [[p[-1]] for p in prompts])

    def resume(self, rows: Sequence[int], new_ids: Sequence[Sequence[int]]) -> list[dict]:
        """Feed row ``rows[i]`` its last sampled token and then ``new_ids[i]`` (the
        environment's continuation), and sample its next turn; other rows do nothing."""
        if self._cache is None:
            raise GenerationError("resume: call start first")
        rows = [int(r) for r in rows]
        if len(rows) != len(new_ids):
            raise GenerationError(f"resume: {len(rows)} rows but {len(new_ids)} new_ids lists")
        if len(set(rows)) != len(rows):
            raise GenerationError(f"resume: rows {rows} repeat a row")
        for r in rows:
            if not 0 <= r < self.num_rows:
                raise GenerationError(f"resume: row {r} is not in the session's "
                                      f"{self.num_rows} rows")
        forced = [[self._pending[r], *(int(t) for t in ids)] for r, ids in zip(rows, new_ids,
                                                                             strict=True)]
        return self._turn(rows, forced)

    def close(self) -> None:
        """Drop the rows' caches (the device memory)."""
        self._cache = self._length = None

    def _place(self, x):
        x = jnp.asarray(x)
        return x if self.shardings is None else self.shardings.place_rows(x)

    def _turn(self, rows: list[int], forced: list[list[int]]) -> list[dict]:
        R, M, C = self.num_rows, self.max_new_tokens, self.max_total_tokens
        F = bucket_length(max(len(f) for f in forced), minimum=8)
        forced_RF = np.zeros((R, F), np.int32)
        forced_len_R = np.zeros((R,), np.int32)
        budget_R = np.zeros((R,), np.int32)
        for r, f in zip(rows, forced, strict=True):
            # The first forced token is already counted in _totals (sampled or prompt).
            total = self._totals[r] + len(f) - (1 if self._turns[r] else 0)
            if total >= C:
                raise GenerationError(
                    f"resume: row {r} would hold {total} tokens with its {len(f) - 1} new "
                    f"ones, leaving no room to sample under max_total_tokens={C}")
            forced_RF[r, : len(f)], forced_len_R[r] = f, len(f)
            budget_R[r] = min(M, C - total)
            self._totals[r] = total
        # Slots this turn may write: each row's all but its last sampled token. Inactive
        # rows write (segment 0) at their next slot, <= their total - 1 < max_total_tokens.
        need = max(max(self._totals[r] + int(budget_R[r]) - 1 for r in rows),
                   max(self._totals) - 1)
        slots = bucket_length(need + 1)  # + 1: an inactive row's write at its next slot
        if slots > self._cache.max_len:
            self._cache = _grow_cache(self._cache, num_slots=slots, shardings=self.shardings)
        out = _run_turn(
            self.graphdef, self.params, self._cache, self._length, self._place(forced_RF),
            self._place(forced_len_R), self._place(budget_R),
            self._place(np.asarray(self._turns, np.int32)), self.key, sampler=self.sampler,
            max_new_tokens=M, eos_ids=self.eos_ids, pad_id=self.pad_id,
            shardings=self.shardings, layer_loop=self.layer_loop)
        self._cache, self._length = out[0], out[1]
        # Every process needs every row (the environments' next turns): a gather where the
        # rows are spread over several hosts' devices.
        tokens_RM, logprobs_RM, sampled_R, stop_R = (host_rows(x) for x in out[2:])
        results = []
        for r in rows:
            n = int(sampled_R[r])
            finish = "stop" if stop_R[r] else "length" if n == M else "capacity"
            results.append({"token_ids": tokens_RM[r, :n].tolist(),
                            "logprobs": logprobs_RM[r, :n].tolist(), "finish": finish})
            self._totals[r] += n
            self._pending[r] = int(tokens_RM[r, n - 1])
            self._turns[r] += 1
        return results
