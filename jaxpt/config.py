"""Typed run configs: the frozen dataclass sections, the section registry, RunConfig.

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

YAML files, `base:` inheritance, dotted overrides and the key / type checks are in
:mod:`jaxpt.config_load` (``load_config``); :func:`config_to_dict` / :func:`dump_config`
write a config back out.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Mapping
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
    "config_to_dict",
    "dump_config",
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
