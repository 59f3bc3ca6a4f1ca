"""Rollout decode: the static loop vs continuous batching, on long-tailed completion lengths.

Same model (SmolLM2-135M-Instruct, fp32), same rows: --prompts GSM8K chat prompts x
--samples samples (a GRPO-shaped rollout), temperature 1, EOS ignored and each row given
a fixed budget of new tokens drawn once from a long-tailed (log-normal) distribution whose
longest row is --max-new-tokens (the script checks longest >= 4x median). That stands in
for the lengths of a real rollout, where rows stop at EOS.

At equal cache memory (--slots cache rows of P + M - 1 slots):
  static      rows in batches of --slots rows, one `generate` per batch; a batch decodes
              until its longest row is done (max_new_tokens = the batch's longest budget),
              so its other rows step while finished.
  continuous  `generate_continuous` over all rows with --slots slots (one on-device
              while_loop; and chunks of --chunk-steps steps with the refill decided on the
              host between chunks).
and, as a reference with --slots-all (R cache rows, R / slots times the memory), the
static loop over all rows at once.

Reported per engine: wall time of one call after a warm-up call (compile excluded), useful
tokens (sum of budgets) per second, decode steps, row-steps and the row-steps spent on
finished rows (exact counts, not noisy), and the cache entries held.

    python bench/rollout.py            # 8 prompts x 8 samples, budgets up to 128, 16 slots
    python bench/rollout.py --quick    # 4 x 4 rows, budgets up to 32, 4 slots

Prints one JSON object per engine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/rollout.py` from a checkout
    sys.path.insert(0, str(REPO))

from bench.decode import load_prompts, log  # noqa: E402


def long_tailed_budgets(num_rows: int, longest: int, seed: int = 0):
    """Per-row new-token budgets: log-normal around longest / 6, clipped to [4, longest],
    the largest set to `longest` (so the tail is always there), in a seeded order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.lognormal(mean=np.log(longest / 6), sigma=0.6, size=num_rows)
    budgets = np.clip(np.round(x), 4, longest).astype(np.int32)
    budgets[int(np.argmax(budgets))] = longest
    return budgets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=None, help="default 8 (--quick: 4)")
    ap.add_argument("--samples", type=int, default=None, help="default 8 (--quick: 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (--quick: 32)")
    ap.add_argument("--slots", type=int, default=None, help="default 16 (--quick: 4)")
    ap.add_argument("--chunk-steps", type=int, default=16)
    ap.add_argument("--no-slots-all", dest="slots_all", action="store_false",
                    help="skip the static loop over all rows at once (more cache memory)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    B = args.prompts or (4 if args.quick else 8)
    G = args.samples or (4 if args.quick else 8)
    M = args.max_new_tokens or (32 if args.quick else 128)
    N = args.slots or (4 if args.quick else 16)
    R = B * G
    if R % N or N % G:
        raise SystemExit(f"--slots {N}: must divide the {R} rows and be a multiple of "
                         f"--samples {G} (static batches hold whole prompts)")

    import jax
    import numpy as np
    from flax import nnx

    from jaxpt.models import hub
    from jaxpt.sampling import Sampler, encode_prompts, generate, left_pad
    from jaxpt.sampling.continuous import generate_continuous
    from jaxpt.sampling.state import bucket_length

    model, cfg, resolved = hub.load(args.model)
    tok = resolved.tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    graphdef, params = nnx.split(model)
    platform = jax.default_backend()
    device = f"{platform} x{os.cpu_count()}" if platform == "cpu" else str(jax.devices()[0])
    ids, mask = left_pad(encode_prompts(tok, load_prompts(B)), pad)
    P = bucket_length(ids.shape[1])
    budgets = long_tailed_budgets(R, M)
    median = float(np.median(budgets))
    assert budgets.max() >= 4 * median, (budgets.max(), median)
    useful = int(budgets.sum())
    sampler = Sampler(temperature=1.0)
    per_entry = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # k + v, fp32
    log(f"rows {R} = {B} prompts x {G}; budgets median {median:g} max {int(budgets.max())} "
        f"sum {useful}; slots {N}; prompt bucket {P}")

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = fn()
        return out, warm, time.perf_counter() - t0

    def static_batches(rows_per_call: int):
        """Rows [k * rows_per_call, ...) per call, each to its longest budget."""
        prompts_per_call = rows_per_call // G
        steps = row_steps = 0
        for k in range(R // rows_per_call):
            b0 = k * prompts_per_call
            longest = int(budgets[k * rows_per_call : (k + 1) * rows_per_call].max())
            res = generate(graphdef, params, ids[b0 : b0 + prompts_per_call],
                           mask[b0 : b0 + prompts_per_call], sampler=sampler,
                           max_new_tokens=longest, eos_ids=(), rng=k, num_samples=G,
                           pad_id=pad)
            jax.block_until_ready(res.tokens)
            # `longest` tokens: 1 from the prefill's logits + longest - 1 decode steps.
            steps += longest - 1
            row_steps += (longest - 1) * rows_per_call
        return steps, row_steps, R // rows_per_call

    def continuous(chunk_steps):
        res, stats = generate_continuous(
            graphdef, params, ids, mask, sampler=sampler, max_new_tokens=M, eos_ids=(), rng=0,
            num_samples=G, pad_id=pad, num_slots=N, budgets_R=budgets, chunk_steps=chunk_steps,
            return_stats=True)
        assert (np.asarray(res.lengths) == budgets).all()
        return stats.decode_steps, stats.slot_steps, stats.chunks

    runs = [("static", N, lambda: static_batches(N)),
            ("continuous", N, lambda: continuous(None)),
            (f"continuous_chunks{args.chunk_steps}", N, lambda: continuous(args.chunk_steps))]
    if args.slots_all and N < R:
        runs.append(("static_all_rows", R, lambda: static_batches(R)))
    # Useful decode row-steps: every row's tokens after its first (sampled from the prefill).
    useful_steps = useful - R
    date = datetime.date.today().isoformat()
    results = {}
    for name, rows, fn in runs:
        (steps, row_steps, calls), warm, secs = timed(fn)
        cache_entries = rows * (P + M - 1) + (B * P if name.startswith("continuous") else 0)
        line = {
            "bench": "rollout", "engine": name, "date": date, "device": device,
            "model": args.model, "rows": R, "prompts": B, "samples": G,
            "budget_median": median, "budget_max": int(budgets.max()), "useful_tokens": useful,
            "cache_rows": rows, "cache_entries": cache_entries,
            "cache_mib": round(cache_entries * per_entry / 2**20, 1),
            "calls": calls, "decode_steps": steps, "row_steps": row_steps,
            "finished_row_steps": row_steps - useful_steps,
            "seconds": round(secs, 3), "warmup_seconds": round(warm, 1),
            "useful_tokens_per_s": round(useful / secs, 2),
        }
        results[name] = line
        if name != "static":
            line["speedup_vs_static"] = round(
                line["useful_tokens_per_s"] / results["static"]["useful_tokens_per_s"], 2)
        log(f"{name}: {secs:.1f}s (warm-up {warm:.1f}s), {steps} steps, "
            f"{line['finished_row_steps']} finished row-steps")
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
