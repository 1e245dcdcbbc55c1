"""The ``columnhub`` command line: one sub-command module per command group.

Errors are mapped to exit codes here and only here: user errors
(:class:`~columnhub.errors.ColumnhubError`) print one clear message and exit 2;
a service that cannot be reached (:class:`~columnhub.errors.ServiceUnavailableError`),
or a Dask cluster that fails the request (:class:`~columnhub.errors.ClusterError`:
the scheduler lost mid-request, a task's workers dying one after another),
exits 1, as it is no mistake of the user's; an interrupt exits 130, and SIGTERM (a batch
system or ``kill``) exits 143
after the same clean-up as Ctrl-C (it is raised as :class:`Terminated`, a
``KeyboardInterrupt``, in the main thread). Warnings print as one line
(``columnhub: warning: ...``). Users never see a traceback for their own mistakes.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any, NoReturn

from columnhub.errors import ClusterError, ColumnhubError, ServiceUnavailableError

__all__ = ["Terminated", "main"]

# numpy's OpenBLAS starts a thread per core at import that spins for a while
# (about 0.15 CPU-s a command on 2 cores, taken from the work); columnhub does
# no linear algebra, so the command runs it on one thread unless told otherwise.
# Set before anything imports numpy. (Dask's nanny does the same for workers.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

#: modules under ``columnhub.cli`` that add sub-commands, in help order.
COMMANDS = ("deliver", "synth", "cache", "serve", "client")


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


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwinds like Ctrl-C, so every ``finally`` cleans up (staging too)."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    raise Terminated


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread while a command runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _format_warning(message: Warning | str, category: type[Warning], *args: Any, **kw: Any) -> str:
    return f"columnhub: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    formatwarning, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        with _sigterm_unwinds():
            return int(args.func(args) or 0)
    except (ServiceUnavailableError, ClusterError) as err:  # not the user's: try again
        print(f"columnhub: error: {err}", file=sys.stderr)
        return 1
    except ColumnhubError as err:
        print(f"columnhub: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print("columnhub: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("columnhub: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        warnings.formatwarning = formatwarning


def run() -> NoReturn:
    """The ``columnhub`` command: :func:`main`, then a quick exit.

    Exit handlers run and the output is flushed as usual, but the interpreter
    is not torn down module by module: with numba loaded that teardown alone
    takes about 0.4 s of every command. Nothing is left running by then
    (every pool a command used is idle, a Dask cluster it started is closed).

    ``deliver`` runs without the cyclic garbage collector: it runs once and
    exits, its arrays are freed by reference counting (a cold keyed-join
    delivery leaves ~2,000 small cyclic objects and no array to the
    collector), and the collector's full passes over every imported module's
    objects cost ~0.5 CPU-s of a cold 2M-event delivery. Long-running
    commands (``serve``) keep it. For the same reason ``deliver`` keeps the
    buffers it frees for its next chunk instead of handing them back to the
    kernel (:mod:`columnhub._malloc`, armed by the ``deliver`` command).
    """
    if sys.argv[1:2] == ["deliver"]:
        gc.disable()
    code = main()
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    run()
