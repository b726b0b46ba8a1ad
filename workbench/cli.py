"""The ``workbench`` command. Each stage module contributes its subcommand through ``register_cli(subparsers)``."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import WorkbenchError

# Modules that define ``register_cli(subparsers)``, in the order their commands are listed in --help.
COMMAND_MODULES = ["meta_train", "transfer", "data", "study", "dashboard", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench",
        description="MetaPerturb Workbench: meta-train a transferable regularizer, transfer it, evaluate it.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"workbench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"workbench.{name}":
                continue
            raise
        module.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
