"""YAML run-config files -> a checked :class:`~jaxpt.config.RunConfig`.

A run config is one YAML file (see `configs/`)::

    base: sft_gsm8k_smollm2.yaml      # optional: start from another file (relative path)
    algorithm: sft                    # picks the trainer and its section (`sft:` here)
    out_dir: runs/sft_gsm8k
    model: {name: smollm2-135m-instruct, compute_dtype: bfloat16}
    data: {train: ../shared/data/gsm8k/train.jsonl, format: gsm8k, max_length: 512}
    optim: {lr: 2.0e-5, schedule: cosine, warmup_ratio: 0.03}
    train: {max_steps: 1000, batch_size: 8}
    sft: {neftune_alpha: 5.0}

and on the command line ``key.sub=value`` overrides any key; values are parsed as YAML
scalars (``optim.lr=1e-4``, ``lora.rank=8``, ``data.eval=null``).

Every key is checked: an unknown key, or a value of the wrong type, is an error naming the
file (or ``command line``) and the dotted key path, with a did-you-mean suggestion. The
sections themselves (and the registry of algorithm sections) are in :mod:`jaxpt.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxpt.config import (
    _COMMON_FIELDS,
    _SECTIONS,
    ConfigError,
    RunConfig,
    import_algorithm,
    section_class,
)

__all__ = ["apply_overrides", "build_config", "load_config", "parse_override"]


class _Origins:
    """Which file (or the command line) set each dotted key, for error messages."""

    def __init__(self):
        self.by_key: dict[str, str] = {}
        self.default = "<defaults>"

    def record(self, tree: Any, origin: str, prefix: str = "") -> None:
        if isinstance(tree, Mapping):
            for k, v in tree.items():
                key = f"{prefix}{k}"
                self.by_key[key] = origin
                self.record(v, origin, key + ".")

    def of(self, key: str) -> str:
        while key:
            if key in self.by_key:
                return self.by_key[key]
            key = key.rpartition(".")[0]
        return self.default


def _deep_merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, origins: _Origins, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"{path}: `base:` inheritance loops ({chain})")
    if not path.is_file():
        where = f" (base of {seen[-1]})" if seen else ""
        raise ConfigError(f"{path}: config file not found{where}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw = dict(raw)
    base = raw.pop("base", None)
    tree: dict = {}
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: `base` must be a file path, got {base!r}")
        tree = _read_yaml(path.parent / base, origins, (*seen, path))
    origins.record(raw, str(path))
    return _deep_merge(tree, raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> (["optim", "lr"], 1e-4); the value is a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} is not of the form key.sub=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"command line: override key {key!r} is not a dotted name")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(tree: dict, overrides: Sequence[str], origins: _Origins | None = None) -> dict:
    """Apply dotted ``key.sub=value`` overrides to a raw config tree (returns a new tree)."""
    for text in overrides:
        keys, value = parse_override(text)
        patch: Any = value
        for k in reversed(keys):
            patch = {k: patch}
        tree = _deep_merge(tree, patch)
        if origins is not None:
            origins.by_key[".".join(keys)] = "command line"
    return tree


def _suggest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(options)})"


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)", re.I)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (int, float, bool, str, Literal, Optional,
    tuple[...]/list[...], dict); returns the value, converted where that is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches no type")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list, Sequence):
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept it as the number it is.
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")


def _build(cls: type, raw: Any, prefix: str, origins: _Origins) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{origins.of(prefix)}: {prefix} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}"
        if key not in fields:
            raise ConfigError(
                f"{origins.of(path)}: unknown key {path}{_suggest(str(key), list(fields))}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path, origins)
        else:
            kwargs[key] = _coerce(value, tp, f"{origins.of(path)}: {path}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{origins.of(prefix)}: {prefix}: {e}") from e


def build_config(tree: Mapping, origins: _Origins | None = None, source: str = "<dict>"):
    """A RunConfig from a raw (YAML-shaped) tree; unknown keys and bad types raise."""
    origins = origins or _Origins()
    origins.default = source
    hints = typing.get_type_hints(RunConfig)
    kwargs: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    algorithm = tree.get("algorithm")
    if isinstance(algorithm, str) and "." in algorithm:
        # first: the module registers the sections the keys below may name
        import_algorithm(algorithm, where=f"{origins.of('algorithm')}: algorithm")
    for key, value in tree.items():
        key = str(key)
        if key in _COMMON_FIELDS:
            tp = hints[key]
            if dataclasses.is_dataclass(tp):
                kwargs[key] = _build(tp, value, key, origins)
            else:
                kwargs[key] = _coerce(value, tp, f"{origins.of(key)}: {key}")
            continue
        cls = section_class(key)
        if cls is None:
            known = [*_COMMON_FIELDS, *_SECTIONS]
            raise ConfigError(f"{origins.of(key)}: unknown key {key}{_suggest(key, known)}")
        sections[key] = _build(cls, value, key, origins)
    cfg = RunConfig(**kwargs, sections=types.MappingProxyType(sections), source=source)
    _validate(cfg, origins)
    return cfg


def _validate(cfg: RunConfig, origins: _Origins) -> None:
    def bad(key, msg):
        raise ConfigError(f"{origins.of(key)}: {key}: {msg}")

    t = cfg.train
    if t.batch_size < 1:
        bad("train.batch_size", f"must be >= 1, got {t.batch_size}")
    if t.grad_accum < 1:
        bad("train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    if t.batch_size % t.grad_accum:
        bad(
            "train.grad_accum",
            f"batch_size={t.batch_size} is not divisible by grad_accum={t.grad_accum}",
        )
    if t.max_steps is not None and t.max_steps < 1:
        bad("train.max_steps", f"must be >= 1, got {t.max_steps}")
    if t.max_bad_steps < 1:
        bad("train.max_bad_steps", f"must be >= 1, got {t.max_bad_steps}")
    if not (math.isfinite(t.num_epochs) and t.num_epochs > 0):
        bad("train.num_epochs", f"must be a finite number > 0, got {t.num_epochs}")
    for key in ("eval_every",):
        if getattr(t, key) < 0:
            bad(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    for key in ("eval_batches", "eval_batch_size", "stop_after_steps"):
        if getattr(t, key) is not None and getattr(t, key) < 1:
            bad(f"train.{key}", f"must be >= 1 or null, got {getattr(t, key)}")
    if not str(cfg.out_dir).strip():
        bad("out_dir", "must name a directory, got an empty string")
    d = cfg.data
    if d.max_length < 2:
        bad("data.max_length", f"must be >= 2, got {d.max_length}")
    for key in ("max_train_rows", "max_eval_rows"):
        if getattr(d, key) is not None and getattr(d, key) < 1:
            bad(f"data.{key}", f"must be >= 1 or null (all rows), got {getattr(d, key)}")
    o = cfg.optim
    # (key, value, low, high, high included); NaN fails every comparison, so it is caught
    ranges = (
        ("lr", o.lr, 0.0, math.inf, False),
        ("weight_decay", o.weight_decay, 0.0, math.inf, False),

        ("b1", o.b1, 0.0, 1.0, False),
        ("b2", o.b2, 0.0, 1.0, False),
        ("warmup_ratio", o.warmup_ratio, 0.0, 1.0, False),
        ("min_lr_ratio", o.min_lr_ratio, 0.0, 1.0, True),
    )
    for key, v, lo, hi, hi_in in ranges:
        if not (lo <= v and (v <= hi if hi_in else v < hi)):
            span = f"[{lo:g}, {hi:g}{']' if hi_in else ')'}" if hi < math.inf else f">= {lo:g}"
            bad(f"optim.{key}", f"must be a finite number {span}, got {v}")
    if not 0 < o.eps < math.inf:  # 0: 0 / 0 on a param whose gradients were all zero
        bad("optim.eps", f"must be a finite number > 0, got {o.eps}")
    if o.warmup_steps < 0:
        bad("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if o.max_grad_norm is not None and not (0 < o.max_grad_norm < math.inf):
        bad("optim.max_grad_norm", f"must be a finite number > 0 or null, got {o.max_grad_norm}")
    if cfg.checkpoint.every < 0:
        bad("checkpoint.every", f"must be >= 0, got {cfg.checkpoint.every}")
    lo = cfg.lora
    if lo.rank < 0:
        bad("lora.rank", f"must be >= 0, got {lo.rank}")
    if not 0 <= lo.dropout < 1:
        bad("lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    try:
        re.compile(lo.targets)
    except re.error as e:
        bad("lora.targets", f"invalid regex {lo.targets!r}: {e}")
    if cfg.checkpoint.keep < 1:
        bad("checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}")
    if cfg.logging.every < 1:
        bad("logging.every", f"must be >= 1, got {cfg.logging.every}")
    s = cfg.sections.get("sft")
    if s is not None and not 0 <= s.masked_thought < 1:
        bad("sft.masked_thought", f"must be in [0, 1), got {s.masked_thought}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a YAML run config (following `base:`), apply dotted overrides, type-check."""
    origins = _Origins()
    path = Path(path)
    tree = _read_yaml(path, origins)
    tree = apply_overrides(tree, overrides, origins)
    return build_config(tree, origins, source=str(path))
