"""The decoding sharding preset: batch rows over `data`, weights over `tensor`.

Axis legend (the letters at the end of every parameter name, see models/decoder.py):
  L layers   E embed   V vocab   F mlp   N query heads   K kv heads   D head_dim
  B/R batch rows   S cache slots

Decoding is memory-bound on the weights and the KV cache, so the preset is Megatron-style
tensor parallelism plus data parallelism over rows:

  * parameter axes N, K, F and V are split over the `tensor` mesh axis when their size
    divides it (anything else, and every parameter when the mesh has no `tensor` axis,
    is replicated);
  * every per-row array (prompts, tokens, the KV cache's B axis) is split over `data`;
  * the KV cache's kv-head axis follows the k/v projections over `tensor`.

The mesh's axes are used as `Auto` (XLA propagates shardings from the placed inputs and
the cache constraints); a mesh built with Explicit axes is converted.
`DecodeSharding` is hashable, so it is a static argument of the jitted prefill / decode;
`generate(..., shardings=ds)` constrains the cache with it, and `place_params` /
`place_rows` put inputs where it expects them. Later issues (GRPO rollouts, eval) reuse
this preset; the training layout lives in `jaxpt/sharding.py`.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import KVCache
from jaxpt.sampling.step import DecodeCache

TENSOR_LETTERS = frozenset("NKFV")  # parameter axes split over `tensor`


class ShardingError(ValueError):
    """A mesh / shape combination the preset cannot use; names the axis and size."""


def _axis_letters(name: str, ndim: int, stacked: bool) -> str | None:
    """'wq_END' -> 'LEND' when stacked over layers; None if the suffix does not fit."""
    if "_" not in name:
        return None
    letters = name.rsplit("_", 1)[1]
    if not letters.isalpha() or not letters.isupper():
        return None
    if stacked:
        letters = "L" + letters
    return letters if len(letters) == ndim else None


@dataclasses.dataclass(frozen=True)
class DecodeSharding:
    mesh: Mesh
    data_axis: str | None = "data"
    tensor_axis: str | None = "tensor"

    def __post_init__(self):
        # The preset places arrays and lets XLA propagate (GSPMD), so it works on a mesh
        # with Auto axes; `jax.make_mesh` now defaults to Explicit ones, so convert.
        types = getattr(self.mesh, "axis_types", None)
        if types is not None and any(t != AxisType.Auto for t in types):
            auto = Mesh(
                self.mesh.devices,
                self.mesh.axis_names,
                axis_types=(AxisType.Auto,) * len(self.mesh.axis_names),
            )
            object.__setattr__(self, "mesh", auto)
        for what, axis in (("data_axis", self.data_axis), ("tensor_axis", self.tensor_axis)):
            if axis is not None and axis not in self.mesh.axis_names:
                raise ShardingError(
                    f"{what}={axis!r} is not an axis of the mesh {self.mesh.axis_names}"
                )

    @property
    def data_size(self) -> int:
        return self.mesh.shape[self.data_axis] if self.data_axis else 1

    @property
    def tensor_size(self) -> int:
        return self.mesh.shape[self.tensor_axis] if self.tensor_axis else 1

    def _tensor_if_divides(self, size: int) -> str | None:
        t = self.tensor_size
        return self.tensor_axis if t > 1 and size % t == 0 else None

    # -- parameters ------------------------------------------------------------------

    def param_spec(self, path_keys: list[str], shape: tuple[int, ...]) -> P:
        name = path_keys[-1]
        stacked = path_keys[0] == "layers"
        letters = _axis_letters(name, len(shape), stacked)
        if letters is None:
            return P()
        spec = [
            self._tensor_if_divides(size) if letter in TENSOR_LETTERS else None
            for letter, size in zip(letters, shape, strict=True)
        ]
        # A mesh axis may appear once per spec: keep only the first tensor-split axis.
        seen = False
        for i, axis in enumerate(spec):
            if axis is not None:
                if seen:
                    spec[i] = None
                seen = True
        return P(*spec)

    def params(self, params):
        """A tree of NamedSharding shaped like `params` (an nnx.State or any pytree
        whose leaf paths end in jaxpt parameter names)."""

        def one(path, leaf):
            return NamedSharding(self.mesh, self.param_spec(_path_keys(path), leaf.shape))

        return jax.tree_util.tree_map_with_path(one, params)

    def place_params(self, params):
        return jax.device_put(params, self.params(params))

    # -- per-row arrays --------------------------------------------------------------

    def rows(self, ndim: int = 2) -> NamedSharding:
        """Rows (axis 0) over `data`, everything else replicated."""
        return NamedSharding(self.mesh, P(self.data_axis, *([None] * (ndim - 1))))

    def place_rows(self, x: jax.Array) -> jax.Array:
        if x.shape[0] % self.data_size:
            raise ShardingError(
                f"batch dimension {x.shape[0]} is not divisible by mesh axis "
                f"{self.data_axis!r} of size {self.data_size}"
            )
        return jax.device_put(x, self.rows(x.ndim))

    def check_batch(self, batch: int, num_samples: int = 1) -> None:
        if batch % self.data_size:
            raise ShardingError(
                f"prompt batch {batch} is not divisible by mesh axis {self.data_axis!r} "
                f"of size {self.data_size}; pad the batch (e.g. repeat a prompt) or use a "
                "smaller data axis"
            )

    def cache(self, cfg: ModelConfig, rows: int, slots: int, *, layout: str = "decode"):
        """Tree of NamedSharding for a cache of `rows` rows and `slots` slots: a
        `DecodeCache` (layout "decode", [L, R, K, S, D]; "decode_split", its per-layer
        tuples, see `step.split_cache`) or the model's `KVCache` (layout "model",
        [L, B, S, K, D])."""
        data = self.data_axis if rows % self.data_size == 0 else None
        heads = self._tensor_if_divides(cfg.num_kv_heads)
        row = NamedSharding(self.mesh, P(data, None))
        if layout == "model":
            kv = NamedSharding(self.mesh, P(None, data, None, heads, None))
            return KVCache(k_LBSKD=kv, v_LBSKD=kv, positions_BS=row, segment_ids_BS=row)
        if layout == "decode_split":
            kv = (NamedSharding(self.mesh, P(data, heads, None, None)),) * cfg.num_layers
        elif layout == "decode":
            kv = NamedSharding(self.mesh, P(None, data, heads, None, None))
        else:
            raise ValueError(f"layout={layout!r}: use 'decode', 'decode_split' or 'model'")
        return DecodeCache(k_LRKSD=kv, v_LRKSD=kv, positions_RS=row, segment_ids_RS=row)


def decode_sharding(
    mesh: Mesh, *, data_axis: str | None = "data", tensor_axis: str | None = "tensor"
) -> DecodeSharding:
    """The preset for `mesh`; an axis name the mesh lacks means 'not split'."""
    names = mesh.axis_names
    return DecodeSharding(
        mesh,
        data_axis=data_axis if data_axis in names else None,
        tensor_axis=tensor_axis if tensor_axis in names else None,
    )


def _path_keys(path) -> list[str]:
    keys = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", None))
        name = str(k) if name is None else str(name)
        if name != "value":
            keys.append(name)
    return keys
