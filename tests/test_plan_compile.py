"""`jaxpt plan --topology NAME --compile`: the run's own programs compiled by XLA's TPU
compiler (libtpu, in the [test] extra) for a v5e 2x2 slice on this CPU, per-device memory
read back, an oversized run refused by the compiler, and the shape-based plan checked
against what the compiler allocates."""

from __future__ import annotations

import builtins
import dataclasses
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


def test_rft_compiles_its_sampling_held_out_and_sft_programs(tmp_path, capsys):
    """RFT's rejection sampling and held-out evaluation decode through `generate` without
    the decode preset, on the params in their training shardings; its SFT stage is an SFT
    run's train step."""
    path = write_run(tmp_path, TINY, algorithm="rft", rft={
        "max_prompt_length": 128, "max_new_tokens": 128, "batch_size": 8, "eval_batch_size": 4,
        "arithmetic": {"train": 4, "eval": 4}})
    rc, report = compiled(capsys, path)
    progs = report["programs"]
    assert rc == 0, report
    assert [p["name"] for p in progs] == [
        "sampling prefill (8 prompts x 128 tokens)",
        "sampling decode (8 rows x 128 new tokens, cache 255 slots)",
        "held-out prefill (4 prompts x 128 tokens)",
        "held-out decode (4 rows x 128 new tokens, cache 255 slots)",
        "train step"]
    assert all(p["error"] is None and p["fits"] for p in progs)
    cfg = load_config(path)
    plan = plan_memory(cfg, load_model_config(cfg), 4)
    # The sampling prefill reads the params in their training shardings (fsdp over the 4
    # devices: the plan's params line, not the decode preset's replicated copy) and the
    # replicated prompt ids and mask (2 x [8, 128] int32) and key, one 512-byte granule each
    # at most beyond that.
    assert 0 <= progs[0]["arguments"] - (plan.params + 2 * 8 * 128 * 4) <= 3 * 512
    # The SFT stage's step: state and batch as in the SFT test above.
    exact = plan.params + plan.opt_state + 5 * 2 * 256 * 4 + 8 + 4
    assert 0 <= progs[4]["arguments"] - exact <= 4 * 512


def test_distill_compiles_the_student_step_with_the_teacher_and_the_rollout(tmp_path, capsys):
    teacher = TINY.replace(num_layers=4)  # twice the student's layers: its own shapes
    teacher_json = tmp_path / "teacher" / "config.json"
    teacher_json.parent.mkdir()
    teacher_json.write_text(json.dumps(teacher.to_hf_dict()))
    path = write_run(tmp_path, TINY, algorithm="distill", distill={
        "teacher": str(teacher_json), "max_prompt_length": 128, "max_completion_length": 128,
        "task": "arithmetic"})
    rc, report = compiled(capsys, path)
    progs = report["programs"]
    assert rc == 0, report
    assert [p["name"].split(" (")[0] for p in progs] == [
        "train step", "rollout prefill", "rollout decode"]
    assert all(p["error"] is None and p["fits"] for p in progs)
    cfg = load_config(path)
    plan = plan_memory(cfg, load_model_config(cfg), 4)
    teacher_cfg = cfg.replace(model=dataclasses.replace(cfg.model, name=str(teacher_json)))
    teacher_params = plan_memory(teacher_cfg, load_model_config(teacher_cfg), 4).params
    # The step's arguments: the student's state (params, AdamW), the teacher's params (in
    # state.frozen, sharded as the student's) and the batch: 2 of the 8 rows per device, 4
    # int32 [., 256] rows, the float32 [., 128] completion mask and [.] advantages.
    batch = 4 * 2 * 256 * 4 + 2 * 128 * 4 + 2 * 4
    exact = plan.params + plan.opt_state + teacher_params + batch + 8 + 4
    assert 0 <= progs[0]["arguments"] - exact <= 4 * 512


def test_compiling_for_a_slice_bypasses_the_persistent_cache(tmp_path, recwarn):
    """A compile-only TPU client writes executables into the persistent cache but cannot
    load them, so a second compile of a program warned "Error reading persistent
    compilation cache entry ... PjRtCompiler must be constructed with a Client"; the cache
    is off while compiling for a slice, and on again after."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.compilation_cache import compilation_cache as cc
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxpt.engine import aot

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_enable_compilation_cache")
    saved = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_enable_compilation_cache", True)
    cc.reset_cache()
    try:
        mesh = Mesh(np.array(aot.topology_devices(aot.topology("v5e-4"))), ("x",))
        x = jax.ShapeDtypeStruct((4096,), jnp.float32, sharding=NamedSharding(mesh,
                                                                            PartitionSpec("x")))
        # Two jitted functions of one program: the same persistent cache key, no in-memory
        # cache shared between them.
        first, second = (aot.compile_program(aot.AotProgram("f", jax.jit(lambda v: 2 * v + 1),
                                                            (x,))) for _ in range(2))
        assert first.error is None and second == first
        assert not [w for w in recwarn if "persistent compilation cache" in str(w.message)]
        assert not list(tmp_path.iterdir())  # nothing written for the slice
        # Restored: the next compile on this machine's CPU writes its entry.
        assert jax.config.jax_enable_compilation_cache
        jax.jit(lambda v: v * 3 - 1)(jnp.arange(7.0)).block_until_ready()
        assert list(tmp_path.iterdir())
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        cc.reset_cache()
