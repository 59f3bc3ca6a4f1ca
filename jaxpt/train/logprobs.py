"""Per-token log-probs of a batch under a model: the one function SFT, DPO and GRPO share.

Axis legend: B batch rows, T tokens, E hidden, V vocab, N = B*T flattened tokens,
C tokens per accuracy chunk.

``sequence_token_logprobs(model, batch)`` runs the decoder on ``input_ids`` (with the
batch's ``positions`` and ``segment_ids``) and returns log p(``targets``) at every position,
optionally the entropy of the predictive distribution and whether the target is the argmax
(for ``mean_token_accuracy``). Positions where the batch has no target (``targets`` 0 under
a zero loss mask) still get values; callers mask.

Implementations (``impl``), chosen by name:
  * ``auto`` / ``chunked`` / ``pallas``: the fused log-prob kernel
    ``jaxpt.kernels.logprob.token_logprobs`` (never materializes N x V logits). ``auto``
    falls back to ``reference`` (with a warning) when the kernel module is not installed;
    ``chunked`` / ``pallas`` raise instead.
  * ``reference``: full fp32 logits and ``log_softmax`` (the oracle; memory N x V).

The argmax for accuracy is computed in token chunks of ``accuracy_chunk`` under
``stop_gradient`` (C x V logits at a time), so training never holds N x V logits for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

IMPLS = ("auto", "pallas", "chunked", "reference")
_warned = False


def _kernel():
    try:
        from jaxpt.kernels.logprob import token_logprobs
    except ImportError:
        return None
    return token_logprobs


def reference_token_logprobs(
    hidden_NE, lm_head_VE, targets_N, *, temperature=1.0, with_entropy=False
):
    """(logprobs_N, entropy_N | None, argmax_N) from full fp32 logits (the oracle)."""
    logits_NV = (
        jnp.einsum(
            "ne,ve->nv",
            hidden_NE,
            lm_head_VE.astype(hidden_NE.dtype),
            preferred_element_type=jnp.float32,
        )
        / temperature
    )
    logp_NV = jax.nn.log_softmax(logits_NV, axis=-1)
    logprobs_N = jnp.take_along_axis(logp_NV, targets_N[:, None], axis=-1)[:, 0]
    entropy_N = -jnp.sum(jnp.exp(logp_NV) * logp_NV, axis=-1) if with_entropy else None
    return logprobs_N, entropy_N, jnp.argmax(jax.lax.stop_gradient(logits_NV), axis=-1)


def chunked_argmax(hidden_NE, lm_head_VE, *, chunk: int = 1024) -> jax.Array:
    """argmax_v (hidden @ lm_head.T) per token, C tokens at a time, no gradient."""
    hidden_NE = jax.lax.stop_gradient(hidden_NE)
    w_VE = jax.lax.stop_gradient(lm_head_VE).astype(hidden_NE.dtype)
    N, E = hidden_NE.shape
    C = min(chunk, N)
    n_chunks = -(-N // C)
    padded = jnp.pad(hidden_NE, ((0, n_chunks * C - N), (0, 0)))

    def one(h_CE):
        logits_CV = jnp.einsum("ce,ve->cv", h_CE, w_VE, preferred_element_type=jnp.float32)
        return jnp.argmax(logits_CV, axis=-1)

    return jax.lax.map(one, padded.reshape(n_chunks, C, E)).reshape(-1)[:N]


def token_logprobs_of_hidden(
    hidden_NE: jax.Array,
    lm_head_VE: jax.Array,
    targets_N: jax.Array,
    *,
    impl: str = "auto",
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_accuracy: bool = False,
    accuracy_chunk: int = 1024,
):
    """(logprobs_N, entropy_N | None, correct_N | None) from hidden states and the LM head.
    The LM head is cast to the hidden states' dtype (bf16 compute stays bf16); outputs fp32."""
    global _warned
    if impl not in IMPLS:
        raise ValueError(f"logprob impl={impl!r}; expected one of {IMPLS}")
    targets_N = targets_N.astype(jnp.int32)
    lm_head_VE = lm_head_VE.astype(hidden_NE.dtype)
    kernel = None if impl == "reference" else _kernel()
    if kernel is None and impl in ("chunked", "pallas"):
        raise ValueError(
            f"logprob impl={impl!r} needs jaxpt.kernels.logprob, which is not installed; "
            "use train.logprob_impl=reference"
        )
    if kernel is None:
        if impl == "auto" and not _warned:
            warnings.warn(
                "jaxpt.kernels.logprob is not available; using the reference log-probs "
                "(full N x V logits)",
                stacklevel=2,
            )
            _warned = True
        logprobs_N, entropy_N, argmax_N = reference_token_logprobs(
            hidden_NE, lm_head_VE, targets_N, temperature=temperature, with_entropy=with_entropy
        )
        correct_N = (argmax_N == targets_N) if with_accuracy else None
        return logprobs_N, entropy_N, correct_N
    out = kernel(
        hidden_NE,
        lm_head_VE,
        targets_N,
        temperature=temperature,
        with_entropy=with_entropy,
        impl=impl,
    )
    correct_N = None
    if with_accuracy:
        correct_N = chunked_argmax(hidden_NE, lm_head_VE, chunk=accuracy_chunk) == targets_N
    return out.logprobs_N, out.entropy_N, correct_N


def sequence_token_logprobs(
    model: Any,
    batch: Mapping[str, jax.Array],
    *,
    impl: str = "auto",
    with_entropy: bool = False,
    with_accuracy: bool = False,
    temperature: float = 1.0,
    input_embeddings_BTE: jax.Array | None = None,
    accuracy_chunk: int = 1024,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(logprobs_BT, entropy_BT | None, correct_BT | None) of ``batch["targets"]``.

    ``batch`` holds ``input_ids``, ``targets``, ``positions``, ``segment_ids`` [B, T] (the
    SFT batch contract of ``jaxpt.data.packing``; DPO passes each side's keys without
    their ``chosen_`` / ``rejected_`` prefix). ``input_embeddings_BTE`` replaces the
    embedding lookup (NEFTune). All outputs are fp32 [B, T] (bool for ``correct_BT``).
    """
    ids_BT = batch["input_ids"]
    B, T = ids_BT.shape
    hidden_BTE, _ = model(
        ids_BT,
        batch["positions"],
        batch["segment_ids"],
        input_embeddings_BTE=input_embeddings_BTE,
    )
    E = hidden_BTE.shape[-1]
    logprobs_N, entropy_N, correct_N = token_logprobs_of_hidden(
        hidden_BTE.reshape(B * T, E),
        model.lm_head,
        batch["targets"].reshape(B * T),
        impl=impl,
        temperature=temperature,
        with_entropy=with_entropy,
        with_accuracy=with_accuracy,
        accuracy_chunk=accuracy_chunk,
    )
    shape = lambda x: None if x is None else x.reshape(B, T)  # noqa: E731
    return shape(logprobs_N), shape(entropy_N), shape(correct_N)
