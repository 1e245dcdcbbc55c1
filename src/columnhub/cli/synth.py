"""The ``columnhub synth`` and ``columnhub regroup`` commands.

``synth`` writes synthetic NanoAOD-like files resampled from a template;
``regroup`` rewrites existing files into another file grouping, order or
subset. Both print a one-line summary. User errors are raised as
:class:`~columnhub.errors.ColumnhubError` (the main CLI maps them to exit
code 2).
"""

from __future__ import annotations

import argparse
import pathlib
import time
from typing import Any

from columnhub.errors import SpecError

__all__ = ["register", "run", "run_regroup"]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"subset must be a number in (0, 1], got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return value


def _layout_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="output directory, or FILE.root")
    p.add_argument("--files", type=int, default=1, help="number of output files (default 1)")
    p.add_argument("--shuffle", action="store_true", help="random event order across files")
    p.add_argument(
        "--subset", type=_fraction, default=1.0, help="keep this random fraction of events"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--branches",
        nargs="+",
        metavar="PATTERN",
        default=None,
        help="glob patterns of branches to write (keys always); '*' for all",
    )
    p.add_argument("--compression", default="zstd:1", help="e.g. zstd:1, lz4:4, zlib:6, none")
    p.add_argument("--basket-events", type=int, default=100_000, help="events per written batch")


def register(subparsers: Any) -> None:
    """Add the ``synth`` and ``regroup`` sub-commands.

    Args:
        subparsers: the object ``ArgumentParser.add_subparsers()`` returned.
    """
    p = subparsers.add_parser(
        "synth",
        help="write synthetic NanoAOD-like ROOT files",
        description=(
            "Write EVENTS NanoAOD-like events resampled from a template file. "
            "Keys (run, luminosityBlock, event) depend only on the event index."
        ),
    )
    p.add_argument("--like", required=True, help="template NanoAOD ROOT file (tree Events)")
    p.add_argument("--events", type=int, required=True, help="number of events to generate")
    p.add_argument("--first-event", type=int, default=0, help="index of the first event")
    _layout_options(p)
    p.set_defaults(func=run)

    r = subparsers.add_parser(
        "regroup",
        help="rewrite ROOT files into another file grouping, order or subset",
        description="Rewrite existing ROOT files (tree Events): same events, new layout.",
    )
    r.add_argument("inputs", nargs="+", help="input ROOT files, read in this order")
    _layout_options(r)
    r.set_defaults(func=run_regroup)


def _summary(verb: str, paths: list[pathlib.Path], seconds: float) -> str:
    import uproot

    events = 0
    for p in paths:
        with uproot.open(p) as f:
            events += int(f["Events"].num_entries)
    size = sum(p.stat().st_size for p in paths)
    where = paths[0].parent if len(paths) > 1 else paths[0]
    return (
        f"{verb} {len(paths)} file(s), {events} events, {size} bytes "
        f"({size / 1e6:.1f} MB) in {seconds:.1f} s -> {where}"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``columnhub synth``; returns the exit code (0)."""
    from columnhub.synth import synthesize

    start = time.perf_counter()
    paths = synthesize(
        args.like,
        events=args.events,
        output=args.output,
        seed=args.seed,
        files=args.files,
        shuffle=args.shuffle,
        subset=args.subset,
        branches=args.branches,
        first_event=args.first_event,
        compression=args.compression,
        basket_events=args.basket_events,
    )
    print(_summary("synth: wrote", paths, time.perf_counter() - start))
    return 0


def run_regroup(args: argparse.Namespace) -> int:
    """Run ``columnhub regroup``; returns the exit code (0)."""
    from columnhub.synth import regroup

    if not args.inputs:
        msg = "regroup needs at least one input file"
        raise SpecError(msg)
    start = time.perf_counter()
    paths = regroup(
        args.inputs,
        output=args.output,
        files=args.files,
        shuffle=args.shuffle,
        subset=args.subset,
        seed=args.seed,
        branches=args.branches,
        compression=args.compression,
        basket_events=args.basket_events,
    )
    print(_summary("regroup: wrote", paths, time.perf_counter() - start))
    return 0
