"""Compile a run's programs for a TPU slice this machine does not have (``jaxpt plan
--topology NAME --compile``).

XLA's real TPU compiler ships in ``libtpu`` (the ``[tpu]`` extra) and has a compile-only
path: ``jax.experimental.topologies.get_topology_desc`` gives the abstract devices of a
slice, a jitted program lowered with ``ShapeDtypeStruct`` inputs whose ``NamedSharding``s
live on a mesh of those devices compiles on this CPU, and ``memory_analysis()`` is the HBM
one device of the slice would use, Pallas/Mosaic kernels included. A program that does not
fit fails here with the compiler's own message, as it would on the chip.

An algorithm says which programs its run compiles with ``aot_programs(cfg, bundle) ->
list[AotProgram]`` in its trainer module (``jaxpt.trainers.<name>``; ``bundle`` from
:func:`jaxpt.engine.build.abstract_bundle`: params are ShapeDtypeStructs in their training
shardings, no tokenizer); the trainer and ``aot_programs`` share the functions that build
the step, so what is compiled here is what the run executes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Topology:
    """A Cloud TPU slice: ``get_topology_desc`` arguments and one chip's public specs."""

    name: str  # the Cloud name, e.g. v5e-8
    topology: str  # get_topology_desc's topology_name, e.g. v5e:2x4
    hbm_gib: float  # HBM per device (chip), GiB
    peak_bf16_flops: float  # per device, FLOP/s (dense bf16)
    chips_per_host_bounds: tuple[int, int, int] = (2, 2, 1)


# Per-chip HBM and bf16 peak: Cloud TPU's system-architecture pages (v5e 16 GB / 197 TF,
# v5p 95 GB / 459 TF, v6e 32 GB / 918 TF). A v5p-N slice is N/2 chips (N TensorCores, one
# megacore device per chip). v4's compile-only topology exposes each TensorCore as a device
# (8 for v4:2x2x1), unlike a real v4-8's 4 megacore devices, so it is not offered.
TOPOLOGIES = {
    t.name: t
    for t in (
        Topology("v5e-4", "v5e:2x2", 16.0, 197e12),
        Topology("v5e-8", "v5e:2x4", 16.0, 197e12),
        Topology("v5e-16", "v5e:4x4", 16.0, 197e12),
        Topology("v5p-8", "v5p:2x2x1", 95.0, 459e12),
        Topology("v5p-16", "v5p:2x2x2", 95.0, 459e12),
        Topology("v6e-4", "v6e:2x2", 32.0, 918e12),
        Topology("v6e-8", "v6e:2x4", 32.0, 918e12),
    )
}


class LibtpuMissing(RuntimeError):
    pass


def topology(name: str) -> Topology:
    if name not in TOPOLOGIES:
        raise ValueError(f"--topology {name!r} is not known; use one of {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]


def topology_devices(topo: Topology) -> list:
    """The slice's abstract devices (compile-only: nothing runs on them)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise LibtpuMissing(
            "compiling for TPU needs libtpu: pip install 'jaxpt[tpu]' (jax[tpu] at the "
            f"installed jax version, {jax.__version__})"
        ) from None
    from jax.experimental import topologies

    # Compile-only: nothing runs on a chip, so libtpu's one-process-per-host lockfile
    # (/tmp/libtpu_lockfile) need not refuse this process when another one (a CPU run that
    # loaded libtpu, a second `jaxpt plan --compile`) holds it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return topologies.get_topology_desc(
        platform="tpu",
        topology_name=topo.topology,
        chip_config_name="default",
        chips_per_host_bounds=topo.chips_per_host_bounds,
        num_slices=1,
    ).devices


@dataclasses.dataclass
class AotProgram:
    """One jitted program of a run and its abstract inputs (``ShapeDtypeStruct``s carrying
    their shardings). ``flops``: model FLOPs of one call from the config (``cost_analysis``
    counts a scanned layer once, so it is not used)."""

    name: str
    fn: Any  # a jax.jit-wrapped function
    args: tuple
    flops: float | None = None
    compiled: Any = None  # already compiled where another program needed its output shardings


@dataclasses.dataclass
class CompiledProgram:
    """Per-device bytes of one compiled program; ``error`` the compiler's message when it
    did not compile (e.g. out of HBM)."""

    name: str
    arguments: int = 0
    outputs: int = 0
    temporaries: int = 0
    aliased: int = 0  # outputs that reuse donated argument buffers
    generated_code: int = 0
    flops: float | None = None
    error: str | None = None

    @property
    def total(self) -> int:
        """Peak per device: arguments + outputs + temporaries + code, less donated aliases."""
        return (
            self.arguments + self.outputs + self.temporaries + self.generated_code - self.aliased
        )


@contextlib.contextmanager
def no_persistent_cache() -> Iterator[None]:
    """The persistent compilation cache off inside, as it was after.

    A compile-only TPU client serializes what it compiles into the cache (when
    ``jax_compilation_cache_dir`` is set) but cannot load an entry back ("PjRtCompiler must
    be constructed with a Client to call DeserializeLoadedExecutable"), so a second compile
    of a program would warn and compile anyway. jax decides once per process whether the
    cache is used (``compilation_cache.is_cache_used``), so the setting is re-read on the
    way in and out (``reset_cache``; the cache reopens lazily on the next compile)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        cc.reset_cache()


def compile_lowered(lowered):
    """``lowered.compile()`` for a slice's abstract devices, without the persistent cache
    (:func:`no_persistent_cache`)."""
    with no_persistent_cache():
        return lowered.compile()


def compile_program(program: AotProgram) -> CompiledProgram:
    """Lower and compile ``program`` for its inputs' devices; never raises for a program
    the compiler refuses (the message is kept)."""
    try:
        compiled = program.compiled or compile_lowered(program.fn.lower(*program.args))
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is the result
        msg = str(e).strip().splitlines()
        return CompiledProgram(program.name, flops=program.flops,
                               error=(msg[0] if msg else type(e).__name__)[:500])
    m = compiled.memory_analysis()
    return CompiledProgram(
        program.name,
        arguments=m.argument_size_in_bytes,
        outputs=m.output_size_in_bytes,
        temporaries=m.temp_size_in_bytes,
        aliased=m.alias_size_in_bytes,
        generated_code=m.generated_code_size_in_bytes,
        flops=program.flops,
    )


def algorithm_programs(cfg, bundle) -> list[AotProgram]:
    """The programs ``cfg.algorithm``'s run compiles (its trainer module's ``aot_programs``)."""
    from jaxpt.config import trainer_module

    module = importlib.import_module(trainer_module(cfg.algorithm) or cfg.algorithm)
    fn: Callable | None = getattr(module, "aot_programs", None)
    if fn is None:
        raise NotImplementedError(
            f"algorithm {cfg.algorithm!r} does not list its programs for --compile yet "
            f"(no aot_programs in {module.__name__}); the shape-based plan still works"
        )
    return fn(cfg, bundle)


def abstract_rows_batch(ndims, shardings, rows: int, length: int):
    """``ShapeDtypeStruct``s of a typed batch for ``aot_programs``: each 2-D leaf of
    ``ndims`` (token rows) is [rows, length], int32 ids or float32 loss masks as the loaders
    give them; each 1-D leaf (a per-row value: reference log-probs, a label, a margin) is
    [rows] float32; each in its sharding from ``shardings`` (the same pytree)."""
    from jaxpt.tree import path_str

    def leaf(path, ndim, sh):
        if ndim == 1:
            return jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=sh)
        dtype = jnp.float32 if "loss_mask" in path_str(path) else jnp.int32
        return jax.ShapeDtypeStruct((rows, length), dtype, sharding=sh)

    return jax.tree_util.tree_map_with_path(leaf, ndims, shardings)


def train_step_flops(model_cfg, rows: int, length: int, *, forwards: int = 0) -> float:
    """Model FLOPs of a train step over ``rows`` x ``length`` tokens: forward + backward
    (3 x forward, rematerialization not counted, as MFU is defined) of the decoder and LM
    head, plus ``forwards`` gradient-free forwards (a reference model)."""
    from jaxpt.models.config import decoder_forward_flops

    fwd = decoder_forward_flops(model_cfg, rows, length)
    fwd += 2 * rows * length * model_cfg.hidden_size * model_cfg.vocab_size  # LM head
    return float((3 + forwards) * fwd)


def compile_all(programs: Sequence[AotProgram]) -> list[CompiledProgram]:
    return [compile_program(p) for p in programs]
