"""Plain-jnp reference for the token log-prob core. Materializes N x V logits: tests only.

Axis legend: N tokens, H hidden, V vocab. Gradients come from ordinary JAX autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpt.kernels.logprob_common import TokenLogProbs


def reference_token_logprobs(
    hidden_NH: jax.Array,
    lm_head_VH: jax.Array,
    targets_N: jax.Array,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> TokenLogProbs:
    logits_NV = jnp.einsum("nh,vh->nv", hidden_NH, lm_head_VH, preferred_element_type=jnp.float32)
    logits_NV = logits_NV / temperature
    logp_NV = jax.nn.log_softmax(logits_NV, axis=-1)
    lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
    logprobs_N = jnp.take_along_axis(logp_NV, targets_N[:, None], axis=-1)[:, 0]
    entropy_N = -jnp.sum(jnp.exp(logp_NV) * logp_NV, axis=-1) if with_entropy else None
    return TokenLogProbs(logprobs_N, lse_N, entropy_N)
