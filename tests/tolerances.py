"""Tolerances for comparing two floating-point results of the same math computed in a
different order: sharded vs unsharded, packed vs padded, cached decode vs a full forward,
scanned vs unrolled layers, a kernel vs its reference, micro-batched vs whole-batch,
jitted vs eager. Every comparison test of those families uses `assert_reordered_close`.

Why a derived tolerance: two such programs differ only by rounding, and by how much
depends on the machine (XLA picks other summation orders and vector widths on another
CPU or build), so a tolerance read off one machine's result (`atol=1e-5`) fails by an
ulp on the next. The rounding error of a sum of `n` terms of magnitude at most `s` in a
format with unit roundoff `u = eps / 2` is, with probability at least
`1 - 2 exp(-lam**2 / 2)`, below `lam * sqrt(n) * u * s` (the probabilistic bound of
Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci.
Comput. 2019; the worst case `n * u * s` is far too loose to catch bugs at long n).
A value that passes through `depth` such reductions one after another (a decoder's
layers, then the LM head, then the log-softmax) collects about `depth` of them, so

    atol = LAM * depth * sqrt(n) * u * scale

with `scale` the magnitude of the compared values (by default the largest |desired|:
rounding is relative to the size of the numbers, so one ulp of a log-prob of -20 is
2e-6 while one ulp of 0.01 is 1e-9). `LAM = 8` puts the chance that a single element
exceeds the bound by rounding alone below 1e-13.

Results stored in a coarser dtype than they were summed in (bf16 gradients of fp32
sums) add two ulps of that dtype. Where a compared value is a difference of larger
terms that cancel (a small gradient, a KL, a DPO margin) the rounding is relative to
those terms, so the caller passes their `scale` (trees use their largest leaf).
`JAXPT_TOL_LOG=path` appends the share of its tolerance each comparison used, as JSON
lines: the sweep that measures the margins on a machine.

This stays tight enough to catch real bugs: a wrong mask, a position off by one, a
dropped token or a missing scale move values by 1e-3 to 1 of their size, while the
tolerance for fp32 at n = 64, depth 4 is ~1.5e-5 of it. Each family's test module
holds a mutation check that injects such a bug and asserts this helper rejects it.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

LAM = 8.0


def unit_roundoff(dtype) -> float:
    """u = eps / 2: the largest relative error of one rounding in `dtype`."""
    return float(jnp.finfo(jnp.dtype(dtype)).eps) / 2


def reorder_atol(dtype, n: int, *, depth: int = 1, scale: float = 1.0, out_dtype=None) -> float:
    """Absolute tolerance for two results of `depth` chained reductions of length `n`
    over terms of magnitude `scale`, accumulated in `dtype` in different orders, then
    (if `out_dtype` is coarser) each rounded once to `out_dtype`."""
    if n < 1 or depth < 1:
        raise ValueError(f"reduction length n={n} and depth={depth} must be >= 1")
    atol = LAM * depth * math.sqrt(n) * unit_roundoff(dtype) * float(scale)
    if out_dtype is not None and unit_roundoff(out_dtype) > unit_roundoff(dtype):
        # Each side rounds once, so they land at most one ulp (2u|x|) apart; allow two, so
        # that a value just above a power of two (one ulp = the whole 2u|x|) has room.
        atol += 4 * unit_roundoff(out_dtype) * float(scale)
    return atol


def run_depth(steps: int, num_layers: int) -> int:
    """The depth of a metric `steps` optimizer steps into a run: each step chains a forward
    and a backward through the layers, the LM head and the log-softmax, and its rounding
    reaches the next step through the params. For trainer-level comparisons (resumed vs
    uninterrupted, sharded vs one device, precomputed vs online reference)."""
    return max(1, steps) * 2 * (num_layers + 2)


def _magnitude(x: np.ndarray) -> float:
    finite = np.abs(x[np.isfinite(x)])
    return float(finite.max()) if finite.size else 0.0


def assert_reordered_close(
    actual,
    desired,
    *,
    n: int,
    depth: int = 1,
    dtype=None,
    out_dtype=None,
    scale: float | None = None,
    err_msg: str = "",
):
    """Assert `actual` equals `desired` up to the rounding of a reordered computation.

    n: the longest reduction either side runs (contraction dim, sequence, vocab, batch);
    depth: how many such reductions are chained before the compared value; dtype: the
    accumulation dtype (default float32); out_dtype: the dtype the results were stored in
    when coarser (default: `desired`'s when it is bf16 / fp16); scale:
    the magnitude the rounding is relative to (default: max |desired| over its finite
    values, never |actual|, so that a bug that inflates `actual` cannot widen the
    tolerance; all-zero arrays compare exactly)."""
    a, d = np.asarray(actual), np.asarray(desired)
    if dtype is None:
        # jaxpt accumulates in float32 (x64 off; XLA and the Pallas kernels accumulate
        # bf16 / fp16 dots in fp32): a float64 `desired` is a Python float or a numpy
        # reference of a float32 computation; a bf16 one is float32 sums rounded once.
        dtype = np.float32
        if out_dtype is None and d.dtype.itemsize < 4 and jnp.issubdtype(d.dtype, jnp.floating):
            out_dtype = d.dtype
    if scale is None:
        scale = _magnitude(d.astype(np.float64))
    atol = reorder_atol(dtype, n, depth=depth, scale=scale, out_dtype=out_dtype)
    _log_margin(a, d, atol, n, depth, scale)
    np.testing.assert_allclose(
        a.astype(np.float64),
        d.astype(np.float64),
        atol=atol,
        rtol=0,
        err_msg=f"{err_msg} (reorder tolerance {atol:.3g}: accumulated in "
        f"{jnp.dtype(dtype).name}, n={n}, depth={depth}, scale={scale:.3g})",
    )


def assert_trees_reordered_close(actual, desired, *, n: int, depth: int = 1, dtype=None):
    """`assert_reordered_close` leaf by leaf, all on the scale of the largest |leaf| of
    `desired`: a small gradient is a sum of larger per-token terms that cancel, and its
    rounding is relative to those terms (and to the backward chain that formed them), not
    to itself."""
    leaves_a = jax.tree_util.tree_leaves_with_path(actual)
    leaves_d = jax.tree.leaves(desired)
    assert len(leaves_a) == len(leaves_d), "trees differ in structure"
    scale = max(_magnitude(np.asarray(d, np.float64)) for d in leaves_d)
    for (path, a), d in zip(leaves_a, leaves_d, strict=True):
        assert_reordered_close(
            a, d, n=n, depth=depth, dtype=dtype, scale=scale, err_msg=jax.tree_util.keystr(path)
        )


def _log_margin(a, d, atol, n, depth, scale):
    """With JAXPT_TOL_LOG=path, append how much of each tolerance a comparison used
    (max |a - d| / atol) as a JSON line: the sweep that shows the margins per machine."""
    path = os.environ.get("JAXPT_TOL_LOG")
    if not path or _REJECTING or a.shape != d.shape:
        return
    diff = np.abs(a.astype(np.float64) - d.astype(np.float64))
    used = float(np.nanmax(diff)) / atol if atol > 0 and diff.size else 0.0
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    with open(path, "a") as f:
        row = {"test": test, "used": used, "n": n, "depth": depth, "scale": float(scale),
               "maxdiff": float(np.nanmax(diff)) if diff.size else 0.0}
        f.write(json.dumps(row) + "\n")


_REJECTING = False


def rejects(fn, *args, **kwargs) -> bool:
    """True when the comparison `fn(*args, **kwargs)` fails: for the mutation checks."""
    global _REJECTING
    _REJECTING = True
    try:
        fn(*args, **kwargs)
    except AssertionError:
        return True
    finally:
        _REJECTING = False
    return False
