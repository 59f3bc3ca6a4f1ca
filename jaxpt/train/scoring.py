"""Frozen-policy scoring: log-probs under params that the step does not train.

Two trainers score rows with a policy that stays fixed while they do: DPO scores its pairs
with the reference model (once for the whole data set with ``precompute_ref_logps``, or per
batch online), GRPO scores its rollouts with the old policy (reused rollouts) and the
reference (``beta > 0``). Both run a jitted ``fn(params, device batch)`` over host rows in
calls of a fixed size, so every call has one compiled shape, and collect the replicated
results on the host: :func:`score_rows` is that loop; :func:`precompute_ref_table` (DPO)
and :func:`make_score_fn` (GRPO) are built on it.

It lives in ``train/`` beside the trainers that call it; when the on-policy pieces move to
their own package (``rl/``, the open layout issue) the scorer stays shared with DPO, which
is not on-policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxpt.data.pipeline import INDEX_KEY
from jaxpt.sharding import replicated
from jaxpt.train.rollout import (
    FLAT_SEQUENCE_KEYS,
    GROUP_KEYS,
    completion_token_logprobs,
    group_rollout_rows,
    grouped_completion_logprobs,
)
from jaxpt.train.state import put_batch


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
    ref_fn: Callable,
    ref_params,
    pairs: Sequence[Any],
    *,
    batch_size: int,
    collate: Callable[[list[Any]], dict[str, np.ndarray]],
    batch_sh: Mapping[str, Any],
) -> np.ndarray:
    """Reference log-probs of every preference pair: float32 [N, 2] (chosen, rejected),
    row i for ``pairs[i]``. ``ref_fn(ref_params, device batch)`` must return replicated
    ``example_index`` and the two log-prob arrays. ``batch_size`` rows per process per call
    (the train step's, so every call has the compiled shape of the online reference); the
    last batch is padded by repeating the last pair."""

    def host_batch(idx):
        host = collate([pairs[i] for i in idx])
        host[INDEX_KEY] = idx.astype(np.int32)
        return host

    table = np.full((len(pairs), 2), np.nan, np.float32)
    for _, out in score_rows(ref_fn, ref_params, len(pairs), rows_per_call=batch_size,
                             host_batch=host_batch, batch_sh=batch_sh,
                             across_processes=True, pad_last=True):
        table[out[INDEX_KEY], 0] = out["ref_chosen_logps"]
        table[out[INDEX_KEY], 1] = out["ref_rejected_logps"]
    if np.isnan(table).any():
        raise RuntimeError("precompute_ref_table: some pairs got no reference log-probs")
    return table


def make_score_fn(graphdef, params_fn, *, impl: str, temperature: float, batch_sh, mesh,
                  rows_per_call: int, group_size: int | None = None):
    """Rollout scorer: ``score_fn(state, host batch, *, old, ref) -> {"old_logprobs",
    "ref_logprobs"}`` [R, C] float32 numpy, the completion tokens' log-probs under the
    current params (``old``: the policy that sampled, for reused rollouts) and under
    ``state.frozen`` (``ref``). With ``group_size`` the rows are scored in the
    shared-prompt layout (``batch_sh`` holds its keys)."""

    def score(params, batch):
        model = nnx.merge(graphdef, params)
        if "group_input_ids" in batch:
            return grouped_completion_logprobs(model, batch, impl=impl,
                                               temperature=temperature)[0]
        return completion_token_logprobs(model, batch, impl=impl, temperature=temperature)[0]

    flat_keys = (*FLAT_SEQUENCE_KEYS, "completion_mask")
    keys = (GROUP_KEYS + ("completion_ids", "completion_mask")) if group_size else flat_keys
    jitted = jax.jit(score, out_shardings=replicated(mesh))
    current = jax.jit(lambda s: params_fn(s.params, s.frozen, None))
    call_sh = {k: batch_sh[k] for k in keys}

    def score_fn(state, batch, *, old: bool, ref: bool) -> dict[str, np.ndarray]:
        def host_batch(idx):
            sub = {k: batch[k][idx] for k in flat_keys}
            if group_size:
                sub = group_rollout_rows(sub, group_size)
            return {k: sub[k] for k in keys}

        out = {}
        targets = ([("old_logprobs", current(state))] if old else []) + (
            [("ref_logprobs", state.frozen)] if ref else [])
        for name, params in targets:
            parts = [part for _, part in score_rows(
                jitted, params, len(batch["advantages"]), rows_per_call=rows_per_call,
                host_batch=host_batch, batch_sh=call_sh)]
            out[name] = np.concatenate(parts).astype(np.float32)
        return out

    return score_fn
