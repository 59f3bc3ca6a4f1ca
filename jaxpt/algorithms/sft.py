"""SFT trainer: token-level NLL on completion / assistant tokens, packed batches.

Axis legend: B rows, T tokens, E hidden.

Variants (``sft:`` section):
  * Masked Thought (``masked_thought: p``): each response *input* token (a token that is
    itself a training target, i.e. ``loss_mask`` at the previous position) is replaced by
    ``mask_token_id`` with probability p; targets and loss mask are unchanged.
  * NEFTune (``neftune_alpha: a``): uniform noise in +-a/sqrt(T*E) is added to the input
    embeddings during training (not in evaluation).

Batch: :class:`SFTBatch`, the token rows of ``jaxpt.data.packing`` (packed or padded). The
loader yields them as dicts; ``put`` in ``build_sft_trainer`` converts them where they go
to the devices (train and eval alike).

Loss (``jaxpt.losses.sft.sft_loss``): the sum of -log p over every target token of the
optimizer step's batch divided by that batch's target-token count (all micro-batches), so
accumulation equals one full batch. ``mean_token_accuracy`` and ``entropy`` are means over
the same target tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpt.config import SFTConfig
from jaxpt.data import BATCH_KEYS
from jaxpt.engine.logprobs import sequence_token_logprobs
from jaxpt.losses.sft import sft_loss


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SFTBatch:
    """The SFT step's batch: the ``jaxpt.data.packing`` row contract, every field [B, T]."""

    input_ids: Any  # int32
    targets: Any  # int32: the next token in the same segment, else 0
    loss_mask: Any  # float32: 1 where ``targets`` is trained
    positions: Any  # int32: restart at 0 in every segment
    segment_ids: Any  # int32: 1, 2, ... per packed example, 0 on padding


# Each field's ndim, for ``batch_shardings``.
SFT_BATCH_NDIMS = SFTBatch(**{k: 2 for k in BATCH_KEYS})


def sft_batch_stats(state, batch: SFTBatch) -> dict[str, jax.Array]:
    """Whole-batch statistics every micro-batch normalizes by."""
    return {"num_target_tokens": jnp.sum(batch.loss_mask > 0, dtype=jnp.float32)}


def mask_response_inputs(ids_BT, loss_mask_BT, rng, p: float, mask_token_id: int):
    """Masked Thought: replace response input tokens with ``mask_token_id`` w.p. ``p``.
    Token t is a response input iff it is the target of position t-1 (loss_mask[t-1])."""
    response_BT = jnp.pad(loss_mask_BT[:, :-1] > 0, ((0, 0), (1, 0)))
    drop_BT = jax.random.bernoulli(rng, p, ids_BT.shape) & response_BT
    return jnp.where(drop_BT, jnp.asarray(mask_token_id, ids_BT.dtype), ids_BT)


def neftune_embeddings(model, ids_BT, rng, alpha: float):
    """Input embeddings plus uniform noise of magnitude alpha / sqrt(T * E)."""
    x_BTE = model.embed(ids_BT)
    T, E = x_BTE.shape[1:]
    mag = alpha / math.sqrt(T * E)
    noise = jax.random.uniform(rng, x_BTE.shape, jnp.float32, -mag, mag)
    return (x_BTE.astype(jnp.float32) + noise).astype(x_BTE.dtype)


def make_sft_loss_fn(
    graphdef,
    sft: SFTConfig,
    *,
    impl: str = "auto",
    with_entropy: bool = True,
    with_accuracy: bool = True,
    mask_token_id: int | None = None,
):
    """``loss_fn(model_params, micro_batch, rng, stats) -> (loss, metrics)`` for
    ``make_train_step``; every value is normalized by ``stats["num_target_tokens"]``."""

    def loss_fn(params, mb: SFTBatch, rng, stats):
        model = nnx.merge(graphdef, params)
        r_mask, r_noise = jax.random.split(rng)
        ids_BT = mb.input_ids
        if sft.masked_thought > 0:
            ids_BT = mask_response_inputs(
                ids_BT, mb.loss_mask, r_mask, sft.masked_thought, mask_token_id
            )
        emb_BTE = None
        if sft.neftune_alpha:
            emb_BTE = neftune_embeddings(model, ids_BT, r_noise, sft.neftune_alpha)
        lp_BT, ent_BT, correct_BT = sequence_token_logprobs(
            model,
            {**vars(mb), "input_ids": ids_BT},
            impl=impl,
            with_entropy=with_entropy,
            with_accuracy=with_accuracy,
            input_embeddings_BTE=emb_BTE,
            valid_BT=mb.loss_mask > 0,  # the LM head runs on target tokens only
        )
        total = stats["num_target_tokens"]
        loss, m = sft_loss(
            lp_BT,
            mb.loss_mask,
            num_target_tokens=total,
            correct_BT=correct_BT,
            entropy_BT=ent_BT,
        )
        # Re-weight this micro-batch's means by its share of the whole batch's targets, so
        # the sum over micro-batches is the whole-batch mean.
        share = m["num_tokens"] / jnp.maximum(total, 1.0)
        metrics = {"num_target_tokens": m["num_tokens"]}
        for k in ("mean_token_accuracy", "entropy"):
            if k in m:
                metrics[k] = m[k] * share
        return loss, metrics

    return loss_fn


def make_sft_eval_step(graphdef, params_fn, *, impl, with_entropy, with_accuracy):
    """``eval_step(state, batch) -> sums`` (nll, target tokens, correct, entropy)."""

    def eval_step(state, batch: SFTBatch):
        model = nnx.merge(graphdef, params_fn(state.params, state.frozen, None))
        mask = batch.loss_mask > 0
        lp_BT, ent_BT, correct_BT = sequence_token_logprobs(
            model,
            vars(batch),
            impl=impl,
            with_entropy=with_entropy,
            with_accuracy=with_accuracy,
            valid_BT=mask,
        )
        out = {
            "nll": jnp.sum(jnp.where(mask, -lp_BT, 0.0)),
            "n": jnp.sum(mask, dtype=jnp.float32),
        }
        if correct_BT is not None:
            out["correct"] = jnp.sum(jnp.where(mask, correct_BT, False), dtype=jnp.float32)
        if ent_BT is not None:
            out["entropy"] = jnp.sum(jnp.where(mask, ent_BT, 0.0))
        return out

    return eval_step


def default_mask_token_id(tokenizer, sft: SFTConfig) -> int | None:
    if sft.masked_thought <= 0:
        return None
    if sft.mask_token_id is not None:
        return sft.mask_token_id
    for tid in (getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "pad_token_id", None)):
        if tid is not None:
            return int(tid)
    raise ValueError("sft.masked_thought needs sft.mask_token_id (the tokenizer has no unk/pad)")
