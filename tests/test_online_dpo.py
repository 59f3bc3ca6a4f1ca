"""Online DPO: pair selection by hand (TRL's ``first >= second`` ranking, the missing-EOS
penalty, tied pairs masked and counted), the config's checks, and a tiny ``jaxpt train`` run
on generated arithmetic with a user reward (step 1: policy == reference, so every trained
pair's sigmoid loss is log 2 and objective/kl is 0)."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import yaml
from train_utils import make_tiny_tokenizer_and_model, read_metrics

from jaxpt.algorithms.online_dpo import OnlineDPOSection, contains_eos, make_pair_batch, rank_pairs
from jaxpt.rl.layout import rollout_sequences

EOS = 7


def test_rank_pairs_by_hand():
    # pairs: (1, 0) first wins; (0, 1) second wins; (1, 1) tie; (0, 0) tie; (nan, 1) no reward
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, float("nan"), 1.0]
    order, weight, tied = rank_pairs(np.asarray(rewards), train_on_ties=False)
    assert order.tolist() == [0, 1, 3, 2, 4, 5, 6, 7, 8, 9]
    assert weight.tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert tied.tolist() == [False, False, True, True, True]
    # TRL trains ties with the first sample chosen; a NaN pair is still left out.
    order, weight, _ = rank_pairs(np.asarray(rewards), train_on_ties=True)
    assert order.tolist() == [0, 1, 3, 2, 4, 5, 6, 7, 8, 9]
    assert weight.tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]


def rollout(rewards, completions):
    """A fake rollout of 2 prompts x 2 completions (right padded with 0)."""
    C = max(map(len, completions))
    ids = np.zeros((4, C), np.int32)
    mask = np.zeros((4, C), bool)
    for i, c in enumerate(completions):
        ids[i, : len(c)], mask[i, : len(c)] = c, True
    prompts = np.repeat(np.asarray([[3, 4], [5, 6]]), 2, axis=0)
    rows = rollout_sequences(prompts, np.ones_like(prompts), ids, mask)
    return types.SimpleNamespace(rows=rows, rewards_R=np.asarray(rewards, np.float32))


def test_missing_eos_penalty_reranks_and_metrics():
    # Prompt 0: both right (1, 1) but the first was cut before EOS: penalty 0.5 -> (0.5, 1),
    # the second is chosen. Prompt 1: (0, 1), both end with EOS: the second is chosen.
    ro = rollout([1.0, 1.0, 0.0, 1.0], [[9, 9, 9], [9, EOS], [8, EOS], [9, 9, EOS]])
    assert contains_eos(ro.rows, (EOS,)).tolist() == [False, True, True, True]
    sec = OnlineDPOSection(missing_eos_penalty=0.5)
    batch, m = make_pair_batch(ro, (EOS,), sec)
    P = 2
    first_tokens = np.asarray(batch.rows.input_ids)[:, P]
    # rows reordered chosen first: pair 0 = (row 1, row 0), pair 1 = (row 3, row 2)
    assert first_tokens.tolist() == [9, 9, 9, 8]
    assert np.asarray(batch.rows.completion_mask).sum(1).tolist() == [2, 3, 3, 2]
    assert batch.weight.tolist() == [1, 1, 1, 1]
    assert m["objective/scores"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert m["objective/scores_margin"] == pytest.approx((0.5 + 1) / 2)
    assert m["val/contain_eos_token"] == 0.75 and m["pairs/tied_frac"] == 0.0
    # Without the penalty prompt 0 ties: masked, counted.
    batch, m = make_pair_batch(ro, (EOS,), OnlineDPOSection())
    assert batch.weight.tolist() == [0, 0, 1, 1] and m["pairs/tied_frac"] == 0.5


def test_section_checks():
    with pytest.raises(ValueError, match="must be 2"):
        OnlineDPOSection(num_generations=4)
    with pytest.raises(ValueError, match="num_iterations and steps_per_generation must be 1"):
        OnlineDPOSection(num_iterations=2)
    with pytest.raises(ValueError, match=r"online_dpo\.loss_type: unknown loss type"):
        OnlineDPOSection(loss_type="sigmoidd")


def first_answer_digit(prompts, completions, **kw):
    """A user reward that often ties and often does not: 1 if the completion has a digit
    (conversational prompts get message-list completions)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(any(ch.isdigit() for ch in t)) for t in texts]


def test_tiny_online_dpo_run(tmp_path, data_dir):
    from jaxpt.cli import main

    model_dir = make_tiny_tokenizer_and_model(tmp_path / "m", data_dir)
    cfg = {
        "algorithm": "online_dpo", "out_dir": str(tmp_path / "run"),
        "model": {"name": str(model_dir)},
        "data": {"max_train_rows": 32, "max_eval_rows": 4},
        "optim": {"lr": 1e-2, "schedule": "constant"},
        "train": {"max_steps": 2, "batch_size": 8, "seed": 0, "logprob_impl": "reference",
                  "eval_every": 2},
        "checkpoint": {"every": 0}, "logging": {"progress": False, "every": 1},
        "online_dpo": {"task": "arithmetic", "max_completion_length": 8, "temperature": 1.0,
                       "reward_funcs": ["test_online_dpo:first_answer_digit"],
                       "eval_prompts": 4, "eval_batch_size": 4, "missing_eos_penalty": 0.5},
    }
    path = tmp_path / "odpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    first = rows[0]
    for k in ("objective/kl", "objective/scores", "objective/scores_margin", "rewards/margins",
              "logps/chosen", "val/contain_eos_token", "pairs/tied_frac"):
        assert k in first, k
    assert abs(first["objective/kl"]) < 1e-4 and abs(first["rewards/margins"]) < 1e-5
    expected = math.log(2.0) if first["pairs/tied_frac"] < 1 else 0.0
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    assert any("eval_accuracy" in r for r in read_metrics(tmp_path / "run"))
