"""`jaxpt plan --topology NAME --compile`: the run's own programs compiled by XLA's TPU
compiler (libtpu, in the [test] extra) for a v5e 2x2 slice on this CPU, per-device memory
read back, an oversized run refused by the compiler, and the shape-based plan checked
against what the compiler allocates."""

from __future__ import annotations

import builtins
import json
import os

import pytest
import yaml

from jaxpt.cli import main
from jaxpt.cli.plan import load_model_config, plan_memory
from jaxpt.config_load import load_config
from jaxpt.models.config import ModelConfig

if os.environ.get("CI") != "true":  # CI installs the [test] extra, which brings libtpu
    pytest.importorskip("libtpu")

# TPU-shaped tiny llama: head_dim 128 and a 256-token sequence fit the splash kernel's
# 128-wide blocks, so the TPU attention path (model.attention auto) is what compiles.
TINY = ModelConfig(
    model_type="llama",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=128,
)


def write_run(tmp_path, model: ModelConfig, **sections) -> str:
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps(model.to_hf_dict()))
    run = {
        "algorithm": "sft",
        "model": {"name": str(cfg_json), "compute_dtype": "bfloat16"},
        "data": {"max_length": 256},
        "train": {"batch_size": 8},
    }
    for k, v in sections.items():
        run[k] = {**run.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return str(path)


def compiled(capsys, path, *overrides) -> tuple[int, dict]:
    rc = main(["plan", path, *overrides, "--topology", "v5e-4", "--compile", "--json"])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    return rc, json.loads(out)


def test_sft_programs_compile_for_v5e_and_the_plan_bounds_them(tmp_path, capsys):
    path = write_run(tmp_path, TINY, data={"max_length": 256, "eval": "unused.jsonl"})
    rc, report = compiled(capsys, path)
    assert rc == 0 and report["devices"] == 4
    progs = {p["name"]: p for p in report["programs"]}
    assert set(progs) == {"train step", "eval step"}
    assert all(p["error"] is None and p["fits"] for p in progs.values())
    train = progs["train step"]
    # The donated state comes back as the new state: every output but the metrics aliases
    # an argument.
    assert train["aliased"] > 0 and train["outputs"] - train["aliased"] <= 8192
    # The arguments are the state (fp32 params + AdamW mu, nu, fsdp=4) and the batch (5
    # int32/float32 [8, 256] arrays, 2 rows per device), which the shape-based plan counts
    # exactly; TPU buffers are allocated in 512-byte granules, so the four scalar-sized
    # arrays (step, rng, the two optimizer counts) take up to 4 x 512 bytes more.
    cfg = load_config(path)
    plan = plan_memory(cfg, load_model_config(cfg), 4)
    exact = plan.params + plan.opt_state + 5 * 2 * 256 * 4 + 8 + 4
    assert 0 <= train["arguments"] - exact <= 4 * 512
    # Temporaries: the plan's gradients + activations + transient buffers bound what XLA
    # keeps alive (it assumes the written-out attention's T x T scores, which the splash
    # kernel compiled here never materializes; 0.4x of the estimate when written).
    assert train["temporaries"] <= plan.grads + plan.activations + plan.transient


def test_lora_and_dpo_compile_every_program(tmp_path, capsys):
    path = write_run(tmp_path, TINY)
    rc, report = compiled(capsys, path, "lora.rank=8")
    assert rc == 0 and [p["name"] for p in report["programs"]] == ["train step"]
    full = compiled(capsys, path)[1]["programs"][0]
    lora = report["programs"][0]
    assert lora["arguments"] < full["arguments"]  # no optimizer state for the frozen base

    dpo = write_run(tmp_path, TINY, algorithm="dpo", dpo={"eval_holdout": 8})
    rc, report = compiled(capsys, dpo)
    names = [p["name"] for p in report["programs"]]
    assert rc == 0 and names == ["train step", "reference", "eval step"]
    assert all(p["error"] is None for p in report["programs"])


def test_kto_compiles_every_program_and_a_precomputed_reference_keeps_no_copy(tmp_path, capsys):
    path = write_run(tmp_path, TINY, algorithm="kto", kto={"eval_holdout": 8})
    rc, online = compiled(capsys, path)
    assert rc == 0 and [p["name"] for p in online["programs"]] == [
        "train step", "reference", "eval step"]
    assert all(p["error"] is None and p["fits"] for p in online["programs"])
    rc, pre = compiled(capsys, path, "kto.precompute_ref_logps=true")
    assert rc == 0 and [p["name"] for p in pre["programs"]] == [
        "train step", "reference", "eval step"]
    # Online, the train state carries the reference copy of the params; precomputed, not.
    assert pre["programs"][0]["arguments"] < online["programs"][0]["arguments"]


def test_reward_model_compiles_with_its_score_head(tmp_path, capsys):
    path = write_run(tmp_path, TINY, algorithm="reward", reward={"eval_holdout": 8})
    rc, report = compiled(capsys, path)
    assert rc == 0 and [p["name"] for p in report["programs"]] == ["train step", "eval step"]
    assert all(p["error"] is None and p["fits"] for p in report["programs"])
    sft = compiled(capsys, write_run(tmp_path, TINY))[1]["programs"][0]
    # Two rows per pair and the [1, E] head beside the decoder: more arguments than SFT's
    # step on the same params (its batch is one row per example).
    assert report["programs"][0]["arguments"] > sft["arguments"]


def test_a_run_too_large_for_the_slice_is_refused_by_the_compiler(tmp_path, capsys):
    # A 2M x 2048 embedding and LM head in fp32 with AdamW: 8.6e9 params, 137 GB of state,
    # 34 GB per device over 4 v5e chips of 16 GiB.
    huge = TINY.replace(vocab_size=2**21, hidden_size=2048, num_heads=16, num_kv_heads=8,
                        num_layers=1)
    rc, report = compiled(capsys, write_run(tmp_path, huge, data={"max_length": 128}))
    train = report["programs"][0]
    assert rc == 1 and not train["fits"]
    assert train["error"] is not None or train["total"] > 16 * 2**30


def test_missing_libtpu_is_one_line_saying_how_to_install_it(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_libtpu(name, *a, **kw):
        if name == "libtpu":
            raise ImportError("no libtpu")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_libtpu)
    rc = main(["plan", write_run(tmp_path, TINY), "--topology", "v5e-4", "--compile"])
    assert rc == 2
    assert "pip install 'jaxpt[tpu]'" in capsys.readouterr().err


def test_unknown_topology_and_compile_without_topology_are_refused(tmp_path, capsys):
    path = write_run(tmp_path, TINY)
    assert main(["plan", path, "--topology", "v9-8", "--compile"]) == 2
    assert "'v9-8' is not known; use one of v5e-4, v5e-8" in capsys.readouterr().err
    assert main(["plan", path, "--compile"]) == 2
    assert "--compile needs --topology" in capsys.readouterr().err


def test_grpo_train_step_and_rollout_compile_and_the_plan_counts_the_kv_cache(tmp_path, capsys):
    """GRPO's programs (train step on the shared-prompt layout, the rollout's prefill and
    decode loop) compile for the slice; the decode loop's arguments are the decode params
    and the loop carry, which the shape-based plan's rollout lines count."""
    grpo = {"num_generations": 4, "max_prompt_length": 128, "max_completion_length": 128,
            "task": "arithmetic", "beta": 0.04, "num_iterations": 2}
    path = write_run(tmp_path, TINY, algorithm="grpo", grpo=grpo)
    rc, report = compiled(capsys, path)
    progs = report["programs"]
    assert rc == 0, report
    assert [p["name"].split(" (")[0] for p in progs] == [
        "train step", "rollout prefill", "rollout decode"]
    assert all(p["error"] is None and p["fits"] for p in progs)
    cfg = load_config(path)
    parts = plan_memory(cfg, load_model_config(cfg), 4).rollout_parts
    # 8 rows over 4 devices x 2 layers x (128 + 128 - 1) slots x 1 kv head x 128 x (k, v)
    # x bf16, plus positions and segment ids (int32).
    cache = 2 * 2 * 255 * 128 * 2 * 2 + 2 * 255 * 4 * 2
    assert parts["KV cache (static, 8 rows, 255 slots)"] == cache
    decode = progs[2]
    counted = (parts["decode params (decode preset)"] + cache
               + parts["completion tokens + log-probs"])
    # The rest of the carry: per-row last token, position, length, done flag, the step
    # and the key, each in its own 512-byte TPU granule at most.
    assert 0 <= decode["arguments"] - counted <= 8 * 512
    assert decode["aliased"] >= cache  # the cache is donated and updated in place


def test_the_plan_counts_the_continuous_engines_slots(tmp_path):
    path = write_run(tmp_path, TINY, algorithm="grpo", grpo={
        "num_generations": 4, "max_prompt_length": 128, "max_completion_length": 128,
        "rollout_engine": "continuous", "rollout_slots": 4}, train={"batch_size": 16})
    cfg = load_config(path)
    parts = plan_memory(cfg, load_model_config(cfg), 4).rollout_parts
    slots = {k: v for k, v in parts.items() if k.startswith("KV cache")}
    (name, got), = slots.items()
    assert name == "KV cache (continuous, 4 rows, 255 slots)"
    assert got == 1 * 2 * 255 * 128 * 2 * 2 + 1 * 255 * 4 * 2  # 4 slots over 4 devices


def test_online_dpo_programs_compile(tmp_path, capsys):
    path = write_run(tmp_path, TINY, algorithm="online_dpo", online_dpo={
        "max_prompt_length": 128, "max_completion_length": 128, "task": "arithmetic"})
    rc, report = compiled(capsys, path)
    assert rc == 0, report
    assert [p["name"].split(" (")[0] for p in report["programs"]] == [
        "train step", "rollout prefill", "rollout decode"]
    assert all(p["error"] is None and p["fits"] for p in report["programs"])


def test_ppo_programs_compile_with_the_value_head_and_refts_demonstrations(tmp_path, capsys):
    path = write_run(tmp_path, TINY, algorithm="ppo", ppo={
        "max_prompt_length": 128, "max_completion_length": 128, "task": "arithmetic"})
    rc, report = compiled(capsys, path)
    assert rc == 0, report
    assert [p["name"].split(" (")[0] for p in report["programs"]] == [
        "train step", "rollout prefill", "rollout decode"]
    assert all(p["error"] is None and p["fits"] for p in report["programs"])
    rc, reft = compiled(capsys, path, "ppo.sft_warmup_steps=2")
    assert rc == 0 and reft["programs"][0]["error"] is None
    # ReFT's warm-up adds the prompts' demonstration rows to the step's batch.
    assert reft["programs"][0]["arguments"] > report["programs"][0]["arguments"]
