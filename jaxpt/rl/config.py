"""The config keys on-policy algorithms share (names follow TRL's GRPOConfig where TRL has
the option): prompts, rollouts, rewards, dynamic sampling, mini-batches over a rollout, the
train-step layout and the held-out evaluation. An algorithm's section subclasses
:class:`OnPolicySection` and adds its own keys (``jaxpt.algorithms.grpo.GRPOSection``)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxpt.data.tasks.arithmetic import arithmetic_config
from jaxpt.rl.episodes import EpisodeConfig
from jaxpt.rl.evaluation import HeldOutEval
from jaxpt.rl.prompts import PromptSpec
from jaxpt.rl.rollout import RolloutConfig


@dataclasses.dataclass(frozen=True)
class OnPolicySection:
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
    arithmetic_test_fraction: float = 0.1  # share of the problem space held out (by hash)
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
    mask_truncated_completions: bool = False
    # Decode loop of the rollouts and the held-out eval (`jaxpt.sampling.continuous`):
    # "continuous" decodes `rollout_slots` rows at a time (0: all), refilling a finished
    # row's slot with the next (prompt, sample); one device only.
    rollout_engine: Literal["static", "continuous"] = "static"
    rollout_slots: int = 0
    # Multi-turn rollouts (`jaxpt.rl.episodes`): each rollout row talks to its own
    # environment (`jaxpt.rl.environments`: single_turn, tool_use, self_correction, or
    # "package.module:Class") built with `environment_options`; `tools` alone (TRL's
    # GRPOTrainer(tools=...)) means the tool_use environment with those tools. Tool outputs
    # and environment turns never train. `max_completion_length` bounds each model turn,
    # `max_turns` the model turns, `max_trajectory_length` prompt + all turns (default:
    # max_prompt_length + max_turns * max_completion_length + 256 for the environment).
    environment: str | None = None
    environment_options: dict = dataclasses.field(default_factory=dict)
    tools: tuple[str, ...] = ()
    max_tool_calling_iterations: int = 3  # tool_use: tool calls per trajectory (TRL's name)
    max_turns: int = 4
    max_trajectory_length: int | None = None
    environment_workers: int = 1  # threads running the environments' steps of a turn
    # DAPO dynamic sampling: drop groups whose rewards all agree and sample more prompts
    # until the batch is full, at most `max_sampling_rounds` rounds per rollout.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    dynamic_sampling_fill: Literal["repeat", "zero_advantage"] = "repeat"
    # Optimization over a rollout.
    num_iterations: int = 1  # mu: passes over each rollout
    steps_per_generation: int = 1  # optimizer steps (mini-batches) per pass
    # Train-step layout: "auto" packs each group as one row [prompt | G completions] with
    # the prompt shared (it goes through the decoder once, not G times, and attention
    # covers only the prompt and each completion's own block, so it is never dearer than
    # G rows) whenever whole groups fit the micro-batches and batch shards; "always"
    # raises where they do not; "never" keeps one row per completion.
    share_prompt: Literal["auto", "always", "never"] = "auto"
    # Held-out evaluation (greedy): accuracy of the first reward function.
    eval_prompts: int = 64
    eval_batch_size: int = 32
    eval_max_completion_length: int | None = None  # default: max_completion_length

    def reuses_rollouts(self) -> bool:
        """Whether a rollout feeds several optimizer steps (then old log-probs are scored)."""
        return self.num_iterations > 1 or self.steps_per_generation > 1

    def rollout(self) -> RolloutConfig:
        return RolloutConfig(
            num_generations=self.num_generations, max_new_tokens=self.max_completion_length,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            reward_funcs=self.reward_funcs, reward_weights=self.reward_weights,
            reward_timeout_s=self.reward_timeout_s,
            skip_nonfinite_rewards=self.skip_nonfinite_rewards,
            mask_truncated_completions=self.mask_truncated_completions,
            engine=self.rollout_engine, slots=self.rollout_slots, episodes=self.episodes(),
        )

    def episodes(self) -> EpisodeConfig | None:
        """The multi-turn rollout's settings; None where rollouts are single completions."""
        if self.environment is None and not self.tools:
            return None
        name = self.environment or "tool_use"
        options = dict(self.environment_options)
        if name == "tool_use":
            options.setdefault("tools", list(self.tools) or ["calculator"])
            options.setdefault("max_tool_calls", self.max_tool_calling_iterations)
        elif self.tools:
            raise ValueError(f"tools={list(self.tools)} go with environment: tool_use (or "
                             f"environment_options of {name!r}), not environment: {name}")
        total = self.max_trajectory_length or (
            self.max_prompt_length + self.max_turns * self.max_completion_length + 256)
        return EpisodeConfig(name, tuple(sorted(options.items())), max_turns=self.max_turns,
                             max_total_tokens=total, step_workers=self.environment_workers)

    def prompts(self, *, section: str, demonstrations: bool) -> PromptSpec:
        arithmetic = (arithmetic_config(self, prefix="arithmetic_")
                      if self.task == "arithmetic" else None)
        return PromptSpec(self.task, self.max_prompt_length, self.instruction, arithmetic,
                          demonstrations=demonstrations, section=section)

    def held_out(self) -> HeldOutEval:
        return HeldOutEval(
            prompts=self.eval_prompts, batch_size=self.eval_batch_size,
            max_new_tokens=self.eval_max_completion_length or self.max_completion_length,
            verifier=self.reward_funcs[0] if self.reward_funcs else None,
            reward_timeout_s=self.reward_timeout_s,
            engine=self.rollout_engine)
