"""End to end: the tiny SFT config on SmolLM2-135M-Instruct and GSM8K learns (held-out loss
goes down)."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_utils import read_metrics

from jaxpt.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
@pytest.mark.slow
def test_tiny_sft_config_learns_on_smollm2(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(
        [
            "train",
            str(REPO / "configs" / "sft_gsm8k_smollm2_tiny.yaml"),
            f"data.train={data_dir / 'gsm8k' / 'train.jsonl'}",
            f"data.eval={data_dir / 'gsm8k' / 'test.jsonl'}",
            f"out_dir={out}",
            "logging.progress=false",
        ]
    )
    assert rc == 0
    rows = read_metrics(out)
    evals = [r for r in rows if "eval_loss" in r]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in evals] == [0, 6] and len(train) == 6
    assert all(r["skipped"] == 0 for r in train)
    # Held-out loss drops: the model picks up GSM8K's solution format.
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05, evals
    assert "done at step 6" in capsys.readouterr().out
