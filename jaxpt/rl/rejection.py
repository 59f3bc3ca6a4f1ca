"""Rejection sampling with difficulty-aware sample allocation (DART): draw samples of each
prompt in rounds, verify them, keep the first verified ones; what RFT fine-tunes on
(``jaxpt.algorithms.rft`` holds the settings, ``rft.*`` below).

Axis legend: N prompts; per prompt i, n_i samples drawn so far, c_i of them usable.

* **Rounds** (:func:`run_sampling`). Round 1 draws ``rft.num_samples`` (k) samples for
  every prompt; every sample is verified (``rft.verifier`` against the prompt's columns,
  :func:`jaxpt.evaluate.sample_and_verify`). A sample is *usable* when its reward is
  ``>= rft.threshold``, its text is not empty, and it ended with a stop token (or
  ``rft.keep_truncated``). Later rounds allocate samples with :func:`dart_allocation`
  (the exact rule is in its docstring): prompts with fewer than ``rft.min_correct`` (m)
  usable samples get samples in inverse proportion to their estimated pass rate, so hard
  prompts get more. Rounds stop when every prompt has m usable samples (or hit
  ``rft.max_samples_per_prompt``), when ``rft.budget`` samples have been drawn, or after
  ``rft.rounds`` rounds. Round r samples with seed ``rft.seed * 1000 + r``.
* **Selection** (:func:`select_kept`): per prompt, the first ``rft.keep_per_prompt``
  (default m) usable samples with distinct texts, in drawing order. Prompts never solved
  contribute nothing (that is the bias DART's extra samples reduce). Only verified
  samples are ever kept.
* **Files** (:func:`rejection_sample`), in the stage directory (``<out_dir>/rft``):
  ``samples.jsonl`` (every sample: round, prompt row, completion, extracted answer,
  reward, correct, usable, kept) and ``train.jsonl`` (the kept samples as
  prompt-completion rows); the caller writes ``summary.json`` with :func:`write_json`.
  Every file is written to a temporary name and renamed, so a reader never sees half a file.
* **Several processes** (``jax.process_count() > 1``): every process runs the same rounds
  on the same prompts (the decode is one program over the whole mesh, its completions
  reach every host), so the verdicts, the DART allocation and the selection are the same
  everywhere; process 0 alone writes the files (``write``), and the caller waits for them
  (``jaxpt.rl.processes.barrier``) before any process reads them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxpt.config import ConfigError
from jaxpt.eval_report import EvalSample
from jaxpt.evaluate import sample_and_verify

if TYPE_CHECKING:
    from jaxpt.algorithms.rft import RFTConfig

SAMPLES, TRAIN, SUMMARY = "samples.jsonl", "train.jsonl", "summary.json"

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

    samples: list[list[EvalSample]]  # [N] lists, drawing order
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
            engine=rcfg.engine,
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


# ----------------------------------------------------------------------------- files


def sample_rows(prompts, state: SamplingState, kept: list[list[int]]) -> Iterable[dict]:
    """One ``samples.jsonl`` row per sample drawn, prompt order then drawing order."""
    for i, samples in enumerate(state.samples):
        for j, s in enumerate(samples):
            yield {
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


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, written atomically."""
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json(path: Path, obj: dict) -> None:
    """Indented JSON, written atomically."""
    _write_atomic(path, json.dumps(obj, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def finished_stage(rdir: Path, fingerprint: str) -> dict[str, Any]:
    """The summary of a finished stage in ``rdir`` sampled with the same settings, else {}."""
    if not ((rdir / SUMMARY).exists() and (rdir / TRAIN).exists()):
        return {}
    old = json.loads((rdir / SUMMARY).read_text())
    return old if old.get("complete") and old.get("fingerprint") == fingerprint else {}


def rejection_sample(
    graphdef,
    params,
    tokenizer,
    prompts,
    rcfg: RFTConfig,
    rdir: Path,
    *,
    eos_ids: Sequence[int],
    progress: bool = True,
    write: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Rounds, selection and the stage's files (module doc); returns the counts for its
    summary (``kept`` = rows in ``train.jsonl``; 0 kept: no ``train.jsonl`` is written).
    ``write=False`` (processes other than 0) computes the same counts and writes nothing."""
    state, rounds = run_sampling(
        graphdef, params, tokenizer, prompts, rcfg, eos_ids=eos_ids, progress=progress, log=log
    )
    kept = select_kept(state, rcfg.keep)
    rows = kept_rows(prompts, state, kept)
    if write:
        write_jsonl(rdir / SAMPLES, sample_rows(prompts, state, kept))
        if rows:
            write_jsonl(rdir / TRAIN, rows)
    n_i, c_i = state.counts()
    return {
        "rounds": rounds,
        "samples": int(n_i.sum()),
        "correct": int(sum(s.correct for row in state.samples for s in row)),
        "usable": int(c_i.sum()),
        "prompts_solved": int((c_i > 0).sum()),
        "prompts_done": int((c_i >= rcfg.min_correct).sum()),
        "kept": len(rows),
    }
