"""The ``columnhub`` command line: one sub-command module per command group.

Errors are mapped to exit codes here and only here: user errors
(:class:`~columnhub.errors.ColumnhubError`) print one clear message and exit 2;
an interrupt exits 130. Users never see a traceback for their own mistakes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from columnhub.errors import ColumnhubError

__all__ = ["main"]

#: modules under ``columnhub.cli`` that add sub-commands, in help order.
COMMANDS = ("deliver", "synth", "cache")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 on usage errors too
        self.print_usage(sys.stderr)
        self.exit(2, f"columnhub: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered."""
    from columnhub import __version__

    parser = _Parser(
        prog="columnhub",
        description="Select, join, compute, cache and deliver columns of HEP event data.",
    )
    parser.add_argument("--version", action="version", version=f"columnhub {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"columnhub.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ColumnhubError as err:
        print(f"columnhub: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("columnhub: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
