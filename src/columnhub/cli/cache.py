"""The ``columnhub cache`` command: inspect and trim the column cache.

Sub-commands::

    columnhub cache stats [--cache PATH_OR_URL] [--json]
    columnhub cache gc --max-bytes 10G [--cache PATH_OR_URL] [--json]
    columnhub cache clear --yes [--cache PATH_OR_URL]

``--cache`` defaults to ``$COLUMNHUB_CACHE``, else ``~/.cache/columnhub``.
Each handler returns an exit code; user errors are raised as
:class:`~columnhub.errors.ColumnhubError` for the main CLI to map to exit 2.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from columnhub.errors import CacheError, SpecError

__all__ = ["format_size", "parse_size", "register", "run_clear", "run_gc", "run_stats"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """A byte count from text like ``"500M"``, ``"10G"``, ``"1.5GiB"`` or ``"4096"``.

    Suffixes K, M, G, T, P are binary (powers of 1024), case-insensitive, with
    an optional ``B`` or ``iB``.

    >>> parse_size("10G"), parse_size("500m"), parse_size("1.5KiB"), parse_size("7")
    (10737418240, 524288000, 1536, 7)

    Raises:
        SpecError: the text is not a size.
    """
    m = _SIZE.fullmatch(text)
    if m is None:
        msg = (
            f"size {text!r} is not understood; write a number of bytes with an optional "
            "binary suffix K, M, G, T or P, e.g. 500M or 10G"
        )
        raise SpecError(msg)
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: int) -> str:
    """A byte count for humans, e.g. ``1.5 GiB``.

    >>> format_size(1536), format_size(12)
    ('1.5 KiB', '12 B')
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"  # pragma: no cover - loop returns at TiB


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except SpecError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _open(args: argparse.Namespace, *, read_only: bool) -> Any:
    from columnhub.cache import ColumnCache

    return ColumnCache(args.cache, read_only=read_only)


def run_stats(args: argparse.Namespace) -> int:
    """Print what the cache holds and its hit/miss counts."""
    cache = _open(args, read_only=True)
    stats = cache.stats()
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2))
        return 0
    lines = [
        ("cache", stats.location),
        ("entries", f"{stats.entries}"),
        ("size", f"{format_size(stats.bytes)} ({stats.bytes} bytes)"),
        ("hits", f"{stats.hits}"),
        ("misses", f"{stats.misses}"),
        ("hit ratio", f"{stats.hit_ratio:.1%}"),
        ("puts", f"{stats.puts}"),
    ]
    if stats.skipped_puts:
        lines.append(("skipped puts", f"{stats.skipped_puts} (read-only)"))
    if stats.corrupt:
        lines.append(("corrupt", f"{stats.corrupt} entries dropped"))
    for label, value in lines:
        print(f"{label + ':':<14}{value}")
    return 0


def run_gc(args: argparse.Namespace) -> int:
    """Delete least-recently-used entries until the cache fits ``--max-bytes``."""
    cache = _open(args, read_only=False)
    report = cache.gc(max_bytes=args.max_bytes)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(
        f"removed {report.removed_entries} entries ({format_size(report.removed_bytes)}); "
        f"kept {report.kept_entries} entries ({format_size(report.kept_bytes)}) "
        f"under the cap of {format_size(report.max_bytes)}"
    )
    if report.removed_temp_files:
        print(f"removed {report.removed_temp_files} stale temporary files")
    return 0


def run_clear(args: argparse.Namespace) -> int:
    """Delete every entry (needs ``--yes``)."""
    cache = _open(args, read_only=False)
    if not args.yes:
        msg = f"'cache clear' deletes every entry of {cache.location!r}; add --yes to confirm"
        raise CacheError(msg)
    removed = cache.clear()
    print(f"removed {removed} entries from {cache.location}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``cache`` command (``stats``, ``gc``, ``clear``) to a CLI.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned. Each leaf
            parser sets ``func`` to a handler taking the parsed namespace and
            returning an exit code.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache",
        metavar="PATH_OR_URL",
        default=None,
        help="cache directory or fsspec URL (default: $COLUMNHUB_CACHE, else ~/.cache/columnhub)",
    )
    parser = subparsers.add_parser(
        "cache",
        help="inspect and trim the column cache",
        description=(__doc__ or "").split("\n\n")[0],
    )
    sub = parser.add_subparsers(dest="cache_command", metavar="{stats,gc,clear}", required=True)

    p = sub.add_parser("stats", parents=[common], help="entries, size and hit ratio")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_stats)

    p = sub.add_parser("gc", parents=[common], help="delete least recently used entries")
    p.add_argument(
        "--max-bytes",
        required=True,
        type=_size_arg,
        metavar="SIZE",
        help="keep at most this much, e.g. 500M or 10G (binary units)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_gc)

    p = sub.add_parser("clear", parents=[common], help="delete every entry")
    p.add_argument("--yes", action="store_true", help="confirm deleting everything")
    p.set_defaults(func=run_clear)
