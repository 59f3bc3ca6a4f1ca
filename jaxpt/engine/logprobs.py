"""Per-token log-probs of a batch under a model: the one function SFT, DPO and GRPO share,
and both sides of preference pairs in one forward (``pair_logps``).

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

``valid_BT`` (the positions whose log-prob the caller will use: loss targets, completion
tokens) lets the LM head skip the others. Each row's valid positions are moved to its
front (a stable per-row sort, so rows stay on their data shard), the kernel skips token
chunks with no valid position, and the results are put back in place; outputs at invalid
positions are 0. SFT on chat data scores about a third of its positions, GRPO only the
completion, DPO only the two responses.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxpt.data.pairs import PairRows, SharedPairRows

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
    """(logprobs_N, entropy_N | None, argmax_N) from full fp32 logits (the oracle; callers
    mask invalid positions themselves)."""
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


def chunked_argmax(
    hidden_NE, lm_head_VE, *, chunk: int = 1024, valid_N: jax.Array | None = None
) -> jax.Array:
    """argmax_v (hidden @ lm_head.T) per token, C tokens at a time, no gradient. With
    ``valid_N`` invalid tokens get -1, and chunks holding no valid token are skipped where
    ``chunk_skipping_is_safe``."""
    from jaxpt.kernels.logprob_common import chunk_skipping_is_safe

    hidden_NE = jax.lax.stop_gradient(hidden_NE)
    w_VE = jax.lax.stop_gradient(lm_head_VE).astype(hidden_NE.dtype)
    N, E = hidden_NE.shape
    C = min(chunk, N)
    n_chunks = -(-N // C)
    padded = jnp.pad(hidden_NE, ((0, n_chunks * C - N), (0, 0)))
    live_N = jnp.ones((N,), bool) if valid_N is None else valid_N.astype(bool)
    live = jnp.pad(live_N, (0, n_chunks * C - N)).reshape(n_chunks, C)

    def one(args):
        h_CE, live_C = args

        def compute():
            logits_CV = jnp.einsum("ce,ve->cv", h_CE, w_VE, preferred_element_type=jnp.float32)
            return jnp.argmax(logits_CV, axis=-1).astype(jnp.int32)

        if valid_N is None or not chunk_skipping_is_safe():
            return compute()
        return jax.lax.cond(jnp.any(live_C), compute, lambda: jnp.full((C,), -1, jnp.int32))

    out = jax.lax.map(one, (padded.reshape(n_chunks, C, E), live)).reshape(-1)[:N]
    return out if valid_N is None else jnp.where(live_N, out, -1)


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
    valid_N: jax.Array | None = None,
):
    """(logprobs_N, entropy_N | None, correct_N | None) from hidden states and the LM head.
    The LM head is cast to the hidden states' dtype (bf16 compute stays bf16); outputs fp32.
    With ``valid_N`` outputs are 0 (False) at invalid tokens, and chunks holding none are
    skipped where the implementation can (see the module doc)."""
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
        if valid_N is not None:
            keep = lambda x, zero: None if x is None else jnp.where(valid_N, x, zero)  # noqa: E731
            logprobs_N, entropy_N = keep(logprobs_N, 0.0), keep(entropy_N, 0.0)
            correct_N = keep(correct_N, False)
        return logprobs_N, entropy_N, correct_N
    out = kernel(
        hidden_NE,
        lm_head_VE,
        targets_N,
        temperature=temperature,
        with_entropy=with_entropy,
        impl=impl,
        valid_N=valid_N,
    )
    correct_N = None
    if with_accuracy:
        argmax_N = chunked_argmax(hidden_NE, lm_head_VE, chunk=accuracy_chunk, valid_N=valid_N)
        correct_N = argmax_N == targets_N
    return out.logprobs_N, out.entropy_N, correct_N


def hidden_token_logprobs(
    hidden_BTE: jax.Array,
    lm_head_VE: jax.Array,
    targets_BT: jax.Array,
    *,
    impl: str = "auto",
    with_entropy: bool = False,
    with_accuracy: bool = False,
    temperature: float = 1.0,
    accuracy_chunk: int = 1024,
    valid_BT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(logprobs_BT, entropy_BT | None, correct_BT | None) of ``targets_BT`` given the
    final hidden states: the LM-head half of ``sequence_token_logprobs`` (module doc for
    ``valid_BT``)."""
    B, T, E = hidden_BTE.shape
    order_BT = None
    if valid_BT is not None:
        valid_BT = valid_BT.astype(bool)
        # Valid positions first in every row (stable), so whole token chunks are skipped.
        order_BT = jnp.argsort(~valid_BT, axis=1, stable=True)
        take = lambda x: jnp.take_along_axis(x, order_BT, axis=1)  # noqa: E731
        hidden_BTE = jnp.take_along_axis(hidden_BTE, order_BT[..., None], axis=1)
        targets_BT, valid_BT = take(targets_BT), take(valid_BT)
    logprobs_N, entropy_N, correct_N = token_logprobs_of_hidden(
        hidden_BTE.reshape(B * T, E),
        lm_head_VE,
        targets_BT.reshape(B * T),
        impl=impl,
        temperature=temperature,
        with_entropy=with_entropy,
        with_accuracy=with_accuracy,
        accuracy_chunk=accuracy_chunk if valid_BT is None else min(accuracy_chunk, 128),
        valid_N=None if valid_BT is None else valid_BT.reshape(B * T),
    )
    inverse_BT = None if order_BT is None else jnp.argsort(order_BT, axis=1)

    def shape(x):
        if x is None:
            return None
        x = x.reshape(B, T)
        return x if inverse_BT is None else jnp.take_along_axis(x, inverse_BT, axis=1)

    return shape(logprobs_N), shape(entropy_N), shape(correct_N)


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
    valid_BT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(logprobs_BT, entropy_BT | None, correct_BT | None) of ``batch["targets"]``.

    ``valid_BT``: the positions the caller uses (e.g. its loss mask); the others are 0
    (False) and cost (almost) nothing in the LM head (module doc).

    ``batch`` holds ``input_ids``, ``targets``, ``positions``, ``segment_ids`` [B, T] (the
    SFT batch contract of ``jaxpt.data.packing``; DPO passes each side's keys without
    their ``chosen_`` / ``rejected_`` prefix). ``input_embeddings_BTE`` replaces the
    embedding lookup (NEFTune). All outputs are fp32 [B, T] (bool for ``correct_BT``).
    """
    hidden_BTE, _ = model(
        batch["input_ids"],
        batch["positions"],
        batch["segment_ids"],
        input_embeddings_BTE=input_embeddings_BTE,
    )
    return hidden_token_logprobs(
        hidden_BTE,
        model.lm_head,
        batch["targets"],
        impl=impl,
        with_entropy=with_entropy,
        with_accuracy=with_accuracy,
        temperature=temperature,
        accuracy_chunk=accuracy_chunk,
        valid_BT=valid_BT,
    )


# ----------------------------------------------------------------------------- pairs
# Both sides of preference pairs (``jaxpt.data.pairs``: flat rows or one shared-prompt row
# per pair) in one forward: DPO and its family, reward models.


def pair_token_logprobs(model, pairs: PairRows | SharedPairRows, **kw):
    """(logprobs, entropy | None, correct | None, trained) [2b, ·] of both sides of every pair
    in one forward, row 2i chosen i and row 2i+1 rejected i; the LM head runs on trained
    tokens only. Flat rows are interleaved (a reshape: batch-sharded rows stay on their
    shard); a shared row goes through the decoder once and the LM head reads the hidden
    states that predict each side's trained tokens."""
    two = lambda c, r: jnp.stack([c, r], axis=1).reshape(-1, *c.shape[1:])  # noqa: E731
    if isinstance(pairs, PairRows):
        c, r = pairs.side("chosen"), pairs.side("rejected")
        both = {k: two(c[k], r[k]) for k in c}
        trained_2bT = both["loss_mask"] > 0
        return *sequence_token_logprobs(model, both, valid_BT=trained_2bT, **kw), trained_2bT
    shared_bT = pairs.prefix > 0
    hidden_bTE, _ = model(pairs.input_ids, pairs.positions, pairs.segment_ids, shared_BT=shared_bT)
    source_b2C = jnp.stack([pairs.chosen_source, pairs.rejected_source], axis=1)
    b, _, C = source_b2C.shape
    hidden_b2CE = jnp.take_along_axis(
        hidden_bTE[:, None], source_b2C[..., None], axis=2, mode="clip"
    )
    valid_2bC = two(pairs.chosen_valid, pairs.rejected_valid) > 0
    targets_2bC = two(pairs.chosen_targets, pairs.rejected_targets)
    lp, ent, correct = hidden_token_logprobs(
        hidden_b2CE.reshape(2 * b, C, -1), model.lm_head, targets_2bC, valid_BT=valid_2bC, **kw
    )
    return lp, ent, correct, valid_2bC


def pair_logps(model, pairs, *, impl="auto", with_entropy=False, with_accuracy=False):
    """fp32 ``chosen_logps``, ``rejected_logps`` (log p summed over each completion's target
    tokens, [b]), ``chosen_lengths``, ``rejected_lengths`` (target token counts, [b]), and when
    asked ``entropy_sum`` (over every completion token of both sides) and ``chosen_correct``
    (argmax hits over the chosen completion tokens), scalars: one forward
    (``pair_token_logprobs``)."""
    lp_2bT, ent_2bT, correct_2bT, mask_2bT = pair_token_logprobs(
        model, pairs, impl=impl, with_entropy=with_entropy, with_accuracy=with_accuracy
    )
    logps_b2 = jnp.sum(jnp.where(mask_2bT, lp_2bT, 0.0), axis=-1).reshape(-1, 2)
    lengths_b2 = jnp.sum(mask_2bT, axis=-1, dtype=jnp.float32).reshape(-1, 2)
    out = {"chosen_logps": logps_b2[:, 0], "rejected_logps": logps_b2[:, 1],
           "chosen_lengths": lengths_b2[:, 0], "rejected_lengths": lengths_b2[:, 1]}
    if ent_2bT is not None:
        out["entropy_sum"] = jnp.sum(jnp.where(mask_2bT, jax.lax.stop_gradient(ent_2bT), 0.0))
    if correct_2bT is not None:
        chosen_rows = (jnp.arange(mask_2bT.shape[0]) % 2 == 0)[:, None]
        out["chosen_correct"] = jnp.sum(correct_2bT & mask_2bT & chosen_rows, dtype=jnp.float32)
    return out
