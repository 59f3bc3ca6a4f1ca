"""Verifiable evaluation: sample completions of prompt rows, verify them, report pass@1,
pass@k and maj@k (the metrics and the files written are in :mod:`jaxpt.eval_report`).

Axis legend: N prompts, K samples per prompt (``num_samples``).

Flow (``evaluate``)::

    prompts = load_eval_prompts("test.jsonl", tokenizer, format="gsm8k", limit=200)
    result = evaluate(graphdef, params, tokenizer, prompts, num_samples=4,
                      sampler=Sampler(temperature=0.7), max_new_tokens=256)
    result.metrics  # {"pass@1": ..., "pass@4": ..., "maj@4": ..., ...}

* Generation (:func:`jaxpt.sampling.text.sample_completions`): prompts are decoded in
  batches of ``batch_size`` prompts (``batch_size * K`` rows, K samples share one
  prefill), in order of prompt length so a batch holds prompts of similar length; results
  are put back in prompt order (``result.samples[i]`` belongs to ``prompts[i]``).
* Verification: every completion is scored with the verifier (a reward function: the
  built-in ``"math"``, a ``"package.module:function"`` path, or a callable; called as TRL
  calls reward functions, with the prompt's dataset columns, e.g. ``answer``). A sample is
  *correct* when its reward is ``>= threshold`` (default 1.0, full credit).

``sample_and_verify`` is the sampling and verification with a per-prompt sample count
(zero allowed) and no metrics: rejection sampling (``jaxpt.rl.rejection``) and GRPO's
held-out evaluation call it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxpt.data.pipeline import PromptExample
from jaxpt.eval_report import EvalError, EvalResult, EvalSample, summarize
from jaxpt.rewards.answers import extract_answer, parse_reference
from jaxpt.rewards.registry import compute_rewards, get_reward_function
from jaxpt.sampling.samplers import Sampler
from jaxpt.sampling.text import Sampled, default_stop_ids, sample_completions, stop_and_pad_ids

__all__ = ["evaluate", "load_eval_model", "load_eval_prompts", "sample_and_verify"]


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
        from jaxpt.engine.export import restore_model_params
        from jaxpt.models.decoder import abstract_model

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


# ---------------------------------------------------------------- sampling + verification


def _completion(prompt, text: str):
    # TRL's convention: conversational prompts get message-list completions.
    if isinstance(prompt, list):
        return [{"role": "assistant", "content": text}]
    return text


def _verify(prompts, batch: list[Sampled], verifier, timeout_s) -> list[float]:
    """Rewards of a batch of completions; None -> NaN."""
    cols: dict[str, list] = {}
    names: list[str] = []
    for x in batch:
        names.extend(k for k in prompts[x.index].columns if k not in names and k != "prompt")
    for k in names:
        cols[k] = [prompts[x.index].columns.get(k) for x in batch]
    prompt_vals = [prompts[x.index].columns.get("prompt") for x in batch]
    rewards, _, _ = compute_rewards(
        [verifier],
        None,
        prompt_vals,
        [_completion(p, x.completion.text) for p, x in zip(prompt_vals, batch, strict=True)],
        [list(x.completion.token_ids) for x in batch],
        cols,
        [prompts[x.index].row for x in batch],
        timeout_s=timeout_s,
    )
    return [float(r) for r in rewards]


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
    engine: str = "static",
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
    engine: "static" | "continuous" (`jaxpt.sampling.text.sample_completions`).
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
    eos, pad = stop_and_pad_ids(tokenizer, eos_ids, pad_id)
    total, batches = sample_completions(
        graphdef,
        params,
        tokenizer,
        [np.asarray(p.prompt_ids).tolist() for p in prompts],
        count_list if uniform is None else uniform,
        sampler=sampler,
        max_new_tokens=max_new_tokens,
        eos_ids=eos,
        pad_id=pad,
        seed=seed,
        batch_size=batch_size,
        shardings=shardings,
        engine=engine,
    )
    bar = None
    if progress and total:
        from tqdm.auto import tqdm

        desc = progress if isinstance(progress, str) else "eval"
        bar = tqdm(total=total, desc=desc, unit="batch")
    out: list[list[EvalSample | None]] = [[None] * c for c in count_list]
    solved = total_samples = 0
    for batch in batches:
        rewards = _verify(prompts, batch, verifier_fn, reward_timeout_s)
        batch_samples = []
        for x, r in zip(batch, rewards, strict=True):
            if math.isnan(r):
                p = prompts[x.index]
                raise EvalError(
                    f"{p.source}: row {p.row}: the verifier returned None (not applicable); "
                    "does the row have its reference answer (column 'answer')?"
                )
            sample = EvalSample(
                index=x.index,
                row=prompts[x.index].row,
                sample=x.sample,
                text=x.completion.text,
                token_ids=x.completion.token_ids,
                answer=extract_answer(x.completion.text),
                reward=r,
                correct=bool(r >= threshold),
                finish_reason=x.completion.finish_reason,
            )
            out[x.index][x.sample] = sample
            batch_samples.append(sample)
        solved += sum(s.correct for s in batch_samples)
        total_samples += len(batch_samples)
        if on_batch is not None:
            on_batch(batch_samples)
        if bar is not None:
            bar.set_postfix(correct=f"{solved / max(total_samples, 1):.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return out  # type: ignore[return-value]


def evaluate(
    graphdef,
    params,
    tokenizer,
    prompts: Sequence[PromptExample],
    *,
    num_samples: int = 1,
    sampler: Sampler | None = None,
    max_new_tokens: int = 256,
    verifier: str | Callable = "math",
    ks: Sequence[int] | None = None,
    **options: Any,
) -> EvalResult:
    """Sample ``num_samples`` completions per prompt, verify them, compute the metrics.

    ``params`` are the full model params (LoRA merged); ``sampler`` defaults to greedy
    (one sample) or temperature 1.0 (several). ``options`` are the other keyword arguments
    of :func:`sample_and_verify` (``eos_ids``, ``pad_id``, ``batch_size``, ``seed``,
    ``threshold``, ``reward_timeout_s``, ``progress``, ``shardings``, ``engine``), with its
    defaults. See the module doc for the metrics; ``metrics`` also has ``seconds`` and
    ``tokens_per_second`` (generated tokens).
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
        verifier=verifier,
        **options,
    )
    seconds = time.perf_counter() - t0
    references = [parse_reference(p.columns.get("answer")) for p in prompts]
    is_math = isinstance(verifier, str) and verifier == "math"
    metrics = summarize(samples, references, ks=ks, with_majority=is_math)
    n_tokens = sum(x.num_tokens for row in samples for x in row)
    metrics["seconds"] = seconds
    metrics["tokens_per_second"] = n_tokens / max(seconds, 1e-9)
    return EvalResult(samples=samples, references=references, metrics=metrics)
