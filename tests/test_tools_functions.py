"""Functions as tools: schemas equal transformers' get_json_schema, the calculator, call_tool."""

from __future__ import annotations

import enum
import time
from typing import Any, Literal

import pytest

from jaxpt.tools.functions import (
    Tool,
    ToolSchemaError,
    calculator,
    call_tool,
    function_schema,
    load_tools,
    make_python_tool,
)


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


def search(query: str, top_k: int = 5, lang: str | None = None, tags: list[str] | None = None,
           mode: Literal["fast", "exact"] = "fast", weights: dict[str, float] | None = None,
           color: Color = Color.RED, extra: Any = None, pair: tuple[int, str] = (1, "a"),
           scale: int | float = 1, unit: str = "c") -> list[dict]:
    """Search the index for documents
    matching a query.

    Args:
        query: The text to look for. It can
            span two lines.
        top_k (int): How many results to return.
        lang: A language code, or None for all.
        tags: Tags every result must carry.
        mode: How to match.
        weights: Per-field weights.
        color: A color.
        extra: Anything.
        pair: A pair.
        scale: A number.
        unit: The unit (choices: ["c", "f"])

    Returns:
        The matching documents, best
        first.

    Raises:
        ValueError: never.
    """
    return []


def multiply(a: float, b: float):
    """Multiply two numbers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


@pytest.mark.parametrize("fn", [search, multiply, calculator, make_python_tool()])
def test_schema_equals_transformers_get_json_schema(fn):
    from transformers.utils import get_json_schema

    assert function_schema(fn) == get_json_schema(fn)


def test_schema_written_out_for_multiply():
    assert function_schema(multiply) == {
        "type": "function",
        "function": {
            "name": "multiply",
            "description": "Multiply two numbers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "number", "description": "The first factor."},
                    "b": {"type": "number", "description": "The second factor."},
                },
                "required": ["a", "b"],
            },
        },
    }


def test_schema_errors_name_the_function_and_argument():
    def no_doc(x: int):
        return x

    def no_hint(x):
        """Doc.

        Args:
            x: A value.
        """

    def no_arg_doc(x: int, y: int):
        """Doc.

        Args:
            x: A value.
        """

    with pytest.raises(ToolSchemaError, match="no_doc: a tool needs a docstring"):
        function_schema(no_doc)
    with pytest.raises(ToolSchemaError, match="no_hint: argument 'x' has no type hint"):
        function_schema(no_hint)
    with pytest.raises(ToolSchemaError, match="no_arg_doc: argument 'y' has no description"):
        function_schema(no_arg_doc)


@pytest.mark.parametrize("expression, expected", [
    ("123 * 456 + 7", "56095"),
    ("7 / 2", "3.5"),
    ("6 / 3", "2"),
    ("(1 + 2) * -3", "-9"),
    ("2 ^ 10", "1024"),
    ("17 // 5 + 17 % 5", "5"),
    ("sqrt(16) + abs(-2)", "6"),
    ("0.1 + 0.2", "0.3"),
    ("round(2 * pi, 2)", "6.28"),
])
def test_calculator(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('true')", "unsupported expression element"),
    ("open('x')", "unsupported expression element"),
    ("(1).__class__", "unsupported expression element: Attribute"),
    ("9 ** 9 ** 9", "more than 1000 digits"),
    ("1 / 0", "division by zero"),
    ("x + 1", "name 'x'"),
    ("2 +", "not an arithmetic expression"),
])
def test_calculator_refuses_what_is_not_arithmetic(expression, message):
    with pytest.raises(ValueError, match=message):
        calculator(expression)


def test_call_tool_turns_every_failure_into_an_error_message():
    def slow(seconds: float) -> str:
        """Sleep.

        Args:
            seconds: How long.
        """
        time.sleep(seconds)
        return "woke"

    tools = [*load_tools(["calculator"]), Tool.from_function(slow)]
    ok = call_tool(tools, "calculator", {"expression": "6 * 7"})
    assert ok.content == "42" and not ok.failed
    outcomes = {
        "unknown": call_tool(tools, "search_web", {"q": "x"}),
        "not a dict": call_tool(tools, "calculator", ["6 * 7"]),
        "bad keyword": call_tool(tools, "calculator", {"expr": "6 * 7"}),
        "missing": call_tool(tools, "calculator", {}),
        "raises": call_tool(tools, "calculator", {"expression": "1/0"}),
        "timeout": call_tool(tools, "slow", {"seconds": 2.0}, timeout_s=0.05),
    }
    assert all(o.failed and o.content.startswith("Error: ") for o in outcomes.values()), outcomes
    assert "unknown tool 'search_web' (tools: calculator, slow)" in outcomes["unknown"].content
    assert outcomes["bad keyword"].content == (
        "Error: bad arguments for calculator: unexpected ['expr'] (arguments: ['expression'])")
    assert "missing a required argument: 'expression'" in outcomes["missing"].content
    assert outcomes["raises"].content == "Error: ValueError: division by zero"
    assert "timed out after 0.05 s" in outcomes["timeout"].content


def scaled(x: int, scale: int = 2) -> int:
    """Scale a number.

    Args:
        x: The number.
        scale: The factor.
    """
    return x * scale


def test_options_of_a_tool_are_bound_and_left_out_of_its_schema():
    (tool,) = load_tools(["tests.test_tools_functions:scaled(scale=3)"])
    assert tool.name == "scaled"
    assert tool.schema["function"]["parameters"] == {
        "type": "object",
        "properties": {"x": {"type": "integer", "description": "The number."}},
        "required": ["x"],
    }
    assert call_tool([tool], "scaled", {"x": 2}).content == "6"
    assert call_tool([tool], "scaled", {"x": 2, "scale": 5}).failed  # bound: not the model's


def test_load_tools_by_import_path_and_with_options():
    tools = load_tools(["tests.test_tools_functions:multiply", "python(timeout_s=5, cpu_s=2)"])
    assert [t.name for t in tools] == ["multiply", "python"]
    assert call_tool(tools, "multiply", {"a": 6, "b": 7}).content == "42"
    out = call_tool(tools, "python", {"code": "print(6 * 7)"})
    assert out.content == "42\n" and not out.failed
    bad = call_tool(tools, "python", {"code": "raise SystemExit(3)"})
    assert bad.failed and bad.content.startswith("Error: exit status 3")
    with pytest.raises(ValueError, match="two tools share a name"):
        load_tools(["calculator", "calculator"])
    with pytest.raises(ValueError, match="cannot import module"):
        load_tools(["no_such_package.tools:fn"])
