"""Decode loop and samplers on a tiny random model (fast, CPU)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import assert_reordered_close, rejects

from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import Decoder, init_model
from jaxpt.sampling import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationError,
    Sampler,
    SamplerError,
    bucket_length,
    decode,
    default_stop_ids,
    finish_reason_names,
    generate,
    left_pad,
    pack_prompts,
    prefill,
)

V = 64
PAD = 0
# Rounding model of the tiny model's log-probs (tests/tolerances.py): sums of at most
# 64 terms (hidden 32, MLP 64, vocab 64, <= 20 positions), 2 layers + LM head + softmax.
N_RED, DEPTH = 64, 4


def assert_logprobs_close(actual, desired, err_msg=""):
    assert_reordered_close(actual, desired, n=N_RED, depth=DEPTH, err_msg=err_msg)


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    graphdef, params = nnx.split(init_model(cfg, seed=3))
    # Sharper logits and attention than the 0.02 init, so cache / position mistakes show.
    scale = {"lm_head_VE": 40.0, "wq_END": 6.0, "wk_EKD": 6.0}

    def rescale(path, x):
        name = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        s = next((scale[n] for n in name if n in scale), 1.0)
        return x * s

    params = jax.tree_util.tree_map_with_path(rescale, params)
    return graphdef, params


# Prompts of different lengths (token 0 is the pad id, so prompts avoid it).
PROMPTS = [[5, 9, 13], [7, 3, 22, 41, 8, 17, 30], [11], [60, 2, 33, 19, 50]]


def _batch(prompts=PROMPTS):
    return left_pad(prompts, PAD)


def _full_forward(graphdef, params, prompts, completions, temperature=1.0):
    """(logprobs [R, M], logits [R, M, V]) of each completion under ONE uncached,
    right-padded forward pass over prompt + completion (positions 0..; no cache):
    log_softmax(logits / T) at the completion token, and the logits predicting it."""
    completions = np.asarray(completions)
    R, M = completions.shape
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    L = max(map(len, seqs))
    ids = np.zeros((R, L), np.int32)
    seg = np.zeros((R, L), np.int32)
    for r, seq in enumerate(seqs):
        ids[r, : len(seq)], seg[r, : len(seq)] = seq, 1
    logits = np.asarray(_uncached_logits(graphdef, params, ids, seg)) / temperature
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    out_logp = np.zeros((R, M), np.float32)
    out_logits = np.zeros((R, M, logits.shape[-1]), np.float32)
    for r, p in enumerate(prompts):
        rows = np.arange(len(p) - 1, len(p) - 1 + M)
        out_logp[r] = logp[r, rows, completions[r]]
        out_logits[r] = logits[r, rows]
    return out_logp, out_logits


@functools.partial(jax.jit, static_argnums=0)
def _uncached_logits(graphdef, params, ids_RL, seg_RL):
    model = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(ids_RL.shape[1], dtype=jnp.int32), ids_RL.shape)
    hidden, _ = model(ids_RL, positions, seg_RL)
    return model.logits(hidden)


def _gen(tiny, prompts=PROMPTS, **kw):
    graphdef, params = tiny
    ids, mask = _batch(prompts)
    kw.setdefault("sampler", Sampler.greedy())
    kw.setdefault("max_new_tokens", 8)
    kw.setdefault("eos_ids", ())
    kw.setdefault("rng", 0)
    kw.setdefault("pad_id", PAD)
    return jax.tree.map(np.asarray, generate(graphdef, params, ids, mask, **kw))


# -- cached decode == full forward ------------------------------------------------------


@pytest.mark.parametrize(
    "temperature,num_samples,layer_loop",
    [(1.0, 2, "unroll"), (1.0, 2, "unroll_out_in"), (0.7, 1, "scan")],
)
def test_cached_decode_logprobs_match_full_forward(tiny, temperature, num_samples, layer_loop):
    graphdef, params = tiny
    M = 8
    res = _gen(
        tiny,
        sampler=Sampler(temperature=temperature),
        max_new_tokens=M,
        num_samples=num_samples,
        rng=11,
        layer_loop=layer_loop,
    )
    assert res.tokens.shape == (len(PROMPTS) * num_samples, M)
    prompts = [PROMPTS[r // num_samples] for r in range(res.tokens.shape[0])]
    ref_logp, _ = _full_forward(graphdef, params, prompts, res.tokens, temperature)
    assert_logprobs_close(res.logprobs, ref_logp)
    # Mutation: a reference that lost each prompt's first token (a mask or cache-offset
    # bug) must fail the comparison.
    clipped = [p[1:] if len(p) > 1 else p for p in prompts]
    bad_logp, _ = _full_forward(graphdef, params, clipped, res.tokens, temperature)
    assert rejects(assert_logprobs_close, res.logprobs, bad_logp)


@pytest.mark.parametrize(
    "extra",
    [
        dict(model_type="qwen2", attention_bias=True),
        dict(model_type="qwen3", qk_norm=True, tie_word_embeddings=True),
    ],
    ids=["qwen2_bias", "qwen3_qknorm_tied"],
)
def test_decode_step_matches_full_forward_for_other_architectures(extra):
    cfg = ModelConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        head_dim=8,
        **extra,
    )
    graphdef, params = nnx.split(init_model(cfg, seed=5))
    # Biases start at 0 and q/k norms at 1: move them so those code paths matter.
    keys = iter(jax.random.split(jax.random.key(1), 64))

    def perturb(path, x):
        name = str(path[-2].key) if len(path) > 1 else ""
        if name.startswith(("bq_", "bk_", "bv_", "q_norm", "k_norm")):
            return x + jax.random.normal(next(keys), x.shape, x.dtype)
        return x * (20.0 if name in ("embed_VE", "lm_head_VE") else 1.0)

    params = jax.tree_util.tree_map_with_path(perturb, params)
    model = (graphdef, params)
    res = _gen(model, sampler=Sampler(temperature=1.0), num_samples=2, rng=4)
    prompts = [PROMPTS[r // 2] for r in range(res.tokens.shape[0])]
    ref_logp, _ = _full_forward(graphdef, params, prompts, res.tokens)
    assert_logprobs_close(res.logprobs, ref_logp)


def test_scan_and_unrolled_layer_loops_agree(tiny):
    kw = dict(sampler=Sampler(temperature=1.0), num_samples=2, rng=11)
    scan = _gen(tiny, layer_loop="scan", **kw)
    for loop in ("unroll", "unroll_out_in"):
        unroll = _gen(tiny, layer_loop=loop, **kw)
        np.testing.assert_array_equal(scan.tokens, unroll.tokens, err_msg=loop)
        assert_logprobs_close(unroll.logprobs, scan.logprobs, err_msg=loop)
    # Mutation: the layers run in the wrong order must fail the comparison.
    graphdef, params = tiny
    swapped = jax.tree.map(lambda x: x, params)
    swapped["layers"] = jax.tree.map(lambda x: x[::-1], params["layers"])
    wrong = _gen((graphdef, swapped), layer_loop="unroll", **kw)
    assert rejects(assert_logprobs_close, wrong.logprobs, scan.logprobs)
    with pytest.raises(GenerationError, match="layer_loop"):
        _gen(tiny, layer_loop="while")


def test_pack_prompts_layout():
    # Lengths 3, 5, 2, 4 (padding left, right and inside) into rows of 8 slots, best fit
    # longest first: 5 -> row 0, 4 -> row 1, 3 -> row 0 (fills it), 2 -> row 1. Within a
    # row, prompts keep their batch order.
    ids = np.array(
        [
            [0, 0, 0, 1, 2, 3],
            [4, 5, 6, 7, 8, 0],
            [9, 0, 10, 0, 0, 0],
            [0, 11, 12, 13, 14, 0],
        ]
    )
    mask = ids > 0
    packed = pack_prompts(ids, mask, width=8, pad_id=99)
    np.testing.assert_array_equal(
        packed.ids_QW, [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 99, 99]]
    )
    np.testing.assert_array_equal(
        packed.segment_ids_QW, [[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 2, 2, 2, 2, 0, 0]]
    )
    np.testing.assert_array_equal(
        packed.positions_QW, [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 0, 0]]
    )
    np.testing.assert_array_equal(packed.row_B, [0, 0, 1, 1])
    np.testing.assert_array_equal(packed.start_B, [0, 3, 0, 2])
    np.testing.assert_array_equal(packed.length_B, [3, 5, 2, 4])
    # No fewer rows than prompts: nothing to gain, None.
    assert pack_prompts(ids[[1, 3]], mask[[1, 3]], width=8) is None  # 5 + 4 > 8
    assert pack_prompts(ids[:1], mask[:1], width=8) is None


def test_packed_prefill_matches_padded_prefill(tiny, monkeypatch):
    # Six prompts of 1-12 tokens pack into 3 rows of 16 slots.
    prompts = [*PROMPTS, [4] * 12, [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11]]
    ids, mask = _batch(prompts)
    assert pack_prompts(ids, mask, bucket_length(12)).ids_QW.shape == (3, 16)
    kw = dict(sampler=Sampler(temperature=1.0), num_samples=2, rng=7, max_new_tokens=8)
    padded = _gen(tiny, prompts, pack=False, **kw)
    packed = _gen(tiny, prompts, pack=True, **kw)
    np.testing.assert_array_equal(packed.tokens, padded.tokens)
    assert_logprobs_close(packed.logprobs, padded.logprobs)
    np.testing.assert_array_equal(packed.lengths, padded.lengths)
    # And both are the model's own log-probs of what they sampled.
    graphdef, params = tiny
    rows = [prompts[r // 2] for r in range(len(prompts) * 2)]
    ref_logp, _ = _full_forward(graphdef, params, rows, packed.tokens)
    assert_logprobs_close(packed.logprobs, ref_logp)

    # Mutation: packed rows whose prompts see each other (one segment id per row) must
    # fail the comparison with the padded prefill.
    import jaxpt.sampling.loop as loop

    def leaky_pack(*a, **k):
        out = pack_prompts(*a, **k)
        merged = (out.segment_ids_QW > 0).astype(np.int32)
        return out and dataclasses.replace(out, segment_ids_QW=merged)

    monkeypatch.setattr(loop, "pack_prompts", leaky_pack)
    leaky = _gen(tiny, prompts, pack=True, **kw)
    assert rejects(assert_logprobs_close, leaky.logprobs, padded.logprobs)


def test_packed_rows_are_a_bucket_or_the_callers_width(tiny, monkeypatch):
    # The packed width is also each prompt's cache width, which the decode loop compiles
    # for: bucketed, or (bucket=False) the width the caller padded to, never the longest
    # prompt of the batch.
    import jaxpt.sampling.loop as loop

    widths, prefill_packed = [], loop.prefill_packed

    def spy(**kw):
        widths.append(kw["ids_QW"].shape)
        return prefill_packed(**kw)

    monkeypatch.setattr(loop, "prefill_packed", spy)
    graphdef, params = tiny
    ids, mask = _batch()  # 16 tokens, the longest prompt 7
    ids, mask = np.pad(ids, ((0, 0), (13, 0))), np.pad(mask, ((0, 0), (13, 0)))  # P = 20
    kw = dict(sampler=Sampler.greedy(), max_new_tokens=2, eos_ids=(), rng=0, pad_id=PAD)
    generate(graphdef, params, ids, mask, bucket=False, **kw)
    generate(graphdef, params, ids, mask, bucket=True, **kw)
    assert widths == [(1, 20), (1, bucket_length(7))]


def test_greedy_is_argmax_of_full_forward(tiny):
    graphdef, params = tiny
    res = _gen(tiny)
    _, logits = _full_forward(graphdef, params, PROMPTS, res.tokens)
    np.testing.assert_array_equal(res.tokens, logits.argmax(-1))
    # The model is sharp enough that greedy is not a coin flip between near-ties.
    top2 = np.sort(logits, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-3


def test_padding_and_batch_composition_do_not_change_a_row(tiny):
    alone = _gen(tiny, prompts=[PROMPTS[2]])
    batched = _gen(tiny)
    np.testing.assert_array_equal(alone.tokens[0], batched.tokens[2])
    assert_logprobs_close(alone.logprobs[0], batched.logprobs[2])
    # Right padding (mask zeros at the end) gives the same completions as left padding.
    graphdef, params = tiny
    P = max(map(len, PROMPTS))
    ids = np.zeros((len(PROMPTS), P), np.int32)
    mask = np.zeros_like(ids)
    for b, p in enumerate(PROMPTS):
        ids[b, : len(p)], mask[b, : len(p)] = p, 1
    right = generate(
        graphdef,
        params,
        ids,
        mask,
        sampler=Sampler.greedy(),
        max_new_tokens=8,
        eos_ids=(),
        rng=0,
        pad_id=PAD,
    )
    np.testing.assert_array_equal(np.asarray(right.tokens), batched.tokens)


# -- stop ids, lengths, padding ---------------------------------------------------------


def test_tokens_after_eos_are_padding_and_count_nowhere(tiny):
    M = 8
    free = _gen(tiny, max_new_tokens=M)
    # Stop on the token row 1 emits at step 2 (and not before).
    eos = int(free.tokens[1, 2])
    assert eos not in free.tokens[1, :2] and eos != PAD
    res = _gen(tiny, max_new_tokens=M, eos_ids=(eos,))
    for r in range(len(PROMPTS)):
        hits = np.flatnonzero(free.tokens[r] == eos)
        n = int(hits[0]) + 1 if hits.size else M
        assert res.lengths[r] == n
        np.testing.assert_array_equal(res.tokens[r, :n], free.tokens[r, :n])
        assert_logprobs_close(res.logprobs[r, :n], free.logprobs[r, :n])
        assert (res.tokens[r, n:] == PAD).all()
        assert (res.logprobs[r, n:] == 0.0).all()
        assert res.finish_reason[r] == (FINISH_STOP if hits.size else FINISH_LENGTH)
    assert res.lengths[1] == 3
    names = finish_reason_names(res.finish_reason)
    assert names[1] == "stop"
    assert set(names) <= {"stop", "length"}


def test_result_mask_marks_real_tokens(tiny):
    graphdef, params = tiny
    ids, mask = _batch()
    free = _gen(tiny)
    eos = int(free.tokens[0, 1])
    res = generate(
        graphdef,
        params,
        ids,
        mask,
        sampler=Sampler.greedy(),
        max_new_tokens=8,
        eos_ids=(eos,),
        rng=0,
        pad_id=PAD,
    )
    m = np.asarray(res.mask())
    np.testing.assert_array_equal(m.sum(1), np.asarray(res.lengths))
    assert m[0].tolist() == [True, True] + [False] * 6


def test_loop_exits_early_when_every_row_is_done(tiny):
    graphdef, params = tiny
    ids, mask = _batch()
    static = dict(
        graphdef=graphdef,
        sampler=Sampler.greedy(),
        max_new_tokens=8,
        eos_ids=tuple(range(V)),  # every token stops
        pad_id=PAD,
    )
    state = prefill(
        params=params,
        prompt_ids_BP=jnp.asarray(ids),
        prompt_mask_BP=jnp.asarray(mask),
        rng=jax.random.key(0),
        num_samples=1,
        **static,
    )
    final = decode(params=params, state=state, **static)
    assert int(final.step) == 1  # no decode step ran
    assert (np.asarray(final.lengths_R) == 1).all()
    assert (np.asarray(final.tokens_RM)[:, 1:] == PAD).all()


# -- determinism, samples ---------------------------------------------------------------


def test_fixed_seed_is_reproducible_and_seeds_differ(tiny):
    s = Sampler(temperature=1.5)
    a = _gen(tiny, sampler=s, rng=5)
    b = _gen(tiny, sampler=s, rng=5)
    c = _gen(tiny, sampler=s, rng=6)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).any()
    # jax.random.key and an int seed are the same thing.
    d = _gen(tiny, sampler=s, rng=jax.random.key(5))
    np.testing.assert_array_equal(a.tokens, d.tokens)


def test_temperature_to_zero_equals_greedy(tiny):
    greedy = _gen(tiny)
    cold = _gen(tiny, sampler=Sampler(temperature=1e-5), rng=3)
    np.testing.assert_array_equal(cold.tokens, greedy.tokens)


@pytest.mark.parametrize("pack", [False, True])
def test_num_samples_share_one_prefill(tiny, monkeypatch, pack):
    import jaxpt.sampling.loop as decode_mod

    greedy1 = _gen(tiny, pack=pack)
    prompt_passes, decode_rows = [], []
    model_call, step = Decoder.__call__, decode_mod.decode_step

    def spy_model(self, tokens_BT, *args, **kw):
        prompt_passes.append(tuple(tokens_BT.shape))
        return model_call(self, tokens_BT, *args, **kw)

    def spy_step(cfg, params, layers, tokens_R, *args, **kw):
        decode_rows.append(tokens_R.shape[0])
        return step(cfg, params, layers, tokens_R, *args, **kw)

    monkeypatch.setattr(Decoder, "__call__", spy_model)
    monkeypatch.setattr(decode_mod, "decode_step", spy_step)
    jax.clear_caches()  # make the jitted prefill / decode trace again
    greedy3 = _gen(tiny, num_samples=3, pack=pack)
    B, P = len(PROMPTS), bucket_length(max(map(len, PROMPTS)))
    # One prompt pass over the B prompts (not 3B; packed, all 16 tokens fit one row of
    # P = 16 slots); the traced decode step has 3B rows.
    assert prompt_passes == [(1, P) if pack else (B, P)]
    assert decode_rows == [3 * B]
    np.testing.assert_array_equal(greedy3.tokens, np.repeat(greedy1.tokens, 3, axis=0))
    assert_logprobs_close(greedy3.logprobs, np.repeat(greedy1.logprobs, 3, axis=0))


def test_samples_of_one_prompt_differ(tiny):
    res = _gen(tiny, sampler=Sampler(temperature=2.0), num_samples=4, rng=1)
    for b in range(len(PROMPTS)):
        rows = res.tokens[4 * b : 4 * b + 4]
        assert len({tuple(r) for r in rows}) > 1


def test_top_k_never_leaves_the_k_best(tiny):
    graphdef, params = tiny
    k = 3
    res = _gen(
        tiny,
        sampler=Sampler(temperature=3.0, top_k=k),
        num_samples=4,
        rng=2,
    )
    prompts = [PROMPTS[r // 4] for r in range(res.tokens.shape[0])]
    _, logits = _full_forward(graphdef, params, prompts, res.tokens)
    kth = np.sort(logits, axis=-1)[..., -k]
    chosen = np.take_along_axis(logits, res.tokens[..., None], axis=-1)[..., 0]
    assert (chosen >= kth - 1e-4).all()
    assert (res.tokens != logits.argmax(-1)).any()  # it really sampled


# -- samplers on hand-made logits --------------------------------------------------------

# probabilities 0.5, 0.3, 0.15, 0.05 placed at vocab ids 2, 0, 3, 1
PROBS = np.array([0.3, 0.05, 0.5, 0.15], np.float32)
LOGITS = np.log(PROBS)[None]


def _kept(sampler, logits=LOGITS):
    out = sampler.filter_logits(sampler.scaled_logits(jnp.asarray(logits)))
    return set(np.flatnonzero(np.isfinite(np.asarray(out)[0])).tolist())


@pytest.mark.parametrize(
    "kw,kept",
    [
        (dict(top_k=1), {2}),
        (dict(top_k=2), {2, 0}),
        (dict(top_k=4), {0, 1, 2, 3}),
        (dict(top_p=0.45), {2}),  # 0.5 alone reaches 0.45
        (dict(top_p=0.75), {2, 0}),  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75
        (dict(top_p=0.9), {2, 0, 3}),
        (dict(top_p=0.99), {0, 1, 2, 3}),
        (dict(min_p=0.2), {2, 0, 3}),  # p >= 0.1
        (dict(min_p=0.5), {2, 0}),  # p >= 0.25
        (dict(min_p=0.95), {2}),
        # top-k first, then top-p on the renormalized survivors: after top-2 the probs
        # are 0.625 / 0.375, so top_p=0.6 keeps one token (top_p alone would keep two).
        (dict(top_k=2, top_p=0.6), {2}),
        (dict(top_p=0.6), {2, 0}),
        # temperature first: T=4 flattens to p ~ [.31 .19 .37 .24]-ish (ids 0,1,2,3) ...
        (dict(temperature=4.0, min_p=0.6), {2, 0, 3}),
    ],
)
def test_filters_keep_the_expected_tokens(kw, kept):
    assert _kept(Sampler(**kw)) == kept


def test_temperature_then_min_p_by_hand():
    # T=4: p_i ∝ PROBS_i ** 0.25; ratios to the max (0.5): (0.3/.5)^.25=.880,
    # (0.05/.5)^.25=.562, (0.15/.5)^.25=.740 -> min_p=0.6 drops only id 1.
    ratios = (PROBS / 0.5) ** 0.25
    np.testing.assert_allclose(ratios, [0.8801, 0.5623, 1.0, 0.7401], atol=1e-4)
    assert _kept(Sampler(temperature=4.0, min_p=0.6)) == {0, 2, 3}
    assert _kept(Sampler(temperature=4.0, min_p=0.5)) == {0, 1, 2, 3}


def test_sampling_frequencies_follow_the_filtered_distribution():
    keys = jax.random.split(jax.random.key(0), 20000)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (1, 4))
    for sampler, expect in [
        (Sampler(temperature=1.0), PROBS),
        (Sampler(temperature=1.0, top_k=2), np.array([0.375, 0.0, 0.625, 0.0])),
        (Sampler(temperature=1.0, top_p=0.9), np.array([0.3, 0.0, 0.5, 0.15]) / 0.95),
    ]:
        tokens = jax.vmap(lambda k, s=sampler: s.sample(k, logits)[0][0])(keys)
        freq = np.bincount(np.asarray(tokens), minlength=4) / len(keys)
        np.testing.assert_allclose(freq, expect, atol=0.015)


def test_logprob_is_temperature_scaled_and_untruncated():
    s = Sampler(temperature=2.0, top_k=1)
    tokens, logp = s.sample(jax.random.key(0), jnp.asarray(LOGITS))
    assert int(tokens[0]) == 2
    expect = 0.5 * math.log(0.5) - math.log(np.sum(PROBS**0.5))  # log softmax(log p / 2)
    np.testing.assert_allclose(float(logp[0]), expect, atol=1e-6)
    g_tok, g_logp = Sampler.greedy().sample(jax.random.key(0), jnp.asarray(LOGITS))
    assert int(g_tok[0]) == 2
    np.testing.assert_allclose(float(g_logp[0]), math.log(0.5), atol=1e-6)


def test_filters_match_transformers_warpers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 50)) * 3).astype(np.float32)
    for kw in [
        dict(temperature=0.7, top_k=10),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=0.9, top_k=20, top_p=0.7, min_p=0.05),
        dict(temperature=2.0, top_k=5, min_p=0.3),
    ]:
        s = Sampler(**kw)
        ours = np.asarray(s.filter_logits(s.scaled_logits(jnp.asarray(logits))))
        x = torch.tensor(logits)
        x = TemperatureLogitsWarper(kw["temperature"])(None, x)
        if kw.get("top_k"):
            x = TopKLogitsWarper(kw["top_k"])(None, x)
        if kw.get("top_p"):
            x = TopPLogitsWarper(kw["top_p"])(None, x)
        if kw.get("min_p"):
            x = MinPLogitsWarper(kw["min_p"])(None, x)
        theirs = x.numpy()
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs), err_msg=str(kw))
        keep = np.isfinite(theirs)
        np.testing.assert_allclose(ours[keep], theirs[keep], rtol=1e-6)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=2.0), "min_p"),
    ],
)
def test_sampler_validation_names_the_setting(kw, name):
    with pytest.raises(SamplerError, match=name):
        Sampler(**kw)


def test_sampler_is_hashable_and_normalized():
    assert Sampler(temperature=1) == Sampler(temperature=1.0)
    assert hash(Sampler(top_p=1)) == hash(Sampler(top_p=1.0))
    assert Sampler(temperature=0).is_greedy
    assert Sampler(temperature=0.8, top_k=40).describe() == "temperature=0.8, top_k=40"


# -- inputs ----------------------------------------------------------------------------


def test_bucket_lengths():
    got = [bucket_length(n) for n in (1, 16, 17, 33, 100, 128, 129, 140, 256, 257, 600)]
    assert got == [16, 16, 32, 48, 112, 128, 160, 160, 256, 320, 640]


def test_left_pad():
    ids, mask = left_pad([[4, 5], [6]], pad_id=9)
    assert ids.tolist() == [[4, 5], [9, 6]]
    assert mask.tolist() == [[1, 1], [0, 1]]


def test_generate_rejects_bad_inputs(tiny):
    graphdef, params = tiny
    ids, mask = _batch()
    kw = dict(sampler=Sampler.greedy(), max_new_tokens=4, eos_ids=(), rng=0, pad_id=PAD)
    with pytest.raises(GenerationError, match="shape"):
        generate(graphdef, params, ids, mask[:, 1:], **kw)
    bad = mask.copy()
    bad[2] = 0
    with pytest.raises(GenerationError, match="row 2"):
        generate(graphdef, params, ids, bad, **kw)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate(graphdef, params, ids, mask, **{**kw, "max_new_tokens": 0})
    with pytest.raises(GenerationError, match="num_samples"):
        generate(graphdef, params, ids, mask, **kw, num_samples=0)
    with pytest.raises(GenerationError, match="outside vocab"):
        generate(graphdef, params, ids, mask, **{**kw, "eos_ids": (V,)})
    with pytest.raises(GenerationError, match="sampler"):
        generate(graphdef, params, ids, mask, **{**kw, "sampler": "greedy"})


class _FakeTokenizer:
    """The three attributes default_stop_ids reads."""

    eos_token_id = 7
    chat_template = "{{ '<|im_start|>' + m['content'] + '<|im_end|>' }}"

    def get_vocab(self):
        return {"<|im_start|>": 1, "<|im_end|>": 2, "<|eot_id|>": 3, "<|endoftext|>": 0}


def test_default_stop_ids_adds_template_end_of_turn():
    # <|eot_id|> and <|endoftext|> are in the vocab but not used by the template.
    assert default_stop_ids(_FakeTokenizer()) == (7, 2)
    assert default_stop_ids(_FakeTokenizer(), extra=(2, 5)) == (2, 5, 7)
