"""Online DPO: per prompt, two completions from the current policy, ranked by the reward
functions, then a DPO-family loss (``jaxpt.losses.dpo``) against the frozen reference.

Axis legend: B prompts (pairs) of a step, R = 2B rollout rows, C completion length.

Follows TRL's ``OnlineDPOTrainer.training_step`` (trl/experimental/online_dpo/
online_dpo_trainer.py, TRL 1.10): two samples per prompt (``jaxpt.rl``'s RolloutSampler and
RolloutSource with ``num_generations`` 2, so sampling, rewards, prompts and held-out
evaluation are GRPO's), rewards summed over the reward functions (verifiers, user
functions), ``missing_eos_penalty`` subtracted from the reward of every completion with no
end-of-sequence token, then the higher reward is chosen. Log-probs are at temperature 1
(TRL scores the sampled tokens with the plain softmax whatever the sampling temperature).

Where jaxpt differs: TRL ranks ``first >= second``, so a tied pair (e.g. both answers right,
or both wrong, under a 0/1 verifier) is trained with the first sample as chosen. Here a tied
pair, or one whose total reward is NaN (every reward function returned None), is masked out
of the loss and counted (``pairs/tied_frac``), since it carries no preference; the loss is
the mean over the untied pairs of the step (0, with no gradient, when every pair ties).
``train_on_ties: true`` trains them as TRL does.

Each step samples its own pairs (TRL: one optimizer step per generation), so
``num_iterations`` and ``steps_per_generation`` stay 1; the rollout rows of a pair are put
chosen first, and the train step packs each pair as one shared-prompt row where it can
(``share_prompt``). Metrics with TRL's names: ``objective/kl`` (mean over completions of the
summed log-ratio to the reference), ``objective/entropy`` (minus the mean summed log-prob),
``objective/non_score_reward`` (-beta * kl), ``objective/scores``,
``objective/scores_margin``, ``val/contain_eos_token``, and ``jaxpt.losses.dpo``'s
``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected`` (over the trained pairs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.config import register_section
from jaxpt.losses.dpo import DPOLossConfig, dpo_loss
from jaxpt.rl import layout
from jaxpt.rl.config import OnPolicySection
from jaxpt.rl.layout import GroupRows, TokenRows


@register_section("online_dpo")
@dataclasses.dataclass(frozen=True)
class OnlineDPOSection(OnPolicySection):
    """Online DPO settings (TRL ``OnlineDPOConfig`` names and defaults where TRL has them):
    the rollout / prompt / reward keys of every on-policy algorithm
    (``jaxpt.rl.config.OnPolicySection``; ``num_generations`` is 2), the DPO loss
    (``loss_type``, ``loss_weights``, ``beta``, ``label_smoothing``: ``DPOLossConfig``),
    ``missing_eos_penalty`` and ``train_on_ties`` (module doc)."""

    num_generations: int = 2
    temperature: float = 0.9
    loss_type: str | tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    missing_eos_penalty: float | None = None
    train_on_ties: bool = False

    def __post_init__(self):
        if self.num_generations != 2:
            raise ValueError(f"online_dpo.num_generations={self.num_generations}: online DPO "
                             "ranks two completions per prompt; it must be 2")
        if self.num_iterations != 1 or self.steps_per_generation != 1:
            raise ValueError("online_dpo.num_iterations and steps_per_generation must be 1 "
                             "(each step trains on pairs sampled from the current policy)")
        if self.dynamic_sampling:
            raise ValueError("online_dpo.dynamic_sampling is not supported (tied pairs are "
                             "masked and counted instead)")
        if self.missing_eos_penalty is not None and not math.isfinite(self.missing_eos_penalty):
            raise ValueError(f"online_dpo.missing_eos_penalty={self.missing_eos_penalty}: "
                             "must be finite or null")
        try:
            self.loss()
        except ValueError as e:
            raise ValueError(str(e).replace("DPOLossConfig.", "online_dpo.")) from None

    def loss(self) -> DPOLossConfig:
        return DPOLossConfig(loss_type=self.loss_type, loss_weights=self.loss_weights,
                             beta=self.beta, label_smoothing=self.label_smoothing)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OnlineDPOBatch:
    """A step's pairs as rollout rows (``rl.layout``; rows 2i, 2i+1 = chosen, rejected of
    pair i; flat [R, ...] or shared-prompt [B, 2, ...]), ``weight`` [R] (1: the pair is
    trained, 0: tied), the reference's per-token log-probs [R, C]. ``old_logprobs`` is never
    set (no rollout is reused); it is there for ``RolloutSource``."""

    rows: TokenRows | GroupRows
    weight: Any
    ref_logprobs: Any = None
    old_logprobs: Any = None

    @property
    def advantages(self):  # RolloutSource counts rows by it
        return self.weight

    @staticmethod
    def ndims(shared: bool) -> OnlineDPOBatch:
        flat = OnlineDPOBatch(TokenRows(2, 2, 2, 2, 2), 1, 2, None)
        return layout.grouped_ndims(flat) if shared else flat


# ----------------------------------------------------------------------------- pairs


def contains_eos(rows: TokenRows, eos_ids) -> np.ndarray:
    """[R] bool: the completion holds an end-of-sequence token (TRL's ``contain_eos_token``)."""
    P, C = rows.widths
    real_RC = np.asarray(rows.segment_ids)[:, P:] > 0
    return np.any(np.isin(np.asarray(rows.input_ids)[:, P:], list(eos_ids)) & real_RC, axis=1)


def rank_pairs(rewards_R: np.ndarray, *, train_on_ties: bool):
    """(order [R]: the rows chosen first within each pair, weight [R], tied [B]) from the
    rewards of R = 2B rows (rows 2i, 2i+1 sampled for prompt i). The first sample is chosen
    when ``first >= second`` (TRL); a tie or a NaN reward gets weight 0 unless
    ``train_on_ties`` (a NaN reward is never trained)."""
    r_B2 = np.asarray(rewards_R, np.float64).reshape(-1, 2)
    nan_B = np.isnan(r_B2).any(axis=1)
    first_B = ~(r_B2[:, 1] > r_B2[:, 0])  # first >= second (a NaN pair keeps its order)
    tied_B = (r_B2[:, 0] == r_B2[:, 1]) | nan_B
    keep_B = ~nan_B if train_on_ties else ~tied_B
    order_B2 = np.where(first_B[:, None], [0, 1], [1, 0]) + 2 * np.arange(len(r_B2))[:, None]
    return order_B2.reshape(-1), np.repeat(keep_B.astype(np.float32), 2), tied_B


def make_pair_batch(rollout, eos_ids, section: OnlineDPOSection) -> tuple[OnlineDPOBatch, dict]:
    """The rollout's rows ranked into pairs (module doc) and the host metrics of the ranking:
    ``objective/scores`` (mean reward after the EOS penalty), ``objective/scores_margin``
    (mean chosen minus rejected reward over pairs with finite rewards),
    ``val/contain_eos_token``, ``pairs/tied_frac``."""
    rewards = np.asarray(rollout.rewards_R, np.float64).copy()
    has_eos = contains_eos(rollout.rows, eos_ids)
    if section.missing_eos_penalty is not None:
        rewards[~has_eos] -= section.missing_eos_penalty
    order, weight, tied = rank_pairs(rewards, train_on_ties=section.train_on_ties)
    rows = jax.tree.map(lambda v: np.asarray(v)[order], rollout.rows)
    ranked = rewards[order].reshape(-1, 2)
    margin = ranked[:, 0] - ranked[:, 1]
    finite = np.isfinite(margin)
    metrics = {
        "objective/scores": float(np.nanmean(rewards)) if np.isfinite(rewards).any() else 0.0,
        "objective/scores_margin": float(margin[finite].mean()) if finite.any() else 0.0,
        "val/contain_eos_token": float(has_eos.mean()),
        "pairs/tied_frac": float(tied.mean()),
    }
    return OnlineDPOBatch(rows, weight), metrics


# ----------------------------------------------------------------------------- the math


def batch_stats(state, batch: OnlineDPOBatch) -> dict[str, jax.Array]:
    b = layout.per_row_view(batch)
    return {"rows": jnp.float32(b.weight.shape[0]),
            "trained_pairs": jnp.sum(b.weight, dtype=jnp.float32) / 2}


def make_online_dpo_loss_fn(graphdef, section: OnlineDPOSection, *, impl: str):
    """``loss_fn(params, micro_batch, rng, stats)``: ``dpo_loss`` of each pair (rows chosen
    first), weighted (ties 0) and summed over the step's trained pairs; objective metrics over
    its rows. Every value is divided by whole-batch counts, so micro-batches add up."""
    loss_cfg = section.loss()

    def one_pair(c, r, rc, rr, lc, lr):
        return dpo_loss(loss_cfg, c[None], r[None], rc[None], rr[None], lc[None], lr[None])

    def loss_fn(params, batch: OnlineDPOBatch, rng, stats):
        del rng
        model = nnx.merge(graphdef, params)
        lp_RC, _ = layout.completion_token_logprobs(model, batch.rows, impl=impl)
        b = layout.per_row_view(batch)
        mask_RC = batch.rows.completion_mask_RC > 0
        seq_R = jnp.sum(jnp.where(mask_RC, lp_RC, 0.0), axis=1)
        ref_R = jnp.sum(jnp.where(mask_RC, b.ref_logprobs, 0.0), axis=1)
        len_R = jnp.maximum(jnp.sum(mask_RC, axis=1, dtype=jnp.float32), 1.0)
        pair = lambda x: x.reshape(-1, 2)  # noqa: E731
        s, ref, n, w = pair(seq_R), pair(ref_R), pair(len_R), pair(b.weight)[:, 0]
        loss_B, m_B = jax.vmap(one_pair)(s[:, 0], s[:, 1], ref[:, 0], ref[:, 1], n[:, 0], n[:, 1])
        trained = jnp.maximum(stats["trained_pairs"], 1.0)
        loss = jnp.sum(w * loss_B) / trained
        metrics = {k: jnp.sum(w * v) / trained for k, v in m_B.items() if k != "loss"}
        kl = jnp.sum(jax.lax.stop_gradient(seq_R) - ref_R) / stats["rows"]
        metrics.update({
            "objective/kl": kl,
            "objective/entropy": -jnp.sum(jax.lax.stop_gradient(seq_R)) / stats["rows"],
            "objective/non_score_reward": -loss_cfg.beta * kl,
        })
        return loss, metrics

    return loss_fn
