"""Continuous batching (`jaxpt.sampling.continuous`) on a tiny random model: greedy output
equal to the static loop's, sampled output independent of the slot count, exact step
counts for hand-traced budgets."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from tolerances import assert_reordered_close

from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import init_model
from jaxpt.rl.rollout import RolloutConfig, RolloutSampler
from jaxpt.sampling import FINISH_LENGTH, FINISH_STOP, GenerationError, Sampler, generate, left_pad
from jaxpt.sampling.continuous import ContinuousStats, generate_continuous
from jaxpt.sampling.text import PromptError, sample_completions

V, PAD = 64, 0
PROMPTS = [[5, 9, 13], [7, 3, 22, 41, 8, 17, 30], [11], [60, 2, 33, 19, 50]]


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    graphdef, params = nnx.split(init_model(cfg, seed=3))
    # Sharper logits and attention than the 0.02 init, so cache / position mistakes show.
    scale = {"lm_head_VE": 40.0, "wq_END": 6.0, "wk_EKD": 6.0}

    def rescale(path, x):
        name = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return x * next((scale[n] for n in name if n in scale), 1.0)

    return graphdef, jax.tree_util.tree_map_with_path(rescale, params)


def _np(result):
    return jax.tree.map(np.asarray, result)


# 63 and 34 are emitted by some rows of this model (and not by others), so rows stop
# at different steps and slots are refilled mid-run.
GREEDY = dict(sampler=Sampler.greedy(), max_new_tokens=12, eos_ids=(63, 34), pad_id=PAD)


def test_greedy_equals_static_loop(tiny):
    graphdef, params = tiny
    ids, mask = left_pad(PROMPTS, PAD)
    kw = dict(**GREEDY, rng=0, num_samples=2)
    static = _np(generate(graphdef, params, ids, mask, **kw))
    assert len(set(static.lengths.tolist())) > 1, "the case must have rows of several lengths"
    assert (static.finish_reason == FINISH_STOP).any()
    # "auto" is unroll_out_in on CPU (per-layer cache buffers); scan: one stacked cache.
    for slots, layer_loop in [(1, "auto"), (3, "auto"), (3, "scan")]:
        cont = _np(generate_continuous(graphdef, params, ids, mask, num_slots=slots,
                                       layer_loop=layer_loop, **kw))
        msg = f"{slots} slots, {layer_loop}"
        np.testing.assert_array_equal(cont.tokens, static.tokens, err_msg=msg)
        np.testing.assert_array_equal(cont.lengths, static.lengths, err_msg=msg)
        np.testing.assert_array_equal(cont.finish_reason, static.finish_reason, err_msg=msg)
        # Same cache values; attention may sum over the slots in another order.
        assert_reordered_close(cont.logprobs, static.logprobs, n=64, depth=4, err_msg=msg)


def test_sampled_tokens_do_not_depend_on_slots(tiny):
    graphdef, params = tiny
    ids, mask = left_pad(PROMPTS, PAD)
    kw = dict(sampler=Sampler(temperature=1.0, top_k=20), max_new_tokens=10, eos_ids=(7,),
              rng=1, num_samples=3, pad_id=PAD)
    runs = {
        (slots, chunk): _np(generate_continuous(graphdef, params, ids, mask, num_slots=slots,
                                                chunk_steps=chunk, **kw))
        for slots, chunk in [(1, None), (5, None), (5, 3)]
    }
    ref = runs[(1, None)]
    for key, run in runs.items():
        np.testing.assert_array_equal(run.tokens, ref.tokens, err_msg=str(key))
        np.testing.assert_array_equal(run.lengths, ref.lengths, err_msg=str(key))
        assert_reordered_close(run.logprobs, ref.logprobs, n=64, depth=4, err_msg=str(key))
    # Sampled, not greedy: the 3 samples of a prompt differ, and another seed differs.
    assert not (ref.tokens[0] == ref.tokens[1]).all()
    other = _np(generate_continuous(graphdef, params, ids, mask, num_slots=5,
                                    **{**kw, "rng": 2}))
    assert not (other.tokens == ref.tokens).all()


def test_budgets_and_step_counts(tiny):
    graphdef, params = tiny
    ids, mask = left_pad(PROMPTS, PAD)
    # 4 rows, budgets [3, 1, 4, 2], 2 slots, no stop ids. By hand: the first refill gives
    # slot 0 row 0 and slot 1 row 1, which is done at its prefill token, so slot 1 takes
    # row 2. Step 1: rows 0, 2 -> 2 tokens. Step 2: row 0 done (3), row 2 -> 3. Step 3:
    # slot 0 takes row 3 (1 token), then row 3 done (2), row 2 done (4). 3 steps x 2 slots,
    # all 6 slot-steps live (= sum(budget - 1)).
    res, stats = generate_continuous(
        graphdef, params, ids, mask, sampler=Sampler.greedy(), max_new_tokens=5, eos_ids=(),
        rng=0, pad_id=PAD, num_slots=2, budgets_R=[3, 1, 4, 2], return_stats=True)
    res = _np(res)
    assert stats == ContinuousStats(decode_steps=3, slot_steps=6, live_slot_steps=6, chunks=1)
    np.testing.assert_array_equal(res.lengths, [3, 1, 4, 2])
    assert (res.finish_reason == FINISH_LENGTH).all()
    mask_RM = np.arange(5)[None] < res.lengths[:, None]
    assert (res.tokens[~mask_RM] == PAD).all() and (res.logprobs[~mask_RM] == 0).all()
    # Each row's tokens are the first tokens of its unbudgeted greedy completion.
    full = _np(generate(graphdef, params, ids, mask, sampler=Sampler.greedy(),
                        max_new_tokens=5, eos_ids=(), rng=0, pad_id=PAD))
    np.testing.assert_array_equal(np.where(mask_RM, full.tokens, PAD), res.tokens)


def test_bad_arguments_name_the_argument(tiny):
    graphdef, params = tiny
    ids, mask = left_pad(PROMPTS, PAD)
    kw = dict(sampler=Sampler.greedy(), max_new_tokens=4, eos_ids=(), rng=0, pad_id=PAD)
    with pytest.raises(GenerationError, match="budgets_R"):
        generate_continuous(graphdef, params, ids, mask, budgets_R=[1, 2, 3, 5], **kw)
    with pytest.raises(GenerationError, match="num_slots"):
        generate_continuous(graphdef, params, ids, mask, num_slots=0, **kw)
    with pytest.raises(GenerationError, match="row 1 has no real tokens"):
        generate_continuous(graphdef, params, ids, mask * np.array([[1], [0], [1], [1]]), **kw)


class _Tokenizer:
    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(map(str, r)) for r in rows]


def test_sample_completions_engines_agree_greedy(tiny):
    """`sample_completions` (jaxpt eval, RFT, GRPO's held-out eval): the continuous engine
    returns the same (prompt, sample, completion) triples as static batches, greedy."""
    graphdef, params = tiny
    kw = dict(**GREEDY, batch_size=2)
    counts = [2, 0, 1, 3]
    out = {}
    for engine in ("static", "continuous"):
        n, batches = sample_completions(graphdef, params, _Tokenizer(), PROMPTS, counts,
                                        engine=engine, **kw)
        got = [s for batch in batches for s in batch]
        assert n == (1 if engine == "continuous" else 3)
        out[engine] = sorted((s.index, s.sample, s.completion.token_ids,
                              s.completion.finish_reason) for s in got)
    assert [(i, s) for i, s, *_ in out["static"]] == [(0, 0), (0, 1), (2, 0), (3, 0), (3, 1),
                                                      (3, 2)]
    assert out["continuous"] == out["static"]
    with pytest.raises(PromptError, match="engine='paged'"):
        sample_completions(graphdef, params, _Tokenizer(), PROMPTS, 1, engine="paged", **kw)


def test_rollout_config_names_a_bad_engine():
    with pytest.raises(ValueError, match="rollout_engine='paged'"):
        RolloutConfig(engine="paged")
    with pytest.raises(ValueError, match="rollout_slots=-1"):
        RolloutConfig(engine="continuous", slots=-1)


def _length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def test_grpo_rollout_engines_agree_greedy(tiny):
    """`RolloutSampler` (GRPO) with `rollout_engine: continuous` and 3 slots builds the
    same rollout rows as the static loop, greedy."""
    graphdef, params = tiny
    ids, mask = left_pad(PROMPTS, PAD)
    batch = {"prompt_ids": ids, "prompt_mask": mask}
    rows = {}
    for engine, slots in (("static", 0), ("continuous", 3)):
        cfg = RolloutConfig(num_generations=2, max_new_tokens=12, temperature=0.0,
                            reward_funcs=("length",), engine=engine, slots=slots)
        sampler = RolloutSampler(graphdef, _Tokenizer(), cfg, (63, 34), PAD, [_length_reward],
                                 lambda r: (r - r.mean(), {}))
        rows[engine] = sampler.sample(params, batch, rng=jax.random.key(0))
    static, cont = rows["static"], rows["continuous"]
    assert len(set(static.rewards_R.tolist())) > 1  # rows of several lengths
    np.testing.assert_array_equal(cont.rewards_R, static.rewards_R)
    for field in ("input_ids", "completion_mask"):
        np.testing.assert_array_equal(getattr(cont.rows, field), getattr(static.rows, field))
