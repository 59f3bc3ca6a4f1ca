"""FusedAdamW.apply against optax: the same params and state as ``tx.update`` +
``optax.apply_updates``, and nothing applied on a non-finite step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import assert_reordered_close

from jaxpt.config import OptimConfig
from jaxpt.engine.state import make_optimizer


def _params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "embed_VE": jax.random.normal(k1, (16, 8)),
        "layers": {"wq_END": jax.random.normal(k2, (2, 8, 4)), "attn_norm_E": jnp.ones((2, 8))},
        "final_norm_E": jax.random.normal(k3, (8,)),
    }


def _optax_apply(tx, grads, opt_state, params):
    updates, new_opt = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt


@pytest.mark.parametrize(
    "optim",
    [
        # grads of norm ~ 10-40: clipping active at 1.0, inactive at 100
        OptimConfig(lr=0.05, weight_decay=0.1, warmup_steps=2, schedule="cosine"),
        OptimConfig(lr=0.05, weight_decay=0.0, max_grad_norm=100.0, b1=0.8, b2=0.95, eps=1e-6),
        OptimConfig(lr=0.02, weight_decay=0.3, max_grad_norm=None, schedule="constant"),
    ],
    ids=["clip-active-decay-warmup", "clip-inactive", "no-clip"],
)
def test_fused_apply_matches_optax_chain(optim):
    tx, _ = make_optimizer(optim, total_steps=6)
    params = _params(jax.random.key(0))
    ref_p, ref_s = params, tx.init(params)
    got_p, got_s = params, tx.init(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    apply = jax.jit(lambda g, s, p: tx.apply(g, s, p, grad_norm=optax.global_norm(g),
                                             finite=jnp.bool_(True)))
    for i in range(5):
        grads = jax.tree.map(lambda x, i=i: 3.0 * jax.random.normal(jax.random.key(i + 1), x.shape),
                             params)
        ref_p, ref_s = _optax_apply(tx.tx, grads, ref_s, ref_p)
        got_p, got_s = apply(grads, got_s, got_p)
        assert jax.tree.structure(got_s) == jax.tree.structure(ref_s)
        # Elementwise updates, each on its own scale, except the global norm (a sum over
        # every parameter) that scales them when clipping; i + 1 steps deep.
        for a, b in zip(jax.tree.leaves((got_p, got_s)), jax.tree.leaves((ref_p, ref_s)),
                        strict=True):
            assert_reordered_close(a, b, n=n_params, depth=i + 1)
    # the params moved (the test is not comparing two no-ops)
    assert not np.allclose(np.asarray(got_p["embed_VE"]), np.asarray(params["embed_VE"]))


def test_fused_apply_keeps_everything_on_a_nonfinite_step():
    tx, _ = make_optimizer(OptimConfig(lr=0.05, weight_decay=0.1), total_steps=6)
    params = _params(jax.random.key(0))
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.apply(grads, tx.init(params), params, grad_norm=optax.global_norm(grads),
                        finite=jnp.bool_(True))
    nan_grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    new_p, new_s = tx.apply(nan_grads, state, params, grad_norm=optax.global_norm(nan_grads),
                            finite=jnp.bool_(False))
    for a, b in zip(jax.tree.leaves((new_p, new_s)), jax.tree.leaves((params, state)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fused_apply_rejects_a_foreign_state():
    tx, _ = make_optimizer(OptimConfig(), total_steps=2)
    params = _params(jax.random.key(0))
    with pytest.raises(TypeError, match="clip -> adamw chain"):
        tx.apply(params, optax.sgd(0.1).init(params), params,
                 grad_norm=jnp.float32(1.0), finite=jnp.bool_(True))


@pytest.mark.parametrize("lr", [float("nan"), float("inf")], ids=["lr-nan", "lr-inf"])
def test_fused_apply_skips_an_update_that_would_be_nonfinite(lr):
    """Finite grads, non-finite update: nothing is applied, and the step is told so."""
    tx, _ = make_optimizer(OptimConfig(lr=lr, weight_decay=0.1), total_steps=6)
    params = _params(jax.random.key(0))
    grads = jax.tree.map(lambda x: 3.0 * jnp.ones_like(x), params)
    state = tx.init(params)
    apply = jax.jit(lambda g, s, p: tx.apply_checked(
        g, s, p, grad_norm=optax.global_norm(g), finite=jnp.bool_(True)))
    new_p, new_s, applied = apply(grads, state, params)
    assert not bool(applied)
    for a, b in zip(jax.tree.leaves((new_p, new_s)), jax.tree.leaves((params, state)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the reference chain would indeed have written non-finite values
    ref_p, _ = _optax_apply(tx.tx, grads, state, params)
    assert not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ref_p))


@pytest.mark.parametrize("lr", [0.05, float("nan")], ids=["lr-finite", "lr-nan"])
def test_update_is_finite_says_whether_apply_checked_applies(lr):
    """What a GroupOptimizer decides for all groups before applying any (engine/update.py)."""
    tx, _ = make_optimizer(OptimConfig(lr=lr), total_steps=6)
    params = _params(jax.random.key(0))
    grads = jax.tree.map(lambda x: 3.0 * jnp.ones_like(x), params)
    state = tx.init(params)
    norm = optax.global_norm(grads)
    _, _, applied = tx.apply_checked(grads, state, params, grad_norm=norm, finite=jnp.bool_(True))
    assert bool(tx.update_is_finite(state, norm)) == bool(applied) == (lr == lr)
    assert not bool(tx.update_is_finite(state, jnp.float32(jnp.nan)))  # clip scale 1 / nan


def test_fused_adamw_refuses_eps_zero():
    """eps 0 divides 0 by 0 on a param whose gradients were all zero (unused rows)."""
    with pytest.raises(ValueError, match="eps must be > 0"):
        make_optimizer(OptimConfig(eps=0.0), total_steps=2)


def test_optax_fallback_step_checks_the_updated_tree():
    """A step built on a plain optax transform checks the new params and state."""
    from jaxpt.engine.state import TrainState, make_train_step

    # float32 also under JAX_ENABLE_X64, where 3e38 would not overflow
    params = jax.tree.map(lambda x: x.astype(jnp.float32), _params(jax.random.key(0)))
    tx = optax.sgd(3e38)  # finite lr, finite grads, the update overflows to inf

    def loss_fn(p, batch, rng, stats):
        return 10.0 * sum(jnp.sum(x) for x in jax.tree.leaves(p)), {}

    state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.key(0))
    step = make_train_step(loss_fn, tx, lambda c: 3e38)
    new, metrics = jax.jit(step)(state, {"x": jnp.zeros((2, 3))})
    assert float(metrics["skipped"]) == 1.0
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
