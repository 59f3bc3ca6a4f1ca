"""The shared loop on a tiny model with real GSM8K rows: metrics, eval, checkpoints,
non-finite stop, LoRA export through the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tolerances import assert_reordered_close
from train_utils import make_tiny_tokenizer_and_model, read_metrics, tiny_run_config

from jaxpt.cli import main as cli_main
from jaxpt.config_load import load_config
from jaxpt.engine import lora as lora_lib
from jaxpt.engine.checkpoint import Checkpointer, abstract_like
from jaxpt.engine.loop import NonFiniteError, SourceBase, run
from jaxpt.trainers.sft import build_sft_trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("tiny")
    model_dir = make_tiny_tokenizer_and_model(root, data_dir)
    return root, model_dir, data_dir


def config(tiny, tmp_path, name="run", **sections):
    _, model_dir, data_dir = tiny
    path = tiny_run_config(
        tmp_path / f"{name}.yaml", model_dir, data_dir, tmp_path / name, **sections
    )
    return load_config(path)


def test_sft_run_metrics_eval_and_checkpoints(tiny, tmp_path):
    _, _, data_dir = tiny
    cfg = config(
        tiny,
        tmp_path,
        data={"eval": str(data_dir / "gsm8k" / "test.jsonl"), "max_eval_rows": 8},
        train={"eval_every": 5, "eval_on_start": True},
    )
    seen = []
    result = run(build_sft_trainer(cfg), callbacks=[lambda s, row: seen.append(s)])
    assert result.reason == "done" and result.step == 10
    rows = read_metrics(cfg.out_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 11))
    for key in (
        "loss",
        "mean_token_accuracy",
        "entropy",
        "num_tokens",
        "grad_norm",
        "learning_rate",
        "epoch",
        "skipped",
    ):
        assert all(key in r for r in train_rows), key
    # Throughput is measured between steps; eval and checkpoint pauses are not counted.
    timed = [r["step"] for r in train_rows if "tokens_per_second" in r]
    assert timed == [2, 3, 4, 5, 7, 8, 9, 10]
    assert "mfu" not in train_rows[-1]  # CPU: peak FLOPs unknown unless configured
    # num_tokens is cumulative non-padding tokens.
    cum = [r["num_tokens"] for r in train_rows]
    assert cum == sorted(cum) and len(set(cum)) == len(cum)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 5, 10]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learns
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert seen.count(10) == 2  # train row and eval row
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["10", "5"]  # no temp dirs left
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_nonfinite_steps_stop_with_checkpoint_intact(tiny, tmp_path):
    cfg = config(tiny, tmp_path, train={"max_bad_steps": 3}, checkpoint={"every": 2})
    trainer = build_sft_trainer(cfg)
    inner = trainer.source

    class Poisoned(SourceBase):
        """From the 4th batch on, token ids are out of range: embeddings, loss are NaN."""

        n = 0

        def next(self, state):
            b = inner.next(state)
            Poisoned.n += 1
            if Poisoned.n >= 4:
                b["input_ids"] = np.full_like(b["input_ids"], 10**6)
            return b

        def get_state(self):
            return inner.get_state()

        def set_state(self, s):
            inner.set_state(s)

    trainer.source = Poisoned()
    template = abstract_like(trainer.state.saveable())
    with pytest.raises(NonFiniteError) as e:
        run(trainer)
    msg = str(e.value)
    assert "3 consecutive steps (4..6)" in msg and "train.max_bad_steps=3" in msg
    # The bad streak is detected before the step-6 save: the newest checkpoint is step 4.
    assert "last finite checkpoint is step 4" in msg
    assert "newest checkpoint before that is step 2" in msg  # step 4 holds step 3's weights
    rows = [r for r in read_metrics(cfg.out_dir) if "loss" in r]
    assert [r["skipped"] for r in rows] == [0, 0, 0, 1, 1, 1]
    ck = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    assert ck.all_steps() == [2, 4]
    s4, d4 = ck.restore(4, template)
    ck.close()
    assert int(s4["step"]) == 4 and d4["num_tokens"] > 0

    # Step 4 was not applied: checkpoint 4 holds exactly the params of a clean 3-step run.
    clean_cfg = config(
        tiny, tmp_path, name="clean", train={"max_steps": 3}, checkpoint={"every": 0}
    )
    clean = run(build_sft_trainer(clean_cfg)).state
    for a, b in zip(jax.tree.leaves(s4["params"]), jax.tree.leaves(clean.params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    np.testing.assert_array_equal(
        jax.tree.leaves(s4["opt_state"])[0], jax.tree.leaves(clean.opt_state)[0]
    )


def test_half_written_checkpoint_is_ignored(tiny, tmp_path):
    """orbax writes <step>.orbax-checkpoint-tmp* and renames it when complete; a leftover
    temp dir (a crash mid-save) is never the newest checkpoint."""
    ck = Checkpointer(tmp_path / "ck", async_save=True)
    tree = {"w": jnp.arange(6.0)}
    ck.save(3, tree, {"source": {"k": 1}})
    ck.wait()
    partial = tmp_path / "ck" / "7.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_text("half")
    ck.close()
    ck = Checkpointer(tmp_path / "ck")
    assert ck.latest_step() == 3
    restored, data = ck.restore(None, abstract_like(tree))
    np.testing.assert_array_equal(restored["w"], np.arange(6.0))
    assert data == {"source": {"k": 1}}
    ck.close()


def test_lora_run_exports_a_plain_checkpoint(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    cfg = config(
        tiny,
        tmp_path,
        lora={"rank": 4, "alpha": 16.0},
        train={"max_steps": 4},
        optim={"lr": 3.0e-2},
        checkpoint={"every": 0},
    )
    result = run(build_sft_trainer(cfg))
    state = result.state
    ad = jax.device_get(state.params)
    assert jax.tree.structure(ad) != jax.tree.structure(state.frozen)  # only adapters trained
    b = np.asarray(ad["layers"]["wq_END"]["lora_b"])
    assert np.abs(b).max() > 0  # B left zero-init: the adapters did something

    rc = cli_main(["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert rc == 0 and "exported step 4" in capsys.readouterr().out
    spec = lora_lib.LoraSpec.from_config(cfg.lora)
    from jaxpt.models import hub
    from jaxpt.models.decoder import abstract_model

    mcfg = hub.resolve(cfg.model.name).config()
    graphdef, _ = nnx.split(abstract_model(mcfg))
    model = nnx.merge(graphdef, lora_lib.apply_lora(state.frozen, state.params, spec))
    ids = np.random.RandomState(1).randint(0, mcfg.vocab_size, (2, 13)).astype(np.int32)
    ours = np.asarray(model.logits(model(jnp.asarray(ids))[0]))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    # torch and XLA sum in their own orders: <= 1000 terms (the vocab), 2 layers + head.
    assert_reordered_close(theirs, ours, n=1000, depth=3)
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["model_type"] == "llama"


def _tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
    """Scalars from TensorBoard event files, read independently of the writer: TFRecord
    framing (u64 length, u32 crc, payload, u32 crc) around `Event` protos."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_tensorboard_and_wandb_get_the_jsonl_metrics(tiny, tmp_path, monkeypatch):
    """TensorBoard (tensorboardX, in the [test] extra) and W&B receive the same scalars as
    metrics.jsonl. W&B is replaced by a recording stand-in (no network here): this checks
    our calls (init with the run config, log per row with its step, finish)."""
    import sys
    import types

    calls = []

    class FakeRun:
        def log(self, metrics, step):
            calls.append(("log", step, dict(metrics)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = config(tiny, tmp_path, train={"max_steps": 2},
                 logging={"tensorboard": True, "wandb_project": "jaxpt-test",
                          "wandb_run_name": "tiny"})
    run(build_sft_trainer(cfg))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == [1, 2]
    tb = _tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert tb["loss"].keys() == losses.keys()
    for step, loss in losses.items():
        assert tb["loss"][step] == pytest.approx(loss, rel=1e-6)
    assert calls[0][0] == "init" and calls[0][1]["project"] == "jaxpt-test"
    assert calls[0][1]["name"] == "tiny" and calls[0][1]["config"]["train"]["max_steps"] == 2
    logged = {c[1]: c[2] for c in calls if c[0] == "log" and "loss" in c[2]}
    assert {k: v["loss"] for k, v in logged.items()} == losses
    assert calls[-1] == ("finish",)


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: {lrr: 1}\n")
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"jaxpt train: error: {path.resolve()}: unknown key optim.lrr (did you mean lr?)"
    cfg = config(tiny, tmp_path, name="missing")
    assert cli_main(["train", str(tmp_path / "missing.yaml"), "data.train=nope.jsonl"]) == 2
    assert "data.train='nope.jsonl' does not exist" in capsys.readouterr().err
    del cfg


def test_resume_with_another_model_is_refused_and_config_yaml_kept(tiny, tmp_path):
    """Checkpoints trained from one model are not resumed onto another (LoRA adapters on
    another base would train on silently); the refused run leaves config.yaml as it was."""
    import shutil

    root, model_dir, _ = tiny
    cfg = config(tiny, tmp_path, train={"max_steps": 2}, checkpoint={"every": 2})
    run(build_sft_trainer(cfg))
    saved = (tmp_path / "run" / "config.yaml").read_text()
    other = tmp_path / "other_model"
    shutil.copytree(model_dir, other)  # same weights, another model.name
    moved = cfg.replace(
        model=cfg.model.__class__(**{**vars(cfg.model), "name": str(other)}),
        train=cfg.train.__class__(**{**vars(cfg.train), "max_steps": 4}),
    )
    with pytest.raises(ValueError, match="trained from model.name=") as e:
        run(build_sft_trainer(moved))
    assert str(other) in str(e.value) and "checkpoint.resume=false" in str(e.value)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved
