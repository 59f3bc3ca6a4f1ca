"""Logits parity with transformers, and the export round trip."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_tiny_hf, padded_batch
from tolerances import assert_reordered_close

from jaxpt.models import hub
from jaxpt.models.config import ModelConfig
from jaxpt.models.weights import SafetensorsSource, export_hf, load_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "llama": dict(model_type="llama"),
    "llama_llama3_rope_tied": dict(model_type="llama", tie=True, rope_scaling=LLAMA3_ROPE),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=24),
}


def jaxpt_logits(model, ids, mask, positions):
    hidden, _ = model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))
    return np.asarray(model.logits(hidden))


def hf_logits(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_checkpoint_logits_match_transformers(case, tmp_path):
    kw = dict(CASES[case])
    hf = make_tiny_hf(kw.pop("model_type"), tmp_path, **kw)
    cfg = ModelConfig.from_hf_file(tmp_path / "config.json")
    model = load_model(SafetensorsSource(tmp_path), cfg)
    # Row 1 is left padded; positions go past the llama3 original context (16).
    ids, mask, positions = padded_batch(np.random.RandomState(0), 128, [40, 29, 7], 40)
    ours, ref = jaxpt_logits(model, ids, mask, positions), hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ref).max() > 1.0  # logits of a real scale, not a degenerate model
    # torch and XLA sum in their own orders: <= 128 terms (hidden 64, MLP 96, vocab 128,
    # 40 positions), 2 layers + the LM head.
    assert_reordered_close(ours[real], ref[real], n=128, depth=3)


def test_export_round_trip_through_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    make_tiny_hf("qwen2", tmp_path / "src")
    cfg = ModelConfig.from_hf_file(tmp_path / "src" / "config.json")
    model = load_model(SafetensorsSource(tmp_path / "src"), cfg)
    # Several shards force the index path.
    out = export_hf(model, cfg, tmp_path / "out", max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask, positions = padded_batch(np.random.RandomState(1), 128, [16, 9], 16)
    real = mask.astype(bool)
    assert_reordered_close(
        jaxpt_logits(model, ids, mask, positions)[real],
        hf_logits(reloaded, ids, mask)[real],
        n=128,
        depth=3,
    )
    # And back into jaxpt through the sharded-index loader.
    again = load_model(SafetensorsSource(out), cfg)
    np.testing.assert_array_equal(
        np.asarray(again.layers.wq_END[...]), np.asarray(model.layers.wq_END[...])
    )
    assert not list(tmp_path.glob(".out.*")), "export left its temp dir behind"


def test_bf16_params_and_compute_track_fp32(tmp_path):
    make_tiny_hf("llama", tmp_path)
    cfg = ModelConfig.from_hf_file(tmp_path / "config.json")
    fp32 = load_model(SafetensorsSource(tmp_path), cfg)
    bf16 = load_model(
        SafetensorsSource(tmp_path), cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    )
    assert bf16.layers.wq_END[...].dtype == jnp.bfloat16
    ids, mask, positions = padded_batch(np.random.RandomState(2), 128, [12], 12)
    a, b = jaxpt_logits(fp32, ids, mask, positions), jaxpt_logits(bf16, ids, mask, positions)
    assert b.dtype == np.float32
    # bf16 has ~3 significant digits: close in scale, not equal.
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert np.abs(a - b).max() > 0


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf(smollm2, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model, cfg, resolved = smollm2
    hf = AutoModelForCausalLM.from_pretrained(
        str(resolved.path.parent), gguf_file=resolved.path.name, dtype=torch.float32
    ).eval()
    tok = smollm2_tokenizer
    prompts = ["What is 12 times 7?", "Write a haiku about the sea and the moon, please."]
    rows = [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
        for p in prompts
    ]
    T = max(map(len, rows))
    ids = np.full((2, T), tok.pad_token_id, np.int32)
    mask = np.zeros((2, T), np.int32)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :], mask[i, T - len(r) :] = r, 1
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    real = mask.astype(bool)
    # SmolLM2: sums of <= 1536 terms (the MLP), 30 layers + the LM head.
    assert_reordered_close(
        jaxpt_logits(model, ids, mask, positions)[real],
        hf_logits(hf, ids, mask)[real],
        n=cfg.intermediate_size,
        depth=cfg.num_layers + 1,
    )


def test_packaged_model_config_and_count():
    cfg = hub.resolve("smollm2-135m-instruct").config()
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.tie_word_embeddings) == (
        "llama",
        30,
        576,
        True,
    )
    assert abs(cfg.num_params() - 134.5e6) < 1e6
