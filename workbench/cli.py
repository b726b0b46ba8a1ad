"""The ``workbench`` command. Each stage module contributes its subcommand through ``register_cli(subparsers)``."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import WorkbenchError

# Modules that define ``register_cli(subparsers)``, in the order their commands are listed in --help.
COMMAND_MODULES = ["meta_train", "transfer", "data", "study", "dashboard", "demo"]


ARTIFACTS_HELP = "artifacts root (default: $WORKBENCH_ARTIFACTS or the checkout's artifacts/)"


def add_command(subparsers: argparse._SubParsersAction, name: str, func, help: str, description: str | None = None,
                **kwargs) -> argparse.ArgumentParser:
    """A subcommand ``name`` that runs ``func(args)`` (its exit code); ``func=None`` for a group of actions, which
    prints its help and exits 1 when none is given."""
    parser = subparsers.add_parser(name, help=help, description=description or help, **kwargs)
    parser.set_defaults(func=func if func is not None else lambda args: (parser.print_help(), 1)[1])
    return parser


def add_artifacts_flag(parser: argparse.ArgumentParser) -> None:
    """``--artifacts DIR``: every command that reads or writes the run store."""
    parser.add_argument("--artifacts", metavar="DIR", help=ARTIFACTS_HELP)


def add_run_flags(parser: argparse.ArgumentParser, config_name: str, example: str = "--set steps=100",
                  config_file: str = "") -> None:
    """The flags of every stage that makes one run: ``--config``, ``--set``, ``--resume``, ``--artifacts`` and
    ``--no-progress``."""
    parser.add_argument("--config", metavar="FILE", help=f"YAML file of {config_name} fields{config_file}")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help=f"override one config field, e.g. {example} (repeatable)")
    parser.add_argument("--resume", metavar="RUN", help="continue a run (its id or folder) from its last checkpoint")
    add_artifacts_flag(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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
