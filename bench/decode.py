"""Decode throughput: jaxpt's jitted KV-cache loop vs transformers `generate`.

Same model (SmolLM2-135M-Instruct GGUF, dequantized to fp32, in both), same chat prompts
(GSM8K test questions when the shared data is present), greedy, EOS ignored so every row
produces exactly --new-tokens tokens (jaxpt: no stop ids; transformers:
min_new_tokens = max_new_tokens). Time = one full generate call (prefill + decode) after
a warm-up call (jaxpt's compile is excluded), median over --reps calls. torch runs with
the fastest of --torch-threads (default 1 and the core count, picked on a short probe):
on a shared, oversubscribed machine torch's default threading slows down by 5-10x,
which would flatter the ratio.

    python bench/decode.py            # batch 1, 8, 32 x 128 new tokens, 3 reps
    python bench/decode.py --quick    # batch 1, 8 x 32 new tokens, 1 rep (a few minutes)
    python bench/decode.py --no-pack  # prefill the padded prompt rows (generate(pack=False))

Prints one JSON object per batch size (metric: new tokens per second, ratio = jaxpt /
transformers, target 3.0 at batch 8).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/decode.py` from a checkout
    sys.path.insert(0, str(REPO))

FALLBACK_PROMPTS = [
    "What is 2+2?",
    "Write a haiku about the sea.",
    "Name three primary colors.",
    "Explain gravity to a child.",
    "Translate 'good morning' to French.",
    "What is the capital of Japan?",
    "List the days of the week.",
    "Give me a tip for learning to cook.",
]


def load_prompts(n: int) -> list[str]:
    for base in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        path = base / "gsm8k" / "test.jsonl"
        if path.exists():
            with path.open() as f:
                rows = [json.loads(line)["question"] for _, line in zip(range(n), f, strict=False)]
            if len(rows) == n:
                return rows
    return [FALLBACK_PROMPTS[i % len(FALLBACK_PROMPTS)] for i in range(n)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", default=None, help="default 1,8,32 (--quick: 1,8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (--quick: 32)")
    ap.add_argument("--reps", type=int, default=None, help="default 3 (--quick: 1)")
    ap.add_argument("--quick", action="store_true", help="a run of a couple of minutes")
    ap.add_argument("--skip-peer", action="store_true", help="time jaxpt only")
    ap.add_argument(
        "--no-pack",
        action="store_true",
        help="prefill the left-padded prompt rows as they are (generate(pack=False)) "
        "instead of packing prompts several to a row",
    )
    ap.add_argument(
        "--torch-threads",
        default=None,
        help="comma list of torch CPU thread counts to try; the fastest on a 16-token "
        "probe is timed (default: 1 and the core count; torch's default is the core "
        "count, which collapses when a shared machine is oversubscribed)",
    )
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,32")).split(",")]
    M = args.new_tokens or (32 if args.quick else 128)

    import jax
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from jaxpt.models import hub
    from jaxpt.sampling import Sampler, encode_prompts, generate, left_pad

    model, cfg, resolved = hub.load(args.model)
    tok = resolved.tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    graphdef, params = nnx.split(model)
    platform = jax.default_backend()
    device = f"{platform} x{os.cpu_count()}" if platform == "cpu" else str(jax.devices()[0])

    hf = None
    torch_device = "cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu"
    if not args.skip_peer:
        from transformers import AutoModelForCausalLM

        if resolved.kind == "gguf":
            hf = AutoModelForCausalLM.from_pretrained(
                str(resolved.path.parent), gguf_file=resolved.path.name, dtype=torch.float32
            )
        else:
            hf = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=torch.float32)
        hf = hf.eval().to(torch_device)
    thread_options = [None]
    if torch_device == "cpu":
        default = str(os.cpu_count() or 1)
        thread_options = sorted({int(t) for t in (args.torch_threads or f"1,{default}").split(",")})
    peer_base = f"transformers {transformers.__version__} generate (torch {torch.__version__}"

    prompts_all = encode_prompts(tok, load_prompts(max(batches)))
    date = datetime.date.today().isoformat()
    lines = []
    for B in batches:
        ids, mask = left_pad(prompts_all[:B], pad)

        def run_jaxpt(ids=ids, mask=mask):
            res = generate(
                graphdef,
                params,
                ids,
                mask,
                sampler=Sampler.greedy(),
                max_new_tokens=M,
                eos_ids=(),
                rng=0,
                pad_id=pad,
                pack=not args.no_pack,
            )
            return np.asarray(jax.block_until_ready(res.tokens))

        t0 = time.perf_counter()
        out = run_jaxpt()
        log(f"[bs{B}] jaxpt warm-up (compile + run) {time.perf_counter() - t0:.1f}s")
        assert out.shape == (B, M)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run_jaxpt()
            times.append(time.perf_counter() - t0)
        jaxpt_tps = B * M / statistics.median(times)
        log(f"[bs{B}] jaxpt {times} s -> {jaxpt_tps:.1f} tok/s")

        peer_tps = None
        peer_name = peer_base + ")"
        if hf is not None:
            ids_t = torch.tensor(ids, dtype=torch.long, device=torch_device)
            mask_t = torch.tensor(mask, dtype=torch.long, device=torch_device)

            def run_hf(n, ids_t=ids_t, mask_t=mask_t):
                with torch.no_grad():
                    out = hf.generate(
                        input_ids=ids_t,
                        attention_mask=mask_t,
                        do_sample=False,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        pad_token_id=pad,
                    )
                if torch_device == "cuda":
                    torch.cuda.synchronize()
                return out

            probes = {}
            for threads in thread_options:  # probe, also the warm-up
                if threads is not None:
                    torch.set_num_threads(threads)
                t0 = time.perf_counter()
                run_hf(16)
                probes[threads] = time.perf_counter() - t0
            best = min(probes, key=probes.get)
            if best is not None:
                torch.set_num_threads(best)
                log(f"[bs{B}] torch threads probe (16 tokens): {probes} s -> {best}")
            peer_name = peer_base + (f", {best} threads)" if best is not None else ")")
            hf_times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                out = run_hf(M)
                hf_times.append(time.perf_counter() - t0)
                assert out.shape[1] - ids.shape[1] == M
            peer_tps = B * M / statistics.median(hf_times)
            log(f"[bs{B}] transformers {hf_times} s -> {peer_tps:.1f} tok/s")

        lines.append(
            {
                "bench": "decode",
                "case": f"bs{B}_new{M}_greedy_fp32" + ("_nopack" if args.no_pack else ""),
                "metric": "new_tokens_per_s",
                "unit": "tok/s",
                "jaxpt": round(jaxpt_tps, 2),
                "peer": round(peer_tps, 2) if peer_tps else None,
                "peer_name": peer_name,
                "ratio": round(jaxpt_tps / peer_tps, 3) if peer_tps else None,
                "target": 3.0 if B == 8 else None,
                "lower_is_better": False,
                "device": device,
                "date": date,
            }
        )
    for line in lines:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
