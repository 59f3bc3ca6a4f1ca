"""A recipe over several seeds: the held-out metric at each eval as mean ± std.

    python bench/learning.py CONFIG --seeds 0,1,2 --out runs/learning/demo [key=value ...]

Runs ``jaxpt train CONFIG out_dir=OUT/seed<N> train.seed=<N> key=value ...`` once per seed,
one after another (a finished seed, one whose ``metrics.jsonl`` already holds the last
step, is not run again), then reads every seed's ``metrics.jsonl`` and writes
``OUT/learning.jsonl``: one JSON line per eval step with, for the metric (``--metric``,
default ``eval_accuracy``), ``mean``, ``std`` (sample std, ddof=1; 0 for one seed),
``n`` (seeds), the per-seed values, and ``train_seconds`` (mean over seeds of the summed
``time/*`` readings up to that step: rollout, rewards and train time, not eval or
compile). It prints the same as a table. ``train.seed`` seeds everything random in a run:
the data order, sampling, dropout and the generated tasks' problems.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished(out: Path) -> bool:
    """A seed's run finished: its stdout ends with the trainer's summary line."""
    log = out / "stdout.txt"
    return log.exists() and " done at step " in log.read_text()


def run_seed(config: str, out: Path, seed: int, overrides: list[str]) -> None:
    jaxpt = Path(sys.executable).parent / "jaxpt"
    cmd = [str(jaxpt), "train", config, f"out_dir={out}", f"train.seed={seed}",
           "checkpoint.resume=false", "logging.progress=false", *overrides]
    print(" ".join(cmd), flush=True)
    log = subprocess.run(cmd, capture_output=True, text=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stdout.txt").write_text(log.stdout + log.stderr)
    if log.returncode:
        sys.exit(f"seed {seed}: exit {log.returncode}\n{log.stderr[-3000:]}")


def summarize(runs: dict[int, list[dict]], metric: str) -> list[dict]:
    """One row per eval step that every seed logged ``metric`` at."""
    per_seed: dict[int, dict[int, float]] = {}
    seconds: dict[int, dict[int, float]] = {}
    for seed, rows in runs.items():
        total = 0.0
        for row in rows:
            total += sum(v for k, v in row.items() if k.startswith("time/"))
            if metric in row:
                per_seed.setdefault(row["step"], {})[seed] = float(row[metric])
                seconds.setdefault(row["step"], {})[seed] = total
    out = []
    for step in sorted(per_seed):
        values = per_seed[step]
        if len(values) < len(runs):
            continue
        vs = [values[s] for s in sorted(values)]
        out.append({
            "step": step,
            "metric": metric,
            "mean": statistics.fmean(vs),
            "std": statistics.stdev(vs) if len(vs) > 1 else 0.0,
            "n": len(vs),
            "values": vs,
            "train_seconds": statistics.fmean(seconds[step].values()),
        })
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--metric", default="eval_accuracy")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        out = args.out / f"seed{seed}"
        if not finished(out):
            run_seed(args.config, out, seed, args.overrides)
    runs = {s: read_rows(args.out / f"seed{s}" / "metrics.jsonl") for s in seeds}
    rows = summarize(runs, args.metric)
    with open(args.out / "learning.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({"config": args.config, "overrides": args.overrides, **row}) + "\n")
    print(f"{'step':>6}  {args.metric:>24}  {'train s':>8}  per seed")
    for r in rows:
        vals = " ".join(f"{v:.3f}" for v in r["values"])
        print(f"{r['step']:>6}  {r['mean']:>15.3f} ± {r['std']:.3f}  {r['train_seconds']:>8.0f}  "
              f"{vals}")


if __name__ == "__main__":
    main()
