"""bench/learning.py: per-seed metrics.jsonl -> mean ± std of the held-out metric per eval."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_learning", REPO / "bench" / "learning.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_learning"] = mod
    spec.loader.exec_module(mod)
    return mod


learning = _load()


def _run(evals: dict[int, float], step_seconds: float) -> list[dict]:
    rows = []
    for step in range(0, 21):
        if step:
            rows.append({"step": step, "loss": 0.1, "time/rollout": step_seconds / 2,
                         "time/train": step_seconds / 2})
        if step in evals:
            rows.append({"step": step, "eval_accuracy": evals[step]})
    return rows


def test_mean_std_per_eval_step_over_seeds():
    runs = {
        0: _run({0: 0.10, 10: 0.60, 20: 0.80}, 1.0),
        1: _run({0: 0.20, 10: 0.70, 20: 0.70}, 2.0),
        2: _run({0: 0.15, 10: 0.50, 20: 0.90}, 3.0),
    }
    rows = learning.summarize(runs, "eval_accuracy")
    assert [r["step"] for r in rows] == [0, 10, 20]
    last = rows[-1]
    assert last["values"] == [0.80, 0.70, 0.90] and last["n"] == 3
    assert last["mean"] == statistics.fmean([0.8, 0.7, 0.9])
    assert last["std"] == statistics.stdev([0.8, 0.7, 0.9])  # sample std (ddof=1)
    # train seconds: summed time/* up to the step, averaged over seeds (10 steps of 1, 2, 3 s)
    assert rows[1]["train_seconds"] == statistics.fmean([10.0, 20.0, 30.0])
    assert rows[0]["train_seconds"] == 0.0


def test_an_eval_step_missing_from_a_seed_is_left_out():
    runs = {0: _run({0: 0.1, 10: 0.5}, 1.0), 1: _run({0: 0.2}, 1.0)}
    assert [r["step"] for r in learning.summarize(runs, "eval_accuracy")] == [0]


def test_one_seed_has_zero_std():
    (row,) = learning.summarize({3: _run({5: 0.4}, 1.0)}, "eval_accuracy")
    assert row["std"] == 0.0 and row["mean"] == 0.4
