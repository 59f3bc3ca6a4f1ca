"""Algorithm name -> trainer entry point, for ``jaxpt train CONFIG``.

A trainer module ``jaxpt/train/<name>.py`` registers itself::

    @register_trainer("dpo")
    def train_dpo(cfg: RunConfig, *, callbacks=(), stop=None) -> LoopResult: ...

and ``get_trainer("dpo")`` imports ``jaxpt.train.dpo`` on first use, so the CLI dispatches on
``cfg.algorithm`` without a list of algorithms.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

_TRAINERS: dict[str, Callable] = {}


def register_trainer(name: str):
    def do(fn):
        _TRAINERS[name] = fn
        return fn

    return do


def get_trainer(name: str) -> Callable:
    if name not in _TRAINERS and re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        try:
            importlib.import_module(f"jaxpt.train.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"jaxpt.train.{name}":
                raise
    if name not in _TRAINERS:
        known = sorted(_TRAINERS) or ["sft"]
        raise ValueError(f"algorithm={name!r} has no trainer; known: {', '.join(known)}")
    return _TRAINERS[name]
