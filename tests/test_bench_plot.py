"""bench/plot.py: bench JSON lines -> series -> PNG files, on small synthetic results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_plot_module():
    spec = importlib.util.spec_from_file_location("bench_plot", REPO / "bench" / "plot.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_plot"] = mod
    spec.loader.exec_module(mod)
    return mod


plot = _load_plot_module()

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(bench, case, metric, jaxpt, peer, ratio, **kw):
    row = {
        "bench": bench,
        "case": case,
        "metric": metric,
        "unit": "s",
        "jaxpt": jaxpt,
        "peer": peer,
        "peer_name": "trl 1.16 SFTTrainer",
        "ratio": ratio,
        "target": 0.5,
        "lower_is_better": True,
        "device": "cpu x2",
        "date": "2026-11-21",
    }
    row.update(kw)
    return row


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_series_values_and_pngs(tmp_path):
    sft = _write(
        tmp_path / "sft.jsonl",
        [
            "# gc_off: jaxpt steps [37.1, 38.2]",  # a stderr line captured with 2>&1
            _row("sft", "bs4_len256_gc_off", "step_time", 37.68, 79.90, 0.472),
            _row("sft", "bs4_len256_gc_on", "step_time", 44.45, 91.57, 0.485),
            _row(
                "sft",
                "bs4_len256_gc_off",
                "tokens_per_second",
                27.2,
                12.8,
                2.12,
                unit="tokens/s",
                target=2.0,
                lower_is_better=False,
            ),  # fmt: skip
            "",
        ],
    )
    decode = _write(
        tmp_path / "decode.jsonl",
        [
            # --skip-peer: no peer, no ratio
            _row("decode", "bs1_new32", "new_tokens_per_s", 50.0, None, None, target=None),
            # ratio missing but peer present: derived as jaxpt / peer
            _row("decode", "bs8_new32", "new_tokens_per_s", 300.0, 100.0, None, target=3.0),
        ],
    )
    rows = plot.read_results([sft, decode])
    assert len(rows) == 5  # the comment and blank lines are skipped
    series = plot.group_series(rows)
    assert set(series) == {
        ("sft", "step_time"),
        ("sft", "tokens_per_second"),
        ("decode", "new_tokens_per_s"),
    }
    st = series[("sft", "step_time")]
    assert st.labels == ("bs4_len256_gc_off", "bs4_len256_gc_on")
    assert st.jaxpt == (37.68, 44.45)
    assert st.peer == (79.90, 91.57)
    assert st.ratio == (0.472, 0.485)
    assert st.target == (0.5, 0.5)
    assert st.unit == "s" and st.peer_name == "trl 1.16 SFTTrainer"
    tps = series[("sft", "tokens_per_second")]
    assert tps.jaxpt == (27.2,) and tps.lower_is_better is False and tps.unit == "tokens/s"
    dec = series[("decode", "new_tokens_per_s")]
    assert dec.peer == (None, 100.0)
    assert dec.ratio == (None, 3.0)
    assert dec.target == (None, 3.0)

    out = tmp_path / "plots"
    paths = plot.plot_results([sft, decode], out)
    names = sorted(p.name for p in paths)
    assert names == [
        "decode_new_tokens_per_s.png",
        "sft_step_time.png",
        "sft_tokens_per_second.png",
    ]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC
        # PNG IHDR: width and height (big-endian) right after the 16-byte header.
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 800 and height == 420  # figsize (>= 8, 4.2) inches at 100 dpi


def test_reruns_replace_and_differing_runs_are_labelled(tmp_path):
    a = _row("grpo", "2x4", "step_time", 50.0, 230.0, 0.217)
    a_rerun = _row("grpo", "2x4", "step_time", 48.0, 240.0, 0.2)
    b = _row("grpo", "2x4", "step_time", 10.0, 40.0, 0.25, device="gpu x1", date="2026-12-01")
    f = _write(tmp_path / "grpo.jsonl", [a, b, a_rerun])
    (s,) = plot.group_series(plot.read_results([f])).values()
    # the same-day re-run on cpu x2 replaced the first and moved to the end
    assert s.labels == ("2x4\ngpu x1 2026-12-01", "2x4\ncpu x2 2026-11-21")
    assert s.jaxpt == (10.0, 48.0)
    assert s.ratio == (0.25, 0.2)


def test_bad_lines_name_file_and_line(tmp_path):
    bad = _write(
        tmp_path / "bad.jsonl", [_row("sft", "c", "step_time", 1.0, 2.0, 0.5), '{"bench": "sft"']
    )
    with pytest.raises(plot.ResultsError, match=r"bad\.jsonl:2: not valid JSON"):
        plot.read_results([bad])
    missing = _write(tmp_path / "missing.jsonl", [{"bench": "sft", "case": "c", "jaxpt": 1.0}])
    with pytest.raises(plot.ResultsError, match=r"missing\.jsonl:1: missing key\(s\) \['metric'\]"):
        plot.read_results([missing])
    text = _write(tmp_path / "text.jsonl", [_row("sft", "c", "step_time", "fast", 2.0, 0.5)])
    with pytest.raises(plot.ResultsError, match=r"text\.jsonl:1: key 'jaxpt' must be a number"):
        plot.read_results([text])
    with pytest.raises(plot.ResultsError, match="results file not found"):
        plot.read_results([tmp_path / "nope.jsonl"])


def test_cli_writes_pngs_and_fails_on_empty_input(tmp_path, capsys):
    f = _write(
        tmp_path / "r.jsonl", [_row("dpo", "bs4_len256_fp32_gc_off", "peak_rss", 3.0, 6.0, 0.5)]
    )
    assert plot.main([str(f), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "dpo_peak_rss.png").read_bytes()[:8] == PNG_MAGIC
    assert "ratio 0.5" in capsys.readouterr().out
    empty = _write(tmp_path / "empty.jsonl", ["no results here"])
    assert plot.main([str(empty), "--out", str(tmp_path / "o2")]) == 2
    assert "no result lines" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
