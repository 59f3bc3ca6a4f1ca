"""Train state, optimizer, and the pure train step shared by every trainer.

Axis legend: B batch rows (global), k micro-batches (``grad_accum``), b = B / k rows per
micro-batch, T tokens.

``TrainState`` is a plain pytree: ``params`` (trained: the whole model, or only the LoRA
adapters; or a dict of param groups, e.g. ``{"policy": ..., "value": ...}``, see below),
``opt_state`` (optax state of ``params``), ``step`` (int32: train steps taken,
i.e. batches consumed, skipped steps included), ``rng`` (a raw uint32[2] key, split once per
step) and ``frozen`` (params that get no gradient and no optimizer state: the LoRA base
weights, or a DPO reference copy; None when there are none). Checkpoints store everything
but ``frozen``, which is reloaded from the model spec.

A trainer supplies one function, the loss of one micro-batch::

    loss_fn(model_params, micro_batch, rng, stats) -> (loss, metrics)

where ``model_params`` is the full model param dict (LoRA already applied), ``stats`` is
``batch_stats_fn(state, batch)`` computed once on the whole batch (e.g. the global target
token count), and every returned value, loss included, is normalized by whole-batch
counts, so that **summing over the k micro-batches gives the full-batch value**. The step
sums loss, gradients and metrics over micro-batches, so accumulated == full batch.

Several trained modules (a policy and a value head): ``params`` is a dict of groups and
``make_optimizer`` gets one ``OptimConfig`` per group (``{"policy": cfg.optim, "value":
critic_optim}``), giving a ``GroupOptimizer`` (``engine/update.py``): one loss over all
groups (``params_fn`` maps the group dict to what the loss takes; identity passes it as
is), the gradients a dict of the same groups, each group clipped and stepped by its own
config, one skip flag for the whole step, one checkpoint. Single-module runs are as before.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxpt.config import OptimConfig
from jaxpt.engine.adamw import FusedAdamW
from jaxpt.engine.update import GroupOptimizer, apply_update, update_count
from jaxpt.sharding import batch_sharding, check_batch_size, replicated
from jaxpt.tree import path_names

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array, Mapping[str, Any]], tuple]
BatchStatsFn = Callable[[Any, Mapping[str, jax.Array]], Mapping[str, Any]]
ParamsFn = Callable[[Any, Any, jax.Array], Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    frozen: Any = None

    def replace(self, **kw) -> TrainState:
        return dataclasses.replace(self, **kw)

    def saveable(self) -> dict[str, Any]:
        """What a checkpoint stores (everything but ``frozen``)."""
        return {
            "params": self.params,
            "opt_state": self.opt_state,
            "step": self.step,
            "rng": self.rng,
        }


# ----------------------------------------------------------------------------- optimizer

# Param names that get no weight decay (HF Trainer: biases and norm weights): the decoder's,
# and flax.nnx's ("bias", "scale") for heads trained beside it (a value head).
NO_DECAY = ("norm", "bq_ND", "bk_KD", "bv_KD", "bias", "scale")


def decay_mask(params) -> Any:
    """True for leaves that get weight decay: everything but norms and biases."""

    def one(path, _):
        name = path_names(path)[-1] if path else ""
        return not any(tag in name for tag in NO_DECAY)

    return jax.tree_util.tree_map_with_path(one, params)


def make_schedule(optim: OptimConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """Learning rate of the update that follows ``count`` applied updates (HF semantics):
    linear warmup from 0 over the warmup steps, then cosine / linear decay to
    ``lr * min_lr_ratio`` at ``total_steps``, or constant."""
    total = max(int(total_steps), 1)
    warmup = optim.warmup_steps or int(math.ceil(optim.warmup_ratio * total))
    lr, floor, kind = optim.lr, optim.min_lr_ratio, optim.schedule

    def schedule(count):
        c = jnp.asarray(count, jnp.float32)
        warm = c / max(warmup, 1)
        progress = jnp.clip((c - warmup) / max(total - warmup, 1), 0.0, 1.0)
        if kind == "constant":
            decay = jnp.ones_like(progress)
        elif kind == "linear":
            decay = floor + (1.0 - floor) * (1.0 - progress)
        else:
            decay = floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return lr * jnp.where(c < warmup, warm, decay)

    return schedule


def make_optimizer(optim: OptimConfig | Mapping[str, OptimConfig], total_steps: int):
    """(AdamW with global-norm clipping and the warmup/decay schedule, the schedule).

    The optimizer is the optax chain wrapped in ``FusedAdamW``: optax's ``init`` /
    ``update`` and state, plus the fused ``apply`` the train step uses.

    ``optim`` a dict ``{group: OptimConfig}``: (``GroupOptimizer`` of one such AdamW per
    group, ``{group: schedule}``), for params that are a dict of the same groups."""
    if isinstance(optim, Mapping):
        made = {g: make_optimizer(o, total_steps) for g, o in optim.items()}
        return (
            GroupOptimizer({g: tx for g, (tx, _) in made.items()}),
            {g: schedule for g, (_, schedule) in made.items()},
        )
    schedule = make_schedule(optim, total_steps)
    parts = []
    if optim.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(optim.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask,
        )
    )
    return (
        FusedAdamW(
            tx=optax.chain(*parts),
            schedule=schedule,
            optim=optim,
            decay_mask=decay_mask,
        ),
        schedule,
    )


# ----------------------------------------------------------------------------- shardings


def shardings_like_params(tree, param_shardings, mesh: Mesh):
    """Shardings for a tree whose leaves mirror params (optax mu/nu): a leaf whose path ends
    with a param's path and has its shape gets that param's sharding; others replicate."""
    by_path = {
        tuple(path_names(p)): s for p, s in jax.tree_util.tree_leaves_with_path(param_shardings)
    }
    rep = replicated(mesh)

    def one(path, leaf):
        names = tuple(path_names(path))
        for n in range(1, len(names) + 1):
            s = by_path.get(names[-n:])
            if s is not None and len(s.spec) <= len(leaf.shape):
                return s
        return rep

    return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(
    abstract_state: TrainState, params_sh, frozen_sh, mesh: Mesh, *, groups: Sequence[str] = ()
) -> TrainState:
    """Shardings of a train state; with ``groups`` (a ``GroupOptimizer``'s), each group's
    optimizer state follows that group's params."""
    rep = replicated(mesh)
    if groups:
        opt_sh = {
            g: shardings_like_params(abstract_state.opt_state[g], params_sh[g], mesh)
            for g in groups
        }
    else:
        opt_sh = shardings_like_params(abstract_state.opt_state, params_sh, mesh)
    return TrainState(
        params=params_sh,
        opt_state=opt_sh,
        step=rep,
        rng=rep,
        frozen=frozen_sh,
    )


def batch_shardings(batch_ndims, mesh: Mesh):
    """Batch-dim sharding for every leaf of a batch: ``batch_ndims`` is the batch's tree
    (a dict, or a typed batch dataclass) with each leaf's ndim, or arrays whose ndim is
    read; the result has the same tree with a NamedSharding per leaf."""
    ndim = lambda x: x if isinstance(x, int) else x.ndim  # noqa: E731
    return jax.tree.map(lambda x: batch_sharding(mesh, ndim(x)), batch_ndims)


def init_state(
    params,
    tx: optax.GradientTransformation,
    *,
    seed: int,
    params_sh,
    mesh: Mesh,
    frozen=None,
    frozen_sh=None,
) -> tuple[TrainState, TrainState]:
    """(state, its shardings). The optimizer state is built by a jit whose outputs land in
    the shardings derived from the params' (never unsharded). Params (and frozen) are put
    in their shardings (a no-op when they are already there), so the jitted step sees the
    same committed inputs on every call and compiles once.

    Abstract params (``jax.ShapeDtypeStruct`` leaves: compiling for a TPU slice this machine
    does not have, ``jaxpt plan --compile``) give an abstract state, every leaf a
    ``ShapeDtypeStruct`` carrying its sharding; nothing is allocated."""
    abstract = jax.eval_shape(
        lambda p: TrainState(p, tx.init(p), jnp.zeros((), jnp.int32), jax.random.PRNGKey(0)),
        params,
    )
    groups = tx.groups if isinstance(tx, GroupOptimizer) else ()
    shardings = state_shardings(abstract, params_sh, frozen_sh, mesh, groups=groups)
    if is_abstract(params):
        return with_shardings(dataclasses.replace(abstract, frozen=frozen), shardings), shardings
    params = jax.device_put(params, params_sh)
    if frozen is not None:
        frozen = jax.device_put(frozen, frozen_sh)

    def make(p):
        return tx.init(p), jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed)

    opt_state, step, rng = jax.jit(
        make,
        in_shardings=(params_sh,),
        out_shardings=(shardings.opt_state, shardings.step, shardings.rng),
    )(params)
    return TrainState(params, opt_state, step, rng, frozen), shardings


def is_abstract(tree) -> bool:
    """Whether every leaf of ``tree`` is a ``jax.ShapeDtypeStruct`` (shapes, no data)."""
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def with_shardings(tree, shardings):
    """``ShapeDtypeStruct``s of ``tree``'s leaves carrying ``shardings`` (the same tree)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


# ----------------------------------------------------------------------------- the step


def identity_params(params, frozen, rng):
    return params


def split_micro(batch, k: int):
    """[B, ...] -> [k, B/k, ...] for every leaf; micro-batch j holds rows j, j + k, j + 2k,
    ... so that every data shard contributes equally to every micro-batch (the sharded
    leading dim is kept contiguous)."""

    def one(x):
        if x.shape[0] % k:
            raise ValueError(f"batch dim {x.shape[0]} is not divisible by grad_accum={k}")
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(one, batch)


def accumulate_grads(
    loss_fn: LossFn,
    params,
    frozen,
    batch,
    rng: jax.Array,
    stats: Mapping[str, Any],
    *,
    grad_accum: int = 1,
    params_fn: ParamsFn = identity_params,
):
    """(loss, metrics, grads) summed over ``grad_accum`` micro-batches of ``batch``.

    Micro-batch j (rows j, j+k, ...) gets ``fold_in(rng, j)``; its rng is split into one key
    for ``params_fn`` (LoRA dropout) and one for ``loss_fn``."""

    def micro_loss(p, mb, r):
        r_params, r_loss = jax.random.split(r)
        return loss_fn(params_fn(p, frozen, r_params), mb, r_loss, stats)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if grad_accum == 1:
        (loss, metrics), grads = grad_fn(params, batch, jax.random.fold_in(rng, 0))
        return loss, metrics, grads
    micro = split_micro(batch, grad_accum)

    def body(carry, xs):
        mb, i = xs
        (loss_i, metrics_i), grads_i = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss_i, metrics_i, grads_i)), None

    (loss_s, metrics_s), grads_s = jax.eval_shape(
        grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng
    )
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_s, metrics_s, grads_s))
    (loss, metrics, grads), _ = jax.lax.scan(
        body, init, (micro, jnp.arange(grad_accum, dtype=jnp.uint32))
    )
    return loss, metrics, grads


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: Callable | Mapping[str, Callable],
    *,
    grad_accum: int = 1,
    batch_stats_fn: BatchStatsFn | None = None,
    params_fn: ParamsFn = identity_params,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure step ``step(state, batch) -> (state, metrics)``.

    ``params_fn(params, frozen, rng)`` assembles the model params from the trained params
    (identity, or LoRA's ``apply_lora``). Gradients and losses of the ``grad_accum``
    micro-batches are summed (loss_fn normalizes by whole-batch counts, see the module doc).

    Non-finite loss or gradient norm, or a non-finite update (FusedAdamW: a non-finite
    learning rate or clip scale, see ``FusedAdamW.apply_checked``; any other optax
    transform: the updated params and state are checked): params and optimizer state are
    left unchanged (the update is not applied, the schedule does not advance); ``step``
    and ``rng`` still advance (the batch is consumed), and ``metrics["skipped"]`` is 1.0.
    Metrics added here: ``grad_norm`` (before clipping), ``learning_rate`` (of this
    update), ``skipped``.

    ``tx`` a ``GroupOptimizer`` (``schedule`` then ``{group: schedule}``, as
    ``make_optimizer`` returns them): ``params`` is a dict of its groups and the update is
    ``GroupOptimizer.apply`` (one skip for all groups; ``grad_norm/<group>`` and
    ``learning_rate/<group>`` added).
    """

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        stats = batch_stats_fn(state, batch) if batch_stats_fn is not None else {}
        loss, metrics, grads = accumulate_grads(
            loss_fn,
            state.params,
            state.frozen,
            batch,
            step_rng,
            stats,
            grad_accum=grad_accum,
            params_fn=params_fn,
        )
        if isinstance(tx, GroupOptimizer):
            new_params, new_opt, applied, opt_metrics = tx.apply(
                grads, state.opt_state, state.params, loss=loss, schedules=schedule,
                step=state.step,
            )
        else:
            grad_norm = optax.global_norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            count = update_count(state.opt_state)
            lr = schedule(state.step if count is None else count)
            new_params, new_opt, applied = apply_update(
                tx, grads, state.opt_state, state.params, grad_norm=grad_norm, finite=finite
            )
            opt_metrics = {"grad_norm": grad_norm, "learning_rate": lr}
        metrics = {
            **metrics,
            "loss": loss,
            **opt_metrics,
            "skipped": 1.0 - applied.astype(jnp.float32),
        }
        new_state = TrainState(
            params=new_params,
            opt_state=new_opt,
            step=state.step + 1,
            rng=rng,
            frozen=state.frozen,
        )
        return new_state, metrics

    return step


def compile_step(step: Callable, shardings: TrainState, batch_sh, mesh: Mesh):
    """jit the step once with explicit shardings; the state argument is donated."""
    return jax.jit(
        step,
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


def put_batch(batch, batch_sh):
    """Host (numpy, this process's rows) -> global arrays in the batch shardings.

    ``batch_sh`` is a dict (the host batch may hold more keys; only these are put) or the
    tree of a typed batch (the host batch has the same tree). Raises ShardingError naming
    the key, its batch size and the mesh axes when the rows do not split evenly over
    data x fsdp."""

    def one(name, sh, x):
        rows = len(x) * jax.process_count()
        check_batch_size(rows, sh.mesh, what=f"batch key {name!r}")
        return jax.make_array_from_process_local_data(sh, x)

    if isinstance(batch_sh, Mapping):
        out = {}
        for k, sh in batch_sh.items():
            if k not in batch:
                raise KeyError(f"batch is missing key {k!r} (has {sorted(batch)})")
            out[k] = one(k, sh, batch[k])
        return out
    return jax.tree_util.tree_map_with_path(
        lambda path, sh, x: one(".".join(path_names(path)), sh, x), batch_sh, batch
    )
