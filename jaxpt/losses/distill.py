"""Distillation losses: the generalized Jensen-Shannon divergence between a student and a
teacher over the vocabulary (GKD), and the per-token reverse-KL reward ("on-policy
distillation").

Axis legend: N completion tokens (flattened), K tokens per tile, V vocab, E student hidden,
F teacher hidden, R rows, C completion length.

Generalized JSD (TRL ``trl/experimental/gkd/gkd_trainer.py``,
``GKDTrainer.generalized_jsd_loss``; Agarwal et al. 2024, eq. 1), per token, with
``p_S = softmax(student_logits / temperature)``, ``p_T = softmax(teacher_logits /
temperature)``:

* ``beta == 0``: ``KL(p_T || p_S)`` (forward KL, the teacher's mass the student misses);
* ``beta == 1``: ``KL(p_S || p_T)`` (reverse KL, mode seeking);
* otherwise, with the mixture ``m = (1 - beta) p_S + beta p_T``:
  ``beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)`` (``beta = 0.5``: the JSD).

As in TRL the endpoints are special cases, not limits (the mixture form tends to 0 as beta
-> 0 or 1). TRL's trainer reduces the per-token values by summing over completion tokens
and dividing by the number of completion tokens in the batch (``num_items_in_batch``);
jaxpt does the same with whole-batch counts, so gradient accumulation changes nothing.
TRL's trainer calls the function with its default temperature 1 (``GKDConfig.temperature``
only samples); jaxpt exposes the function's ``temperature`` as ``distill.loss_temperature``.

Memory: :func:`chunked_generalized_jsd` never holds the N x V logits of either model. It maps
over tiles of K tokens (``lax.map``); a tile computes the K x V logits of both models from
their hidden states and LM heads, reduces them to K values and is rematerialized in the
backward pass (``jax.checkpoint``), so the peak is O(K x V) for the logits (a few fp32
K x V buffers: logits, log-softmax and their cotangents of the current tile) plus the
O(N x (E + F)) hidden states, independent of N x V. :func:`generalized_jsd` is the plain
full-logits form (the reference the tests compare the tiles with).

Reverse-KL reward (Thinking Machines' on-policy distillation, tinker-cookbook
``tinker_cookbook/distillation/train_on_policy.py``, ``incorporate_kl_penalty``): the
student samples, the teacher scores the sampled tokens, and each token gets the advantage
``A_t = coef * (log p_T(x_t) - log p_S_old(x_t))`` (the negative per-token reverse KL,
discount 0), trained with the importance-sampling policy gradient
``-A_t * exp(log p_S(x_t) - log p_S_old(x_t))`` (Tinker's ``importance_sampling`` loss).
Tinker sums over tokens; jaxpt divides the sum by the batch's completion tokens (a constant
factor for a fixed batch, and the same reduction as the JSD above).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _kl_of_logs(logp, logq):
    """KL(p || q) over the last axis from log-probabilities (0 where p underflows to 0)."""
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def generalized_jsd_of_logprobs(student_logp, teacher_logp, *, beta: float):
    """Per-token generalized JSD [...] from log-probabilities [..., V] (module doc)."""
    if beta == 0.0:
        return _kl_of_logs(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl_of_logs(student_logp, teacher_logp)
    mixture_logp = jnp.logaddexp(student_logp + jnp.log1p(-beta), teacher_logp + jnp.log(beta))
    return (beta * _kl_of_logs(teacher_logp, mixture_logp)
            + (1.0 - beta) * _kl_of_logs(student_logp, mixture_logp))


def generalized_jsd(student_logits_NV, teacher_logits_NV, *, beta: float,
                    temperature: float = 1.0):
    """Per-token generalized JSD [N] from full logits (fp32; the reference)."""
    s = jax.nn.log_softmax(student_logits_NV.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_logits_NV.astype(jnp.float32) / temperature, axis=-1)
    return generalized_jsd_of_logprobs(s, t, beta=beta)


def chunked_generalized_jsd(
    student_hidden_NE, student_head_VE, teacher_hidden_NF, teacher_head_VF, targets_N, *,
    beta: float, temperature: float = 1.0, chunk: int = 256,
):
    """(jsd_N, student_logprob_N, teacher_logprob_N): the generalized JSD of every token and
    the two models' log-probs (at ``temperature``) of ``targets_N``, tile by tile (module
    doc for memory). Gradients flow to the student's hidden states and head; the teacher's
    are constants (stop_gradient)."""
    N = student_hidden_NE.shape[0]
    K = max(1, min(chunk, N))
    n_tiles = -(-N // K)
    pad = n_tiles * K - N
    tiles = lambda x: jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(  # noqa: E731
        n_tiles, K, *x.shape[1:])
    teacher_hidden_NF = jax.lax.stop_gradient(teacher_hidden_NF)
    teacher_head_VF = jax.lax.stop_gradient(teacher_head_VF)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def tile(args):
        hs_KE, ht_KF, tgt_K = args
        logits_s = jnp.einsum("ke,ve->kv", hs_KE, student_head_VE.astype(hs_KE.dtype),
                              preferred_element_type=jnp.float32)
        logits_t = jnp.einsum("kf,vf->kv", ht_KF, teacher_head_VF.astype(ht_KF.dtype),
                              preferred_element_type=jnp.float32)
        s = jax.nn.log_softmax(logits_s / temperature, axis=-1)
        t = jax.nn.log_softmax(logits_t / temperature, axis=-1)
        take = lambda lp: jnp.take_along_axis(lp, tgt_K[:, None], axis=-1)[:, 0]  # noqa: E731
        return generalized_jsd_of_logprobs(s, t, beta=beta), take(s), take(t)

    outs = jax.lax.map(tile, (tiles(student_hidden_NE), tiles(teacher_hidden_NF),
                              tiles(targets_N.astype(jnp.int32))))
    return tuple(o.reshape(-1)[:N] for o in outs)


def reverse_kl_reward_loss(logprobs_RC, old_logprobs_RC, teacher_logprobs_RC, mask_RC, *,
                           coef: float, num_items):
    """(loss, metrics) of the per-token reverse-KL reward (module doc): the sum over masked
    tokens of ``-A_t * exp(logp - old)`` divided by ``num_items`` (the batch's completion
    tokens). ``old_logprobs_RC`` None: the rollout is used once, old = stop_gradient(logp)
    (ratio 1, the gradient is REINFORCE's)."""
    old = jax.lax.stop_gradient(logprobs_RC if old_logprobs_RC is None else old_logprobs_RC)
    teacher = jax.lax.stop_gradient(teacher_logprobs_RC)
    advantages_RC = coef * (teacher - old)
    ratio_RC = jnp.exp(logprobs_RC - old)
    mask = mask_RC.astype(jnp.float32)
    denom = jnp.maximum(num_items, 1.0)
    loss = -jnp.sum(mask * ratio_RC * advantages_RC) / denom
    metrics = {"distill/reverse_kl": jnp.sum(mask * (old - teacher)) / denom,
               "distill/advantage": jnp.sum(mask * advantages_RC) / denom}
    return loss, metrics
