"""Environments and the multi-turn driver: rewards by hand, tokens and loss masks by hand.

The sampler is scripted (a fixed text per row and turn), so every token is known; the
tokenizer is SmolLM2-135M-Instruct's (its template has no tool support: fallback mode).
"""

from __future__ import annotations

import pytest

from jaxpt.rl.environments import (
    CHECK_PROMPT,
    SelfCorrectionEnvironment,
    SingleTurnEnvironment,
    StepResult,
    ToolEnvironment,
    make_environment,
)
from jaxpt.rl.multiturn import multiturn_metrics, run_episodes
from jaxpt.tools.functions import calculator, function_schema
from jaxpt.tools.parsing import fallback_system_prompt

CALL_12_34 = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12 * 34"}}\n' \
             "</tool_call>"


@pytest.fixture(scope="module")
def tokenizer():
    from jaxpt.data.tokenizers import smollm2_tokenizer

    return smollm2_tokenizer()


class ScriptedSampler:
    """generate(): row r's k-th call answers script[r][k] (+ EOS), log-prob -0.5 per token;
    records every batch of prompts. A prompt belongs to the row whose previous prompt and
    answer it extends (the first batch is in row order)."""

    def __init__(self, tokenizer, script: list[list[str]], eos: bool = True):
        self.tok, self.script, self.eos = tokenizer, script, eos
        self.calls: list[list[list[int]]] = []
        self.sent = [[] for _ in script]  # per row: its last prompt + answer
        self.turns = [0 for _ in script]

    def encode(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return [*ids, self.tok.eos_token_id] if self.eos else ids

    def __call__(self, prompts):
        first = not self.calls
        self.calls.append(prompts)
        outs = []
        for j, p in enumerate(prompts):
            if first:
                r = j
            else:
                (r,) = [r for r, seq in enumerate(self.sent) if seq and p[: len(seq)] == seq]
            ids = self.encode(self.script[r][self.turns[r]])
            self.sent[r], self.turns[r] = [*p, *ids], self.turns[r] + 1
            outs.append({"token_ids": ids, "logprobs": [-0.5] * len(ids)})
        return outs


# ----------------------------------------------------------------------------- self-correction


@pytest.mark.parametrize("first, second, parts", [
    ("The answer is 400.", "The answer is 408.",
     {"final_answer": 1.0, "correction_bonus": 0.5, "regression_penalty": 0.0}),
    ("The answer is 408.", "The answer is 400.",
     {"final_answer": 0.0, "correction_bonus": 0.0, "regression_penalty": -0.25}),
    ("The answer is 408.", "The answer is 408.",
     {"final_answer": 1.0, "correction_bonus": 0.0, "regression_penalty": 0.0}),
    ("The answer is 400.", "I am not sure.",
     {"final_answer": 0.0, "correction_bonus": 0.0, "regression_penalty": 0.0}),
])
def test_self_correction_rewards_by_hand(first, second, parts):
    env = SelfCorrectionEnvironment(correction_bonus=0.5, regression_penalty=0.25)
    msgs = env.reset({"prompt": "What is 12 * 34?", "answer": "408"})
    assert msgs == [{"role": "user", "content": "What is 12 * 34?"}]
    r1 = env.step(msgs, first)
    assert not r1.done and r1.reward_parts == {}
    assert r1.messages == ({"role": "user", "content": CHECK_PROMPT},)
    history = [*msgs, {"role": "assistant", "content": first}, *r1.messages]
    r2 = env.step(history, second)
    assert r2.done and dict(r2.reward_parts) == parts
    assert r2.info["first_attempt"] == (1.0 if "408" in first else 0.0)


def test_self_correction_defaults_reward_only_the_final_answer():
    env = SelfCorrectionEnvironment()
    env.reset({"prompt": "What is 2 + 2?", "answer": "4"})
    env.step([], "The answer is 4.")
    parts = env.step([], "The answer is 5.").reward_parts
    assert sum(parts.values()) == 0.0 and parts["final_answer"] == 0.0
    with pytest.raises(ValueError, match="magnitudes"):
        SelfCorrectionEnvironment(regression_penalty=-1)


def test_self_correction_through_the_driver(tokenizer):
    rows = [{"prompt": "What is 12 * 34?", "answer": "408"},
            {"prompt": "What is 5 + 6?", "answer": "11"}]
    sampler = ScriptedSampler(tokenizer, [["The answer is 400.", "The answer is 408."],
                                          ["The answer is 11.", "The answer is 12."]])
    trajs = run_episodes(make_environment("self_correction", correction_bonus=0.5,
                                          regression_penalty=0.25),
                         rows, sampler, tokenizer)
    assert [t.finish for t in trajs] == ["done", "done"] and [t.turns for t in trajs] == [2, 2]
    assert sum(trajs[0].reward_parts.values()) == 1.5  # right at last, +0.5 for correcting
    assert sum(trajs[1].reward_parts.values()) == -0.25  # wrong at last, -0.25 for regressing
    t = trajs[0]
    first = sampler.encode("The answer is 400.")
    feedback = tokenizer(f"\n<|im_start|>user\n{CHECK_PROMPT}<|im_end|>\n<|im_start|>assistant\n",
                         add_special_tokens=False)["input_ids"]
    second = sampler.encode("The answer is 408.")
    assert t.completion_ids == first + feedback + second
    assert t.loss_mask == [1] * len(first) + [0] * len(feedback) + [1] * len(second)
    assert t.logprobs == [-0.5] * len(first) + [0.0] * len(feedback) + [-0.5] * len(second)
    assert t.final_completion == "The answer is 408."
    metrics = multiturn_metrics(trajs)
    assert metrics["turns/mean"] == 2.0 and metrics["tools/call_frequency"] == 0.0
    assert metrics["env_rewards/correction_bonus/mean"] == 0.25  # (0.5 + 0) / 2


# ----------------------------------------------------------------------------- tool use


def test_two_turn_tool_trajectory_tokens_and_mask_by_hand(tokenizer):
    row = {"prompt": "What is 12 * 34?"}
    sampler = ScriptedSampler(tokenizer, [[CALL_12_34, "The answer is 408."]])
    (t,) = run_episodes(make_environment("tool_use", tools=["calculator"]), [row], sampler,
                        tokenizer, max_turns=3)
    system = fallback_system_prompt([function_schema(calculator)])
    prompt_text = (f"<|im_start|>system\n{system}<|im_end|>\n"
                   "<|im_start|>user\nWhat is 12 * 34?<|im_end|>\n<|im_start|>assistant\n")
    assert t.prompt_ids == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    call = sampler.encode(CALL_12_34)
    tool_turn = tokenizer(
        "\n<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    answer = sampler.encode("The answer is 408.")
    assert t.completion_ids == call + tool_turn + answer
    assert t.loss_mask == [1] * len(call) + [0] * len(tool_turn) + [1] * len(answer)
    # the second turn was sampled from exactly the first turn's tokens plus the tool turn
    assert sampler.calls[1] == [t.prompt_ids + call + tool_turn]
    assert tokenizer.decode(t.prompt_ids + t.completion_ids) == (
        prompt_text + CALL_12_34 + "<|im_end|>\n<|im_start|>user\n<tool_response>\n408\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\nThe answer is 408.<|im_end|>")
    assert t.messages == [
        {"role": "user", "content": "What is 12 * 34?"},
        {"role": "assistant", "content": CALL_12_34},
        {"role": "tool", "name": "calculator", "content": "408"},
        {"role": "assistant", "content": "The answer is 408."},
    ]
    assert (t.finish, t.turns, dict(t.tool_calls), t.tool_failures) == (
        "done", 2, {"calculator": 1}, 0)


def test_tool_metrics_failures_and_limits(tokenizer):
    bad_json = "<tool_call>{calculator}</tool_call>"
    unknown = '<tool_call>{"name": "search", "arguments": {}}</tool_call>'
    rows = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}, {"prompt": "d"}]
    sampler = ScriptedSampler(tokenizer, [
        ["408"],                                  # answers at once: no call
        [CALL_12_34, bad_json, "408"],            # one good call, one malformed
        [unknown, CALL_12_34, CALL_12_34],        # the third call is past the limit: done
        [CALL_12_34 + CALL_12_34 + CALL_12_34, "408"],  # 3 calls in one turn, limit 2
    ])
    trajs = run_episodes(make_environment("tool_use", max_tool_calls=2), rows, sampler,
                         tokenizer, max_turns=3, step_workers=4)
    assert [t.finish for t in trajs] == ["done", "done", "done", "done"]
    assert [t.num_tool_calls for t in trajs] == [0, 2, 2, 3]
    assert [t.tool_failures for t in trajs] == [0, 1, 1, 1]
    assert [m["content"] for m in trajs[3].messages[2:5]] == [
        "408", "408", "Error: the limit of 2 tool calls is reached"]
    assert "unknown tool 'search'" in trajs[2].messages[2]["content"]
    assert trajs[2].turns == 3 and trajs[2].messages[-1]["role"] == "assistant"
    m = multiturn_metrics(trajs)
    assert m["tools/call_frequency"] == 7 / 4
    assert m["tools/failure_frequency"] == 3 / 7
    assert m["tools/calculator/call_frequency"] == 5 / 4
    assert m["tools/search/call_frequency"] == 1 / 4
    assert m["tools/<malformed>/call_frequency"] == 1 / 4
    assert m["turns/mean"] == (1 + 3 + 3 + 2) / 4 and m["turns/max"] == 3.0


def test_token_budget_and_truncated_turns(tokenizer):
    sampler = ScriptedSampler(tokenizer, [[CALL_12_34, "408"]])
    (t,) = run_episodes(make_environment("tool_use"), [{"prompt": "q"}], sampler, tokenizer)
    assert t.finish == "done" and t.turns == 2
    budget = len(t.prompt_ids) + len(sampler.encode(CALL_12_34)) + 5  # no room for the tool turn
    sampler = ScriptedSampler(tokenizer, [[CALL_12_34, "408"]])
    (t,) = run_episodes(make_environment("tool_use"), [{"prompt": "q"}], sampler, tokenizer,
                        max_total_tokens=budget)
    assert t.finish == "length" and t.turns == 1 and t.loss_mask == [1] * len(t.completion_ids)
    one = ScriptedSampler(tokenizer, [[CALL_12_34]])
    (t,) = run_episodes(make_environment("tool_use"), [{"prompt": "q"}], one, tokenizer,
                        max_turns=1)
    assert t.finish == "max_turns" and t.turns == 1 and dict(t.tool_calls) == {"calculator": 1}
    cut = ScriptedSampler(tokenizer, [[CALL_12_34]], eos=False)  # no EOS: cut by length
    (t,) = run_episodes(make_environment("tool_use"), [{"prompt": "q"}], cut, tokenizer)
    assert t.finish == "truncated" and t.turns == 1


def test_single_turn_is_todays_rollout(tokenizer):
    sampler = ScriptedSampler(tokenizer, [["5"], ["7"]])
    trajs = run_episodes(make_environment("single_turn"),
                         [{"prompt": [{"role": "user", "content": "2+3?"}]}, {"prompt": "3+4?"}],
                         sampler, tokenizer)
    assert [t.final_completion for t in trajs] == ["5", "7"]
    assert all(t.turns == 1 and t.finish == "done" and all(t.loss_mask) for t in trajs)
    assert len(sampler.calls) == 1  # one batched generate call


class CountdownEnv:
    """A user environment: asks for the next number until the model says 0."""

    tool_schemas = ()

    def __init__(self, start: int = 2):
        self.start = start

    def reset(self, row):
        return [{"role": "user", "content": f"Count down from {self.start}."}]

    def step(self, messages, completion):
        if completion.strip() == "0":
            return StepResult(done=True, reward_parts={"counted": 1.0})
        return StepResult(messages=({"role": "user", "content": "next"},))


def test_environments_by_import_path_and_errors(tokenizer):
    factory = make_environment("tests.test_rl_environments:CountdownEnv", start=2)
    sampler = ScriptedSampler(tokenizer, [["2", "1", "0"]])
    (t,) = run_episodes(factory, [{"prompt": "unused"}], sampler, tokenizer)
    assert t.turns == 3 and t.reward_parts == {"counted": 1.0} and t.finish == "done"
    assert isinstance(make_environment("single_turn")(), SingleTurnEnvironment)
    assert isinstance(make_environment(ToolEnvironment)(), ToolEnvironment)
    with pytest.raises(ValueError, match="unknown environment 'maze'"):
        make_environment("maze")
    with pytest.raises(ValueError, match="bad options"):
        make_environment("self_correction", bonus=1.0)
    with pytest.raises(ValueError, match="needs a 'prompt' column"):
        SingleTurnEnvironment().reset({"question": "x"})


def test_readme_example_runs(tokenizer, capsys):
    """The README's multi-turn example, with a scripted sampler as its `generate`."""
    from pathlib import Path

    from test_readme import fenced_blocks

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in fenced_blocks(readme, ("python",)) if "run_episodes" in b]
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "123 * 456"}}</tool_call>'
    generate = ScriptedSampler(tokenizer, [[call, "The answer is 56088."]])
    namespace = {"generate": generate, "tokenizer": tokenizer}
    exec(compile(block, "README.md", "exec"), namespace)
    t = namespace["t"]
    assert t.final_completion == "The answer is 56088." and t.turns == 2
    assert t.messages[2] == {"role": "tool", "name": "calculator", "content": "56088"}
    out = capsys.readouterr().out
    assert "'tools/call_frequency': 1.0" in out and "'turns/mean': 2.0" in out


def test_sampling_generate_drives_jaxpt_sampler(tokenizer):
    """The adapter from jaxpt's sampler: a tiny random model (SmolLM2's vocabulary) answers
    the row; its tokens and log-probs are the decode loop's."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxpt.models.config import ModelConfig
    from jaxpt.models.decoder import init_model
    from jaxpt.rl.multiturn import sampling_generate
    from jaxpt.sampling import Sampler, generate, left_pad
    from jaxpt.sampling.text import stop_and_pad_ids

    cfg = ModelConfig(model_type="llama", vocab_size=len(tokenizer), hidden_size=16,
                      intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=8)
    graphdef, params = nnx.split(init_model(cfg, seed=0))
    sampler = Sampler(temperature=1.0)
    gen = sampling_generate(graphdef, params, tokenizer, sampler=sampler, max_new_tokens=3,
                            seed=7)
    (t,) = run_episodes(make_environment("single_turn"), [{"prompt": "Hi"}], gen, tokenizer)
    # the same draw made directly: sample_completions' first batch uses fold_in(key(seed), 0)
    eos_ids, pad = stop_and_pad_ids(tokenizer, None, None)
    ids, mask = left_pad([t.prompt_ids], pad)
    direct = generate(graphdef, params, ids, mask, sampler=sampler, max_new_tokens=3,
                      eos_ids=eos_ids, pad_id=pad, rng=jax.random.fold_in(jax.random.key(7), 0))
    n = int(np.asarray(direct.lengths)[0])
    assert t.completion_ids == np.asarray(direct.tokens)[0, :n].tolist()
    assert t.logprobs == np.asarray(direct.logprobs)[0, :n].tolist()
    assert t.loss_mask == [1] * n and t.turns == 1
