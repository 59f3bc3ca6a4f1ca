"""The train step: packed == unpacked, accumulated == full batch, non-finite steps skipped,
schedule and weight-decay mask, SFT variants, jit once."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tolerances import assert_reordered_close, assert_trees_reordered_close, rejects

from jaxpt.algorithms.sft import (
    SFT_BATCH_NDIMS,
    SFTBatch,
    make_sft_loss_fn,
    mask_response_inputs,
    sft_batch_stats,
)
from jaxpt.config import OptimConfig, SFTConfig
from jaxpt.data.packing import collate_packed, collate_padded
from jaxpt.data.tokenize import TokenizedExample
from jaxpt.engine.state import (
    accumulate_grads,
    batch_shardings,
    compile_step,
    decay_mask,
    init_state,
    make_optimizer,
    make_schedule,
    make_train_step,
)
from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import init_model
from jaxpt.sharding import make_mesh, param_shardings

V = 64
CFG = ModelConfig(
    model_type="llama",
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def model_parts():
    graphdef, state = nnx.split(init_model(CFG, seed=1))
    return graphdef, state.to_pure_dict()


def examples(seed=0, lengths=(9, 14, 5, 11, 7, 12)):
    rng = np.random.RandomState(seed)
    out = []
    for n in lengths:
        ids = rng.randint(1, V, n).astype(np.int32)
        mask = np.zeros(n, bool)
        mask[rng.randint(1, n - 1) :] = True  # a prompt, then a completion
        out.append(TokenizedExample(ids, mask))
    return out


def loss_fn_for(graphdef, **kw):
    kw = {"impl": "reference", "with_entropy": True, "with_accuracy": True, **kw}
    return make_sft_loss_fn(graphdef, SFTConfig(), **kw)


def grads_of(graphdef, params, batch, grad_accum=1, **loss_kw):
    batch = SFTBatch(**{k: jnp.asarray(v) for k, v in batch.items()})

    @jax.jit
    def run(params, batch):
        stats = sft_batch_stats(None, batch)
        return accumulate_grads(
            loss_fn_for(graphdef, **loss_kw),
            params,
            None,
            batch,
            jax.random.PRNGKey(0),
            stats,
            grad_accum=grad_accum,
        )

    return run(params, batch)


# Rounding model for this file's comparisons (tests/tolerances.py): sums over at most
# N_RED terms (the batch's tokens, the vocab, the hidden size), chained through the layers,
# the LM head and the log-softmax.
N_RED = 6 * 32
DEPTH = CFG.num_layers + 2


def test_packed_batch_equals_unpacked(model_parts):
    graphdef, params = model_parts
    ex = examples()
    packed = collate_packed(ex, max_length=32, num_rows=3)
    padded = collate_padded(ex, max_length=32)
    assert packed["segment_ids"].max() > 1  # rows really hold several examples
    loss_p, m_p, g_p = grads_of(graphdef, params, packed)
    loss_u, m_u, g_u = grads_of(graphdef, params, padded)
    assert m_p["num_target_tokens"] == m_u["num_target_tokens"] == sum(e.num_targets for e in ex)
    assert_reordered_close(loss_p, loss_u, n=N_RED, depth=DEPTH)
    assert m_p["mean_token_accuracy"] == m_u["mean_token_accuracy"]  # a ratio of counts
    assert_reordered_close(m_p["entropy"], m_u["entropy"], n=N_RED, depth=DEPTH)
    assert_trees_reordered_close(g_p, g_u, n=N_RED, depth=DEPTH)

    # Mutation: a packed row whose second example also sees the first (the segment mask
    # lost) must fail the same comparison.
    leaky = {**packed, "segment_ids": (packed["segment_ids"] > 0).astype(np.int32)}
    loss_x, _, g_x = grads_of(graphdef, params, leaky)
    assert rejects(assert_reordered_close, loss_x, loss_u, n=N_RED, depth=DEPTH)
    assert rejects(assert_trees_reordered_close, g_x, g_u, n=N_RED, depth=DEPTH)


def test_lm_head_on_targets_only_equals_the_full_reference(model_parts):
    # With the chunked kernel the LM head sees each row's targets sorted to the front and
    # skips token chunks without one (tests/test_logprob_kernel.py checks the skipping);
    # the reference computes logits everywhere and masks. Same loss, metrics, gradients.
    graphdef, params = model_parts
    batch = collate_padded(examples(seed=4, lengths=(9, 14, 5, 11, 7, 12) * 2), max_length=32)
    loss_c, m_c, g_c = grads_of(graphdef, params, batch, impl="chunked")
    loss_r, m_r, g_r = grads_of(graphdef, params, batch, impl="reference")
    assert_reordered_close(loss_c, loss_r, n=N_RED, depth=DEPTH)
    for k in ("mean_token_accuracy", "entropy"):
        assert_reordered_close(m_c[k], m_r[k], n=N_RED, depth=DEPTH, err_msg=k)
    assert_trees_reordered_close(g_c, g_r, n=N_RED, depth=DEPTH)


def test_loss_matches_numpy_log_softmax(model_parts):
    """The loss is the token mean of -log softmax(logits)[target] over target tokens."""
    graphdef, params = model_parts
    batch = collate_padded(examples(), max_length=32)
    loss, _, _ = grads_of(graphdef, params, batch)
    model = nnx.merge(graphdef, params)
    hidden, _ = model(
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["positions"]),
        jnp.asarray(batch["segment_ids"]),
    )
    logits = np.asarray(model.logits(hidden), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    m = batch["loss_mask"] > 0
    np.testing.assert_allclose(loss, (logz - picked)[m].mean(), rtol=1e-5)


def test_grad_accumulation_equals_full_batch(model_parts):
    graphdef, params = model_parts
    ex = examples(seed=2, lengths=(15, 6, 11, 8, 13, 4, 9, 10))
    batch = collate_padded(ex, max_length=16)  # 8 rows, unequal target counts per row
    loss_1, m_1, g_1 = grads_of(graphdef, params, batch, grad_accum=1)
    loss_4, m_4, g_4 = grads_of(graphdef, params, batch, grad_accum=4)
    assert_reordered_close(loss_4, loss_1, n=N_RED, depth=DEPTH)
    assert_reordered_close(m_4["mean_token_accuracy"], m_1["mean_token_accuracy"], n=N_RED)
    assert_trees_reordered_close(g_4, g_1, n=N_RED, depth=DEPTH)
    # Mutation: the mean of per-micro-batch token means (unequal token counts) must fail.
    wrong = np.mean([grads_of(graphdef, params, {k: v[j::4] for k, v in batch.items()})[0]
                     for j in range(4)])
    assert rejects(assert_reordered_close, wrong, loss_1, n=N_RED, depth=DEPTH)

    # Micro-batches hold different numbers of target tokens, so a mean of per-micro-batch
    # token means would not be the full-batch token mean: the comparison can fail.
    counts = [float(np.sum(batch["loss_mask"][j::4] > 0)) for j in range(4)]
    assert len(set(counts)) > 1

    # The whole jitted step lands on the same params (SGD after clipping: the update is
    # linear in the gradient, so parameter differences are gradient differences).
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1))
    schedule = lambda count: jnp.float32(0.1)  # noqa: E731
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])  # one device, whatever the count
    psh = param_shardings(params, mesh)
    dev_batch = SFTBatch(**{k: jnp.asarray(v) for k, v in batch.items()})
    outs = []
    for k in (1, 4):
        state, sh = init_state(jax.tree.map(jnp.copy, params), tx, seed=0, params_sh=psh, mesh=mesh)
        step = make_train_step(
            loss_fn_for(graphdef), tx, schedule, grad_accum=k, batch_stats_fn=sft_batch_stats
        )
        step_fn = compile_step(step, sh, batch_shardings(SFT_BATCH_NDIMS, mesh), mesh)
        outs.append(step_fn(state, dev_batch))
    (s1, m1), (s4, m4) = outs
    assert_reordered_close(m4["loss"], m1["loss"], n=N_RED, depth=DEPTH)
    assert_reordered_close(m4["grad_norm"], m1["grad_norm"], n=N_RED, depth=DEPTH)
    # lr 0.1 x the gradient's rounding, on the scale of that update (not of the params).
    def moved_by(s):
        return jax.tree.map(lambda a, p: np.asarray(a) - np.asarray(p), s.params, params)

    assert_trees_reordered_close(moved_by(s4), moved_by(s1), n=N_RED, depth=DEPTH)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s1.params, params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the update did move the params


def test_nonfinite_step_is_not_applied(model_parts):
    graphdef, params = model_parts
    tx, schedule = make_optimizer(OptimConfig(lr=1e-2), 10)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])  # one device, whatever the count
    psh = param_shardings(params, mesh)
    state, sh = init_state(jax.tree.map(jnp.copy, params), tx, seed=0, params_sh=psh, mesh=mesh)
    step = make_train_step(loss_fn_for(graphdef), tx, schedule, batch_stats_fn=sft_batch_stats)
    step_fn = compile_step(step, sh, batch_shardings(SFT_BATCH_NDIMS, mesh), mesh)
    good = jax.tree.map(jnp.asarray, SFTBatch(**collate_padded(examples(), max_length=16)))
    # An out-of-range token id embeds as NaN (jnp.take fills), so loss and grads are NaN.
    bad = dataclasses.replace(good, input_ids=good.input_ids.at[0, 1].set(10**6))

    state, m = step_fn(state, good)
    assert float(m["skipped"]) == 0.0
    before = jax.device_get((state.params, state.opt_state))
    state, m = step_fn(state, bad)
    assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
    after = jax.device_get((state.params, state.opt_state))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit: nothing applied
    assert int(state.step) == 2  # the batch was consumed
    state, m = step_fn(state, good)  # and training goes on
    assert float(m["skipped"]) == 0.0 and np.isfinite(float(m["loss"]))
    # The lr of the third step is that of the second *applied* update.
    np.testing.assert_allclose(float(m["learning_rate"]), float(schedule(1)), rtol=1e-6)
    assert step_fn._cache_size() == 1  # jitted once


def test_schedule_values_hand_computed():
    opt = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    s = make_schedule(opt, total_steps=12)
    # warmup: 0, 0.5; then cosine over 10 steps from 1.0 to 0.1
    expected = [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)), 0.1]
    got = [float(s(c)) for c in (0, 1, 2, 7, 12)]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    lin = make_schedule(OptimConfig(lr=2.0, schedule="linear"), total_steps=4)
    np.testing.assert_allclose([float(lin(c)) for c in range(5)], [2.0, 1.5, 1.0, 0.5, 0.0])
    const = make_schedule(OptimConfig(lr=3.0, schedule="constant", warmup_ratio=0.5), 4)
    np.testing.assert_allclose([float(const(c)) for c in range(4)], [0.0, 1.5, 3.0, 3.0])


def test_weight_decay_skips_norms_and_biases(model_parts):
    _, params = model_parts
    mask = decay_mask(params)
    assert mask["embed_VE"] and mask["layers"]["wq_END"] and mask["layers"]["w_down_FE"]
    assert not mask["final_norm_E"] and not mask["layers"]["attn_norm_E"]
    assert decay_mask({"layers": {"bq_ND": 0}})["layers"]["bq_ND"] is False
    # AdamW with lr only decays masked-in leaves (zero grads: only decay moves params).
    tx, _ = make_optimizer(
        OptimConfig(lr=0.1, weight_decay=0.5, max_grad_norm=None, schedule="constant"), 10
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(upd["embed_VE"], -0.1 * 0.5 * params["embed_VE"], rtol=1e-6)
    assert not np.any(np.asarray(upd["final_norm_E"]))


def test_masked_thought_only_touches_response_inputs():
    ids = jnp.arange(1, 41, dtype=jnp.int32).reshape(2, 20)
    loss_mask = jnp.zeros((2, 20)).at[:, 9:18].set(1.0)  # targets at inputs 10..18
    out = np.asarray(mask_response_inputs(ids, loss_mask, jax.random.PRNGKey(0), 0.5, 0))
    changed = out != np.asarray(ids)
    assert not changed[:, :10].any() and not changed[:, 19:].any()
    assert changed[:, 10:19].any() and np.all(out[changed] == 0)
    assert changed[:, 10:19].mean() == pytest.approx(0.5, abs=0.3)


def test_sft_variants_change_the_training_loss(model_parts):
    graphdef, params = model_parts
    batch = jax.tree.map(jnp.asarray, SFTBatch(**collate_padded(examples(), max_length=16)))
    stats = sft_batch_stats(None, batch)
    rng = jax.random.PRNGKey(5)
    plain = loss_fn_for(graphdef)(params, batch, rng, stats)[0]
    for sft in (SFTConfig(masked_thought=0.5), SFTConfig(neftune_alpha=50.0)):
        fn = make_sft_loss_fn(graphdef, sft, impl="reference", mask_token_id=0)
        varied = fn(params, batch, rng, stats)[0]
        assert abs(float(varied) - float(plain)) > 1e-4, sft
        assert np.isfinite(float(varied))


def test_sharded_step_equals_single_device():
    """The jitted step on a (data 2, fsdp 2) mesh of 4 fake CPU devices matches one device,
    full fine-tuning and LoRA (adapters sharded like their base weights)."""
    from conftest import run_with_devices

    out = run_with_devices(
        """
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from jaxpt.config import OptimConfig, SFTConfig
        from jaxpt.data.packing import collate_padded
        from jaxpt.data.tokenize import TokenizedExample
        from jaxpt.models.config import ModelConfig
        from jaxpt.models.decoder import init_model
        from jaxpt.sharding import make_mesh, param_shardings
        from jaxpt.engine import lora
        from jaxpt.algorithms.sft import (SFT_BATCH_NDIMS, SFTBatch, make_sft_loss_fn,
                                          sft_batch_stats)
        from jaxpt.engine.state import (batch_shardings, compile_step, init_state,
                                       make_optimizer, make_train_step, put_batch)
        from tolerances import assert_reordered_close, assert_trees_reordered_close

        cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32,
                          intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=8)
        graphdef, st = nnx.split(init_model(cfg, seed=1))
        params = st.to_pure_dict()
        rng = np.random.RandomState(0)
        ex = [TokenizedExample(rng.randint(1, 64, n).astype(np.int32),
                               np.arange(n) >= 3) for n in (9, 14, 6, 12)]
        host = collate_padded(ex, max_length=16)
        loss_fn = make_sft_loss_fn(graphdef, SFTConfig(), impl="reference")
        tx, sched = make_optimizer(OptimConfig(lr=1e-2), 10)
        spec = lora.LoraSpec(rank=4, targets="wq|w_up|w_down")
        adapters0 = lora.init_lora(params, spec, jax.random.PRNGKey(2))
        adapters0 = jax.tree.map(lambda x: x + 0.01, adapters0)

        def train(mesh, use_lora):
            psh = param_shardings(params, mesh)
            p = jax.tree.map(np.asarray, params)
            if use_lora:
                ad = jax.tree.map(np.asarray, adapters0)
                state, sh = init_state(ad, tx, seed=0, params_sh=lora.lora_shardings(ad, mesh),
                                       mesh=mesh, frozen=p, frozen_sh=psh)
                pfn = lambda a, f, r: lora.apply_lora(f, a, spec, rng=r)
            else:
                state, sh = init_state(p, tx, seed=0, params_sh=psh, mesh=mesh)
                pfn = lambda a, f, r: a
            step = make_train_step(loss_fn, tx, sched, grad_accum=2,
                                   batch_stats_fn=sft_batch_stats, params_fn=pfn)
            bsh = batch_shardings(SFT_BATCH_NDIMS, mesh)
            fn = compile_step(step, sh, bsh, mesh)
            for _ in range(2):
                state, m = fn(state, put_batch(SFTBatch(**host), bsh))
            return float(m["loss"]), jax.device_get(state.params), state

        for use_lora in (False, True):
            big = make_mesh(2, 2, 1)
            one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
            l4, p4, s4 = train(big, use_lora)
            l1, p1, _ = train(one, use_lora)
            assert_reordered_close(l4, l1, n=64, depth=4)
            assert_trees_reordered_close(p4, p1, n=64, depth=4)
            diff = max(float(np.abs(a - b).max())
                       for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)))
            leaf = s4.params["layers"]["wq_END"]
            leaf = leaf["lora_a"] if use_lora else leaf
            print("LORA" if use_lora else "FULL", leaf.sharding.spec, diff)
        """,
        n_devices=4,
    )
    assert "FULL P(None, 'fsdp', None, None)" in out
    assert "LORA P(None, 'fsdp', None)" in out
