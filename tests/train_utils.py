"""Helpers for the tests/test_train_*.py files: a tiny byte-level BPE tokenizer with a
ChatML template, a tiny random model checkpoint that uses it, and run configs.

The tiny model (vocab 1000, hidden 32, 2 layers) makes a train step take milliseconds, so
the loop, resume and export tests exercise the real pipeline (GSM8K rows -> chat template
-> packing -> jitted step -> orbax) quickly. SmolLM2 itself is used only by the e2e test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def gsm8k_path(data_dir: Path, split: str = "train") -> Path:
    return data_dir / "gsm8k" / f"{split}.jsonl"


def make_tiny_tokenizer(out_dir: Path, data_dir: Path, vocab_size: int = 1000):
    """Byte-level BPE trained on 200 GSM8K rows, with the ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = [json.loads(x) for x in gsm8k_path(data_dir).read_text().splitlines()[:200]]
    texts = [r["question"] + "\n" + r["answer"] for r in rows]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_model_config(vocab_size: int, **kw):
    from jaxpt.models.config import ModelConfig

    base = dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=512,
    )
    return ModelConfig(**{**base, **kw})


def make_tiny_tokenizer_and_model(root: Path, data_dir: Path) -> Path:
    """The tiny tokenizer (root/tok) and a tiny random model that uses it (root/model);
    returns the model dir, which holds both."""
    return make_tiny_model_dir(root / "model", make_tiny_tokenizer(root / "tok", data_dir))


def make_tiny_model_dir(out_dir: Path, tokenizer, seed: int = 0, **kw) -> Path:
    """A random tiny llama saved as an HF checkpoint dir with the tokenizer."""
    from jaxpt.models.decoder import init_model
    from jaxpt.models.weights import export_hf

    cfg = tiny_model_config(len(tokenizer), **kw)
    return export_hf(init_model(cfg, seed=seed), cfg, out_dir, tokenizer=tokenizer)


def tiny_run_config(path: Path, model_dir: Path, data_dir: Path, out_dir: Path, **sections):
    """Write a small SFT run config for the tiny model; `sections` deep-update it."""
    cfg = {
        "algorithm": "sft",
        "out_dir": str(out_dir),
        "model": {"name": str(model_dir)},
        "data": {
            "train": str(gsm8k_path(data_dir, "train")),
            "format": "gsm8k",
            "max_train_rows": 48,
            "max_length": 256,
        },
        "optim": {"lr": 3.0e-3, "warmup_steps": 2, "schedule": "cosine"},
        "train": {"max_steps": 10, "batch_size": 4, "seed": 3},
        "checkpoint": {"every": 5, "keep": 5},
        "logging": {"progress": False},
    }
    for k, v in sections.items():
        if isinstance(v, dict):
            cfg.setdefault(k, {}).update(v)
        else:
            cfg[k] = v
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return env


def start_training(
    config: Path, *overrides: str, step_delay: float = 0.0, log: Path | None = None
) -> subprocess.Popen:
    """Run `jaxpt train CONFIG overrides` in a subprocess; with `step_delay`, a callback
    sleeps that long after each logged step, so a test can signal it mid-run."""
    code = textwrap.dedent(f"""
        import sys, time
        from jaxpt.cli import main
        import jaxpt.cli.train as cli
        delay = {step_delay!r}
        def slow(step, row):
            if delay and "loss" in row:
                time.sleep(delay)
        orig = cli.run_train
        cli.run_train = lambda args, **kw: orig(args, callbacks=[slow])
        sys.exit(main(["train", {str(config)!r}, *{list(overrides)!r}]))
    """)
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=subprocess_env(),
        cwd=REPO,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
