"""On-policy runs over several processes (``jax.process_count() > 1``, one per host): which
rows a process works on and how host values cross processes (host, numpy).

Axis legend: R rows of a rollout (or of a mini-batch), P processes, F reward functions.

How GRPO runs on P processes (``jaxpt.rl.source``, ``jaxpt.rl.rollout``):

* **Sampling** is one SPMD program over the whole mesh: every process passes the same
  prompts of the round (they follow from the seed and the round), the decode splits the
  R rows over the devices of every host, and :func:`host_rows` gathers the sampled tokens
  (R x completion length ints, small next to the weights) onto every host.
* **Rewards** run where the work is split: process p scores only its block of the rows
  (:func:`row_block`, whole groups of its own prompts when R / P is a multiple of the
  group size), and :func:`gather_rewards` concatenates the blocks in process order.
* From there every process holds the same global rollout, so what must be global is
  global by construction and identical on every host: group and batch reward statistics
  (``scale_rewards: batch``), dynamic-sampling counts and its stopping decision (every
  process takes the same rounds), metrics, mini-batch shuffles, resume positions.
* **Training**: each process serves its block of every mini-batch to ``put_batch``
  (``jax.make_array_from_process_local_data``), so the step sees the one global batch a
  single process would (process p's devices hold rows block p: ``check_batch_layout``).

A single process is the special case P = 1 (its block is every row; nothing is gathered),
so one code path serves both and a single-process run is unchanged.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxpt.distributed import host_rows  # noqa: F401  (re-exported: rl code imports it here)


def count() -> int:
    return jax.process_count()


def row_block(num_rows: int, *, what: str = "rows") -> slice:
    """This process's contiguous block of ``num_rows`` rows: block p of P equal blocks."""
    n, p = jax.process_count(), jax.process_index()
    if num_rows % n:
        raise ValueError(f"{num_rows} {what} do not split over {n} processes; make the "
                         f"number a multiple of {n}")
    size = num_rows // n
    return slice(p * size, (p + 1) * size)


def local_rows(tree, num_rows: int, *, what: str = "rows"):
    """The leaves of ``tree`` (leading axis ``num_rows``) cut to this process's block."""
    if jax.process_count() == 1:
        return tree
    blk = row_block(num_rows, what=what)
    return jax.tree.map(lambda v: v[blk], tree)


def allgather(x_local: np.ndarray) -> np.ndarray:
    """Every process's ``x_local`` (same shape everywhere) concatenated along axis 0 in
    process order; ``x_local`` itself with one process."""
    if jax.process_count() == 1:
        return x_local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x_local), tiled=True))


def gather_rewards(rewards_R, per_function: dict[str, np.ndarray], metrics: dict[str, float],
                   ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    """``compute_rewards``' output for this process's block -> the same for every row:
    rewards and each function's rewards gathered in process order, and the metrics
    (``rewards/<name>/mean|std``, NaN-aware with a sample std as ``compute_rewards``;
    ``rewards/nonfinite_skipped`` summed) recomputed over all rows."""
    if jax.process_count() == 1:
        return rewards_R, per_function, metrics
    from jaxpt.rewards.registry import _nanmean, _nanstd  # the single-process formulas

    names = list(per_function)
    stacked_RF = allgather(np.stack([rewards_R, *(per_function[k] for k in names)], axis=1))
    rewards_R = stacked_RF[:, 0].astype(np.float32)
    per_function = {k: stacked_RF[:, 1 + i].astype(np.float32) for i, k in enumerate(names)}
    out = dict(metrics)
    for k, v in per_function.items():
        out[f"rewards/{k}/mean"], out[f"rewards/{k}/std"] = _nanmean(v), _nanstd(v)
    if "rewards/nonfinite_skipped" in metrics:
        skipped = allgather(np.asarray([metrics["rewards/nonfinite_skipped"]], np.float64))
        out["rewards/nonfinite_skipped"] = float(skipped.sum())
    return rewards_R, per_function, out


def same_everywhere(value: int) -> int:
    """Process 0's ``value`` on every process (a decision all processes must share)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (files one process wrote are visible)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def rows_per_process(rows: int, group_size: int | None, *, where: str) -> int:
    """``rows`` of a global batch per process; with ``group_size`` (the shared-prompt layout
    and the scorer's groups) each process's block must hold whole groups."""
    n = jax.process_count()
    local = rows // n
    if n > 1 and group_size and local % group_size:
        raise ValueError(
            f"{where}: train.batch_size={rows} over {n} processes is {local} rows per process, "
            f"not whole groups of grpo.num_generations={group_size}; use a batch size that is "
            f"a multiple of {n * group_size} or grpo.share_prompt=false")
    return local


def gather_objects(local: Any) -> list[Any]:
    """Every process's picklable ``local`` in process order (``[local]`` with one process):
    pickled, padded to the longest, gathered as bytes."""
    if jax.process_count() == 1:
        return [local]
    data = np.frombuffer(pickle.dumps(local), np.uint8)
    sizes = allgather(np.asarray([data.size], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    blocks = allgather(padded).reshape(len(sizes), -1)
    return [pickle.loads(blocks[p, : int(n)].tobytes()) for p, n in enumerate(sizes)]


def row_owner(row: int, num_rows: int) -> int:
    """The process that owns ``row`` of ``num_rows``: the rows form P near-equal contiguous
    blocks, one per process, so a row keeps its owner for the whole rollout."""
    if not 0 <= row < num_rows:
        raise ValueError(f"row {row} is not one of {num_rows} rows")
    return row * jax.process_count() // num_rows


def map_owned(fn: Callable[[Any], Any], items: Sequence[Any], rows: Sequence[int],
              local_map: Callable[[Callable, list], list] | None = None, *,
              num_rows: int) -> list[Any]:
    """``[fn(x) for x in items]`` on every process, where item k runs only on the process
    that owns ``rows[k]`` (:func:`row_owner`) and the results (picklable) are gathered.
    Work with host state (an environment's ``step``) then runs once, on the same process
    every time for a given row. ``local_map`` runs this process's items (default: a loop)."""
    local_map = local_map or (lambda f, xs: [f(x) for x in xs])
    if jax.process_count() == 1:
        return local_map(fn, list(items))
    me = jax.process_index()
    mine = [k for k, r in enumerate(rows) if row_owner(r, num_rows) == me]
    done = dict(zip(mine, local_map(fn, [items[k] for k in mine]), strict=True))
    out: list[Any] = [None] * len(items)
    for part in gather_objects(done):
        for k, v in part.items():
            out[k] = v
    return out
