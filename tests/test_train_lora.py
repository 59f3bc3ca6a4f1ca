"""LoRA: the merge math, only adapters train, the base is the untouched reference, merged
export reproduces the LoRA model in transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tolerances import assert_reordered_close

from jaxpt.algorithms.sft import SFT_BATCH_NDIMS, SFTBatch, make_sft_loss_fn, sft_batch_stats
from jaxpt.config import OptimConfig, SFTConfig
from jaxpt.data.packing import collate_padded
from jaxpt.data.tokenize import TokenizedExample
from jaxpt.engine import lora
from jaxpt.engine.state import (
    batch_shardings,
    compile_step,
    init_state,
    make_optimizer,
    make_train_step,
)
from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import init_model
from jaxpt.models.weights import export_hf
from jaxpt.sharding import make_mesh, param_shardings

CFG = ModelConfig(
    model_type="llama",
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)
SPEC = lora.LoraSpec(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def base():
    graphdef, state = nnx.split(init_model(CFG, seed=3))
    return graphdef, state.to_pure_dict()


def random_adapters(params, spec, seed=0):
    """Adapters with B nonzero too (init has B = 0, i.e. no change)."""
    ad = lora.init_lora(params, spec, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 100))
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), ad)


def test_apply_lora_is_w_plus_scaled_a_times_b(base):
    _, params = base
    ad = random_adapters(params, SPEC)
    merged = jax.jit(lambda p, a: lora.apply_lora(p, a, SPEC))(params, ad)
    s = SPEC.alpha / SPEC.rank
    for name, n_in in (("wq_END", 1), ("wo_NDE", 2), ("w_down_FE", 1)):
        w = np.asarray(params["layers"][name], np.float64)
        a = np.asarray(ad["layers"][name]["lora_a"], np.float64)
        b = np.asarray(ad["layers"][name]["lora_b"], np.float64)
        for l in range(CFG.num_layers):
            # Flatten the input dims and output dims by hand, matmul, fold back.
            a2 = a[l].reshape(int(np.prod(w.shape[1 : 1 + n_in])), SPEC.rank)
            b2 = b[l].reshape(SPEC.rank, -1)
            want = w[l] + s * (a2 @ b2).reshape(w.shape[1:])
            np.testing.assert_allclose(merged["layers"][name][l], want, atol=1e-6)
    # Untargeted weights are the same arrays' values.
    np.testing.assert_array_equal(merged["embed_VE"], params["embed_VE"])
    np.testing.assert_array_equal(merged["layers"]["attn_norm_E"], params["layers"]["attn_norm_E"])


def test_fresh_adapters_leave_the_model_unchanged(base):
    _, params = base
    ad = lora.init_lora(params, SPEC, jax.random.PRNGKey(0))
    assert float(jnp.abs(ad["layers"]["wq_END"]["lora_a"]).max()) > 0
    merged = lora.merge(params, ad, SPEC)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_target_selection_errors(base):
    _, params = base
    with pytest.raises(ValueError, match="selects embed_VE, which LoRA does not adapt"):
        lora.target_paths(params, lora.LoraSpec(rank=2, targets="embed|wq"))
    with pytest.raises(ValueError, match="selects no weight"):
        lora.target_paths(params, lora.LoraSpec(rank=2, targets="nothing_here"))
    got = lora.target_paths(params, lora.LoraSpec(rank=2, targets="wq|w_up"))
    assert sorted(got) == [("layers", "w_up_EF"), ("layers", "wq_END")]


def test_only_adapters_train_and_base_stays_bitwise(base):
    graphdef, params = base
    rng = np.random.RandomState(0)
    ex = []
    for n in (12, 9, 15, 7):
        mask = np.zeros(n, bool)
        mask[4:] = True
        ex.append(TokenizedExample(rng.randint(1, CFG.vocab_size, n).astype(np.int32), mask))
    batch = SFTBatch(**{k: jnp.asarray(v) for k, v in collate_padded(ex, max_length=16).items()})
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])  # one device, whatever the count
    base_sh = param_shardings(params, mesh)
    spec = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.1, targets="wq|wv|w_up")
    adapters = lora.init_lora(params, spec, jax.random.PRNGKey(1))
    ad_sh = lora.lora_shardings(adapters, mesh)
    tx, schedule = make_optimizer(OptimConfig(lr=1e-2, weight_decay=0.1), 10)
    base_copy = jax.device_get(params)
    state, sh = init_state(
        adapters,
        tx,
        seed=0,
        params_sh=ad_sh,
        mesh=mesh,
        frozen=jax.tree.map(jnp.copy, params),
        frozen_sh=base_sh,
    )
    # Optimizer moments exist for adapter leaves only.
    mu = state.opt_state[1][0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(adapters)

    def params_fn(p, frozen, r):
        return lora.apply_lora(frozen, p, spec, rng=r)

    loss_fn = make_sft_loss_fn(graphdef, SFTConfig(), impl="reference")
    step = make_train_step(
        loss_fn, tx, schedule, batch_stats_fn=sft_batch_stats, params_fn=params_fn
    )
    step_fn = compile_step(step, sh, batch_shardings(SFT_BATCH_NDIMS, mesh), mesh)
    ad0 = jax.device_get(state.params)
    losses = []
    for _ in range(3):
        state, m = step_fn(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    for x, y in zip(
        jax.tree.leaves(jax.device_get(state.frozen)), jax.tree.leaves(base_copy), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)),
        jax.tree.leaves(ad0),
        strict=True,
    ):
        assert np.abs(x - y).max() > 1e-4, jax.tree_util.keystr(path)


def test_merged_export_matches_lora_model_in_transformers(base, tmp_path):
    from transformers import AutoModelForCausalLM

    graphdef, params = base
    ad = random_adapters(params, SPEC, seed=7)
    lora_params = lora.apply_lora(params, ad, SPEC)  # the model the LoRA run trains
    ids = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 11)).astype(np.int32)
    model = nnx.merge(graphdef, lora_params)
    hidden, _ = model(jnp.asarray(ids))
    ours = np.asarray(model.logits(hidden))
    base_logits = np.asarray(
        nnx.merge(graphdef, params).logits(nnx.merge(graphdef, params)(jnp.asarray(ids))[0])
    )
    assert np.abs(ours - base_logits).max() > 1e-2  # the adapters matter

    out = export_hf(lora.merge(params, ad, SPEC), CFG, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert out == tmp_path / "hf"
    # torch and XLA sum in their own orders: <= 1000 terms (the vocab), 2 layers + head.
    assert_reordered_close(theirs, ours, n=1000, depth=3)
