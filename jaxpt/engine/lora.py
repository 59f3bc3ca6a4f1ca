"""LoRA: low-rank adapters as a separate param tree, merged into the base weights.

Axis legend: L layers, r rank, I = the weight's input dims flattened, O = its output dims
flattened (for ``wq_END``: I = E, O = N*D; for ``wo_NDE``: I = N*D, O = E).

For every targeted weight ``W`` (stacked over layers, ``[L, *in, *out]``) the adapter is
``lora_a [L, *in, r]`` and ``lora_b [L, r, *out]``, and the model runs with

    W' = W + (alpha / r) * A @ B

``apply_lora(base, adapters)`` builds ``W'`` as a pure function inside the train step, so
the decoder is unchanged, only the adapters get gradients and optimizer state, and the base
(frozen) weights with the adapters off are the DPO reference model, no copy needed.
``merge`` is ``apply_lora`` without dropout, for export: a LoRA run exports a plain
checkpoint. A starts uniform in +-1/sqrt(fan_in) (PEFT's kaiming-uniform) and B at zero, so
training starts from the base model exactly.

Dropout (``dropout > 0``) zeroes entries of A (scaled by 1/(1-p)), resampled every step:
weight dropout, not PEFT's per-token dropout of the layer input (which cannot be merged
into a weight).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jaxpt.config import LoraConfig
from jaxpt.sharding import TRAIN_RULES, logical_axes_for, spec_for
from jaxpt.tree import path_names, path_str

# Weights LoRA can adapt -> number of input dims (after the layers axis).
INPUT_DIMS = {
    "wq_END": 1,
    "wk_EKD": 1,
    "wv_EKD": 1,
    "wo_NDE": 2,
    "w_gate_EF": 1,
    "w_up_EF": 1,
    "w_down_FE": 1,
}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "wq|wk|wv|wo|w_gate|w_up|w_down"

    @classmethod
    def from_config(cls, cfg: LoraConfig) -> LoraSpec | None:
        if cfg.rank == 0:
            return None
        return cls(cfg.rank, cfg.alpha, cfg.dropout, cfg.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_paths(params, spec: LoraSpec) -> list[tuple[str, ...]]:
    """Paths (param names) of the weights `spec.targets` selects; raises when it selects a
    weight LoRA does not support, or nothing."""
    pattern = re.compile(spec.targets)
    out, unsupported = [], []
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        names = tuple(path_names(path))
        if pattern.search(names[-1]):
            (out if names[-1] in INPUT_DIMS and names[0] == "layers" else unsupported).append(names)
    if unsupported:
        raise ValueError(
            f"lora.targets={spec.targets!r} selects {', '.join('.'.join(n) for n in unsupported)}, "
            f"which LoRA does not adapt; adaptable weights: {', '.join(INPUT_DIMS)}"
        )
    if not out:
        raise ValueError(
            f"lora.targets={spec.targets!r} selects no weight; adaptable: {', '.join(INPUT_DIMS)}"
        )
    return out


def _get(tree, names):
    for n in names:
        tree = tree[n]
    return tree


def _set(tree: dict, names, value) -> None:
    for n in names[:-1]:
        tree = tree.setdefault(n, {})
    tree[names[-1]] = value


def _split_shape(name: str, shape) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    n_in = INPUT_DIMS[name]
    return shape[0], tuple(shape[1 : 1 + n_in]), tuple(shape[1 + n_in :])


def lora_shapes(params, spec: LoraSpec) -> dict:
    """Abstract adapter tree: {..path..: {"lora_a": [L,*in,r], "lora_b": [L,r,*out]}}."""
    out: dict = {}
    for names in target_paths(params, spec):
        w = _get(params, names)
        L, din, dout = _split_shape(names[-1], w.shape)
        dt = w.dtype
        _set(
            out,
            names,
            {
                "lora_a": jax.ShapeDtypeStruct((L, *din, spec.rank), dt),
                "lora_b": jax.ShapeDtypeStruct((L, spec.rank, *dout), dt),
            },
        )
    return out


def init_lora(params, spec: LoraSpec, rng: jax.Array) -> dict:
    """Adapters for `params` (arrays or ShapeDtypeStructs): A uniform(+-1/sqrt(fan_in)),
    B zero."""
    shapes = lora_shapes(params, spec)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(rng, len(leaves))
    out = []
    for (path, s), key in zip(leaves, keys, strict=True):
        if path_names(path)[-1] == "lora_a":
            fan_in = math.prod(s.shape[1:-1])
            bound = 1.0 / math.sqrt(fan_in)
            out.append(jax.random.uniform(key, s.shape, jnp.float32, -bound, bound).astype(s.dtype))
        else:
            out.append(jnp.zeros(s.shape, s.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def lora_delta(a, b, scale: float):
    """(alpha/r) * A @ B reshaped to the weight's [L, *in, *out]."""
    L, r = a.shape[0], a.shape[-1]
    din, dout = a.shape[1:-1], b.shape[2:]
    a_LIr = a.reshape(L, -1, r)
    b_LrO = b.reshape(L, r, -1)
    d_LIO = jnp.einsum("lir,lro->lio", a_LIr, b_LrO, preferred_element_type=jnp.float32)
    return (scale * d_LIO).reshape(L, *din, *dout)


def apply_lora(base, adapters, spec: LoraSpec, *, rng: jax.Array | None = None):
    """Base params with every adapted weight replaced by ``W + (alpha/r) A B`` (pure).
    With ``rng`` and ``spec.dropout > 0``, entries of A are dropped (weight dropout)."""
    flat = {}
    for path, ad in jax.tree_util.tree_leaves_with_path(
        adapters, is_leaf=lambda x: isinstance(x, dict) and "lora_a" in x
    ):
        flat[tuple(path_names(path))] = ad
    keys = (
        dict(zip(flat, jax.random.split(rng, len(flat)), strict=True))
        if rng is not None and spec.dropout > 0
        else {}
    )

    def one(path, w):
        names = tuple(path_names(path))
        ad = flat.get(names)
        if ad is None:
            return w
        a = ad["lora_a"]
        if names in keys:
            keep = jax.random.bernoulli(keys[names], 1.0 - spec.dropout, a.shape)
            a = jnp.where(keep, a / (1.0 - spec.dropout), 0.0).astype(a.dtype)
        return (w + lora_delta(a, ad["lora_b"], spec.scale)).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(one, base)


def merge(base, adapters, spec: LoraSpec):
    """Plain params with the adapters folded in (no dropout), e.g. for export."""
    return apply_lora(base, adapters, spec)


def lora_shardings(adapters_abstract, mesh: Mesh, rules=TRAIN_RULES):
    """A keeps the base weight's input-dim sharding, B its output-dim sharding; the rank
    axis is replicated."""

    def one(path, leaf):
        names = path_names(path)
        wname, which = names[-2], names[-1]
        weight_path = [jax.tree_util.DictKey(n) for n in names[:-1]]
        n_in = INPUT_DIMS[wname]
        # Logical axes of the stacked base weight: layers + one per shape letter.
        axes = logical_axes_for(weight_path, _base_ndim(wname) + 1)
        layers, w = axes[0], axes[1:]
        if which == "lora_a":
            ax = (layers, *w[:n_in], None)
        else:
            ax = (layers, None, *w[n_in:])
        return NamedSharding(mesh, spec_for(leaf.shape, ax, mesh, rules, name=path_str(path)))

    return jax.tree_util.tree_map_with_path(one, adapters_abstract)


def _base_ndim(name: str) -> int:
    # Dims of the unstacked weight = the number of shape letters after the underscore.
    return len(name.rsplit("_", 1)[1])
