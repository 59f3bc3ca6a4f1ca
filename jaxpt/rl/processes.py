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

import jax
import numpy as np


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


def host_rows(x) -> np.ndarray:
    """A jax.Array (maybe spread over several hosts' devices) as a numpy array holding
    every row, on every process."""
    if isinstance(x, np.ndarray) or getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


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
