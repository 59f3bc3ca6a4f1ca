"""`jaxpt train CONFIG key.sub=value ...` and `jaxpt export CHECKPOINT OUT_DIR`.

`jaxpt/cli/__init__.py` wires them in::

    add_train_parser(sub); add_export_parser(sub)
"""

from __future__ import annotations

import argparse
import errno
import sys

from jaxpt.cli.args import add_config_command, add_dtype_argument


def add_train_parser(sub) -> argparse.ArgumentParser:
    p = add_config_command(
        sub,
        "train",
        "train from a YAML run config (sft, dpo, grpo ...)",
        "Train from a YAML run config; key.sub=value overrides any key "
        "(values are YAML scalars, e.g. optim.lr=1e-4 lora.rank=8 data.eval=null).",
        "YAML run config (configs/*.yaml)",
    )
    from jaxpt.distributed import add_cli_flags

    add_cli_flags(p)
    p.set_defaults(func=run_train)
    return p


def run_train(args, *, callbacks=(), stop=None) -> int:
    from jaxpt import distributed
    from jaxpt.config_load import load_config

    cfg = load_config(args.config, args.overrides)
    # Before any JAX computation: connect the processes of a multi-host run.
    distributed.initialize(distributed.settings_from_args(cfg.distributed, args))

    from jaxpt.engine.loop import NonFiniteError, check_out_dir
    from jaxpt.trainers.registry import get_trainer

    trainer = get_trainer(cfg.algorithm)
    check_out_dir(cfg.out_dir)  # before the model loads
    try:
        result = trainer(cfg, callbacks=callbacks, stop=stop)
    except NonFiniteError as e:
        print(f"jaxpt train: error: {e}", file=sys.stderr, flush=True)
        return 3
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"jaxpt train: error: {out_of_space_message(e, cfg.out_dir)}", file=sys.stderr,
              flush=True)
        return 4
    if not distributed.is_primary():
        return 0
    number = lambda v: isinstance(v, int | float)  # noqa: E731  (non-finite: null)
    shown = {k: v for k, v in result.last_metrics.items() if k == "loss" and number(v)}
    shown.update(
        {k: v for k, v in result.eval_metrics.items() if k == "eval_loss" and number(v)}
    )
    summary = ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
    print(
        f"{cfg.algorithm}: {result.reason} at step {result.step} ({summary}); "
        f"outputs in {cfg.out_dir}",
        flush=True,
    )
    return 0


def out_of_space_message(e: OSError, out_dir) -> str:
    """What a full disk (or quota) did: a save is committed by rename only once written,
    so the step being written is not a checkpoint and the newest complete one is intact."""
    from pathlib import Path

    from jaxpt.engine.checkpoint import step_problem

    ckdir = Path(out_dir) / "checkpoints"
    steps = [int(p.name) for p in ckdir.iterdir() if p.name.isdigit()] if ckdir.is_dir() else []
    complete = [s for s in sorted(steps) if step_problem(ckdir / str(s)) is None]
    newest = (
        f"the newest complete checkpoint, step {complete[-1]} in {ckdir}, is intact"
        if complete
        else f"no checkpoint was completed in {ckdir}"
    )
    return (
        f"out of disk space writing {e.filename or out_dir} ({e.strerror}); that write was "
        f"never committed, {newest}. Free space and run the same command to resume."
    )


def add_export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="write a Hugging Face checkpoint from a training checkpoint (LoRA merged)",
    )
    p.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one step dir")
    p.add_argument("out_dir", help="output dir for config.json + safetensors + tokenizer")
    add_dtype_argument(p, "weight dtype (default: the run's param_dtype)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty OUT_DIR (never the run itself, a parent of it or the "
        "current directory); the old dir is removed only once the new export is in place",
    )
    p.set_defaults(func=run_export)
    return p


def run_export(args) -> int:
    from jaxpt.engine.export import export_checkpoint

    out, step = export_checkpoint(
        args.checkpoint, args.out_dir, dtype=args.dtype, overwrite=args.overwrite
    )
    print(f"exported step {step} to {out}", flush=True)
    return 0
