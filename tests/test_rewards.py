"""Reward functions: math answer extraction, format regex, length shaping, the registry."""

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from jaxpt.rewards.answers import (
    extract_answer,
    extract_boxed,
    extract_strict_answer,
    parse_reference,
)
from jaxpt.rewards.format import THINK_ANSWER_TAGS_PATTERN, format_reward, make_format_reward
from jaxpt.rewards.length import length_penalty, soft_overlong_punishment
from jaxpt.rewards.math import answers_match, math_reward, math_strict_reward
from jaxpt.rewards.numbers import parse_number
from jaxpt.rewards.registry import (
    RewardError,
    compute_rewards,
    get_reward_function,
    reward_function_name,
)


def _data_dir() -> Path | None:
    repo = Path(__file__).resolve().parents[1]
    for d in (repo / ".." / "shared" / "data", Path("/work/shared/data")):
        if (d / "gsm8k" / "test.jsonl").exists():
            return d
    return None


# (completion text, expected numeric value of the extracted answer)
COMPLETIONS = [
    ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18 every day.\n#### 18", 18),
    ("The total is \\boxed{70000}.", 70000),
    ("So the profit is $70,000.", 70000),
    ("Answer: \\boxed{\\frac{3}{4}}", 0.75),
    ("We get \\boxed{\\dfrac{1}{8}} of the pie", 0.125),
    ("The fraction is 3/4", 0.75),
    ("It is \\boxed{\\text{18 dollars}}.", 18),
    ("The temperature is -6 degrees.", -6),
    ("16-3-4=9", 9),
    ("He ran \\boxed{540 \\text{ meters}}", 540),
    ("The answer is 12.5 cm.", 12.5),
    ("First 1,000 then 2,500,000 dollars", 2500000),
    ("nested \\boxed{\\frac{\\sqrt{4}}{2}} ignored, final \\boxed{2\\frac{1}{2}}", 2.5),
    ("x = \\boxed{5}", 5),
    ("the speed is 5%", 5),
    ("The answer is $\\boxed{42}$.", 42),
    ("Thinking... 3 + 4 = 7. So 7 apples.\n\n#### 7", 7),
    ("The value is .5", 0.5),
]


@pytest.mark.parametrize("text,value", COMPLETIONS)
def test_math_extraction(text, value):
    answer = extract_answer(text)
    assert answer is not None, text
    assert parse_number(answer) == pytest.approx(value, rel=1e-9), (text, answer)


def test_boxed_nested_braces_and_missing():
    assert extract_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert extract_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert extract_boxed("\\boxed 7 apples") == "7"
    assert extract_boxed("\\boxed{unbalanced") is None
    assert extract_answer("no digits at all") is None


def test_answers_match_rules():
    assert answers_match("0.75", "3/4")
    assert answers_match("\\frac{3}{4}", "0.75")
    assert answers_match("$1,080", "1080")
    assert answers_match("18 dollars", "18.00")
    # exact decimals compare exactly; a tolerance only where one side does not terminate
    assert not answers_match("1e-10", "0")
    assert not answers_match("1000000.5", "1000000")
    assert not answers_match("3500001", "3500000")
    assert answers_match("0.3333333", "1/3")
    assert not answers_match("0.33", "1/3")
    assert not answers_match("1000002", "1000000")
    assert not answers_match("5", "6")
    assert answers_match("\\frac{\\pi}{2}", "\\frac{\\pi}{2}")  # string equality fallback
    assert not answers_match("\\pi", "3")
    assert not answers_match(None, "3")
    assert parse_number("1/0") is None


def test_gsm8k_reference_parsing_on_real_rows():
    data = _data_dir()
    if data is None:
        pytest.skip("GSM8K test split not found")
    rows = [json.loads(line) for line in open(data / "gsm8k" / "test.jsonl")][:40]
    completions, answers, good, bad = [], [], [], []
    for row in rows:
        # independent parse: text after '####', thousands commas dropped
        value = int(row["answer"].split("####")[-1].strip().replace(",", ""))
        ref = parse_reference(row["answer"])
        assert parse_number(ref) == value, row["answer"]
        good.append(f"Let me think.\nThe answer is \\boxed{{{value}}}.")
        bad.append(f"Let me think.\nThe answer is \\boxed{{{value + 1}}}.")
        answers.append(row["answer"])
        completions.append(row["answer"])  # the reference solution itself ends in '#### N'
    assert math_reward(None, completions, answer=answers) == [1.0] * len(rows)
    assert math_reward(None, good, answer=answers) == [1.0] * len(rows)
    assert math_reward(None, bad, answer=answers) == [0.0] * len(rows)


def test_math_reward_conversational_and_missing_reference():
    completions = [
        [{"role": "assistant", "content": "so \\boxed{3}"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "#### 4"}]}],
        "5",
    ]
    assert math_reward(None, completions, answer=["3", "#### 5", None]) == [1.0, 0.0, None]
    with pytest.raises(ValueError, match="'answer'"):
        math_reward(None, ["1"])


def test_strict_math_reward_needs_a_stated_answer():
    # Rollouts SmolLM2 produced on "Fatima has 9 coins, gives away 3" (answer 6): the
    # lenient verifier credits prose that merely ends on a 6; strict mode does not.
    rambling = "1. 2 coins: 2\n2. 3 coins: 1 1/3\n5. 6"
    assert math_reward(None, [rambling], answer=["6"]) == [1.0]
    assert math_strict_reward(None, [rambling], answer=["6"]) == [0.0]
    stated = [
        "6",
        " 6.\n",
        "**6**",
        "6 coins",
        "She gives 3 away, so the answer is 6.",
        "Answer: **6**",
        "The final answer is 9 - 3 = 6",
        "so \\boxed{6}",
        "9 - 3 = 6\n#### 6",
    ]
    assert math_strict_reward(None, stated, answer=["6"] * len(stated)) == [1.0] * len(stated)
    unstated = ["Fatima has 6 coins.", "9 - 3 = 6", "The answer is 7, not 6.", "6 or 7", ""]
    got = math_strict_reward(None, unstated, answer=["6"] * len(unstated))
    assert got == [0.0] * len(unstated)
    assert extract_strict_answer("The answer is: 1,234 dollars") == "1,234"
    assert get_reward_function("math_strict") is math_strict_reward
    assert get_reward_function("math", strict=True) is math_strict_reward
    fmt = get_reward_function("answer_format")
    assert fmt(completions=stated + unstated) == [1.0] * len(stated) + [0.0, 0.0, 1.0, 0.0, 0.0]


def test_format_reward():
    good = "<think>\nadd 2 and 2\n</think>\nThe answer is 4."
    assert format_reward(completions=[good]) == [1.0]
    bad = [
        "The answer is 4.",  # no think block
        "<think>reasoning</think>",  # no answer after it
        "<think>a</think> b <think>c</think> d",  # a second think block
        "<think>unclosed reasoning. The answer is 4.",
        "preamble <think>a</think> b",  # does not start with the think block
    ]
    assert format_reward(completions=bad) == [0.0] * len(bad)
    tags = make_format_reward(THINK_ANSWER_TAGS_PATTERN)
    assert tags(completions=["<think>x</think>\n<answer>4</answer>", "<think>x</think> 4"]) == [
        1.0,
        0.0,
    ]
    custom = make_format_reward(r"^Answer: \d+$")
    assert custom(completions=["Answer: 12", "Answer: twelve"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a valid regex"):
        make_format_reward("(")


def test_overlong_shaping_values():
    # L=100, buffer=20: <=80 -> 0; 90 -> (80-90)/20 = -0.5; 100 -> -1; 101 -> -1
    ids = [[0] * n for n in (10, 80, 81, 90, 100, 101)]
    out = soft_overlong_punishment(ids, max_completion_length=100, overlong_buffer=20)
    assert out == pytest.approx([0.0, 0.0, -0.05, -0.5, -1.0, -1.0])
    out2 = soft_overlong_punishment(ids, 100, 20, penalty_factor=2.0)
    assert out2 == pytest.approx([0.0, 0.0, -0.1, -1.0, -2.0, -2.0])
    # buffer 0: only over-length completions are punished
    assert soft_overlong_punishment([[0] * 100, [0] * 101], 100, 0) == [0.0, -1.0]
    trl_rewards = pytest.importorskip("trl.rewards")
    trl_fn = trl_rewards.get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    assert out == pytest.approx(trl_fn(completion_ids=ids))
    with pytest.raises(ValueError, match="overlong_buffer"):
        soft_overlong_punishment(ids, 10, 20)


def test_length_penalty_values():
    ids = [[0] * n for n in (5, 10, 15, 30)]
    # target 10, L 20: -(len-10)/10 clipped to [-1, 0]
    assert length_penalty(ids, 20, target_length=10) == pytest.approx([0.0, 0.0, -0.5, -1.0])
    fn = get_reward_function("length", max_completion_length=20, coef=0.5)
    assert fn(completion_ids=ids) == pytest.approx([-0.125, -0.25, -0.375, -0.5])


def test_builtins_and_import_path(tmp_path, monkeypatch):
    assert get_reward_function("math") is math_reward
    overlong = get_reward_function("overlong", max_completion_length=100, overlong_buffer=20)
    assert overlong(completion_ids=[[0] * 90]) == [-0.5]
    assert reward_function_name(overlong) == "overlong_reward"

    mod = tmp_path / "my_user_rewards.py"
    mod.write_text(
        "def contains_word(prompts, completions, completion_ids, word, **kwargs):\n"
        "    return [1.0 if w in c else 0.0 for c, w in zip(completions, word)]\n"
        "def make_scaled(scale):\n"
        "    def scaled(completions, **kwargs):\n"
        "        return [scale * len(c) for c in completions]\n"
        "    return scaled\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_reward_function("my_user_rewards:contains_word")
    rewards, per_fn, metrics = compute_rewards(
        [fn],
        None,
        prompts=["p0", "p0", "p1", "p1"],
        completions=["a cat", "a dog", "cat", "bird"],
        completion_ids=[[1], [2], [3], [4]],
        columns={"word": ["cat", "cat", "bird", "bird"], "prompt": ["x"] * 4},
        row_indices=[0, 0, 1, 1],
    )
    np.testing.assert_array_equal(rewards, [1.0, 0.0, 0.0, 1.0])
    assert rewards.dtype == np.float32
    assert list(per_fn) == ["contains_word"]
    assert metrics["rewards/contains_word/mean"] == pytest.approx(0.5)
    assert metrics["rewards/contains_word/std"] == pytest.approx(np.std([1, 0, 0, 1], ddof=1))

    scaled = get_reward_function("my_user_rewards:make_scaled", scale=0.5)
    assert scaled(completions=["ab", "abcd"]) == [1.0, 2.0]
    with pytest.raises(ValueError, match="no attribute"):
        get_reward_function("my_user_rewards:nope")
    with pytest.raises(ValueError, match="cannot import"):
        get_reward_function("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="unknown reward function"):
        get_reward_function("mathh")


def test_reward_spec_options_and_user_equivalence(tmp_path, monkeypatch):
    from jaxpt.rewards.choice import choice_reward
    from jaxpt.rewards.math import MathReward
    from jaxpt.rewards.registry import parse_reward_spec

    assert parse_reward_spec("math") == ("math", {})
    assert parse_reward_spec("overlong(max_completion_length=512, overlong_buffer=64)") == (
        "overlong", {"max_completion_length": 512, "overlong_buffer": 64})
    assert parse_reward_spec("math(strict=true, equivalence=a.b:c, timeout_s=null)") == (
        "math", {"strict": True, "equivalence": "a.b:c", "timeout_s": None})
    with pytest.raises(ValueError, match="key=value"):
        get_reward_function("math(strict)")
    with pytest.raises(ValueError, match="bad options"):
        get_reward_function("math(nope=1)")
    assert get_reward_function("choice") is choice_reward
    assert get_reward_function("math(strict=true)") is math_strict_reward
    overlong = get_reward_function("overlong(max_completion_length=100, overlong_buffer=20)")
    assert overlong(completion_ids=[[0] * 90]) == [-0.5]
    strict = get_reward_function("math_strict(timeout_s=1)")
    assert isinstance(strict, MathReward) and strict.strict and strict.timeout_s == 1

    mod = tmp_path / "my_checks.py"
    mod.write_text(
        "seen = []\n"
        "def same_mod_10(predicted, reference):\n"
        "    seen.append((predicted, reference))\n"
        "    return int(predicted) % 10 == int(reference) % 10\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_reward_function("math(equivalence=my_checks:same_mod_10)")
    assert reward_function_name(fn) == "math_same_mod_10"
    got = fn(completions=["#### 13", "The answer is 4.", "no answer"], answer=["#### 3", "5", "1"])
    assert got == [1.0, 0.0, 0.0]
    import my_checks

    assert my_checks.seen == [("13", "3"), ("4", "5")]  # not called without an answer
    with pytest.raises(ValueError, match="no attribute"):
        get_reward_function("math(equivalence=my_checks:nope)")


def test_math_verify_runs_off_the_main_thread_with_a_hard_timeout():
    """Reward functions run in worker threads (registry); math-verify's signal-based
    timeout would fail there, and a huge power would hang a thread for ever."""
    import time

    from jaxpt.rewards.verify import symbolic_equal

    box = {}

    def work():
        box["eq"] = symbolic_equal("\\frac{\\sqrt2}{2}", "\\frac{1}{\\sqrt2}")
        t0 = time.perf_counter()
        box["huge"] = symbolic_equal("9^{9^{9}}", "1", timeout_s=1.0)
        box["huge_s"] = time.perf_counter() - t0
        box["after"] = symbolic_equal("(x+1)^2", "x^2+2x+1")  # a fresh worker

    t = threading.Thread(target=work)
    t.start()
    t.join(120)
    assert box["eq"] is True and box["huge"] is False and box["after"] is True
    assert box["huge_s"] < 30


def test_none_handling_and_weights():
    def first(completions, **kw):  # applies to every completion
        return [1.0, 2.0, 3.0, 4.0]

    def second(completions, **kw):  # not applicable to completions 1 and 3
        return [10.0, None, 30.0, None]

    def third(completions, **kw):  # applies only to completion 2
        return [None, None, 5.0, None]

    rewards, per_fn, metrics = compute_rewards(
        [first, second], [2.0, 0.5], ["p"] * 4, ["c"] * 4, None, {}, [7, 7, 8, 8]
    )
    # nansum of weighted rewards: [2+5, 4, 6+15, 8]
    np.testing.assert_allclose(rewards, [7.0, 4.0, 21.0, 8.0])
    assert np.isnan(per_fn["second"][1])
    assert metrics["rewards/second/mean"] == pytest.approx(20.0)  # NaN ignored
    assert metrics["rewards/second/std"] == pytest.approx(np.std([10, 30], ddof=1))

    # rows where every function returned None get a NaN total (unscorable)
    rewards2, _, metrics2 = compute_rewards(
        [second, third], None, ["p"] * 4, ["c"] * 4, None, {}, None
    )
    np.testing.assert_allclose(rewards2[[0, 2]], [10.0, 35.0])
    assert np.isnan(rewards2[1]) and np.isnan(rewards2[3])
    assert math.isnan(metrics2["rewards/third/std"])  # a single value has no sample std

    with pytest.raises(ValueError, match="weights"):
        compute_rewards([first], [1.0, 2.0], ["p"] * 4, ["c"] * 4, None, {}, None)
    with pytest.raises(ValueError, match="column 'answer'"):
        compute_rewards([first], None, ["p"] * 4, ["c"] * 4, None, {"answer": [1]}, None)


def test_raising_function_names_the_row():
    def picky(completions, **kw):
        out = []
        for c in completions:
            if c == "boom":
                raise ZeroDivisionError("cannot score 'boom'")
            out.append(1.0)
        return out

    with pytest.raises(RewardError) as info:
        compute_rewards(
            [picky], None, ["p"] * 4, ["ok", "ok", "boom", "ok"], None, {}, [10, 10, 11, 11]
        )
    err = info.value
    assert err.function == "picky"
    assert err.rows == [11]
    assert "dataset row 11" in str(err) and "ZeroDivisionError" in str(err)
    assert isinstance(err.__cause__, ZeroDivisionError)


def test_wrong_length_and_non_numeric():
    def short(completions, **kw):
        return [1.0]

    def stringy(completions, **kw):
        return [1.0, "high", 0.0]

    with pytest.raises(RewardError, match="returned 1 rewards for 3 completions") as info:
        compute_rewards([short], None, ["p"] * 3, ["c"] * 3, None, {}, [3, 4, 5])
    assert info.value.function == "short" and "dataset rows 3, 4, 5" in str(info.value)
    with pytest.raises(RewardError, match="dataset row 4") as info:
        compute_rewards([stringy], None, ["p"] * 3, ["c"] * 3, None, {}, [3, 4, 5])
    assert info.value.rows == [4]


def test_hanging_function_times_out():
    release = threading.Event()

    def hangs(completions, **kw):
        release.wait(timeout=10.0)  # released by the test so no thread is left running
        return [0.0] * len(completions)

    try:
        with pytest.raises(RewardError, match="did not return within timeout_s=0.5") as info:
            compute_rewards([hangs], None, ["p"] * 2, ["c"] * 2, None, {}, [42, 43], timeout_s=0.5)
        assert info.value.function == "hangs"
        assert "42" in str(info.value) and "cannot be killed" in str(info.value)
    finally:
        release.set()


def test_rewards_that_need_the_answer_column_are_checked_before_sampling():
    """Verifiers declare ``required_columns``; ``check_reward_columns`` names the reward,
    the column and the first prompt row without it, before any rollout."""
    import numpy as np

    from jaxpt.data.pipeline import PromptExample
    from jaxpt.rewards.registry import check_reward_columns, get_reward_function

    rows = [
        PromptExample(np.zeros(2, np.int32), {"prompt": "1+1?", "answer": "2"}, "p.jsonl", 1),
        PromptExample(np.zeros(2, np.int32), {"prompt": "2+2?"}, "p.jsonl", 2),
    ]
    for spec in ("math", "math_strict", "math(strict=true)", "choice"):
        fn = get_reward_function(spec)
        with pytest.raises(ValueError, match=r"p.jsonl:2: reward .* needs the dataset column "
                                             r"'answer'.*columns: \['prompt'\]"):
            check_reward_columns([fn], rows)
        check_reward_columns([fn], rows[:1])  # every row has it: fine
    # rewards that read no column pass, as do user functions that declare nothing
    check_reward_columns([get_reward_function("answer_format"), lambda completions, **kw: []],
                         rows)
