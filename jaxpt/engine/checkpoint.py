"""Checkpoints: orbax CheckpointManager with async save, keep-N, atomic steps, exact resume.

Layout (``<out_dir>/checkpoints``)::

    <step>/state/...        params, opt_state, step, rng (orbax StandardSave)
    <step>/data/...         JSON: the data iterator state and loop counters (JsonSave)

A step directory is first written under a temporary name and renamed when complete (orbax
commits by rename), so a crash mid-save leaves the previous checkpoints as they were and
``latest_step`` never returns a half-written one. Restores go straight into the target
shardings (``abstract`` leaves are ShapeDtypeStructs carrying ``sharding``).

SIGTERM (preemption): :func:`install_stop_handler` sets a flag; the loop checks it at the
next step boundary, saves, waits for the write, and exits cleanly.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def step_problem(step_dir: Path) -> str | None:
    """Why ``step_dir`` is not a complete checkpoint (None when it looks complete): orbax
    writes ``_CHECKPOINT_METADATA`` with a commit time last, so a dir without it (an empty
    ``checkpoints/44``, a copy cut short) was never committed."""
    meta = step_dir / "_CHECKPOINT_METADATA"
    if not meta.is_file():
        return "no commit marker (_CHECKPOINT_METADATA missing)"
    try:
        committed = json.loads(meta.read_text()).get("commit_timestamp_nsecs")
    except (OSError, ValueError, AttributeError):
        return "unreadable _CHECKPOINT_METADATA"
    if not committed:
        return "never committed (no commit time in _CHECKPOINT_METADATA)"
    missing = [item for item in ("state", "data") if not (step_dir / item).is_dir()]
    if missing:
        return f"missing {', '.join(m + '/' for m in missing)}"
    return None


def abstract_like(tree) -> Any:
    """ShapeDtypeStructs (with shardings) for a tree of arrays, for restoring into it."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """Save / restore ``{"state": pytree, "data": json}`` per step in ``directory``."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def set_aside(self, step: int, *, rename: bool = True) -> Path | None:
        """Take ``step`` out of the manager's view by renaming ``<step>`` to
        ``<step>.incomplete[-N]`` (never deleting it), so it is neither resumed nor kept
        as the newest step. ``rename=False`` (non-primary processes) only reloads."""
        dest = None
        if rename:
            src = self.directory / str(step)
            dest = self.directory / f"{step}.incomplete"
            n = 1
            while dest.exists():
                n += 1
                dest = self.directory / f"{step}.incomplete-{n}"
            src.rename(dest)
        return dest

    def reload(self) -> None:
        self._mngr.reload()

    def save(self, step: int, state_tree, data: dict[str, Any], *, wait: bool = False) -> bool:
        """Start saving (async unless configured otherwise); returns whether it saved."""
        saved = self._mngr.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state_tree), data=ocp.args.JsonSave(data)
            ),
            force=True,
        )
        if wait:
            self.wait()
        return saved

    def restore(self, step: int | None, abstract_state) -> tuple[Any, dict[str, Any]]:
        """(state tree in the shardings of ``abstract_state``, data dict) of ``step``
        (default: the newest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        out = self._mngr.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["data"]

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def find_checkpoint_dir(path: str | Path) -> tuple[Path, int | None]:
    """(checkpoints dir, step or None for the newest) for a run dir (with
    ``checkpoints/``), a checkpoints dir, or one step dir inside it."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
        return path, None
    raise FileNotFoundError(
        f"{path}: not a run dir (with checkpoints/), a checkpoints dir or a step dir"
    )


class StopFlag:
    """Set by SIGTERM (or by hand); read by the loop at step boundaries."""

    def __init__(self):
        self._event = threading.Event()
        self.signal: int | None = None

    def set(self, signum: int | None = None) -> None:
        self.signal = signum
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


def install_stop_handler(flag: StopFlag, signals=(signal.SIGTERM,)):
    """Route `signals` to ``flag.set``; returns a function restoring the old handlers.
    Only possible from the main thread (otherwise a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {s: signal.signal(s, lambda signum, frame: flag.set(signum)) for s in signals}

    def restore():
        for s, h in old.items():
            signal.signal(s, h)

    return restore
