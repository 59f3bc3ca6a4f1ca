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
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxpt.algorithms.registry import register_trainer
from jaxpt.algorithms.sft import build_sft_trainer
from jaxpt.config import ConfigError, RunConfig, config_to_dict, register_section
from jaxpt.data.gsm8k import convert_gsm8k
from jaxpt.data.pipeline import prepare_prompts
from jaxpt.data.tasks.arithmetic import arithmetic_config, arithmetic_records
from jaxpt.distributed import is_primary
from jaxpt.engine.build import load_model_bundle, model_params, read_data_records
from jaxpt.engine.checkpoint import StopFlag
from jaxpt.engine.loop import LoopResult, run
from jaxpt.evaluate import evaluate
from jaxpt.rl import processes
from jaxpt.rl.rejection import SAMPLES, SUMMARY, TRAIN, finished_stage, rejection_sample, write_json
from jaxpt.sampling.samplers import Sampler
from jaxpt.sampling.text import default_stop_ids

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


def _say(msg: str) -> None:
    if is_primary():
        print(msg, flush=True)


def _write_summary(path: Path, summary: dict) -> None:
    if is_primary():
        write_json(path, summary)


def rft_prompt_records(cfg: RunConfig, which: str):
    """Prompt records for ``which`` = "train" (sampling) or "eval" (held-out), or None."""
    a = cfg.section("rft").arithmetic
    n = a.train if which == "train" else a.eval
    if n:
        split = "train" if which == "train" else "test"
        records = arithmetic_records(arithmetic_config(a), n, split=split, seed=a.seed,
                                     source=f"<arithmetic {split} seed={a.seed}>")
        return convert_gsm8k(records, mode="prompt")
    if (cfg.data.train if which == "train" else cfg.data.eval) is not None:
        return read_data_records(cfg, which, gsm8k_mode="prompt")
    if which == "train":
        raise ConfigError(f"{cfg.source}: rft needs data.train or rft.arithmetic.train")
    return None


def sampling_fingerprint(cfg: RunConfig) -> str:
    """Hash of everything that determines the sampling stage's output."""
    rcfg = config_to_dict(cfg)["rft"]
    for k in ("eval_before", "eval_after", "eval_max_new_tokens", "eval_batch_size",
              "reuse_samples"):
        rcfg.pop(k, None)
    data = ("train", "train_split", "format", "max_train_rows", "skip_invalid")
    key = {"rft": rcfg, "model": config_to_dict(cfg)["model"],
           "data": {k: getattr(cfg.data, k) for k in data}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def sft_config(cfg: RunConfig, train_path: Path) -> RunConfig:
    """The SFT stage's config: the kept rows as ``data.train``, no ``data.eval``, no
    ``rft`` section, ``algorithm: sft``; every other setting as in ``cfg``."""
    data = dataclasses.replace(cfg.data, train=str(train_path), train_split=None,
                               format="auto", max_train_rows=None, eval=None, eval_split=None,
                               max_eval_rows=None)
    sections = {k: v for k, v in cfg.sections.items() if k != "rft"}
    return cfg.replace(algorithm="sft", data=data, sections=types.MappingProxyType(sections))


def _stop_ids(bundle):
    return default_stop_ids(bundle.tokenizer, extra=bundle.resolved.generation_eos_ids())


def _held_out(cfg: RunConfig, bundle, params, records) -> dict[str, float]:
    """Greedy pass@1 (and answer rate, length, clipping) on the held-out prompts."""
    rcfg: RFTConfig = cfg.section("rft")
    prompts, _ = prepare_prompts(records, bundle.tokenizer,
                                 max_prompt_length=rcfg.max_prompt_length)
    res = evaluate(bundle.graphdef, params, bundle.tokenizer, prompts, num_samples=1,
                   sampler=Sampler.greedy(),
                   max_new_tokens=rcfg.eval_max_new_tokens or rcfg.max_new_tokens,
                   eos_ids=_stop_ids(bundle), batch_size=rcfg.eval_batch_size,
                   verifier=rcfg.verifier, threshold=rcfg.threshold,
                   reward_timeout_s=rcfg.reward_timeout_s,
                   progress="held-out eval" if cfg.logging.progress else False)
    keys = ("pass@1", "answer_rate", "mean_tokens", "clipped_ratio", "num_prompts")
    return {f"eval_{k}": v for k, v in res.metrics.items() if k in keys}


def _sample_and_keep(cfg: RunConfig, bundle, rdir: Path) -> dict[str, Any]:
    """The sampling stage on the training prompts; its summary (raises when none is kept)."""
    rcfg: RFTConfig = cfg.section("rft")
    prompts, pstats = prepare_prompts(rft_prompt_records(cfg, "train"), bundle.tokenizer,
                                      max_prompt_length=rcfg.max_prompt_length)
    if not prompts:
        raise ConfigError(f"{cfg.source}: no usable prompts for rft ({pstats})")
    _say(f"rft: sampling on {len(prompts)} prompts ({pstats.dropped_too_long} dropped as "
         "longer than rft.max_prompt_length)")
    counts = rejection_sample(bundle.graphdef, bundle.params, bundle.tokenizer, prompts, rcfg,
                              rdir, eos_ids=_stop_ids(bundle),
                              progress=cfg.logging.progress and is_primary(),
                              write=is_primary(), log=_say)
    summary = {"fingerprint": sampling_fingerprint(cfg), "prompts": len(prompts),
               "prompts_dropped_too_long": pstats.dropped_too_long, **counts,
               "train_file": str(rdir / TRAIN)}
    if not summary["kept"]:
        _write_summary(rdir / SUMMARY, summary)
        raise ValueError(
            f"rft: no verified-correct samples among {summary['samples']} on {len(prompts)} "
            f"prompts (see {rdir / SAMPLES}); raise rft.num_samples / rft.budget / "
            "rft.max_new_tokens or use easier prompts")
    summary["complete"] = True
    _say(f"rft: kept {summary['kept']} samples from {summary['prompts_solved']}/"
         f"{len(prompts)} solved prompts -> {rdir / TRAIN}")
    return summary


@register_trainer("rft")
def train_rft(
    cfg: RunConfig,
    *,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
    stop: StopFlag | None = None,
) -> LoopResult:
    """Sample, keep verified-correct, SFT on them (module doc). Returns the SFT loop's
    result, with the held-out accuracy (``eval_pass@1`` ...) in ``eval_metrics``."""
    rcfg: RFTConfig = cfg.section("rft")
    rdir = Path(cfg.out_dir) / "rft"
    rdir.mkdir(parents=True, exist_ok=True)
    summary = finished_stage(rdir, sampling_fingerprint(cfg)) if rcfg.reuse_samples else {}
    # Every process has read the stage before process 0 may write it (all take one path).
    processes.barrier("jaxpt rft: stage read")
    if summary:
        _say(f"rft: reusing the finished sampling stage in {rdir} ({summary['kept']} kept "
             "samples)")
    eval_records = rft_prompt_records(cfg, "eval")
    need_before = rcfg.eval_before and eval_records is not None and "eval_before" not in summary
    if not summary or need_before:
        bundle = load_model_bundle(cfg)
        if need_before:
            before = _held_out(cfg, bundle, bundle.params, eval_records)
            _say("rft: held-out before SFT: " + ", ".join(f"{k} {v:.4g}" for k, v in
                                                         before.items()))
        summary = summary or _sample_and_keep(cfg, bundle, rdir)
        if need_before:
            summary["eval_before"] = before
        _write_summary(rdir / SUMMARY, summary)
        del bundle
    processes.barrier("jaxpt rft: stage written")  # train.jsonl is there for every process

    try:
        trainer = build_sft_trainer(sft_config(cfg, rdir / TRAIN))
    except ValueError as e:
        raise ValueError(f"rft: SFT on the {summary['kept']} kept samples in {rdir / TRAIN}: "
                         f"{e}") from e
    result = run(trainer, callbacks=callbacks, stop=stop)
    if rcfg.eval_after and eval_records is not None and result.reason == "done":
        params = model_params(trainer.parts.trainable, result.state)
        after = _held_out(cfg, trainer.parts.bundle, params, eval_records)
        summary["eval_after"] = after
        _write_summary(rdir / SUMMARY, summary)
        result.eval_metrics = {**result.eval_metrics, **after}
        for cb in callbacks:
            cb(result.step, after)
        was = summary.get("eval_before", {}).get("eval_pass@1")
        msg = f"rft: held-out pass@1 after SFT {after['eval_pass@1']:.4f}"
        _say(msg + (f" (before {was:.4f})" if was is not None else ""))
    return result
