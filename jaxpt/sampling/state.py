"""What the decode loops share: the result of a generation, the decode loop's carry,
prompt-length buckets and stop-token tests (``jaxpt.sampling.loop`` and
``jaxpt.sampling.continuous``).

Axis legend: R decoded rows, M max new tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt.data.packing import bucket_length as _packing_bucket_length
from jaxpt.sampling.step import DecodeCache

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

