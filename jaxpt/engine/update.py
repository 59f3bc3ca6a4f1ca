"""One optimizer update with the non-finite guard: one optimizer over all trained params, or
one per param group (a policy and its value head, each with its own lr and clipping).

``apply_update`` is the single-optimizer update of ``state.make_train_step``.

A grouped run trains a dict of modules, ``params = {"policy": ..., "value": ...}``, with a
``GroupOptimizer`` (``state.make_optimizer`` given one ``OptimConfig`` per group): its
state is ``{group: that group's optimizer state}``, so ``TrainState``, its shardings, the
accumulated gradients (the same dict) and the checkpoint (one, holding every group) need
nothing more. Its ``apply`` clips each group by that group's own gradient norm and config,
and skips the whole step (every group unchanged) when the loss, any group's gradient norm
or any group's update is not finite: a critic that diverges must not move the policy alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxpt.engine.adamw import FusedAdamW
from jaxpt.tree import path_names


def all_finite(tree) -> jax.Array:
    """True when every float leaf of ``tree`` is finite (one bool scalar, on device)."""
    oks = [
        jnp.isfinite(x).all()
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(oks)) if oks else jnp.bool_(True)


def update_count(opt_state) -> jax.Array | None:
    """Number of updates applied so far (the first `count` leaf of the optax state), or
    None for optimizers without one."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        if path_names(path)[-1] == "count":
            return leaf
    return None


def _keep(applied, new, old):
    return jax.tree.map(lambda n, o: jnp.where(applied, n, o), new, old)


def apply_update(tx, grads, opt_state, params, *, grad_norm, finite):
    """(new params, new opt_state, applied): ``tx``'s update where ``finite`` (loss and
    gradient norm finite) and the update is finite, else the params and state unchanged.

    FusedAdamW checks its scalars (``FusedAdamW.apply_checked``); any other optax
    transform has its updated params and state checked, since finite grads can still give
    a non-finite update (lr nan, overflow)."""
    if isinstance(tx, FusedAdamW):
        return tx.apply_checked(grads, opt_state, params, grad_norm=grad_norm, finite=finite)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    applied = finite & all_finite((new_params, new_opt))
    return _keep(applied, new_params, params), _keep(applied, new_opt, opt_state), applied


@dataclasses.dataclass(frozen=True)
class GroupOptimizer:
    """One optax transform per param group; params, grads and state are ``{group: tree}``.

    optax-compatible ``init`` / ``update`` (each group's own), plus ``apply``, the guarded
    update of the train step. Groups keep their order (the first is the "main" one whose
    lr is logged as ``learning_rate``)."""

    txs: Mapping[str, optax.GradientTransformation]

    def __post_init__(self):
        if not self.txs:
            raise ValueError("GroupOptimizer needs at least one param group")

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.txs)

    def check(self, tree, what: str = "params") -> None:
        keys = tuple(tree) if isinstance(tree, Mapping) else None
        if keys is None or set(keys) != set(self.groups):
            raise ValueError(
                f"GroupOptimizer: {what} must be a dict of the groups {list(self.groups)}, "
                f"got {list(keys) if keys is not None else type(tree).__name__}"
            )

    def init(self, params) -> dict[str, Any]:
        self.check(params)
        return {g: tx.init(params[g]) for g, tx in self.txs.items()}

    def update(self, grads, state, params=None):
        self.check(grads, "grads")
        out = {
            g: tx.update(grads[g], state[g], None if params is None else params[g])
            for g, tx in self.txs.items()
        }
        return {g: u for g, (u, _) in out.items()}, {g: s for g, (_, s) in out.items()}

    def apply(
        self,
        grads,
        opt_state,
        params,
        *,
        loss: jax.Array,
        schedules: Mapping[str, Callable[[jax.Array], jax.Array]],
        step: jax.Array,
    ) -> tuple[dict, dict, jax.Array, dict[str, jax.Array]]:
        """(new params, new opt_state, applied, metrics) for one step.

        Every group's update is staged and checked before any is applied, so ``applied``
        (loss finite, every group's gradient norm finite, every group's update finite) is
        one flag for all groups. Metrics: ``grad_norm`` (the global norm over all groups,
        before clipping), ``learning_rate`` (the first group's), and per group
        ``grad_norm/<group>``, ``learning_rate/<group>``."""
        self.check(grads, "grads")
        norms = {g: optax.global_norm(grads[g]) for g in self.groups}
        applied = jnp.isfinite(loss)
        for g in self.groups:
            applied = applied & jnp.isfinite(norms[g])
        staged = {}
        for g, tx in self.txs.items():
            if isinstance(tx, FusedAdamW):  # its check is on scalars: nothing to stage
                applied = applied & tx.update_is_finite(opt_state[g], norms[g])
            else:
                updates, new_opt = tx.update(grads[g], opt_state[g], params[g])
                staged[g] = (optax.apply_updates(params[g], updates), new_opt)
                applied = applied & all_finite(staged[g])
        new_params, new_opt = {}, {}
        for g, tx in self.txs.items():
            if g in staged:
                new_params[g] = _keep(applied, staged[g][0], params[g])
                new_opt[g] = _keep(applied, staged[g][1], opt_state[g])
            else:
                new_params[g], new_opt[g], _ = tx.apply_checked(
                    grads[g], opt_state[g], params[g], grad_norm=norms[g], finite=applied
                )
        lrs = {}
        for g in self.groups:
            count = update_count(opt_state[g])
            lrs[g] = schedules[g](step if count is None else count)
        metrics = {
            "grad_norm": jnp.sqrt(sum(jnp.square(n) for n in norms.values())),
            "learning_rate": lrs[self.groups[0]],
            **{f"grad_norm/{g}": n for g, n in norms.items()},
            **{f"learning_rate/{g}": lr for g, lr in lrs.items()},
        }
        return new_params, new_opt, applied, metrics
