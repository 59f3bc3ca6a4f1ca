"""SFT+RL hybrids on the host: the demonstrations of a rollout's prompts, Prefix-RFT's
demonstration prefixes, and SASR's per-step choice between an SFT and an RL step.

Axis legend: B prompts, G completions per prompt, R = B*G rollout rows, T demonstration
tokens (``max_demo_length``).

A demonstration is a prompt's ``completion`` column (GSM8K's worked answer for GSM8K and
the arithmetic task). The losses these feed are ``jaxpt.losses.grpo``'s ``sft_nll`` (with
its weight schedules) and ``prefix_rft_masks``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxpt.rl.layout import TokenRows, rollout_sequences
from jaxpt.rl.streams import RandomStreams


def demo_text(completion: Any) -> str:
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")
    return str(completion)


@dataclasses.dataclass
class Demonstrations:
    """The demonstrations of prompts, tokenized (prompts without one have none)."""

    tokenizer: Any
    pad_id: int
    max_length: int  # T
    group_size: int  # G

    def ids(self, ex) -> list[int]:
        demo = ex.columns.get("completion")
        if demo is None:
            return []
        return self.tokenizer(demo_text(demo), add_special_tokens=False)["input_ids"]

    def rows(self, chosen: Sequence[Any], prompt_batch: dict[str, Any]) -> TokenRows:
        """SFT rows (prompt + demonstration + EOS, laid out like rollout rows) for the
        rollout rows of ``chosen`` (R = B*G: each prompt's row G times, so mini-batches
        split them with the rollout), completion mask weighted 1/G."""
        G, T, tok = self.group_size, self.max_length, self.tokenizer
        rows = []
        for ex in chosen:
            ids = self.ids(ex)
            if tok.eos_token_id is not None:
                ids = ids + [tok.eos_token_id]
            rows.append(ids[:T])
        demo_ids = np.full((len(chosen), T), self.pad_id, np.int32)
        demo_mask = np.zeros((len(chosen), T), np.float32)
        for i, ids in enumerate(rows):
            demo_ids[i, :len(ids)] = ids
            demo_mask[i, :len(ids)] = 1.0
        seq = rollout_sequences(prompt_batch["prompt_ids"], prompt_batch["prompt_mask"],
                                demo_ids, demo_mask, pad_id=self.pad_id)
        seq = TokenRows(*(np.repeat(getattr(seq, f.name), G, axis=0)
                          for f in dataclasses.fields(TokenRows)))
        # Each prompt's demonstration appears G times (once per rollout row): weight 1/G.
        return dataclasses.replace(seq, completion_mask=seq.completion_mask / G)


@dataclasses.dataclass
class PrefixRFT:
    """Prefix-RFT's prefixes: the first ``per_group`` rollouts of each group start from a
    prefix of the prompt's demonstration, a fraction of its tokens drawn uniformly from
    [``min_fraction``, ``max_fraction``] (stream ``prefix_fractions`` of the round)."""

    demos: Demonstrations
    per_group: int
    min_fraction: float
    max_fraction: float
    streams: RandomStreams

    def __call__(self, chosen: Sequence[Any], round_no: int) -> list[list[int]]:
        """Per rollout row: a demonstration prefix, or [] (the policy's own rollout; also
        for prompts without a demonstration of two tokens or more)."""
        G = self.demos.group_size
        rs = self.streams.host("prefix_fractions", round_no)
        out = []
        for ex in chosen:
            demo = self.demos.ids(ex)[:self.demos.max_length]
            for g in range(G):
                if g >= self.per_group or len(demo) < 2:
                    out.append([])
                    continue
                frac = rs.uniform(self.min_fraction, self.max_fraction)
                out.append(demo[:max(1, int(frac * len(demo)))])
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

    name = "sasr"  # its state's key in the source's checkpointed state

    def __init__(self, warmup_steps: int, gamma: float, seed: int):
        self.warmup_steps, self.gamma = warmup_steps, gamma
        self.streams = RandomStreams(seed)
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
        u = self.streams.host("sasr", self.steps).uniform()
        sft = bool(u < p)
        self.steps += 1
        self.modes[self.steps] = sft
        return sft, p

    def serve(self, batch):
        """The batch of the next step with its mode (``sft_mode`` [R]: 1.0 SFT, 0.0 RL),
        and the decision's metrics."""
        sft, p = self.decide()
        mode_R = np.full(len(batch.advantages), float(sft), np.float32)
        return (dataclasses.replace(batch, sft_mode=mode_R),
                {"sasr/p_sft": p, "sasr/sft_step": float(sft)})

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
