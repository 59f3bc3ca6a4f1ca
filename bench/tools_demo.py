"""The tool-use demo on a CPU: SmolLM2-135M-Instruct learns to use a calculator.

    python bench/tools_demo.py --out runs/tools_demo [--sft-steps 2] [--grpo-steps 8]

Stages (each writes under --out; results as JSON lines in ``results.jsonl``):

1. ``base``: the packaged model with the calculator in its prompt, no training: held-out
   accuracy (greedy, strict verifier) and tool-call frequency, through the same multi-turn
   evaluation as a run's (``jaxpt.rl.evaluation``).
2. ``sft``: SFT warm-up on calculator demonstrations of the *train* problems
   (``jaxpt.data.tasks.tool_demos``: the call, the tool turn and the answer, rendered as the
   rollouts render them; assistant-only loss), exported as a Hugging Face checkpoint.
3. ``grpo``: ``configs/grpo_tools_arithmetic_tiny.yaml`` from the warm-up's weights: GRPO
   with the calculator, held-out accuracy and tool calls at its start, middle and end.

The held-out problems are the config's (``data.max_eval_rows`` of the arithmetic task's
test split, disjoint from the train problems by construction).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "grpo_tools_arithmetic_tiny.yaml"


def write_demonstrations(cfg, path: Path, n: int) -> int:
    from jaxpt.data.tasks.arithmetic import arithmetic_config, arithmetic_records
    from jaxpt.data.tasks.tool_demos import calculator_sft_rows
    from jaxpt.models.hub import resolve
    from jaxpt.tools.functions import load_tools

    sec = cfg.section("grpo")
    records = arithmetic_records(arithmetic_config(sec, prefix="arithmetic_"), n,
                                 split="train", seed=cfg.train.seed, source="arithmetic:train")
    tokenizer = resolve(cfg.model.name).tokenizer()
    rows = calculator_sft_rows(records, tokenizer, [t.schema for t in load_tools(sec.tools)],
                               instruction=sec.instruction)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def held_out_eval(cfg) -> dict[str, float]:
    """The run's multi-turn held-out evaluation of ``cfg.model`` with no training."""
    from jaxpt.rl.evaluation import make_eval_fn
    from jaxpt.rl.prompts import load_prompts
    from jaxpt.rl.run import start_on_policy
    from jaxpt.sharding import decode_sharding

    run = start_on_policy(cfg, "grpo")
    sampler = run.sampler(decode_sharding(run.mesh))
    prompts, _ = load_prompts(cfg, run.spec, run.bundle.tokenizer, "eval")
    params = run.bundle.params
    return make_eval_fn(sampler, lambda _: params, prompts, run.section.held_out())(None)


def main(argv=None) -> int:
    from jaxpt.cli import main as jaxpt_main
    from jaxpt.config_load import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    # A short warm-up (2 steps of 8 of 64 demonstrations) teaches the call format and leaves
    # errors for RL; 24 steps of 256 solve the task outright (BENCHMARKS "Tool use").
    p.add_argument("--sft-rows", type=int, default=64)
    p.add_argument("--sft-steps", type=int, default=2)
    p.add_argument("--sft-lr", type=float, default=5e-5)
    p.add_argument("--grpo-steps", type=int, default=None, help="default: the config's")
    p.add_argument("--skip-base", action="store_true")
    args = p.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"

    def record(stage: str, **values) -> None:
        row = {"stage": stage, "date": time.strftime("%Y-%m-%d"), **values}
        print(json.dumps(row), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")

    cfg = load_config(CONFIG, [f"out_dir={out / 'base'}"])
    if not args.skip_base:
        t0 = time.perf_counter()
        record("base", **held_out_eval(cfg), seconds=round(time.perf_counter() - t0, 1))

    data = out / "sft_data.jsonl"
    n = write_demonstrations(cfg, data, args.sft_rows)
    sft_yaml = out / "sft.yaml"
    sft_yaml.write_text(json.dumps({
        "algorithm": "sft", "out_dir": str(out / "sft"),
        "model": {"name": cfg.model.name, "param_dtype": "float32",
                  "compute_dtype": "float32"},
        "data": {"train": str(data), "max_length": 512},
        "optim": {"lr": args.sft_lr, "schedule": "constant", "warmup_steps": 0,
                  "max_grad_norm": 1.0},
        "train": {"max_steps": args.sft_steps, "batch_size": 8, "seed": 0},
        "checkpoint": {"every": 0}, "logging": {"progress": False, "every": 1},
    }))
    t0 = time.perf_counter()
    if jaxpt_main(["train", str(sft_yaml)]) != 0:
        return 1
    if jaxpt_main(["export", str(out / "sft"), str(out / "sft_model"), "--overwrite"]) != 0:
        return 1
    losses = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in losses if "loss" in r]
    record("sft", demonstrations=n, steps=args.sft_steps, first_loss=losses[0],
           last_loss=losses[-1], seconds=round(time.perf_counter() - t0, 1))

    overrides = [f"model.name={out / 'sft_model'}", f"out_dir={out / 'grpo'}"]
    if args.grpo_steps is not None:
        overrides.append(f"train.max_steps={args.grpo_steps}")
    t0 = time.perf_counter()
    if jaxpt_main(["train", str(CONFIG), *overrides]) != 0:
        return 1
    metrics = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").open()]
    evals = [{k: v for k, v in r.items() if k == "step" or k.startswith("eval_")}
             for r in metrics if "eval_accuracy" in r]
    rewards = [r["reward"] for r in metrics if "reward" in r]
    calls = [r["tools/call_frequency"] for r in metrics if "tools/call_frequency" in r]
    record("grpo", evals=evals, rewards=rewards, call_frequency=calls,
           seconds=round(time.perf_counter() - t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
