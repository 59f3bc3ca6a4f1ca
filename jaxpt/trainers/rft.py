"""The rejection-sampling fine-tuning run: sample completions of the train prompts, keep
the verified ones (``jaxpt.rl.rejection``), write them once, then an SFT run on them
(``jaxpt.trainers.sft``), with held-out accuracy before and after.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxpt.algorithms.rft import RFTConfig, sampling_fingerprint
from jaxpt.config import ConfigError, RunConfig
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
from jaxpt.trainers.registry import register_trainer
from jaxpt.trainers.sft import build_sft_trainer


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


def aot_programs(cfg: RunConfig, bundle) -> list:
    """For ``jaxpt plan --compile``, in the order the run executes them: the rejection
    sampling's prefill and decode loop (``rft.batch_size`` rows of one sample each, prompts
    of ``rft.max_prompt_length`` tokens, ``rft.max_new_tokens`` new ones), the held-out
    evaluation's (greedy, ``rft.eval_batch_size`` prompts) when the run has held-out
    prompts and ``eval_before`` / ``eval_after``, and the SFT stage's train step
    (``jaxpt.trainers.sft.aot_programs`` on :func:`sft_config`). Sampling and evaluation
    call ``jaxpt.sampling.generate`` without the decode preset (``jaxpt.rl.aot``'s
    ``sampling_programs`` with no shardings), on the params in their training shardings."""
    from jaxpt.rl.aot import sampling_programs
    from jaxpt.trainers import sft

    rcfg: RFTConfig = cfg.section("rft")
    engine = rcfg.engine
    if engine != "static":
        raise NotImplementedError(f"{cfg.source}: rft.engine={engine!r}: --compile lists the "
                                  "static engine's programs only")
    out = sampling_programs(bundle, "sampling", prompts=rcfg.batch_size,
                            prompt_length=rcfg.max_prompt_length, num_samples=1,
                            max_new_tokens=rcfg.max_new_tokens, sampler=rcfg.sampler())
    held_out = rcfg.arithmetic.eval > 0 or cfg.data.eval is not None
    if held_out and (rcfg.eval_before or rcfg.eval_after):
        out += sampling_programs(bundle, "held-out", prompts=rcfg.eval_batch_size,
                                 prompt_length=rcfg.max_prompt_length, num_samples=1,
                                 max_new_tokens=rcfg.eval_max_new_tokens or rcfg.max_new_tokens,
                                 sampler=Sampler.greedy())
    return out + sft.aot_programs(sft_config(cfg, Path(cfg.out_dir) / "rft" / TRAIN), bundle)


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
