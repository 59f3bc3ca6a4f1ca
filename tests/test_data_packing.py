"""Truncation, best-fit-decreasing packing and the batch contracts (hand-computed values)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpt.data.formats import DataStats
from jaxpt.data.packing import (
    BATCH_KEYS,
    SHARED_PAIR_KEYS,
    best_fit_decreasing,
    bucket_length,
    collate_packed,
    collate_padded,
    collate_preference,
    collate_preference_shared,
    collate_prompts,
    shared_pair_shape,
    truncate_example,
    truncate_preference,
    truncate_prompt,
)
from jaxpt.data.tokenize import TokenizedExample, TokenizedPreference

F, T = False, True
EX_A = TokenizedExample([10, 11, 12], [F, T, T])
EX_B = TokenizedExample([20, 21], [F, T])
EX_C = TokenizedExample([30, 31, 32, 33], [F, F, T, T])


def test_collate_packed_hand_computed():
    batch = collate_packed([EX_A, EX_B, EX_C], max_length=5, num_rows=3, pad_id=99)
    # BFD: C (4) opens row 0 (room 1); A (3) opens row 1 (room 2); B (2) fits row 1 exactly.
    expected = {
        "input_ids": [[30, 31, 32, 33, 99], [10, 11, 12, 20, 21], [99] * 5],
        "targets": [[31, 32, 33, 0, 0], [11, 12, 0, 21, 0], [0] * 5],
        "loss_mask": [[0, 1, 1, 0, 0], [1, 1, 0, 1, 0], [0] * 5],
        "positions": [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1], [0] * 5],
        "segment_ids": [[1, 1, 1, 1, 0], [1, 1, 1, 2, 2], [0] * 5],
    }
    assert set(batch) == set(BATCH_KEYS)
    for k, v in expected.items():
        np.testing.assert_array_equal(batch[k], np.array(v), err_msg=k)
    assert batch["loss_mask"].dtype == np.float32
    assert all(batch[k].dtype == np.int32 for k in BATCH_KEYS if k != "loss_mask")


def test_collate_packed_errors():
    with pytest.raises(ValueError, match="more than num_rows=1"):
        collate_packed([EX_A, EX_C], max_length=5, num_rows=1)
    with pytest.raises(ValueError, match="truncate first"):
        collate_packed([EX_C], max_length=3, num_rows=1)


def test_collate_padded_hand_computed():
    batch = collate_padded([EX_B, EX_A], max_length=4)
    np.testing.assert_array_equal(batch["input_ids"], [[20, 21, 0, 0], [10, 11, 12, 0]])
    np.testing.assert_array_equal(batch["targets"], [[21, 0, 0, 0], [11, 12, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 0, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 0, 0], [0, 1, 2, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 0, 0], [1, 1, 1, 0]])


def _random_examples(rng, n, max_len):
    out = []
    for i in range(n):
        L = int(rng.integers(2, max_len + 1))
        ids = rng.integers(1000 * (i + 1), 1000 * (i + 1) + 500, size=L)
        mask = rng.random(L) < 0.6
        mask[-1] = True
        out.append(TokenizedExample(ids, mask))
    return out


def test_packed_equals_unpacked_per_example():
    rng = np.random.default_rng(0)
    examples = _random_examples(rng, 23, 12)
    max_length = 16
    bins = best_fit_decreasing([len(e) for e in examples], max_length)
    packed = collate_packed(examples, max_length, num_rows=len(bins))
    padded = collate_padded(examples, max_length)
    seen = 0
    for r, b in enumerate(bins):
        for s, i in enumerate(b, start=1):
            cols = np.flatnonzero(packed["segment_ids"][r] == s)
            L = len(examples[i])
            assert len(cols) == L and np.all(np.diff(cols) == 1)
            for k in ("input_ids", "targets", "loss_mask"):
                np.testing.assert_array_equal(packed[k][r, cols], padded[k][i, :L], err_msg=k)
            np.testing.assert_array_equal(packed["positions"][r, cols], np.arange(L))
            seen += 1
    assert seen == len(examples)
    # same total number of loss tokens; equal to the examples' targets
    assert packed["loss_mask"].sum() == padded["loss_mask"].sum()
    assert padded["loss_mask"].sum() == sum(int(e.loss_mask[1:].sum()) for e in examples)


def _naive_bfd(lengths, cap):
    bins, rooms = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        best = None
        for j, room in enumerate(rooms):
            if lengths[i] <= room and (best is None or room < rooms[best]):
                best = j
        if best is None:
            bins.append([i])
            rooms.append(cap - lengths[i])
        else:
            bins[best].append(i)
            rooms[best] -= lengths[i]
    return bins


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 20), max_size=40), st.integers(20, 32))
def test_best_fit_decreasing_matches_naive(lengths, cap):
    bins = best_fit_decreasing(lengths, cap)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= cap for b in bins)
    assert bins == _naive_bfd(lengths, cap)


def test_truncate_example_policies_and_stats():
    stats = DataStats()
    assert truncate_example(EX_C, 4, "keep_start", stats) is EX_C
    cut = truncate_example(EX_C, 3, "keep_start", stats)
    assert cut.input_ids.tolist() == [30, 31, 32] and cut.loss_mask.tolist() == [F, F, T]
    # only the first two tokens would remain, and neither is a target
    assert truncate_example(EX_C, 2, "keep_start", stats) is None
    assert truncate_example(EX_C, 3, "drop", stats) is None
    assert (stats.truncated, stats.dropped_no_targets, stats.dropped_too_long) == (1, 1, 1)
    with pytest.raises(ValueError, match="truncation="):
        truncate_example(EX_C, 3, "keep_end")


def test_truncate_preference_keeps_prompt():
    pair = TokenizedPreference([1, 2, 3], [4, 5, 6, 7], [8, 9])
    stats = DataStats()
    cut = truncate_preference(pair, 5, "keep_start", stats)
    assert cut.prompt_ids.tolist() == [1, 2, 3]
    assert cut.chosen_ids.tolist() == [4, 5] and cut.rejected_ids.tolist() == [8, 9]
    assert truncate_preference(pair, 3, "keep_start", stats) is None  # prompt fills it
    assert truncate_preference(pair, 6, "drop", stats) is None
    assert truncate_preference(pair, 7, "drop", stats) is pair
    assert (stats.truncated, stats.dropped_too_long) == (1, 2)


def test_collate_preference_hand_computed():
    pair = TokenizedPreference([1, 2], [3, 4], [5])
    b = collate_preference([pair], max_length=5)
    assert len(b) == 10
    np.testing.assert_array_equal(b["chosen_input_ids"], [[1, 2, 3, 4, 0]])
    np.testing.assert_array_equal(b["chosen_targets"], [[2, 3, 4, 0, 0]])
    np.testing.assert_array_equal(b["chosen_loss_mask"], [[0, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["rejected_input_ids"], [[1, 2, 5, 0, 0]])
    np.testing.assert_array_equal(b["rejected_targets"], [[2, 5, 0, 0, 0]])
    np.testing.assert_array_equal(b["rejected_loss_mask"], [[0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b["rejected_positions"], [[0, 1, 2, 0, 0]])
    np.testing.assert_array_equal(b["rejected_segment_ids"], [[1, 1, 1, 0, 0]])


def test_collate_preference_shared_hand_computed():
    # Prompt [1, 2]; both completions start with 3, so the shared prefix is [1, 2, 3].
    pair = TokenizedPreference([1, 2], [3, 4], [3, 5, 6])
    b = collate_preference_shared([pair], length=8, width=3)
    assert set(b) == set(SHARED_PAIR_KEYS)
    np.testing.assert_array_equal(b["shared_input_ids"], [[1, 2, 3, 4, 5, 6, 0, 0]])
    np.testing.assert_array_equal(b["shared_positions"], [[0, 1, 2, 3, 3, 4, 0, 0]])
    np.testing.assert_array_equal(b["shared_segment_ids"], [[1, 1, 1, 2, 3, 3, 0, 0]])
    np.testing.assert_array_equal(b["shared_prefix"], [[1, 1, 1, 0, 0, 0, 0, 0]])
    # Chosen trains on 3 (read at row 1) and 4 (row 2); rejected on 3 (row 1), 5 (row 2,
    # the shared 3) and 6 (row 4, its own 5).
    np.testing.assert_array_equal(b["chosen_source"], [[1, 2, 0]])
    np.testing.assert_array_equal(b["chosen_targets"], [[3, 4, 0]])
    np.testing.assert_array_equal(b["chosen_valid"], [[1, 1, 0]])
    np.testing.assert_array_equal(b["rejected_source"], [[1, 2, 4]])
    np.testing.assert_array_equal(b["rejected_targets"], [[3, 5, 6]])
    np.testing.assert_array_equal(b["rejected_valid"], [[1, 1, 1]])
    assert shared_pair_shape(pair) == (6, 3)
    with pytest.raises(ValueError, match="pair 0: shared row of 6 tokens > length 5"):
        collate_preference_shared([pair], length=5, width=3)
    with pytest.raises(ValueError, match="pair 0: 3 trained rejected tokens > width 2"):
        collate_preference_shared([pair], length=8, width=2)


def test_bucket_length_table():
    assert [bucket_length(n, bucket="pow2") for n in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, 128]
    # default: multiples of an eighth of the next power of two (min 16)
    assert [bucket_length(n) for n in (1, 17, 33, 72, 129, 257)] == [16, 32, 48, 80, 160, 320]
    assert bucket_length(65, bucket="pow2", max_length=100) == 100
    assert bucket_length(99, max_length=100) == 100
    assert [bucket_length(n, bucket=64) for n in (1, 64, 65)] == [64, 64, 128]
    with pytest.raises(ValueError, match="> max_length"):
        bucket_length(101, max_length=100)


def test_collate_prompts_left_pads():
    b = collate_prompts([np.array([5, 6, 7]), np.array([8])], pad_id=0, min_length=4)
    np.testing.assert_array_equal(b["prompt_ids"], [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(b["prompt_mask"], [[F, T, T, T], [F, F, F, T]])
    assert b["prompt_ids"].dtype == np.int32 and b["prompt_mask"].dtype == bool
    # a 5-token prompt moves to the next bucket
    assert collate_prompts([np.arange(5)], min_length=4)["prompt_ids"].shape == (1, 8)


def test_truncate_prompt():
    stats = DataStats()
    assert truncate_prompt(np.arange(5), 3, "keep_end", stats).tolist() == [2, 3, 4]
    assert truncate_prompt(np.arange(5), 3, "drop", stats) is None
    assert (stats.truncated, stats.dropped_too_long) == (1, 1)
