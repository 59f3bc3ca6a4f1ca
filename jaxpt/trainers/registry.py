"""Algorithm name -> trainer entry point, for ``jaxpt train CONFIG``.

A trainer module ``jaxpt/trainers/<name>.py`` registers its algorithm, either its run builder (the
entry point builds the run and runs the loop)::

    train_dpo = register_builder("dpo", build_dpo_trainer)

or a whole entry point, where a run is more than one loop (rft samples, then trains)::

    @register_trainer("rft")
    def train_rft(cfg: RunConfig, *, callbacks=(), stop=None) -> LoopResult: ...

and ``get_trainer("dpo")`` imports ``jaxpt.trainers.dpo`` on first use (which imports
``jaxpt.algorithms.dpo``), so the CLI dispatches on ``cfg.algorithm`` without a list of
algorithms.

An algorithm outside jaxpt is named by its module's import path (``algorithm:
mypkg.my_algo``); that one module (or one it imports) registers under the path::

    train_my_algo = register_builder(__name__, build_my_algo_trainer)

(``docs/adding_an_algorithm.md`` walks through one.)
"""

from __future__ import annotations

from collections.abc import Callable

from jaxpt.config import import_algorithm

_TRAINERS: dict[str, Callable] = {}


def register_trainer(name: str):
    def do(fn):
        _TRAINERS[name] = fn
        return fn

    return do


def register_builder(
    name: str, build: Callable, *, summary: tuple[str, str] | None = None
) -> Callable:
    """Register ``build(cfg) -> Trainer`` as algorithm ``name``; returns its entry point
    ``train(cfg, *, callbacks=(), stop=None) -> LoopResult``: build, run the loop, then,
    with ``summary=(curve_key, eval_key)``, print the run's curve of ``curve_key`` and its
    held-out ``eval_key`` readings (``jaxpt.engine.report.print_run_summary``)."""

    def train(cfg, *, callbacks=(), stop=None):
        from jaxpt.engine.loop import run

        result = run(build(cfg), callbacks=callbacks, stop=stop)
        if summary is not None:
            from jaxpt.engine.report import print_run_summary

            print_run_summary(cfg.out_dir, curve_key=summary[0], eval_key=summary[1])
        return result

    train.__name__ = train.__qualname__ = f"train_{name}"
    train.__doc__ = f"Build the {name} run from ``cfg`` (``{build.__name__}``) and train it."
    return register_trainer(name)(train)


def get_trainer(name: str) -> Callable:
    """The entry point of algorithm `name` (a jaxpt algorithm's name, or the import path of
    a module outside jaxpt), importing its module on first use. Raises ValueError naming
    the ``algorithm`` key when the module is missing or registered no trainer as `name`."""
    if name not in _TRAINERS:
        import_algorithm(name)
    if name in _TRAINERS:
        return _TRAINERS[name]
    if "." in name:
        raise ValueError(
            f"algorithm={name!r}: module {name} was imported but registered no trainer under "
            "that name; it must call register_builder(__name__, build) (or decorate its "
            "entry point with @register_trainer(__name__))"
        )
    known = sorted(_TRAINERS) or ["sft"]
    raise ValueError(f"algorithm={name!r} has no trainer; known: {', '.join(known)}")
