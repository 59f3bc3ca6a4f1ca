"""Tool calls in model text, and tool results rendered back as chat turns.

The call format is Hermes / Qwen's: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
in the assistant's text (any number of them, whitespace around the JSON allowed, arguments
also accepted as a JSON-encoded string). It is what Qwen2.5 / Qwen3 chat templates render and
teach, and what transformers' Hermes-style templates use.

Two ways to render a conversation with tools (:class:`ToolChat`):

- **native**: the chat template knows tools (it reads a ``tools`` variable, as Qwen's do).
  The tool schemas go in as ``tools=``, the assistant turn as ``{"role": "assistant",
  "content": ..., "tool_calls": [...]}``, results as ``{"role": "tool", "name", "content"}``
  messages, and the template writes them (Qwen: a ``user`` turn of ``<tool_response>``
  blocks).
- **fallback**, for templates without tool support, such as SmolLM2-135M-Instruct's (its
  template, read from the GGUF the tests load, renders only ``role`` and ``content`` and
  never mentions tools; its tokenizer has no tool-call tokens). jaxpt then writes the
  Hermes convention itself: the tool list and the call format go in a system message
  (:func:`fallback_system_prompt`), the model's call stays in the assistant text as sampled,
  and the results come back as one ``user`` turn holding a ``<tool_response>`` block per call
  (the role the model knows, wrapped as Qwen's template wraps them).

Token in / token out: after a completion, :meth:`ToolChat.continuation_text` gives the text to
append after the *sampled* tokens (the rest of the assistant turn's end, the tool / feedback
turns, the next generation prompt), computed as the difference of two renders, so the history
is never re-tokenized. transformers' response parsers (``tokenizer.parse_response``) need a
``response_schema`` in the tokenizer, which neither SmolLM2's GGUF nor a plain ChatML
template string has; hence this small parser.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

from jaxpt.data.chat import render_chat
from jaxpt.data.formats import ChatTemplateError

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL_RE = re.compile(
    re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def as_message_entry(self) -> dict:
        """The entry of an assistant message's ``tool_calls`` (transformers' format)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class ParsedCompletion:
    """A completion split into its text, its well-formed calls and its malformed ones."""

    content: str  # the text outside the <tool_call> blocks, stripped
    tool_calls: tuple[ToolCall, ...]
    errors: tuple[str, ...]  # one message per malformed call, for the model to read

    @property
    def num_calls(self) -> int:
        return len(self.tool_calls) + len(self.errors)


def _parse_call(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"the tool call is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError('a tool call is a JSON object {"name": ..., "arguments": {...}}')
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise ValueError(f"the arguments of {obj['name']} are not a JSON object") from None
    if not isinstance(args, dict):
        raise ValueError(f"the arguments of {obj['name']} are not a JSON object")
    return ToolCall(obj["name"], args)


def parse_tool_calls(text: str) -> ParsedCompletion:
    """Find the ``<tool_call>...</tool_call>`` blocks of `text` (special tokens removed). An
    opening tag without its closing tag (a completion cut by the length limit) counts as a
    malformed call."""
    calls, errors = [], []
    for m in _TOOL_CALL_RE.finditer(text):
        try:
            calls.append(_parse_call(m.group(1).strip()))
        except ValueError as e:
            errors.append(str(e))
    rest = _TOOL_CALL_RE.sub("", text)
    if TOOL_CALL_OPEN in rest:
        errors.append(f"a {TOOL_CALL_OPEN} without its {TOOL_CALL_CLOSE}")
        rest = rest[: rest.index(TOOL_CALL_OPEN)]
    return ParsedCompletion(rest.strip(), tuple(calls), tuple(errors))


def template_supports_tools(template: str | None) -> bool:
    """Whether a chat template renders tools itself (it reads a ``tools`` variable)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def fallback_system_prompt(tool_schemas: Sequence[dict]) -> str:
    """The system text that shows a template-less model its tools and the call format."""
    lines = "\n".join(json.dumps(s, ensure_ascii=False) for s in tool_schemas)
    return (
        "You may call these tools, each described by a JSON schema:\n"
        f"<tools>\n{lines}\n</tools>\n"
        "To call a tool, write\n"
        f'{TOOL_CALL_OPEN}\n{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}\n'
        f"{TOOL_CALL_CLOSE}\n"
        "and stop; its result comes back in <tool_response></tool_response>. "
        "When you know the answer, write it without a tool call."
    )


_SENTINEL = "\u2063jaxpt-end-of-content\u2063"


@dataclasses.dataclass
class ToolChat:
    """Renders a conversation with tools through a tokenizer's chat template.

    `chat_template_kwargs` go to every ``apply_chat_template`` call (``chat_template=`` to
    use another template than the tokenizer's). `native` is detected from the template
    unless given."""

    tokenizer: Any
    tool_schemas: Sequence[dict] = ()
    chat_template_kwargs: dict | None = None
    native: bool | None = None

    def __post_init__(self):
        if self.native is None:
            template = (self.chat_template_kwargs or {}).get("chat_template") or getattr(
                self.tokenizer, "chat_template", None)
            self.native = template_supports_tools(template)

    # -- messages

    def prompt_messages(self, messages: Sequence[dict]) -> list[dict]:
        """The conversation as it is rendered: in fallback mode with the tools in the
        system message (appended to the row's own system message, if any)."""
        messages = list(messages)
        if self.native or not self.tool_schemas:
            return messages
        tools_text = fallback_system_prompt(self.tool_schemas)
        if messages and messages[0].get("role") == "system":
            first = {**messages[0], "content": f"{messages[0]['content']}\n\n{tools_text}"}
            return [first, *messages[1:]]
        return [{"role": "system", "content": tools_text}, *messages]

    def assistant_message(self, completion: str) -> dict:
        """The assistant turn of a sampled completion (text without special tokens)."""
        if not self.native:
            return {"role": "assistant", "content": completion}
        parsed = parse_tool_calls(completion)
        msg: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if parsed.tool_calls:
            msg["tool_calls"] = [c.as_message_entry() for c in parsed.tool_calls]
        return msg

    def tool_result_messages(self, results: Sequence[tuple[str, str]]) -> list[dict]:
        """Messages carrying ``(tool name, output)`` results, in call order."""
        return self.template_messages(
            [{"role": "tool", "name": name, "content": out} for name, out in results])

    def template_messages(self, messages: Sequence[dict]) -> list[dict]:
        """Environment turns (tool results as ``role: tool`` messages) in the form the
        template renders: as they are when native; in fallback mode each run of
        consecutive tool messages becomes one ``user`` turn of ``<tool_response>`` blocks."""
        if self.native:
            return list(messages)
        out: list[dict] = []
        run: list[str] = []
        for m in [*messages, None]:
            if m is not None and m.get("role") == "tool":
                run.append(f"<tool_response>\n{m['content']}\n</tool_response>")
                continue
            if run:
                out.append({"role": "user", "content": "\n".join(run)})
                run = []
            if m is not None:
                out.append(dict(m))
        return out

    # -- text

    def _kwargs(self) -> dict:
        kw = dict(self.chat_template_kwargs or {})
        if self.native and self.tool_schemas:
            kw["tools"] = list(self.tool_schemas)
        return kw

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool) -> str:
        """`messages` (already through :meth:`prompt_messages`) as template text."""
        return render_chat(self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                           chat_template_kwargs=self._kwargs())

    def prompt_text(self, messages: Sequence[dict]) -> str:
        return self.render(self.prompt_messages(messages), add_generation_prompt=True)

    def continuation_text(self, history: Sequence[dict], assistant: dict,
                          new_messages: Sequence[dict], *, stop_text: str | None) -> str:
        """Text that follows a sampled assistant turn: what the template closes the turn
        with (less its part up to and including `stop_text`, the stop token the model
        sampled, when the close contains it: SmolLM2 and Qwen sample ``<|im_end|>``), then
        `new_messages` and the next generation prompt.

        `history` is the conversation before the turn (through :meth:`prompt_messages`).
        The turn's close is read from a render with a marker as the content; the new turns
        are ``render(history + [assistant] + new, gen)`` less ``render(history +
        [assistant])``, which must be a prefix of it (a template that rewrites earlier
        turns when later ones arrive is an error here: the trajectory is kept as sampled).
        """
        history = list(history)
        before = self.render([*history, assistant], add_generation_prompt=False)
        after = self.render([*history, assistant, *new_messages], add_generation_prompt=True)
        if not after.startswith(before):
            i = next((k for k, (a, b) in enumerate(zip(after, before, strict=False)) if a != b),
                     min(len(after), len(before)))
            raise ChatTemplateError(
                "the chat template renders the earlier turns differently once new turns "
                f"follow (first difference at char {i}: {before[i:i + 40]!r} vs "
                f"{after[i:i + 40]!r}); multi-turn rollouts need append-only rendering")
        marked = self.render([*history, {"role": "assistant", "content": _SENTINEL}],
                             add_generation_prompt=False)
        close = marked[marked.rindex(_SENTINEL) + len(_SENTINEL):]
        if stop_text and stop_text in close:
            close = close.partition(stop_text)[2]
        return close + after[len(before):]
