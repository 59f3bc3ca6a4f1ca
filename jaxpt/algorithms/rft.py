"""Rejection-sampling fine-tuning (RFT): sample, verify, keep the verified samples, SFT on
them, report held-out accuracy.

A run (``jaxpt rft CONFIG`` or ``jaxpt train CONFIG`` with ``algorithm: rft``):

1. **Prompts**: ``data.train`` (``data.format: gsm8k`` rows become prompt rows with an
   ``answer`` column), or generated arithmetic word problems (``rft.arithmetic.train: N``).
2. **Rejection sampling** with the starting model (:mod:`jaxpt.rl.rejection`: DART rounds,
   verification, selection, ``<out_dir>/rft/{samples,train}.jsonl``).
3. **SFT** on the kept samples with the SFT trainer: the run config becomes an SFT config
   (:func:`sft_config`) whose ``data.train`` is ``rft/train.jsonl``; ``optim``, ``train``,
   ``lora``, ``sft`` and ``data.max_length``/``packing`` apply as in an SFT run, and its
   ``config.yaml`` lands in ``out_dir`` (``jaxpt eval|export OUT_DIR`` work).
4. **Held-out accuracy** (optional): greedy pass@1 on ``data.eval`` (or
   ``rft.arithmetic.eval`` generated test problems) before and/or after the SFT.

``rft/summary.json`` holds the per-round counts, totals and held-out accuracy. A rerun
with the same sampling settings reuses a finished sampling stage (so an interrupted SFT
resumes from its checkpoint on the same data).

Several processes (one per host): every process runs the same stages on the same prompts
(``jaxpt.rl.rejection``: the same samples, verdicts and DART allocation everywhere);
process 0 alone writes ``rft/*`` and prints, and every process waits at a barrier before
it reads what process 0 wrote (the stage's files, the summary), so all of them take the
same path (reuse or sample) and run the same collectives. The SFT stage is the
multi-process SFT run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Literal

from jaxpt.config import RunConfig, config_to_dict, register_section
from jaxpt.sampling.samplers import Sampler

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class ArithmeticSection:
    """``rft.arithmetic``: generated arithmetic problems; 0 rows = off. The task keys are
    :class:`~jaxpt.data.tasks.arithmetic.ArithmeticConfig`'s (built by ``arithmetic_config``);
    only these four are exposed, so the sampling fingerprint of existing runs is kept."""

    train: int = 0  # problems to sample on (replaces data.train)
    eval: int = 0  # held-out problems (test split; replaces data.eval)
    seed: int = 0
    min_operands: int = 2
    max_operands: int = 3
    max_digits: int = 2
    ops: str = "+-"


@register_section("rft")
@dataclasses.dataclass(frozen=True)
class RFTConfig:
    """The ``rft:`` section (the SFT stage uses the normal sections; see module doc)."""

    num_samples: int = 4  # k: samples per prompt in round 1
    min_correct: int = 1  # m: usable samples wanted per prompt
    rounds: int = 3  # sampling rounds at most (round 1 included)
    budget: int | None = None  # total samples over all rounds; None: rounds * k * N
    max_samples_per_prompt: int | None = None  # over all rounds; None: no cap
    max_samples_per_round: int = 32  # one prompt's allocation in one round (rounds >= 2)
    keep_per_prompt: int | None = None  # kept samples per prompt; None: min_correct
    keep_truncated: bool = False  # keep samples cut at max_new_tokens (no stop token)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = 256
    max_prompt_length: int = 512  # longer prompts are dropped (counted in the summary)
    batch_size: int = 32  # decoded rows per generate call
    # Decode loop of the sampling rounds (`jaxpt.sampling.continuous`): "continuous" keeps
    # batch_size rows decoding and refills a finished row's slot with the next sample, so
    # a round costs about the sum of the lengths, not rows x the longest. Its samples are
    # other draws than the static loop's (same seed), so it is part of the fingerprint.
    engine: Literal["static", "continuous"] = "static"
    verifier: str = "math"  # reward name or package.module:function
    threshold: float = 1.0  # reward >= threshold means correct
    reward_timeout_s: float = 60.0
    seed: int = 0
    arithmetic: ArithmeticSection = ArithmeticSection()
    eval_before: bool = False  # greedy pass@1 on the held-out prompts before SFT
    eval_after: bool = True  # ... and after SFT (when held-out prompts are configured)
    eval_max_new_tokens: int | None = None  # default: max_new_tokens
    eval_batch_size: int = 16  # held-out prompts decoded together
    reuse_samples: bool = True  # reuse a finished sampling stage with the same settings

    def __post_init__(self):
        positive = ("num_samples", "min_correct", "rounds", "max_samples_per_round",
                    "max_new_tokens", "max_prompt_length", "batch_size", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"rft.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("budget", "max_samples_per_prompt", "keep_per_prompt", "eval_max_new_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"rft.{name} must be >= 1 or null, got {v}")
        if self.engine not in ("static", "continuous"):
            raise ValueError(f"rft.engine={self.engine!r}; expected 'static' or 'continuous'")
        if self.temperature <= 0:
            raise ValueError(
                f"rft.temperature must be > 0 (greedy samples are all identical), "
                f"got {self.temperature}"
            )
        a = self.arithmetic
        if a.train < 0 or a.eval < 0:
            raise ValueError("rft.arithmetic.train / eval must be >= 0")

    @property
    def keep(self) -> int:
        return self.min_correct if self.keep_per_prompt is None else self.keep_per_prompt

    def sampler(self) -> Sampler:
        return Sampler(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       min_p=self.min_p)


# ----------------------------------------------------------------------------- the run


def sampling_fingerprint(cfg: RunConfig) -> str:
    """Hash of everything that determines the sampling stage's output."""
    rcfg = config_to_dict(cfg)["rft"]
    for k in ("eval_before", "eval_after", "eval_max_new_tokens", "eval_batch_size",
              "reuse_samples"):
        rcfg.pop(k, None)
    if rcfg.get("engine") == "static":  # the default: runs from before the key keep theirs
        rcfg.pop("engine")
    data = ("train", "train_split", "format", "max_train_rows", "skip_invalid")
    key = {"rft": rcfg, "model": config_to_dict(cfg)["model"],
           "data": {k: getattr(cfg.data, k) for k in data}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
