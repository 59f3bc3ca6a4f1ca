"""Run the tiny recipes and compare their metrics with another checkout's: the check that a
refactor left behaviour unchanged (issue: one small module per algorithm).

    python bench/same_metrics.py run OUT_DIR [--only sft,dpo,...]   # writes OUT_DIR/<name>/
    python bench/same_metrics.py compare BEFORE_DIR AFTER_DIR        # JSON lines, exit 1 on a diff

``run`` trains each recipe below from this checkout (the installed ``jaxpt``) into
``OUT_DIR/<name>``; ``compare`` reads both ``metrics.jsonl`` files of each recipe and
reports, per recipe, the number of rows and the largest relative difference of any
metric that is not a wall-clock reading (``time/*``, throughput, mfu). Identical jitted
computations give identical metrics (max_rel 0.0); anything else is printed with the key.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RECIPES = {
    # name: (config, overrides)
    "sft": ("configs/sft_gsm8k_smollm2_tiny.yaml", []),
    "dpo": ("configs/dpo_hh_smollm2_tiny.yaml", []),
    "grpo": ("configs/grpo_arithmetic_tiny.yaml", []),
    "grpo_hybrid": (
        "configs/grpo_arithmetic_tiny.yaml",
        ["train.max_steps=4", "train.eval_every=0", "grpo.eval_prompts=8",
         "grpo.sft_weight=0.5", "grpo.prefix_rft_ratio=0.25", "grpo.num_iterations=2",
         "grpo.beta=0.04", "grpo.dynamic_sampling=true"],
    ),
    "rft": ("configs/rft_arithmetic_tiny.yaml", []),
    # The on-policy algorithms beside GRPO, a few steps each (their rollouts dominate).
    "online_dpo": ("configs/online_dpo_arithmetic_tiny.yaml",
                   ["train.max_steps=3", "train.eval_every=0", "online_dpo.eval_prompts=8"]),
    "ppo": ("configs/ppo_arithmetic_tiny.yaml",
            ["train.max_steps=3", "train.eval_every=0", "ppo.eval_prompts=8"]),
    "reft": ("configs/reft_arithmetic_tiny.yaml",
             ["train.max_steps=3", "train.eval_every=0", "ppo.eval_prompts=8",
              "ppo.sft_warmup_steps=1"]),
    "distill": ("configs/distill_arithmetic_tiny.yaml",
                ["train.max_steps=3", "train.eval_every=0", "distill.eval_prompts=8"]),
    "kto": ("configs/kto_hh_smollm2_tiny.yaml", ["train.max_steps=3"]),
    "reward": ("configs/reward_hh_smollm2_tiny.yaml", ["train.max_steps=3"]),
}
TIMING = ("time/", "tokens_per_second", "mfu", "samples_per_second", "steps_per_second")


def run(out: Path, only: list[str] | None) -> None:
    for name, (config, overrides) in RECIPES.items():
        if only and name not in only:
            continue
        d = out / name
        cmd = [str(Path(sys.executable).parent / "jaxpt"), "train", config, f"out_dir={d}",
               "checkpoint.resume=false", "logging.progress=false", *overrides]
        print(" ".join(cmd), flush=True)
        log = subprocess.run(cmd, capture_output=True, text=True)
        d.mkdir(parents=True, exist_ok=True)
        (d / "stdout.txt").write_text(log.stdout + log.stderr)
        if log.returncode:
            sys.exit(f"{name}: exit {log.returncode}\n{log.stderr[-3000:]}")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare(before: Path, after: Path) -> int:
    bad = 0
    for name in RECIPES:
        files = [p / name / "metrics.jsonl" for p in (before, after)]
        if not all(f.exists() for f in files):
            continue
        a, b = rows(files[0]), rows(files[1])
        worst, where = 0.0, None
        if len(a) != len(b):
            worst, where = float("inf"), f"{len(a)} vs {len(b)} rows"
        for ra, rb in zip(a, b, strict=False):
            for k in sorted(set(ra) | set(rb)):
                if k.startswith(TIMING) or k in TIMING:
                    continue
                va, vb = ra.get(k), rb.get(k)
                if isinstance(va, int | float) and isinstance(vb, int | float):
                    rel = abs(va - vb) / max(abs(va), abs(vb), 1e-30) if va != vb else 0.0
                elif va == vb:
                    rel = 0.0
                else:
                    rel = float("inf")
                if rel > worst:
                    worst, where = rel, f"step {ra.get('step')} {k}: {va} vs {vb}"
        bad += worst > 0
        print(json.dumps({"recipe": name, "rows": len(b), "max_rel": worst, "where": where}))
    return 1 if bad else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--only", default=None)
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = p.parse_args()
    if args.cmd == "run":
        run(args.out, args.only.split(",") if args.only else None)
    else:
        sys.exit(compare(args.before, args.after))


if __name__ == "__main__":
    main()
