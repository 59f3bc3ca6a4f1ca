"""Frozen-policy scoring: log-probs under params that the step does not train.

Two trainers score rows with a policy that stays fixed while they do: DPO scores its pairs
with the reference model (once for the whole data set with ``precompute_ref_logps``, or per
batch online), GRPO scores its rollouts with the old policy (reused rollouts) and the
reference (``beta > 0``). Both run a jitted ``fn(params, device batch)`` over host rows in
calls of a fixed size, so every call has one compiled shape, and collect the replicated
results on the host: :func:`score_rows` is that loop; :func:`precompute_ref_table` (DPO)
and :func:`make_score_fn` (GRPO) are built on it. :func:`make_ref_logps_fn` is the
reference forward of preference pairs (:class:`RefLogps`), run once before training or on
every batch.

It lives in ``rl/`` with the on-policy pieces and stays shared with DPO, which is not
on-policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.engine.logprobs import pair_logps
from jaxpt.engine.state import put_batch, split_micro
from jaxpt.rl.layout import TokenRows, completion_token_logprobs, group_rows
from jaxpt.sharding import batch_sharding, replicated


def score_rows(
    fn: Callable,
    params,
    num_rows: int,
    *,
    rows_per_call: int,
    host_batch: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    batch_sh: Mapping[str, Any],
    across_processes: bool = False,
    pad_last: bool = False,
) -> Iterator[tuple[np.ndarray, Any]]:
    """Score rows ``0 .. num_rows-1`` in calls of ``rows_per_call`` rows: for each call
    yield ``(idx, jax.device_get(fn(params, put_batch(host_batch(idx), batch_sh))))``, idx
    the row numbers of this process's part of the call.

    ``across_processes``: a call covers ``rows_per_call`` rows per process (process p takes
    the p-th slice), so ``fn`` must return replicated outputs that say which rows they are.
    ``pad_last``: the last call is filled up to its full size by repeating the last row
    (the compiled shape never changes); otherwise it is shorter."""
    n_proc, pid = (jax.process_count(), jax.process_index()) if across_processes else (1, 0)
    per_call = rows_per_call * n_proc
    for start in range(0, num_rows, per_call):
        if pad_last:
            idx = np.minimum(np.arange(start, start + per_call), num_rows - 1)
        else:
            idx = np.arange(start, min(start + per_call, num_rows))
        idx = idx[pid * rows_per_call : (pid + 1) * rows_per_call]
        yield idx, jax.device_get(fn(params, put_batch(host_batch(idx), batch_sh)))


def precompute_ref_table(
    ref_logps: Callable,
    ref_params,
    splits: Mapping[str, Sequence[Any]],
    *,
    rows_of: Callable[[list[Any]], Any],
    rows_per_call: int,
    rows_sh,
    params_sh,
) -> dict[str, np.ndarray]:
    """Reference log-probs of every preference pair of each split, in one pass before
    training: ``{split: float32 [N, 2]}`` (chosen, rejected), row i for ``pairs[i]``.

    ``ref_logps(ref_params, device rows)`` returns ``.chosen`` and ``.rejected`` [B]; it is
    jitted once (params in ``params_sh``, ``rows_of(pairs)`` host rows in ``rows_sh``) with
    each row's index beside it, so every process collects the whole table from replicated
    outputs. A call takes ``rows_per_call`` pairs per process (the train step's batch, so it
    has the compiled shape of the online reference); the last is padded by repeating the
    last pair."""
    mesh = jax.tree.leaves(rows_sh)[0].mesh
    batch_sh = (rows_sh, batch_sharding(mesh, 1))

    def with_index(params, batch):
        rows, index = batch
        return index, ref_logps(params, rows)

    fn = jax.jit(with_index, in_shardings=(params_sh, batch_sh), out_shardings=replicated(mesh))
    tables = {}
    for split, pairs in splits.items():

        def host_batch(idx, pairs=pairs):
            return rows_of([pairs[i] for i in idx]), idx.astype(np.int32)

        table = np.full((len(pairs), 2), np.nan, np.float32)
        for _, (index, ref) in score_rows(fn, ref_params, len(pairs), rows_per_call=rows_per_call,
                                          host_batch=host_batch, batch_sh=batch_sh,
                                          across_processes=True, pad_last=True):
            table[index, 0], table[index, 1] = ref.chosen, ref.rejected
        if np.isnan(table).any():
            raise RuntimeError(f"precompute_ref_table: some {split} pairs got no log-probs")
        tables[split] = table
    return tables


def make_score_fn(graphdef, params_fn, *, impl: str, temperature: float, rows_sh, mesh,
                  rows_per_call: int, group_size: int | None = None):
    """Rollout scorer: ``score_fn(state, rows, *, old, ref) -> (old_RC, ref_RC)``, float32
    numpy (None where not asked), the completion tokens' log-probs of flat rollout rows
    (``jaxpt.rl.layout.TokenRows``) under the current params (``old``: the policy that
    sampled, for reused rollouts) and under ``state.frozen`` (``ref``). With ``group_size``
    the rows are scored in the shared-prompt layout; ``rows_sh`` are the shardings of the
    train step's rows (of either layout). Every process holds all ``rows``; a call takes
    ``rows_per_call`` of them per process (``score_rows(across_processes=True)``)."""

    def score(params, rows):
        model = nnx.merge(graphdef, params)
        return completion_token_logprobs(model, rows, impl=impl, temperature=temperature)[0]

    jitted = jax.jit(score, out_shardings=replicated(mesh))
    current = jax.jit(lambda s: params_fn(s.params, s.frozen, None))

    def score_fn(state, rows: TokenRows, *, old: bool, ref: bool):
        def host_batch(idx):
            sub = jax.tree.map(lambda v: v[idx], rows)
            return group_rows(sub, group_size) if group_size else sub

        def scores(params):
            parts = [part for _, part in score_rows(
                jitted, params, len(rows.input_ids), rows_per_call=rows_per_call,
                host_batch=host_batch, batch_sh=rows_sh, across_processes=True)]
            return np.concatenate(parts).astype(np.float32)

        return (scores(current(state)) if old else None,
                scores(state.frozen) if ref else None)

    return score_fn


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RefLogps:
    """The reference's summed completion log-probs of each pair's two sides [B]."""

    chosen: Any
    rejected: Any


def make_ref_logps_fn(graphdef, *, impl: str = "auto", grad_accum: int = 1):
    """``ref_logps(ref_params, pairs) -> RefLogps`` [B]: the summed completion log-probs under
    ``ref_params``, no gradient. With ``grad_accum`` k > 1 the forward runs on the train
    step's k micro-batches one at a time (the activation memory of one micro-batch)."""

    def one(params, mb):
        out = pair_logps(nnx.merge(graphdef, params), mb, impl=impl)
        return out["chosen_logps"], out["rejected_logps"]

    def ref_logps(ref_params, pairs):
        ref_params = jax.lax.stop_gradient(ref_params)
        if grad_accum == 1:
            return RefLogps(*one(ref_params, pairs))
        micro = split_micro(pairs, grad_accum)  # [k, b, ...]: micro j holds rows j, j+k, ...
        c_kb, r_kb = jax.lax.map(lambda mb: one(ref_params, mb), micro)
        return RefLogps(*(jnp.swapaxes(x, 0, 1).reshape(-1) for x in (c_kb, r_kb)))

    return ref_logps
