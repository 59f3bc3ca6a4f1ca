"""The training loop every trainer shares: batches -> jitted step -> metrics -> eval ->
checkpoints, with exact resume, SIGTERM handling and non-finite step control.

A trainer (SFT, DPO, GRPO) builds a :class:`Trainer` (state, jitted step, batch source,
optional eval) and calls :func:`run`. The loop never sees math.

Per step s (0-based; the state after it is "step s+1"):

1. ``served = source.next(state)``: a host batch (numpy), or a ``Served`` whose host
   metrics (e.g. GRPO rewards) are logged with this step.
2. ``state, metrics = step_fn(state, put_batch(host))``: dispatched, not awaited.
3. The *previous* step's device metrics are fetched and logged (one step late, so the
   device never waits for the host), with ``num_tokens`` (cumulative non-padding tokens),
   ``tokens_per_second``, ``mfu`` and ``epoch``.
4. Every ``train.eval_every`` steps: ``eval_fn(state)`` (host floats, logged as is).
5. Every ``checkpoint.every`` steps, at the end, and when SIGTERM arrived: a checkpoint
   of the state and ``{"source": source.get_state(), "num_tokens": n}``.

Non-finite steps (loss, gradient or the updated state) are not applied by the step (see
``state.make_train_step``), so the state stays finite; a save checks it anyway and refuses
a non-finite one. After ``train.max_bad_steps`` consecutive skipped steps the loop raises
:class:`NonFiniteError` without saving, naming the last finite checkpoint.

Multi-process runs (``jax.process_count() > 1``, see ``jaxpt.distributed``): every process
runs this loop on its rows of each batch; ``num_tokens`` / ``tokens_per_second`` count the
global batch (summed on device, fetched with the metrics); metrics, ``config.yaml`` and
messages come from process 0 only; checkpoints are saved by all processes together; SIGTERM
on any host stops every process at the same step (JAX's preemption sync point) instead of
the ``stop`` flag.

Resume (``checkpoint.resume``): the newest checkpoint in ``<out_dir>/checkpoints`` is
restored into the state's shardings, the source is set to its saved position, and
``metrics.jsonl`` lines after that step are dropped, so a resumed run logs exactly what an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from jaxpt import distributed
from jaxpt.config import RunConfig, config_to_dict, dump_config
from jaxpt.engine.checkpoint import (
    Checkpointer,
    StopFlag,
    abstract_like,
    install_stop_handler,
    step_problem,
)
from jaxpt.engine.metrics import MetricsWriter, Throughput, device_peak_flops
from jaxpt.engine.state import TrainState
from jaxpt.engine.update import all_finite
from jaxpt.tree import path_str


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def data_report(stats) -> str:
    """One line: rows read, examples kept, skipped by reason, truncated, dropped."""
    d = stats.as_dict()
    why = d.get("skipped_by_reason") or {}
    skipped = d.get("invalid_skipped", 0)
    parts = [
        f"{d.get('rows_read', 0)} rows read"
        + (f" ({d['beyond_max_rows']} past max_*_rows unused)" if d.get("beyond_max_rows") else ""),
        f"{d.get('examples', 0)} kept",
        f"{skipped} skipped"
        + (" (" + ", ".join(f"{r}: {n}" for r, n in sorted(why.items())) + ")" if why else ""),
        f"{d.get('truncated', 0)} truncated",
        f"{d.get('dropped_too_long', 0) + d.get('dropped_no_targets', 0)} dropped "
        f"({d.get('dropped_too_long', 0)} too long, {d.get('dropped_no_targets', 0)} with no "
        "training target)",
    ]
    return "data: " + ", ".join(parts)


def write_data_stats(out: Path, stats) -> None:
    import json

    (out / "data_stats.json").write_text(json.dumps(stats.as_dict(), indent=2) + "\n")


def check_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` if needed and prove it writable (a probe file), before any model
    loads: a path that is a file, under a file, or not writable is a ValueError naming it,
    not a traceback minutes later."""
    import tempfile

    out = Path(out_dir)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"out_dir {out}: {p} exists and is not a directory")
        if p.exists():
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".jaxpt-write-check-"):
            pass
    except OSError as e:
        raise ValueError(
            f"out_dir {out}: cannot create or write to it ({e.strerror or e}); "
            "choose another out_dir"
        ) from None
    return out


def last_finite_message(ckpt: Checkpointer, first_bad: int | None) -> str:
    """Which checkpoint to resume from after a non-finite stop. Every saved state was
    checked finite; the one saved at or after step ``first_bad - 1`` holds the weights
    whose next step went non-finite, so an older one is named too."""
    steps = ckpt.all_steps()
    if not steps:
        return "No checkpoint was saved."
    msg = f"The last finite checkpoint is step {steps[-1]} in {ckpt.directory}."
    if first_bad is not None and steps[-1] >= first_bad - 1:
        older = [s for s in steps if s < first_bad - 1]
        msg += (
            f" Its weights are those after step {first_bad - 1}, from which step {first_bad} "
            "went non-finite; "
            + (
                f"the newest checkpoint before that is step {older[-1]}."
                if older
                else "no older checkpoint is kept."
            )
        )
    return msg


@dataclasses.dataclass
class Served:
    """What a batch source serves for one step: the host batch (numpy leaves, this
    process's rows; a dict or a typed batch) and host metrics to log with that step (e.g.
    GRPO's rewards, measured while the batch was made)."""

    batch: Any
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class BatchSource(Protocol):
    """Where batches come from. ``next`` may use the state (GRPO samples with the current
    params) and returns a host batch or a :class:`Served`; ``get_state``/``set_state`` are
    JSON-serializable positions for resume; ``observe(step, metrics)`` gets each step's
    host metrics when they arrive (one step late) and returns metrics to add to that
    step's row (sources that adapt to the training signal, e.g. SASR, use it)."""

    def next(self, state: TrainState) -> Any: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...

    def observe(self, step: int, metrics: dict[str, float]) -> dict[str, float] | None: ...


class SourceBase:
    """Defaults for a BatchSource: nothing to observe."""

    def observe(self, step: int, metrics: dict[str, float]) -> dict[str, float] | None:
        return None


class IteratorSource(SourceBase):
    """A BatchSource over a data iterator with get_state/set_state (``jaxpt.data`` loaders)."""

    def __init__(self, iterator: Iterator[dict[str, Any]]):
        self.iterator = iterator

    def next(self, state: TrainState) -> dict[str, Any]:
        return dict(next(self.iterator))

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.iterator.set_state(state)


def count_tokens(batch) -> int:
    """Non-padding tokens of a host batch: segment id > 0 in every leaf named
    ``*segment_ids`` (dict keys or typed-batch fields)."""
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    return int(
        sum(np.count_nonzero(v) for p, v in leaves if path_str(p).endswith("segment_ids"))
    )


def serve(source: BatchSource, state: TrainState) -> Served:
    """``source.next(state)`` as a :class:`Served` (a plain dict batch may carry its
    metrics under ``"_metrics"``)."""
    out = source.next(state)
    if isinstance(out, Served):
        return out
    if isinstance(out, dict):
        out = dict(out)
        return Served(out, out.pop("_metrics", None) or {})
    return Served(out)


@dataclasses.dataclass
class Trainer:
    """Everything the loop needs; built by one small function per algorithm.

    step_fn: jitted ``(state, device batch) -> (state, metrics)`` that donates the state.
    put_batch: host batch -> device batch (global arrays in the batch shardings).
    eval_fn: ``state -> {name: float}`` (names already ``eval_``-prefixed), or None.
    num_params: model parameters, for mfu (6 * num_params FLOPs per token).
    parts: what the algorithm built the run from (its model bundle, trainable state,
    optimizer ...), typed by the algorithm, for callers that continue after the loop
    (RFT's evaluation, tests, benchmarks); the loop never reads it.
    """

    cfg: RunConfig
    mesh: Mesh
    state: TrainState
    step_fn: Callable
    source: BatchSource
    put_batch: Callable[[dict[str, Any]], dict[str, Any]]
    total_steps: int
    eval_fn: Callable[[TrainState], dict[str, float]] | None = None
    tokens_fn: Callable[[dict[str, Any]], int] = count_tokens
    num_params: int | None = None
    batches_per_epoch: int | None = None
    parts: Any = None
    # what the training data came to (rows read, kept, skipped by reason ...): printed at
    # the start and written to <out_dir>/data_stats.json
    data_stats: Any = None
    # (step, why) of checkpoints resume passed over (set by the loop)
    skipped_checkpoints: list[tuple[int, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    step: int  # steps completed
    reason: str  # "done" | "signal" | "stop_after"
    last_metrics: dict[str, Any]
    eval_metrics: dict[str, Any]


def check_same_model(cfg: RunConfig, saved_config: Path, ckpt_dir: Path) -> None:
    """Refuse to resume checkpoints written for another model: the run's ``config.yaml``
    names the ``model.name`` they were trained from (LoRA adapters restored onto another
    base, or another model's weights under this tokenizer, would train on silently)."""
    import yaml

    try:
        saved = (yaml.safe_load(saved_config.read_text()) or {}).get("model", {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        return  # no readable record of the model: nothing to compare
    if saved is not None and saved != cfg.model.name:
        raise ValueError(
            f"{cfg.source}: checkpoint.resume: the checkpoints in {ckpt_dir} were trained from "
            f"model.name={saved!r} ({saved_config}), this run has model.name="
            f"{cfg.model.name!r}. Use another out_dir, or checkpoint.resume=false to start over "
            "in this one."
        )


def set_aside_incomplete(ckpt: Checkpointer, *, primary: bool) -> list[tuple[int, str]]:
    """(step, why) for every step dir that is not a complete checkpoint; each is renamed
    to ``<step>.incomplete`` (by process 0) so the newest complete one is resumed and
    later saves neither collide with it nor count it as the newest."""
    bad = [(s, why) for s in ckpt.all_steps() if (why := step_problem(ckpt.directory / str(s)))]
    _set_aside(ckpt, [s for s, _ in bad], primary=primary)
    return bad


def _set_aside(ckpt: Checkpointer, steps: list[int], *, primary: bool) -> None:
    if not steps:
        return
    for s in steps:
        ckpt.set_aside(s, rename=primary)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxpt: checkpoints set aside")
    ckpt.reload()


def _restore(trainer: Trainer, ckpt: Checkpointer, *, primary: bool = True) -> tuple[int, int]:
    """Restore the newest checkpoint that restores; newer ones that fail (a truncated
    shard) are set aside, named in the message printed by the caller."""
    abstract = abstract_like(trainer.state.saveable())
    # Free the freshly initialized trainable state before the restored copy arrives.
    for leaf in jax.tree.leaves(trainer.state.saveable()):
        leaf.delete()
    failed: list[tuple[int, str]] = []
    for step in reversed(ckpt.all_steps()):
        try:
            restored, data = ckpt.restore(step, abstract)
        except Exception as e:  # noqa: BLE001  orbax / tensorstore raise many types
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            failed.append((step, f"restore failed: {type(e).__name__}: {first}"))
            continue
        _set_aside(ckpt, [s for s, _ in failed], primary=primary)
        trainer.skipped_checkpoints.extend(failed)
        trainer.state = TrainState(**restored, frozen=trainer.state.frozen)
        trainer.source.set_state(data["source"])
        return int(jax.device_get(restored["step"])), int(data.get("num_tokens", 0))
    raise RuntimeError(
        f"{ckpt.directory}: no checkpoint could be restored: "
        + "; ".join(f"step {s}: {why}" for s, why in failed)
        + ". Move the checkpoints away or set checkpoint.resume=false to start over."
    )


def run(
    trainer: Trainer,
    *,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
    stop: StopFlag | None = None,
) -> LoopResult:
    """Train ``trainer`` to ``total_steps`` (or ``train.stop_after_steps``, or SIGTERM).

    ``callbacks`` are called as ``cb(step, row)`` with every logged metrics row.
    """
    cfg = trainer.cfg
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    multi = jax.process_count() > 1
    primary = distributed.is_primary()
    global_tokens = None
    if multi:
        distributed.check_batch_layout(trainer.mesh)
        distributed.check_shared_dir(out)
        global_tokens = distributed.global_sum_fn(trainer.mesh)
    ckpt = Checkpointer(
        out / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
    )
    start, num_tokens = 0, 0
    trainer.skipped_checkpoints = []
    if cfg.checkpoint.resume:
        trainer.skipped_checkpoints = set_aside_incomplete(ckpt, primary=primary)
    if cfg.checkpoint.resume and ckpt.latest_step() is not None:
        check_same_model(cfg, out / "config.yaml", ckpt.directory)
        start, num_tokens = _restore(trainer, ckpt, primary=primary)
    # Only now: a resume that was refused leaves the run's config.yaml as it was.
    if primary:
        dump_config(cfg, out / "config.yaml")
        if trainer.data_stats is not None:
            print(data_report(trainer.data_stats), flush=True)
            write_data_stats(out, trainer.data_stats)
    if primary and trainer.skipped_checkpoints:
        print(
            "resume: skipped checkpoint "
            + "; ".join(f"step {s} ({why})" for s, why in trainer.skipped_checkpoints)
            + " (renamed to <step>.incomplete, not deleted)",
            flush=True,
        )
    if primary and start:
        print(f"resumed from checkpoint step {start} in {ckpt.directory}", flush=True)
    end = trainer.total_steps
    if cfg.train.stop_after_steps is not None:
        end = min(end, cfg.train.stop_after_steps)

    writer = MetricsWriter(
        out,
        total_steps=trainer.total_steps,
        start_step=start,
        progress=cfg.logging.progress,
        tensorboard=cfg.logging.tensorboard,
        wandb_project=cfg.logging.wandb_project,
        wandb_run_name=cfg.logging.wandb_run_name,
        run_config=config_to_dict(cfg),
        resume=start > 0,
        enabled=primary,
    )
    peak = cfg.logging.peak_flops or device_peak_flops()
    throughput = Throughput(
        flops_per_token=6.0 * trainer.num_params if trainer.num_params else None,
        peak_flops_total=peak * len(trainer.mesh.devices.flat) if peak else None,
    )
    stop = stop or StopFlag()
    # Several processes must stop at the same step: JAX's preemption service (installed by
    # jax.distributed.initialize) owns SIGTERM there, so no Python handler replaces it.
    restore_handler = (lambda: None) if multi else install_stop_handler(stop)

    def stop_requested(step_no: int) -> bool:
        if multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step_no)
        return stop.requested

    result = LoopResult(trainer.state, start, "done", {}, {})
    pending: tuple | None = None
    bad = 0
    last_saved = start if start > 0 else None

    def flush() -> None:
        nonlocal pending, bad, num_tokens
        if pending is None:
            return
        step_no, dev, extras, ntok = pending
        pending = None
        host = {k: float(v) for k, v in jax.device_get(dev).items()}
        extras = {**extras, **(trainer.source.observe(step_no, host) or {})}
        ntok = int(jax.device_get(ntok))
        num_tokens += ntok
        row = {**host, **extras, **throughput.update(ntok), "num_tokens": num_tokens}
        if trainer.batches_per_epoch:
            row["epoch"] = step_no / trainer.batches_per_epoch
        bad = bad + 1 if host.get("skipped", 0.0) > 0 else 0
        if step_no % cfg.logging.every == 0 or step_no == end or bad:
            row = writer.write(step_no, row)
            for cb in callbacks:
                cb(step_no, row)
        writer.progress(step_no, row)
        result.last_metrics = row
        if bad >= cfg.train.max_bad_steps:
            raise NonFiniteError(
                f"{bad} consecutive steps ({step_no - bad + 1}..{step_no}) had a non-finite "
                "loss, gradient norm or update; their updates were skipped and training "
                f"stopped (train.max_bad_steps={cfg.train.max_bad_steps}). "
                + last_finite_message(ckpt, first_bad=step_no - bad + 1)
                + " Lower optim.lr, check the data, or raise optim.max_grad_norm clipping."
            )

    check_finite = jax.jit(lambda st: all_finite(st.saveable()))

    def save(step_no: int, *, wait: bool = False) -> None:
        nonlocal last_saved
        flush()  # the save waits for the state anyway; log first so timing stays honest
        # The step never applies a non-finite update, so this holds unless the run started
        # from non-finite weights; a poisoned state is never written over a good one.
        if not bool(check_finite(trainer.state)):
            raise NonFiniteError(
                f"the state at step {step_no} holds non-finite values; it was not saved. "
                + last_finite_message(ckpt, first_bad=None)
            )
        data = {"source": trainer.source.get_state(), "num_tokens": num_tokens}
        ckpt.save(step_no, trainer.state.saveable(), data, wait=wait)
        last_saved = step_no
        throughput.reset()

    try:
        if trainer.eval_fn is not None and cfg.train.eval_on_start and start == 0:
            result.eval_metrics = writer.write(0, trainer.eval_fn(trainer.state))
            for cb in callbacks:
                cb(0, result.eval_metrics)
        for s in range(start, end):
            served = serve(trainer.source, trainer.state)
            host, extras = served.batch, served.metrics
            ntok = trainer.tokens_fn(host)
            batch = trainer.put_batch(host)
            trainer.state, dev = trainer.step_fn(trainer.state, batch)
            if global_tokens is not None:
                ntok = global_tokens(ntok)  # this process's rows -> the global batch's
            flush()
            pending = (s + 1, dev, dict(extras), ntok)
            step_no = s + 1
            if (
                trainer.eval_fn is not None
                and cfg.train.eval_every
                and (step_no % cfg.train.eval_every == 0)
                and step_no < end
            ):
                flush()
                ev = trainer.eval_fn(trainer.state)
                result.eval_metrics = writer.write(step_no, ev)
                for cb in callbacks:
                    cb(step_no, result.eval_metrics)
                throughput.reset()
            if cfg.checkpoint.every and step_no % cfg.checkpoint.every == 0:
                save(step_no)
            if stop_requested(step_no):
                flush()
                if last_saved != step_no:
                    save(step_no, wait=True)
                result.reason = "signal"
                result.step = step_no
                break
            result.step = step_no
        flush()
        if result.reason == "done":
            if end < trainer.total_steps:
                result.reason = "stop_after"
            elif trainer.eval_fn is not None and result.step > start:
                ev = trainer.eval_fn(trainer.state)
                result.eval_metrics = writer.write(result.step, ev)
                for cb in callbacks:
                    cb(result.step, result.eval_metrics)
            if result.step > start and last_saved != result.step:
                save(result.step)
        ckpt.wait()
    finally:
        restore_handler()
        writer.close()
        ckpt.close()
    result.state = trainer.state
    if result.reason == "signal" and primary:
        what = "a preemption notice (SIGTERM)" if multi else f"signal {stop.signal}"
        print(
            f"stopped by {what} after step {result.step}; checkpoint saved in "
            f"{ckpt.directory}; run the same command again to resume",
            flush=True,
        )
    return result
