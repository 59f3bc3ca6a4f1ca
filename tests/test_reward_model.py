"""Reward model (``algorithm: reward``): the Bradley-Terry loss against hand-computed values
(margin, centering), transformers' last-non-pad-token rule, the margin column through the
data path, a tiny run on hh-rlhf (metrics with TRL's names, held-out eval), its export as an
``AutoModelForSequenceClassification`` that transformers scores identically (padded rows
included), the same dir back as ``reward_funcs: ["rm:DIR"]`` (LoRA merged), and one step on 8 fake
CPU devices == one device."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import run_with_devices
from test_sharded_trainers import PRELUDE, parse_rows, tiny, write_config  # noqa: F401
from train_utils import read_metrics

from jaxpt.algorithms.reward import RewardSection, bradley_terry_loss, check_margins, pair_collate
from jaxpt.cli import main as cli_main
from jaxpt.config import ConfigError
from jaxpt.config_load import load_config
from jaxpt.data.tokenize import TokenizedPreference, tokenize_preference
from jaxpt.models.scalar_head import last_token_index


def softplus(x):
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- the loss


def test_bradley_terry_hand_computed():
    """-log sigmoid(d) = log(1 + e^-d); two pairs, r_c = (1, 0.5), r_r = (0, 1)."""
    c, r = jnp.array([1.0, 0.5]), jnp.array([0.0, 1.0])
    loss, m = bradley_terry_loss(c, r)
    # d = (1, -0.5): (log(1 + e^-1) + log(1 + e^0.5)) / 2 = (0.3132617 + 0.9740770) / 2
    assert float(loss) == pytest.approx(0.6436693, abs=1e-6)
    assert float(loss) == pytest.approx((softplus(-1.0) + softplus(0.5)) / 2, abs=1e-6)
    assert float(m["accuracy"]) == 0.5  # only pair 0 ranks chosen first
    assert float(m["margin"]) == pytest.approx(0.25)  # ((1 - 0) + (0.5 - 1)) / 2
    assert float(m["mean_reward"]) == pytest.approx(0.625)  # (1 + 0.5 + 0 + 1) / 4
    assert float(m["min_reward"]) == 0.0 and float(m["max_reward"]) == 1.0

    # margin (0.5, 0): d = (0.5, -0.5): (0.4740770 + 0.9740770) / 2
    loss_m, m_m = bradley_terry_loss(c, r, jnp.array([0.5, 0.0]))
    assert float(loss_m) == pytest.approx(0.7240770, abs=1e-6)
    assert float(m_m["margin"]) == pytest.approx(0.25)  # the metric is r_c - r_r, no margin

    # centering 0.1: + 0.1 * mean((1 + 0)^2, (0.5 + 1)^2) = 0.1 * (1 + 2.25) / 2 = 0.1625
    loss_c, _ = bradley_terry_loss(c, r, jnp.array([0.5, 0.0]), 0.1)
    assert float(loss_c) == pytest.approx(0.7240770 + 0.1625, abs=1e-6)
    loss_0, _ = bradley_terry_loss(c, r, None, 0.0)
    assert float(loss_0) == pytest.approx(float(loss), abs=1e-7)


def test_last_non_pad_token_as_transformers():
    """The rightmost id != pad (transformers' rule), right or left padded; pad = 2."""
    ids = jnp.array([[5, 6, 2, 2], [5, 2, 7, 2], [2, 2, 5, 6], [2, 2, 2, 2], [5, 6, 7, 8]])
    assert last_token_index(ids, 2).tolist() == [1, 2, 3, 0, 3]


def test_section_checks(tmp_path):
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        RewardSection(center_rewards_coefficient=-1.0)
    with pytest.raises(ValueError, match="eval_holdout"):
        RewardSection(eval_holdout=-1)
    with pytest.raises(ValueError, match="head_lr"):
        RewardSection(head_lr=0.0)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"algorithm": "reward", "reward": {"margin": 1.0}}))
    with pytest.raises(ConfigError, match="margin"):
        load_config(path)


# ----------------------------------------------------------------------------- data


class _Tok:
    """Whitespace 'tokenizer' with ids = word lengths, EOS 1: enough for plain-text rows."""

    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True, **_):
        return {"input_ids": [len(w) + 1 for w in text.split()]}

    def encode(self, text, add_special_tokens=True, **_):
        return self(text)["input_ids"]


def test_margin_column_reaches_the_batch():
    rows = [
        {"prompt": "a b", "chosen": "ccc", "rejected": "dd", "margin": 1.5},
        {"prompt": "a", "chosen": "c", "rejected": "d", "margin": 0},
    ]
    pairs = [tokenize_preference(_Tok(), r) for r in rows]
    assert [p.margin for p in pairs] == [1.5, 0.0]
    assert check_margins(pairs, "train.jsonl")
    batch = pair_collate(8, 0, True)(pairs)
    np.testing.assert_array_equal(batch["margin"], np.float32([1.5, 0.0]))
    assert "margin" not in pair_collate(8, 0, False)(pairs)
    mixed = [*pairs, TokenizedPreference([2], [3], [4])]
    with pytest.raises(ValueError, match="train.jsonl: 2 of 3 pairs have a 'margin'"):
        check_margins(mixed, "train.jsonl")
    with pytest.raises(ValueError, match="margin must be a finite number"):
        tokenize_preference(_Tok(), {**rows[0], "margin": "big"})


def test_rm_spec_parsing():
    from jaxpt.rewards.reward_model import parse_rm_spec

    assert parse_rm_spec("rm:out/rm") == ("out/rm", {})
    assert parse_rm_spec("rm: out/rm(batch_size=32)") == ("out/rm", {"batch_size": 32})
    with pytest.raises(ValueError, match="dir after 'rm:'"):
        parse_rm_spec("rm:")
    with pytest.raises(ValueError, match="unknown options"):
        parse_rm_spec("rm:out/rm(temperature=2)")


# ----------------------------------------------------------------------------- a run


def reward_config(path, model_dir, data_dir, out_dir, **sections):
    cfg = {
        "algorithm": "reward",
        "out_dir": str(out_dir),
        "model": {"name": str(model_dir)},
        "data": {
            "train": str(data_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz"),
            "format": "hh_rlhf",
            "skip_invalid": True,
            "max_train_rows": 40,
            "max_length": 128,
        },
        "optim": {"lr": 3.0e-3, "schedule": "constant"},
        "train": {"max_steps": 3, "batch_size": 4, "seed": 5, "eval_every": 3,
                  "eval_batch_size": 4},
        "reward": {"eval_holdout": 8, "center_rewards_coefficient": 0.01},
        "checkpoint": {"every": 0},
        "logging": {"progress": False},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    path.write_text(yaml.safe_dump(cfg))
    return path


def hf_scores(hf_dir, rows_ids, pad_id):
    """transformers' scores of right-padded rows (the padded ones read at their last real
    token by its own rule)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    T = max(map(len, rows_ids))
    ids = np.full((len(rows_ids), T), pad_id, np.int64)
    mask = np.zeros((len(rows_ids), T), np.int64)
    for i, r in enumerate(rows_ids):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return model, out.logits[:, 0].numpy()


@pytest.mark.e2e
def test_tiny_run_exports_a_sequence_classifier_and_scores_as_rm(tiny, tmp_path):  # noqa: F811
    """The sharded tests' tiny model (one fixture for the module: one tokenizer training)."""
    from jaxpt.engine.loop import run as run_loop
    from jaxpt.rewards.registry import get_reward_function
    from jaxpt.trainers.reward import build_reward_trainer

    model_dir, data_dir = tiny
    run = tmp_path / "run"
    # LoRA: the decoder's group holds the adapters over a frozen base, the head trains in
    # full, and the export merges them.
    cfg = reward_config(tmp_path / "rm.yaml", model_dir, data_dir, run,
                        lora={"rank": 4, "alpha": 8.0})
    trainer = build_reward_trainer(load_config(cfg))
    head0 = np.asarray(trainer.state.params["score"]["score_1E"])
    result = run_loop(trainer)
    assert set(result.state.params) == {"model", "score"}
    assert "embed_VE" not in result.state.params["model"]  # adapters only
    assert result.state.frozen is not None  # the base
    assert np.abs(np.asarray(result.state.params["score"]["score_1E"]) - head0).max() > 0
    logged = read_metrics(run)
    train = [m for m in logged if "loss" in m]
    assert len(train) == 3
    for key in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward",
                "grad_norm/model", "grad_norm/score"):
        assert all(math.isfinite(m[key]) for m in train), key
    assert all(m["min_reward"] <= m["mean_reward"] <= m["max_reward"] for m in train)
    evals = [m for m in logged if "eval_accuracy" in m]
    assert evals and evals[-1]["eval_num_pairs"] in (4.0, 8.0)  # long pairs are dropped
    assert {"eval_loss", "eval_margin", "eval_mean_reward"} <= set(evals[-1])

    out = tmp_path / "rm_hf"
    assert cli_main(["export", str(run), str(out)]) == 0
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert hf_cfg["num_labels"] == 1 and hf_cfg["pad_token_id"] == 2  # <|im_end|>
    import safetensors.numpy

    tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
    assert "score.weight" in tensors and "lm_head.weight" not in tensors

    # Rows of the kind training scores: conversational prompt + completion, three lengths,
    # so two are padded in the batch; one plain-text row (ends with EOS = the pad id).
    prompts = [[{"role": "user", "content": "How do I bake bread?"}],
               [{"role": "user", "content": "What is 3 + 4?"}],
               [{"role": "user", "content": "Tell me a story about a cat and a dog."}]]
    completions = [[{"role": "assistant", "content": c}] for c in
                   ["Mix flour and water, then bake it.", "7", "Once upon a time there was."]]
    fn = get_reward_function(f"rm:{out}")
    assert get_reward_function(f"rm:{out}") is fn  # loaded once
    ours = np.asarray(fn(prompts=prompts + ["Add 2 and 2."], completions=completions + ["4"]))
    rows_ids = [fn.row_ids(p, c) for p, c in zip(prompts, completions, strict=True)]
    rows_ids.append(fn.row_ids("Add 2 and 2.", "4"))
    assert len({len(r) for r in rows_ids}) == 4
    model, theirs = hf_scores(out, rows_ids, pad_id=2)
    assert model.config.pad_token_id == 2
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.ptp(theirs) > 1e-3  # distinct rows get distinct scores

    # The exported head is the trained one.
    np.testing.assert_array_equal(
        tensors["score.weight"], np.asarray(result.state.params["score"]["score_1E"]))


# ----------------------------------------------------------------------------- sharded

# One device, and every axis split (each mesh compiles its own step: two keep it cheap).
RM_MESHES = [(1, 1, 1), (2, 2, 2)]

REWARD_CODE = """
from jaxpt.trainers.reward import build_reward_trainer
cfg = load_config({path!r})
ref = None
for shape in MESHES:
    tr = build_reward_trainer(cfg, mesh=mesh_of(shape))
    p0 = jax.device_get(tr.state.params)
    batch = tr.source.next(tr.state)
    state, m = tr.step_fn(tr.state, batch)
    loss, params = float(m["loss"]), jax.device_get(state.params)
    wq = state.params["model"]["layers"]["wq_END"]
    row = {{"mesh": list(shape), "loss": loss,
           "loss_used": used(loss, ref[0]) if ref else 0.0,
           "param_used": used(params, ref[1]) if ref else 0.0,
           "accuracy": float(m["accuracy"]), "wq_spec": spec(wq),
           "score_spec": spec(state.params["score"]["score_1E"]),
           "moved": max_diff(params["score"], p0["score"])}}
    print("ROW", json.dumps(row), flush=True)
    ref = ref or (loss, params)
"""


def test_reward_step_matches_single_device(tiny, tmp_path, data_dir):  # noqa: F811
    path = write_config(
        tmp_path / "rm.yaml", tiny, tmp_path / "rm", "reward",
        data={"train": str(data_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz"),
              "format": "hh_rlhf", "skip_invalid": True, "max_train_rows": 24},
        train={"batch_size": 8, "grad_accum": 2},
        reward={"center_rewards_coefficient": 0.1},
    )
    out = run_with_devices(PRELUDE.format(meshes=RM_MESHES) + REWARD_CODE.format(path=str(path)))
    rows = parse_rows(out)
    assert [tuple(r["mesh"]) for r in rows] == RM_MESHES, out
    for r in rows:
        assert r["loss_used"] <= 1.0 and r["param_used"] <= 1.0, r
        assert all(a is None for a in r["score_spec"]), r  # the head is replicated
        assert r["moved"] > 1e-5, r
        assert r["accuracy"] == rows[0]["accuracy"], r
