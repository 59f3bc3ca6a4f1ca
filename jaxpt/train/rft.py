"""Rejection-sampling fine-tuning (RFT) with difficulty-aware sample allocation (DART).

Axis legend: N prompts; per prompt i, n_i samples drawn so far, c_i of them usable.

A run (``jaxpt rft CONFIG`` or ``jaxpt train CONFIG`` with ``algorithm: rft``):

1. **Prompts**: ``data.train`` (``data.format: gsm8k`` rows become prompt rows with an
   ``answer`` column), or generated arithmetic word problems (``rft.arithmetic.train: N``,
   :func:`jaxpt.data.tasks.arithmetic.generate_arithmetic`).
2. **Sampling rounds** with the starting model. Round 1 draws ``rft.num_samples`` (k)
   samples for every prompt; every sample is verified (``rft.verifier``, default the math
   verifier against ``answer``). A sample is *usable* when its reward is
   ``>= rft.threshold``, its text is not empty, and it ended with a stop token (or
   ``rft.keep_truncated``). Later rounds allocate samples with :func:`dart_allocation`
   (the exact rule is in its docstring): prompts with fewer than ``rft.min_correct`` (m)
   usable samples get samples in inverse proportion to their estimated pass rate, so hard
   prompts get more. Rounds stop when every prompt has m usable samples (or hit
   ``rft.max_samples_per_prompt``), when ``rft.budget`` samples have been drawn, or after
   ``rft.rounds`` rounds.
3. **Selection**: per prompt, the first ``rft.keep_per_prompt`` (default m) usable samples
   with distinct texts, in drawing order. Prompts never solved contribute nothing (that is
   the bias DART's extra samples reduce). Only verified samples are ever written.
4. **SFT** on the kept samples with the normal SFT trainer (``jaxpt.train.sft``): they are
   written as prompt-completion rows to ``<out_dir>/rft/train.jsonl`` and the run config
   is turned into an SFT config whose ``data.train`` is that file (``data.eval`` is
   dropped: it holds prompts, not solutions). ``optim``, ``train``, ``lora``, ``sft`` and
   ``data.max_length``/``packing`` apply as in an SFT run; the SFT run's ``config.yaml``
   lands in ``out_dir``, so ``jaxpt eval OUT_DIR`` and ``jaxpt export OUT_DIR`` work.
5. **Held-out accuracy** (optional): greedy pass@1 on ``data.eval`` (or
   ``rft.arithmetic.eval`` generated test problems) before and/or after the SFT.

Outputs in ``<out_dir>/rft/``: ``samples.jsonl`` (every sample: round, prompt row,
completion, extracted answer, reward, correct, usable, kept), ``train.jsonl`` (the kept
rows), ``summary.json`` (per-round counts, totals, held-out accuracy). A rerun with the
same sampling settings reuses a finished sampling stage (so an interrupted SFT resumes
from its checkpoint on the same data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxpt.config import ConfigError, RunConfig, config_to_dict, register_section
from jaxpt.data.tasks.arithmetic import arithmetic_config, arithmetic_records
from jaxpt.train.checkpoint import StopFlag
from jaxpt.train.loop import LoopResult
from jaxpt.train.registry import register_trainer

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
        positive = (
            "num_samples",
            "min_correct",
            "rounds",
            "max_samples_per_round",
            "max_new_tokens",
            "max_prompt_length",
            "batch_size",
            "eval_batch_size",
        )
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

    def sampler(self):
        from jaxpt.sampling.samplers import Sampler

        return Sampler(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p
        )


# ----------------------------------------------------------------------------- allocation


def dart_allocation(
    num_samples: Sequence[int],
    num_correct: Sequence[int],
    *,
    min_correct: int,
    budget_left: int,
    max_per_round: int,
    max_per_prompt: int | None = None,
) -> np.ndarray:
    """Samples to draw for each prompt in the next round (int64 [N]).

    The rule, for prompt i with ``n_i`` samples drawn and ``c_i`` usable so far:

    1. Done (gets 0) when ``c_i >= min_correct`` or ``n_i >= max_per_prompt``.
    2. Otherwise its pass rate is estimated as ``p_i = (c_i + 1) / (n_i + 2)`` (Laplace's
       rule: a prompt never solved still has a positive estimate that shrinks with every
       failure), and it *wants* ``w_i = ceil((min_correct - c_i) / p_i)`` samples, the
       expected number needed for the missing usable samples, capped at ``max_per_round``
       and at ``max_per_prompt - n_i``. Lower pass rate -> more samples.
    3. If ``sum(w) <= budget_left`` every prompt gets ``w_i``. Otherwise the budget is
       split in proportion: ``a_i = floor(w_i * budget_left / sum(w))``, and the samples
       left over by the rounding go one at a time to the prompts with the lowest ``p_i``
       first (ties: lower index), never above ``w_i``, until ``sum(a) == budget_left``.
    """
    n = np.asarray(num_samples, np.int64)
    c = np.asarray(num_correct, np.int64)
    if n.shape != c.shape or n.ndim != 1:
        raise ValueError(f"num_samples {n.shape} and num_correct {c.shape} must be equal 1-D")
    if np.any(c > n) or np.any(c < 0):
        raise ValueError("need 0 <= num_correct <= num_samples for every prompt")
    if min_correct < 1 or max_per_round < 1:
        raise ValueError("min_correct and max_per_round must be >= 1")
    budget_left = max(int(budget_left), 0)
    done = c >= min_correct
    cap = np.full(n.shape, max_per_round, np.int64)
    if max_per_prompt is not None:
        done |= n >= max_per_prompt
        cap = np.minimum(cap, max_per_prompt - n)
    p = (c + 1) / (n + 2)
    want = np.ceil((min_correct - c) / p - 1e-9).astype(np.int64)
    want = np.where(done, 0, np.minimum(want, cap))
    want = np.maximum(want, 0)
    total = int(want.sum())
    if total <= budget_left:
        return want
    alloc = (want * budget_left) // total
    left = budget_left - int(alloc.sum())
    order = sorted(np.flatnonzero(want > 0), key=lambda i: (p[i], i))
    while left > 0:
        for i in order:
            if left == 0:
                break
            if alloc[i] < want[i]:
                alloc[i] += 1
                left -= 1
    return alloc


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass
class SamplingState:
    """Every sample drawn so far, per prompt (drawing order) with its round."""

    samples: list[list[Any]]  # [N] lists of EvalSample
    rounds: list[list[int]]  # round of each sample
    usable: list[list[bool]]

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        n = np.asarray([len(s) for s in self.samples], np.int64)
        c = np.asarray([sum(u) for u in self.usable], np.int64)
        return n, c


def is_usable(sample, *, keep_truncated: bool) -> bool:
    """Verified correct, non-empty, and finished with a stop token (or keep_truncated)."""
    return (
        sample.correct
        and bool(sample.text.strip())
        and (keep_truncated or sample.finish_reason == "stop")
    )


def select_kept(state: SamplingState, keep: int) -> list[list[int]]:
    """Per prompt, indices of the first ``keep`` usable samples with distinct texts."""
    out = []
    for samples, usable in zip(state.samples, state.usable, strict=True):
        seen: set[str] = set()
        idx = []
        for j, (s, u) in enumerate(zip(samples, usable, strict=True)):
            key = s.text.strip()
            if u and key not in seen and len(idx) < keep:
                seen.add(key)
                idx.append(j)
        out.append(idx)
    return out


def run_sampling(
    graphdef,
    params,
    tokenizer,
    prompts,
    rcfg: RFTConfig,
    *,
    eos_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[SamplingState, list[dict[str, Any]]]:
    """The sampling rounds (module doc); returns the samples and per-round stats."""
    from jaxpt.evaluate import sample_and_verify

    N = len(prompts)
    k = rcfg.num_samples
    budget = rcfg.budget if rcfg.budget is not None else rcfg.rounds * k * N
    if budget < N * k:
        raise ConfigError(
            f"rft.budget={budget} is smaller than round 1 needs: {N} prompts x "
            f"rft.num_samples={k} = {N * k}"
        )
    first = k if rcfg.max_samples_per_prompt is None else min(k, rcfg.max_samples_per_prompt)
    state = SamplingState([[] for _ in range(N)], [[] for _ in range(N)], [[] for _ in range(N)])
    spent = 0
    stats: list[dict[str, Any]] = []
    for r in range(1, rcfg.rounds + 1):
        n_i, c_i = state.counts()
        if r == 1:
            alloc = np.full(N, first, np.int64)
        else:
            alloc = dart_allocation(
                n_i,
                c_i,
                min_correct=rcfg.min_correct,
                budget_left=budget - spent,
                max_per_round=rcfg.max_samples_per_round,
                max_per_prompt=rcfg.max_samples_per_prompt,
            )
        if int(alloc.sum()) == 0:
            break
        samples = sample_and_verify(
            graphdef,
            params,
            tokenizer,
            prompts,
            [int(a) for a in alloc],
            sampler=rcfg.sampler(),
            max_new_tokens=rcfg.max_new_tokens,
            eos_ids=eos_ids,
            pad_id=pad_id,
            batch_size=rcfg.batch_size,
            seed=rcfg.seed * 1000 + r,
            verifier=rcfg.verifier,
            threshold=rcfg.threshold,
            reward_timeout_s=rcfg.reward_timeout_s,
            progress=f"rft round {r}" if progress else False,
        )
        new_correct = 0
        for i, row in enumerate(samples):
            for s in row:
                state.samples[i].append(s)
                state.rounds[i].append(r)
                u = is_usable(s, keep_truncated=rcfg.keep_truncated)
                state.usable[i].append(u)
                new_correct += int(s.correct)
        spent += int(alloc.sum())
        n_i, c_i = state.counts()
        row = {
            "round": r,
            "samples": int(alloc.sum()),
            "prompts_sampled": int((alloc > 0).sum()),
            "max_per_prompt": int(alloc.max()),
            "correct": new_correct,
            "prompts_done": int((c_i >= rcfg.min_correct).sum()),
            "prompts_solved": int((c_i > 0).sum()),
            "spent": spent,
        }
        stats.append(row)
        log(
            f"rft round {r}: {row['samples']} samples on {row['prompts_sampled']} prompts, "
            f"{new_correct} correct; prompts with >= {rcfg.min_correct} usable: "
            f"{row['prompts_done']}/{N}; budget spent {spent}/{budget}"
        )
        if row["prompts_done"] == N or spent >= budget:
            break
    return state, stats


# ----------------------------------------------------------------------------- data


def _arithmetic_records(a: ArithmeticSection, split: str, n: int):
    from jaxpt.data.gsm8k import convert_gsm8k

    records = arithmetic_records(arithmetic_config(a), n, split=split, seed=a.seed,
                                 source=f"<arithmetic {split} seed={a.seed}>")
    return convert_gsm8k(records, mode="prompt")


def rft_prompt_records(cfg: RunConfig, which: str):
    """Prompt records for ``which`` = "train" (sampling) or "eval" (held-out), or None."""
    from jaxpt.train.common import read_data_records

    rcfg: RFTConfig = cfg.section("rft")
    n = rcfg.arithmetic.train if which == "train" else rcfg.arithmetic.eval
    if n:
        return _arithmetic_records(rcfg.arithmetic, "train" if which == "train" else "test", n)
    path = cfg.data.train if which == "train" else cfg.data.eval
    if path is None:
        if which == "train":
            raise ConfigError(f"{cfg.source}: rft needs data.train or rft.arithmetic.train")
        return None
    return read_data_records(cfg, which, gsm8k_mode="prompt")


def _prompts(records, tokenizer, max_prompt_length):
    from jaxpt.data.pipeline import prepare_prompts

    prompts, stats = prepare_prompts(records, tokenizer, max_prompt_length=max_prompt_length)
    return prompts, stats


def kept_rows(prompts, state: SamplingState, kept: list[list[int]]) -> list[dict[str, Any]]:
    """Prompt-completion SFT rows for the kept samples (conversational when the prompt is)."""
    rows = []
    for i, idx in enumerate(kept):
        prompt = prompts[i].columns["prompt"]
        for j in idx:
            s = state.samples[i][j]
            completion = (
                [{"role": "assistant", "content": s.text}] if isinstance(prompt, list) else s.text
            )
            rows.append(
                {
                    "prompt": prompt,
                    "completion": completion,
                    "rft_source": prompts[i].source,
                    "rft_row": prompts[i].row,
                    "rft_sample": j,
                    "rft_round": state.rounds[i][j],
                }
            )
    return rows


def _write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def sampling_fingerprint(cfg: RunConfig) -> str:
    """Hash of everything that determines the sampling stage's output."""
    rcfg = config_to_dict(cfg)["rft"]
    for k in (
        "eval_before",
        "eval_after",
        "eval_max_new_tokens",
        "eval_batch_size",
        "reuse_samples",
    ):
        rcfg.pop(k, None)
    key = {
        "rft": rcfg,
        "model": config_to_dict(cfg)["model"],
        "data": {
            k: getattr(cfg.data, k)
            for k in ("train", "train_split", "format", "max_train_rows", "skip_invalid")
        },
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def sft_config(cfg: RunConfig, train_path: Path) -> RunConfig:
    """The SFT stage's config: the kept rows as ``data.train``, no ``data.eval``, no
    ``rft`` section, ``algorithm: sft``; every other setting as in ``cfg``."""
    data = dataclasses.replace(
        cfg.data,
        train=str(train_path),
        train_split=None,
        format="auto",
        max_train_rows=None,
        eval=None,
        eval_split=None,
        max_eval_rows=None,
    )
    sections = {k: v for k, v in cfg.sections.items() if k != "rft"}
    return cfg.replace(algorithm="sft", data=data, sections=types.MappingProxyType(sections))


def _held_out(graphdef, params, tokenizer, prompts, rcfg, eos_ids, progress) -> dict:
    from jaxpt.evaluate import evaluate
    from jaxpt.sampling.samplers import Sampler

    res = evaluate(
        graphdef,
        params,
        tokenizer,
        prompts,
        num_samples=1,
        sampler=Sampler.greedy(),
        max_new_tokens=rcfg.eval_max_new_tokens or rcfg.max_new_tokens,
        eos_ids=eos_ids,
        batch_size=rcfg.eval_batch_size,
        verifier=rcfg.verifier,
        threshold=rcfg.threshold,
        reward_timeout_s=rcfg.reward_timeout_s,
        progress="held-out eval" if progress else False,
    )
    return {
        f"eval_{k}": v
        for k, v in res.metrics.items()
        if k in ("pass@1", "answer_rate", "mean_tokens", "clipped_ratio", "num_prompts")
    }


# ----------------------------------------------------------------------------- trainer


@register_trainer("rft")
def train_rft(
    cfg: RunConfig,
    *,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
    stop: StopFlag | None = None,
) -> LoopResult:
    """Sample, keep verified-correct, SFT on them (module doc). Returns the SFT loop's
    result, with the held-out accuracy (``eval_pass@1`` ...) in ``eval_metrics``."""
    from jaxpt.sampling.text import default_stop_ids
    from jaxpt.train.common import load_model_bundle, model_params
    from jaxpt.train.loop import run
    from jaxpt.train.sft import build_sft_trainer

    rcfg: RFTConfig = cfg.section("rft")
    progress = cfg.logging.progress
    out = Path(cfg.out_dir)
    rdir = out / "rft"
    rdir.mkdir(parents=True, exist_ok=True)
    summary_path, train_path = rdir / "summary.json", rdir / "train.jsonl"
    fingerprint = sampling_fingerprint(cfg)
    summary: dict[str, Any] = {}
    if rcfg.reuse_samples and summary_path.exists() and train_path.exists():
        old = json.loads(summary_path.read_text())
        if old.get("complete") and old.get("fingerprint") == fingerprint:
            summary = old
            print(
                f"rft: reusing the finished sampling stage in {rdir} ({old['kept']} kept samples)",
                flush=True,
            )

    eval_records = rft_prompt_records(cfg, "eval")
    need_before = rcfg.eval_before and eval_records is not None and "eval_before" not in summary
    if not summary or need_before:
        bundle = load_model_bundle(cfg)
        tok = bundle.tokenizer
        eos = default_stop_ids(tok, extra=bundle.resolved.generation_eos_ids())
        eval_prompts = None
        if eval_records is not None:
            eval_prompts, _ = _prompts(eval_records, tok, rcfg.max_prompt_length)
        if need_before:
            summary_before = _held_out(
                bundle.graphdef, bundle.params, tok, eval_prompts, rcfg, eos, progress
            )
            print(
                "rft: held-out before SFT: "
                + ", ".join(f"{k} {v:.4g}" for k, v in summary_before.items()),
                flush=True,
            )
        if not summary:
            records = rft_prompt_records(cfg, "train")
            prompts, pstats = _prompts(records, tok, rcfg.max_prompt_length)
            if not prompts:
                raise ConfigError(f"{cfg.source}: no usable prompts for rft ({pstats})")
            print(
                f"rft: sampling on {len(prompts)} prompts "
                f"({pstats.dropped_too_long} dropped as longer than rft.max_prompt_length)",
                flush=True,
            )
            state, rounds = run_sampling(
                bundle.graphdef, bundle.params, tok, prompts, rcfg, eos_ids=eos, progress=progress
            )
            kept = select_kept(state, rcfg.keep)
            _write_jsonl(
                rdir / "samples.jsonl",
                (
                    {
                        "round": state.rounds[i][j],
                        "index": i,
                        "row": s.row,
                        "sample": j,
                        "completion": s.text,
                        "answer": s.answer,
                        "reference": prompts[i].columns.get("answer"),
                        "reward": s.reward,
                        "correct": s.correct,
                        "usable": state.usable[i][j],
                        "kept": j in kept[i],
                        "num_tokens": s.num_tokens,
                        "finish_reason": s.finish_reason,
                    }
                    for i in range(len(prompts))
                    for j, s in enumerate(state.samples[i])
                ),
            )
            rows = kept_rows(prompts, state, kept)
            n_i, c_i = state.counts()
            summary = {
                "fingerprint": fingerprint,
                "prompts": len(prompts),
                "prompts_dropped_too_long": pstats.dropped_too_long,
                "rounds": rounds,
                "samples": int(n_i.sum()),
                "correct": int(sum(s.correct for row in state.samples for s in row)),
                "usable": int(c_i.sum()),
                "prompts_solved": int((c_i > 0).sum()),
                "prompts_done": int((c_i >= rcfg.min_correct).sum()),
                "kept": len(rows),
                "train_file": str(train_path),
            }
            if not rows:
                summary_path.write_text(json.dumps(summary, indent=2) + "\n")
                raise ValueError(
                    f"rft: no verified-correct samples among {summary['samples']} on "
                    f"{len(prompts)} prompts (see {rdir / 'samples.jsonl'}); raise "
                    "rft.num_samples / rft.budget / rft.max_new_tokens or use easier prompts"
                )
            _write_jsonl(train_path, rows)
            summary["complete"] = True
            print(
                f"rft: kept {len(rows)} samples from {summary['prompts_solved']}/"
                f"{len(prompts)} solved prompts -> {train_path}",
                flush=True,
            )
        if need_before:
            summary["eval_before"] = summary_before
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        del bundle

    scfg = sft_config(cfg, train_path)
    try:
        trainer = build_sft_trainer(scfg)
    except ValueError as e:
        raise ValueError(
            f"rft: SFT on the {summary['kept']} kept samples in {train_path}: {e}"
        ) from e
    result = run(trainer, callbacks=callbacks, stop=stop)
    if rcfg.eval_after and eval_records is not None and result.reason == "done":
        bundle = trainer.extras["bundle"]
        tok = bundle.tokenizer
        eos = default_stop_ids(tok, extra=bundle.resolved.generation_eos_ids())
        eval_prompts, _ = _prompts(eval_records, tok, rcfg.max_prompt_length)
        params = model_params(trainer.extras["trainable"], result.state)
        after = _held_out(bundle.graphdef, params, tok, eval_prompts, rcfg, eos, progress)
        summary["eval_after"] = after
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        result.eval_metrics = {**result.eval_metrics, **after}
        for cb in callbacks:
            cb(result.step, after)
        before = summary.get("eval_before", {}).get("eval_pass@1")
        msg = f"rft: held-out pass@1 after SFT {after['eval_pass@1']:.4f}"
        if before is not None:
            msg += f" (before {before:.4f})"
        print(msg, flush=True)
    return result
