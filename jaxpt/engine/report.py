"""End-of-run summary from `<out_dir>/metrics.jsonl`: held-out metric before and after, a
text curve, and a PNG plot when matplotlib is installed."""

from __future__ import annotations

import json
import math
from pathlib import Path

_BARS = " ▁▂▃▄▅▆▇█"


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def sparkline(values: list[float]) -> str:
    """One bar per value; values that are not finite numbers (null, or "nan" from older
    metrics files) are shown as a space."""
    if not any(_number(v) for v in values):
        return " " * len(values)
    nums = [v for v in values if _number(v)]
    lo, hi = min(nums), max(nums)
    span = (hi - lo) or 1.0
    return "".join(
        _BARS[int(round((v - lo) / span * (len(_BARS) - 1)))] if _number(v) else " "
        for v in values
    )


def print_run_summary(out_dir: str | Path, *, curve_key: str, eval_key: str) -> dict:
    rows = read_metrics(out_dir)
    # Non-finite values (null) are left out of the means and the plot.
    curve = [(r["step"], r[curve_key]) for r in rows if _number(r.get(curve_key))]
    evals = [(r["step"], r[eval_key]) for r in rows if _number(r.get(eval_key))]
    summary = {"curve": curve, "eval": evals}
    if curve:
        vals = [v for _, v in curve]
        k = max(1, len(vals) // 4)
        print(f"{curve_key} per step: {sparkline(vals)}  (first {k} steps mean "
              f"{sum(vals[:k]) / k:.3f} -> last {k} steps mean {sum(vals[-k:]) / k:.3f})")
    if evals:
        print(f"held-out {eval_key}: " + "  ".join(f"step {s}: {v:.3f}" for s, v in evals))
        if len(evals) >= 2:
            print(f"held-out {eval_key} before -> after: {evals[0][1]:.3f} -> {evals[-1][1]:.3f}")
    png = _plot(out_dir, curve_key, curve, eval_key, evals)
    if png:
        print(f"plot: {png}")
        summary["plot"] = str(png)
    return summary


def _plot(out_dir, curve_key, curve, eval_key, evals) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not curve and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if curve:
        ax.plot([s for s, _ in curve], [v for _, v in curve], label=f"train {curve_key}",
                alpha=0.8)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label=f"held-out {eval_key}")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    path = Path(out_dir) / f"{curve_key}_curve.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
