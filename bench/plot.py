"""Plot benchmark results: the JSON lines the `bench/*.py` scripts print, as PNG charts.

Every bench script prints one JSON object per comparison on stdout (keys in DESIGN.md:
bench, case, metric, unit, jaxpt, peer, peer_name, ratio, target, lower_is_better, device,
date). Save them and plot::

    python bench/sft.py --quick | tee results/sft.jsonl
    python bench/plot.py results/*.jsonl --out results/plots

One PNG per (bench, metric), named ``<bench>_<metric>.png``: on the left jaxpt and the peer
side by side for every case (one bar pair per run: case, device and date), on the right the
ratio jaxpt / peer with the target (dashed) and parity (1.0, dotted).

Input lines that are not JSON objects (a `tee 2>&1` log, comments) are skipped; a line that
is a JSON object without the keys a plot needs is an error naming the file and line. When
the same (bench, case, metric, device, date) appears more than once, the last one read wins
(re-running a bench on the same day replaces its figure).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

REQUIRED_KEYS = ("bench", "case", "metric", "jaxpt")


class ResultsError(ValueError):
    """A results line that cannot be plotted; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Series:
    """One (bench, metric): a bar pair per run, in the order the runs were read."""

    bench: str
    metric: str
    unit: str
    peer_name: str
    lower_is_better: bool | None
    labels: tuple[str, ...]  # "case" or "case\ndevice date" when runs differ in those
    jaxpt: tuple[float, ...]
    peer: tuple[float | None, ...]
    ratio: tuple[float | None, ...]
    target: tuple[float | None, ...]


def _number(value, where: str, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ResultsError(f"{where}: key {key!r} must be a number or null, got {value!r}")
    return float(value)


def read_results(paths: Iterable[str | Path]) -> list[dict]:
    """The result rows of every file, in file then line order (non-JSON lines skipped)."""
    rows: list[dict] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ResultsError(f"{path}: results file not found")
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            text = line.strip()
            if not text.startswith("{"):
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ResultsError(f"{where}: not valid JSON ({e})") from None
            missing = [k for k in REQUIRED_KEYS if k not in row]
            if missing:
                raise ResultsError(f"{where}: missing key(s) {missing}; has {sorted(row)}")
            row["jaxpt"] = _number(row["jaxpt"], where, "jaxpt")
            if row["jaxpt"] is None:
                raise ResultsError(f"{where}: key 'jaxpt' is null")
            for key in ("peer", "ratio", "target"):
                row[key] = _number(row.get(key), where, key)
            rows.append(row)
    return rows


def group_series(rows: Sequence[dict]) -> dict[tuple[str, str], Series]:
    """Rows -> one Series per (bench, metric); duplicate runs keep the last row read."""
    runs: dict[tuple[str, str], dict[tuple, dict]] = {}
    for row in rows:
        key = (row["bench"], row["metric"])
        run_id = (row["case"], row.get("device", ""), row.get("date", ""))
        runs.setdefault(key, {}).pop(run_id, None)
        runs[key][run_id] = row  # re-inserted: a replaced run moves to the end
    out = {}
    for (bench, metric), by_run in runs.items():
        ordered = list(by_run.values())
        # Label with device and date only when runs of this metric differ in them.
        distinct = {(r.get("device", ""), r.get("date", "")) for r in ordered}
        labels = tuple(
            r["case"]
            if len(distinct) == 1
            else f"{r['case']}\n{r.get('device', '?')} {r.get('date', '?')}"
            for r in ordered
        )
        first = ordered[0]
        out[(bench, metric)] = Series(
            bench=bench,
            metric=metric,
            unit=str(first.get("unit", "")),
            peer_name=str(first.get("peer_name", "peer")),
            lower_is_better=first.get("lower_is_better"),
            labels=labels,
            jaxpt=tuple(r["jaxpt"] for r in ordered),
            peer=tuple(r["peer"] for r in ordered),
            ratio=tuple(
                r["ratio"]
                if r["ratio"] is not None
                else (r["jaxpt"] / r["peer"] if r["peer"] else None)
                for r in ordered
            ),
            target=tuple(r["target"] for r in ordered),
        )
    return out


def plot_series(series: Series, out_dir: str | Path) -> Path:
    """Write ``<bench>_<metric>.png`` for one series; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series.labels)
    xs = list(range(n))
    width = 0.38
    fig, (ax, ax_r) = plt.subplots(
        1, 2, figsize=(max(8.0, 2.2 * n + 4), 4.2), gridspec_kw={"width_ratios": [3, 2]}
    )
    ax.bar([x - width / 2 for x in xs], series.jaxpt, width, label="jaxpt", color="tab:blue")
    peer_x = [x + width / 2 for x, p in zip(xs, series.peer, strict=True) if p is not None]
    peer_y = [p for p in series.peer if p is not None]
    if peer_y:
        ax.bar(peer_x, peer_y, width, label=series.peer_name, color="tab:gray")
    better = {True: " (lower is better)", False: " (higher is better)"}.get(
        series.lower_is_better, ""
    )
    ax.set_ylabel(f"{series.metric} [{series.unit}]" if series.unit else series.metric)
    ax.set_title(f"{series.bench}: {series.metric}{better}", fontsize=10)
    ax.set_xticks(xs, series.labels, fontsize=7, rotation=20, ha="right")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)

    ratio_x = [x for x, r in zip(xs, series.ratio, strict=True) if r is not None]
    ratio_y = [r for r in series.ratio if r is not None]
    ax_r.bar(ratio_x, ratio_y, 0.6, color="tab:blue")
    ax_r.axhline(1.0, color="black", linestyle=":", linewidth=1, label="parity")
    for x, t in zip(xs, series.target, strict=True):
        if t is not None:
            ax_r.hlines(t, x - 0.4, x + 0.4, colors="tab:red", linestyles="--", linewidth=1.5)
    if any(t is not None for t in series.target):
        ax_r.plot([], [], color="tab:red", linestyle="--", label="target")
    for x, r in zip(ratio_x, ratio_y, strict=True):
        ax_r.annotate(f"{r:.3g}", (x, r), ha="center", va="bottom", fontsize=8)
    ax_r.set_xticks(xs, series.labels, fontsize=7, rotation=20, ha="right")
    ax_r.set_ylabel("ratio jaxpt / peer")
    ax_r.legend(fontsize=8)
    ax_r.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{_safe(series.bench)}_{_safe(series.metric)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def plot_results(paths: Iterable[str | Path], out_dir: str | Path) -> list[Path]:
    """Read results files, write one PNG per (bench, metric); returns the PNG paths."""
    series = group_series(read_results(paths))
    return [plot_series(s, out_dir) for s in series.values()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="JSON-lines files printed by bench/*.py")
    ap.add_argument("--out", default="bench_plots", help="output folder for the PNGs")
    args = ap.parse_args(argv)
    try:
        rows = read_results(args.results)
    except ResultsError as e:
        print(f"bench/plot.py: error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print("bench/plot.py: error: no result lines in " + ", ".join(args.results),
              file=sys.stderr)  # fmt: skip
        return 2
    for s in group_series(rows).values():
        path = plot_series(s, args.out)
        ratios = ", ".join("-" if r is None or math.isnan(r) else f"{r:.3g}" for r in s.ratio)
        print(f"{path}  ({len(s.labels)} run(s), ratio {ratios})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
