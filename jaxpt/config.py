"""Typed run configs: frozen dataclasses, YAML files with `base:` inheritance, dotted overrides.

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

Sections are frozen dataclasses. The common ones (`model`, `data`, `optim`, `train`,
`lora`, `checkpoint`, `mesh`, `logging`) are fields of :class:`RunConfig`; each algorithm
adds its own section (`sft:`, `dpo:`, `grpo:` ...) with :func:`register_section`, and reads
it back with ``cfg.section("dpo")`` (or ``cfg.dpo``). A section that is not registered yet
is looked up by importing ``jaxpt.algorithms.<name>`` (the algorithm module registers it), so a
new algorithm plugs in without touching the loader.

``algorithm:`` names jaxpt's own algorithms by name (``sft`` -> ``jaxpt.trainers.sft``) and
any other by import path (``algorithm: mypkg.my_algo``): that module is imported when the
config loads, so the sections it registers are known to the loader (an import path that
does not import is an error naming the key), and it registers its trainer under its
import path (``register_builder(__name__, build)``, see ``jaxpt.trainers.registry``).

Every key is checked: an unknown key, or a value of the wrong type, is an error naming the
file (or ``command line``) and the dotted key path, with a did-you-mean suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "LoraConfig",
    "MeshConfig",
    "ModelSection",
    "OptimConfig",
    "RunConfig",
    "SFTConfig",
    "TrainConfig",
    "apply_overrides",
    "config_to_dict",
    "dump_config",
    "load_config",
    "register_section",
]


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the file and the key path."""


# ----------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which weights to load and how to run them."""

    name: str = "smollm2-135m-instruct"  # packaged name, .gguf, HF dir or hub id
    tokenizer: str | None = None  # default: the model's own tokenizer
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # Recomputed in the backward instead of stored: "attention" (the T x T probabilities,
    # from q and k, as a flash-attention kernel does), "full" / "dots" (per layer). Every
    # policy but "none" uses the decoder's written-out attention backward.
    remat: Literal["none", "attention", "full", "dots"] = "attention"
    # Attention without the T x T scores: jax's splash kernel on TPU, cuDNN on GPU; auto
    # picks by the mesh's devices (xla on CPU). jaxpt/kernels/attention.py: what each covers.
    attention: Literal["auto", "xla", "splash", "cudnn"] = "auto"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training / held-out data. Relative paths are relative to the working directory."""

    train: str | None = None  # .jsonl/.json/.parquet file, saved dataset dir or hub name
    eval: str | None = None  # held-out split for periodic evaluation
    train_split: str | None = None  # for hub / saved datasets
    eval_split: str | None = None
    # gsm8k: question/answer rows -> prompt/completion; hh_rlhf: Anthropic hh-rlhf
    # transcripts {chosen, rejected} -> conversational preference rows (DPO)
    format: Literal["auto", "gsm8k", "hh_rlhf"] = "auto"
    max_train_rows: int | None = None  # first N rows only
    max_eval_rows: int | None = None
    max_length: int = 1024
    packing: bool = True
    truncation: Literal["keep_start", "drop"] = "keep_start"
    completion_only: bool = True
    assistant_only: bool = True
    skip_invalid: bool = False
    shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + decay and global-norm clipping (TRL / HF Trainer defaults)."""

    lr: float = 2.0e-5
    weight_decay: float = 0.0  # not applied to norms and biases
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1.0e-8
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio (cosine / linear)
    max_grad_norm: float | None = 1.0  # None: no clipping


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimization loop. ``batch_size`` rows (global) make one optimizer step; they
    are processed as ``grad_accum`` micro-batches of ``batch_size / grad_accum`` rows."""

    max_steps: int | None = None  # None: num_epochs over the training data
    num_epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    logprob_impl: Literal["auto", "pallas", "chunked", "reference"] = "auto"
    token_accuracy: bool = True  # compute mean_token_accuracy (one extra LM-head pass)
    with_entropy: bool = True  # compute the entropy metric
    eval_every: int = 0  # 0: evaluate only at the end (when data.eval is set)
    eval_on_start: bool = False  # also evaluate before the first step (logged at step 0)
    eval_batches: int | None = None  # None: the whole held-out set
    eval_batch_size: int | None = None  # default: batch_size // grad_accum
    max_bad_steps: int = 3  # stop after this many consecutive non-finite steps
    stop_after_steps: int | None = None  # save and stop early (schedule still uses max_steps)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters; ``rank: 0`` disables LoRA (full fine-tuning)."""

    rank: int = 0
    alpha: float = 16.0
    # Dropout on the entries of A (weight dropout), resampled every step. PEFT drops the
    # layer *inputs* per token instead; that cannot be merged into the weights.
    dropout: float = 0.0
    targets: str = "wq|wk|wv|wo|w_gate|w_up|w_down"  # regex searched in param names


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # save every N steps; 0: only at the end (and on SIGTERM)
    keep: int = 3  # keep the N newest checkpoints
    async_save: bool = True
    resume: bool = True  # continue from the newest checkpoint in <out_dir>/checkpoints


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: all remaining devices
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    every: int = 1  # log metrics every N steps
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = False  # <out_dir>/tensorboard (needs tensorboard or tensorboardX)
    wandb_project: str | None = None  # W&B when set (needs wandb)
    wandb_run_name: str | None = None
    peak_flops: float | None = None  # per device, for mfu; default from the device kind


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """SFT variants (off by default)."""

    # Masked Thought: replace this fraction of response input tokens with mask_token_id.
    masked_thought: float = 0.0
    mask_token_id: int | None = None  # default: the tokenizer's unk, else pad token
    neftune_alpha: float | None = None  # NEFTune noise on input embeddings (e.g. 5.0)


# name -> dataclass for algorithm sections; filled by register_section.
_SECTIONS: dict[str, type] = {}


def register_section(name: str, cls: type | None = None):
    """Register an algorithm section (``dpo:`` -> DPOConfig). Usable as a decorator."""

    def do(c):
        if not dataclasses.is_dataclass(c):
            raise TypeError(f"section {name!r}: {c} is not a dataclass")
        if name in _COMMON_FIELDS:
            raise ValueError(f"section name {name!r} clashes with a common section")
        _SECTIONS[name] = c
        return c

    return do(cls) if cls is not None else do


# sections registered outside jaxpt.algorithms
_SECTION_MODULES = {"distributed": "jaxpt.distributed"}
_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _import_if_present(module: str) -> bool:
    """Import `module`; False when it (or a package above it) does not exist. A missing
    module that `module` itself imports is raised as it is."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise
        return False
    return True


def trainer_module(name: str) -> str | None:
    """The module that registers algorithm `name`'s trainer: ``jaxpt.trainers.<name>`` for a
    plain name (it imports ``jaxpt.algorithms.<name>``, which registers the sections), `name`
    itself for an import path (``mypkg.my_algo``: one module may be both), None otherwise."""
    if _IMPORT_PATH.fullmatch(name):
        return name
    return f"jaxpt.trainers.{name}" if _NAME.fullmatch(name) else None


def import_algorithm(name: str, where: str = "algorithm") -> None:
    """Import the trainer module of algorithm `name` (it registers its trainer and, through
    its algorithm module, its sections). A plain name with no module in ``jaxpt.trainers``
    is left to the trainer lookup; an import path that does not import is a ConfigError
    starting with `where`."""
    module = trainer_module(name)
    if module is not None and not _import_if_present(module) and module == name:
        raise ConfigError(
            f"{where}: {name!r} is not a jaxpt algorithm and no module {name!r} can be "
            "imported (an algorithm outside jaxpt is named by the import path of its "
            "module; is its package installed or on PYTHONPATH?)"
        )


def section_class(name: str) -> type | None:
    """The registered dataclass for section `name`, importing ``jaxpt.algorithms.<name>`` once
    if it is not registered yet (trainer modules register their sections)."""
    if name not in _SECTIONS and _NAME.fullmatch(name):
        _import_if_present(_SECTION_MODULES.get(name, f"jaxpt.algorithms.{name}"))
    return _SECTIONS.get(name)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    algorithm: str = "sft"
    out_dir: str = "runs/default"
    model: ModelSection = ModelSection()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    logging: LoggingConfig = LoggingConfig()
    # Algorithm sections by name (registered dataclasses), read with section(name).
    sections: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = dataclasses.field(default="<defaults>", compare=False)  # the YAML file

    def section(self, name: str):
        """The `name` section (its defaults when the YAML does not have it)."""
        if name in self.sections:
            return self.sections[name]
        cls = section_class(name)
        if cls is None:
            raise ConfigError(f"{self.source}: no config section {name!r} is registered")
        return cls()

    def __getattr__(self, name: str):
        # Only called for names that are not fields: cfg.sft, cfg.dpo, ...
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self.section(name)
        except ConfigError as e:
            raise AttributeError(str(e)) from None

    def replace(self, **kw) -> RunConfig:
        return dataclasses.replace(self, **kw)


_COMMON_FIELDS = {
    f.name: f for f in dataclasses.fields(RunConfig) if f.name not in ("sections", "source")
}
register_section("sft", SFTConfig)


# ----------------------------------------------------------------------------- loading


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


# ----------------------------------------------------------------------------- dumping


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (YAML-ready) with every value, sections included."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, Mapping):
            return {k: plain(v) for k, v in x.items()}
        return x

    out = {name: plain(getattr(cfg, name)) for name in _COMMON_FIELDS}
    for name, sec in cfg.sections.items():
        out[name] = plain(sec)
    return out


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config (loads back to an equal RunConfig)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
