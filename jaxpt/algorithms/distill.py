"""On-policy distillation (``algorithm: distill``): the student samples, a frozen teacher
scores the same tokens, and the student is trained towards the teacher token by token.

Axis legend: R rows of a step, P prompt length, C completion length, E / F the student's /
teacher's hidden size, V vocab.

Each sampling round is, with probability ``lmbda`` (TRL's GKD ``lmbda``, drawn per round
from a seeded stream so a resume draws the same), on-policy: completions sampled from the
current student (``jaxpt.rl.rollout.RolloutSampler``, rewards logged but not trained on);
otherwise off-policy: the dataset's completions (the prompts' ``completion`` column, the
worked answers of GSM8K and of the arithmetic task). The rows are the flat rollout rows of
``jaxpt.rl.layout`` either way, so both kinds have one compiled step.

The teacher (``distill.teacher``: a model name or path, loaded like ``model.name``; any size
or architecture that uses the student's tokenizer, checked before its weights are read) is
held in ``state.frozen["teacher"]`` in the training shardings; it gets no gradient, no
optimizer state and no checkpoint (it is reloaded from its name on resume). The loss
(``distill.loss``, ``jaxpt.losses.distill``):

- ``gjsd``: TRL's GKDTrainer loss: the generalized Jensen-Shannon divergence with ``beta``
  between the two models' next-token distributions at every completion position, over the
  whole vocabulary, computed tile by tile (``distill.chunk_size`` positions at a time,
  rematerialized: never the N x V logits of either model), summed over completion tokens
  and divided by the batch's completion tokens.
- ``reverse_kl_reward``: Thinking Machines' on-policy distillation: the teacher's log-prob of
  each sampled token minus the student's is that token's advantage (times ``kl_coef``) in
  an importance-sampling policy gradient; it needs the student's own samples (``lmbda: 1``).

Not in TRL's GKD here: ``seq_kd`` (training on teacher samples). The shared-prompt layout
is not used (the teacher forward and the tiles read flat rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.config import register_section
from jaxpt.data.pipeline import prompt_batch
from jaxpt.losses import distill as losses
from jaxpt.rl import layout
from jaxpt.rl.config import OnPolicySection
from jaxpt.rl.hybrids import Demonstrations
from jaxpt.rl.layout import TokenRows
from jaxpt.rl.source import RolloutSource


@register_section("distill")
@dataclasses.dataclass(frozen=True)
class DistillSection(OnPolicySection):
    """Distillation settings; names follow TRL's GKDConfig (``lmbda``, ``beta``,
    ``temperature``: the sampling temperature, TRL's default 0.9) and tinker-cookbook's
    on-policy distillation (``kl_coef`` = its ``kl_penalty_coef``). Prompts, rollouts and
    the held-out evaluation are the keys of every on-policy algorithm
    (``jaxpt.rl.config.OnPolicySection``); ``reward_funcs`` are logged, never trained on."""

    teacher: str | None = None  # model name or path (as model.name); same tokenizer
    loss: Literal["gjsd", "reverse_kl_reward"] = "gjsd"
    beta: float = 0.5  # gjsd: 0 = KL(teacher || student), 1 = KL(student || teacher)
    lmbda: float = 0.5  # fraction of sampling rounds that are on-policy
    loss_temperature: float = 1.0  # gjsd: softmax temperature of both models in the loss
    kl_coef: float = 1.0  # reverse_kl_reward: advantage = kl_coef * (teacher - student)
    chunk_size: int = 256  # gjsd: completion positions per tile
    num_generations: int = 1  # completions per prompt (GKD samples one)
    temperature: float = 0.9

    def __post_init__(self):
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"distill.beta={self.beta}: must be in [0, 1]")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"distill.lmbda={self.lmbda}: must be in [0, 1]")
        if self.loss_temperature <= 0:
            raise ValueError(f"distill.loss_temperature={self.loss_temperature}: must be > 0")
        if self.chunk_size < 1:
            raise ValueError(f"distill.chunk_size={self.chunk_size}: must be >= 1")
        if self.loss == "reverse_kl_reward" and self.lmbda != 1.0:
            raise ValueError(
                f"distill.loss=reverse_kl_reward with distill.lmbda={self.lmbda}: the per-token "
                "reward is a policy gradient over the student's own samples, so every round "
                "must be on-policy (lmbda: 1)")
        if self.dynamic_sampling:
            raise ValueError("distill.dynamic_sampling: distillation does not train on rewards, "
                             "so there are no all-equal groups to drop")
        if self.share_prompt == "always":
            raise ValueError("distill.share_prompt=always: distillation trains on flat rows "
                             "(use auto or never)")

    def scores_old_logprobs(self) -> bool:
        """Whether rollouts are scored by the policy that sampled them (the policy gradient
        of reused rollouts; the JSD needs no old log-probs)."""
        return self.loss == "reverse_kl_reward" and self.reuses_rollouts()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DistillBatch:
    """The rows of a step (flat rollout rows [R, P + C], completion mask [R, C] as token
    weights). ``advantages`` [R] are zeros: the rollout source counts and slices rows by
    them, the loss reads none. ``old_logprobs`` [R, C]: the sampling policy's log-probs
    (reused rollouts, ``reverse_kl_reward``), else None; ``ref_logprobs`` is always None
    (there is no reference model; the rollout source fills it for algorithms with one)."""

    rows: TokenRows
    advantages: Any
    old_logprobs: Any = None
    ref_logprobs: Any = None

    @staticmethod
    def ndims(d: DistillSection) -> DistillBatch:
        return DistillBatch(TokenRows(2, 2, 2, 2, 2), 1,
                            old_logprobs=2 if d.scores_old_logprobs() else None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DistillStats:
    num_items: Any  # completion-token weight of the whole batch


def batch_stats(state, batch: DistillBatch) -> DistillStats:
    return DistillStats(num_items=jnp.sum(batch.rows.completion_mask, dtype=jnp.float32))


def completion_hidden(model, rows: TokenRows):
    """(hidden_RCE, targets_RC): the final hidden states that predict each completion token
    (position P-1+j predicts completion token j) and those tokens."""
    P, C = rows.widths
    hidden_BSE, _ = model(rows.input_ids, rows.positions, rows.segment_ids)
    return hidden_BSE[:, P - 1:P - 1 + C], rows.targets[:, P - 1:P - 1 + C]


def make_distill_loss_fn(graphdef, teacher_graphdef, d: DistillSection, *, impl: str):
    """``loss_fn({"student": params, "teacher": params}, batch, rng, stats)``: every value
    a sum over the micro-batch's completion tokens divided by the whole batch's
    (``DistillStats``), so micro-batches add up to the batch."""
    sample_T = d.temperature if d.temperature > 0 else 1.0

    def loss_fn(params, batch: DistillBatch, rng, stats: DistillStats):
        student = nnx.merge(graphdef, params["student"])
        teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(params["teacher"]))
        rows, mask_RC = batch.rows, batch.rows.completion_mask
        denom = jnp.maximum(stats.num_items, 1.0)
        mean = lambda x_RC: jnp.sum(mask_RC * x_RC) / denom  # noqa: E731
        if d.loss == "reverse_kl_reward":
            # Both models at the sampling temperature: the reward is the reverse KL between
            # the distribution the student samples from and the teacher's at that T.
            lp_RC, _ = layout.completion_token_logprobs(student, rows, impl=impl,
                                                        temperature=sample_T)
            t_lp_RC, _ = layout.completion_token_logprobs(teacher, rows, impl=impl,
                                                          temperature=sample_T)
            loss, metrics = losses.reverse_kl_reward_loss(
                lp_RC, batch.old_logprobs, t_lp_RC, mask_RC, coef=d.kl_coef,
                num_items=stats.num_items)
            return loss, {**metrics, "distill/student_logprob": mean(jax.lax.stop_gradient(lp_RC)),
                          "distill/teacher_logprob": mean(t_lp_RC)}
        hs_RCE, targets_RC = completion_hidden(student, rows)
        ht_RCF, _ = completion_hidden(teacher, rows)
        R, C = targets_RC.shape
        jsd_N, s_lp_N, t_lp_N = losses.chunked_generalized_jsd(
            hs_RCE.reshape(R * C, -1), student.lm_head, ht_RCF.reshape(R * C, -1),
            teacher.lm_head, targets_RC.reshape(-1), beta=d.beta,
            temperature=d.loss_temperature, chunk=d.chunk_size)
        loss = mean(jsd_N.reshape(R, C))
        s_lp_RC = jax.lax.stop_gradient(s_lp_N.reshape(R, C))
        t_lp_RC = t_lp_N.reshape(R, C)
        return loss, {"distill/student_logprob": mean(s_lp_RC),
                      "distill/teacher_logprob": mean(t_lp_RC),
                      "distill/reverse_kl": mean(s_lp_RC - t_lp_RC)}

    return loss_fn


# ----------------------------------------------------------------------------- the teacher


# ----------------------------------------------------------------------------- batches


class DistillSource(RolloutSource):
    """Rollouts of the student (``lmbda``) or the dataset's completions (1 - lmbda), per
    sampling round; the round's choice is a draw of stream ``distill_on_policy``."""

    def __init__(self, d: DistillSection, *, demos: Demonstrations, **kw):
        super().__init__(d, **kw)
        self.lmbda, self.demos = d.lmbda, demos
        self.score_old = d.scores_old_logprobs()

    def on_policy(self, k: int) -> bool:
        return bool(self.streams.host("distill_on_policy", k).random() < self.lmbda)

    def sample_round(self, params):
        k = self.prompt_batches
        if self.on_policy(k):
            batch, rewards_R, metrics = super().sample_round(params)
            return batch, rewards_R, {**metrics, "distill/on_policy": 1.0}
        chosen = [self.prompts[i] for i in self.prompt_indices(k)]
        pb = prompt_batch(chosen, pad_id=self.sampler.pad_id,
                          max_prompt_length=self.section.max_prompt_length)
        rows = self.demos.rows(chosen, pb)
        self.prompt_batches += 1
        R = len(rows.input_ids)
        lengths = rows.completion_mask.sum(axis=1) * self.section.num_generations
        return (DistillBatch(rows, np.zeros(R, np.float32)), np.zeros(R, np.float32),
                {"distill/on_policy": 0.0, "completions/mean_length": float(lengths.mean())})
