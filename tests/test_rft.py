"""Rejection-sampling fine-tuning: DART allocation on hand-made pass counts, the sampling
rounds against a hand-traced budget, and a tiny end-to-end run whose kept samples are
checked one by one against the verifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from train_utils import make_tiny_model_dir, make_tiny_tokenizer, read_metrics

from jaxpt.algorithms.rft import RFTConfig, sampling_fingerprint
from jaxpt.config import ConfigError
from jaxpt.config_load import load_config
from jaxpt.eval_report import EvalSample
from jaxpt.rl import rejection
from jaxpt.rl.rejection import dart_allocation, select_kept
from jaxpt.trainers import rft as rft_trainer


def char_verifier(completions, **kw):
    """Deterministic stand-in verifier: correct iff the completion text has an even
    number of characters (used by import path from the run config)."""
    return [1.0 if len(c[0]["content"]) % 2 == 0 else 0.0 for c in completions]


# ----------------------------------------------------------------------------- DART rule


def test_dart_allocation_hand_made_counts():
    # n = samples so far, c = usable so far, m = 2.
    # p0: done (c >= m).  p1: p = (1+1)/(4+2) = 1/3, wants ceil(1 / (1/3)) = 3.
    # p2: p = 1/6, wants ceil(2 * 6) = 12.  p3: p = 1/10, wants 20 -> capped at 16.
    n, c = [4, 4, 4, 8], [2, 1, 0, 0]
    a = dart_allocation(n, c, min_correct=2, budget_left=100, max_per_round=16)
    assert a.tolist() == [0, 3, 12, 16]
    # Budget 10 < 31 wanted: floor(w * 10 / 31) = [0, 0, 3, 5] (8), the 2 left over go to
    # the lowest pass rates first: p3 (1/10) then p2 (1/6).
    a = dart_allocation(n, c, min_correct=2, budget_left=10, max_per_round=16)
    assert a.tolist() == [0, 0, 4, 6] and a.sum() == 10
    # Lower pass rate never gets fewer samples.
    assert a[3] >= a[2] >= a[1] >= a[0]
    # Budget 1: the single sample goes to the hardest prompt.
    assert dart_allocation(n, c, min_correct=2, budget_left=1, max_per_round=16).tolist() == [
        0,
        0,
        0,
        1,
    ]
    # Nothing left: nothing drawn.
    assert dart_allocation(n, c, min_correct=2, budget_left=0, max_per_round=16).sum() == 0
    # Per-prompt cap: 6 samples at most, 4 drawn -> 2 more; at the cap -> done.
    a = dart_allocation(
        [4, 6], [0, 0], min_correct=1, budget_left=50, max_per_round=16, max_per_prompt=6
    )
    assert a.tolist() == [2, 0]
    with pytest.raises(ValueError, match="num_correct <= num_samples"):
        dart_allocation([1], [2], min_correct=1, budget_left=5, max_per_round=4)


class FakeSampler:
    """Stands in for `sample_and_verify` to test the round logic without a model: prompt 0
    is always right, prompt 1 right on its samples 0, 3, 6, ..., prompt 2 never."""

    def __init__(self):
        self.drawn = [0, 0, 0]
        self.calls = []

    def __call__(self, graphdef, params, tok, prompts, counts, **kw):
        self.calls.append(list(counts))
        out = []
        for i, k in enumerate(counts):
            row = []
            for s in range(k):
                g = self.drawn[i] + s
                ok = i == 0 or (i == 1 and g % 3 == 0)
                row.append(
                    EvalSample(i, i + 1, s, f"t{i}.{g}", (1, 2), None, float(ok), ok, "stop")
                )
            self.drawn[i] += k
            out.append(row)
        return out


def test_sampling_rounds_follow_the_rule_and_stop_at_budget(monkeypatch):
    fake = FakeSampler()
    monkeypatch.setattr("jaxpt.rl.rejection.sample_and_verify", fake)
    rcfg = RFTConfig(num_samples=2, min_correct=2, rounds=6, budget=30, max_samples_per_round=8)
    state, stats = rejection.run_sampling(
        None, None, None, [None] * 3, rcfg, progress=False, log=lambda m: None
    )
    # Round 1: 2 each. p0 has 2 right (done), p1 1 (sample 0), p2 0.
    # Round 2: p1: p = 2/4 -> 2; p2: p = 1/4 -> 8.  p1 sample 3 right -> done.
    # Round 3: p2: p = 1/12 -> 24, capped at 8.  Round 4: p2: 1/20 -> 40 -> 8, but only
    # 30 - 24 = 6 left of the budget -> 6; the budget is spent, sampling stops.
    assert fake.calls == [[2, 2, 2], [0, 2, 8], [0, 0, 8], [0, 0, 6]]
    assert [r["samples"] for r in stats] == [6, 10, 8, 6]
    assert stats[-1]["spent"] == 30 and stats[-1]["prompts_done"] == 2
    n, c = state.counts()
    assert n.tolist() == [2, 4, 24] and c.tolist() == [2, 2, 0]
    # Each prompt's kept samples: its usable ones in drawing order (m = 2 here).
    kept = select_kept(state, 2)
    assert kept == [[0, 1], [0, 3], []]
    # Rounds also stop once every prompt is done.
    fake2 = FakeSampler()
    monkeypatch.setattr("jaxpt.rl.rejection.sample_and_verify", fake2)
    state, stats = rejection.run_sampling(
        None,
        None,
        None,
        [None] * 2,
        RFTConfig(num_samples=3, min_correct=1, rounds=5),
        progress=False,
        log=lambda m: None,
    )
    assert fake2.calls == [[3, 3]] and len(stats) == 1
    with pytest.raises(ConfigError, match="rft.budget=5 is smaller than round 1"):
        rejection.run_sampling(
            None,
            None,
            None,
            [None] * 3,
            RFTConfig(num_samples=2, budget=5),
            progress=False,
            log=lambda m: None,
        )


def test_select_kept_skips_duplicates_and_unusable():
    def s(text, ok, finish="stop"):
        return EvalSample(0, 1, 0, text, (1,), None, float(ok), ok, finish)

    samples = [
        s("a", True),
        s("a ", True),
        s("b", False),
        s(" ", True),
        s("c", True, "length"),
        s("d", True),
    ]
    usable = [rejection.is_usable(x, keep_truncated=False) for x in samples]
    assert usable == [True, True, False, False, False, True]
    state = rejection.SamplingState([samples], [[1] * 6], [usable])
    assert select_kept(state, 5) == [[0, 5]]  # "a " duplicates "a" after strip
    assert select_kept(state, 1) == [[0]]


def test_fingerprint_tracks_sampling_settings_only(tmp_path):
    base = {"algorithm": "rft", "out_dir": str(tmp_path), "rft": {"arithmetic": {"train": 4}}}
    p = tmp_path / "a.yaml"
    p.write_text(yaml.safe_dump(base))
    f0 = sampling_fingerprint(load_config(p))
    assert (
        sampling_fingerprint(
            load_config(p, ["optim.lr=1e-3", "train.max_steps=9", "rft.eval_after=false"])
        )
        == f0
    )
    assert sampling_fingerprint(load_config(p, ["rft.num_samples=8"])) != f0
    # The static engine is the default (older runs' fingerprints stay); continuous draws
    # other samples, so it is another sampling stage.
    assert sampling_fingerprint(load_config(p, ["rft.engine=static"])) == f0
    assert sampling_fingerprint(load_config(p, ["rft.engine=continuous"])) != f0
    with pytest.raises(ConfigError, match="rft.engine"):
        load_config(p, ["rft.engine=paged"])
    assert sampling_fingerprint(load_config(p, ["rft.arithmetic.seed=1"])) != f0
    with pytest.raises(ConfigError, match="rft.temperature must be > 0"):
        load_config(p, ["rft.temperature=0"])
    with pytest.raises(ConfigError, match=r"unknown key rft.num_sample"):
        load_config(p, ["rft.num_sample=2"])


def test_shipped_config_loads():
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "rft_arithmetic_tiny.yaml")
    r = cfg.section("rft")
    assert cfg.algorithm == "rft" and r.arithmetic.train > 0 and r.arithmetic.eval > 0
    s = rft_trainer.sft_config(cfg, Path("x/train.jsonl"))
    assert s.algorithm == "sft" and s.data.train == "x/train.jsonl" and s.data.eval is None
    assert "rft" not in s.sections and s.optim == cfg.optim and s.train == cfg.train


# ----------------------------------------------------------------------------- tiny run


@pytest.mark.e2e
def test_rft_tiny_run_keeps_only_verified_samples(tmp_path, data_dir, capsys):
    from jaxpt.cli import main as cli_main

    tok = make_tiny_tokenizer(tmp_path / "tok", data_dir)
    model_dir = make_tiny_model_dir(tmp_path / "model", tok, seed=2)
    out = tmp_path / "run"
    cfg = {
        "algorithm": "rft",
        "out_dir": str(out),
        "model": {"name": str(model_dir)},
        "data": {"max_length": 128, "packing": False},
        "optim": {"lr": 1.0e-3},
        "train": {"max_steps": 2, "batch_size": 2, "seed": 0},
        "logging": {"progress": False},
        "rft": {
            "num_samples": 3,
            "min_correct": 2,
            "keep_per_prompt": 2,
            "rounds": 2,
            "budget": 30,
            "max_samples_per_round": 4,
            "keep_truncated": True,
            "max_new_tokens": 4,
            "batch_size": 8,
            "engine": "continuous",  # the multi-process RFT test runs the static engine
            "temperature": 1.0,
            "verifier": "tests.test_rft:char_verifier",
            "arithmetic": {"train": 6, "eval": 2, "seed": 1},
            "eval_before": True,
            "eval_after": True,
            "eval_batch_size": 2,
        },
    }
    path = tmp_path / "rft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["rft", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "held-out pass@1 after SFT" in printed

    rdir = out / "rft"
    samples = [json.loads(x) for x in (rdir / "samples.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (rdir / "train.jsonl").read_text().splitlines()]
    summary = json.loads((rdir / "summary.json").read_text())
    assert summary["complete"] and summary["samples"] == len(samples) <= 30
    assert len(summary["rounds"]) >= 1 and summary["rounds"][0]["samples"] == 18
    # Hand check: every sample's verdict is the verifier's, recomputed here.
    for s in samples:
        assert s["correct"] == (len(s["completion"]) % 2 == 0)
        assert s["usable"] == (s["correct"] and bool(s["completion"].strip()))
    # Kept = the first 2 usable distinct texts of each prompt, in drawing order.
    expected = []
    for i in range(6):
        mine = [s for s in samples if s["index"] == i]
        assert [s["sample"] for s in mine] == list(range(len(mine)))
        seen, keep = set(), []
        for s in mine:
            if s["usable"] and s["completion"].strip() not in seen and len(keep) < 2:
                seen.add(s["completion"].strip())
                keep.append(s)
        expected += keep
        assert [s["kept"] for s in mine] == [s in keep for s in mine]
    assert [(t["rft_row"], t["rft_sample"]) for t in train] == [
        (s["row"], s["sample"]) for s in expected
    ]
    assert len(train) == summary["kept"] > 0
    for t in train:
        text = t["completion"][0]["content"]
        assert char_verifier([t["completion"]]) == [1.0] and text.strip()
        assert t["prompt"][0]["role"] == "user" and "How many" in t["prompt"][0]["content"]
    # Prompts that got fewer than m usable samples in round 1 got round-2 samples.
    for i in range(6):
        r1 = [s for s in samples if s["index"] == i and s["round"] == 1]
        r2 = [s for s in samples if s["index"] == i and s["round"] == 2]
        if sum(s["usable"] for s in r1) >= 2:
            assert not r2

    # The SFT stage trained on them and left an SFT run in out_dir.
    losses = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2]
    run_cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert run_cfg["algorithm"] == "sft" and run_cfg["data"]["train"] == str(rdir / "train.jsonl")
    assert "eval_pass@1" in summary["eval_before"] and "eval_pass@1" in summary["eval_after"]

    # `jaxpt eval RUN_DIR` evaluates the trained checkpoint.
    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"prompt": "Ava has 2 apples. How many?", "answer": "2"}) + "\n")
    ev = tmp_path / "ev.jsonl"
    assert (
        cli_main(
            ["eval", str(out), str(rows), "--max-new-tokens", "4", "-o", str(ev), "--no-progress"]
        )
        == 0
    )
    assert "(step 2)" in capsys.readouterr().out
    assert len(ev.read_text().splitlines()) == 1

    # A rerun with more SFT steps reuses the sampling stage and resumes the SFT.
    kept_text = (rdir / "train.jsonl").read_text()
    assert cli_main(["rft", str(path), "train.max_steps=3", "rft.eval_after=false"]) == 0
    assert "reusing the finished sampling stage" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]
    assert (rdir / "train.jsonl").read_text() == kept_text
