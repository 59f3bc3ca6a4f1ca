"""Mesh and the one table that says what is sharded how, for training and for decoding.

Logical axes name what a tensor dimension *is* (`embed`, `vocab`, `heads`, ...); the rules
map each logical axis to mesh axes (`data`, `fsdp`, `tensor`). Parameters are created and
loaded straight into the shardings derived here, never unsharded first.

Two presets of the same table:

* ``TRAIN_RULES``: FSDP over ``embed``, Megatron-style tensor parallelism over heads /
  mlp / vocab, the batch over ``data x fsdp``. A dimension that does not divide its mesh
  axes is an error (:class:`ShardingError` names the tensor, dimension and axis).
* ``DECODE_RULES`` (:class:`DecodeSharding`): decoding is memory-bound on the weights and
  the KV cache, so weights are split over ``tensor`` only (no fsdp all-gather per token)
  and the rows (prompts, tokens, the cache's batch axis) over every other axis. A
  dimension that does not divide is replicated instead (e.g. 2 kv heads on tensor=4).

Arrays are named by their last path component: parameters in ``PARAM_AXES``, KV cache
arrays (``models.decoder.KVCache``, ``sampling.step.DecodeCache``) in ``CACHE_AXES``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxpt.tree import path_names, path_str

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
TRAIN_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "layers": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
}
# Decoding: weights are read once per token, so avoid fsdp all-gathers: shard over tensor
# only and put the batch over every other axis.
DECODE_RULES: dict[str, str | tuple[str, ...] | None] = {
    **TRAIN_RULES,
    "batch": ("data", "fsdp"),
    "embed": None,
}

# jaxpt param name (last path component) -> logical axes. Stacked layer params get a
# leading "layers" axis automatically.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed_VE": ("vocab", "embed"),
    "lm_head_VE": ("vocab", "embed"),
    "final_norm_E": ("norm",),
    "attn_norm_E": ("norm",),
    "mlp_norm_E": ("norm",),
    "wq_END": ("embed", "heads", "head_dim"),
    "wk_EKD": ("embed", "kv_heads", "head_dim"),
    "wv_EKD": ("embed", "kv_heads", "head_dim"),
    "wo_NDE": ("heads", "head_dim", "embed"),
    "bq_ND": ("heads", "head_dim"),
    "bk_KD": ("kv_heads", "head_dim"),
    "bv_KD": ("kv_heads", "head_dim"),
    "q_norm_D": ("head_dim",),
    "k_norm_D": ("head_dim",),
    "w_gate_EF": ("embed", "mlp"),
    "w_up_EF": ("embed", "mlp"),
    "w_down_FE": ("mlp", "embed"),
    # LoRA adapters: A maps the input dim to the rank, B the rank to the output dims.
    "lora_a": ("embed", None),
    "lora_b": (None, "mlp"),
}

# KV cache arrays (field names of models.decoder.KVCache and sampling.step.DecodeCache) ->
# logical axes; `seq` is the cache slot axis. The decode loop's per-layer split cache (one
# [R, K, S, D] array per layer) drops the leading "layers".
_KV_MODEL = ("layers", "batch", "seq", "kv_heads", "head_dim")
_KV_DECODE = ("layers", "batch", "kv_heads", "seq", "head_dim")
CACHE_AXES: dict[str, tuple[str, ...]] = {
    "k_LBSKD": _KV_MODEL,
    "v_LBSKD": _KV_MODEL,
    "positions_BS": ("batch", "seq"),
    "segment_ids_BS": ("batch", "seq"),
    "k_LRKSD": _KV_DECODE,
    "v_LRKSD": _KV_DECODE,
    "positions_RS": ("batch", "seq"),
    "segment_ids_RS": ("batch", "seq"),
}


class ShardingError(ValueError):
    """A mesh / shape combination that cannot be sharded; names the tensor, dimension,
    size and mesh axes."""


def axis_size(mesh: Mesh, axis: str) -> int:
    """Size of `axis` in `mesh`; 1 for an axis the mesh does not have."""
    return mesh.shape.get(axis, 1)


def rule_axes(rules: Mapping[str, str | tuple[str, ...] | None], logical: str) -> tuple[str, ...]:
    """The mesh axes a logical axis maps to, as a tuple (empty: replicated)."""
    axes = rules.get(logical)
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ShardingError(f"only one mesh axis may be -1, got {free}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ShardingError(f"mesh sizes must be positive or -1: {sizes}")
    if free:
        if len(devices) % known:
            raise ShardingError(
                f"{len(devices)} devices do not divide into mesh {sizes} "
                f"(the fixed axes need a multiple of {known})"
            )
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ShardingError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {len(devices)}"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: XLA's sharding propagation places intermediates (pjit semantics), so the
    # model code carries no sharding annotations of its own.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _leaf_name(path) -> tuple[str, bool]:
    keys = path_names(path)
    return keys[-1], keys[0] == "layers"


def logical_axes_for(path, ndim: int) -> tuple[str | None, ...]:
    name, in_layers = _leaf_name(path)
    if name not in PARAM_AXES:
        raise ShardingError(f"no logical axes for param {name!r}; add it to PARAM_AXES")
    axes = PARAM_AXES[name]
    if in_layers:
        axes = ("layers", *axes)
    if len(axes) != ndim:
        raise ShardingError(f"param {name!r} has {ndim} dims but logical axes {axes}")
    return axes


def spec_for(
    shape: Sequence[int],
    axes: Sequence[str | None],
    mesh: Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None],
    *,
    name: str = "tensor",
    replicate_indivisible: bool = False,
) -> PartitionSpec:
    """PartitionSpec for one tensor. A mesh axis is used once per spec (by the first
    dimension that maps to it); axes of size 1 or absent from the mesh are dropped.

    When a dimension does not divide its mesh axes: raises naming the tensor, dimension and
    mesh axis, or with ``replicate_indivisible`` keeps the longest leading run of those
    axes that divides it (none: replicated)."""
    parts = []
    used: set[str] = set()
    for dim, (size, axis) in enumerate(zip(shape, axes, strict=True)):
        mesh_axes = rule_axes(rules, axis) if axis is not None else ()
        mesh_axes = tuple(a for a in mesh_axes if axis_size(mesh, a) > 1 and a not in used)
        if replicate_indivisible:
            while mesh_axes and size % math.prod(axis_size(mesh, a) for a in mesh_axes):
                mesh_axes = mesh_axes[:-1]
        if not mesh_axes:
            parts.append(None)
            continue
        n = math.prod(axis_size(mesh, a) for a in mesh_axes)
        if size % n:
            raise ShardingError(
                f"{name}: dimension {dim} ({axis}, size {size}) does not divide mesh axis "
                f"{'x'.join(mesh_axes)} of size {n}; choose a mesh whose {axis} sharding "
                f"divides {size}"
            )
        used.update(mesh_axes)
        parts.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*parts)


def param_shardings(
    abstract_params, mesh: Mesh, rules=TRAIN_RULES, *, replicate_indivisible: bool = False
):
    """A tree of NamedSharding matching `abstract_params` (arrays or ShapeDtypeStructs)."""

    def one(path, leaf):
        axes = logical_axes_for(path, len(leaf.shape))
        spec = spec_for(
            leaf.shape,
            axes,
            mesh,
            rules,
            name=path_str(path),
            replicate_indivisible=replicate_indivisible,
        )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def batch_axes(mesh: Mesh, rules=TRAIN_RULES) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the batch dimension is split over."""
    return tuple(a for a in rule_axes(rules, "batch") if axis_size(mesh, a) > 1)


def batch_divisor(mesh: Mesh, rules=TRAIN_RULES) -> int:
    """How many ways the batch dimension is split: every batch size must divide by it."""
    return math.prod(axis_size(mesh, a) for a in batch_axes(mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=TRAIN_RULES) -> NamedSharding:
    """Batch dim over the rules' batch axes, everything else replicated."""
    axes = batch_axes(mesh, rules)
    first = axes if len(axes) > 1 else (axes[0] if axes else None)
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))


def check_batch_size(batch_size: int, mesh: Mesh, rules=TRAIN_RULES, *, what: str = "batch"):
    """Raise ShardingError naming `what`, its size and the mesh axes when `batch_size` rows
    cannot be split evenly over the batch axes."""
    n = batch_divisor(mesh, rules)
    if batch_size % n:
        axes = rule_axes(rules, "batch")
        sizes = " x ".join(f"{a}={axis_size(mesh, a)}" for a in axes)
        raise ShardingError(
            f"{what}: batch size {batch_size} is not divisible by the mesh batch axes "
            f"{sizes} ({n} shards); use a batch size that is a multiple of {n} or a mesh "
            f"with smaller {'/'.join(axes)} axes"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def auto_axes(mesh: Mesh) -> Mesh:
    """`mesh` with every axis Auto: shardings are placed on inputs and XLA propagates them
    (`jax.make_mesh` defaults to Explicit axes, which need annotations everywhere)."""
    types = getattr(mesh, "axis_types", None)
    if types is None or all(t == AxisType.Auto for t in types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(types))


# ----------------------------------------------------------------------------- decoding


@dataclasses.dataclass(frozen=True)
class DecodeSharding:
    """The decoding preset on `mesh`: ``DECODE_RULES``, indivisible dimensions replicated.

    Hashable, so it is a static argument of the jitted prefill / decode:
    ``generate(..., shardings=ds)`` constrains the KV cache with :meth:`cache`;
    :meth:`place_params` / :meth:`place_rows` put inputs where it expects them. The mesh
    may lack any of ``data`` / ``fsdp`` / ``tensor`` (missing = not split); Explicit axes
    are converted to Auto.
    """

    mesh: Mesh

    def __post_init__(self):
        object.__setattr__(self, "mesh", auto_axes(self.mesh))

    @property
    def batch_axes(self) -> tuple[str, ...]:
        return batch_axes(self.mesh, DECODE_RULES)

    @property
    def batch_divisor(self) -> int:
        return batch_divisor(self.mesh, DECODE_RULES)

    def spec(self, shape: Sequence[int], axes: Sequence[str | None], *, name="tensor"):
        return spec_for(shape, axes, self.mesh, DECODE_RULES, name=name, replicate_indivisible=True)

    # -- parameters ------------------------------------------------------------------

    def params(self, params):
        """A tree of NamedSharding shaped like `params` (the model's param dict, arrays
        or ShapeDtypeStructs)."""
        return param_shardings(params, self.mesh, DECODE_RULES, replicate_indivisible=True)

    def place_params(self, params):
        return jax.device_put(params, self.params(params))

    # -- per-row arrays and the KV cache ----------------------------------------------

    def rows(self, ndim: int = 2, size: int | None = None) -> NamedSharding:
        """Rows (axis 0) over the batch axes (only those that divide `size`, if given),
        everything else replicated."""
        size = self.batch_divisor if size is None else size
        first = self.spec((size,), ("batch",))[0]
        return NamedSharding(self.mesh, PartitionSpec(first, *([None] * (ndim - 1))))

    def place_rows(self, x: jax.Array) -> jax.Array:
        """`x` with its rows split over the batch axes (replicated when they do not
        divide its row count)."""
        return jax.device_put(x, self.rows(x.ndim, x.shape[0]))

    def check_batch(self, batch: int, num_samples: int = 1) -> None:
        """The decoded rows (`batch` prompts x `num_samples`) must split evenly over the
        batch axes (the prompts alone need not: their prefill is then replicated)."""
        check_batch_size(
            batch * num_samples,
            self.mesh,
            DECODE_RULES,
            what=f"decode rows (prompt batch {batch} x num_samples {num_samples})",
        )

    def cache(self, cache):
        """A tree of NamedSharding shaped like `cache` (a ``KVCache``, a ``DecodeCache``
        or its per-layer split; arrays or ShapeDtypeStructs), from ``CACHE_AXES``."""

        def one(path, leaf):
            names = path_names(path)
            field = next((n for n in reversed(names) if n in CACHE_AXES), None)
            if field is None:
                raise ShardingError(
                    f"no logical axes for cache array {path_str(path)}; add it to CACHE_AXES"
                )
            axes = CACHE_AXES[field]
            if len(leaf.shape) == len(axes) - 1 and axes[0] == "layers":
                axes = axes[1:]
            return NamedSharding(self.mesh, self.spec(leaf.shape, axes, name=path_str(path)))

        return jax.tree_util.tree_map_with_path(one, cache)


def decode_sharding(mesh: Mesh) -> DecodeSharding:
    """The decoding preset for `mesh` (see :class:`DecodeSharding`)."""
    return DecodeSharding(mesh)
