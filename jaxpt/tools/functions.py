"""Plain Python functions as tools: their JSON schema, the built-ins, calling them safely.

``function_schema(fn)`` builds the OpenAI-style schema (``{"type": "function", "function":
{"name", "description", "parameters"}}``) from the signature's type hints and a Google-style
docstring, with the output of transformers' ``transformers.utils.get_json_schema``
(tests/test_tools_functions.py compares the two). jaxpt keeps its own copy of the rule because
the schema is rendered into every prompt the policy is trained on: a transformers upgrade that
changes it (the handling of unions, enums and returns moved between 4.x and 5.x) would change
the trained prompts silently; here it changes only with a jaxpt commit and a failing test.

Supported hints: ``int float str bool None Any``, ``list[X] tuple[X, ...] dict[str, X]``,
unions / ``Optional`` (``nullable``), ``Literal`` and ``Enum`` (``enum``); a trailing
``(choices: [...])`` in an argument's description becomes its ``enum`` as well.

Built-in tools: ``calculator`` (arithmetic parsed with ``ast``, never ``eval``) and ``python``
(runs code in :mod:`jaxpt.tools.sandbox`). ``load_tools(["calculator", "pkg.mod:fn"])``
resolves names and import paths like reward functions do (``"python(timeout_s=5)"`` sets
options). ``call_tool`` turns every failure (unknown tool, bad arguments, an exception, a
timeout) into an error string for the model, as TRL does, and says that it failed.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import enum
import functools
import inspect
import json
import math
import operator
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from jaxpt.tools.sandbox import SandboxLimits, run_python


class ToolSchemaError(ValueError):
    """A function cannot be described as a tool (no docstring, an argument without a type
    hint or description, a type hint JSON cannot express)."""


# ----------------------------------------------------------------------------- schema

_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
_CONTAINERS = {list: "array", tuple: "array", dict: "object"}
_SECTION = r"(?:Args|Returns|Raises):"


def _enum_schema(values: list, where: str) -> dict:
    if not values or any(type(v) not in _SCALARS for v in values):
        raise ToolSchemaError(f"{where}: enum values must be JSON scalars, got {values!r}")
    kinds = list(dict.fromkeys(_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _hint_schema(hint: Any, where: str) -> dict:
    """The JSON schema of one type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None:
        if hint is Any:
            return {}
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return _enum_schema([m.value for m in hint], where)
        if hint in _SCALARS:
            return {"type": _SCALARS[hint]}
        if hint in _CONTAINERS:
            return {"type": _CONTAINERS[hint]}
        raise ToolSchemaError(f"{where}: no JSON schema for the type hint {hint!r}")
    if origin in (typing.Union, types.UnionType):
        parts = [_hint_schema(a, where) for a in args if a is not type(None)]
        if len(parts) == 1:
            out = parts[0]
        elif all(p.keys() == {"type"} and isinstance(p["type"], str) for p in parts):
            names = sorted({p["type"] for p in parts})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": parts}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is typing.Literal:
        return _enum_schema(list(args), where)
    if origin is list:
        return {"type": "array", "items": _hint_schema(args[0], where)} if args else {
            "type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1 or ... in args:
            raise ToolSchemaError(f"{where}: use list[X] for {hint!r}")
        return {"type": "array", "prefixItems": [_hint_schema(a, where) for a in args]}
    if origin is dict:
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = _hint_schema(args[1], where)
        return out
    raise ToolSchemaError(f"{where}: no JSON schema for the type hint {hint!r}")


def parse_docstring(doc: str) -> tuple[str, dict[str, str], str | None]:
    """A Google-style docstring -> (description, {argument: description}, returns)."""
    doc = inspect.cleandoc(doc)
    description = re.split(rf"\s*^\s*{_SECTION}", doc, maxsplit=1, flags=re.M)[0].strip()
    sections: dict[str, list[str]] = {}
    current = None
    for line in doc.splitlines():
        m = re.match(rf"^\s*({_SECTION})\s*$", line)
        if m:
            current = sections.setdefault(m.group(1)[:-1], [])
        elif current is not None:
            current.append(line)
    args: dict[str, str] = {}
    arg_lines = [ln for ln in sections.get("Args", []) if ln.strip()]
    if arg_lines:
        indent = len(arg_lines[0]) - len(arg_lines[0].lstrip())
        name = None
        for line in arg_lines:
            here = len(line) - len(line.lstrip())
            m = re.match(r"^\s*(\w+)\s*(?:\([^()\n]*\))?\s*:\s*(.*)$", line)
            if m and here <= indent:  # "name: text" or "name (type): text"
                name = m.group(1)
                args[name] = m.group(2).strip()
            elif name is not None:  # a continuation line
                args[name] = f"{args[name]} {line.strip()}".strip()
    # the Returns block as written (line breaks kept), as transformers keeps it
    returns = "\n".join(sections.get("Returns", [])).strip() or None
    return description, args, returns


def function_schema(fn: Callable) -> dict:
    """The tool schema of `fn` (see the module docstring). For a ``functools.partial``
    (a tool with options), the function's, less the arguments the partial binds."""
    base, bound = (fn.func, set(fn.keywords)) if isinstance(fn, functools.partial) else (fn, set())
    name = getattr(base, "__name__", "operation")
    doc = inspect.getdoc(base)
    if not doc:
        raise ToolSchemaError(f"tool {name}: a tool needs a docstring describing it")
    description, arg_docs, returns_doc = parse_docstring(doc)
    hints = typing.get_type_hints(base)
    params = [p for p in inspect.signature(fn, follow_wrapped=False).parameters.values()
              if p.name not in bound]
    if params and params[0].name in ("self", "cls") and params[0].annotation is params[0].empty:
        params = params[1:]
    properties, required = {}, []
    for p in params:
        if p.name not in hints:
            raise ToolSchemaError(f"tool {name}: argument {p.name!r} has no type hint")
        if p.name not in arg_docs:
            raise ToolSchemaError(
                f"tool {name}: argument {p.name!r} has no description in the docstring's Args:")
        schema = _hint_schema(hints[p.name], f"tool {name}, argument {p.name!r}")
        text = arg_docs[p.name]
        choices = re.search(r"\(choices:\s*(.*?)\)\s*$", text, flags=re.I)
        if choices:
            schema["enum"] = [c.strip() if isinstance(c, str) else c
                              for c in json.loads(choices.group(1))]
            text = text[: choices.start()].strip()
        schema["description"] = text
        properties[p.name] = schema
        if p.default is p.empty:
            required.append(p.name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    out: dict[str, Any] = {"name": name, "description": description, "parameters": parameters}
    if "return" in hints:
        try:
            ret = _hint_schema(hints["return"], f"tool {name}, return")
        except ToolSchemaError:  # the model never writes the return value: leave it out
            ret = None
        if ret is not None:
            if returns_doc is not None:
                ret["description"] = returns_doc
            out["return"] = ret
    return {"type": "function", "function": out}


# ----------------------------------------------------------------------------- built-ins

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max,
              "floor": math.floor, "ceil": math.ceil, "log": math.log, "exp": math.exp,
              "sin": math.sin, "cos": math.cos, "tan": math.tan}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_MAX_DIGITS = 1000  # integers past this many digits are refused (10**10**10 would hang)


def _check_size(x: int | float) -> int | float:
    if isinstance(x, int) and x.bit_length() > _MAX_DIGITS * 3.33:
        raise ValueError(f"result has more than {_MAX_DIGITS} digits")
    return x


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 1 and (
                math.log2(abs(left) + 2) * abs(right) > _MAX_DIGITS * 3.33):
            raise ValueError(f"result has more than {_MAX_DIGITS} digits")
        return _check_size(_BINARY[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS and not node.keywords):
        return _check_size(_FUNCTIONS[node.func.id](*[_evaluate(a) for a in node.args]))
    what = type(node).__name__ if not isinstance(node, ast.Name) else f"name {node.id!r}"
    raise ValueError(f"unsupported expression element: {what}")


def format_number(x: int | float) -> str:
    """Integers as integers (2.0 -> "2"), other floats with 12 significant digits."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return str(x) if isinstance(x, int) else f"{x:.12g}"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result.

    Args:
        expression: The expression, e.g. "123 * 456 + 7". Supports + - * / // % ** and
            parentheses, the functions sqrt, abs, round, min, max, floor, ceil, log, exp,
            sin, cos, tan and the constants pi and e.
    """
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*"), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expression!r} ({e.msg})") from None
    try:
        return format_number(_evaluate(tree))
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except OverflowError:
        raise ValueError("result too large") from None


def make_python_tool(**limits: Any) -> Callable[[str], str]:
    """The ``python`` tool with these :class:`SandboxLimits` (defaults otherwise)."""
    sandbox_limits = SandboxLimits(**limits)

    def python(code: str) -> str:
        """Run a Python program in a sandbox and return what it prints.

        Args:
            code: The complete program. Only the standard library is guaranteed; there is
                no network, and files can be written only in the current directory.
        """
        return run_python(code, sandbox_limits).as_tool_output()

    return python


# ----------------------------------------------------------------------------- tool sets

BUILTIN_TOOLS: dict[str, Callable[..., Callable]] = {
    "calculator": lambda: calculator,
    "python": make_python_tool,
}


@dataclasses.dataclass(frozen=True)
class Tool:
    """A callable the model may call, under the name and schema it is shown."""

    name: str
    fn: Callable[..., Any]
    schema: dict

    @classmethod
    def from_function(cls, fn: Callable) -> Tool:
        schema = function_schema(fn)
        return cls(schema["function"]["name"], fn, schema)


def load_tools(specs: Sequence[str | Callable]) -> list[Tool]:
    """Tools from built-in names (``calculator``, ``python``, with options as
    ``"python(timeout_s=5)"``), ``package.module:function`` paths or functions."""
    from jaxpt.rewards.registry import import_object, parse_reward_spec

    tools: list[Tool] = []
    for spec in specs:
        if callable(spec):
            tools.append(Tool.from_function(spec))
            continue
        name, options = parse_reward_spec(spec)
        if name in BUILTIN_TOOLS:
            fn = BUILTIN_TOOLS[name](**options)
        else:
            fn = import_object(name, what="tool")
            if options:
                fn = functools.partial(fn, **options)
        tools.append(Tool.from_function(fn))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"tools {list(specs)}: two tools share a name ({names})")
    return tools


@dataclasses.dataclass(frozen=True)
class ToolOutcome:
    """One call's result: the text the model sees, and whether the call failed."""

    name: str
    content: str
    failed: bool


def _error_text(message: str) -> str:
    return f"Error: {message}"


def call_tool(tools: Sequence[Tool], name: str, arguments: Any,
              timeout_s: float | None = 30.0, max_chars: int = 16384) -> ToolOutcome:
    """Call the tool `name` with `arguments` (a dict of keyword arguments). Never raises:
    an unknown name, arguments that do not fit, an exception or a timeout is an error
    message the model reads on its next turn. A tool that returns a text starting with
    "Error:" (the sandbox's failures) counts as failed too. Output is cut to `max_chars`.

    A timed-out function keeps running in its worker thread (Python cannot stop a thread);
    the ``python`` tool stops its own process, so give untrusted code to it.
    """
    tool = next((t for t in tools if t.name == name), None)
    if tool is None:
        known = ", ".join(t.name for t in tools) or "none"
        return ToolOutcome(name, _error_text(f"unknown tool {name!r} (tools: {known})"), True)
    if not isinstance(arguments, dict):
        return ToolOutcome(name, _error_text(
            f"arguments of {name} must be a JSON object, got {type(arguments).__name__}"), True)
    shown = tool.schema["function"]["parameters"]["properties"]
    unexpected = sorted(set(arguments) - set(shown))
    if unexpected:  # includes options bound by the run: those are not the model's to set
        return ToolOutcome(name, _error_text(
            f"bad arguments for {name}: unexpected {unexpected} (arguments: {sorted(shown)})"),
            True)
    try:
        inspect.signature(tool.fn).bind(**arguments)
    except TypeError as e:
        return ToolOutcome(name, _error_text(f"bad arguments for {name}: {e}"), True)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        result = pool.submit(tool.fn, **arguments).result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        return ToolOutcome(name, _error_text(f"{name} timed out after {timeout_s:g} s"), True)
    except Exception as e:  # the model's call failed; it reads why
        return ToolOutcome(name, _error_text(f"{type(e).__name__}: {e}"), True)
    finally:
        pool.shutdown(wait=False)
    text = result if isinstance(result, str) else json.dumps(result, default=str)
    if len(text) > max_chars:
        text = text[:max_chars] + f"\n[output truncated to {max_chars} characters]"
    return ToolOutcome(name, text, text.startswith("Error:"))
