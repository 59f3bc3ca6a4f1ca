"""`jaxpt eval MODEL_OR_CHECKPOINT data.jsonl ...` and `jaxpt rft CONFIG ...`.

`jaxpt/cli/__init__.py` wires them in::

    add_eval_parser(sub); add_rft_parser(sub)

`jaxpt eval` writes one JSON line per completion (``--output``, default
``eval_<data>.jsonl``)::

    {"index": i, "row": <file row>, "sample": j, "prompt": ..., "completion": "...",
     "answer": <extracted>, "reference": <reference>, "reward": 1.0, "correct": true,
     "num_tokens": n, "finish_reason": "stop" | "length"}

and a summary JSON (``--summary``, default ``<output>.summary.json``) with the metrics
(``pass@1``, ``pass@k``, ``maj@k``, ...) and the settings that produced them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from jaxpt.cli.args import add_config_command, add_dtype_argument


def add_eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="accuracy on verifiable prompts: pass@1, pass@k, maj@k",
        description="Sample completions for each prompt of a data file, verify them against "
        "the reference answer, report pass@1 / pass@k / maj@k and write every completion.",
    )
    p.add_argument(
        "model",
        help="packaged name (smollm2-135m-instruct), .gguf, HF dir, hub id, or a training run "
        "dir / checkpoint dir (LoRA merged)",
    )
    p.add_argument("data", help="JSONL/JSON/parquet file of prompts with an 'answer' column")
    p.add_argument(
        "--format",
        choices=["auto", "gsm8k", "prompt"],
        default="auto",
        help="gsm8k: question/answer rows; prompt: rows with 'prompt' (+ 'answer'); "
        "auto (default): gsm8k when rows have question+answer and no prompt",
    )
    p.add_argument("--num-samples", "-k", type=int, default=1, help="samples per prompt")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="default: 0 (greedy) with one sample, 1.0 with several",
    )
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0.0 = off")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N rows")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine",
        choices=["static", "continuous"],
        default="static",
        help="decode loop: static batches of --batch-size prompts, or continuous batching "
        "(the same cache rows; a finished row's slot takes the next prompt)",
    )
    add_dtype_argument(p, "compute dtype (default: the model's / run's)")
    p.add_argument(
        "--verifier",
        default="math",
        help="reward function deciding correctness: 'math' (default) or package.module:function",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=1.0,
        help="a sample is correct when its reward is >= this (default 1.0)",
    )
    p.add_argument(
        "--ks", default=None, help="comma-separated k for pass@k (default 1,2,4,...,num_samples)"
    )
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        default=None,
        help="completions JSONL (default eval_<data stem>.jsonl)",
    )
    p.add_argument(
        "--summary",
        type=Path,
        default=None,
        help="summary JSON (default <output without .jsonl>.summary.json)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_eval)
    return p


def _fail(msg: str) -> int:
    print(f"jaxpt eval: error: {msg}", file=sys.stderr)
    return 2


def run_eval(args: argparse.Namespace) -> int:
    from jaxpt.eval_report import EvalError, format_metrics, write_completions
    from jaxpt.evaluate import evaluate, load_eval_model, load_eval_prompts
    from jaxpt.sampling.samplers import Sampler, SamplerError

    for name in ("num_samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    temperature = args.temperature
    if temperature is None:
        temperature = 0.0 if args.num_samples == 1 else 1.0
    try:
        sampler = Sampler(
            temperature=temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p
        )
    except SamplerError as e:
        return _fail(str(e))
    if sampler.is_greedy and args.num_samples > 1:
        return _fail(
            "--num-samples > 1 with --temperature 0 gives identical samples; set --temperature > 0"
        )
    ks = None
    if args.ks:
        try:
            ks = tuple(int(k) for k in args.ks.split(","))
        except ValueError:
            return _fail(f"--ks={args.ks!r}: expected comma-separated integers")
        bad = [k for k in ks if not 1 <= k <= args.num_samples]
        if bad:
            return _fail(f"--ks: pass@{bad[0]} needs 1 <= k <= --num-samples={args.num_samples}")
    data = Path(args.data)
    if not data.exists():  # before the (slow) model load
        return _fail(f"{data}: evaluation data not found")
    output = args.output or Path(f"eval_{data.name.split('.')[0]}.jsonl")
    summary_path = args.summary or output.with_name(
        output.name.removesuffix(".jsonl") + ".summary.json"
    )

    graphdef, params, tokenizer, eos_ids, desc = load_eval_model(args.model, dtype=args.dtype)
    try:
        prompts = load_eval_prompts(
            data,
            tokenizer,
            format=args.format,
            limit=args.limit,
            max_prompt_length=args.max_prompt_length,
        )
        print(
            f"eval {desc} on {data}: {len(prompts)} prompts x {args.num_samples} sample(s), "
            f"{sampler.describe()}, max_new_tokens {args.max_new_tokens}",
            flush=True,
        )
        result = evaluate(
            graphdef,
            params,
            tokenizer,
            prompts,
            num_samples=args.num_samples,
            sampler=sampler,
            max_new_tokens=args.max_new_tokens,
            eos_ids=eos_ids,
            batch_size=args.batch_size,
            seed=args.seed,
            verifier=args.verifier,
            threshold=args.threshold,
            ks=ks,
            progress="eval" if args.progress else False,
            engine=args.engine,
        )
    except EvalError as e:
        return _fail(str(e))
    write_completions(result, prompts, output)
    summary = {
        "model": str(args.model),
        "data": str(data),
        "format": args.format,
        "limit": args.limit,
        "num_samples": args.num_samples,
        "sampler": {
            "temperature": temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "min_p": args.min_p,
        },
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "verifier": args.verifier,
        "threshold": args.threshold,
        "metrics": result.metrics,
        "completions": str(output),
        "date": datetime.date.today().isoformat(),
    }
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_metrics(result.metrics))
    print(f"completions: {output}\nsummary:     {summary_path}", flush=True)
    return 0


def add_rft_parser(sub) -> argparse.ArgumentParser:
    p = add_config_command(
        sub,
        "rft",
        "rejection-sampling fine-tuning: sample, keep verified-correct, SFT on them",
        "Rejection-sampling fine-tuning from a YAML run config with an `rft:` "
        "section (see configs/rft_*.yaml); key.sub=value overrides any key.",
        "YAML run config (algorithm: rft)",
    )
    p.set_defaults(func=run_rft)
    return p


def run_rft(args, *, callbacks=(), stop=None) -> int:
    from jaxpt.config_load import load_config
    from jaxpt.trainers.rft import train_rft

    cfg = load_config(args.config, args.overrides)
    if cfg.algorithm != "rft":
        raise ValueError(
            f"{args.config}: algorithm={cfg.algorithm!r}; `jaxpt rft` needs "
            "algorithm: rft (use `jaxpt train` for other algorithms)"
        )
    from jaxpt.engine.loop import check_out_dir

    check_out_dir(cfg.out_dir)  # before the model loads
    result = train_rft(cfg, callbacks=callbacks, stop=stop)
    last = result.last_metrics
    parts = [f"loss {last['loss']:.4g}"] if "loss" in last else []
    parts += [f"{k} {v:.4f}" for k, v in result.eval_metrics.items() if k.startswith("eval_pass")]
    print(
        f"rft: {result.reason} at step {result.step} ({', '.join(parts)}); outputs in "
        f"{cfg.out_dir}",
        flush=True,
    )
    return 0
