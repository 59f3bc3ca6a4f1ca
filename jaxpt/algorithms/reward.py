"""Reward model: preference pairs -> a decoder with a scalar head -> the Bradley-Terry loss.

Axis legend: B pairs in the optimizer step's batch, b pairs in one micro-batch (B / k),
T tokens per row, E hidden.

The model is the run's decoder plus ``score`` [1, E] (``jaxpt.models.scalar_head``), read
at each row's last non-pad token as transformers' ``XForSequenceClassification`` reads it.
Both are trained, as two param groups of one state (``"model"`` and ``"score"``, one
optimizer config each: ``cfg.optim``, the head's lr ``reward.head_lr`` when set); with
``lora.rank`` the decoder trains through its adapters and the head in full (TRL's advice:
``modules_to_save=["score"]``).

Data: TRL ``RewardTrainer``'s preference formats through the DPO data path
(``jaxpt.data.pairs``): explicit ``prompt`` / ``chosen`` / ``rejected`` or implicit prompt,
conversational or plain text, and an optional ``margin`` column. Each side is one row
prompt + completion in the flat layout (``PairRows``), padded with the pad id the scores
are read with (the tokenizer's pad token, else EOS, as TRL). jaxpt differs from TRL in how
the row is cut: prompt and completion are tokenized apart (``tokenize_preference``; a
conversational completion ends at its end-of-turn), TRL renders prompt + completion as one
conversation; and long pairs are truncated per ``data.truncation`` where TRL drops them.

Loss (TRL ``trl/trainer/reward_trainer.py``, ``RewardTrainer.compute_loss``), a mean over
the pairs, with r_c, r_r the chosen / rejected scores and m the margin column (0 without)::

    -log sigmoid(r_c - r_r - m) + center_rewards_coefficient * mean((r_c + r_r)^2)

Each micro-batch's mean is scaled by b / B so the k micro-batches sum to the batch mean.
Metrics, TRL's names: ``accuracy`` (r_c > r_r), ``margin`` (r_c - r_r), ``mean_reward``,
``min_reward``, ``max_reward`` (over both sides); min / max are per micro-batch and averaged
over micro-batches, as TRL averages the values its ``compute_loss`` logged. Held-out pairs
log the same, prefixed ``eval_`` (``eval_accuracy`` ...), averaged over eval batches.

``jaxpt export RUN OUT`` writes an ``AutoModelForSequenceClassification`` checkpoint
(``jaxpt.trainers.reward.export_reward_checkpoint``); ``reward_funcs: ["rm:OUT"]``
scores completions with it.
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
from jaxpt.data.packing import collate_preference
from jaxpt.data.pairs import PairRows
from jaxpt.engine.loop import IteratorSource
from jaxpt.engine.state import (
    put_batch,
)
from jaxpt.models.scalar_head import (
    sequence_scores,
)

MODEL, HEAD = "model", "score"  # the two param groups


@register_section("reward")
@dataclasses.dataclass(frozen=True)
class RewardSection:
    """The ``reward:`` section (TRL ``RewardConfig`` names where they exist).

    center_rewards_coefficient: weight of mean((r_c + r_r)^2), which pulls the scores
      toward mean zero (Eisenstein et al. 2023); None (TRL's default) adds nothing.
    eval_holdout: hold out the last N rows of ``data.train`` (after ``max_train_rows``) as
      the evaluation set, never trained on (instead of ``data.eval``).
    head_lr: the score head's peak learning rate (its group's ``optim`` otherwise the
      same); None (TRL: one lr for all) uses ``optim.lr``. A new head starts random, so a
      larger lr lets a short run align it with the decoder's features.
    """

    center_rewards_coefficient: float | None = None
    eval_holdout: int = 0
    head_lr: float | None = None

    def __post_init__(self):
        c = self.center_rewards_coefficient
        if c is not None and (isinstance(c, bool) or not math.isfinite(c) or c < 0):
            raise ValueError(f"center_rewards_coefficient: must be a number >= 0 or null, got {c}")
        if self.eval_holdout < 0:
            raise ValueError(f"eval_holdout: must be >= 0, got {self.eval_holdout}")
        if self.head_lr is not None and not self.head_lr > 0:
            raise ValueError(f"head_lr: must be > 0 or null, got {self.head_lr}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """The step's batch: each pair's two padded rows and its margin [B] (None when the data
    has no ``margin`` column)."""

    pairs: PairRows
    margin: Any = None

    def num_tokens(self) -> int:
        """Non-padding tokens of this process's rows (``Trainer.tokens_fn``)."""
        return self.pairs.num_tokens()


# ----------------------------------------------------------------------------- the math


def bradley_terry_loss(
    chosen_b: jax.Array,
    rejected_b: jax.Array,
    margin_b: jax.Array | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics), means over the b pairs: TRL ``RewardTrainer.compute_loss`` (module
    doc). ``margin_b`` None is a margin of 0."""
    c, r = chosen_b.astype(jnp.float32), rejected_b.astype(jnp.float32)
    diff_b = c - r if margin_b is None else c - r - margin_b.astype(jnp.float32)
    loss = -jnp.mean(jax.nn.log_sigmoid(diff_b))
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * jnp.mean((c + r) ** 2)
    both = jnp.concatenate([c, r])
    metrics = {
        "accuracy": jnp.mean((c > r).astype(jnp.float32)),
        "margin": jnp.mean(c - r),
        "mean_reward": jnp.mean(both),
        "min_reward": jnp.min(both),
        "max_reward": jnp.max(both),
    }
    return loss, metrics


def pair_scores(model, head, pairs: PairRows, *, pad_id: int):
    """(chosen [b], rejected [b]) fp32 scores in one forward: the sides interleaved on the
    batch axis (a reshape, so batch-sharded rows stay on their shard)."""
    two = lambda c, r: jnp.stack([c, r], axis=1).reshape(-1, *c.shape[1:])  # noqa: E731
    c, r = pairs.side("chosen"), pairs.side("rejected")
    both = {k: two(c[k], r[k]) for k in ("input_ids", "positions", "segment_ids")}
    scores_2b = sequence_scores(
        model, head, both["input_ids"], both["positions"], both["segment_ids"], pad_id=pad_id
    )
    scores_b2 = scores_2b.reshape(-1, 2)
    return scores_b2[:, 0], scores_b2[:, 1]


def reward_batch_stats(state, batch: RewardBatch) -> dict[str, jax.Array]:
    return {"num_pairs": jnp.float32(batch.pairs.chosen_input_ids.shape[0])}


def make_reward_loss_fn(graphdef, section: RewardSection, *, pad_id: int):
    """``loss_fn(params, micro_batch, rng, stats) -> (loss, metrics)`` for ``make_train_step``;
    ``params`` = ``{"model": decoder params, "score": head}``."""

    def loss_fn(params, mb: RewardBatch, rng, stats):
        del rng  # no sampling; LoRA dropout gets its own key
        model = nnx.merge(graphdef, params[MODEL])
        chosen_b, rejected_b = pair_scores(model, params[HEAD], mb.pairs, pad_id=pad_id)
        loss, metrics = bradley_terry_loss(
            chosen_b, rejected_b, mb.margin, section.center_rewards_coefficient
        )
        share = chosen_b.shape[0] / stats["num_pairs"]
        return loss * share, {k: v * share for k, v in metrics.items()}

    return loss_fn


def make_reward_eval_step(graphdef, params_fn, section: RewardSection, *, pad_id: int):
    """``eval_step(state, batch) -> metrics`` (``loss`` included), means over the batch."""

    def eval_step(state, batch: RewardBatch):
        params = params_fn(state.params, state.frozen, None)
        chosen_b, rejected_b = pair_scores(
            nnx.merge(graphdef, params[MODEL]), params[HEAD], batch.pairs, pad_id=pad_id
        )
        loss, metrics = bradley_terry_loss(
            chosen_b, rejected_b, batch.margin, section.center_rewards_coefficient
        )
        return {"loss": loss, **metrics}

    return eval_step


# ----------------------------------------------------------------------------- batches


def check_margins(pairs, what: str) -> bool:
    """Whether ``pairs`` carry a margin: all of them or none (ValueError naming ``what``)."""
    have = sum(p.margin is not None for p in pairs)
    if have and have != len(pairs):
        raise ValueError(
            f"{what}: {have} of {len(pairs)} pairs have a 'margin' column; give every row "
            "a margin or none"
        )
    return bool(have)


def pair_collate(length: int, pad_id: int, with_margin: bool):
    """Pairs -> the flat preference batch dict (``collate_preference``), plus ``margin`` [B]."""

    def collate(pairs):
        batch = collate_preference(pairs, length, pad_id=pad_id)
        if with_margin:
            batch["margin"] = np.asarray([p.margin for p in pairs], np.float32)
        return batch

    return collate


class RewardSource(IteratorSource):
    """The preference loader's dicts -> device :class:`RewardBatch`es."""

    def __init__(self, loader, batch_sh: RewardBatch):
        super().__init__(iter(loader))
        self.batch_sh = batch_sh

    def next(self, state) -> RewardBatch:
        host = next(self.iterator)
        batch = RewardBatch(PairRows.from_dict(host), host.get("margin"))
        return put_batch(batch, self.batch_sh)


# ----------------------------------------------------------------------------- export
