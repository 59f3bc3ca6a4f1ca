"""Mesh and the one table that says what is sharded how.

Logical axes name what a tensor dimension *is* (`embed`, `vocab`, `heads`, ...); the rules
map each logical axis to mesh axes (`data`, `fsdp`, `tensor`). Parameters are created and
loaded straight into the shardings derived here, never unsharded first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


class ShardingError(ValueError):
    pass


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
) -> PartitionSpec:
    """PartitionSpec for one tensor; raises naming the tensor, dimension and mesh axis when
    a dimension does not divide its mesh axes."""
    parts = []
    used: set[str] = set()
    for dim, (size, axis) in enumerate(zip(shape, axes, strict=True)):
        mesh_axes = rules.get(axis) if axis is not None else None
        if mesh_axes is None:
            parts.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
        if not mesh_axes:
            parts.append(None)
            continue
        n = math.prod(mesh.shape[a] for a in mesh_axes)
        if size % n:
            raise ShardingError(
                f"{name}: dimension {dim} ({axis}, size {size}) does not divide mesh axis "
                f"{'x'.join(mesh_axes)} of size {n}; choose a mesh whose {axis} sharding "
                f"divides {size}"
            )
        used.update(mesh_axes)
        parts.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*parts)


def param_shardings(abstract_params, mesh: Mesh, rules=TRAIN_RULES):
    """A tree of NamedSharding matching `abstract_params` (arrays or ShapeDtypeStructs)."""

    def one(path, leaf):
        axes = logical_axes_for(path, len(leaf.shape))
        name = path_str(path)
        return NamedSharding(mesh, spec_for(leaf.shape, axes, mesh, rules, name=name))

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=TRAIN_RULES) -> NamedSharding:
    """Batch dim over the rules' batch axes, everything else replicated."""
    batch_axes = rules["batch"]
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    batch_axes = tuple(a for a in batch_axes if mesh.shape[a] > 1)
    first = batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None)
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh, rules=TRAIN_RULES) -> int:
    batch_axes = rules["batch"]
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    return math.prod(mesh.shape[a] for a in batch_axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
