"""Algorithm name -> trainer entry point, for ``jaxpt train CONFIG``.

A trainer module ``jaxpt/train/<name>.py`` registers itself, either its run builder (the
entry point builds the run and runs the loop)::

    train_dpo = register_builder("dpo", build_dpo_trainer)

or a whole entry point, where a run is more than one loop (rft samples, then trains)::

    @register_trainer("rft")
    def train_rft(cfg: RunConfig, *, callbacks=(), stop=None) -> LoopResult: ...

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


def register_builder(
    name: str, build: Callable, *, after: Callable | None = None
) -> Callable:
    """Register ``build(cfg) -> Trainer`` as algorithm ``name``; returns its entry point
    ``train(cfg, *, callbacks=(), stop=None) -> LoopResult``: build, run the loop, then
    ``after(cfg)`` (e.g. a printed summary) when given."""

    def train(cfg, *, callbacks=(), stop=None):
        from jaxpt.train.loop import run

        result = run(build(cfg), callbacks=callbacks, stop=stop)
        if after is not None:
            after(cfg)
        return result

    train.__name__ = train.__qualname__ = f"train_{name}"
    train.__doc__ = f"Build the {name} run from ``cfg`` (``{build.__name__}``) and train it."
    return register_trainer(name)(train)


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
