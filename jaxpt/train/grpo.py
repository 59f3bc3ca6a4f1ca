"""GRPO (and its loss family, with the SFT+RL hybrids) on the shared training spine.

Axis legend: B prompts per rollout, G = num_generations, R = B*G rollout rows, b rows per
optimizer step (`train.batch_size`, completions), P prompt length, C completion length.

One rollout samples `train.batch_size * steps_per_generation` completions (G per prompt)
with the jitted decode loop from the *current* policy, scores them and computes
advantages; then `num_iterations` (mu) passes over it in `steps_per_generation`
mini-batches, one optimizer step each (TRL's generation batch / mu semantics). The loop
(`jaxpt.train.loop.run`) sees an ordinary batch source: `GRPOSource.next(state)` returns
the next mini-batch and rolls out again when the current rollout is used up.

Log-probs the loss needs besides the current policy's are computed outside the gradient
with one jitted scoring pass: the old policy's at rollout time (only when a rollout is
reused, i.e. mu > 1 or several steps per generation; otherwise old = stop_gradient(new),
as in TRL) and the reference's when `beta > 0` (the frozen copy, or the LoRA base).

Hybrids (none of TRL, Tunix, MaxText has these as options):
- `sft_weight` > 0: adds `sft_weight * NLL` of the dataset's demonstrations for the same
  prompts (a `completion` column, or GSM8K's worked answers) to the RL loss, with a
  schedule (`sft_schedule`: constant, linear decay, ReFT-style warm-up then RL).
- Prefix-RFT (`prefix_rft_ratio` > 0): that fraction of each prompt's G rollouts starts
  from a prefix of its demonstration (a uniformly drawn fraction in
  [`prefix_min_fraction`, `prefix_max_fraction`] of the demonstration's tokens); the
  policy continues it, the whole completion is rewarded and takes part in the group's
  advantages; the prefix tokens get `prefix_sft_weight * NLL`, the sampled continuation the
  RL loss (`jaxpt.losses.grpo.prefix_rft_masks`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.config import RunConfig, register_section
from jaxpt.data import DataStats
from jaxpt.data.gsm8k import convert_gsm8k
from jaxpt.data.pipeline import prepare_prompts, prompt_batch
from jaxpt.data.tasks.arithmetic import arithmetic_config, arithmetic_records
from jaxpt.losses.grpo import (
    GRPOLossConfig,
    grpo_loss,
    prefix_rft_masks,
    rl_weight_schedule,
    sft_nll,
    sft_weight_schedule,
)
from jaxpt.rewards.advantages import DynamicSampler, compute_advantages, dynamic_sample
from jaxpt.rewards.registry import get_reward_function
from jaxpt.sampling import Sampler
from jaxpt.sharding import batch_divisor, decode_sharding
from jaxpt.train.common import (
    build_mesh,
    build_train_state,
    check_train_batch,
    load_model_bundle,
    read_data_records,
)
from jaxpt.train.loop import Trainer
from jaxpt.train.registry import register_builder
from jaxpt.train.rollout import (
    FLAT_SEQUENCE_KEYS,
    GROUP_KEYS,
    RolloutConfig,
    completion_token_logprobs,
    group_rollout_rows,
    grouped_completion_logprobs,
    sample_rollouts,
    ungroup_rows,
)
from jaxpt.train.scoring import make_score_fn
from jaxpt.train.state import (
    batch_shardings,
    compile_step,
    identity_params,
    make_optimizer,
    make_train_step,
    put_batch,
)


@register_section("grpo")
@dataclasses.dataclass(frozen=True)
class GRPOSection:
    """GRPO settings; names follow TRL's GRPOConfig where TRL has the option."""

    # Prompts: the run's data (`data.train`, GSM8K or prompt rows), or generated arithmetic
    # word problems (`task: arithmetic`, no download; `data.max_train_rows` /
    # `data.max_eval_rows` problems, disjoint train / held-out splits).
    task: Literal["data", "arithmetic"] = "data"
    instruction: str | None = None  # appended to each GSM8K / arithmetic question
    arithmetic_min_operands: int = 2
    arithmetic_max_operands: int = 2
    arithmetic_max_digits: int = 2
    arithmetic_ops: str = "+-"
    arithmetic_max_value: int | None = None  # cap on the numbers (else 10**digits - 1)
    arithmetic_style: Literal["word", "plain"] = "word"  # story, or "Calculate 7 + 5."
    max_prompt_length: int = 256
    # Rollouts.
    num_generations: int = 4
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    reward_funcs: tuple[str, ...] = ("math",)  # built-in names or "package.module:function"
    reward_weights: tuple[float, ...] | None = None
    reward_timeout_s: float = 60.0
    # A reward function returning NaN / inf stops the run naming it and the row; true:
    # treat the value as None (not applicable) and count it (rewards/nonfinite_skipped).
    skip_nonfinite_rewards: bool = False
    scale_rewards: Literal["group", "batch", "none"] = "group"
    advantage_estimator: Literal["grpo", "rloo"] = "grpo"
    mask_truncated_completions: bool = False
    # DAPO dynamic sampling: drop groups whose rewards all agree and sample more prompts
    # until the batch is full, at most `max_sampling_rounds` rounds per rollout.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    dynamic_sampling_fill: Literal["repeat", "zero_advantage"] = "repeat"
    # Optimization over a rollout.
    num_iterations: int = 1  # mu: passes over each rollout
    steps_per_generation: int = 1  # optimizer steps (mini-batches) per pass
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"] = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # clip-higher (DAPO); None = epsilon
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence = GSPO
    beta: float = 0.0  # KL to the reference (k3); 0: no reference is kept
    cispo_epsilon_max: float = 5.0
    # Train-step layout: "auto" packs each group as one row [prompt | G completions] with
    # the prompt shared (it goes through the decoder once, not G times, and attention
    # covers only the prompt and each completion's own block, so it is never dearer than
    # G rows) whenever whole groups fit the micro-batches and batch shards; "always"
    # raises where they do not; "never" keeps one row per completion.
    share_prompt: Literal["auto", "always", "never"] = "auto"
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
    # Held-out evaluation (greedy): accuracy of the first reward function.
    eval_prompts: int = 64
    eval_batch_size: int = 32
    eval_max_completion_length: int | None = None  # default: max_completion_length

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
        if not 0.0 <= self.prefix_min_fraction <= self.prefix_max_fraction < 1.0:
            raise ValueError(
                f"grpo.prefix_min_fraction={self.prefix_min_fraction}, prefix_max_fraction="
                f"{self.prefix_max_fraction}: need 0 <= min <= max < 1")

    def rollout(self) -> RolloutConfig:
        return RolloutConfig(
            num_generations=self.num_generations, max_new_tokens=self.max_completion_length,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            reward_funcs=self.reward_funcs, reward_weights=self.reward_weights,
            reward_timeout_s=self.reward_timeout_s, scale_rewards=self.scale_rewards,
            skip_nonfinite_rewards=self.skip_nonfinite_rewards,
            advantage_estimator=self.advantage_estimator,
            mask_truncated_completions=self.mask_truncated_completions,
        )

    def loss(self) -> GRPOLossConfig:
        return GRPOLossConfig(
            loss_type=self.loss_type, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
            importance_sampling_level=self.importance_sampling_level, beta=self.beta,
            max_completion_length=self.max_completion_length,
            cispo_epsilon_max=self.cispo_epsilon_max,
        )

    def uses_demonstrations(self) -> bool:
        return self.sft_weight > 0 or self.prefix_rft_ratio > 0

    def prefixes_per_group(self) -> int:
        if self.prefix_rft_ratio <= 0:
            return 0
        return max(1, round(self.prefix_rft_ratio * self.num_generations))


# -- prompts -------------------------------------------------------------------------------


def _prompt_rows(cfg: RunConfig, grpo: GRPOSection, which: str, stats=None) -> list[dict]:
    """Prompt rows (`prompt` + `answer` + other columns; `completion` = demonstration)."""
    if grpo.task == "arithmetic":
        n = cfg.data.max_train_rows if which == "train" else cfg.data.max_eval_rows
        if not n:
            raise ValueError(f"{cfg.source}: grpo.task=arithmetic needs data.max_"
                             f"{'train' if which == 'train' else 'eval'}_rows")
        records = arithmetic_records(
            arithmetic_config(grpo, prefix="arithmetic_"), n,
            split="train" if which == "train" else "test", seed=cfg.train.seed,
            source=f"arithmetic:{which}")
        if stats is not None:
            stats.rows_read += len(records)
    else:
        # GSM8K rows are read raw: both the prompt and (for hybrids) the demonstration
        # come from them below.
        raw = cfg.replace(data=dataclasses.replace(cfg.data, format="auto"))
        records = read_data_records(raw, which, stats=stats)
    if grpo.task == "arithmetic" or cfg.data.format == "gsm8k":
        kw = {} if grpo.instruction is None else {"instruction": grpo.instruction}
        prompts = convert_gsm8k(records, mode="prompt", **kw)
        if grpo.uses_demonstrations():
            demos = convert_gsm8k(records, mode="sft", **kw)
            for p, d in zip(prompts, demos, strict=True):
                p.data["completion"] = d.data["completion"]
        return prompts
    return records


def _demo_text(completion: Any) -> str:
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")
    return str(completion)


def _rollout_widths(batch: dict) -> tuple[int, int]:
    C = batch["completion_mask"].shape[1]
    return batch["input_ids"].shape[1] - C, C


def _pad_rollout(batch: dict, P: int, C: int, pad_id: int) -> dict:
    """Re-pad a rollout batch to prompt width P (left) and completion width C (right):
    the layout of `rollout_sequences` survives (the last prompt token stays at P-1)."""
    out = dict(batch)
    for prefix, (p, c) in (("", (P, C)), ("demo_", (P, None))):
        if prefix + "input_ids" not in batch:
            continue
        p0, c0 = _rollout_widths({k[len(prefix):]: v for k, v in batch.items()
                                  if k.startswith(prefix)})
        c = c0 if c is None else c
        for k in ("input_ids", "targets", "positions", "segment_ids"):
            fill = pad_id if k in ("input_ids", "targets") else 0
            out[prefix + k] = np.pad(batch[prefix + k], ((0, 0), (p - p0, c - c0)),
                                     constant_values=fill)
        out[prefix + "completion_mask"] = np.pad(batch[prefix + "completion_mask"],
                                                 ((0, 0), (0, c - c0)))
    return out


class SASRMixer:
    """SASR's step-wise choice between an SFT step and an RL step (host side): the one
    meaning of ``grpo.sft_schedule: adaptive``, as the SASR paper defines it (each step is
    all SFT or all RL, never a weighted mix; ``losses.grpo``'s weight schedules are the
    other, deterministic kinds).

    The first `warmup_steps` steps are SFT; the gradient norm of the last one is the
    reference `g_warmup`. After that each step is an SFT step with probability
    `p = g / (g + gamma * g_warmup)`, where `g` is the gradient norm of the latest SFT step
    (an SFT step's gradient is the SFT loss's alone): when the model drifts from the
    demonstrations, `g` grows and SFT comes back more often. Metrics reach the host one
    step late (the loop overlaps a step with fetching the previous one's metrics), so a
    decision uses norms up to two steps back, and the warm-up lasts until `g_warmup` has
    arrived. Draws are seeded by (seed, step): a run is reproducible."""

    def __init__(self, warmup_steps: int, gamma: float, seed: int):
        self.warmup_steps, self.gamma, self.seed = warmup_steps, gamma, seed
        self.steps = 0  # decisions made = steps served
        self.g_warmup: float | None = None
        self.g_last: float | None = None
        self.modes: dict[int, bool] = {}  # 1-based step -> was an SFT step (until observed)

    def probability(self) -> float:
        if self.steps < self.warmup_steps or self.g_warmup is None or self.g_last is None:
            return 1.0
        return self.g_last / max(self.g_last + self.gamma * self.g_warmup, 1e-12)

    def decide(self) -> tuple[bool, float]:
        p = self.probability()
        u = np.random.RandomState([self.seed, self.steps, 3]).uniform()
        sft = bool(u < p)
        self.steps += 1
        self.modes[self.steps] = sft
        return sft, p

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        sft = self.modes.pop(step, None)
        g = metrics.get("grad_norm")
        if not sft or g is None or not math.isfinite(g):
            return
        self.g_last = float(g)
        if step >= self.warmup_steps and self.g_warmup is None:
            self.g_warmup = float(g)

    def get_state(self) -> dict:
        return {"steps": self.steps, "g_warmup": self.g_warmup, "g_last": self.g_last}

    def set_state(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.g_warmup, self.g_last = state["g_warmup"], state["g_last"]
        self.modes = {}


# -- the batch source ----------------------------------------------------------------------


class GRPOSource:
    """Rollouts from the current policy, served as `steps_per_generation * num_iterations`
    optimizer mini-batches each. Checkpointed state: the prompt order and the rollout
    count; a resume restarts at the next rollout boundary (the partly used rollout is
    sampled again from the restored policy)."""

    def __init__(self, *, prompts, grpo: GRPOSection, rows_per_step: int, tokenizer,
                 eos_ids, pad_id, reward_funcs, graphdef, params_of_state, score_fn, seed,
                 shardings=None):
        self.prompts = prompts
        self.shardings = shardings  # the decode preset (`jaxpt.sharding.DecodeSharding`)
        # Mini-batches hold whole groups when they can (the shared-prompt layout needs it;
        # the flat layout uses the same split, so the layout never changes the math).
        self.whole_groups = rows_per_step % grpo.num_generations == 0
        self.grpo = grpo
        self.rollout_cfg = grpo.rollout()
        self.rows_per_step = rows_per_step
        self.prompts_per_rollout = rows_per_step * grpo.steps_per_generation // \
            grpo.num_generations
        self.tokenizer, self.eos_ids, self.pad_id = tokenizer, tuple(eos_ids), pad_id
        self.reward_funcs = reward_funcs
        self.graphdef, self.params_of_state, self.score_fn = graphdef, params_of_state, score_fn
        self.seed = seed
        self.rollouts = 0  # rollouts completed
        self.prompt_batches = 0  # sampling rounds done (the prompt cursor)
        self.served = 0
        self.buffer: list[dict] = []
        self.metrics: dict[str, float] = {}
        self.steps_served = 0
        self.train_times: dict[int, float] = {}  # step -> seconds its update took
        self.sasr = (SASRMixer(grpo.sft_warmup_steps, grpo.sasr_gamma, seed)
                     if grpo.sft_schedule == "adaptive" else None)

    # BatchSource protocol
    def get_state(self) -> dict:
        state = {"rollouts": self.rollouts, "prompt_batches": self.prompt_batches,
                 "seed": self.seed}
        if self.sasr is not None:
            state["sasr"] = self.sasr.get_state()
        return state

    def set_state(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"checkpoint data state was written with train.seed="
                             f"{state.get('seed')}, this run has {self.seed}")
        self.rollouts, self.buffer, self.served = int(state["rollouts"]), [], 0
        self.prompt_batches = int(state.get("prompt_batches", self.rollouts))
        if self.sasr is not None and "sasr" in state:
            self.sasr.set_state(state["sasr"])

    def _prompt_indices(self, k: int) -> np.ndarray:
        """Prompts of rollout k: a fresh seeded permutation per epoch over the prompts."""
        n = len(self.prompts)
        start = k * self.prompts_per_rollout
        idx = []
        for i in range(start, start + self.prompts_per_rollout):
            epoch, pos = divmod(i, n)
            perm = np.random.RandomState([self.seed, epoch]).permutation(n)
            idx.append(perm[pos])
        return np.asarray(idx)

    def next(self, state) -> dict[str, Any]:
        # Wait for the previous optimizer step here, so that its device time is reported as
        # `time/train` (see `observe`) and never counted as rollout time.
        t0 = time.perf_counter()
        jax.block_until_ready(state.params)
        if self.steps_served:
            self.train_times[self.steps_served] = time.perf_counter() - t0
        self.steps_served += 1
        if not self.buffer:
            self._rollout(state)
        batch = self.buffer.pop(0)
        batch["_metrics"] = dict(self.metrics) if self.served == 0 else {}
        self.served += 1
        if self.sasr is not None:
            sft, p = self.sasr.decide()
            batch["sft_mode"] = np.full(len(batch["advantages"]), float(sft), np.float32)
            batch["_metrics"].update({"sasr/p_sft": p, "sasr/sft_step": float(sft)})
        return batch

    def observe(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Called by the loop with each step's metrics (one step late: see SASRMixer);
        returns metrics to add to that step's row (its train time, when measured)."""
        if self.sasr is not None:
            self.sasr.observe(step, metrics)
        train = self.train_times.pop(step, None)
        return {} if train is None else {"time/train": train}

    def _rollout(self, state) -> None:
        grpo = self.grpo
        params = self.params_of_state(state)
        if grpo.dynamic_sampling:
            batch, metrics = self._dynamic_rounds(params)
        else:
            batch, _, metrics = self._sample_round(params)
        R = len(batch["advantages"])
        reuse = grpo.num_iterations > 1 or grpo.steps_per_generation > 1
        if reuse or grpo.beta > 0:
            scores = self.score_fn(state, batch, old=reuse, ref=grpo.beta > 0)
            batch.update(scores)
        rs = np.random.RandomState([self.seed, self.rollouts, 1])
        if self.whole_groups:  # shuffle groups, keep each group's rows together
            G = grpo.num_generations
            order = (rs.permutation(R // G)[:, None] * G + np.arange(G)).reshape(-1)
        else:
            order = rs.permutation(R)
        b = self.rows_per_step
        minis = []
        for s in range(grpo.steps_per_generation):
            rows = order[s * b:(s + 1) * b]
            minis.append({k: v[rows] for k, v in batch.items()})
        self.buffer = [dict(m) for _ in range(grpo.num_iterations) for m in minis]
        self.served = 0
        self.rollouts += 1
        self.metrics = {**metrics, "rollout": float(self.rollouts)}

    def _sample_round(self, params) -> tuple[dict, np.ndarray, dict]:
        """One round: the next `prompts_per_rollout` prompts, G samples each, rewards,
        advantages (and demonstrations / prefixes for the hybrids)."""
        grpo = self.grpo
        k = self.prompt_batches
        chosen = [self.prompts[i] for i in self._prompt_indices(k)]
        pb = prompt_batch(chosen, pad_id=self.pad_id, max_prompt_length=grpo.max_prompt_length)
        rng = jax.random.fold_in(jax.random.key(self.seed), k)
        prefixes = self._prefixes(chosen, k) if grpo.prefix_rft_ratio > 0 else None
        ro = sample_rollouts(
            self.graphdef, params, pb, tokenizer=self.tokenizer, cfg=self.rollout_cfg,
            eos_ids=self.eos_ids, rng=rng, pad_id=self.pad_id, reward_funcs=self.reward_funcs,
            prefixes_R=prefixes, shardings=self.shardings,
        )
        self.prompt_batches += 1
        batch = ro.batch
        if prefixes is not None and "prefix_lengths" not in batch:
            batch["prefix_lengths"] = np.zeros(len(batch["advantages"]), np.int32)
        if grpo.sft_weight > 0:
            batch.update(self._demonstrations(chosen, pb))
        return batch, ro.rewards_R, ro.metrics

    def _dynamic_rounds(self, params) -> tuple[dict, dict]:
        """DAPO dynamic sampling: sample rounds of fresh prompts until `prompts_per_rollout`
        groups whose rewards disagree are collected (or `max_sampling_rounds` is reached,
        then `DynamicSampler`'s fill policy completes the batch), so the batch keeps its
        shape. Reward metrics are those of the first round (the policy as it is)."""
        grpo, G = self.grpo, self.grpo.num_generations
        sampler = DynamicSampler(self.prompts_per_rollout, G, grpo.max_sampling_rounds,
                                 fill=grpo.dynamic_sampling_fill)
        rounds = []

        def one_round(r):
            batch, rewards_R, metrics = self._sample_round(params)
            rounds.append((batch, metrics))
            R = len(rewards_R)
            return rewards_R, {"round": np.full(R, r), "row": np.arange(R)}

        rewards_R, picked, info = dynamic_sample(one_round, sampler)
        widths = [_rollout_widths(b) for b, _ in rounds]
        P, C = max(w[0] for w in widths), max(w[1] for w in widths)
        padded = [_pad_rollout(b, P, C, self.pad_id) for b, _ in rounds]
        keys = [k for k in padded[0] if k != "advantages"]
        batch = {k: np.stack([padded[r][k][i] for r, i in zip(picked["round"], picked["row"],
                                                            strict=True)]) for k in keys}
        cfg = self.rollout_cfg
        advantages_R, _ = compute_advantages(rewards_R, G, scale_rewards=cfg.scale_rewards,
                                             estimator=cfg.advantage_estimator)
        if grpo.dynamic_sampling_fill == "zero_advantage":
            advantages_R = np.where(info["completion_is_padding"], 0.0, advantages_R)
        batch["advantages"] = np.asarray(advantages_R, np.float32)
        metrics = {
            **rounds[0][1],
            "dynamic_sampling/rounds": float(info["rounds"]),
            "dynamic_sampling/signal_groups": float(info["num_signal_groups"]),
            "dynamic_sampling/padded_groups": float(info["num_padded_groups"]),
            "time/rollout": float(sum(m["time/rollout"] for _, m in rounds)),
        }
        return batch, metrics

    def _demo_ids(self, ex) -> list[int]:
        demo = ex.columns.get("completion")
        if demo is None:
            return []
        return self.tokenizer(_demo_text(demo), add_special_tokens=False)["input_ids"]

    def _prefixes(self, chosen, round_no: int) -> list[list[int]]:
        """Per rollout row: a demonstration prefix (the first `prefixes_per_group` rows of
        each group) or [] (the policy's own rollout; also for prompts without one)."""
        grpo = self.grpo
        G, k = grpo.num_generations, grpo.prefixes_per_group()
        rs = np.random.RandomState([self.seed, round_no, 2])
        out = []
        for ex in chosen:
            demo = self._demo_ids(ex)[:grpo.max_demo_length]
            for g in range(G):
                if g >= k or len(demo) < 2:
                    out.append([])
                    continue
                frac = rs.uniform(grpo.prefix_min_fraction, grpo.prefix_max_fraction)
                out.append(demo[:max(1, int(frac * len(demo)))])
        return out

    def _demonstrations(self, chosen, pb) -> dict[str, np.ndarray]:
        """SFT rows for the demonstrations of this rollout's prompts (one per rollout row,
        so mini-batches split them with the rollout)."""
        G = self.grpo.num_generations
        tok = self.tokenizer
        T = self.grpo.max_demo_length
        rows = []
        for ex in chosen:
            ids = self._demo_ids(ex)
            if tok.eos_token_id is not None:
                ids = ids + [tok.eos_token_id]
            rows.append(ids[:T])
        demo_ids = np.full((len(chosen), T), self.pad_id, np.int32)
        demo_mask = np.zeros((len(chosen), T), np.float32)
        for i, ids in enumerate(rows):
            demo_ids[i, :len(ids)] = ids
            demo_mask[i, :len(ids)] = 1.0
        # Prompt + demonstration as one row, laid out like a rollout row.
        from jaxpt.train.rollout import rollout_sequences

        seq = rollout_sequences(pb["prompt_ids"], pb["prompt_mask"], demo_ids, demo_mask,
                                pad_id=self.pad_id)
        out = {f"demo_{k}": np.repeat(v, G, axis=0) for k, v in seq.items()}
        # Each prompt's demonstration appears G times (once per rollout row): weight 1/G.
        out["demo_completion_mask"] = out["demo_completion_mask"] / G
        return out


# -- loss, scoring, evaluation --------------------------------------------------------------


def make_grpo_loss_fn(graphdef, grpo: GRPOSection, *, impl: str, with_entropy: bool):
    loss_cfg = grpo.loss()
    T = grpo.temperature if grpo.temperature > 0 else 1.0

    def loss_fn(params, mb, rng, stats):
        model = nnx.merge(graphdef, params)
        if "group_input_ids" in mb:  # shared-prompt layout
            lp_RC, ent_RC = grouped_completion_logprobs(
                model, mb, impl=impl, with_entropy=with_entropy, temperature=T)
            mb = ungroup_rows(mb)
        else:
            lp_RC, ent_RC = completion_token_logprobs(
                model, mb, impl=impl, with_entropy=with_entropy, temperature=T)
        share = mb["advantages"].shape[0] / stats["rows"]
        rl_weight = stats.get("rl_weight", 1.0)
        rl_mask_RC = mb["completion_mask"]
        if "prefix_lengths" in mb:
            prefix_mask_RC, rl_mask_RC = prefix_rft_masks(mb["prefix_lengths"], rl_mask_RC)
        loss, metrics = grpo_loss(
            loss_cfg, lp_RC, mb.get("old_logprobs"), mb["advantages"], rl_mask_RC,
            ref_logprobs_BT=mb.get("ref_logprobs"), num_items_in_batch=stats["num_items"],
            entropy_BT=ent_RC, rl_weight=rl_weight,
        )
        if loss_cfg.loss_type not in ("dapo", "cispo"):
            loss = loss * share  # per-micro-batch means: average over micro-batches
        metrics = {k: v * share for k, v in metrics.items()}
        if "prefix_lengths" in mb:
            # The prefix NLL reuses the rollout log-probs, i.e. at the sampling temperature
            # (exactly the NLL when temperature = 1).
            prefix_nll = sft_nll(lp_RC, prefix_mask_RC, stats["prefix_tokens"])
            loss = loss + grpo.prefix_sft_weight * prefix_nll
            metrics["prefix_sft_loss"] = prefix_nll
        if "demo_input_ids" in mb:
            demo = {k[5:]: v for k, v in mb.items() if k.startswith("demo_")}
            lp_demo, _ = completion_token_logprobs(model, demo, impl=impl)
            nll = sft_nll(lp_demo, demo["completion_mask"], stats["demo_tokens"], 1e-6)
            loss = loss + stats["sft_weight"] * nll
            metrics["sft_loss"] = nll
            metrics["sft_weight"] = stats["sft_weight"] * share
        return loss, metrics

    return loss_fn


def make_batch_stats(grpo: GRPOSection):
    def stats(state, batch):
        if "group_input_ids" in batch:
            batch = ungroup_rows(batch)
        mask = batch["completion_mask"]
        out = {"rows": batch["advantages"].shape[0]}
        if "prefix_lengths" in batch:
            prefix_mask, mask = prefix_rft_masks(batch["prefix_lengths"], mask)
            out["prefix_tokens"] = jnp.sum(prefix_mask > 0, dtype=jnp.float32)
        out["num_items"] = jnp.sum(mask > 0, dtype=jnp.float32)
        if "demo_input_ids" in batch:
            kind = grpo.sft_schedule
            w = sft_weight_schedule(
                state.step, kind=kind, initial_weight=grpo.sft_weight, final_weight=0.0,
                decay_steps=max(grpo.sft_decay_steps, 1), warmup_steps=grpo.sft_warmup_steps,
            ) if kind not in ("constant", "adaptive") else jnp.asarray(grpo.sft_weight,
                                                                      jnp.float32)
            if "sft_mode" in batch:  # adaptive (SASR): the host chose SFT or RL for this step
                mode = batch["sft_mode"][0]
                w = grpo.sft_weight * mode
                out["rl_weight"] = 1.0 - mode
            out["sft_weight"] = w
            out["demo_tokens"] = jnp.sum(batch["demo_completion_mask"])
            if kind == "warmup_then_rl":
                out["rl_weight"] = rl_weight_schedule(state.step, kind,
                                                      warmup_steps=grpo.sft_warmup_steps)
        return out

    return stats


def make_eval_fn(graphdef, params_of_state, prompts, grpo: GRPOSection, *, tokenizer, eos_ids,
                 pad_id):
    """Greedy held-out evaluation with `jaxpt.evaluate.sample_and_verify` (the same code
    as `jaxpt eval`), verified by the first reward function: `eval_accuracy` (reward >= 1),
    `eval_mean_length`, `eval_clipped_ratio`; with a strict math verifier also
    `eval_accuracy_lenient` (last-number fallback), so both readings are on record."""
    from jaxpt.evaluate import sample_and_verify
    from jaxpt.rewards.math import math_reward

    max_new = grpo.eval_max_completion_length or grpo.max_completion_length
    eval_prompts = prompts[:grpo.eval_prompts]
    verifier = grpo.reward_funcs[0]

    def eval_fn(state) -> dict[str, float]:
        samples = sample_and_verify(
            graphdef, params_of_state(state), tokenizer, eval_prompts, 1,
            sampler=Sampler.greedy(), max_new_tokens=max_new, eos_ids=eos_ids, pad_id=pad_id,
            batch_size=grpo.eval_batch_size, verifier=verifier,
            reward_timeout_s=grpo.reward_timeout_s)
        first = [row[0] for row in samples]
        out = {
            "eval_accuracy": float(np.mean([s.correct for s in first])),
            "eval_mean_length": float(np.mean([len(s.token_ids) for s in first])),
            "eval_clipped_ratio": float(np.mean([s.finish_reason == "length" for s in first])),
        }
        if verifier == "math_strict":
            answers = [p.columns.get("answer") for p in eval_prompts]
            lenient = math_reward(None, [s.text for s in first], answer=answers)
            out["eval_accuracy_lenient"] = float(np.mean([r == 1.0 for r in lenient]))
        return out

    return eval_fn


# -- the trainer ---------------------------------------------------------------------------


def build_grpo_trainer(cfg: RunConfig, *, mesh=None) -> Trainer:
    grpo: GRPOSection = cfg.section("grpo")
    t = cfg.train
    G = grpo.num_generations
    if t.batch_size % G:
        raise ValueError(f"{cfg.source}: train.batch_size={t.batch_size} (completions per step)"
                         f" must be a multiple of grpo.num_generations={G}")
    if (t.batch_size * grpo.steps_per_generation) % G:
        raise ValueError(f"{cfg.source}: a rollout of train.batch_size x steps_per_generation "
                         f"completions must hold whole groups of {G}")
    if jax.process_count() > 1:
        raise NotImplementedError("multi-process GRPO rollouts are not supported yet")
    mesh = mesh or build_mesh(cfg)
    check_train_batch(cfg, mesh)
    bundle = load_model_bundle(cfg, mesh)
    tok = bundle.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos_ids = set(bundle.resolved.generation_eos_ids())
    if tok.eos_token_id is not None:
        eos_ids.add(tok.eos_token_id)
    reward_funcs = [get_reward_function(f) for f in grpo.reward_funcs]

    data_stats = {}

    def prompts(which):
        stats = DataStats()
        rows = _prompt_rows(cfg, grpo, which, stats=stats)
        ex, stats = prepare_prompts(rows, tok, max_prompt_length=grpo.max_prompt_length,
                                    skip_invalid=cfg.data.skip_invalid, stats=stats)
        if not ex:
            raise ValueError(f"{cfg.source}: no usable {which} prompts ({stats})")
        data_stats[which] = stats
        return ex

    train_prompts = prompts("train")
    total = t.max_steps
    if total is None:
        steps_per_epoch = len(train_prompts) * G / t.batch_size
        total = max(1, math.ceil(t.num_epochs * steps_per_epoch * grpo.num_iterations))
    tx, schedule = make_optimizer(cfg.optim, total)
    ts = build_train_state(bundle, cfg, tx, reference=grpo.beta > 0)
    loss_fn = make_grpo_loss_fn(bundle.graphdef, grpo, impl=t.logprob_impl,
                                with_entropy=t.with_entropy)
    step = make_train_step(loss_fn, tx, schedule, grad_accum=t.grad_accum,
                           batch_stats_fn=make_batch_stats(grpo), params_fn=ts.params_fn)
    keys = {"input_ids": 2, "targets": 2, "positions": 2, "segment_ids": 2,
            "completion_mask": 2, "advantages": 1}
    reuse = grpo.num_iterations > 1 or grpo.steps_per_generation > 1
    if reuse:
        keys["old_logprobs"] = 2
    if grpo.beta > 0:
        keys["ref_logprobs"] = 2
    if grpo.prefix_rft_ratio > 0:
        keys["prefix_lengths"] = 1
    if grpo.sft_schedule == "adaptive":
        keys["sft_mode"] = 1
    if grpo.sft_weight > 0:
        keys.update({f"demo_{k}": 2 for k in ("input_ids", "targets", "positions",
                                                "segment_ids", "completion_mask")})
    share = _use_shared_prompt(cfg, grpo, mesh)
    if share:  # per-row keys gain a group axis; the flat sequence keys become group rows
        keys = {**{k: 2 for k in GROUP_KEYS}, "completion_ids": 3,
                **{k: n + 1 for k, n in keys.items() if k not in FLAT_SEQUENCE_KEYS}}
    batch_sh = batch_shardings(keys, mesh)
    step_fn = compile_step(step, ts.shardings, batch_sh, mesh)
    # Rollouts decode under the decode preset: the policy is resharded to tensor-only
    # weights once per rollout, and the decoded rows are split over data x fsdp.
    decode_sh = decode_sharding(mesh)
    decode_params_sh = decode_sh.params(bundle.params)
    if ts.params_fn is identity_params:
        # The policy is the trained params themselves: device_put hands the same buffers
        # over where the decode layout is the train layout (one device), with no copy of
        # the weights per rollout (~0.3 s for SmolLM2-135M on CPU), and reshards otherwise.
        params_of_state = lambda s: jax.device_put(s.params, decode_params_sh)  # noqa: E731
    else:
        params_of_state = jax.jit(lambda s: ts.params_fn(s.params, s.frozen, None),
                                  out_shardings=decode_params_sh)
    score_fn = make_score_fn(bundle.graphdef, ts.params_fn, impl=t.logprob_impl,
                             temperature=grpo.temperature if grpo.temperature > 0 else 1.0,
                             batch_sh=batch_sh, mesh=mesh,
                             rows_per_call=t.batch_size, group_size=G if share else None)
    source = GRPOSource(
        prompts=train_prompts, grpo=grpo, rows_per_step=t.batch_size, tokenizer=tok,
        eos_ids=sorted(eos_ids), pad_id=pad_id, reward_funcs=reward_funcs,
        graphdef=bundle.graphdef, params_of_state=params_of_state, score_fn=score_fn,
        seed=t.seed, shardings=decode_sh,
    )
    eval_fn = None
    if grpo.task == "arithmetic" or cfg.data.eval is not None:
        eval_fn = make_eval_fn(bundle.graphdef, params_of_state, prompts("eval"), grpo,
                               tokenizer=tok, eos_ids=sorted(eos_ids), pad_id=pad_id)

    def host_batch(b):
        if share:
            b = group_rollout_rows({k: v for k, v in b.items() if not k.startswith("_")}, G)
        return put_batch({k: v for k, v in b.items() if k in keys}, batch_sh)

    return Trainer(
        cfg=cfg, mesh=mesh, state=ts.state, step_fn=step_fn, source=source,
        put_batch=host_batch, total_steps=total, eval_fn=eval_fn,
        tokens_fn=lambda b: int(np.sum(b["segment_ids"] > 0)), num_params=bundle.num_params,
        extras={"bundle": bundle, "trainable": ts, "tx": tx, "share_prompt": share},
        data_stats=data_stats["train"],
    )


def _use_shared_prompt(cfg: RunConfig, grpo: GRPOSection, mesh) -> bool:
    """Whether the train step packs each group as one shared-prompt row (``share_prompt``):
    it needs whole groups per micro-batch and per batch shard."""
    if grpo.share_prompt == "never":
        return False
    G, t = grpo.num_generations, cfg.train
    groups, problem = t.batch_size // G, None
    if t.batch_size % G:
        problem = f"train.batch_size={t.batch_size} is not a multiple of num_generations={G}"
    elif groups % t.grad_accum:
        problem = f"its {groups} groups do not split into train.grad_accum={t.grad_accum}"
    elif groups % batch_divisor(mesh):
        problem = f"its {groups} groups do not split over the {batch_divisor(mesh)} batch shards"
    if problem is not None:
        if grpo.share_prompt == "always":
            raise ValueError(f"{cfg.source}: grpo.share_prompt=always packs each group of {G} "
                             f"completions into one row, but {problem}")
        return False
    return True


def _print_summary(cfg: RunConfig) -> None:
    from jaxpt.train.report import print_run_summary

    print_run_summary(cfg.out_dir, curve_key="reward", eval_key="eval_accuracy")


train_grpo = register_builder("grpo", build_grpo_trainer, after=_print_summary)
