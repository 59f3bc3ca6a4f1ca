"""Math reward throughput: jaxpt's ``math`` reward vs math-verify called directly.

Two cases, each a list of (completion, reference) pairs scored by both sides:

  gsm8k   GSM8K-style completions: the GSM8K train split's worked solutions (ending
          ``#### N``), the same with ``The answer is N.``, ``\\boxed{N}`` and a wrong final
          number, against the dataset's ``answer`` column. jaxpt answers every one of
          these on its fast numeric path.
  latex   MATH-style answers that are not plain numbers (radicals, polynomials, tuples,
          intervals; equal and unequal pairs, numbers varied so no cache sees a repeat),
          ``\\boxed{}`` in a sentence, the reference in ``$...$``: jaxpt sends them to
          math-verify in its worker process, with a per-call time limit.

peer = math-verify 0.9 as TRL's ``accuracy_reward`` calls it: ``parse(reference)``,
``parse(completion)``, ``verify(gold, pred)``, on the main thread with its signal
timeouts. Metric: completions per second (median of --reps timed passes after one warm-up
pass on a few items), higher is better; ratio = jaxpt / peer. The script also checks that
jaxpt scores every gsm8k pair as labelled.

    python bench/rewards.py            # 10,000 gsm8k + 2,000 latex completions, 3 reps
    python bench/rewards.py --quick    # 2,000 gsm8k + 300 latex, 3 reps (about a minute)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/rewards.py` from a checkout
    sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def gsm8k_rows() -> list[dict]:
    for base in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        path = base / "gsm8k" / "train.jsonl"
        if path.exists():
            with path.open() as f:
                return [json.loads(line) for line in f]
    raise SystemExit("GSM8K not found under ../shared/data/gsm8k (needed for this bench)")


def gsm8k_pairs(n: int) -> tuple[list[str], list[str], list[float]]:
    """n GSM8K-style (completion, reference answer column, expected reward)."""
    rows = gsm8k_rows()
    completions, refs, labels = [], [], []
    for i in range(n):
        row = rows[(i // 4) % len(rows)]
        solution, final = row["answer"].rsplit("####", 1)
        final = final.strip()
        value = int(final.replace(",", ""))
        work = solution.strip()
        kind = i % 4
        if kind == 0:
            text, ok = row["answer"], 1.0
        elif kind == 1:
            text, ok = f"{work}\nThe answer is {final}.", 1.0
        elif kind == 2:
            text, ok = f"{work}\nSo the final answer is $\\boxed{{{final}}}$.", 1.0
        else:
            text, ok = f"{work}\n#### {value + 1}", 0.0
        completions.append(text)
        refs.append(row["answer"])
        labels.append(ok)
    return completions, refs, labels


def latex_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    completions, refs = [], []
    for i in range(n):
        a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 9)
        kind = i % 6
        if kind == 0:
            pred, ref = f"\\frac{{\\sqrt{{{a}}}}}{{{b}}}", f"\\frac{{1}}{{{b}}}\\sqrt{{{a}}}"
        elif kind == 1:
            pred, ref = f"{c}\\sqrt{{{a}}}", f"\\sqrt{{{c * c * a}}}"
        elif kind == 2:
            pred, ref = f"(x+{a})^2", f"x^2+{2 * a}x+{a * a}"
        elif kind == 3:
            pred, ref = f"({a}, -{b})", f"({a},-{b + (i % 2)})"
        elif kind == 4:
            pred, ref = f"[{a}, {a + b})", f"[{a},{a + b})"
        else:
            pred, ref = f"x^2+{a}x+{b}", f"x^2+{a}x+{b + 1}"  # unequal
        completions.append(f"Putting it together, the result is $\\boxed{{{pred}}}$.")
        refs.append(f"${ref}$")  # delimited, as math-verify's parse needs (TRL's solutions)
    return completions, refs


def peer_scores(completions, refs) -> list[float]:
    from math_verify import parse, verify

    out = []
    for completion, ref in zip(completions, refs, strict=True):
        gold = parse(ref)
        out.append(float(verify(gold, parse(completion))) if gold else 0.0)
    return out


def jaxpt_scores(completions, refs) -> list[float]:
    from jaxpt.rewards.math import math_reward

    return math_reward(completions=completions, answer=refs)


def timed(fn, completions, refs, reps: int) -> tuple[float, list[float]]:
    fn(completions[:8], refs[:8])  # warm-up: imports, the worker process, parser caches
    times, scores = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        scores = fn(completions, refs)
        times.append(time.perf_counter() - t0)
    return len(completions) / statistics.median(times), scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 gsm8k + 300 latex completions")
    ap.add_argument("--gsm8k", type=int, default=None, help="default 10,000 (--quick: 2,000)")
    ap.add_argument("--latex", type=int, default=None, help="default 2,000 (--quick: 300)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default=f"cpu x{os.cpu_count()}")
    args = ap.parse_args(argv)
    n_gsm8k = args.gsm8k or (2000 if args.quick else 10_000)
    n_latex = args.latex or (300 if args.quick else 2000)
    import importlib.metadata

    peer_name = f"math-verify {importlib.metadata.version('math-verify')} parse+verify (TRL)"
    date = datetime.date.today().isoformat()
    lines = []
    cases = [("gsm8k", *gsm8k_pairs(n_gsm8k)), ("latex", *latex_pairs(n_latex), None)]
    for name, completions, refs, labels in cases:
        log(f"{name}: {len(completions)} completions")
        j_cps, j_scores = timed(jaxpt_scores, completions, refs, args.reps)
        log(f"  jaxpt {j_cps:.0f} completions/s")
        p_cps, p_scores = timed(peer_scores, completions, refs, args.reps)
        log(f"  peer  {p_cps:.0f} completions/s")
        if labels is not None:
            wrong = sum(a != b for a, b in zip(j_scores, labels, strict=True))
            assert wrong == 0, f"jaxpt misscored {wrong} labelled gsm8k completions"
        agree = sum(a == b for a, b in zip(j_scores, p_scores, strict=True)) / len(completions)
        log(f"  jaxpt and math-verify agree on {agree:.1%}")
        lines.append(
            {
                "bench": "rewards",
                "case": f"{name}_{len(completions)}",
                "metric": "completions_per_s",
                "unit": "completions/s",
                "jaxpt": round(j_cps, 1),
                "peer": round(p_cps, 1),
                "peer_name": peer_name,
                "ratio": round(j_cps / p_cps, 3),
                "target": 10.0 if name == "gsm8k" else 0.5,
                "lower_is_better": False,
                "device": args.device,
                "date": date,
                "agreement": round(agree, 4),
            }
        )
    for line in lines:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
