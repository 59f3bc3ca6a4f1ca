"""Calculator demonstrations for the tool-use warm-up (``jaxpt.data.tasks.tool_demos``)."""

from __future__ import annotations

import pytest

from jaxpt.data.formats import records_from_rows
from jaxpt.data.tasks.arithmetic import ArithmeticConfig, arithmetic_records
from jaxpt.data.tasks.tool_demos import calculator_sft_rows, plain_expression
from jaxpt.tools.functions import load_tools
from jaxpt.tools.parsing import ToolChat, parse_tool_calls


def test_plain_expression_by_hand():
    assert plain_expression("Calculate (3 + 4) x 2.") == "(3 + 4) * 2"
    assert plain_expression("Calculate 42 x 9 - 156.") == "42 * 9 - 156"
    assert plain_expression("Calculate 81 : 9 + 1.") == "81 / 9 + 1"
    with pytest.raises(ValueError, match="not a plain arithmetic problem"):
        plain_expression("Ava has 3 apples.")


def test_demonstrations_render_as_the_rollout_does(smollm2_tokenizer):
    """The demonstration's text is what a multi-turn rollout with the calculator renders:
    the prompt as ToolChat opens it, a call the parser reads back, the result as a tool
    turn, and an answer the problem's own answer agrees with."""
    tools = load_tools(["calculator"])
    cfg = ArithmeticConfig(min_operands=3, max_operands=3, max_digits=3, ops="+-*",
                           style="plain")
    records = arithmetic_records(cfg, 8, split="train", seed=0, source="t")
    rows = calculator_sft_rows(records, smollm2_tokenizer, [t.schema for t in tools],
                               instruction="Use the calculator.")
    chat = ToolChat(smollm2_tokenizer, [t.schema for t in tools])
    assert not chat.native  # SmolLM2's template has no tool support: the fallback format
    for rec, row in zip(records, rows, strict=True):
        system, user, call, result, answer = row["messages"]
        question = rec.data["question"]
        assert chat.prompt_messages([user]) == [system, user]
        assert user["content"] == f"{question}\n\nUse the calculator."
        (parsed,) = parse_tool_calls(call["content"]).tool_calls
        assert parsed.name == "calculator"
        assert parsed.arguments == {"expression": plain_expression(question)}
        expected = rec.data["answer"].rsplit("####", 1)[1].strip()
        assert result == {"role": "user",
                          "content": f"<tool_response>\n{expected}\n</tool_response>"}
        assert answer == {"role": "assistant", "content": f"The answer is {expected}."}


def test_a_demonstration_the_calculator_disagrees_with_is_refused(smollm2_tokenizer):
    bad = records_from_rows([{"question": "Calculate 2 + 2.", "answer": "#### 5"}])
    with pytest.raises(ValueError, match="the problem's answer is 5"):
        calculator_sft_rows(bad, smollm2_tokenizer, [], instruction=None)
