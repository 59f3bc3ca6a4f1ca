"""Advantages (group/batch/none, RLOO), dynamic sampling, pass@k and maj@k."""

import itertools
import math

import numpy as np
import pytest

from jaxpt.rewards.advantages import compute_advantages
from jaxpt.rewards.passk import (
    maj_at_k,
    majority_answer,
    mean_maj_at_k,
    mean_pass_at_k,
    pass_at_k,
    pass_at_k_per_problem,
)
from jaxpt.rl.dynamic_sampling import DynamicSampler, dynamic_sample, groups_with_signal

# two groups of 4: the first has signal, the second all agree
REWARDS = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], np.float32)
SQRT_1_3 = math.sqrt(1 / 3)  # sample std of [1, 0, 0, 1]: sqrt(4 * 0.25 / 3)


def test_group_scaled_advantages_hand_values():
    adv, m = compute_advantages(REWARDS, 4, scale_rewards="group")
    a = 0.5 / (SQRT_1_3 + 1e-4)
    np.testing.assert_allclose(adv, [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-6)
    assert adv.dtype == np.float32
    assert m["frac_reward_zero_std"] == 0.5
    assert m["reward"] == pytest.approx(0.75)
    # sample std of all 8: sqrt((2 * 0.75^2 + 6 * 0.25^2) / 7) = sqrt(1.5 / 7)
    assert m["reward_std"] == pytest.approx(math.sqrt(1.5 / 7))


def test_batch_and_none_scaling():
    adv_b, m_b = compute_advantages(REWARDS, 4, scale_rewards="batch")
    s = math.sqrt(1.5 / 7) + 1e-4
    np.testing.assert_allclose(adv_b, [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0], rtol=1e-6)
    assert m_b["frac_reward_zero_std"] == 0.0
    adv_n, m_n = compute_advantages(REWARDS, 4, scale_rewards="none")  # Dr. GRPO
    np.testing.assert_allclose(adv_n, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    assert m_n["frac_reward_zero_std"] == 0.5


def test_rloo_hand_values():
    # group [1, 0, 0, 1]: r=1 -> 1 - (0+0+1)/3 = 2/3 ; r=0 -> 0 - (1+0+1)/3 = -2/3
    # group [3, 1, 2]: 3 - 1.5 = 1.5 ; 1 - 2.5 = -1.5 ; 2 - 2 = 0
    r = np.array([1, 0, 0, 1, 1, 1, 1, 1], np.float32)
    adv, _ = compute_advantages(r, 4, scale_rewards="none", estimator="rloo")
    np.testing.assert_allclose(adv, [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0], rtol=1e-6)
    adv3, _ = compute_advantages([3.0, 1.0, 2.0], 3, scale_rewards="none", estimator="rloo")
    np.testing.assert_allclose(adv3, [1.5, -1.5, 0.0], rtol=1e-6)
    # RLOO = N/(N-1) * (r - mean)
    adv_g, _ = compute_advantages([3.0, 1.0, 2.0], 3, scale_rewards="none")
    np.testing.assert_allclose(adv3, 1.5 * adv_g, rtol=1e-6)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        compute_advantages([1.0, 2.0], 1, estimator="rloo")


def test_nan_rewards_and_zero_std_groups():
    # group 0: [2, NaN, 0] -> mean 1 over the scorable two, std sqrt(2); NaN -> advantage 0
    # group 1: [5, 5, 5] zero std -> zero advantages (not NaN/inf)
    r = np.array([2.0, np.nan, 0.0, 5.0, 5.0, 5.0])
    adv, m = compute_advantages(r, 3)
    a = 1.0 / (math.sqrt(2) + 1e-4)
    np.testing.assert_allclose(adv, [a, 0.0, -a, 0.0, 0.0, 0.0], rtol=1e-6)
    assert np.all(np.isfinite(adv))
    assert m["frac_reward_zero_std"] == 0.5
    assert m["reward"] == pytest.approx(17 / 5)


def test_shape_errors():
    with pytest.raises(ValueError, match="not divisible by num_generations=4"):
        compute_advantages(np.zeros(6), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        compute_advantages(np.zeros(4), 2, scale_rewards="std")


def test_groups_with_signal():
    # signal; all agree; agree within atol=1e-6; only one scorable reward; NaN ignored
    r = [1, 0, 1, 0, 0, 0, 0.5, 0.5, 0.5000001, np.nan, 1, np.nan, 1, np.nan, 0]
    np.testing.assert_array_equal(groups_with_signal(r, 3), [True, False, False, False, True])


# ----------------------------------------------------------------------------- pass@k / maj@k


def brute_force_pass_at_k(flags, k):
    subsets = list(itertools.combinations(range(len(flags)), k))
    return sum(any(flags[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_against_enumeration():
    rng = np.random.default_rng(0)
    for n in range(1, 8):
        for _ in range(3):
            flags = list(rng.random(n) < 0.4)
            for k in range(1, n + 1):
                assert pass_at_k(n, sum(flags), k) == pytest.approx(
                    brute_force_pass_at_k(flags, k), abs=1e-12
                ), (flags, k)
    # hand values: n=5, c=2, k=2 -> 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k
    # large n stays finite and matches the binomial form
    assert pass_at_k(200, 7, 50) == pytest.approx(1 - math.comb(193, 50) / math.comb(200, 50))
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def test_pass_at_k_per_problem_and_mean():
    correct = [[True, False, False, False], [False] * 4, [True] * 4]
    per = pass_at_k_per_problem(correct, 2)
    np.testing.assert_allclose(per, [0.5, 0.0, 1.0])  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert mean_pass_at_k(correct, 2) == pytest.approx(0.5)


def test_maj_at_k():
    # "0.5" and "1/2" vote together (same value): 3 votes vs 2 for "3"
    answers = ["3", "0.5", "1/2", "3", "\\frac{1}{2}", None]
    assert majority_answer(answers) == "0.5"
    assert maj_at_k(answers, "1/2", k=5) == 1.0
    assert maj_at_k(answers, "3", k=5) == 0.0
    # first k only: among ["3", "0.5", "1/2", "3"] there is a tie 2-2 -> first seen ("3")
    assert maj_at_k(answers, "3", k=4) == 1.0
    assert majority_answer([None, None]) is None
    problems = [["7", "7", "8"], ["x", "y", "y"]]
    assert mean_maj_at_k(problems, ["7", "y"], k=3) == 1.0
    assert mean_maj_at_k(problems, ["8", "y"], k=3) == 0.5


# ----------------------------------------------------------------------------- dynamic sampling


def _round(rewards_by_group, tag):
    r = np.asarray(rewards_by_group, np.float32).reshape(-1)
    n = len(r)
    data = {
        "ids": np.arange(n).reshape(n, 1) + 100 * tag,  # [G, 1] array
        "text": [f"r{tag}c{i}" for i in range(n)],  # list field
    }
    return r, data


def test_dynamic_sampler_fills_from_signal_groups():
    s = DynamicSampler(num_groups=3, num_generations=2, max_rounds=5)
    # round 0: groups [1,0] (signal), [1,1] (none); round 1: [0,1], [0,0], [1,0] -> full
    mask0 = s.add(*_round([[1, 0], [1, 1]], 0))
    np.testing.assert_array_equal(mask0, [True, False])
    assert not s.done
    s.add(*_round([[0, 1], [0, 0], [1, 0]], 1))
    assert s.full and s.done
    rewards, data, info = s.result()
    np.testing.assert_array_equal(rewards, [1, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(data["ids"][:, 0], [0, 1, 100, 101, 104, 105])
    assert data["text"] == ["r0c0", "r0c1", "r1c0", "r1c1", "r1c4", "r1c5"]
    assert info["rounds"] == 2 and info["num_padded_groups"] == 0
    with pytest.raises(RuntimeError, match="done"):
        s.add(*_round([[1, 0]], 2))


def test_dynamic_sampler_terminates_at_cap_and_keeps_shape():
    calls = []

    def never_signal(round_index):
        calls.append(round_index)
        return _round([[1, 1], [0, 0]], round_index)

    s = DynamicSampler(num_groups=3, num_generations=2, max_rounds=4)
    rewards, data, info = dynamic_sample(never_signal, s)
    assert calls == [0, 1, 2, 3]  # stopped at the cap
    assert rewards.shape == (6,) and data["ids"].shape == (6, 1) and len(data["text"]) == 6
    # no signal group at all: padded with the most recent zero-signal groups
    assert info["num_padded_groups"] == 3
    np.testing.assert_array_equal(info["group_is_padding"], [True, True, True])
    np.testing.assert_array_equal(data["ids"][:, 0], [302, 303, 300, 301, 202, 203])
    adv, _ = compute_advantages(rewards, 2)
    np.testing.assert_array_equal(adv, 0.0)  # zero-signal padding carries no policy gradient


def test_dynamic_sampler_fill_policies():
    rounds = [_round([[1, 0], [1, 1]], 0), _round([[0, 0], [1, 1]], 1)]
    rep = DynamicSampler(num_groups=3, num_generations=2, max_rounds=2, fill="repeat")
    for r in rounds:
        rep.add(*r)
    rewards, data, info = rep.result()
    # one signal group, repeated twice to fill
    np.testing.assert_array_equal(rewards, [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(info["group_is_padding"], [False, True, True])
    np.testing.assert_array_equal(info["completion_is_padding"], [0, 0, 1, 1, 1, 1])

    zero = DynamicSampler(num_groups=3, num_generations=2, max_rounds=2, fill="zero_advantage")
    for r in rounds:
        zero.add(*r)
    rewards, data, info = zero.result()
    # signal group first, then the most recent dropped groups (round 1's second, then first)
    np.testing.assert_array_equal(rewards, [1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(data["ids"][:, 0], [0, 1, 102, 103, 100, 101])
    assert info["num_signal_groups"] == 1 and info["num_padded_groups"] == 2
    with pytest.raises(ValueError, match="fill"):
        DynamicSampler(2, 2, 2, fill="drop")
    with pytest.raises(ValueError, match="'ids' has 3 entries for 4 rewards"):
        DynamicSampler(2, 2, 2).add([1, 0, 1, 0], {"ids": [1, 2, 3]})
