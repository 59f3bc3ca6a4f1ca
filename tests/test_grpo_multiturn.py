"""Multi-turn rollouts in the on-policy trainers (``jaxpt.rl.episodes``): the trajectory
rows, their loss masks and rewards, and GRPO runs with an environment."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from train_utils import gsm8k_path, make_tiny_model_dir, make_tiny_tokenizer, read_metrics

from jaxpt.rl.episodes import EpisodeConfig, to_episodes
from jaxpt.rl.multiturn import Trajectory


def _trajectory(prompt, turns, finish="done", parts=None):
    """turns: [(ids, mask value)], messages one per turn."""
    t = Trajectory(row={}, messages=[{"role": "user", "content": "q"}], prompt_ids=prompt,
                   prompt_messages=1, finish=finish, reward_parts=parts or {})
    for k, (ids, m) in enumerate(turns):
        t.completion_ids += ids
        t.loss_mask += [m] * len(ids)
        t.logprobs += [-0.5 - k] * len(ids) if m else [0.0] * len(ids)
        t.messages.append({"role": "assistant" if m else "user", "content": f"turn {k}"})
    return t


def test_trajectories_become_rows_with_masks_by_hand():
    a = _trajectory([5, 6, 7], [([11, 12], 1), ([20, 21, 22], 0), ([13], 1)],
                    parts={"bonus": 0.5, "penalty": -0.25})
    b = _trajectory([8], [([14, 15, 16, 17], 1)], finish="truncated")
    ep = to_episodes([a, b], pad_id=0)
    P, C = ep.prompt_ids_RP.shape[1], ep.tokens_RC.shape[1]
    assert P == 16 and C == 32  # the prompt bucket, the trajectory width rounded up to 32
    np.testing.assert_array_equal(ep.prompt_ids_RP[0, -3:], [5, 6, 7])
    np.testing.assert_array_equal(ep.prompt_mask_RP[1], [0] * 15 + [1])
    np.testing.assert_array_equal(ep.tokens_RC[0, :7], [11, 12, 20, 21, 22, 13, 0])
    np.testing.assert_array_equal(ep.train_mask_RC[0, :7], [1, 1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(ep.train_mask_RC[1, :5], [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(ep.lengths_R, [6, 4])
    np.testing.assert_allclose(ep.sampling_logprobs_RC[0, :6], [-0.5, -0.5, 0, 0, 0, -2.5])
    np.testing.assert_array_equal(ep.truncated_R, [False, True])
    np.testing.assert_allclose(ep.env_rewards_R, [0.25, 0.0])
    assert [m["content"] for m in ep.completions[0]] == ["turn 0", "turn 1", "turn 2"]
    assert ep.metrics["turns/mean"] == 0.0  # these hand-made trajectories count no turns


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("multiturn_tiny")
    tok = make_tiny_tokenizer(d / "tok", data_dir)
    model_dir = make_tiny_model_dir(d / "model", tok, seed=0)
    # Half the vocabulary ends a turn, so the random policy ends its turns within the
    # tiny token budget (a turn cut by the budget would end its trajectory).
    (model_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": list(range(1, len(tok), 2))}))
    return model_dir, data_dir


def _config(tmp_path, tiny, **grpo):
    from test_grpo_trainer import grpo_config

    return grpo_config(tmp_path, tiny, grpo={
        "environment": "grpo_rewards:AskTwiceEnv", "max_turns": 2,
        "max_completion_length": 8, **grpo}, train={"max_steps": 2})


def test_rollout_rows_train_only_the_sampled_tokens(tmp_path, tiny):
    """A two-turn rollout on the tiny model: the rows hold prompt + turn 1 + the
    environment's turn + turn 2; only the sampled tokens train; rewards add the
    environment's part to the reward functions'."""
    from jaxpt.data.pipeline import prompt_batch
    from jaxpt.rl.run import start_on_policy
    from jaxpt.sharding import decode_sharding

    cfg = _config(tmp_path, tiny, temperature=1.0)
    run = start_on_policy(cfg, "grpo")
    sampler = run.sampler(decode_sharding(run.mesh))
    assert sampler.cfg.episodes == EpisodeConfig(
        "grpo_rewards:AskTwiceEnv", (), max_turns=2, max_total_tokens=128 + 2 * 8 + 256)
    pb = prompt_batch(run.train_prompts[:2], pad_id=run.pad_id, max_prompt_length=128)
    ro = sampler.sample(run.bundle.params, pb, rng=jax.random.key(0))
    R = 2 * 4
    assert ro.rows.input_ids.shape[0] == R and len(ro.completions) == R
    assert ro.metrics["turns/mean"] == 2.0 and ro.metrics["turns/max"] == 2.0
    mask_RC = np.asarray(ro.rows.completion_mask)
    P, C = ro.rows.widths
    real_RC = np.asarray(ro.rows.segment_ids)[:, P:] > 0
    # Every row has sampled tokens and environment tokens, and the mask never covers
    # padding.
    assert (mask_RC.sum(1) > 0).all() and ((real_RC & (mask_RC == 0)).sum(1) > 0).all()
    assert not (mask_RC.astype(bool) & ~real_RC).any()
    # The environment's follow-up turn is in every row, untrained.
    tok = sampler.tokenizer
    for r in range(R):
        ids = np.asarray(ro.rows.input_ids)[r, P:][real_RC[r] & (mask_RC[r] == 0)]
        assert "Say it again, with digits." in tok.decode(ids.tolist())
    assert [m["role"] for m in ro.completions[0]] == ["assistant", "user", "assistant"]
    # Rewards: the digit fraction of the whole conversation after the prompt + the
    # environment's part.
    from grpo_rewards import digit_fraction

    expected = np.asarray(digit_fraction(ro.completions), np.float32)
    expected += [digit_fraction([c[-1]["content"]])[0] for c in ro.completions]
    np.testing.assert_allclose(ro.rewards_R, expected, rtol=1e-6)


def test_grpo_runs_with_an_environment_and_evaluates_with_it(tmp_path, tiny):
    from jaxpt.trainers.grpo import train_grpo

    cfg = _config(tmp_path, tiny, eval_prompts=4, eval_batch_size=4,
                  rollout_correction="token_truncate")
    cfg = cfg.replace(data=dataclasses.replace(
        cfg.data, eval=str(gsm8k_path(tiny[1], "test")), max_eval_rows=4))
    train_grpo(cfg)
    rows = read_metrics(cfg.out_dir)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
    assert all(r["turns/mean"] == 2.0 for r in steps)
    assert all("env_rewards/second_turn_digits/mean" in r for r in steps)
    # The trainer's log-probs of the trained tokens = the decode loop's: every trained token
    # is the one sampled, at its position, after exactly the history it was sampled from
    # (a token off by one place would be whole nats off).
    assert all(r["sampling/sampling_logp_difference/max"] < 1e-3 for r in steps)
    evals = [r for r in rows if "eval_accuracy" in r]
    assert evals and "eval_turns/mean" in evals[-1]


def test_environment_settings_are_checked_before_the_model_loads(tmp_path, tiny):
    from jaxpt.rl.run import start_on_policy

    with pytest.raises(ValueError, match="unknown environment"):
        start_on_policy(_config(tmp_path, tiny, environment="maze"), "grpo")
    with pytest.raises(ValueError, match="tools=.*go with environment: tool_use"):
        start_on_policy(_config(tmp_path, tiny, environment="self_correction",
                                tools=["calculator"]), "grpo")
    cfg = _config(tmp_path, tiny, environment=None, tools=["calculator"])
    assert cfg.section("grpo").episodes().options == (
        ("max_tool_calls", 3), ("tools", ["calculator"]))


def test_online_dpo_ranks_multi_turn_trajectories(tmp_path, tiny):
    """Online DPO on two-turn trajectories: pairs of the same prompt ranked by reward; at
    the first step policy = reference, so the loss is log 2 and the KL 0 over the trained
    (sampled) tokens."""
    import math

    import yaml

    from jaxpt.cli import main

    model_dir, data_dir = tiny
    cfg = {
        "algorithm": "online_dpo", "out_dir": str(tmp_path / "run"),
        "model": {"name": str(model_dir)},
        "data": {"train": str(gsm8k_path(data_dir, "train")), "format": "gsm8k",
                 "max_train_rows": 16},
        "optim": {"lr": 1e-2, "schedule": "constant"},
        "train": {"max_steps": 1, "batch_size": 8, "seed": 0, "logprob_impl": "reference"},
        "checkpoint": {"every": 0}, "logging": {"progress": False, "every": 1},
        "online_dpo": {"environment": "grpo_rewards:AskTwiceEnv", "max_turns": 2,
                       "max_completion_length": 8, "max_prompt_length": 128,
                       "temperature": 1.0, "reward_funcs": ["grpo_rewards:digit_fraction"]},
    }
    path = tmp_path / "odpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    (row,) = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert row["turns/mean"] == 2.0
    assert abs(row["objective/kl"]) < 1e-4
    expected = math.log(2.0) if row["pairs/tied_frac"] < 1 else 0.0
    assert row["loss"] == pytest.approx(expected, rel=1e-5)
