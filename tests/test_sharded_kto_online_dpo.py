"""KTO and online DPO train steps on 8 fake CPU devices give the same loss and updated params
on every mesh as on one device (the harness of ``test_sharded_trainers.py``: one subprocess
per algorithm, one JSON line per mesh, reordering tolerances)."""

from __future__ import annotations

import test_sharded_trainers as sharded
from conftest import run_with_devices
from test_sharded_trainers import MESHES, PRELUDE, check_rows, parse_rows, write_config

tiny = sharded.tiny  # the tiny model fixture of test_sharded_trainers

KTO_CODE = """
from jaxpt.trainers.kto import build_kto_trainer
cfg = load_config({path!r})
ref = None
for shape in MESHES:
    tr = build_kto_trainer(cfg, mesh=mesh_of(shape))
    p0 = jax.device_get(tr.state.params)
    batch = tr.source.next(tr.state)  # the online reference forward runs here
    refs = jax.device_get(batch.ref)
    loss, params, state = step_once(tr, batch)
    report(shape, tr, loss, params, state, ref, moved=max_diff(params, p0),
           ref_logps_used=used(refs, ref[2], depth=5) if ref else 0.0,
           labels=np.asarray(batch.label).tolist())
    ref = ref or (loss, params, refs)
"""


def test_kto_step_matches_single_device(tiny, tmp_path, data_dir):
    path = write_config(
        tmp_path / "kto.yaml", tiny, tmp_path / "kto", "kto",
        data={"train": str(data_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz"),
              "format": "hh_rlhf", "skip_invalid": True, "max_train_rows": 24,
              "shuffle": True},  # seeded: a batch with both labels
        # unequal weights: the loss depends on which rows are desirable
        kto={"desirable_weight": 1.5, "undesirable_weight": 0.5, "share_prompt": "always"},
    )
    rows = parse_rows(run_with_devices(PRELUDE.format(meshes=MESHES) + KTO_CODE.format(
        path=str(path))))
    check_rows(rows)
    for r in rows:
        assert r["ref_logps_used"] <= 1.0 and r["labels"] == rows[0]["labels"], r
    assert 0 < sum(rows[0]["labels"]) < 8  # both kinds of rows in the batch


ONLINE_DPO_CODE = """
from jaxpt.algorithms.online_dpo import OnlineDPOBatch
from jaxpt.trainers.online_dpo import build_online_dpo_trainer
from jaxpt.rl.layout import rollout_sequences
cfg = load_config({path!r})

# A fixed step: 4 prompts x 2 completions (chosen first), pair 2 tied (weight 0); reference
# log-probs = the initial policy's (scored on one device) plus noise, so the DPO loss is not
# log 2. Meshes whose batch shards hold whole pairs take the shared-prompt layout.
rs = np.random.RandomState(0)
R, P, C = 8, 12, 6
pmask = np.repeat(np.arange(P)[None] >= rs.randint(0, P - 2, R // 2)[:, None], 2, 0)
cmask = np.arange(C)[None] < rs.randint(1, C + 1, R)[:, None]
prompts = np.repeat(rs.randint(3, 1000, (R // 2, P)), 2, 0)
rows = rollout_sequences(prompts, pmask, rs.randint(3, 1000, (R, C)), cmask)
weight = np.asarray([1, 1, 1, 1, 0, 0, 1, 1], np.float32)

ref = None
for shape in MESHES:
    tr = build_online_dpo_trainer(cfg, mesh=mesh_of(shape))
    p0 = jax.device_get(tr.state.params)
    if ref is None:
        _, ref_lp = tr.source.score_fn(tr.state, rows, old=False, ref=True)
        fixed = OnlineDPOBatch(rows, weight,
                               ref_logprobs=(ref_lp + 0.3 * rs.randn(R, C)).astype(np.float32))
    loss, params, state = step_once(tr, fixed)
    report(shape, tr, loss, params, state, ref, moved=max_diff(params, p0),
           shared=tr.parts.share_prompt)
    ref = ref or (loss, params)
"""


def test_online_dpo_step_matches_single_device(tiny, tmp_path):
    path = write_config(
        tmp_path / "odpo.yaml", tiny, tmp_path / "odpo", "online_dpo",
        online_dpo={"max_completion_length": 6, "max_prompt_length": 128, "temperature": 0.0},
    )
    rows = parse_rows(run_with_devices(PRELUDE.format(meshes=MESHES) + ONLINE_DPO_CODE.format(
        path=str(path))))
    check_rows(rows)
    assert {r["shared"] for r in rows} == {True, False}  # both layouts ran
