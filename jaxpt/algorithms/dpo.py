"""DPO: preference pairs -> one policy forward over chosen + rejected -> a DPO-family loss.

Axis legend: B pairs in the optimizer step's batch, b pairs in one micro-batch (B / k),
T tokens per row, C trained tokens per side (shared layout), E hidden.

The batch (:class:`DPOBatch`) holds the pairs in the run's layout (``jaxpt.data.pairs``:
two padded rows per pair, or one shared-prompt row) and, when the loss needs a reference,
its summed log-probs, computed outside the gradient by the batch source: looked up in a
table made before training (``dpo.precompute_ref_logps``) or by a separate jitted forward of
the reference params just before the step (online). The reference is ``state.frozen``: a
copy of the initial params (full fine-tuning, online), the LoRA base (no copy), or nothing
(precomputed full fine-tuning, reference-free losses ``simpo``, ``orpo``, ``sft``).

The loss of a micro-batch runs the policy ONCE over both sides of its pairs, sums each
side's completion log-probs and hands them to ``jaxpt.losses.dpo.dpo_loss`` (a mean over
the b pairs), scaled by b / B so that the k micro-batches sum to the mean over the B pairs
(loss and every metric). ``entropy`` (all completion tokens) and ``mean_token_accuracy``
(chosen completion tokens, as TRL) are normalized by whole-batch token counts. Metrics use
TRL's names; held-out pairs log them prefixed ``eval_``, averaged over pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpt.config import register_section
from jaxpt.data.pairs import (
    SHARE_PROMPT,
    PairLayout,
    PairRows,
    SharedPairRows,
)
from jaxpt.data.pipeline import INDEX_KEY
from jaxpt.engine.logprobs import pair_logps
from jaxpt.engine.loop import SourceBase
from jaxpt.engine.state import (
    put_batch,
)
from jaxpt.losses.dpo import DPOLossConfig, dpo_loss, needs_reference
from jaxpt.rl.scoring import RefLogps


@register_section("dpo")
@dataclasses.dataclass(frozen=True)
class DPOSection(DPOLossConfig):
    """The ``dpo:`` section (TRL ``DPOConfig`` names where they exist): the loss
    (``DPOLossConfig``; ``loss_type`` may be one name) and

    precompute_ref_logps: the reference log-probs of every training (and held-out) pair in
      one pass before training; no reference model during training.
    eval_holdout: hold out the last N rows of ``data.train`` (after ``max_train_rows``) as
      the evaluation set, never trained on (instead of ``data.eval``).
    share_prompt: auto | always | never: one row per pair (``jaxpt.data.pairs``).
    """

    loss_type: str | tuple[str, ...] = ("sigmoid",)
    precompute_ref_logps: bool = False
    eval_holdout: int = 0
    share_prompt: str = "auto"

    def __post_init__(self):
        try:
            super().__post_init__()
        except (TypeError, ValueError) as e:  # here DPOLossConfig.<key> is dpo.<key>
            raise ValueError(str(e).replace("DPOLossConfig.", "")) from None
        if self.share_prompt not in SHARE_PROMPT:
            raise ValueError(
                f"share_prompt: {self.share_prompt!r}; use 'auto', 'always' or 'never'"
            )
        if self.eval_holdout < 0:
            raise ValueError(f"eval_holdout: must be >= 0, got {self.eval_holdout}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DPOBatch:
    """The DPO step's batch: the pairs in the run's layout and the reference log-probs, None
    when the loss needs none (and until the online reference is attached)."""

    pairs: PairRows | SharedPairRows
    ref: RefLogps | None = None

    def num_tokens(self) -> int:
        """Non-padding tokens of this process's rows (``Trainer.tokens_fn``)."""
        return self.pairs.num_tokens()


# ----------------------------------------------------------------------------- the math


def dpo_batch_stats(state, batch: DPOBatch) -> dict[str, jax.Array]:
    """Whole-batch counts every micro-batch normalizes by."""
    c, r = batch.pairs.trained()
    return {
        "num_pairs": jnp.float32(c.shape[0]),
        "num_completion_tokens": jnp.sum(c, dtype=jnp.float32) + jnp.sum(r, dtype=jnp.float32),
        "num_chosen_tokens": jnp.sum(c, dtype=jnp.float32),
    }


def pair_loss(loss_cfg: DPOLossConfig, out, ref: RefLogps | None):
    """``dpo_loss`` of ``pair_logps``'s ``out`` against the reference log-probs (a config that
    needs them and gets ``ref`` None fails there, naming its loss types)."""
    ref_c, ref_r = (ref.chosen, ref.rejected) if needs_reference(loss_cfg) and ref else (None,) * 2
    return dpo_loss(loss_cfg, out["chosen_logps"], out["rejected_logps"], ref_c, ref_r,
                    out["chosen_lengths"], out["rejected_lengths"])


def make_dpo_loss_fn(graphdef, loss_cfg, *, impl="auto", with_entropy=False, with_accuracy=False):
    """``loss_fn(model_params, micro_batch, rng, stats) -> (loss, metrics)`` for
    ``make_train_step``: the micro-batch's ``dpo_loss`` (a mean over its b pairs) scaled by
    b / ``stats["num_pairs"]``, metrics likewise; token metrics over whole-batch counts."""

    def loss_fn(params, mb: DPOBatch, rng, stats):
        del rng  # DPO has no sampling in the loss (LoRA dropout gets its own key)
        kw = dict(impl=impl, with_entropy=with_entropy, with_accuracy=with_accuracy)
        out = pair_logps(nnx.merge(graphdef, params), mb.pairs, **kw)
        loss, m = pair_loss(loss_cfg, out, mb.ref)
        share = out["chosen_logps"].shape[0] / stats["num_pairs"]
        metrics = {k: v * share for k, v in m.items() if k != "loss"}
        if "entropy_sum" in out:
            tokens = jnp.maximum(stats["num_completion_tokens"], 1.0)
            metrics["entropy"] = out["entropy_sum"] / tokens
        if "chosen_correct" in out:
            tokens = jnp.maximum(stats["num_chosen_tokens"], 1.0)
            metrics["mean_token_accuracy"] = out["chosen_correct"] / tokens
        return loss * share, metrics

    return loss_fn


def make_dpo_eval_step(graphdef, params_fn, loss_cfg: DPOLossConfig, *, impl: str = "auto"):
    """``eval_step(state, batch) -> metrics``: ``dpo_loss``'s metrics (means over the batch's
    pairs) under the current policy."""

    def eval_step(state, batch: DPOBatch):
        model = nnx.merge(graphdef, params_fn(state.params, state.frozen, None))
        return pair_loss(loss_cfg, pair_logps(model, batch.pairs, impl=impl), batch.ref)[1]

    return eval_step


# ----------------------------------------------------------------------------- batches


class DPOSource(SourceBase):
    """The preference loader's dicts -> device :class:`DPOBatch`s in ``layout``, with the
    reference log-probs looked up in ``table`` [N, 2] by the pairs' ``example_index``, or
    computed by ``ref_fn`` on ``state.frozen`` once the rows are on the devices, or none."""

    def __init__(self, loader, layout: PairLayout, batch_sh: DPOBatch, *, ref_fn=None, table=None):
        self.iterator, self.layout, self.ref_fn, self.table = iter(loader), layout, ref_fn, table
        self.put_sh = dataclasses.replace(batch_sh, ref=None) if ref_fn else batch_sh

    def host_batch(self, host: dict, ref: RefLogps | None):
        """The typed batch of a loader dict (a subclass may add per-row fields: KTO)."""
        return DPOBatch(self.layout.rows.from_dict(host), ref)

    def next(self, state) -> DPOBatch:
        host = next(self.iterator)
        ref = None
        if self.table is not None:
            logps = self.table[host[INDEX_KEY]]
            ref = RefLogps(logps[:, 0], logps[:, 1])
        batch = put_batch(self.host_batch(host, ref), self.put_sh)
        if self.ref_fn is not None:
            batch = dataclasses.replace(batch, ref=self.ref_fn(state.frozen, batch.pairs))
        return batch

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.iterator.set_state(state)
