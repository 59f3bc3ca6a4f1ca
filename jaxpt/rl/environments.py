"""Environments: what a rollout talks to between the model's turns.

The protocol (one instance per trajectory, so an environment may keep state):

    env.reset(row) -> messages                       # the conversation the model answers
    env.step(messages, completion) -> StepResult     # after each model turn

``messages`` is the conversation so far (what ``reset`` returned plus earlier turns, the
model's as ``{"role": "assistant", "content": text}``); ``completion`` is the new turn's text.
A :class:`StepResult` either ends the trajectory (``done``) or carries the turns that follow
(tool results as ``{"role": "tool", "name", "content"}``, feedback as ``user`` turns), and
named reward parts, summed over the trajectory (``reward_parts``). An environment with tools
lists their schemas in ``tool_schemas`` so the prompt shows them. Plug one in by import path,
as a reward function: ``make_environment("mypkg.envs:Maze", size=5)``.

Built-ins: ``single_turn`` (today's rollouts: one completion, judged by the reward
functions), ``tool_use`` (runs the parsed tool calls, see :mod:`jaxpt.tools`) and
``self_correction`` (two attempts, SCoRe's setting). The driver that runs them against a
sampler, keeping tokens and loss masks, is :mod:`jaxpt.rl.multiturn`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from jaxpt.tools.functions import Tool, call_tool, load_tools
from jaxpt.tools.parsing import parse_tool_calls


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What an environment says after one model turn."""

    messages: tuple[dict, ...] = ()  # the turns that follow; ignored when done
    done: bool = False
    reward_parts: Mapping[str, float] = dataclasses.field(default_factory=dict)
    tool_calls: tuple[str, ...] = ()  # names of the tools called this turn (malformed: "")
    tool_failures: int = 0
    info: Mapping[str, float] = dataclasses.field(default_factory=dict)  # for metrics only


class Environment(Protocol):
    tool_schemas: Sequence[dict]

    def reset(self, row: Mapping[str, Any]) -> list[dict]: ...

    def step(self, messages: Sequence[dict], completion: str) -> StepResult: ...


def prompt_messages(row: Mapping[str, Any]) -> list[dict]:
    """A row's ``prompt`` as messages (a string prompt becomes one user turn)."""
    if "prompt" not in row:
        raise ValueError(f"an environment needs a 'prompt' column; the row has {sorted(row)}")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


class SingleTurnEnvironment:
    """One completion per prompt, judged by the run's reward functions: today's rollout."""

    tool_schemas: Sequence[dict] = ()

    def reset(self, row: Mapping[str, Any]) -> list[dict]:
        return prompt_messages(row)

    def step(self, messages: Sequence[dict], completion: str) -> StepResult:
        return StepResult(done=True)


class ToolEnvironment:
    """The model may call tools; each call's output (or error) comes back as a tool turn
    and the model goes on. A turn without a tool call ends the trajectory (its text is the
    answer the reward functions judge), as does a turn once ``max_tool_calls`` calls have
    been made. Calls past the limit within a turn are answered with an error, not run.

    Malformed calls count as failed calls and get an error the model can read, as in TRL."""

    def __init__(self, tools: Sequence[str | Callable | Tool] = ("calculator",),
                 max_tool_calls: int = 4, tool_timeout_s: float = 30.0,
                 max_output_chars: int = 4096):
        if max_tool_calls < 1:
            raise ValueError(f"tool_use: max_tool_calls must be >= 1, got {max_tool_calls}")
        self.tools = [t if isinstance(t, Tool) else load_tools([t])[0] for t in tools]
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool_use: two tools share a name ({names})")
        self.tool_schemas = [t.schema for t in self.tools]
        self.max_tool_calls = max_tool_calls
        self.tool_timeout_s = tool_timeout_s
        self.max_output_chars = max_output_chars
        self.calls_made = 0

    def reset(self, row: Mapping[str, Any]) -> list[dict]:
        self.calls_made = 0
        return prompt_messages(row)

    def step(self, messages: Sequence[dict], completion: str) -> StepResult:
        parsed = parse_tool_calls(completion)
        if parsed.num_calls == 0 or self.calls_made >= self.max_tool_calls:
            return StepResult(done=True)
        results: list[dict] = []
        names: list[str] = []
        failures = 0
        for call in parsed.tool_calls:
            names.append(call.name)
            if self.calls_made >= self.max_tool_calls:
                content = f"Error: the limit of {self.max_tool_calls} tool calls is reached"
                failures += 1
            else:
                outcome = call_tool(self.tools, call.name, call.arguments,
                                    timeout_s=self.tool_timeout_s,
                                    max_chars=self.max_output_chars)
                content, failures = outcome.content, failures + outcome.failed
            self.calls_made += 1
            results.append({"role": "tool", "name": call.name, "content": content})
        for error in parsed.errors:
            names.append("")
            failures += 1
            self.calls_made += 1
            results.append({"role": "tool", "name": "", "content": f"Error: {error}"})
        return StepResult(messages=tuple(results), tool_calls=tuple(names),
                          tool_failures=failures)


CHECK_PROMPT = (
    "There might be an error in your answer above. Check it carefully and correct it if "
    "needed, then state your final answer."
)


class SelfCorrectionEnvironment:
    """Two attempts: the model answers, is asked to check its answer and correct it if
    needed (a fixed turn, ``check_prompt``), and answers again. The reward is on the final
    answer, with SCoRe's shaping as two optional terms (Kumar et al. 2024, "Training
    Language Models to Self-Correct via Reinforcement Learning", stage II:
    ``r(y2) + alpha * (r(y2) - r(y1))``, which for right/wrong rewards is a bonus of alpha
    for wrong -> right and a penalty of alpha for right -> wrong). Reward parts:

    - ``final_answer``: the verifier's score of the second attempt,
    - ``correction_bonus``: ``+correction_bonus`` when the first attempt was wrong and the
      second right, else 0,
    - ``regression_penalty``: ``-regression_penalty`` when the first was right and the
      second wrong, else 0.

    "Right" is a verifier score >= ``correct_threshold``. The verifier is any reward
    function spec (default ``math_strict``: the stated answer vs the row's ``answer``); it
    is called with the row's columns, as the run's reward functions are.
    """

    tool_schemas: Sequence[dict] = ()

    def __init__(self, verifier: str | Callable = "math_strict", check_prompt: str = CHECK_PROMPT,
                 correction_bonus: float = 0.0, regression_penalty: float = 0.0,
                 correct_threshold: float = 1.0):
        from jaxpt.rewards.registry import get_reward_function

        if correction_bonus < 0 or regression_penalty < 0:
            raise ValueError("self_correction: correction_bonus and regression_penalty are "
                             "magnitudes (>= 0); the penalty is subtracted")
        self.verifier = get_reward_function(verifier)
        self.check_prompt = check_prompt
        self.correction_bonus = float(correction_bonus)
        self.regression_penalty = float(regression_penalty)
        self.correct_threshold = float(correct_threshold)
        self.row: Mapping[str, Any] = {}
        self.first_score: float | None = None

    def reset(self, row: Mapping[str, Any]) -> list[dict]:
        self.row, self.first_score = row, None
        return prompt_messages(row)

    def score(self, messages: Sequence[dict], completion: str) -> float:
        columns = {k: [v] for k, v in self.row.items() if k != "prompt"}
        (value,) = self.verifier(prompts=[list(messages)], completions=[completion],
                                 completion_ids=[[]], **columns)
        return 0.0 if value is None else float(value)

    def step(self, messages: Sequence[dict], completion: str) -> StepResult:
        if self.first_score is None:
            self.first_score = self.score(messages, completion)
            return StepResult(messages=({"role": "user", "content": self.check_prompt},),
                              info={"first_attempt": self.first_score})
        second = self.score(messages, completion)
        first_right = self.first_score >= self.correct_threshold
        second_right = second >= self.correct_threshold
        parts = {
            "final_answer": second,
            "correction_bonus": self.correction_bonus if second_right and not first_right else 0.0,
            "regression_penalty": -self.regression_penalty if first_right and not second_right
            else 0.0,
        }
        return StepResult(done=True, reward_parts=parts,
                          info={"first_attempt": self.first_score, "second_attempt": second})


BUILTIN_ENVIRONMENTS: dict[str, Callable[..., Environment]] = {
    "single_turn": SingleTurnEnvironment,
    "tool_use": ToolEnvironment,
    "self_correction": SelfCorrectionEnvironment,
}


def make_environment(spec: str | Callable[..., Environment], **options: Any
                     ) -> Callable[[], Environment]:
    """A factory of fresh environments (one per trajectory) from a built-in name, a
    ``package.module:Class`` path (anything callable that returns an environment) or a
    callable, with `options` as keyword arguments. Bad options fail here, not mid-rollout."""
    from jaxpt.rewards.registry import import_object

    if callable(spec):
        cls = spec
    elif spec in BUILTIN_ENVIRONMENTS:
        cls = BUILTIN_ENVIRONMENTS[spec]
    elif isinstance(spec, str) and ":" in spec:
        cls = import_object(spec, what="environment")
    else:
        raise ValueError(f"unknown environment {spec!r}: not a built-in "
                         f"({', '.join(BUILTIN_ENVIRONMENTS)}) and not 'package.module:Class'")
    try:
        probe = cls(**options)
    except TypeError as e:
        raise ValueError(f"environment {spec!r}: bad options {sorted(options)}: {e}") from e
    for method in ("reset", "step"):
        if not callable(getattr(probe, method, None)):
            raise ValueError(f"environment {spec!r} has no {method}() method")
    return lambda: cls(**options)
