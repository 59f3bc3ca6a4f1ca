"""Sharded trainers on 8 fake CPU devices: the real SFT / DPO / GRPO train steps (built by
``build_*_trainer``, jitted with explicit shardings and the state donated) give the same
loss and updated params on every mesh as on one device; state and batches live in the
shardings of the one table; a GRPO rollout under the decode preset gives the same greedy
tokens; a checkpoint written on one mesh resumes on another with the same losses; and a
batch that does not divide data x fsdp fails with a ShardingError naming its size and axes.

One subprocess per algorithm (JAX fixes the device count at start-up), looping over the
meshes and printing one JSON line per mesh that the test parses. The tiny model's head
counts and dims divide tensor=4, its hidden size fsdp=8; fp32 throughout.
"""

from __future__ import annotations

import json

import jax
import pytest
import yaml
from conftest import run_with_devices
from flax import nnx
from jax.sharding import AbstractMesh
from tolerances import assert_reordered_close, run_depth
from train_utils import gsm8k_path, make_tiny_tokenizer, tiny_model_config

from jaxpt.models.decoder import init_model
from jaxpt.models.weights import export_hf
from jaxpt.sharding import (
    DECODE_RULES,
    MESH_AXES,
    TRAIN_RULES,
    ShardingError,
    check_batch_size,
    param_shardings,
    spec_for,
)


def abstract_mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), MESH_AXES)


def test_one_table_train_raises_decode_replicates():
    """The same logical axes give the training layout (strict) and the decode preset
    (tensor-only weights, indivisible dimensions replicated)."""
    params = {
        "embed_VE": jax.ShapeDtypeStruct((1000, 32), "float32"),
        "layers": {
            "wq_END": jax.ShapeDtypeStruct((2, 32, 4, 8), "float32"),
            "wk_EKD": jax.ShapeDtypeStruct((2, 32, 2, 8), "float32"),
        },
    }
    specs = lambda tree: jax.tree.map(lambda s: tuple(s.spec), tree)  # noqa: E731
    train = specs(param_shardings(params, abstract_mesh(1, 2, 2)))
    assert train == {
        "embed_VE": ("tensor", "fsdp"),
        "layers": {
            "wq_END": (None, "fsdp", "tensor", None),
            "wk_EKD": (None, "fsdp", "tensor", None),
        },
    }
    # 2 kv heads on tensor=4: an error for training, replicated for decoding.
    with pytest.raises(
        ShardingError,
        match=r"layers\.wk_EKD: dimension 2 \(kv_heads, size 2\) "
        r"does not divide mesh axis tensor of size 4",
    ):
        param_shardings(params, abstract_mesh(1, 2, 4))
    decode = specs(
        param_shardings(params, abstract_mesh(1, 2, 4), DECODE_RULES, replicate_indivisible=True)
    )
    assert decode == {
        "embed_VE": ("tensor", None),
        "layers": {"wq_END": (None, None, "tensor", None), "wk_EKD": (None, None, None, None)},
    }
    # Decode rows over data x fsdp = 2 x 4: the longest leading run of axes that divides.
    mesh = abstract_mesh(2, 4, 1)
    rows = [
        spec_for((n, 5), ("batch", None), mesh, DECODE_RULES, replicate_indivisible=True)[0]
        for n in (8, 6, 3)
    ]
    assert rows == [("data", "fsdp"), "data", None]
    with pytest.raises(
        ShardingError,
        match="dimension 0 \\(batch, size 6\\) does not divide mesh axis dataxfsdp of size 8",
    ):
        spec_for((6, 5), ("batch", None), mesh, TRAIN_RULES, name="rows")


def test_check_batch_size_names_size_and_axes():
    check_batch_size(8, abstract_mesh(2, 2, 2), what="x")  # 8 rows over 4 shards: fine
    with pytest.raises(ShardingError) as e:
        check_batch_size(6, abstract_mesh(2, 2, 2), what="train.batch_size")
    assert str(e.value).startswith(
        "train.batch_size: batch size 6 is not divisible by the mesh batch axes "
        "data=2 x fsdp=2 (4 shards)"
    )
    # Tensor parallelism does not split the batch.
    check_batch_size(6, abstract_mesh(2, 1, 4))


# (data, fsdp, tensor); the first is the single-device reference.
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)]
# Each comparison reports the share of its reordering tolerance it used (tests/tolerances.py):
# sums of <= 1000 terms (the tiny tokenizer's vocab) through one step of the 2-layer model.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("sharded")
    tok = make_tiny_tokenizer(root / "tok", data_dir)
    # 4 query and 4 kv heads of 8, hidden 32, mlp 64, vocab 1000: every split of
    # tensor <= 4 and fsdp <= 8 divides.
    cfg = tiny_model_config(len(tok), num_kv_heads=4)
    graphdef, params = nnx.split(init_model(cfg, seed=0))
    # x4: logits of std ~2, so losses are away from log(vocab) and greedy decoding has no
    # near-ties that rounding could flip.
    params = jax.tree.map(lambda x: x * 4.0, params)
    model_dir = export_hf(nnx.merge(graphdef, params), cfg, root / "model", tokenizer=tok)
    return model_dir, data_dir


def write_config(path, tiny, out_dir, algorithm, **sections):
    model_dir, data_dir = tiny
    cfg = {
        "algorithm": algorithm,
        "out_dir": str(out_dir),
        "model": {"name": str(model_dir)},
        "data": {
            "train": str(gsm8k_path(data_dir)),
            "format": "gsm8k",
            "max_train_rows": 64,
            "max_length": 128,
        },
        # Adam's first step is lr * g / (|g| + eps): with the default eps it is ~lr * sign(g),
        # blind to a wrongly scaled gradient and amplifying rounding in near-zero entries.
        # With eps = 1 (>> |g|) the update is ~lr * g, so equal params mean equal gradients.
        "optim": {"lr": 1e-2, "eps": 1.0, "schedule": "constant", "weight_decay": 0.1},
        "train": {
            "max_steps": 4,
            "batch_size": 8,
            "seed": 1,
            "logprob_impl": "chunked",
            # Metrics only: off, for smaller programs (faster compiles on every mesh).
            "with_entropy": False,
            "token_accuracy": False,
        },
        "checkpoint": {"every": 0},
        "logging": {"progress": False},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    path.write_text(yaml.safe_dump(cfg))
    return path


# Shared by every subprocess: build the trainer on a mesh, take one step, compare.
PRELUDE = """
import os
# Compile faster (each mesh compiles its own step); the reference step compiles the same way.
os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
import json, jax, numpy as np
from jax.sharding import PartitionSpec as P
from jaxpt.config_load import load_config
from jaxpt.sharding import make_mesh
from tolerances import reorder_atol, run_depth

assert jax.device_count() == 8, jax.devices()
MESHES = {meshes!r}
N_RED, DEPTH = 1000, run_depth(1, 2)

def mesh_of(shape):
    d, f, t = shape
    return make_mesh(d, f, t, devices=jax.devices()[: d * f * t])

def spec(x):
    return [a if a is None or isinstance(a, str) else list(a) for a in x.sharding.spec]

def max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

def max_abs(tree):
    return max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(tree))

def used(a, b, depth=DEPTH):
    # max |a - b| over the reordering tolerance on b's scale: <= 1 passes.
    return max_diff(a, b) / reorder_atol(np.float32, N_RED, depth=depth, scale=max_abs(b))

def step_once(tr, host):
    state, m = tr.step_fn(tr.state, tr.put_batch(host))
    return float(m["loss"]), jax.device_get(state.params), state

def report(shape, tr, loss, params, state, ref, **extra):
    wq = state.params["layers"]["wq_END"]
    mu = state.opt_state[1][0].mu["layers"]["wq_END"]
    row = {{
        "mesh": list(shape),
        "loss": loss,
        "loss_used": used(loss, ref[0]) if ref else 0.0,
        "param_used": used(params, ref[1]) if ref else 0.0,
        "wq_spec": spec(wq),
        "mu_spec": spec(mu),
        "embed_spec": spec(state.params["embed_VE"]),
        "n_devices": len(wq.sharding.device_set),
        **extra,
    }}
    print("ROW", json.dumps(row), flush=True)
"""


def parse_rows(out: str) -> list[dict]:
    return [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]


def expected_specs(shape):
    """Training layout of wq_END [L, E, N, D]: embed over fsdp, heads over tensor."""
    _, f, t = shape
    return [None, "fsdp" if f > 1 else None, "tensor" if t > 1 else None, None]


def check_rows(rows):
    assert [tuple(r["mesh"]) for r in rows] == MESHES
    for r in rows:
        shape = tuple(r["mesh"])
        assert r["loss_used"] <= 1.0 and r["param_used"] <= 1.0, r
        # Params and the optimizer moments live in the training shardings on every device.
        assert r["wq_spec"] == expected_specs(shape), r
        assert r["mu_spec"] == r["wq_spec"], r
        assert r["n_devices"] == shape[0] * shape[1] * shape[2], r
    # The step changed the params (so equal params are not just the initial ones).
    assert all(r["moved"] > 1e-5 for r in rows), rows


SFT_CODE = """
from jaxpt.trainers.sft import build_sft_trainer
cfg = load_config({path!r})
ref = None
for shape in MESHES:
    tr = build_sft_trainer(cfg, mesh=mesh_of(shape))
    p0 = jax.device_get(tr.state.params)
    host = tr.source.next(tr.state)
    loss, params, state = step_once(tr, host)
    report(shape, tr, loss, params, state, ref, moved=max_diff(params, p0))
    ref = ref or (loss, params)

# A batch that does not split over data x fsdp = 4: refused when the trainer is built and
# when a batch is put on the devices, naming the size and the axes.
import dataclasses
from jaxpt.sharding import ShardingError
from jaxpt.engine.state import batch_shardings, put_batch
mesh = mesh_of((2, 2, 2))
for what, fn in [
    ("build", lambda: build_sft_trainer(
        cfg.replace(train=dataclasses.replace(cfg.train, batch_size=6)), mesh=mesh)),
    ("put", lambda: put_batch({{"input_ids": np.zeros((6, 8), np.int32)}},
                              batch_shardings({{"input_ids": 2}}, mesh))),
]:
    try:
        fn()
    except ShardingError as e:
        print("ERR", json.dumps({{"what": what, "msg": str(e)}}))
"""


def test_sft_step_matches_single_device(tiny, tmp_path):
    path = write_config(
        tmp_path / "sft.yaml",
        tiny,
        tmp_path / "sft",
        "sft",
        train={"batch_size": 16, "grad_accum": 2},
    )
    out = run_with_devices(PRELUDE.format(meshes=MESHES) + SFT_CODE.format(path=str(path)))
    check_rows(parse_rows(out))
    errors = {
        e["what"]: e["msg"]
        for e in (json.loads(line[4:]) for line in out.splitlines() if line.startswith("ERR "))
    }
    assert set(errors) == {"build", "put"}, out
    assert errors["build"].startswith(f"{path}: train.batch_size: batch size 6 "), errors
    assert errors["put"].startswith("batch key 'input_ids': batch size 6 "), errors
    for msg in errors.values():
        assert "data=2 x fsdp=2 (4 shards)" in msg and "multiple of 4" in msg, msg


DPO_CODE = """
from jaxpt.trainers.dpo import build_dpo_trainer
cfg = load_config({path!r})
ref = None
for shape in MESHES:
    tr = build_dpo_trainer(cfg, mesh=mesh_of(shape))
    p0 = jax.device_get(tr.state.params)
    batch = tr.source.next(tr.state)  # the online reference forward runs here
    refs = jax.device_get(batch.ref)
    loss, params, state = step_once(tr, batch)
    report(shape, tr, loss, params, state, ref, moved=max_diff(params, p0),
           ref_logps_used=used(refs, ref[2], depth=5) if ref else 0.0,
           frozen_spec=spec(state.frozen["layers"]["wq_END"]))
    ref = ref or (loss, params, refs)
"""


@pytest.mark.parametrize("share_prompt", ["never", "always"])
def test_dpo_step_matches_single_device(tiny, tmp_path, data_dir, share_prompt):
    path = write_config(
        tmp_path / "dpo.yaml",
        tiny,
        tmp_path / "dpo",
        "dpo",
        data={
            "train": str(data_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz"),
            "format": "hh_rlhf",
            "skip_invalid": True,
            "max_train_rows": 24,
        },
        # RPO (DPO + NLL of the chosen): step 1's DPO term is log 2 (policy == reference),
        # the NLL term makes the loss itself depend on the model.
        dpo={
            "loss_type": ["sigmoid", "sft"],
            "loss_weights": [1.0, 0.5],
            "share_prompt": share_prompt,  # two padded rows per pair, or one shared row
        },
    )
    out = run_with_devices(PRELUDE.format(meshes=MESHES) + DPO_CODE.format(path=str(path)))
    rows = parse_rows(out)
    check_rows(rows)
    for r in rows:
        # The reference copy lives in the params' shardings; its summed log-probs (in the
        # hundreds) agree within the reordering tolerance (one forward + the token sum).
        assert r["frozen_spec"] == r["wq_spec"] and r["ref_logps_used"] <= 1.0, r


GRPO_CODE = """
from jaxpt.algorithms.grpo import GRPOBatch
from jaxpt.trainers.grpo import build_grpo_trainer
from jaxpt.rl.layout import rollout_sequences
cfg = load_config({path!r})
ROLLOUT_MESHES = {rollout_meshes!r}

# A fixed rollout batch: 2 left-padded prompts x 4 right-padded completions each, random
# advantages; old log-probs are the initial policy's (scored on one device) plus noise, so
# some ratios leave the clip range. Meshes whose batch shards hold whole groups train in
# the shared-prompt layout, the others in flat rows: both must match one device.
rs = np.random.RandomState(0)
R, P, C, G = 8, 12, 6, 4
pmask = np.repeat(np.arange(P)[None] >= rs.randint(0, P - 2, R // G)[:, None], G, 0)
cmask = np.arange(C)[None] < rs.randint(1, C + 1, R)[:, None]
prompts = np.repeat(rs.randint(3, 1000, (R // G, P)), G, 0)
rows = rollout_sequences(prompts, pmask, rs.randint(3, 1000, (R, C)), cmask)
advantages = rs.randn(R).astype(np.float32)

ref = None
for shape in MESHES:
    tr = build_grpo_trainer(cfg, mesh=mesh_of(shape))
    p0 = jax.device_get(tr.state.params)
    if ref is None:
        old, _ = tr.source.score_fn(tr.state, rows, old=True, ref=False)
        fixed = GRPOBatch(rows, advantages,
                          old_logprobs=(old + 0.15 * rs.randn(R, C)).astype(np.float32))
    extra = {{}}
    if list(shape) in ROLLOUT_MESHES:
        # A real rollout (greedy): the decode loop under the decode preset, then scoring.
        ro = tr.source.next(tr.state).batch
        decode_wq = tr.source.params_of_state(tr.state)["layers"]["wq_END"]
        extra = {{"decode_wq_spec": spec(decode_wq),
                 "completion_tokens": int(ro.rows.completion_mask.sum())}}
        if ref is not None:
            extra["rollout_ids_equal"] = bool(np.array_equal(ro.rows.input_ids,
                                                             ref[2].rows.input_ids))
            extra["rollout_old_used"] = used(ro.old_logprobs, ref[2].old_logprobs, 4)
    loss, params, state = step_once(tr, fixed)
    report(shape, tr, loss, params, state, ref, moved=max_diff(params, p0), **extra)
    ref = ref or (loss, params, ro)
"""

# The rollout runs on one device and on the mesh with every axis (each compiles its own
# policy reshard, prefill, decode and scoring).
ROLLOUT_MESHES = [[1, 1, 1], [2, 2, 2]]


def test_grpo_step_and_rollout_match_single_device(tiny, tmp_path):
    path = write_config(
        tmp_path / "grpo.yaml",
        tiny,
        tmp_path / "grpo",
        "grpo",
        grpo={
            "num_generations": 4,
            "max_completion_length": 6,
            "max_prompt_length": 128,
            "temperature": 0.0,
            "num_iterations": 2,  # reused rollouts: the step takes old log-probs
        },
    )
    code = GRPO_CODE.format(path=str(path), rollout_meshes=ROLLOUT_MESHES)
    rows = parse_rows(run_with_devices(PRELUDE.format(meshes=MESHES) + code))
    check_rows(rows)
    for r in rows:
        if r["mesh"] not in ROLLOUT_MESHES:
            continue
        # Decode preset: weights over tensor only (no fsdp), heads split on tensor=2.
        want = [None, None, "tensor" if r["mesh"][2] > 1 else None, None]
        assert r["decode_wq_spec"] == want, r
        assert r["completion_tokens"] > 0, r
        if r["mesh"] != [1, 1, 1]:
            assert r["rollout_ids_equal"] and r["rollout_old_used"] <= 1.0, r


RESHARD_CODE = """
import dataclasses, shutil
from jaxpt.config import MeshConfig
from jaxpt.trainers.sft import build_sft_trainer
from jaxpt.engine.loop import run

cfg = load_config({path!r})
a, b = {out_a!r}, {out_b!r}

def train(out_dir, mesh, **train_kw):
    c = cfg.replace(out_dir=out_dir, mesh=MeshConfig(*mesh),
                    train=dataclasses.replace(cfg.train, **train_kw))
    tr = build_sft_trainer(c)  # the mesh comes from the config
    res = run(tr)
    wq = res.state.params["layers"]["wq_END"]
    print("ROW", json.dumps({{"out": out_dir, "mesh": list(mesh), "step": res.step,
                             "wq_spec": spec(wq), "n_devices": len(wq.sharding.device_set),
                             "mu_spec": spec(res.state.opt_state[1][0].mu["layers"]["wq_END"])}}),
          flush=True)

train(a, (1, 8, 1))  # 4 steps on fsdp=8, checkpoints after steps 2 and 4
shutil.copytree(a, b)
shutil.rmtree(os.path.join(b, "checkpoints", "4"))  # as if stopped after step 2
train(b, (2, 1, 4))  # resumes from step 2 on data=2 x tensor=4
"""


def test_checkpoint_reshards_across_meshes(tiny, tmp_path):
    """A checkpoint written on fsdp=8 resumes on data=2 x tensor=4 (restored straight into
    the new shardings) and the following losses equal those of the run that went on on
    fsdp=8."""
    from train_utils import train_losses

    path = write_config(
        tmp_path / "sft.yaml",
        tiny,
        tmp_path / "unused",
        "sft",
        checkpoint={"every": 2},
        logging={"every": 1},
    )
    a, b = tmp_path / "fsdp8", tmp_path / "data2_tensor4"
    code = RESHARD_CODE.format(path=str(path), out_a=str(a), out_b=str(b))
    out = run_with_devices(PRELUDE.format(meshes=MESHES) + code)
    assert f"resumed from checkpoint step 2 in {b / 'checkpoints'}" in out, out
    rows = parse_rows(out)
    assert [(r["mesh"], r["step"]) for r in rows] == [([1, 8, 1], 4), ([2, 1, 4], 4)]
    assert rows[0]["wq_spec"] == [None, "fsdp", None, None] == rows[0]["mu_spec"]
    # The resumed state lives in the new mesh's shardings (heads over tensor=4, no fsdp).
    assert rows[1]["wq_spec"] == [None, None, "tensor", None] == rows[1]["mu_spec"]
    assert rows[1]["n_devices"] == 8
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for step in (3, 4):  # steps 3 and 4 ran on another mesh than steps 1 and 2
        assert_reordered_close(lb[step], la[step], n=1000, depth=run_depth(step, 2))
    assert abs(la[4] - la[3]) > 1e-3  # the steps after the resume did change the model


@pytest.mark.parametrize(
    "flags, added",
    [
        ("--xla_force_host_platform_device_count=8", True),
        ("--xla_force_host_platform_device_count=1", False),
        ("", False),
        (
            "--xla_force_host_platform_device_count=8 "
            "--xla_cpu_enable_concurrency_optimized_scheduler=true",
            False,
        ),
    ],
)
def test_importing_jaxpt_serializes_collectives_of_several_cpu_devices(flags, added):
    """Several CPU devices in one process get XLA:CPU's memory-optimized schedule (one
    order of collectives on every device; the concurrency-optimized one deadlocked an
    8-device FSDP step); one device, or a flag the user set, is left alone."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": flags}
    code = "import os, jaxpt; print(os.environ.get('XLA_FLAGS', ''))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    expected = f"{flags} --xla_cpu_enable_concurrency_optimized_scheduler=false"
    assert out == (expected if added else flags)
