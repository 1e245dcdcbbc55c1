"""``columnhub deliver SPEC -o DIR``: run a request embedded and print a summary."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add the ``deliver`` sub-command."""
    p = sub.add_parser(
        "deliver",
        help="deliver the columns of a request (YAML/JSON spec) into a directory",
        description="Deliver the columns of a request into DIR as Parquet parts + manifest.json.",
    )
    p.add_argument("spec", help="request file (YAML or JSON)")
    p.add_argument("-o", "--output", metavar="DIR", help="output directory")
    p.add_argument("--workers", type=int, metavar="N", help="chunk tasks at once")
    p.add_argument("--chunk-size", type=int, metavar="N", help="events per chunk")
    p.add_argument("--cache", metavar="PATH_OR_URL", help="column cache (default: per-user)")
    p.add_argument(
        "--cache-read-only",
        action="store_true",
        help="use the cache's entries but never write to it (a shared facility cache)",
    )
    p.add_argument("--no-cache", action="store_true", help="read and compute everything")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Deliver and print what was delivered."""
    from columnhub.cache import ColumnCache
    from columnhub.delivery import deliver

    cache: ColumnCache | str | bool | None = False if args.no_cache else args.cache
    if args.cache_read_only and not args.no_cache:
        cache = ColumnCache(args.cache, read_only=True)
    result = deliver(
        args.spec,
        output=args.output,
        workers=args.workers,
        chunk_size=args.chunk_size,
        cache=cache,
        progress=False if args.no_progress else None,
    )
    m = result.manifest
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    timing = m["timing"]
    size = sum(p["bytes"] for p in m["parts"])
    reused = m["cache"].get("reused_result")
    read = (  # a reused result read nothing this time
        "events (nothing read)" if reused else f"of {m['events_read']:,} events"
    )
    print(
        f"delivered {m['events']:,} {read}, "
        f"{len(m['columns'])} columns, {len(m['files'])} file(s), {size / 1e6:.2f} MB "
        f"in {timing['total_s']:.2f} s ({timing['events_per_s']:,.0f} events/s) "
        f"-> {result.directory}"
    )
    print(
        f"cache: {m['cache']['hits']} hits, {m['cache']['misses']} misses"
        + (f" (whole result reused from {reused})" if reused else "")
    )
    for name, kind in m["columns"].items():
        print(f"  {name}: {kind}")
    return 0
