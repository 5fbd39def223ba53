"""The ``grafting`` command: ``plugins``, ``inspect``, ``merge`` and ``export``.

Every failure is one line on stderr and a non-zero exit status (1; 2 for a
wrong command line), never a traceback unless ``--traceback`` is given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from grafting import __version__
from grafting.cli import export, inspect_adapter, list_plugins, merge
from grafting.cli.common import CommandError
from grafting.errors import GraftingError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grafting", description="Parameter-efficient fine-tuning: adapters on disk.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_grafting_version()}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands = (("plugins", list_plugins), ("inspect", inspect_adapter), ("merge", merge), ("export", export))
    for name, module in commands:
        doc = (module.__doc__ or "").strip().splitlines()[0]
        command = sub.add_parser(name, help=doc, description=doc)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def _grafting_version() -> str:
    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (also used as the console script)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.run(args)
        return status
    except KeyboardInterrupt:
        print("grafting: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.traceback:
            raise
        print(f"grafting {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """The error's message on one line; the class name is added for errors that are not grafting's own."""
    message = " ".join(str(exc).split()) or repr(exc)
    if isinstance(exc, (GraftingError, CommandError)):
        return message
    return f"{type(exc).__name__}: {message}"


__all__ = ["CommandError", "build_parser", "main"]
