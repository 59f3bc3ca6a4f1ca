"""`jaxpt plan`: per-device bytes of a tiny model checked against numbers computed by hand
(written out below), sharding errors that name the dimension, and the CLI."""

from __future__ import annotations

import json

import pytest
import yaml

from jaxpt.cli import main
from jaxpt.cli.plan import load_model_config, plan_memory
from jaxpt.config_load import load_config
from jaxpt.models.config import ModelConfig
from jaxpt.sharding import ShardingError

# Tiny llama: E=64, F=128, L=2, N=4 heads, K=2 kv heads, D=16, V=256, untied LM head.
#   per layer: wq 64*4*16 + wk 64*2*16 + wv 64*2*16 + wo 4*16*64 = 12288,
#              gate/up/down 3*64*128 = 24576, two norms 2*64 = 128      -> 36992
#   model: 2 layers 73984 + embed 256*64 + lm_head 256*64 + final norm 64 -> 106816
TINY = ModelConfig(
    model_type="llama",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)
N_PARAMS = 106816
# fsdp=4 splits every weight's embed dim (64 -> 16); the 2*2*64 + 64 = 320 norm weights are
# replicated. float32: (106816 - 320) * 4 / 4 + 320 * 4
PARAMS_FSDP4 = 106496 + 1280  # = 107776
# optax state: AdamW mu + nu like the params, plus two int32 step counts (scale_by_adam's
# and the learning-rate schedule's)
OPT_FSDP4 = 2 * 107776 + 8


@pytest.fixture
def tiny(tmp_path):
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps(TINY.to_hf_dict()))
    run = {
        "algorithm": "sft",
        "model": {"name": str(cfg_json), "compute_dtype": "float32"},
        "data": {"max_length": 32},
        "train": {"batch_size": 8},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def plan(path, *overrides, devices=4):
    cfg = load_config(path, list(overrides))
    return plan_memory(cfg, load_model_config(cfg), devices)


def test_full_finetune_on_fsdp4_matches_hand_computed_bytes(tiny):
    assert TINY.num_params() == N_PARAMS
    p = plan(tiny)
    assert p.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert p.trainable_params == N_PARAMS
    assert p.params == 107776
    assert p.opt_state == OPT_FSDP4 == 215560
    assert p.grads == 107776
    assert p.frozen == 0
    # b = 8 rows / 4 batch shards = 2 rows, T = 32, n = 64 tokens per device, c = 4 bytes
    assert (p.rows_per_device, p.seqs_per_row, p.seq_len) == (2, 1, 32)
    # saved per layer: 64*4*(4*64 + 2*4*16 + 2*2*16 + 3*128) = 212992; the attention
    # probs 2*4*32*32*4 = 32768 are recomputed (remat: attention, the default), one layer's
    # at a time
    assert p.activation_parts == {
        "layers: 2 x saved residuals (attention probs recomputed)": 2 * 212992,
        "one layer's attention probs in the backward": 32768,
        "attention mask": 2 * 32 * 32,
        "final hidden states": 2 * 64 * 64 * 4,
        "log-prob core (per-token stats)": 3 * 64 * 4,
    }
    assert p.activations == 425984 + 32768 + 2048 + 32768 + 768
    # one layer's 36992 weights gathered in fp32, forward + gradient: 2 * 36992 * 4
    assert p.transient_parts == {
        "attention scores (fp32, one layer)": 2 * 4 * 32 * 32 * 4,
        "one layer's weights + grads, gathered": 295936,
        "LM head gathered over fsdp": 256 * 64 * 4,
        "log-prob tiles": 2 * 64 * 256 * 4,
        "accuracy argmax chunk": 64 * 256 * 4,
    }
    assert p.total == 107776 + 215560 + 107776 + 494336 + 590848


def test_remat_bf16_tensor_and_accumulation(tiny):
    p = plan(
        tiny,
        "mesh.fsdp=2",
        "mesh.tensor=2",
        "model.compute_dtype=bfloat16",
        "model.remat=full",
        "train.grad_accum=2",
        "train.token_accuracy=false",
    )
    # tensor=2 splits heads, kv heads, mlp and vocab; fsdp=2 the embed dim; norms replicated:
    # (106816 - 320) * 4 / 4 + 1280, the same bytes as fsdp=4
    assert p.params == 107776
    assert p.grads == 2 * 107776  # accumulator + micro-batch gradient
    # micro-batch 4 rows / fsdp 2 = 2 rows; n = 64; bf16 c = 2; N_t = 2, K_t = 1, F_t = 64
    full_layer = 64 * 2 * (4 * 64 + 2 * 2 * 16 + 2 * 1 * 16 + 3 * 64) + 2 * 2 * 32 * 32 * 2
    assert p.activation_parts["layers: 2 x saved (full remat)"] == 2 * 64 * 2 * 64
    assert p.activation_parts["one layer recomputed in the backward"] == full_layer == 77824
    assert "accuracy argmax chunk" not in p.transient_parts
    # one layer over tensor=2 (norms whole): (36992 - 128) / 2 + 128 = 18560 weights, bf16
    assert p.transient_parts["one layer's weights + grads, gathered"] == 2 * 18560 * 2


def test_lora_counts_only_adapter_grads_and_optimizer_state(tiny):
    p = plan(tiny, "lora.rank=4", "lora.targets=wq")
    # A: [2, 64, 4] with embed over fsdp -> 128 per device; B: [2, 4, 4, 16] replicated 512
    assert p.trainable_params == 2 * 64 * 4 + 2 * 4 * 4 * 16 == 1024
    assert p.params == 107776  # the frozen base
    assert p.grads == (128 + 512) * 4 == 2560
    assert p.opt_state == 2 * 2560 + 8
    assert p.frozen == 0
    # W + (alpha/r) A B for wq [2, 64, 4, 16] (embed over fsdp), and its gradient
    assert p.transient_parts["LoRA merged weights + grads"] == 2 * (2 * 64 * 4 * 16 // 4) * 4


def test_dpo_keeps_a_reference_copy_and_two_sequences_per_row(tiny):
    p = plan(tiny, "algorithm=dpo")
    assert p.frozen == p.params == 107776
    assert (p.rows_per_device, p.seqs_per_row) == (2, 2)
    assert plan(tiny, "algorithm=dpo", "dpo.precompute_ref_logps=true").frozen == 0


@pytest.mark.parametrize(
    "overrides, devices, match",
    [
        (
            ["mesh.tensor=3"],
            3,
            r"embed_VE: dimension 0 \(vocab, size 256\) does not divide "
            r"mesh axis tensor of size 3",
        ),
        (
            ["train.batch_size=6"],
            4,
            r"train.batch_size / train.grad_accum = 6 rows per "
            r"micro-batch do not divide over the batch mesh axes "
            r"data x fsdp = 1 x 4 = 4",
        ),
        (["mesh.tensor=3"], 4, "4 devices do not divide into mesh"),
        (["mesh.fsdp=3"], 4, "needs 3 devices, planning for 4"),
    ],
)
def test_dimensions_that_do_not_divide_are_named(tiny, overrides, devices, match):
    with pytest.raises(ShardingError, match=match):
        plan(tiny, *overrides, devices=devices)


def test_real_smollm2_config_on_eight_devices():
    pytest.importorskip("gguf")
    from jaxpt.models.hub import ModelNotFound

    try:
        p = plan("configs/sft_gsm8k_smollm2.yaml", devices=8)
    except ModelNotFound as e:
        pytest.skip(str(e))
    # 134,515,008 params (tied embeddings), 30 * 2 * 576 + 576 = 35136 replicated norm
    # weights, the rest split 8 ways over fsdp: (134515008 - 35136) * 4 / 8 + 35136 * 4
    assert p.params == 67239936 + 140544
    assert p.grads == p.params


def test_cli_prints_the_plan_and_json(tiny, capsys):
    assert main(["plan", str(tiny), "--devices", "4", "--memory-gib", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "mesh        data=1 fsdp=4 tensor=1 over 4 devices" in out
    params_line = next(line for line in out.splitlines() if "params (float32)" in line)
    assert params_line.split()[-1] == f"{107776 / 2**20:.2f}" == "0.10"
    assert "DOES NOT FIT in 0.001 GiB" in out
    assert main(["plan", str(tiny), "mesh.fsdp=2", "--devices", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
    assert got["params"] == (106816 - 320) * 4 // 2 + 1280
    assert got["total"] == sum(
        got[k] for k in ("params", "frozen", "opt_state", "grads", "activations", "transient")
    )


def test_hub_id_not_in_the_cache_asks_for_a_config_json(tiny, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["plan", str(tiny), "model.name=someone/not-a-cached-model", "--devices", "1"]) == 2
    err = capsys.readouterr().err
    assert "someone/not-a-cached-model" in err and "--model-config" in err
    assert (
        main(
            [
                "plan",
                str(tiny),
                "model.name=someone/x",
                "--devices",
                "4",
                "--model-config",
                str(tiny.parent / "config.json"),
            ]
        )
        == 0
    )
