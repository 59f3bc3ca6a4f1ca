"""KTO: unpaired rows (prompt, completion, desirable or not) -> one policy forward over each
row and its mismatched pair -> ``jaxpt.losses.kto.kto_loss`` against a frozen reference.

Axis legend: B rows in the optimizer step's batch, b rows in one micro-batch (B / k).

Data (``jaxpt.data.unpaired``): TRL's unpaired format (``prompt`` / ``completion`` /
``label``, standard or conversational), or paired rows unpaired as TRL does (hh-rlhf pairs
become a desirable and an undesirable row). Each row is paired with the completion of
another row for KTO's reference point z0, fixed per row as TRL's KTOTrainer does (rotation
by one within chunks of ``train.batch_size`` rows per process in data order; with
``data.shuffle: false`` and ``grad_accum: 1`` a batch's mismatched completions are exactly
its own completions, TRL's sequential-sampler setting; shuffled, they are other rows' of the
same data). A row is a preference pair of ``jaxpt.data.pairs`` (chosen = its completion,
rejected = the mismatched one), so the flat and shared-prompt layouts, the loaders and the
reference scoring (online on ``state.frozen``, or precomputed once, ``RefLogps`` [B] per
side) are DPO's.

The loss of a micro-batch runs the policy ONCE over both sequences of its rows (the shared
layout puts the prompt through the decoder once); the mismatched side's log-probs are
gradient-stopped (TRL computes them under ``no_grad``; here they ride in the same forward,
whose backward then also covers that side). ``kto_loss`` normalizes by whole-batch counts
(``stats``), so micro-batches sum to the step's mean loss and metrics; z0 is each
micro-batch's, a mean over its rows on all devices (TRL: per device batch, gathered across
processes). Metrics use TRL's names: ``kl``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``entropy`` (desirable and
undesirable completions, not the mismatched ones), plus ``count/chosen`` /
``count/rejected``; TRL's ``logits/chosen`` (mean logit over the vocab) is not logged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.algorithms.dpo import DPOSource
from jaxpt.config import register_section
from jaxpt.data.pairs import SHARE_PROMPT, PairLayout, PairRows, SharedPairRows
from jaxpt.data.pipeline import INDEX_KEY
from jaxpt.engine.logprobs import pair_token_logprobs
from jaxpt.losses.kto import KTOLossConfig, kto_loss
from jaxpt.rl.scoring import RefLogps


@register_section("kto")
@dataclasses.dataclass(frozen=True)
class KTOSection(KTOLossConfig):
    """The ``kto:`` section (TRL ``KTOConfig`` names): the loss (``KTOLossConfig``: ``beta``,
    ``desirable_weight``, ``undesirable_weight``, ``loss_type`` kto | apo_zero_unpaired) and

    precompute_ref_logps: the reference log-probs of every row and its mismatched pair in
      one pass before training; no reference model during training.
    eval_holdout: hold out the last N rows of ``data.train`` (before unpairing) as the
      evaluation set, never trained on (instead of ``data.eval``).
    share_prompt: auto | always | never: one row per example, [prompt | completion |
      mismatched completion] (``jaxpt.data.pairs``).
    """

    precompute_ref_logps: bool = False
    eval_holdout: int = 0
    share_prompt: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.share_prompt not in SHARE_PROMPT:
            raise ValueError(f"share_prompt: {self.share_prompt!r}; use 'auto', 'always' or "
                             "'never'")
        if self.eval_holdout < 0:
            raise ValueError(f"eval_holdout: must be >= 0, got {self.eval_holdout}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KTOBatch:
    """A step's rows as pairs (chosen = the row's completion, rejected = its mismatched
    completion), ``label`` [B] (1.0 desirable), and the reference's summed log-probs of both
    (None until the online reference is attached)."""

    pairs: PairRows | SharedPairRows
    label: Any
    ref: RefLogps | None = None

    def num_tokens(self) -> int:
        """Non-padding tokens of this process's rows (``Trainer.tokens_fn``)."""
        return self.pairs.num_tokens()


# ----------------------------------------------------------------------------- the math


def kto_batch_stats(state, batch: KTOBatch) -> dict[str, jax.Array]:
    """Whole-batch counts every micro-batch normalizes by."""
    own, _ = batch.pairs.trained()
    desirable = jnp.sum(batch.label > 0.5, dtype=jnp.float32)
    rows = jnp.float32(batch.label.shape[0])
    return {"num_rows": rows, "num_desirable": desirable, "num_undesirable": rows - desirable,
            "num_completion_tokens": jnp.sum(own, dtype=jnp.float32)}


def row_logps(model, pairs, *, impl="auto", with_entropy=False):
    """(own log-probs [b], mismatched log-probs [b] (gradient-stopped), entropy summed over
    the own completions' tokens or None): one forward over both sequences of every row."""
    lp_2bT, ent_2bT, _, mask_2bT = pair_token_logprobs(model, pairs, impl=impl,
                                                       with_entropy=with_entropy)
    logps_b2 = jnp.sum(jnp.where(mask_2bT, lp_2bT, 0.0), axis=-1).reshape(-1, 2)
    entropy = None
    if ent_2bT is not None:
        own_rows = (jnp.arange(mask_2bT.shape[0]) % 2 == 0)[:, None]
        entropy = jnp.sum(jnp.where(mask_2bT & own_rows, jax.lax.stop_gradient(ent_2bT), 0.0))
    return logps_b2[:, 0], jax.lax.stop_gradient(logps_b2[:, 1]), entropy


def make_kto_loss_fn(graphdef, loss_cfg: KTOLossConfig, *, impl="auto", with_entropy=False):
    """``loss_fn(model_params, micro_batch, rng, stats) -> (loss, metrics)`` for
    ``make_train_step``: ``kto_loss`` of the micro-batch normalized by the step's counts."""

    def loss_fn(params, mb: KTOBatch, rng, stats):
        del rng  # no sampling in the loss (LoRA dropout gets its own key)
        logps, kl_logps, entropy = row_logps(nnx.merge(graphdef, params), mb.pairs, impl=impl,
                                             with_entropy=with_entropy)
        loss, metrics = kto_loss(loss_cfg, logps, mb.ref.chosen, mb.label, kl_logps,
                                 mb.ref.rejected, num_rows=stats["num_rows"],
                                 num_desirable=stats["num_desirable"],
                                 num_undesirable=stats["num_undesirable"])
        if entropy is not None:
            metrics["entropy"] = entropy / jnp.maximum(stats["num_completion_tokens"], 1.0)
        return loss, metrics

    return loss_fn


def make_kto_eval_step(graphdef, params_fn, loss_cfg: KTOLossConfig, *, impl: str = "auto"):
    """``eval_step(state, batch) -> metrics``: ``kto_loss`` and its metrics under the current
    policy (means over the batch's rows)."""

    def eval_step(state, batch: KTOBatch):
        model = nnx.merge(graphdef, params_fn(state.params, state.frozen, None))
        logps, kl_logps, _ = row_logps(model, batch.pairs, impl=impl)
        loss, metrics = kto_loss(loss_cfg, logps, batch.ref.chosen, batch.label, kl_logps,
                                 batch.ref.rejected)
        return {"loss": loss, **metrics}

    return eval_step


# ----------------------------------------------------------------------------- batches


class KTOSource(DPOSource):
    """The loader's dicts -> device :class:`KTOBatch`s: labels looked up by each row's
    ``example_index``, reference log-probs from ``table`` [N, 2] or computed by ``ref_fn``
    on ``state.frozen`` once the rows are on the devices (``DPOSource``)."""

    def __init__(self, loader, layout: PairLayout, labels: np.ndarray, batch_sh: KTOBatch, *,
                 ref_fn=None, table=None):
        super().__init__(loader, layout, batch_sh, ref_fn=ref_fn, table=table)
        self.labels = labels

    def host_batch(self, host: dict, ref: RefLogps | None) -> KTOBatch:
        return KTOBatch(self.layout.rows.from_dict(host), self.labels[host[INDEX_KEY]], ref)
