"""PPO on 8 fake CPU devices: the rollout's scoring (policy log-probs, critic values,
reference log-probs, then rewards and GAE) and one train step of the policy and its value
head give on every mesh what they give on one device (the tiny model and tolerances of
``tests/test_sharded_trainers.py``)."""

from __future__ import annotations

from conftest import run_with_devices
from test_sharded_trainers import PRELUDE, parse_rows, write_config
from test_sharded_trainers import tiny as tiny  # noqa: F401  (the module's fixture)

MESHES = [(1, 1, 1), (1, 4, 2), (2, 2, 2)]  # fsdp x tensor, and every axis

PPO_CODE = """
import dataclasses
from jaxpt.algorithms.ppo import PPOBatch
from jaxpt.trainers.ppo import build_ppo_trainer
from jaxpt.rl.layout import rollout_sequences
cfg = load_config({path!r})

# A fixed rollout: 8 left-padded prompts, right-padded completions, random scores. Each
# mesh scores it (log-probs, values, reference, GAE); the step then takes the one-device
# batch with old log-probs / values moved by noise, so some ratios and values clip.
rs = np.random.RandomState(0)
R, P, C = 8, 12, 6
pmask = np.arange(P)[None] >= rs.randint(0, P - 2, R)[:, None]
cmask = np.arange(C)[None] < rs.randint(1, C + 1, R)[:, None]
rows = rollout_sequences(rs.randint(3, 1000, (R, P)), pmask, rs.randint(3, 1000, (R, C)), cmask)
scores = rs.randn(R).astype(np.float32)
m = cmask.astype(np.float32)

ref = None
for shape in MESHES:
    tr = build_ppo_trainer(cfg, mesh=mesh_of(shape))
    p0 = jax.device_get(tr.state.params)
    done, metrics = tr.source.complete(tr.state, PPOBatch(rows, scores))
    if ref is None:
        fixed = dataclasses.replace(
            done, old_logprobs=(done.old_logprobs + 0.2 * rs.randn(R, C) * m).astype(np.float32),
            old_values=(done.old_values + 0.3 * rs.randn(R, C) * m).astype(np.float32))
    state, m_step = tr.step_fn(tr.state, tr.put_batch(fixed))
    params = jax.device_get(state.params)
    scored = (done.old_logprobs, done.old_values, done.advantages, done.returns)
    row = {{
        "mesh": list(shape), "loss": float(m_step["loss"]),
        "clipfrac": float(m_step["policy/clipfrac_avg"]),
        "vclipfrac": float(m_step["val/clipfrac_avg"]),
        "moved": max_diff(params, p0),
        "value_moved": max_diff(params["value"], p0["value"]),
        "wq_spec": spec(state.params["policy"]["layers"]["wq_END"]),
        "n_devices": len(state.params["policy"]["layers"]["wq_END"].sharding.device_set),
    }}
    if ref is not None:
        row.update(loss_used=used(row["loss"], ref[0]), param_used=used(params, ref[1]),
                   scored_used=used(scored, ref[2], 4))
    # The reference is the start policy: the KL of the rollout is 0 on every mesh.
    row["kl"] = metrics["objective/kl"]
    print("ROW", json.dumps(row), flush=True)
    ref = ref or (row["loss"], params, scored)
"""


def test_ppo_scoring_and_step_match_single_device(tiny, tmp_path):  # noqa: F811
    path = write_config(tmp_path / "ppo.yaml", tiny, tmp_path / "ppo", "ppo",
                        ppo={"max_completion_length": 6, "max_prompt_length": 128,
                             "kl_coef": 0.1, "value_lr": 0.05})
    out = run_with_devices(PRELUDE.format(meshes=MESHES) + PPO_CODE.format(path=str(path)))
    rows = parse_rows(out)
    assert [tuple(r["mesh"]) for r in rows] == MESHES
    for r in rows:
        assert r["moved"] > 1e-5 and r["value_moved"] > 1e-5, r
        assert r["clipfrac"] > 0 and r["vclipfrac"] > 0, r  # the clipped branches ran
        d, f, t = r["mesh"]
        assert r["n_devices"] == d * f * t
        assert r["wq_spec"] == [None, "fsdp" if f > 1 else None, "tensor" if t > 1 else None,
                                None], r
        if r["mesh"] != [1, 1, 1]:
            assert abs(r["kl"]) < 1e-5, r
            for k in ("loss_used", "param_used", "scored_used"):
                assert r[k] <= 1.0, (k, r)
