"""GRPO (and its loss family, with the SFT+RL hybrids): config section, typed batch, loss.

Axis legend: R rollout rows (completions) of a step, C completion length.

A run samples rollouts from the current policy and trains on them in mini-batches
(``jaxpt.rl.source``, TRL's generation batch / mu semantics); rewards and group-relative
advantages (``rewards.advantages``), old / reference log-probs (``rl.scoring``; old only
when a rollout is reused, else old = stop_gradient(new), as in TRL) and the loss
(``losses.grpo``) follow TRL's GRPOTrainer. Hybrids (none of TRL, Tunix, MaxText has these
as options; ``rl.hybrids``):
- ``sft_weight`` > 0: adds ``sft_weight * NLL`` of the prompts' demonstrations to the RL
  loss, with a weight schedule (``sft_schedule``: constant, linear decay, ReFT-style
  warm-up then RL) or SASR's per-step SFT-or-RL choice (``adaptive``).
- Prefix-RFT (``prefix_rft_ratio`` > 0): that fraction of each group's rollouts continues a
  prefix of the demonstration; the prefix tokens get ``prefix_sft_weight * NLL``, the
  sampled continuation the RL loss (``losses.grpo.prefix_rft_masks``).

Rollout-vs-trainer correction (``rollout_correction``, off by default): truncated or masked
importance weights between the decode loop's and the trainer's log-probs of the sampled
tokens (``rl.correction``, TRL's ``vllm_importance_sampling_*``); the old log-probs are then
scored at rollout time and used by the loss, as in TRL.

Several processes (a pod): one rollout program over every host's devices, rewards scored
per process and gathered, each process training on its block of every mini-batch; the
logged metrics equal a single process's (``rl.processes``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpt.config import register_section
from jaxpt.losses import grpo as losses
from jaxpt.rewards.advantages import compute_advantages
from jaxpt.rl import layout
from jaxpt.rl.config import OnPolicySection
from jaxpt.rl.layout import GroupRows, TokenRows


@register_section("grpo")
@dataclasses.dataclass(frozen=True)
class GRPOSection(OnPolicySection):
    """GRPO settings; names follow TRL's GRPOConfig where TRL has the option. Prompts,
    rollouts, rewards, dynamic sampling, mini-batches, layout and held-out evaluation are
    the keys every on-policy algorithm has (``jaxpt.rl.config.OnPolicySection``)."""

    # Advantages (`rewards.advantages`).
    scale_rewards: Literal["group", "batch", "none"] = "group"
    advantage_estimator: Literal["grpo", "rloo"] = "grpo"
    # The loss (`losses.grpo`).
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"] = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # clip-higher (DAPO); None = epsilon
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence = GSPO
    beta: float = 0.0  # KL to the reference (k3); 0: no reference is kept
    cispo_epsilon_max: float = 5.0
    # SFT+RL hybrids.
    sft_weight: float = 0.0  # weight of the demonstration NLL (0: pure RL)
    sft_schedule: Literal["constant", "linear", "warmup_then_rl", "adaptive"] = "constant"
    sft_warmup_steps: int = 0  # warmup_then_rl / adaptive: SFT only for these steps
    sasr_gamma: float = 1.0  # adaptive (SASR): p_sft = g / (g + gamma * g_warmup)
    sft_decay_steps: int = 0  # linear: sft_weight -> 0 over these steps
    max_demo_length: int = 256
    # Prefix-RFT: the share of each group's rollouts that start from a demonstration prefix.
    prefix_rft_ratio: float = 0.0
    prefix_min_fraction: float = 0.2  # prefix length as a fraction of the demonstration
    prefix_max_fraction: float = 0.8
    prefix_sft_weight: float = 1.0  # weight of the prefix tokens' NLL
    # Rollout-vs-trainer mismatch correction (`rl.correction`; TRL's
    # vllm_importance_sampling_mode / _cap): importance weights between the trainer's and
    # the decode loop's log-probs of the sampled tokens, truncated or masked at the cap.
    rollout_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate",
                                "sequence_mask"] = "none"
    rollout_correction_cap: float = 3.0

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(f"grpo.num_generations={self.num_generations}: must be >= 2")
        if self.sft_schedule != "constant" and self.sft_weight <= 0:
            raise ValueError(f"grpo.sft_schedule={self.sft_schedule} schedules the SFT term: "
                             "it needs grpo.sft_weight > 0")
        if self.sft_schedule == "linear" and self.sft_decay_steps < 1:
            raise ValueError("grpo.sft_schedule=linear needs grpo.sft_decay_steps >= 1 (the "
                             "steps over which sft_weight decays to 0)")
        if self.sft_schedule == "warmup_then_rl" and self.sft_warmup_steps < 1:
            raise ValueError("grpo.sft_schedule=warmup_then_rl needs grpo.sft_warmup_steps "
                             ">= 1 (the SFT-only steps before RL)")
        if self.sft_schedule == "adaptive" and (self.sft_weight <= 0 or self.sft_warmup_steps < 1):
            raise ValueError("grpo.sft_schedule=adaptive (SASR) needs sft_weight > 0 and "
                             "sft_warmup_steps >= 1 (its gradient-norm reference)")
        if not 0.0 <= self.prefix_rft_ratio < 1.0:
            raise ValueError(f"grpo.prefix_rft_ratio={self.prefix_rft_ratio}: must be in "
                             "[0, 1) (some rollouts of each group must be the policy's own)")
        if not (math.isfinite(self.rollout_correction_cap) and self.rollout_correction_cap > 0):
            raise ValueError(f"grpo.rollout_correction_cap={self.rollout_correction_cap}: "
                             "must be a finite number > 0")
        if not 0.0 <= self.prefix_min_fraction <= self.prefix_max_fraction < 1.0:
            raise ValueError(
                f"grpo.prefix_min_fraction={self.prefix_min_fraction}, prefix_max_fraction="
                f"{self.prefix_max_fraction}: need 0 <= min <= max < 1")

    def advantages(self, rewards_R):
        return compute_advantages(rewards_R, self.num_generations,
                                  scale_rewards=self.scale_rewards,
                                  estimator=self.advantage_estimator)

    def loss(self) -> losses.GRPOLossConfig:
        return losses.GRPOLossConfig(
            loss_type=self.loss_type, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
            importance_sampling_level=self.importance_sampling_level, beta=self.beta,
            max_completion_length=self.max_completion_length,
            cispo_epsilon_max=self.cispo_epsilon_max,
        )

    def optional_parts(self) -> dict[str, tuple[bool, str]]:
        """GRPOBatch's optional field -> (whether this config uses it, the keys that say so)."""
        corrected = self.rollout_correction != "none"
        return {"old_logprobs": (self.reuses_rollouts() or corrected,
                                 "grpo.num_iterations or steps_per_generation > 1, or "
                                 "grpo.rollout_correction"),
                "sampling_weights": (corrected, "grpo.rollout_correction"),
                "ref_logprobs": (self.beta > 0, "grpo.beta > 0"),
                "prefix_lengths": (self.prefix_rft_ratio > 0, "grpo.prefix_rft_ratio > 0"),
                "sft_mode": (self.sft_schedule == "adaptive", "grpo.sft_schedule=adaptive"),
                "demo": (self.sft_weight > 0, "grpo.sft_weight > 0")}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GRPOBatch:
    """The rollout rows of a step (``rl.layout``: flat TokenRows [R, ...], or shared-prompt
    GroupRows with every other field [B, G, ...]); an optional part is None where the
    config does not use it (``GRPOSection.optional_parts``)."""

    rows: TokenRows | GroupRows
    advantages: Any  # [R]
    old_logprobs: Any = None  # [R, C] under the policy that sampled (reused rollouts)
    ref_logprobs: Any = None  # [R, C] under the reference (KL)
    prefix_lengths: Any = None  # [R] demonstration tokens a completion starts with
    sft_mode: Any = None  # [R] SASR: 1.0 this step is SFT, 0.0 RL
    demo: TokenRows | None = None  # the prompt's demonstration, mask weighted 1/G
    sampling_weights: Any = None  # [R, C] rollout-vs-trainer importance weights
    # [R, C] the decode loop's log-probs of the sampled tokens: on the host only, until
    # `rl.correction` turns them into `sampling_weights`.
    sampling_logprobs: Any = dataclasses.field(default=None, metadata={"per_token": True})

    @staticmethod
    def ndims(grpo: GRPOSection, shared: bool) -> GRPOBatch:
        """The tree of the batch's leaf ndims (for its shardings)."""
        rows, used = TokenRows(2, 2, 2, 2, 2), grpo.optional_parts()
        nd = {"old_logprobs": 2, "ref_logprobs": 2, "prefix_lengths": 1, "sft_mode": 1,
              "demo": TokenRows(2, 2, 2, 2, 2), "sampling_weights": 2}
        flat = GRPOBatch(rows, 1, **{k: n if used[k][0] else None for k, n in nd.items()})
        return layout.grouped_ndims(flat) if shared else flat


def check_batch(grpo: GRPOSection, batch: GRPOBatch) -> None:
    """A batch holds exactly the optional parts its config uses (at trace time: free)."""
    for name, (used, why) in grpo.optional_parts().items():
        if used != (getattr(batch, name) is not None):
            raise ValueError(f"GRPOBatch.{name} is " + (f"missing: {why} needs it" if used else
                             f"set, but the config does not use it (that takes {why})"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GRPOStats:
    """Whole-batch counts, so each micro-batch's terms add up to the batch's."""

    rows: int = dataclasses.field(metadata={"static": True})
    num_items: Any = None  # completion tokens that get the RL loss
    prefix_tokens: Any = None
    demo_tokens: Any = None
    sft_weight: Any = None
    rl_weight: Any = 1.0


def make_batch_stats(grpo: GRPOSection):
    def stats(state, batch: GRPOBatch) -> GRPOStats:
        check_batch(grpo, batch)
        b, mask = layout.per_row_view(batch), batch.rows.completion_mask_RC
        out: dict[str, Any] = {"rows": b.advantages.shape[0]}
        if grpo.prefix_rft_ratio > 0:
            prefix_mask, mask = losses.prefix_rft_masks(b.prefix_lengths, mask)
            out["prefix_tokens"] = jnp.sum(prefix_mask > 0, dtype=jnp.float32)
        out["num_items"] = jnp.sum(mask > 0, dtype=jnp.float32)
        kind = grpo.sft_schedule
        if grpo.sft_weight > 0:
            w = jnp.asarray(grpo.sft_weight, jnp.float32)
            if kind in ("linear", "warmup_then_rl"):
                w = losses.sft_weight_schedule(
                    state.step, kind=kind, initial_weight=grpo.sft_weight, final_weight=0.0,
                    decay_steps=max(grpo.sft_decay_steps, 1), warmup_steps=grpo.sft_warmup_steps)
            if kind == "adaptive":  # SASR: the host chose SFT or RL for this step
                mode = b.sft_mode[0]
                w, out["rl_weight"] = grpo.sft_weight * mode, 1.0 - mode
            if kind == "warmup_then_rl":
                out["rl_weight"] = losses.rl_weight_schedule(
                    state.step, kind, warmup_steps=grpo.sft_warmup_steps)
            out.update(sft_weight=w, demo_tokens=jnp.sum(b.demo.completion_mask))
        return GRPOStats(**out)

    return stats


def make_grpo_loss_fn(graphdef, grpo: GRPOSection, *, impl: str, with_entropy: bool):
    """The loss of a micro-batch: the RL loss of its rollout rows (a share of the batch's)
    plus the hybrids' NLL terms, each normalized by whole-batch counts (``GRPOStats``)."""
    loss_cfg = grpo.loss()
    T = grpo.temperature if grpo.temperature > 0 else 1.0

    def loss_fn(params, batch: GRPOBatch, rng, stats: GRPOStats):
        check_batch(grpo, batch)
        model = nnx.merge(graphdef, params)
        lp_RC, ent_RC = layout.completion_token_logprobs(
            model, batch.rows, impl=impl, with_entropy=with_entropy, temperature=T)
        b, rl_mask_RC = layout.per_row_view(batch), batch.rows.completion_mask_RC
        share = b.advantages.shape[0] / stats.rows
        if grpo.prefix_rft_ratio > 0:
            prefix_mask_RC, rl_mask_RC = losses.prefix_rft_masks(b.prefix_lengths, rl_mask_RC)
        loss, metrics = losses.grpo_loss(
            loss_cfg, lp_RC, b.old_logprobs, b.advantages, rl_mask_RC,
            ref_logprobs_BT=b.ref_logprobs, num_items_in_batch=stats.num_items,
            entropy_BT=ent_RC, rl_weight=stats.rl_weight,
            sampling_weights_BT=b.sampling_weights)
        if loss_cfg.loss_type not in ("dapo", "cispo"):
            loss = loss * share  # per-micro-batch means: average over micro-batches
        metrics = {k: v * share for k, v in metrics.items()}
        if grpo.prefix_rft_ratio > 0:
            # The prefix NLL reuses the rollout log-probs, i.e. at the sampling temperature
            # (exactly the NLL when temperature = 1).
            prefix_nll = losses.sft_nll(lp_RC, prefix_mask_RC, stats.prefix_tokens)
            loss = loss + grpo.prefix_sft_weight * prefix_nll
            metrics["prefix_sft_loss"] = prefix_nll
        if grpo.sft_weight > 0:
            lp_demo, _ = layout.completion_token_logprobs(model, b.demo, impl=impl)
            nll = losses.sft_nll(lp_demo, b.demo.completion_mask, stats.demo_tokens, 1e-6)
            loss = loss + stats.sft_weight * nll
            metrics["sft_loss"] = nll
            metrics["sft_weight"] = stats.sft_weight * share
        return loss, metrics

    return loss_fn
