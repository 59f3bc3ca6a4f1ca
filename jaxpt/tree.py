"""Small pytree helpers shared by weights, sharding, LoRA and checkpoints."""

from __future__ import annotations


def path_names(path) -> list[str]:
    """A jax tree path as param names, without nnx's trailing `.value` attribute key."""
    names = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", None))
        name = str(k) if name is None else str(name)
        if name != "value":
            names.append(name)
    return names


def path_str(path) -> str:
    return ".".join(path_names(path))
