"""PPO with a critic (``algorithm: ppo``): config section, typed batch, loss, and ReFT's
SFT warm-up in the same run.

Axis legend: R rollout rows (completions) of a step, C completion length, E hidden size.

Follows TRL's ``PPOTrainer`` (``trl/experimental/ppo/ppo_trainer.py``, names and defaults of
its ``PPOConfig``). A rollout (``jaxpt.rl.source``) samples completions from the current
policy and scores them with the verifiers / reward functions (``reward_funcs``, as GRPO);
then, on the whole rollout (``complete``): the policy's log-probs and the critic's values of
the sampled tokens, the reference's log-probs (``kl_coef > 0``), per-token rewards
``-kl_coef * KL`` plus the score on the last completion token, optional reward whitening,
GAE (``gamma``, ``lam``) and whitened advantages (``jaxpt.losses.ppo``). Each optimizer step
takes a mini-batch: ``loss = pg_loss + vf_coef * vf_loss`` (clipped surrogate, clipped value
loss), token means over the mini-batch (TRL: per micro-batch).

The critic is a value head on the policy (``jaxpt.rl.critic``): a linear map
(``nnx.Linear(E, 1)``) of the policy's final hidden state at each token, its own param group
``value`` with its own learning rate (``ppo.value_lr``); its loss reaches the shared decoder
as well (TRL's older ``AutoModelForCausalLMWithValueHead``, and the ReFT paper's setup).
TRL's current ``PPOTrainer`` has a separate value model (a sequence-classification copy); a
separate critic is a possible later option here.

Where jaxpt differs from TRL: the score lands on the last completion token, not one
position after it, and truncated rows may bootstrap (``truncation``; see
``jaxpt.losses.ppo``); TRL's ``num_ppo_epochs`` / ``num_mini_batches`` are jaxpt's
``num_iterations`` / ``steps_per_generation`` (either name; the mini-batches keep their
rows across passes, TRL reshuffles each epoch); the ``policy/*``, ``loss/*``, ``val/*``
metrics are per optimizer step (TRL averages them over a rollout's steps, so there is no
``val/ratio_var``); ``policy/approxkl_avg``, ``val/ratio``, ``policy/entropy_avg`` and
``objective/entropy`` count real completion tokens only (TRL's include padding: ratio 1,
and a log-prob of ``INVALID_LOGPROB`` = 1 in ``objective/entropy``). ``reward`` is the
reward functions' mean (GRPO's name), ``objective/scores`` the same after
``missing_eos_penalty``.

ReFT (``sft_warmup_steps`` > 0): the first steps are SFT on the prompts' demonstrations
(the policy term weighted 0; the critic already learns the values of the rollouts), then
PPO with the verifier, in one run and one compiled step (``losses.grpo``'s
``warmup_then_rl`` weight schedules). Warm-up steps still sample a rollout each (the
critic's data); the demonstrations' forward stops with the warm-up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.config import register_section
from jaxpt.losses import grpo as grpo_losses
from jaxpt.losses import ppo as losses
from jaxpt.rl.config import OnPolicySection
from jaxpt.rl.critic import policy_and_values
from jaxpt.rl.layout import (
    TokenRows,
    completion_token_logprobs,
)


@register_section("ppo")
@dataclasses.dataclass(frozen=True)
class PPOSection(OnPolicySection):
    """PPO settings; names and defaults follow TRL's PPOConfig where TRL has the option.
    Prompts, rollouts, rewards, mini-batches and held-out evaluation are the on-policy keys
    (``jaxpt.rl.config.OnPolicySection``)."""

    num_generations: int = 1  # completions per prompt (TRL: 1)
    num_ppo_epochs: int | None = None  # TRL's name for num_iterations
    num_mini_batches: int | None = None  # TRL's name for steps_per_generation
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k3"] = "k1"
    cliprange: float = 0.2
    vf_coef: float = 0.1
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    whiten_advantages: bool = True  # TRL always whitens them
    missing_eos_penalty: float | None = None  # subtracted from the score of rows with no EOS
    truncation: Literal["terminal", "bootstrap"] = "terminal"  # GAE after a truncated row
    value_lr: float | None = None  # the value head's lr (None: optim.lr)
    # ReFT: SFT on the demonstrations for the first steps, then PPO.
    sft_warmup_steps: int = 0
    max_demo_length: int = 256

    def __post_init__(self):
        for trl_name, ours in (("num_ppo_epochs", "num_iterations"),
                               ("num_mini_batches", "steps_per_generation")):
            value = getattr(self, trl_name)
            if value is None:
                continue
            if getattr(self, ours) not in (1, value):
                raise ValueError(f"ppo.{trl_name}={value} and ppo.{ours}={getattr(self, ours)}"
                                 " name the same setting: set one of them")
            object.__setattr__(self, ours, value)
        if self.num_iterations < 1 or self.steps_per_generation < 1:
            raise ValueError("ppo.num_ppo_epochs / num_mini_batches must be >= 1")
        if self.num_generations < 1:
            raise ValueError(f"ppo.num_generations={self.num_generations}: must be >= 1")
        if self.kl_coef < 0 or self.vf_coef < 0:
            raise ValueError(f"ppo.kl_coef={self.kl_coef}, vf_coef={self.vf_coef}: must be >= 0")
        if not 0 < self.cliprange < 1 or self.cliprange_value <= 0:
            raise ValueError(f"ppo.cliprange={self.cliprange} must be in (0, 1) and "
                             f"cliprange_value={self.cliprange_value} > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"ppo.gamma={self.gamma}, lam={self.lam}: must be in [0, 1]")
        if self.dynamic_sampling:
            raise ValueError("ppo.dynamic_sampling: DAPO's group filter is GRPO's; PPO has none")
        if self.mask_truncated_completions:
            raise ValueError("ppo.mask_truncated_completions: use missing_eos_penalty (TRL's "
                             "PPO option for rows without EOS)")
        if self.share_prompt == "always":
            raise ValueError("ppo.share_prompt=always: PPO trains one row per completion")
        if self.sft_warmup_steps < 0:
            raise ValueError(f"ppo.sft_warmup_steps={self.sft_warmup_steps}: must be >= 0")

    def uses_reference(self) -> bool:
        return self.kl_coef > 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PPOBatch:
    """The rollout rows of a step (flat ``TokenRows`` [R, ...]) and what ``complete``
    computed for them on the whole rollout, each [R, C] (``scores`` [R])."""

    rows: TokenRows
    scores: Any  # [R] reward functions' score (after missing_eos_penalty)
    advantages: Any = None  # [R, C] GAE, whitened
    returns: Any = None  # [R, C] advantages + old values (before whitening)
    old_logprobs: Any = None  # [R, C] under the policy that sampled
    old_values: Any = None  # [R, C] the critic at sampling time
    demo: TokenRows | None = None  # ReFT warm-up: the prompt's demonstration, weighted 1/G

    @staticmethod
    def ndims(ppo: PPOSection) -> PPOBatch:
        rows = TokenRows(2, 2, 2, 2, 2)
        return PPOBatch(rows, 1, 2, 2, 2, 2,
                        demo=TokenRows(2, 2, 2, 2, 2) if ppo.sft_warmup_steps > 0 else None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PPOStats:
    """Whole-batch counts, so each micro-batch's terms add up to the batch's."""

    rows: int = dataclasses.field(metadata={"static": True})
    num_tokens: Any = None  # completion tokens (policy and value terms)
    demo_tokens: Any = None
    sft_weight: Any = None
    rl_weight: Any = 1.0


def make_batch_stats(ppo: PPOSection):
    def stats(state, batch: PPOBatch) -> PPOStats:
        n = jnp.sum(batch.rows.completion_mask > 0, dtype=jnp.float32)
        R = batch.scores.shape[0]
        if ppo.sft_warmup_steps == 0:
            return PPOStats(rows=R, num_tokens=n)
        kw = {"kind": "warmup_then_rl", "warmup_steps": ppo.sft_warmup_steps}
        return PPOStats(rows=R, num_tokens=n, demo_tokens=jnp.sum(batch.demo.completion_mask),
                        sft_weight=grpo_losses.sft_weight_schedule(
                            state.step, initial_weight=1.0, final_weight=0.0, **kw),
                        rl_weight=grpo_losses.rl_weight_schedule(state.step, **kw))

    return stats


def make_ppo_loss_fn(graphdef, head_gd, ppo: PPOSection, *, impl: str, with_entropy: bool):
    """The loss of a micro-batch: ``rl_weight * pg_loss + vf_coef * vf_loss`` (TRL), plus the
    ReFT warm-up's demonstration NLL; every term normalized by whole-batch counts."""
    T = ppo.temperature if ppo.temperature > 0 else 1.0

    def loss_fn(params, batch: PPOBatch, rng, stats: PPOStats):
        model = nnx.merge(graphdef, params["policy"])
        head = nnx.merge(head_gd, params["value"])
        lp_RC, ent_RC, values_RC = policy_and_values(
            model, head, batch.rows, impl=impl, temperature=T, with_entropy=with_entropy)
        mask = (batch.rows.completion_mask > 0).astype(jnp.float32)
        n = jnp.maximum(stats.num_tokens, 1.0)
        total = lambda x: jnp.sum(x * mask) / n  # noqa: E731  (token mean over the batch)
        pg_RC, pg_clipped, ratio_RC, logratio_RC = losses.policy_loss_terms(
            lp_RC, batch.old_logprobs, batch.advantages, cliprange=ppo.cliprange)
        vf_RC, vf_clipped = losses.value_loss_terms(
            values_RC, batch.old_values, batch.returns, cliprange_value=ppo.cliprange_value)
        pg_loss, vf_loss = total(pg_RC), 0.5 * total(vf_RC)
        loss = stats.rl_weight * pg_loss + ppo.vf_coef * vf_loss
        metrics = {
            "loss/policy_avg": pg_loss, "loss/value_avg": vf_loss,
            "policy/clipfrac_avg": total(pg_clipped.astype(jnp.float32)),
            "val/clipfrac_avg": total(vf_clipped.astype(jnp.float32)),
            "policy/approxkl_avg": 0.5 * total(logratio_RC ** 2),
            "val/ratio": total(ratio_RC),
            "val/vpred": total(values_RC),
        }
        if ent_RC is not None:
            metrics["policy/entropy_avg"] = total(ent_RC)
        if ppo.sft_warmup_steps > 0:
            def demo_nll():
                lp_demo, _ = completion_token_logprobs(model, batch.demo, impl=impl)
                return grpo_losses.sft_nll(lp_demo, batch.demo.completion_mask,
                                           stats.demo_tokens, 1e-6)

            # After the warm-up the demonstrations cost no forward.
            nll = jax.lax.cond(stats.sft_weight > 0, demo_nll, lambda: jnp.float32(0.0))
            loss = loss + stats.sft_weight * nll
            metrics["sft_loss"] = nll
            metrics["sft_weight"] = stats.sft_weight * batch.scores.shape[0] / stats.rows
        return loss, metrics

    return loss_fn


def complete_rollout(ppo: PPOSection, batch: PPOBatch, lp_RC, values_RC1, ref_RC, eos_ids):
    """The rollout's per-token rewards, GAE and TRL's ``objective/*`` metrics from its scores:
    (the batch with old log-probs / values, advantages and returns, metrics). Host numpy in,
    host numpy out."""
    rows = batch.rows
    mask = np.asarray(rows.completion_mask) > 0
    R, C = mask.shape
    lengths_R = mask.sum(1)
    P = rows.input_ids.shape[1] - C
    last_R = np.asarray(rows.input_ids)[np.arange(R), P + np.maximum(lengths_R - 1, 0)]
    has_eos_R = (lengths_R > 0) & np.isin(last_R, np.asarray(eos_ids))
    scores_R = np.nan_to_num(np.asarray(batch.scores, np.float32), nan=0.0)
    reward = float(scores_R.mean())  # the reward functions' (GRPO's `reward`)
    if ppo.missing_eos_penalty is not None:
        scores_R = scores_R - ppo.missing_eos_penalty * (~has_eos_R)
    m = mask.astype(np.float32)
    lp_RC, values_RC = lp_RC * m, values_RC1[:, :C] * m
    kl_RC = (losses.kl_per_token(lp_RC, ref_RC, ppo.kl_estimator) * m if ref_RC is not None
             else jnp.zeros_like(m))
    rewards_RC, non_score_RC = losses.token_rewards(scores_R, kl_RC, m, kl_coef=ppo.kl_coef)
    if ppo.whiten_rewards:
        rewards_RC = losses.masked_whiten(rewards_RC, m, shift_mean=False) * m
    next_R = None
    if ppo.truncation == "bootstrap":
        truncated_R = (lengths_R == C) & ~has_eos_R
        next_R = np.where(truncated_R, values_RC1[:, C], 0.0)
    adv_RC, returns_RC = losses.gae(rewards_RC, values_RC, m, gamma=ppo.gamma, lam=ppo.lam,
                                    next_value_R=next_R)
    if ppo.whiten_advantages:
        adv_RC = losses.masked_whiten(adv_RC, m) * m
    non_score = float(np.mean(np.sum(non_score_RC, 1)))
    metrics = {
        "objective/kl": float(np.mean(np.sum(kl_RC, 1))),
        "objective/entropy": float(np.mean(np.sum(-lp_RC, 1))),
        "objective/non_score_reward": non_score,
        "objective/rlhf_reward": non_score + float(scores_R.mean()),
        "objective/scores": float(scores_R.mean()),
        "val/num_eos_tokens": float(has_eos_R.sum()),
        "reward": reward,
    }
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    out = dataclasses.replace(batch, scores=scores_R, advantages=f32(adv_RC),
                              returns=f32(returns_RC), old_logprobs=f32(lp_RC),
                              old_values=f32(values_RC))
    return out, metrics
