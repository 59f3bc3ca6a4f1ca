"""The distillation train step on 8 fake CPU devices equals one device: student and teacher
(3 layers, hidden 48) both in the training shardings, one step with two micro-batches on a
fixed batch (as ``tests/test_sharded_trainers.py`` does for SFT / DPO / GRPO)."""

from __future__ import annotations

from conftest import run_with_devices
from test_sharded_trainers import PRELUDE, parse_rows, tiny, write_config  # noqa: F401
from train_utils import tiny_model_config

MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2)]

DISTILL_CODE = """
from jaxpt.algorithms.distill import DistillBatch
from jaxpt.trainers.distill import build_distill_trainer
from jaxpt.rl.layout import rollout_sequences
cfg = load_config({path!r})
# Student (2 layers) + teacher (3 layers) forward, then the tiles and the update.
DEPTH = run_depth(1, 5)

rs = np.random.RandomState(0)
R, P, C = 16, 12, 6
pmask = np.arange(P)[None] >= rs.randint(0, P - 2, R)[:, None]
cmask = np.arange(C)[None] < rs.randint(1, C + 1, R)[:, None]
rows = rollout_sequences(rs.randint(3, 1000, (R, P)), pmask, rs.randint(3, 1000, (R, C)), cmask)
fixed = DistillBatch(rows, np.zeros(R, np.float32))

ref = None
for shape in MESHES:
    tr = build_distill_trainer(cfg, mesh=mesh_of(shape))
    p0 = jax.device_get(tr.state.params)
    loss, params, state = step_once(tr, fixed)
    row = {{"mesh": list(shape), "loss": loss, "moved": max_diff(params, p0),
           "wq_spec": spec(state.params["layers"]["wq_END"]),
           "teacher_wq_spec": spec(state.frozen["teacher"]["layers"]["wq_END"])}}
    if ref is not None:
        row["loss_used"] = used(loss, ref[0], depth=DEPTH)
        row["param_used"] = used(params, ref[1], depth=DEPTH)
    print("ROW", json.dumps(row), flush=True)
    ref = ref or (loss, params)
"""


def test_distill_step_matches_single_device(tiny, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    from jaxpt.models.decoder import init_model
    from jaxpt.models.weights import export_hf

    model_dir, _ = tiny
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = tiny_model_config(len(tok), num_layers=3, hidden_size=48, intermediate_size=96,
                            num_kv_heads=4)
    teacher = export_hf(init_model(cfg, seed=7), cfg, tmp_path / "teacher", tokenizer=tok)
    path = write_config(
        tmp_path / "distill.yaml", tiny, tmp_path / "distill", "distill",
        train={"batch_size": 16, "grad_accum": 2},
        distill={"teacher": str(teacher), "loss": "gjsd", "beta": 0.5, "lmbda": 1.0,
                 "max_completion_length": 6, "chunk_size": 16},
    )
    code = PRELUDE.format(meshes=MESHES) + DISTILL_CODE.format(path=str(path))
    rows = parse_rows(run_with_devices(code))
    assert [tuple(r["mesh"]) for r in rows] == MESHES
    for r in rows:
        d, f, t = r["mesh"]
        want = [None, "fsdp" if f > 1 else None, "tensor" if t > 1 else None, None]
        # The teacher lives in the same training layout as the student.
        assert r["wq_spec"] == want and r["teacher_wq_spec"] == want, r
        assert r["moved"] > 1e-5, r
        if r["mesh"] != [1, 1, 1]:
            assert r["loss_used"] <= 1.0 and r["param_used"] <= 1.0, r
