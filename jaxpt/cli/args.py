"""Command-line arguments that several `jaxpt` subcommands share."""

from __future__ import annotations

import argparse

__all__ = ["add_config_command", "add_dtype_argument"]


def add_config_command(
    sub, name: str, summary: str, description: str, config_help: str
) -> argparse.ArgumentParser:
    """Subcommand `name` that reads a YAML run config and ``key.sub=value`` overrides
    (``args.config``, ``args.overrides``: :func:`jaxpt.config_load.load_config`'s arguments)."""
    p = sub.add_parser(name, help=summary, description=description)
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p


def add_dtype_argument(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--dtype float32|bfloat16`` (default None: the model's or run's own)."""
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help=help_text)
