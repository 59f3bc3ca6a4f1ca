"""Tool-call demonstrations for arithmetic problems: the SFT warm-up of the tool-use demo.

A small model does not call a tool it has only read about (SmolLM2-135M-Instruct, shown the
calculator in its system turn, never calls it: ``jaxpt/tools/parsing.py``). A short SFT on
conversations where the assistant calls the calculator, reads the result and states the
answer teaches the call format; RL then improves when and how it calls.

:func:`calculator_conversation` builds one such conversation *as the rollout renders it*
(``jaxpt.tools.parsing.ToolChat``: the tool list in the system turn or the template's own
tool support, the call in the assistant text, the result as the template's tool turn), so
the warm-up trains exactly the text a multi-turn GRPO rollout will produce and read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jaxpt.data.gsm8k import convert_gsm8k
from jaxpt.tools.functions import calculator
from jaxpt.tools.parsing import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolChat

_SYMBOLS = {" x ": " * ", " : ": " / "}  # the plain problems' operators -> Python's


def plain_expression(question: str) -> str:
    """The expression of a plain arithmetic problem ("Calculate (3 + 4) x 2." ->
    "(3 + 4) * 2")."""
    text = question.strip()
    if not text.startswith("Calculate ") or not text.endswith("."):
        raise ValueError(f"not a plain arithmetic problem: {question!r}")
    text = text[len("Calculate "):-1]
    for plain, python in _SYMBOLS.items():
        text = text.replace(plain, python)
    return text


def calculator_conversation(prompt: Sequence[dict], expression: str, *, chat: ToolChat,
                            answer_format: str = "The answer is {0}.") -> list[dict]:
    """The messages of one demonstration: the prompt (through ``chat.prompt_messages``),
    the assistant's calculator call, the tool's result as the template renders it, and the
    answer (``answer_format`` of the result)."""
    result = calculator(expression)
    call = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
    return [
        *chat.prompt_messages(prompt),
        chat.assistant_message(f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"),
        *chat.tool_result_messages([("calculator", result)]),
        {"role": "assistant", "content": answer_format.format(result)},
    ]


def calculator_sft_rows(records: Sequence[Any], tokenizer, tool_schemas,
                        *, instruction: str | None) -> list[dict]:
    """SFT rows (``{"messages": [...]}``) of plain arithmetic records (``question``,
    ``answer`` ending in ``#### N``), each a calculator demonstration whose answer is
    checked against the record's."""
    chat = ToolChat(tokenizer, list(tool_schemas))
    prompts = convert_gsm8k(records, mode="prompt", instruction=instruction)
    rows = []
    for rec, p in zip(records, prompts, strict=True):
        expression = plain_expression(rec.data["question"])
        expected = rec.data["answer"].rsplit("####", 1)[1].strip()
        if calculator(expression) != expected:
            raise ValueError(f"calculator({expression!r}) = {calculator(expression)}, the "
                             f"problem's answer is {expected}")
        rows.append({"messages": calculator_conversation(p.data["prompt"], expression,
                                                         chat=chat)})
    return rows
