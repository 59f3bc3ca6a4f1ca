"""PPO with a critic (``jaxpt.algorithms.ppo``, ``jaxpt.losses.ppo``): GAE on a hand-made
trajectory with a terminal and a truncated row, the KL-penalized per-token rewards, TRL's
whitening, the clipped policy and value losses, all against values written out by hand;
then the trainer on the tiny model: TRL's metric names, old = new on a rollout's first
step, the ReFT warm-up (SFT, then PPO) in one run, and resume == uninterrupted."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import make_tiny_model_dir, make_tiny_tokenizer, read_metrics, tiny_run_config

from jaxpt.config_load import load_config
from jaxpt.losses import ppo as L

G, LAM = 0.9, 0.8


def close(a, b, tol=1e-6) -> bool:
    """``a`` equals ``b`` within ``tol`` (raises with numpy's diff report otherwise)."""
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol)
    return True


# Two rows, C = 4. Row 0 ended with EOS after 3 tokens (terminal); row 1 filled all 4
# tokens without EOS (truncated). Rewards already include the score on the last token.
MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
REWARDS = np.array([[0.0, 0.0, 1.0, 9.0], [0.0, 0.0, 0.0, -0.5]], np.float32)  # 9: padding
VALUES = np.array([[0.5, 0.4, 0.2, 7.0], [0.1, 0.3, -0.2, 0.6]], np.float32)  # 7: padding


def test_gae_terminal_row_by_hand():
    adv, ret = L.gae(REWARDS, VALUES, MASK, gamma=G, lam=LAM)
    # Row 0: V after the EOS token is 0 (terminal); padding is never read.
    d2 = 1.0 + G * 0.0 - 0.2  # 0.8
    d1 = 0.0 + G * 0.2 - 0.4  # -0.22
    d0 = 0.0 + G * 0.4 - 0.5  # -0.14
    a2 = d2
    a1 = d1 + G * LAM * a2  # 0.356
    a0 = d0 + G * LAM * a1  # 0.11632
    assert close(adv[0], [a0, a1, a2, 0.0])
    assert close(ret[0], [a0 + 0.5, a1 + 0.4, a2 + 0.2, 0.0])
    assert close([a0, a1, a2], [0.11632, 0.356, 0.8])


@pytest.mark.parametrize("bootstrap", [0.0, 0.7])
def test_gae_truncated_row_by_hand(bootstrap):
    """TRL treats the end of a truncated row as terminal (next value 0); with
    ``truncation: bootstrap`` the critic's value after the last token is used."""
    adv, ret = L.gae(REWARDS, VALUES, MASK, gamma=G, lam=LAM,
                     next_value_R=np.array([0.0, bootstrap], np.float32))
    d = [0.0 + G * 0.3 - 0.1,  # 0.17
         0.0 + G * -0.2 - 0.3,  # -0.48
         0.0 + G * 0.6 - (-0.2),  # 0.74
         -0.5 + G * bootstrap - 0.6]  # -1.1 (terminal) or -0.47
    a3 = d[3]
    a2 = d[2] + G * LAM * a3
    a1 = d[1] + G * LAM * a2
    a0 = d[0] + G * LAM * a1
    assert close(adv[1], [a0, a1, a2, a3])
    assert close(ret[1], [a0 + 0.1, a1 + 0.3, a2 - 0.2, a3 + 0.6])
    want = {0.0: [-0.2025568, -0.51744, -0.052, -1.1], 0.7: [0.03258944, -0.190848, 0.4016, -0.47]}
    assert close(adv[1], want[bootstrap])
    assert close(adv[0], [0.11632, 0.356, 0.8, 0.0])  # the terminal row, as without next_value_R


def test_token_rewards_k1_k3_and_score_on_the_last_token():
    lp = np.array([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.1, -2.0, -1.0]], np.float32)
    ref = np.array([[-1.5, -1.0, -0.5, 0.0], [-0.3, -0.6, -1.0, -2.0]], np.float32)
    k1 = L.kl_per_token(lp, ref, "k1")
    assert close(k1[0, :3], [0.5, -1.0, 0.0])  # logp - ref
    k3 = L.kl_per_token(lp, ref, "k3")
    # exp(logr) - 1 - logr with logr = ref - logp
    assert close(k3[0, :3], [np.exp(-0.5) - 1 + 0.5, np.exp(1.0) - 1 - 1.0, 0.0], 1e-6)
    rewards, non_score = L.token_rewards(np.array([2.0, -1.0]), k1 * MASK, MASK, kl_coef=0.1)
    assert close(non_score[0], [-0.05, 0.1, 0.0, 0.0])
    assert close(rewards[0], [-0.05, 0.1, 2.0, 0.0])  # score on token 2 (EOS), none on padding
    # row 1: k1 = [0, 0.5, -1.0, 1.0], score on token 3
    assert close(rewards[1], [0.0, -0.05, 0.1, -0.1 - 1.0])


def test_masked_whiten_is_trls():
    x = np.array([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, 7.0]], np.float32)
    m = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    # masked values 1, 2, 3, 4, 5: mean 3, unbiased variance (4+1+0+1+4)/4 = 2.5
    w = L.masked_whiten(x, m)
    assert close(w[0, :3], np.array([-2.0, -1.0, 0.0]) / np.sqrt(2.5 + 1e-8), 1e-6)
    assert close(w[1, :2], np.array([1.0, 2.0]) / np.sqrt(2.5 + 1e-8), 1e-6)
    no_shift = L.masked_whiten(x, m, shift_mean=False)
    assert close(no_shift[0, :3], np.array([-2.0, -1.0, 0.0]) / np.sqrt(2.5 + 1e-8) + 3.0, 1e-5)


def test_clipped_policy_loss_by_hand():
    """max(-A r, -A clip(r, 0.8, 1.2)) per token, r = exp(logp - old)."""
    old = np.zeros((1, 4), np.float32)
    r = np.array([1.5, 0.5, 1.1, 1.5], np.float32)
    adv = np.array([[1.0, 1.0, -2.0, -1.0]], np.float32)
    loss, clipped, ratio, logratio = L.policy_loss_terms(np.log(r)[None], old, adv,
                                                         cliprange=0.2)
    assert close(ratio, r[None], 1e-6)
    # A=1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped); A=1, r=0.5: max(-0.5, -0.8) = -0.5;
    # A=-2, r=1.1: max(2.2, 2.2) = 2.2 (inside); A=-1, r=1.5: max(1.5, 1.2) = 1.5.
    assert close(loss, [[-1.2, -0.5, 2.2, 1.5]], 1e-6)
    assert clipped.tolist() == [[True, False, False, False]]
    assert close(0.5 * jnp.mean(logratio ** 2), 0.5 * np.mean(np.log(r) ** 2), 1e-6)


def test_clipped_value_loss_by_hand():
    """max((v - R)^2, (clip(v, v_old - 0.2, v_old + 0.2) - R)^2)."""
    v = np.array([[1.0, 0.0, 0.5, -1.0]], np.float32)
    old = np.array([[0.5, 0.1, 0.5, 0.0]], np.float32)
    ret = np.array([[0.6, 1.0, 0.0, -1.0]], np.float32)
    loss, clipped = L.value_loss_terms(v, old, ret, cliprange_value=0.2)
    # v=1 -> clip 0.7: max(0.16, 0.01) = 0.16; v=0 -> stays 0 (in [-0.1, 0.3]): 1.0;
    # v=0.5 in range: 0.25; v=-1 -> clip -0.2: max(0, 0.64) = 0.64 (clipped).
    assert close(loss, [[0.16, 1.0, 0.25, 0.64]], 1e-6)
    assert clipped.tolist() == [[False, False, False, True]]


# ---------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("ppo_tiny")
    tok = make_tiny_tokenizer(d / "tok", data_dir)
    return make_tiny_model_dir(d / "model", tok, seed=0), data_dir


def ppo_config(tmp_path, tiny, name="run", **sections):
    model_dir, data_dir = tiny
    ppo = {"num_generations": 2, "max_completion_length": 8, "max_prompt_length": 128,
           "reward_funcs": ["grpo_rewards:digit_fraction"], "temperature": 1.0,
           "eval_prompts": 8, "eval_batch_size": 8, **sections.pop("ppo", {})}
    train = {"max_steps": 4, "batch_size": 4, "seed": 0, "logprob_impl": "chunked",
             **sections.pop("train", {})}
    optim = {"lr": 1e-2, "schedule": "constant", "warmup_steps": 0, **sections.pop("optim", {})}
    path = tiny_run_config(
        tmp_path / f"{name}.yaml", model_dir, data_dir, tmp_path / name, algorithm="ppo",
        ppo=ppo, train=train, optim=optim, **{"checkpoint": {"every": 0}, **sections},
    )
    return load_config(path)


def run_ppo(cfg):
    from jaxpt.trainers.ppo import train_ppo

    train_ppo(cfg)
    return [r for r in read_metrics(cfg.out_dir) if "loss" in r]


TRL_METRICS = ("reward", "objective/kl", "objective/entropy", "objective/non_score_reward",
               "objective/rlhf_reward", "objective/scores", "val/num_eos_tokens")
STEP_METRICS = ("policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                "loss/value_avg", "val/clipfrac_avg", "policy/entropy_avg", "val/ratio",
                "grad_norm/policy", "grad_norm/value", "learning_rate/value")


def test_reft_sft_warmup_then_ppo_in_one_run(tmp_path, tiny):
    steps = run_ppo(ppo_config(tmp_path, tiny, data={"max_train_rows": 16},
                               ppo={"sft_warmup_steps": 2, "vf_coef": 0.1},
                               train={"max_steps": 3}))
    assert [r["sft_weight"] for r in steps] == [1.0, 1.0, 0.0]
    for r in steps[:2]:  # warm-up: the demonstrations' NLL and the critic, no policy term
        assert r["sft_loss"] > 0
        assert r["loss"] == pytest.approx(r["sft_loss"] + 0.1 * r["loss/value_avg"], rel=1e-5)
    last = steps[2]  # PPO: the demonstrations cost nothing any more
    assert last["sft_loss"] == 0.0
    assert last["loss"] == pytest.approx(
        last["loss/policy_avg"] + 0.1 * last["loss/value_avg"], rel=1e-5, abs=1e-7)
    assert steps[0]["sft_loss"] > steps[1]["sft_loss"]  # the warm-up learns the demos


def test_ppo_metrics_and_resume_equals_uninterrupted(tmp_path, tiny):
    """Rollouts of 2 epochs (TRL's num_ppo_epochs) x 1 mini-batch: TRL's metric names; the
    first step of a rollout has ratio 1 (old log-probs are the sampling policy's); the
    value head steps with its own lr. Stopped after a rollout's steps and resumed: the same
    logged metrics as one uninterrupted run (the policy, the value head, their moments,
    the reference and the prompt cursor come back from one checkpoint)."""
    from dataclasses import replace

    kw = dict(ppo={"num_ppo_epochs": 2, "kl_coef": 0.1, "kl_estimator": "k3",
                   "value_lr": 0.05, "missing_eos_penalty": 0.5},
              train={"max_steps": 4, "batch_size": 2, "with_entropy": True},
              checkpoint={"every": 2, "async_save": False})
    whole = run_ppo(ppo_config(tmp_path, tiny, "whole", **kw))
    assert len(whole) == 4
    assert all(k in whole[0] for k in TRL_METRICS), sorted(whole[0])
    assert all(k in r for r in whole for k in STEP_METRICS)
    assert [r.get("rollout") for r in whole] == [1.0, None, 2.0, None]
    first = whole[0]
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert first["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-8)
    assert first["policy/clipfrac_avg"] == 0.0 and first["val/clipfrac_avg"] == 0.0
    # The first rollout is sampled from the reference itself: k3 KL 0.
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert whole[2]["objective/kl"] > 0
    # missing_eos_penalty: the score is the reward less 0.5 per row without EOS (of 2).
    assert first["objective/scores"] == pytest.approx(
        first["reward"] - 0.5 * (2 - first["val/num_eos_tokens"]) / 2, abs=1e-6)
    assert first["objective/rlhf_reward"] == pytest.approx(
        first["objective/scores"] + first["objective/non_score_reward"], abs=1e-6)
    assert first["learning_rate/value"] == pytest.approx(0.05)
    assert first["learning_rate/policy"] == pytest.approx(1e-2)
    # The second pass over the rollout has moved away from the sampling policy.
    assert whole[1]["policy/approxkl_avg"] > 0 and whole[1]["val/ratio"] != 1.0

    cfg = ppo_config(tmp_path, tiny, "split", **kw)
    run_ppo(cfg.replace(train=replace(cfg.train, stop_after_steps=2)))
    split = run_ppo(cfg)
    keys = ("step", "loss", "loss/value_avg", "loss/policy_avg", "grad_norm/value",
            "objective/scores", "objective/kl", "val/ratio")
    pick = lambda rows: [{k: r[k] for k in keys if k in r} for r in rows]  # noqa: E731
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    assert pick(split) == pick(whole)


def test_section_takes_trls_names_and_refuses_what_ppo_has_not():
    from jaxpt.algorithms.ppo import PPOSection

    s = PPOSection(num_ppo_epochs=4, num_mini_batches=2)
    assert (s.num_iterations, s.steps_per_generation) == (4, 2)
    with pytest.raises(ValueError, match="num_ppo_epochs=4 and ppo.num_iterations=3 name"):
        PPOSection(num_ppo_epochs=4, num_iterations=3)
    with pytest.raises(ValueError, match="dynamic_sampling"):
        PPOSection(dynamic_sampling=True)
    with pytest.raises(ValueError, match="cliprange=1.5"):
        PPOSection(cliprange=1.5)
    with pytest.raises(ValueError, match="kl_estimator='k2'"):
        L.kl_per_token(np.zeros((1, 1)), np.zeros((1, 1)), "k2")
