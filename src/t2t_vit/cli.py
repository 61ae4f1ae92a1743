"""`t2t-vit` command line: thin subcommands that parse, call one library function, print.

Each subcommand lives in the module that does its work and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` to a callable taking the parsed arguments.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from t2t_vit.errors import T2TViTError
from t2t_vit.runtime import tune_for_command

# Modules that contribute subcommands, in the order `--help` lists them.
COMMAND_MODULES = [
    "t2t_vit.profile",
    "t2t_vit.train.cli",
    "t2t_vit.predict",
    "t2t_vit.visualize",
    "t2t_vit.export",
    "t2t_vit.pretrained",  # convert
    "t2t_vit.bench",
    "t2t_vit.experiment",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t2t-vit", description="Tokens-to-Token Vision Transformers: train, evaluate, profile, export."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, not only before the subcommand.
    debug = "--debug" in argv or os.environ.get("T2T_VIT_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    tune_for_command()
    try:
        result = args.func(args)
    except T2TViTError as err:
        if debug:
            raise
        print(f"t2t-vit: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("t2t-vit: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
