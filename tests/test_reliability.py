"""Nothing lost, nothing poisoned (issue #23): export never deletes what it should not,
non-finite updates are skipped, bad input is located, skipped rows are counted."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from train_utils import (
    make_tiny_tokenizer_and_model,
    read_metrics,
    tiny_model_config,
    tiny_run_config,
)

from jaxpt.cli import main as cli_main
from jaxpt.config_load import load_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("tiny")
    model_dir = make_tiny_tokenizer_and_model(root, data_dir)
    return root, model_dir, data_dir


def config(tiny, tmp_path, name="run", overrides=(), **sections):
    _, model_dir, data_dir = tiny
    path = tiny_run_config(
        tmp_path / f"{name}.yaml", model_dir, data_dir, tmp_path / name, **sections
    )
    return load_config(path, overrides)

# -- export ----------------------------------------------------------------------------------


def fake_run(root: Path) -> Path:
    """A run dir as the loop leaves it (enough for export's target checks, which run
    before any model loads)."""
    run = root / "run"
    (run / "checkpoints" / "4" / "state").mkdir(parents=True)
    (run / "config.yaml").write_text("algorithm: sft\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return run


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_export_refuses_a_non_empty_target_without_overwrite(tmp_path, capsys):
    run = fake_run(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert cli_main(["export", str(run), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(tmp_path) == before and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("target", [".", "run", "run/checkpoints", "..", "other_run"])
def test_export_overwrite_never_removes_cwd_a_run_or_its_parents(
    tmp_path, monkeypatch, capsys, target
):
    work = tmp_path / "work"
    work.mkdir()
    run = fake_run(work)
    other = fake_run(work / "o").rename(work / "other_run")
    (work / "notes.txt").write_text("precious")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    assert cli_main(["export", str(run), target, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "refusing" in err, err
    assert snapshot(tmp_path) == before and other.is_dir()


def test_export_hf_writes_beside_and_swaps_into_place(tmp_path):
    from transformers import AutoConfig

    from jaxpt.models.decoder import init_model
    from jaxpt.models.weights import export_hf

    cfg = tiny_model_config(64)
    model = init_model(cfg)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError, match="--overwrite"):
        export_hf(model, cfg, out)
    assert (out / "old.txt").exists() and not (out / "config.json").exists()
    export_hf(model, cfg, out, overwrite=True)
    assert not (out / "old.txt").exists()
    assert AutoConfig.from_pretrained(out).hidden_size == cfg.hidden_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "temp dirs left behind"
    with pytest.raises(ValueError, match="not a directory"):
        (tmp_path / "file").write_text("x")
        export_hf(model, cfg, tmp_path / "file", overwrite=True)


# -- non-finite updates ----------------------------------------------------------------------


def test_nan_lr_skips_every_update_and_checkpoints_stay_finite(tiny, tmp_path):
    """optim.lr=nan (past config validation): finite loss and gradients, NaN update. The
    step must skip it, so the checkpoints hold the finite initial weights."""
    from jaxpt.engine.checkpoint import Checkpointer, abstract_like
    from jaxpt.engine.loop import NonFiniteError, run
    from jaxpt.trainers.sft import build_sft_trainer

    cfg = config(tiny, tmp_path, train={"max_steps": 6, "max_bad_steps": 3},
                 checkpoint={"every": 2})
    cfg = cfg.replace(optim=dataclasses.replace(cfg.optim, lr=math.nan))
    trainer = build_sft_trainer(cfg)
    template = abstract_like(trainer.state.saveable())
    init = jax.device_get(trainer.state.params)
    with pytest.raises(NonFiniteError) as e:
        run(trainer)
    msg = str(e.value)
    assert "3 consecutive steps (1..3)" in msg and "update" in msg
    assert "last finite checkpoint is step 2" in msg
    rows = [r for r in read_metrics(cfg.out_dir) if "loss" in r]
    assert [r["skipped"] for r in rows] == [1, 1, 1]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    ck = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    state, _ = ck.restore(2, template)
    ck.close()
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(init), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


# -- undecodable input ----------------------------------------------------------------------

ROWS = [b'{"text": "one"}\n', b'{"text": "caf\xe9"}\n', b'{"text": "three"}\n']


def test_non_utf8_jsonl_names_file_row_and_offset_and_skip_invalid_covers_it(tmp_path):
    from jaxpt.data.formats import DataError, DataStats
    from jaxpt.data.sources import read_records

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"".join(ROWS))
    with pytest.raises(DataError) as e:
        read_records(path)
    msg = str(e.value)
    assert str(path) in msg and "row 2" in msg and "not valid UTF-8" in msg
    offset = len(ROWS[0]) + ROWS[1].index(b"\xe9")
    assert f"byte offset {offset}" in msg
    stats = DataStats()
    recs = read_records(path, skip_invalid=True, stats=stats)
    assert [r.row for r in recs] == [1, 3]
    assert stats.rows_read == 3 and stats.invalid_skipped == 1
    assert stats.skipped_by_reason == {"not UTF-8": 1}


def test_compression_is_detected_from_content_not_name(tmp_path):
    import gzip

    from jaxpt.data.sources import read_records

    good = ROWS[0] + ROWS[2]
    (tmp_path / "zipped.jsonl").write_bytes(gzip.compress(good))
    (tmp_path / "plain.jsonl.gz").write_bytes(good)
    (tmp_path / "zipped.json").write_bytes(gzip.compress(b'[{"text": "a"}, {"text": "b"}]'))
    for name, n in (("zipped.jsonl", 2), ("plain.jsonl.gz", 2), ("zipped.json", 2)):
        assert len(read_records(tmp_path / name)) == n, name


def test_truncated_gzip_is_located_and_skip_invalid_keeps_the_rows_before(tmp_path):
    import gzip

    from jaxpt.data.formats import DataError, DataStats
    from jaxpt.data.sources import read_records

    rows = b"".join(b'{"text": "row %d %s"}\n' % (i, b"x" * (i * 37 % 200)) for i in range(400))
    blob = gzip.compress(rows)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as e:
        read_records(path)
    msg = str(e.value)
    assert str(path) in msg and "corrupt or truncated gzip" in msg and "byte offset" in msg
    stats = DataStats()
    recs = read_records(path, skip_invalid=True, stats=stats)
    assert 0 < len(recs) < 400 and [r.row for r in recs] == list(range(1, len(recs) + 1))
    assert stats.skipped_by_reason == {"corrupt compression": 1}


# -- out_dir checked before the model loads ---------------------------------------------------


@pytest.mark.parametrize("where", ["file", "under_file", "read_only"])
def test_bad_out_dir_fails_before_the_model_loads(tmp_path, capsys, where):
    import os

    (tmp_path / "afile").write_text("x")
    out = {"file": tmp_path / "afile", "under_file": tmp_path / "afile" / "run",
           "read_only": tmp_path / "ro" / "run"}[where]
    if where == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only dirs")
        (tmp_path / "ro").mkdir(mode=0o500)
    cfg = tmp_path / "c.yaml"
    # A model that does not exist: an error about it would mean the model came first.
    cfg.write_text(f"out_dir: {out}\nmodel: {{name: {tmp_path / 'no_such_model'}}}\n"
                   f"data: {{train: {tmp_path / 'afile'}}}\n")
    assert cli_main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"out_dir {out}" in err and "no_such_model" not in err, err


# -- resume falls back to the newest complete checkpoint ------------------------------------


def test_resume_skips_uncommitted_and_unreadable_steps(tiny, tmp_path, capsys):
    from jaxpt.engine.loop import run
    from jaxpt.trainers.sft import build_sft_trainer

    cfg = config(tiny, tmp_path, train={"max_steps": 4}, checkpoint={"every": 2})
    run(build_sft_trainer(cfg))
    ckdir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["2", "4"]
    (ckdir / "44").mkdir()  # a step dir without its commit marker
    shards = sorted((ckdir / "4" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    big = shards[-1]
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])  # a truncated shard
    capsys.readouterr()

    cfg6 = config(tiny, tmp_path, train={"max_steps": 6}, checkpoint={"every": 2})
    result = run(build_sft_trainer(cfg6))
    out = capsys.readouterr().out
    assert "step 44 (no commit marker" in out and "step 4 (restore failed" in out, out
    assert "resumed from checkpoint step 2" in out
    assert result.step == 6
    steps = [r["step"] for r in read_metrics(cfg6.out_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    names = sorted(p.name for p in ckdir.iterdir())
    assert "44.incomplete" in names and "4.incomplete" in names and "6" in names


# -- DPO pairs with identical answers ---------------------------------------------------------


def test_identical_dpo_pairs_are_an_error_or_skipped_and_counted(tmp_path):
    import json

    from jaxpt.data.formats import DataError, DataStats, validate_records
    from jaxpt.data.sources import read_records

    conv = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]
    rows = [
        {"prompt": "2+3?", "chosen": "5", "rejected": "6"},
        {"prompt": "2+2?", "chosen": "4", "rejected": "4"},
        {"chosen": conv, "rejected": conv},  # implicit prompt, same conversation
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    with pytest.raises(DataError) as e:
        validate_records(read_records(path), "preference")
    where = f"{path} row 2, key 'rejected': "
    assert str(e.value).startswith(where + "chosen and rejected are identical")
    stats = DataStats()
    valid, _ = validate_records(read_records(path), "preference", skip_invalid=True, stats=stats)
    assert [r.row for r in valid] == [1]
    assert stats.skipped_by_reason == {"identical chosen and rejected": 1}
    conv_path = tmp_path / "conv.jsonl"
    conv_path.write_text(json.dumps(rows[2]) + "\n")
    with pytest.raises(DataError, match="row 1, key 'rejected': chosen and rejected are identical"):
        validate_records(read_records(conv_path), "preference")


# -- non-finite GRPO rewards ------------------------------------------------------------------


def _nan_reward(completions, **kw):
    return [math.nan if i == 1 else 1.0 for i in range(len(completions))]


def _inf_reward(completions, **kw):
    return [math.inf] * len(completions)


def _none_reward(completions, **kw):
    return [None] * len(completions)


@pytest.mark.parametrize("fn", [_nan_reward, _inf_reward], ids=["nan", "inf"])
def test_nonfinite_reward_is_an_error_naming_function_and_row(fn):
    from jaxpt.rewards.registry import RewardError, compute_rewards

    args = (["p"] * 4, ["a", "b", "c", "d"], None, None, [10, 10, 11, 11])
    with pytest.raises(RewardError) as e:
        compute_rewards([fn], None, *args)
    assert f"'{fn.__name__}'" in str(e.value) and "dataset row 1" in str(e.value)
    assert "skip_nonfinite_rewards" in str(e.value)
    rewards, per_fn, metrics = compute_rewards([fn], None, *args, skip_nonfinite=True)
    bad = 1 if fn is _nan_reward else 4
    assert metrics["rewards/nonfinite_skipped"] == bad
    assert int(np.isnan(per_fn[fn.__name__]).sum()) == bad  # treated as None


def test_none_rewards_are_not_applicable_and_the_report_survives_nan_metrics(tmp_path, capsys):
    import json

    from jaxpt.engine.metrics import MetricsWriter
    from jaxpt.engine.report import print_run_summary
    from jaxpt.rewards.advantages import compute_advantages
    from jaxpt.rewards.registry import compute_rewards

    rewards, _, metrics = compute_rewards(
        [_none_reward], None, ["p"] * 4, ["a", "b", "c", "d"], None, None, None
    )
    assert np.isnan(rewards).all() and math.isnan(metrics["rewards/_none_reward/mean"])
    adv, adv_metrics = compute_advantages(rewards, 2)
    assert np.array_equal(adv, np.zeros(4, np.float32))
    w = MetricsWriter(tmp_path, total_steps=3, progress=False)
    for step, r in enumerate([0.5, adv_metrics["reward"], 0.7], start=1):
        w.write(step, {"reward": r, "loss": float("inf") if step == 2 else 1.0})
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["reward"] is None and lines[1]["loss"] is None
    summary = print_run_summary(tmp_path, curve_key="reward", eval_key="eval_accuracy")
    assert [s for s, _ in summary["curve"]] == [1, 3]
    assert "reward per step" in capsys.readouterr().out


# -- skipped rows are counted and reported ----------------------------------------------------


def test_skipped_rows_are_reported_at_start_and_in_data_stats_json(tiny, tmp_path, capsys):
    import json

    from jaxpt.engine.loop import run
    from jaxpt.trainers.sft import build_sft_trainer

    _, _, data_dir = tiny
    good = (data_dir / "gsm8k" / "train.jsonl").read_bytes().splitlines(keepends=True)[:40]
    bad = [b'{"question": "caf\xe9", "answer": "#### 1"}\n', b"{not json\n",
           b'{"question": "no answer"}\n']
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(good[:10] + bad + good[10:]))
    cfg = config(tiny, tmp_path, data={"train": str(path), "max_train_rows": 30,
                                       "skip_invalid": True},
                 train={"max_steps": 1}, checkpoint={"every": 0})
    run(build_sft_trainer(cfg))
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("data: "))
    assert "43 rows read (11 past max_*_rows unused)" in line, line
    assert "3 skipped (invalid JSON: 1, invalid gsm8k row: 1, not UTF-8: 1)" in line, line
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["rows_read"] == 43 and stats["invalid_skipped"] == 3
    assert stats["skipped_by_reason"] == {"not UTF-8": 1, "invalid JSON": 1,
                                          "invalid gsm8k row": 1}
    assert stats["examples"] == 29 and stats["beyond_max_rows"] == 11


def test_a_non_finite_state_is_never_saved(tiny, tmp_path):
    """Weights that are already non-finite (every step skipped, so they stay so) are not
    written over the checkpoints; the error says so and names the last finite one."""
    import jax.numpy as jnp

    from jaxpt.engine.loop import NonFiniteError, run
    from jaxpt.trainers.sft import build_sft_trainer

    cfg = config(tiny, tmp_path, train={"max_steps": 6, "max_bad_steps": 5},
                 checkpoint={"every": 2})
    trainer = build_sft_trainer(cfg)
    trainer.state = trainer.state.replace(
        params=jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), trainer.state.params)
    )
    with pytest.raises(NonFiniteError, match="state at step 2 holds non-finite values"):
        run(trainer)
    assert not list((tmp_path / "run" / "checkpoints").glob("2*"))


# == subprocess suite: `jaxpt train` killed, poisoned and out of space =======================
#
# Each run is a real `jaxpt train` process on the tiny model (CHILD below). Test-only patches
# inside the child decide where it dies (it sends itself SIGKILL, so the kill lands exactly
# at a seeded point, also inside orbax's save), which steps get a non-finite loss, gradient
# or update, and which save runs out of space. The library is not changed for any of it.

CHILD = r"""
import errno, json, math, os, signal, sys

plan = json.loads(sys.argv[1])
kill, poison, enospc = plan.get("kill"), plan.get("poison"), plan.get("enospc")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity, deleter

import jaxpt.engine.checkpoint as C
import jaxpt.engine.build as B
import jaxpt.engine.state as S

at, k = (kill["at"], kill.get("step")) if kill else (None, None)
callbacks = []
if at == "logged":
    callbacks.append(lambda step, row: die() if step == k and "loss" in row else None)
if at in ("save_called", "save_writing"):
    save = C.Checkpointer.save

    def killed_save(self, step, *a, **kw):
        if step == k and at == "save_called":
            die()
        out = save(self, step, *a, **kw)
        if step == k:
            die()  # orbax is writing the step in its background thread
        return out

    C.Checkpointer.save = killed_save
if at in ("before_commit", "after_commit"):
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def killed_finalize(self, *a, **kw):
        mine = self.get_final().name == str(k)
        if mine and at == "before_commit":
            die()  # every item written, the step dir not yet renamed into place
        await finalize(self, *a, **kw)
        if mine:
            die()

    atomicity.AtomicRenameTemporaryPath.finalize = killed_finalize
if at == "deleting":
    deleter.StandardCheckpointDeleter.delete = lambda self, step: die()
if at == "restored":
    restore = C.Checkpointer.restore
    C.Checkpointer.restore = lambda self, *a, **kw: (restore(self, *a, **kw), die())[0]

if enospc is not None:
    write = ocp.handlers.JsonCheckpointHandler._save_fn

    async def full_disk(self, x, directory):
        if f"/{enospc}.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await write(self, x, directory)

    ocp.handlers.JsonCheckpointHandler._save_fn = full_disk

if poison:
    make_train_step, bad_steps = S.make_train_step, jnp.asarray(poison["steps"])

    @jax.custom_vjp
    def inf_grad(x, flag):
        return x

    inf_grad.defvjp(
        lambda x, flag: (x, flag),
        lambda flag, g: (g * jnp.where(flag, jnp.inf, 1.0), None),
    )

    def poisoned_train_step(loss_fn, tx, schedule, **kw):
        box = {}  # the step being traced, so the patches below see its number
        bad = lambda: jnp.isin(box["step"] + 1, bad_steps)

        def lf(*a):
            loss, metrics = loss_fn(*a)
            if poison["what"] == "loss":
                loss = loss + jnp.where(bad(), jnp.nan, 0.0)
            if poison["what"] == "grad":
                loss = inf_grad(loss, bad())  # finite loss, non-finite gradients
            return loss, metrics

        if poison["what"] == "update":
            sched = schedule
            schedule = lambda c: jnp.where(bad(), jnp.nan, sched(c))
            tx = type(tx)(**{**vars(tx), "schedule": schedule})
        step = make_train_step(lf, tx, schedule, **kw)

        def traced(state, batch):
            box["step"] = state.step
            return step(state, batch)

        return traced

    # the trainers build their step through engine/build.py's train_program
    S.make_train_step = B.make_train_step = poisoned_train_step


def nonfinite_reward(completions, **kw):
    # NaN for the 2nd and inf for the 3rd completion of every batch
    return [[1.0, math.nan, math.inf][min(i, 2)] for i in range(len(completions))]


from jaxpt.cli import main
import jaxpt.cli.train as cli

run_train = cli.run_train
cli.run_train = lambda args, **kw: run_train(args, callbacks=callbacks)
sys.exit(main(["train", *sys.argv[2:]]))
"""

SUITE_STEPS = 16
TIMING_KEYS = ("tokens_per_second", "mfu")  # differ between runs; everything else must not


@pytest.fixture(scope="module")
def suite(tmp_path_factory, data_dir):
    """The tiny model, 48 GSM8K rows in a file of their own (a short read at every start)
    and a config that checkpoints every 2 steps, keeping 2 (so saves also delete)."""
    root = tmp_path_factory.mktemp("suite")
    model_dir = make_tiny_tokenizer_and_model(root, data_dir)
    rows = (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines(keepends=True)[:48]
    (root / "train.jsonl").write_text("".join(rows))
    config = tiny_run_config(
        root / "run.yaml", model_dir, data_dir, root / "unused",
        data={"train": str(root / "train.jsonl")},
        train={"max_steps": SUITE_STEPS}, checkpoint={"every": 2, "keep": 2},
    )
    return root, config


def child(config: Path, out_dir: Path, plan: dict, *overrides: str):
    """Run CHILD (`jaxpt train config out_dir=... overrides`); (return code, output).
    The children share a persistent compilation cache: a resume compiles nothing."""
    import json
    import subprocess
    import sys

    from train_utils import REPO, subprocess_env

    env = subprocess_env()
    env.update(JAX_COMPILATION_CACHE_DIR=str(config.parent / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(plan), str(config), f"out_dir={out_dir}",
         *overrides],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def reference(suite):
    root, config = suite
    rc, out = child(config, root / "reference", {})
    assert rc == 0, out[-3000:]
    rows = {r["step"]: r for r in logged(root / "reference")}
    assert sorted(rows) == list(range(1, SUITE_STEPS + 1))
    return rows


def logged(run_dir: Path) -> list[dict]:
    """The metrics rows of train steps, timing keys left out (a line cut by a kill too)."""
    import json

    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row:
            rows.append({k: v for k, v in row.items() if k not in TIMING_KEYS})
    return rows


def complete_steps(run_dir: Path) -> list[int]:
    from jaxpt.engine.checkpoint import step_problem

    ck = run_dir / "checkpoints"
    steps = [int(p.name) for p in ck.iterdir() if p.name.isdigit()] if ck.is_dir() else []
    return sorted(s for s in steps if step_problem(ck / str(s)) is None)


KILL_POINTS = ("logged", "save_called", "save_writing", "before_commit", "after_commit",
               "deleting", "restored")


def reachable(at: str, done: list[int]) -> list[int | None]:
    """Steps at which a run resuming from ``done`` (its complete checkpoints) reaches the
    kill point ``at`` ([None]: reached once, whatever the step; []: not reached)."""
    start = done[-1] if done else 0
    saves = [s for s in range(2, SUITE_STEPS + 1, 2) if s > start]
    if at == "logged":
        return list(range(start + 1, SUITE_STEPS + 1))
    if at == "restored":
        return [None] if start else []
    if at == "deleting":  # keep=2: the save that makes a third checkpoint deletes one
        need = max(1, 3 - len(done))
        return [saves[need - 1]] if len(saves) >= need else []
    return saves


@pytest.mark.e2e
def test_kill_9_at_seeded_points_resumes_to_the_uninterrupted_metrics(suite, reference):
    """10 seeded SIGKILLs, every kind of point at least once (between steps, as a save is
    called, while orbax writes, before and after its commit rename, while keep-N deletes,
    right after a restore); after each, the rows logged so far are the uninterrupted run's
    and no complete checkpoint is lost but by keep-N; the last run finishes with the
    uninterrupted run's metrics, step for step."""
    import random

    root, config = suite
    run_dir = root / "killed"
    rng = random.Random(23)
    history = []
    for _ in range(10):
        done = complete_steps(run_dir)
        kinds = [a for a in KILL_POINTS if reachable(a, done)]
        unused = [a for a in kinds if a not in {p["at"] for _, p in history}]
        at = rng.choice(unused or kinds)  # every kind once first
        # One of the next two: the run advances slowly, so every kill finds steps ahead.
        plan = {"kill": {"at": at, "step": rng.choice(reachable(at, done)[:2])}}
        history.append((done[-1] if done else 0, plan["kill"]))
        rc, out = child(config, run_dir, plan)
        assert rc == -9, f"{history}: the run was not killed ({rc}):\n{out[-3000:]}"
        for row in logged(run_dir):
            assert row == reference[row["step"]], (history, row)
        after = complete_steps(run_dir)
        assert not done or done[-1] in after or max(after) > done[-1], (history, done, after)
    assert {p["at"] for _, p in history} == set(KILL_POINTS), history
    rc, out = child(config, run_dir, {})
    assert rc == 0, out[-3000:]
    assert "resumed from checkpoint step" in out
    rows = logged(run_dir)
    assert [r["step"] for r in rows] == list(range(1, SUITE_STEPS + 1)), history
    assert rows == [reference[s] for s in range(1, SUITE_STEPS + 1)], history
    print("kill points (resumed from, killed at):", history)


def restored_state(run_dir: Path, step: int) -> dict:
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ck:
        return ck.restore(run_dir / "checkpoints" / str(step) / "state")


def assert_same_tree(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.e2e
@pytest.mark.parametrize("what", ["loss", "grad", "update"])
def test_non_finite_loss_gradient_or_update_is_skipped_then_stops(suite, reference, what):
    """Steps 3-4 non-finite: skipped (params and optimizer state as they were: checkpoint
    4 equals checkpoint 2), the run goes on; steps 7-9 as well: train.max_bad_steps=3 in a
    row stops it (exit 3) naming the last finite checkpoint."""
    root, config = suite
    run_dir = root / f"poison_{what}"
    plan = {"poison": {"what": what, "steps": [3, 4, 7, 8, 9, 10, 11, 12]}}
    rc, out = child(config, run_dir, plan, "checkpoint.keep=10")
    assert rc == 3, out[-3000:]
    assert "3 consecutive steps (7..9)" in out and "last finite checkpoint" in out, out[-3000:]
    rows = {r["step"]: r for r in logged(run_dir)}
    assert sorted(rows) == list(range(1, 10))
    assert [rows[s]["skipped"] for s in rows] == [0, 0, 1, 1, 0, 0, 1, 1, 1]
    assert rows[1] == reference[1] and rows[2] == reference[2]
    null = {"loss": "loss", "grad": "grad_norm", "update": "learning_rate"}[what]
    for s in (3, 4, 7, 8, 9):
        assert rows[s][null] is None, rows[s]  # non-finite is written as null
        if what != "loss":
            assert math.isfinite(rows[s]["loss"]), rows[s]
    two, four = restored_state(run_dir, 2), restored_state(run_dir, 4)
    assert_same_tree(two["params"], four["params"])
    assert_same_tree(two["opt_state"], four["opt_state"])
    six = restored_state(run_dir, 6)
    assert not np.array_equal(np.asarray(jax.tree.leaves(six["params"])[0]),
                              np.asarray(jax.tree.leaves(four["params"])[0]))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(six))


@pytest.mark.e2e
def test_out_of_space_during_a_save_keeps_the_previous_checkpoint(suite, reference):
    """The JSON item of step 4's save raises ENOSPC in orbax's writer thread: the run
    stops (exit 4) with one clear line, step 2 is intact and the same command resumes."""
    root, config = suite
    run_dir = root / "full_disk"
    rc, out = child(config, run_dir, {"enospc": 4}, "checkpoint.keep=10", "train.max_steps=6")
    assert rc == 4, out[-3000:]
    # (orbax logs the failed write's traceback first; a thread may still complain at exit)
    said = [x for x in out.splitlines() if x.startswith("jaxpt train: error: ")]
    assert len(said) == 1 and said[0].startswith("jaxpt train: error: out of disk space"), out
    assert "No space left on device" in said[0] and "step 2 in " in said[0], said
    assert "is intact" in said[0], said
    assert complete_steps(run_dir) == [2]
    rc, out = child(config, run_dir, {}, "checkpoint.keep=10", "train.max_steps=6")
    assert rc == 0, out[-3000:]
    assert "resumed from checkpoint step 2" in out
    rows = logged(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[:2] == [reference[1], reference[2]]  # (a 6-step schedule differs after)
    assert complete_steps(run_dir) == [2, 4, 6]


@pytest.mark.e2e
@pytest.mark.parametrize("skip", [False, True], ids=["error", "skipped"])
def test_non_finite_grpo_rewards_are_an_error_or_skipped_and_counted(suite, skip):
    """A reward function returning NaN and inf (the tiny SFT config run as GRPO): an error
    naming the function and the row, or with grpo.skip_nonfinite_rewards each such value
    is left out and counted, and the steps train on finite advantages."""
    root, config = suite
    run_dir = root / f"rewards_{skip}"
    overrides = [
        "algorithm=grpo", "train.max_steps=2", "train.batch_size=8", "optim.lr=0.01",
        "train.logprob_impl=chunked", "checkpoint.every=0", "grpo.num_generations=4",
        "grpo.max_completion_length=8", "grpo.max_prompt_length=128",
        "grpo.reward_funcs=[__main__:nonfinite_reward]", "grpo.eval_prompts=0",
        f"grpo.skip_nonfinite_rewards={str(skip).lower()}",
    ]
    rc, out = child(config, run_dir, {}, *overrides)
    if not skip:  # the RewardError ends the traceback: function, completion and row
        assert rc == 1, out[-3000:]
        last = out.strip().splitlines()[-1]
        assert last.startswith("jaxpt.rewards.registry.RewardError: reward function "
                               "'nonfinite_reward' returned nan for completion 1 of dataset "
                               "row "), last
        assert "skip_nonfinite_rewards" in last
        return
    assert rc == 0, out[-3000:]
    rows = logged(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rewards/nonfinite_skipped"] > 0 and math.isfinite(r["loss"]), r
        assert r["skipped"] == 0
