"""Row formats, validation errors (file, row, key), skip_invalid counting, and sources."""

import gzip
import json

import pytest

from jaxpt.data.formats import (
    DataError,
    DataStats,
    RowFormat,
    detect_format,
    records_from_rows,
    split_implicit_prompt,
    validate_records,
    validate_row,
)
from jaxpt.data.sources import read_records

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


def test_detect_format_covers_trl_formats():
    assert detect_format({"text": "x"}) == RowFormat("language_modeling", False)
    assert detect_format({"messages": [U, A]}) == RowFormat("language_modeling", True)
    assert detect_format({"prompt": "p", "completion": "c"}) == RowFormat(
        "prompt_completion", False
    )
    assert detect_format({"prompt": [U], "completion": [A]}) == RowFormat("prompt_completion", True)
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}) == RowFormat(
        "preference", False
    )
    assert detect_format({"chosen": [U, A], "rejected": [U, A]}) == RowFormat(
        "preference", True, implicit_prompt=True
    )
    assert detect_format({"prompt": [U], "answer": "4"}) == RowFormat("prompt_only", True)
    with pytest.raises(DataError, match="no known format"):
        detect_format({"question": "q"})


@pytest.mark.parametrize(
    ("row", "task", "key", "fragment"),
    [
        ({"prompt": "p"}, "sft", "completion", "SFT needs"),
        ({"prompt": "p", "completion": ""}, "sft", "completion", "empty string"),
        ({"prompt": "p", "completion": 3}, "sft", "completion", "expected a string"),
        ({"prompt": "p", "completion": [A]}, "sft", "completion", "string prompt"),
        ({"prompt": [U], "completion": []}, "sft", "completion", "empty message list"),
        ({"messages": []}, "sft", "messages", "empty message list"),
        ({"messages": [{"role": "user"}]}, "sft", "messages", "has no 'content'"),
        ({"messages": [{"role": "user", "content": [1]}]}, "sft", "messages", "multimodal"),
        ({"text": ""}, "sft", "text", "empty string"),
        ({"prompt": "p", "chosen": "a"}, "preference", "rejected", "chosen' and 'rejected"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "preference", "chosen", "empty"),
        ({"chosen": "a", "rejected": "b"}, "preference", "prompt", "implicit prompt"),
        ({"chosen": [A], "rejected": [A]}, "preference", "chosen", "share no"),
        ({"prompt": ""}, "prompt", "prompt", "empty string"),
        ({"answer": "1", "prompt": 5}, "prompt", "prompt", "expected a string"),
    ],
)
def test_bad_rows_name_the_key(row, task, key, fragment):
    with pytest.raises(DataError, match=fragment) as e:
        validate_row(row, task)
    assert e.value.key == key


def test_implicit_prompt_split_backs_off_to_non_assistant():
    sys_ = {"role": "system", "content": "s"}
    a2 = {"role": "assistant", "content": "other"}
    u2 = {"role": "user", "content": "more"}
    # shared: sys, U, A, u2; differ at the last assistant turn
    prompt, c, r = split_implicit_prompt([sys_, U, A, u2, A], [sys_, U, A, u2, a2])
    assert prompt == [sys_, U, A, u2] and c == [A] and r == [a2]
    # identical first assistant turns but the tails differ later: prompt must not end on A
    prompt, c, r = split_implicit_prompt([U, A], [U, A, u2, a2])
    assert prompt == [U] and c == [A] and r == [A, u2, a2]


def test_validate_records_locates_errors_and_counts_skips():
    rows = [{"text": "a"}, {"text": "b"}, {"text": 7}, {"prompt": "p", "completion": "c"}]
    recs = records_from_rows(rows, source="mem.jsonl")
    with pytest.raises(DataError) as e:
        validate_records(recs, "sft")
    assert str(e.value) == "mem.jsonl row 3, key 'text': expected a string, got int"
    stats = DataStats()
    valid, fmt = validate_records(recs, "sft", skip_invalid=True, stats=stats)
    # row 3 (bad type) and row 4 (a different format than the dataset's) are skipped
    assert [r.row for r in valid] == [1, 2]
    assert fmt == RowFormat("language_modeling", False)
    assert stats.invalid_skipped == 2


def test_jsonl_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps({"text": "a"}), "", json.dumps({"text": "b"}), "{not json", "[1, 2]"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl row 4: invalid JSON"):
        read_records(path)
    stats = DataStats()
    recs = read_records(path, skip_invalid=True, stats=stats)
    # blank line 2 is ignored but still counts for line numbers
    assert [(r.row, r.data) for r in recs] == [(1, {"text": "a"}), (3, {"text": "b"})]
    assert (stats.rows_read, stats.invalid_skipped) == (4, 2)


def test_gzip_jsonl_json_array_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps(rows))
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pqf)
    for p in (gz, arr, pqf):
        recs = read_records(p)
        assert [r.data for r in recs] == rows
        assert [r.row for r in recs] == [1, 2, 3]
        assert recs[0].source == str(p)


def test_hf_datasets_local(tmp_path):
    import datasets

    from jaxpt.data.sources import read_hf_dataset

    rows = [{"text": f"row {i}"} for i in range(4)]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    recs = read_records(saved)
    assert [r.data for r in recs] == rows and recs[-1].row == 4

    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(dd))
    with pytest.raises(DataError, match="pass split"):
        read_records(dd)
    assert [r.data for r in read_records(dd, split="train")] == rows

    # the load_dataset path (used for hub names) with a local json file
    jf = tmp_path / "x.jsonl"
    jf.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = read_hf_dataset(
        "json", split="train", data_files=str(jf), cache_dir=str(tmp_path / "cache")
    )
    assert [r.data for r in recs] == rows
    assert recs[0].source == "json[train]"
