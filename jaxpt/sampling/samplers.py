"""Token samplers: greedy, temperature, top-k, top-p (nucleus) and min-p.

Axis legend:
  R rows being decoded   V vocab

A `Sampler` is a small frozen (hashable) dataclass, so it is a static argument of the
jitted decode loop. The filters compose in Hugging Face `transformers`' order:
temperature -> top-k -> top-p -> min-p, each acting on the logits the previous one left
(removed tokens get -inf), so `Sampler(temperature=0.7, top_k=50, top_p=0.9)` draws from
the same distribution as `generate(do_sample=True, temperature=0.7, top_k=50, top_p=0.9)`.

Log-probs: `sample` returns, for each drawn token, `log_softmax(logits / temperature)` at
that token, in fp32, computed BEFORE the top-k / top-p / min-p truncation (temperature 1
for greedy). This is the quantity TRL's GRPO recomputes from the policy
(`selective_log_softmax(logits / temperature)`), so with temperature 1 it is the old
log-prob of the sampled token.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


class SamplerError(ValueError):
    """A sampler setting out of range; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class Sampler:
    """temperature 0 = greedy (argmax; the other settings are then ignored).

    top_k: keep the k highest logits (ties with the k-th are kept too); 0 = off.
    top_p: keep the smallest set of most likely tokens whose probability mass reaches
        top_p (a token is kept iff the mass of the tokens ranked strictly before it is
        below top_p; tokens tied with the last kept one are kept too); 1.0 = off.
    min_p: keep tokens whose probability is at least min_p times the most likely token's;
        0.0 = off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise SamplerError(f"temperature={t!r}: must be a finite number >= 0 (0 = greedy)")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise SamplerError(f"top_k={k!r}: must be an integer >= 0 (0 = off)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not (0.0 < p <= 1.0):
            raise SamplerError(f"top_p={p!r}: must be in (0, 1] (1 = off)")
        m = self.min_p
        if isinstance(m, bool) or not isinstance(m, int | float) or not (0.0 <= m <= 1.0):
            raise SamplerError(f"min_p={m!r}: must be in [0, 1] (0 = off)")
        # Normalize so equal settings hash equal (and compile once).
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "min_p", float(m))

    @classmethod
    def greedy(cls) -> Sampler:
        return cls(temperature=0.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def describe(self) -> str:
        if self.is_greedy:
            return "greedy"
        parts = [f"temperature={self.temperature:g}"]
        if self.top_k:
            parts.append(f"top_k={self.top_k}")
        if self.top_p < 1.0:
            parts.append(f"top_p={self.top_p:g}")
        if self.min_p > 0.0:
            parts.append(f"min_p={self.min_p:g}")
        return ", ".join(parts)

    # -- the math --------------------------------------------------------------------

    def scaled_logits(self, logits_RV: jax.Array) -> jax.Array:
        """fp32 logits / temperature (temperature 1 for greedy)."""
        logits_RV = logits_RV.astype(jnp.float32)
        if self.is_greedy or self.temperature == 1.0:
            return logits_RV
        return logits_RV / self.temperature

    def filter_logits(self, scaled_RV: jax.Array) -> jax.Array:
        """Apply top-k, then top-p, then min-p to temperature-scaled logits: removed
        tokens become -inf. The most likely token is never removed."""
        x_RV = scaled_RV
        V = x_RV.shape[-1]
        if 0 < self.top_k < V:
            kth_R1 = jax.lax.top_k(x_RV, self.top_k)[0][:, -1:]
            x_RV = jnp.where(x_RV >= kth_R1, x_RV, NEG_INF)
        if self.top_p < 1.0:
            sorted_RV = jnp.flip(jnp.sort(x_RV, axis=-1), axis=-1)  # descending
            probs_RV = jax.nn.softmax(sorted_RV, axis=-1)
            mass_before_RV = jnp.cumsum(probs_RV, axis=-1) - probs_RV
            num_keep_R = jnp.maximum(jnp.sum(mass_before_RV < self.top_p, axis=-1), 1)
            threshold_R1 = jnp.take_along_axis(sorted_RV, num_keep_R[:, None] - 1, axis=-1)
            x_RV = jnp.where(x_RV >= threshold_R1, x_RV, NEG_INF)
        if self.min_p > 0.0:
            # p_i >= min_p * p_max  <=>  x_i - x_max >= log(min_p); normalization cancels.
            max_R1 = jnp.max(x_RV, axis=-1, keepdims=True)
            x_RV = jnp.where(x_RV - max_R1 >= math.log(self.min_p), x_RV, NEG_INF)
        return x_RV

    def sample(self, key: jax.Array, logits_RV: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Draw one token per row. Returns (tokens_R int32, logprobs_R fp32), the
        log-prob being log_softmax(logits / temperature) at the token (see module doc)."""
        scaled_RV = self.scaled_logits(logits_RV)
        if self.is_greedy:
            tokens_R = jnp.argmax(scaled_RV, axis=-1).astype(jnp.int32)
        else:
            filtered_RV = self.filter_logits(scaled_RV)
            tokens_R = jax.random.categorical(key, filtered_RV, axis=-1).astype(jnp.int32)
        logprobs_RV = jax.nn.log_softmax(scaled_RV, axis=-1)
        logprobs_R = jnp.take_along_axis(logprobs_RV, tokens_R[:, None], axis=-1)[:, 0]
        return tokens_R, logprobs_R
