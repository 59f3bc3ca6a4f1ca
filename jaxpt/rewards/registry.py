"""Reward functions by name or import path, and the host-side reward computation.

Every reward function is called with keyword arguments only, as TRL calls them::

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns)

where ``columns`` holds every other dataset column as a list aligned with the completions
(a prompt's row repeated for each of its generations). It returns one value per completion:
a float, or ``None`` when the function does not apply to that completion (it becomes NaN,
is left out of that function's mean and std, and counts as 0 in the weighted sum; a
completion for which every function returned None gets a NaN total reward, which
:func:`jaxpt.rewards.advantages.compute_advantages` leaves out of its group's mean and std
and turns into a zero advantage).

A returned NaN or +-inf is not "not applicable": it is a bug in the function (an inf
reward would zero every advantage of its group), so it raises :class:`RewardError` naming
the function, the completion and the dataset row; with ``skip_nonfinite=True``
(``grpo.skip_nonfinite_rewards``) it is treated as None instead and counted in the metric
``rewards/nonfinite_skipped``.

Specs accepted by :func:`get_reward_function`:

* a built-in name: ``"math"``, ``"math_strict"`` (no last-number fallback), ``"choice"``
  (multiple choice), ``"answer_format"``, ``"format"``, ``"overlong"``, ``"length"``
  (options such as ``strict=True``, ``equivalence="pkg.mod:fn"``, ``pattern=...`` or
  ``max_completion_length=..., overlong_buffer=...`` go to its factory);
* an import path ``"package.module:function"``; with options, the imported object is a
  factory and is called with them to build the reward function;
* either of those with its options written in the string, as YAML configs need them:
  ``"math(equivalence=mypkg.checks:same_value, timeout_s=1)"``,
  ``"overlong(max_completion_length=512, overlong_buffer=64)"``; each value is read as a
  YAML scalar (``true``, ``1.5``, ``null``, else a string);
* ``"rm:path/to/rm"``: a trained reward model (a Hugging Face sequence-classification
  dir, e.g. ``jaxpt export`` of a reward run), loaded once and run jitted
  (``jaxpt.rewards.reward_model``; option ``batch_size``);
* a callable, used as is.

Failures raise :class:`RewardError` naming the function and a dataset row. Each function
runs in a daemon worker thread joined with ``timeout_s``. A Python thread cannot be killed:
a function that hangs keeps its thread running in the background, so a timeout is fatal for
the run (the trainer should stop and report it), never retried.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import yaml

from jaxpt.rewards.choice import choice_reward
from jaxpt.rewards.format import FormatReward
from jaxpt.rewards.length import LengthPenaltyReward, OverlongReward
from jaxpt.rewards.math import MathReward, answer_format_reward, math_reward, math_strict_reward

__all__ = [
    "RewardError",
    "BUILTIN_REWARDS",
    "get_reward_function",
    "parse_reward_spec",
    "import_object",
    "reward_function_name",
    "compute_rewards",
]

# columns that are not passed through as keyword lists (TRL passes prompt/completion data
# under the plural names)
RESERVED_COLUMNS = frozenset({"prompt", "completion", "completion_ids", "prompts", "completions"})


class RewardError(RuntimeError):
    """A reward function failed; ``function`` is its name, ``rows`` the dataset row indices."""

    def __init__(self, message: str, *, function: str, rows: Sequence[int]):
        super().__init__(message)
        self.function = function
        self.rows = list(rows)


def _math_factory(strict: bool = False, **options):
    if options:  # equivalence=..., timeout_s=..., name=...
        return MathReward(strict=strict, **options)
    return math_strict_reward if strict else math_reward


def _math_strict_factory(**options):
    return _math_factory(strict=True, **options)


BUILTIN_REWARDS: dict[str, Callable[..., Callable]] = {
    "math": _math_factory,
    "math_strict": _math_strict_factory,
    "choice": lambda: choice_reward,
    "answer_format": lambda: answer_format_reward,
    "format": FormatReward,
    "overlong": OverlongReward,
    "length": LengthPenaltyReward,
}


_SPEC_WITH_OPTIONS_RE = re.compile(r"^\s*([\w.:]+)\s*\((.*)\)\s*$", re.DOTALL)


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_reward_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name(key=value, ...)"`` -> ``("name", {key: value})``; a spec without options
    gives ``(spec, {})``. Values are YAML scalars."""
    m = _SPEC_WITH_OPTIONS_RE.match(spec)
    if not m:
        return spec, {}
    name, body = m.group(1), m.group(2)
    options: dict[str, Any] = {}
    for part in _split_top_level(body):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(
                f"reward function spec {spec!r}: options are written key=value, got {part!r}."
            )
        parsed = yaml.safe_load(value.strip()) if value.strip() else None
        options[key] = parsed if isinstance(parsed, (str, int, float, bool, type(None))) else (
            value.strip())
    return name, options


def import_object(spec: str, what: str = "reward function") -> Any:
    """The object at ``"package.module:attr.path"`` (a ValueError naming ``what`` if not)."""
    if ":" not in spec:
        raise ValueError(f"{what} {spec!r} is not an import path 'package.module:function'.")
    module_name, _, attr_path = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r}: {e}") from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"{what} {spec!r}: {module_name!r} has no attribute {attr_path!r}.")
        obj = getattr(obj, attr)
    return obj


def get_reward_function(spec: str | Callable, **options) -> Callable:
    """Resolve a built-in name, a ``package.module:function`` path (either optionally as
    ``"spec(key=value, ...)"``) or a callable."""
    if callable(spec):
        if options:
            raise ValueError("options are only accepted with a built-in name or an import path.")
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(
            f"a reward function spec must be a name, 'module:function' or callable; got {spec!r}."
        )
    if spec.startswith("rm:"):  # a trained reward model's dir (jaxpt.rewards.reward_model)
        from jaxpt.rewards.reward_model import reward_model_function

        return reward_model_function(spec, **options)
    name, spec_options = parse_reward_spec(spec)
    options = {**spec_options, **options}
    if name in BUILTIN_REWARDS:
        try:
            return BUILTIN_REWARDS[name](**options)
        except TypeError as e:
            raise ValueError(f"bad options for the built-in reward '{name}': {e}") from e
    if ":" not in name:
        raise ValueError(
            f"unknown reward function {spec!r}: not a built-in ({', '.join(BUILTIN_REWARDS)}) "
            "and not an import path of the form 'package.module:function'."
        )
    obj = import_object(name)
    if options:
        obj = obj(**options)
    if not callable(obj):
        raise ValueError(
            f"reward function {spec!r} resolved to a non-callable {type(obj).__name__}."
        )
    return obj


def check_reward_columns(reward_funcs: Sequence[Callable], prompts: Sequence[Any]) -> None:
    """Before any sampling: every prompt row has the dataset columns each reward declares
    it needs (a ``required_columns`` attribute, e.g. ``("answer",)`` on the verifiers; user
    functions may declare theirs). Raises ValueError naming the reward, the column, the
    first row without it (file and row) and the columns that row has."""
    for fn in reward_funcs:
        for column in getattr(fn, "required_columns", ()):
            for p in prompts:
                if column not in p.columns:
                    raise ValueError(
                        f"{p.source}:{p.row}: reward {reward_function_name(fn)} needs the "
                        f"dataset column {column!r}, which this row does not have (its "
                        f"columns: {sorted(p.columns)})."
                    )


def reward_function_name(fn: Callable) -> str:
    """The name used in metrics (``rewards/<name>/mean``): ``__name__`` or the class name."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def _call_with_timeout(fn: Callable, kwargs: dict, timeout_s: float | None, name: str):
    """Run ``fn(**kwargs)`` in a daemon thread joined with ``timeout_s``.

    Returns ``("ok", value)``, ``("raised", exception)`` or ``("timeout", None)``.
    """
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn(**kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = e

    thread = threading.Thread(target=target, name=f"reward:{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return "timeout", None
    if "error" in box:
        return "raised", box["error"]
    return "ok", box.get("value")


def _slice_kwargs(kwargs: dict, i: int) -> dict:
    return {k: (None if v is None else v[i : i + 1]) for k, v in kwargs.items()}


def _rows_text(rows: Sequence[int], limit: int = 8) -> str:
    rows = list(dict.fromkeys(int(r) for r in rows))
    shown = ", ".join(str(r) for r in rows[:limit])
    more = f", ... ({len(rows)} rows)" if len(rows) > limit else ""
    return f"dataset row{'s' if len(rows) > 1 else ''} {shown}{more}"


def _to_float(value: Any) -> float | None:
    """float, NaN for None; None when the value is not a number."""
    if value is None:
        return math.nan
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray) and value.shape == ():
        return float(value)
    return None


def _nanstd(x: np.ndarray) -> float:
    """Sample std (ddof=1) ignoring NaN; NaN when fewer than two values (as TRL's nanstd)."""
    valid = x[~np.isnan(x)]
    if valid.size < 2:
        return math.nan
    return float(np.std(valid, ddof=1))


def _nanmean(x: np.ndarray) -> float:
    valid = x[~np.isnan(x)]
    return float(valid.mean()) if valid.size else math.nan


def _run_one(fn, name, kwargs, rows, timeout_s, skip_nonfinite=False) -> tuple[np.ndarray, int]:
    """(float32 [G] rewards, NaN for None; how many non-finite values were skipped)."""
    G = len(rows)
    status, value = _call_with_timeout(fn, kwargs, timeout_s, name)
    if status == "timeout":
        raise RewardError(
            f"reward function '{name}' did not return within timeout_s={timeout_s} s on the "
            f"batch holding {_rows_text(rows)}. A Python thread cannot be killed, so it is left "
            "running as a daemon thread and the run must stop; make the function faster or "
            "raise the timeout.",
            function=name,
            rows=rows,
        )
    if status == "raised":
        bad_rows: list[int] = []
        detail = value
        for i in range(G):  # find the first completion that fails on its own
            s, v = _call_with_timeout(fn, _slice_kwargs(kwargs, i), timeout_s, name)
            if s != "ok":
                bad_rows, detail = [rows[i]], (v if s == "raised" else value)
                break
        where = _rows_text(bad_rows) if bad_rows else f"the batch holding {_rows_text(rows)}"
        raise RewardError(
            f"reward function '{name}' raised {type(detail).__name__}: {detail} on {where}.",
            function=name,
            rows=bad_rows or rows,
        ) from detail
    if isinstance(value, np.ndarray):
        value = value.tolist() if value.ndim == 1 else value
    if not isinstance(value, (list, tuple)):
        raise RewardError(
            f"reward function '{name}' returned {type(value).__name__}, expected a list of "
            f"{G} floats (or None) for the batch holding {_rows_text(rows)}.",
            function=name,
            rows=rows,
        )
    if len(value) != G:
        raise RewardError(
            f"reward function '{name}' returned {len(value)} rewards for {G} completions "
            f"(one per completion expected) on the batch holding {_rows_text(rows)}.",
            function=name,
            rows=rows,
        )
    out = np.empty(G, np.float32)
    skipped = 0
    for i, v in enumerate(value):
        f = _to_float(v)
        if f is None:
            raise RewardError(
                f"reward function '{name}' returned {v!r} ({type(v).__name__}) for completion "
                f"{i} of dataset row {rows[i]}; expected a float or None.",
                function=name,
                rows=[rows[i]],
            )
        if v is not None and not math.isfinite(f):
            if not skip_nonfinite:
                raise RewardError(
                    f"reward function '{name}' returned {f} for completion {i} of dataset "
                    f"row {rows[i]}; rewards must be finite (return None for 'not "
                    "applicable'), or set grpo.skip_nonfinite_rewards: true to treat such "
                    "values as None and count them.",
                    function=name,
                    rows=[rows[i]],
                )
            skipped += 1
            f = math.nan
        out[i] = f
    return out, skipped


def compute_rewards(
    funcs: Sequence[Callable | str],
    weights: Sequence[float] | None,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None,
    columns: dict[str, Sequence[Any]] | None,
    row_indices: Sequence[int] | None,
    timeout_s: float | None = 60.0,
    skip_nonfinite: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    """Score ``G`` completions with every reward function and combine them.

    Args:
        funcs: reward functions or specs (see :func:`get_reward_function`).
        weights: one weight per function (default 1.0 each).
        prompts, completions, completion_ids: one entry per completion.
        columns: other dataset columns, each a list with one entry per completion
            (``prompt``/``completion``/``completion_ids``/``prompts``/``completions`` are
            not passed again).
        row_indices: the dataset row of each completion's prompt (named in errors;
            defaults to the position in the batch).
        timeout_s: per-call limit for each function (None: no limit).
        skip_nonfinite: treat a returned NaN / inf as None and count it in
            ``metrics["rewards/nonfinite_skipped"]`` instead of raising.

    Returns:
        ``(rewards_G, per_function, metrics)``: ``rewards_G`` float32 ``[G]`` =
        ``nansum_f(w_f * r_f)``, NaN where every function returned None;
        ``per_function`` maps each function name to its float32 ``[G]`` rewards (NaN for
        None); ``metrics`` has ``rewards/<name>/mean`` and ``rewards/<name>/std`` (NaN-aware,
        sample std).

    Raises:
        RewardError: a function raised, hung past ``timeout_s``, returned the wrong number
            of values, a non-number or (without ``skip_nonfinite``) NaN / inf; the
            message names the function and dataset row(s).
            To find the row, a function that raised is called again one completion at a
            time (the first completion that fails alone is named; if none does, every row
            of the batch is named).
    """
    G = len(completions)
    funcs = [get_reward_function(f) for f in funcs]
    if not funcs:
        raise ValueError("compute_rewards needs at least one reward function.")
    if weights is None:
        weights = [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ValueError(f"{len(weights)} reward weights for {len(funcs)} reward functions.")
    if len(prompts) != G:
        raise ValueError(f"{len(prompts)} prompts for {G} completions; pass one per completion.")
    if completion_ids is not None and len(completion_ids) != G:
        raise ValueError(f"{len(completion_ids)} completion_ids for {G} completions.")
    rows = list(range(G)) if row_indices is None else [int(r) for r in row_indices]
    if len(rows) != G:
        raise ValueError(f"{len(rows)} row_indices for {G} completions.")
    kwargs: dict[str, Any] = {}
    for key, values in (columns or {}).items():
        if key in RESERVED_COLUMNS:
            continue
        if len(values) != G:
            raise ValueError(
                f"dataset column '{key}' has {len(values)} values for {G} completions; "
                "repeat each row's value for each of its generations."
            )
        kwargs[key] = list(values)
    kwargs["prompts"] = list(prompts)
    kwargs["completions"] = list(completions)
    kwargs["completion_ids"] = None if completion_ids is None else list(completion_ids)

    names: list[str] = []
    for fn in funcs:
        name = reward_function_name(fn)
        if name in names:
            name = f"{name}_{len(names)}"
        names.append(name)

    per_function: dict[str, np.ndarray] = {}
    metrics: dict[str, float] = {}
    nonfinite = 0
    for fn, name in zip(funcs, names, strict=True):
        values_G, n_bad = _run_one(fn, name, kwargs, rows, timeout_s, skip_nonfinite)
        nonfinite += n_bad
        per_function[name] = values_G
        metrics[f"rewards/{name}/mean"] = _nanmean(values_G)
        metrics[f"rewards/{name}/std"] = _nanstd(values_G)

    stacked_GF = np.stack([per_function[n] for n in names], axis=1)
    w_F = np.asarray(weights, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rewards_G = np.nansum(stacked_GF * w_F[None, :], axis=1).astype(np.float32)
    rewards_G[np.all(np.isnan(stacked_GF), axis=1)] = np.nan
    if skip_nonfinite:
        metrics["rewards/nonfinite_skipped"] = float(nonfinite)
    return rewards_G, per_function, metrics
