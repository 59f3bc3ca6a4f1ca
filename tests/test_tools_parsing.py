"""Tool-call parsing, and tool results rendered on SmolLM2's template (fallback) and on a
Qwen-style ChatML template with tool support (native)."""

from __future__ import annotations

import pytest

from jaxpt.data.tokenize import ChatTemplateError
from jaxpt.tools.functions import calculator, function_schema
from jaxpt.tools.parsing import (
    ToolCall,
    ToolChat,
    fallback_system_prompt,
    parse_tool_calls,
    template_supports_tools,
)

# A ChatML template with tools in the style of Qwen2.5's (written for this test): tools in
# the system turn, calls as <tool_call> JSON in the assistant turn, consecutive tool
# results grouped in one user turn of <tool_response> blocks. transformers renders with
# trim_blocks, so a newline right after a block tag is written as {{ '\n' }}.
QWEN_STYLE_TEMPLATE = "".join([
    "{% if tools %}<|im_start|>system\n",
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}",
    "# Tools\n\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n\n",
    "Call a function with <tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n',
    "{% elif messages[0].role == 'system' %}",
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}",
    "{% for message in messages %}",
    "{% if message.role == 'system' %}",
    "{% elif message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}",
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n",
    "{% elif message.role == 'assistant' %}",
    "<|im_start|>assistant{% if message.content %}\n{{ message.content }}{% endif %}",
    "{% for call in message.tool_calls %}{{ '\\n' }}<tool_call>\n",
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}',
    "\n</tool_call>{% endfor %}<|im_end|>\n",
    "{% elif message.role == 'tool' %}",
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}",
    "{{ '\\n' }}<tool_response>\n{{ message.content }}\n</tool_response>",
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}",
    "{% endif %}{% endfor %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
])


@pytest.fixture(scope="module")
def tokenizer():
    from jaxpt.data.tokenizers import smollm2_tokenizer

    return smollm2_tokenizer()


def test_parse_one_call_with_text_around_it():
    text = 'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": ' \
           '{"expression": "12 * 34"}}\n</tool_call>'
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == (ToolCall("calculator", {"expression": "12 * 34"}),)
    assert parsed.content == "Let me compute." and parsed.errors == () and parsed.num_calls == 1


def test_parse_several_calls_string_arguments_and_malformed_ones():
    text = (
        '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>'
        '<tool_call>{"name": "b"}</tool_call>'
        "<tool_call>{name: c}</tool_call>"
        '<tool_call>{"arguments": {}}</tool_call>'
        '<tool_call>{"name": "d", "arguments": [1]}</tool_call>'
        'tail <tool_call>{"name": "e", "argu'
    )
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == (ToolCall("a", {"x": 1}), ToolCall("b", {}))
    assert len(parsed.errors) == 4 and parsed.num_calls == 6
    assert "not valid JSON" in parsed.errors[0]
    assert 'a tool call is a JSON object {"name"' in parsed.errors[1]
    assert "arguments of d are not a JSON object" in parsed.errors[2]
    assert "<tool_call> without its </tool_call>" in parsed.errors[3]
    assert parsed.content == "tail"


def test_no_call_is_plain_content():
    parsed = parse_tool_calls("The answer is 408.")
    assert parsed.tool_calls == () and parsed.errors == ()
    assert parsed.content == "The answer is 408."


def test_smollm2_template_has_no_tool_support(tokenizer):
    # SmolLM2-135M-Instruct's template renders role + content only: fallback mode.
    assert "tools" not in tokenizer.chat_template and not template_supports_tools(
        tokenizer.chat_template)
    assert template_supports_tools(QWEN_STYLE_TEMPLATE)
    assert "<tool_call>" not in tokenizer.get_vocab()


def test_fallback_rendering_on_smollm2(tokenizer):
    schema = function_schema(calculator)
    chat = ToolChat(tokenizer, [schema])
    assert chat.native is False
    history = chat.prompt_messages([{"role": "user", "content": "What is 12 * 34?"}])
    prompt = chat.prompt_text([{"role": "user", "content": "What is 12 * 34?"}])
    assert prompt == (
        f"<|im_start|>system\n{fallback_system_prompt([schema])}<|im_end|>\n"
        "<|im_start|>user\nWhat is 12 * 34?<|im_end|>\n<|im_start|>assistant\n"
    )
    completion = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n' \
                 "</tool_call>"
    assistant = chat.assistant_message(completion)
    assert assistant == {"role": "assistant", "content": completion}  # kept as sampled
    results = chat.tool_result_messages([("calculator", "408")])
    assert results == [{"role": "user", "content": "<tool_response>\n408\n</tool_response>"}]
    # the model sampled <|im_end|> (its EOS): what follows is the newline, then the turns
    text = chat.continuation_text(history, assistant, results, stop_text="<|im_end|>")
    assert text == (
        "\n<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # cut by the length limit: the template's whole turn end comes first
    text = chat.continuation_text(history, assistant, results, stop_text=None)
    assert text.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>")


def test_fallback_keeps_the_rows_own_system_message(tokenizer):
    schema = function_schema(calculator)
    msgs = ToolChat(tokenizer, [schema]).prompt_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert msgs[0] == {"role": "system",
                       "content": f"Be brief.\n\n{fallback_system_prompt([schema])}"}
    assert ToolChat(tokenizer, []).prompt_messages(msgs[1:]) == msgs[1:]  # no tools: untouched


def test_native_rendering_on_a_qwen_style_template(tokenizer):
    schema = function_schema(calculator)
    chat = ToolChat(tokenizer, [schema], {"chat_template": QWEN_STYLE_TEMPLATE})
    assert chat.native is True
    history = chat.prompt_messages([{"role": "user", "content": "12*34 and 5+6?"}])
    prompt = chat.prompt_text(history)
    assert prompt.startswith("<|im_start|>system\n# Tools\n\n<tools>\n{")
    assert "}\n</tools>\n\nCall a function" in prompt
    assert '"name": "calculator"' in prompt
    assert prompt.endswith("<|im_start|>user\n12*34 and 5+6?<|im_end|>\n<|im_start|>assistant\n")
    completion = (
        'Two sums.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "5+6"}}\n'
        "</tool_call>"
    )
    assistant = chat.assistant_message(completion)
    assert assistant == {
        "role": "assistant", "content": "Two sums.",
        "tool_calls": [
            {"type": "function",
             "function": {"name": "calculator", "arguments": {"expression": "12*34"}}},
            {"type": "function",
             "function": {"name": "calculator", "arguments": {"expression": "5+6"}}},
        ],
    }
    results = chat.tool_result_messages([("calculator", "408"), ("calculator", "11")])
    assert results == [{"role": "tool", "name": "calculator", "content": "408"},
                       {"role": "tool", "name": "calculator", "content": "11"}]
    text = chat.continuation_text(history, assistant, results, stop_text="<|im_end|>")
    assert text == (
        "\n<|im_start|>user\n<tool_response>\n408\n</tool_response>\n"
        "<tool_response>\n11\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_template_that_rewrites_history_is_refused(tokenizer):
    # drops every assistant turn but the last (as Qwen3 drops earlier <think> blocks)
    rewriting = (
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    chat = ToolChat(tokenizer, [], {"chat_template": rewriting})
    with pytest.raises(ChatTemplateError, match="renders the earlier turns differently"):
        chat.continuation_text([{"role": "user", "content": "q"}],
                               {"role": "assistant", "content": "a"},
                               [{"role": "user", "content": "check"}], stop_text="<|im_end|>")
