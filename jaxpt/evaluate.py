"""Verifiable evaluation: sample completions, verify them, report pass@1, pass@k and maj@k.

Axis legend: N prompts, K samples per prompt (``num_samples``), R decoded rows.

Flow (``evaluate``)::

    prompts = load_eval_prompts("test.jsonl", tokenizer, format="gsm8k", limit=200)
    result = evaluate(graphdef, params, tokenizer, prompts, num_samples=4,
                      sampler=Sampler(temperature=0.7), max_new_tokens=256)
    result.metrics  # {"pass@1": ..., "pass@4": ..., "maj@4": ..., ...}

* Generation: prompts are decoded in batches of ``batch_size`` prompts (``batch_size * K``
  rows, K samples share one prefill), in order of prompt length so a batch holds prompts
  of similar length; results are put back in prompt order (``result.samples[i]`` belongs
  to ``prompts[i]``).
* Verification: every completion is scored with the verifier (a reward function: the
  built-in ``"math"``, a ``"package.module:function"`` path, or a callable; called as TRL
  calls reward functions, with the prompt's dataset columns, e.g. ``answer``). A sample is
  *correct* when its reward is ``>= threshold`` (default 1.0, full credit).
* Metrics, over prompts (each prompt weighs the same):

  - ``pass@1``: mean over prompts of ``c_i / K`` (``c_i`` correct of K samples). With one
    greedy sample this is plain accuracy; with K samples it is the unbiased estimate of
    the one-sample success rate.
  - ``pass@k`` for k in ``ks`` (default 1, 2, 4, ... up to K, and K): the unbiased
    estimator of Chen et al. (2021), ``1 - C(K - c, k) / C(K, k)``
    (:func:`jaxpt.rewards.passk.pass_at_k`).
  - ``maj@K`` (math verifier only): the majority final answer of the K samples
    (:func:`jaxpt.rewards.passk.majority_answer`) matches the reference
    (``jaxpt.rewards.math.parse_reference`` of the ``answer`` column).
  - ``answer_rate``: completions with an extractable final answer; ``mean_tokens``;
    ``clipped_ratio``: completions that hit ``max_new_tokens`` without a stop token.

``sample_and_verify`` is the same machinery with a per-prompt sample count (zero allowed),
used by rejection-sampling fine-tuning (``jaxpt.train.rft``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxpt.data.pipeline import PromptExample
from jaxpt.rewards.math import answers_match, extract_answer, parse_reference
from jaxpt.rewards.passk import majority_answer, mean_pass_at_k
from jaxpt.rewards.registry import compute_rewards, get_reward_function
from jaxpt.sampling import FINISH_REASONS, FINISH_STOP
from jaxpt.sampling.samplers import Sampler
from jaxpt.sampling.text import default_stop_ids, iter_generate_ids

__all__ = [
    "EvalError",
    "EvalResult",
    "EvalSample",
    "default_ks",
    "evaluate",
    "load_eval_model",
    "load_eval_prompts",
    "sample_and_verify",
    "summarize",
    "write_completions",
]


class EvalError(ValueError):
    """Bad evaluation inputs; the message names the file, row or argument."""


@dataclasses.dataclass(frozen=True)
class EvalSample:
    """One verified completion of ``prompts[index]``."""

    index: int  # position of the prompt in the evaluated list
    row: int  # the prompt's 1-based row in its source file
    sample: int  # sample number for this prompt (0-based)
    text: str  # decoded without the stop token, special tokens skipped
    token_ids: tuple[int, ...]  # new tokens, including the stop token if any
    answer: str | None  # final answer extracted from the text (math extractor)
    reward: float  # verifier value (NaN when the verifier returned None)
    correct: bool  # reward >= threshold
    finish_reason: str  # "stop" | "length"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass
class EvalResult:
    """``samples[i]`` holds the samples of ``prompts[i]`` (prompt order, not batch order)."""

    samples: list[list[EvalSample]]
    references: list[str | None]  # parsed reference answer of each prompt (None: none)
    metrics: dict[str, float]

    @property
    def num_prompts(self) -> int:
        return len(self.samples)

    def correct(self) -> list[list[bool]]:
        return [[s.correct for s in row] for row in self.samples]


# ----------------------------------------------------------------------------- inputs


def load_eval_prompts(
    path: str | Path,
    tokenizer,
    *,
    format: str = "auto",
    limit: int | None = None,
    max_prompt_length: int | None = None,
) -> list[PromptExample]:
    """Prompt rows of a data file, tokenized with the chat template.

    ``format``: ``gsm8k`` (``question``/``answer`` rows: the prompt is the question plus
    the ``#### <number>`` instruction, ``answer`` becomes the final number), ``prompt``
    (rows already hold ``prompt`` and the verifier's columns, e.g. ``answer``), or ``auto``
    (gsm8k when the first row has ``question`` and ``answer`` but no ``prompt``).
    ``limit``: the first N rows. A prompt longer than ``max_prompt_length`` is an error
    naming its row (dropping it would silently change the denominator).
    """
    from jaxpt.data.formats import DataStats
    from jaxpt.data.gsm8k import convert_gsm8k
    from jaxpt.data.pipeline import prepare_prompts
    from jaxpt.data.sources import read_records

    if format not in ("auto", "gsm8k", "prompt"):
        raise EvalError(f"format={format!r}; expected auto, gsm8k or prompt")
    if limit is not None and limit < 1:
        raise EvalError(f"limit={limit}: must be >= 1")
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: evaluation data not found")
    records = read_records(path)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise EvalError(f"{path}: no rows")
    if format == "auto":
        first = records[0].data
        format = (
            "gsm8k" if {"question", "answer"} <= set(first) and "prompt" not in first else "prompt"
        )
    if format == "gsm8k":
        records = convert_gsm8k(records, mode="prompt")
    stats = DataStats(rows_read=len(records))
    prompts, stats = prepare_prompts(
        records, tokenizer, max_prompt_length=max_prompt_length or 1 << 30, stats=stats
    )
    if len(prompts) != len(records):
        kept = {(p.source, p.row) for p in prompts}
        lost = [r.row for r in records if (r.source, r.row) not in kept]
        raise EvalError(
            f"{path}: rows {lost[:8]} have prompts longer than max_prompt_length="
            f"{max_prompt_length} tokens; raise it or leave it unset"
        )
    return prompts


def load_eval_model(spec: str | Path, *, dtype: str | None = None):
    """(graphdef, params, tokenizer, eos_ids, description) for a model spec or a training
    run checkpoint (a run dir with ``checkpoints/``, its ``checkpoints/`` dir, or one step
    dir; the run's ``config.yaml`` names the base model; LoRA adapters are merged)."""
    from flax import nnx

    from jaxpt.models import hub

    path = Path(spec)
    is_ckpt = path.is_dir() and (
        (path / "checkpoints").is_dir()
        or (path.name.isdigit() and (path / "state").is_dir())
        or (path.name == "checkpoints")
    )
    if is_ckpt:
        from jaxpt.models.decoder import abstract_model
        from jaxpt.train.export import restore_model_params

        params, bundle, step = restore_model_params(path)
        graphdef, model_cfg = bundle.graphdef, bundle.model_cfg
        if dtype is not None and dtype != model_cfg.compute_dtype:
            graphdef, _ = nnx.split(abstract_model(model_cfg.replace(compute_dtype=dtype)))
        tokenizer = bundle.tokenizer
        eos = default_stop_ids(tokenizer, extra=bundle.resolved.generation_eos_ids())
        return graphdef, params, tokenizer, eos, f"{spec} (step {step})"
    overrides = {"compute_dtype": dtype} if dtype else {}
    model, _, resolved = hub.load(spec, **overrides)
    graphdef, params = nnx.split(model)
    tokenizer = resolved.tokenizer()
    eos = default_stop_ids(tokenizer, extra=resolved.generation_eos_ids())
    return graphdef, params, tokenizer, eos, str(spec)


def default_ks(num_samples: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``num_samples``, and ``num_samples`` itself."""
    ks, k = [], 1
    while k <= num_samples:
        ks.append(k)
        k *= 2
    if ks[-1] != num_samples:
        ks.append(num_samples)
    return tuple(ks)


# ----------------------------------------------------------------------------- core


def _decode_rows(tokenizer, tokens_RM, lengths_R, finish_R) -> list[tuple[str, tuple, str]]:
    """(text, token ids incl. stop token, finish reason) per row."""
    ids, keep = [], []
    for t, n, f in zip(tokens_RM, lengths_R, finish_R, strict=True):
        toks = tuple(int(x) for x in t[: int(n)])
        ids.append(toks)
        keep.append(list(toks[:-1] if int(f) == FINISH_STOP else toks))
    texts = tokenizer.batch_decode(keep, skip_special_tokens=True)
    return [
        (txt, i, FINISH_REASONS[int(f)]) for txt, i, f in zip(texts, ids, finish_R, strict=True)
    ]


def _completion(prompt, text: str):
    # TRL's convention: conversational prompts get message-list completions.
    if isinstance(prompt, list):
        return [{"role": "assistant", "content": text}]
    return text


def _verify(prompts, items, verifier, timeout_s) -> list[float]:
    """Rewards for (prompt index, sample, text, ids, finish) items; None -> error."""
    cols: dict[str, list] = {}
    names: list[str] = []
    for i, *_ in items:
        names.extend(k for k in prompts[i].columns if k not in names and k != "prompt")
    for k in names:
        cols[k] = [prompts[i].columns.get(k) for i, *_ in items]
    prompt_vals = [prompts[i].columns.get("prompt") for i, *_ in items]
    rewards, _, _ = compute_rewards(
        [verifier],
        None,
        prompt_vals,
        [_completion(p, it[2]) for p, it in zip(prompt_vals, items, strict=True)],
        [list(it[3]) for it in items],
        cols,
        [prompts[i].row for i, *_ in items],
        timeout_s=timeout_s,
    )
    return [float(r) for r in rewards]


def _iter_samples(
    graphdef,
    params,
    tokenizer,
    prompts: Sequence[PromptExample],
    counts: Sequence[int],
    *,
    uniform: int | None,
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    batch_size: int,
    seed: int,
    shardings,
) -> Iterator[tuple[int, list[tuple[int, int, str, tuple, str]]]]:
    """Yield (batches total, items) per decoded batch; an item is (prompt index, sample
    number, text, token ids, finish reason)."""
    ids = [np.asarray(p.prompt_ids).tolist() for p in prompts]
    if uniform is not None:
        jobs = list(range(len(prompts)))
        sample_no = [0] * len(jobs)
        per_row = uniform
    else:
        jobs, sample_no = [], []
        for i, c in enumerate(counts):
            jobs += [i] * c
            sample_no += list(range(c))
        per_row = 1
    if not jobs:
        return
    total = -(-len(jobs) // batch_size)
    batches = iter_generate_ids(
        graphdef,
        params,
        [ids[i] for i in jobs],
        sampler=sampler,
        max_new_tokens=max_new_tokens,
        eos_ids=tuple(eos_ids),
        pad_id=pad_id,
        seed=seed,
        num_samples=per_row,
        batch_size=batch_size,
        shardings=shardings,
    )
    for idx, result in batches:
        decoded = _decode_rows(tokenizer, result.tokens, result.lengths, result.finish_reason)
        items = []
        for j, job in enumerate(idx):
            for s in range(per_row):
                text, toks, finish = decoded[j * per_row + s]
                items.append((jobs[job], sample_no[job] + s, text, toks, finish))
        yield total, items


def _defaults(tokenizer, eos_ids, pad_id):
    eos = tuple(int(e) for e in (default_stop_ids(tokenizer) if eos_ids is None else eos_ids))
    if pad_id is None:
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = eos[0] if eos else 0
    return eos, int(pad_id)


def sample_and_verify(
    graphdef,
    params,
    tokenizer,
    prompts: Sequence[PromptExample],
    counts: Sequence[int] | int,
    *,
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    verifier: str | Callable = "math",
    threshold: float = 1.0,
    reward_timeout_s: float | None = 60.0,
    progress: bool | str = False,
    shardings=None,
    on_batch: Callable[[list[EvalSample]], None] | None = None,
) -> list[list[EvalSample]]:
    """Sample and verify completions; returns the samples of each prompt, in prompt order.

    counts: an int K (every prompt K samples, sharing one prefill; ``batch_size`` prompts
        = ``batch_size * K`` rows per decode) or one count per prompt (0 allowed; each
        sample is its own decoded row, ``batch_size`` rows per decode; the same prompt may
        sit in several rows of a batch and gets independent samples).
    verifier: reward function (see module doc); a reward of None (the verifier does not
        apply, e.g. no reference answer) is an error naming the prompt's file and row.
    progress: a tqdm description (or True) to show a progress bar.
    on_batch: called with each batch's samples as soon as they are verified.
    """
    n = len(prompts)
    if isinstance(counts, int | np.integer) and not isinstance(counts, bool):
        if counts < 1:
            raise EvalError(f"num_samples={counts}: must be >= 1")
        uniform, count_list = int(counts), [int(counts)] * n
    else:
        count_list = [int(c) for c in counts]
        if len(count_list) != n:
            raise EvalError(f"{len(count_list)} sample counts for {n} prompts")
        if any(c < 0 for c in count_list):
            raise EvalError(f"sample counts must be >= 0, got {min(count_list)}")
        uniform = None
    if batch_size < 1:
        raise EvalError(f"batch_size={batch_size}: must be >= 1")
    if max_new_tokens < 1:
        raise EvalError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if sampler.is_greedy and max(count_list, default=0) > 1:
        raise EvalError(
            "several samples per prompt with greedy decoding (temperature 0) are identical; "
            "set a temperature > 0 or one sample"
        )
    verifier_fn = get_reward_function(verifier)
    eos, pad = _defaults(tokenizer, eos_ids, pad_id)
    out: list[list[EvalSample | None]] = [[None] * c for c in count_list]
    it = _iter_samples(
        graphdef,
        params,
        tokenizer,
        prompts,
        count_list,
        uniform=uniform,
        sampler=sampler,
        max_new_tokens=max_new_tokens,
        eos_ids=eos,
        pad_id=pad,
        batch_size=batch_size,
        seed=seed,
        shardings=shardings,
    )
    bar = None
    solved = total_samples = 0
    for total, items in it:
        if progress and bar is None:
            from tqdm.auto import tqdm

            desc = progress if isinstance(progress, str) else "eval"
            bar = tqdm(total=total, desc=desc, unit="batch")
        rewards = _verify(prompts, items, verifier_fn, reward_timeout_s)
        batch_samples = []
        for (i, s, text, toks, finish), r in zip(items, rewards, strict=True):
            if math.isnan(r):
                p = prompts[i]
                raise EvalError(
                    f"{p.source}: row {p.row}: the verifier returned None (not applicable); "
                    "does the row have its reference answer (column 'answer')?"
                )
            sample = EvalSample(
                index=i,
                row=prompts[i].row,
                sample=s,
                text=text,
                token_ids=toks,
                answer=extract_answer(text),
                reward=r,
                correct=bool(r >= threshold),
                finish_reason=finish,
            )
            out[i][s] = sample
            batch_samples.append(sample)
        solved += sum(x.correct for x in batch_samples)
        total_samples += len(batch_samples)
        if on_batch is not None:
            on_batch(batch_samples)
        if bar is not None:
            bar.set_postfix(correct=f"{solved / max(total_samples, 1):.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return out  # type: ignore[return-value]


def summarize(
    samples: Sequence[Sequence[EvalSample]],
    references: Sequence[str | None],
    *,
    ks: Sequence[int] | None = None,
    with_majority: bool = True,
) -> dict[str, float]:
    """Metrics of verified samples (module doc). Every prompt needs the same K >= 1."""
    n = len(samples)
    if n == 0:
        raise EvalError("no prompts to summarize")
    sizes = {len(s) for s in samples}
    if len(sizes) != 1 or 0 in sizes:
        raise EvalError(
            f"every prompt needs the same number (>= 1) of samples; got {sorted(sizes)}"
        )
    K = sizes.pop()
    ks = default_ks(K) if ks is None else tuple(ks)
    for k in ks:
        if not 1 <= k <= K:
            raise EvalError(f"pass@{k} needs 1 <= k <= num_samples={K}")
    correct = [[x.correct for x in row] for row in samples]
    flat = [x for row in samples for x in row]
    metrics: dict[str, float] = {
        "num_prompts": float(n),
        "num_samples": float(K),
        "pass@1": float(np.mean([np.mean(c) for c in correct])),
    }
    for k in ks:
        metrics[f"pass@{k}"] = mean_pass_at_k(correct, k) if k > 1 else metrics["pass@1"]
    if with_majority and all(r is not None for r in references):
        votes = [majority_answer([x.answer for x in row]) for row in samples]
        metrics[f"maj@{K}"] = float(
            np.mean([answers_match(v, r) for v, r in zip(votes, references, strict=True)])
        )
    metrics["num_correct"] = float(sum(x.correct for x in flat))
    metrics["answer_rate"] = float(np.mean([x.answer is not None for x in flat]))
    metrics["mean_tokens"] = float(np.mean([x.num_tokens for x in flat]))
    metrics["clipped_ratio"] = float(np.mean([x.finish_reason == "length" for x in flat]))
    return metrics


def evaluate(
    graphdef,
    params,
    tokenizer,
    prompts: Sequence[PromptExample],
    *,
    num_samples: int = 1,
    sampler: Sampler | None = None,
    max_new_tokens: int = 256,
    eos_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    verifier: str | Callable = "math",
    threshold: float = 1.0,
    ks: Sequence[int] | None = None,
    reward_timeout_s: float | None = 60.0,
    progress: bool | str = False,
    shardings=None,
) -> EvalResult:
    """Sample ``num_samples`` completions per prompt, verify them, compute the metrics.

    ``params`` are the full model params (LoRA merged); ``sampler`` defaults to greedy
    (one sample) or temperature 1.0 (several). See the module doc for the metrics;
    ``metrics`` also has ``seconds`` and ``tokens_per_second`` (generated tokens).
    """
    if not prompts:
        raise EvalError("no prompts to evaluate")
    if sampler is None:
        sampler = Sampler.greedy() if num_samples == 1 else Sampler(temperature=1.0)
    t0 = time.perf_counter()
    samples = sample_and_verify(
        graphdef,
        params,
        tokenizer,
        prompts,
        num_samples,
        sampler=sampler,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
        batch_size=batch_size,
        seed=seed,
        verifier=verifier,
        threshold=threshold,
        reward_timeout_s=reward_timeout_s,
        progress=progress,
        shardings=shardings,
    )
    seconds = time.perf_counter() - t0
    references = [parse_reference(p.columns.get("answer")) for p in prompts]
    is_math = isinstance(verifier, str) and verifier == "math"
    metrics = summarize(samples, references, ks=ks, with_majority=is_math)
    n_tokens = sum(x.num_tokens for row in samples for x in row)
    metrics["seconds"] = seconds
    metrics["tokens_per_second"] = n_tokens / max(seconds, 1e-9)
    return EvalResult(samples=samples, references=references, metrics=metrics)


# ----------------------------------------------------------------------------- outputs


def completion_rows(result: EvalResult, prompts: Sequence[PromptExample]) -> Iterator[dict]:
    """One JSON-ready dict per completion, prompt order then sample order."""
    for i, row in enumerate(result.samples):
        for x in row:
            yield {
                "index": i,
                "row": x.row,
                "sample": x.sample,
                "prompt": prompts[i].columns.get("prompt"),
                "completion": x.text,
                "answer": x.answer,
                "reference": result.references[i],
                "reward": x.reward,
                "correct": x.correct,
                "num_tokens": x.num_tokens,
                "finish_reason": x.finish_reason,
            }


def write_completions(result: EvalResult, prompts: Sequence[PromptExample], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in completion_rows(result, prompts):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def format_metrics(metrics: dict[str, float]) -> str:
    """One line per metric, rates with 4 decimals."""
    lines = []
    for k, v in metrics.items():
        if k.startswith(("pass@", "maj@")) or k in ("answer_rate", "clipped_ratio"):
            lines.append(f"{k:<18} {v:.4f}")
        elif k in ("num_prompts", "num_samples", "num_correct"):
            lines.append(f"{k:<18} {int(v)}")
        else:
            lines.append(f"{k:<18} {v:.4g}")
    return "\n".join(lines)
