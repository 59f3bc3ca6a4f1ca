"""`jaxpt` command line: train, generate, eval, export, plan, info."""

from __future__ import annotations

import argparse
import importlib
import sys


def _add_info(sub):
    p = sub.add_parser("info", help="architecture, parameter count and memory of a model")
    p.add_argument("model", help="packaged name, .gguf file, checkpoint dir or hub id")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from jaxpt.models.hub import resolve

    resolved = resolve(args.model)
    cfg = resolved.config()
    n = cfg.num_params()
    print(f"model        {args.model}  ({resolved.kind}: {resolved.path})")
    print(
        f"architecture {cfg.model_type}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"mlp {cfg.intermediate_size}, heads {cfg.num_heads} (kv {cfg.num_kv_heads}, "
        f"head_dim {cfg.head_dim}), vocab {cfg.vocab_size}"
    )
    extras = [
        k
        for k, on in (
            ("tied embeddings", cfg.tie_word_embeddings),
            ("qkv bias", cfg.attention_bias),
            ("q/k norm", cfg.qk_norm),
        )
        if on
    ]
    rope = cfg.rope_scaling_dict
    print(
        f"features     rope_theta {cfg.rope_theta:g}"
        + (f", rope_scaling {rope}" if rope else "")
        + (", " + ", ".join(extras) if extras else "")
    )
    print(f"parameters   {n:,} ({n / 1e6:.1f}M; tied embeddings counted once)")
    for name, nbytes in (("fp32", 4), ("bf16", 2)):
        print(f"memory       {name}: {n * nbytes / 2**20:,.1f} MiB weights")
    # AdamW training with fp32 master weights: weights + grads + two moments.
    print(
        f"train (AdamW, fp32 master): {n * 16 / 2**20:,.1f} MiB for weights, grads and "
        "optimizer state, before activations"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxpt", description="JAX-native post-training: SFT, DPO, GRPO and hybrids."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from jaxpt.cli.train import add_export_parser, add_train_parser

    add_train_parser(sub)
    add_export_parser(sub)
    for module, adder, runner in _OPTIONAL_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        getattr(mod, adder)(sub).set_defaults(func=_lazy(module, runner))
    _add_info(sub)
    return parser


# Subcommands whose modules may be absent in a partial install; each module exposes
# an `add_*_parser(subparsers)` and a `run_*(args)`.
_OPTIONAL_COMMANDS = (
    ("jaxpt.cli.generate", "add_generate_parser", "run_generate"),
    ("jaxpt.cli.eval", "add_eval_parser", "run_eval"),
    ("jaxpt.cli.eval", "add_rft_parser", "run_rft"),
    ("jaxpt.cli.plan", "add_plan_parser", "run_plan"),
)


def _lazy(module: str, name: str):
    def run(args):
        return getattr(importlib.import_module(module), name)(args)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        # User errors (missing model, bad config, bad data) print one clear line.
        print(f"jaxpt {args.command}: error: {e}", file=sys.stderr)
        return 2

