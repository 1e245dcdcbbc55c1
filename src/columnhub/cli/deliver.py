"""``columnhub deliver SPEC -o DIR``: run a request embedded and print a summary.

A spec with several samples writes ``DIR/<sample>/`` for each and prints one
summary per sample.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add the ``deliver`` sub-command."""
    p = sub.add_parser(
        "deliver",
        help="deliver the columns of a request (YAML/JSON spec) into a directory",
        description=(
            "Deliver the columns of a request into DIR as Parquet parts + manifest.json "
            "(a spec with several samples: DIR/<sample>/ for each)."
        ),
    )
    p.add_argument("spec", help="request file (YAML or JSON)")
    p.add_argument("-o", "--output", metavar="DIR", help="output directory")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="part tasks at once (with --scheduler local: single-threaded worker processes)",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help=(
            "run the part tasks on Dask: a scheduler address (tcp://host:8786) or 'local' "
            "for a LocalCluster of --workers processes (default: $DASK_SCHEDULER_ADDRESS, "
            "else threads in this process)"
        ),
    )
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
    """Deliver and print what was delivered (one summary per sample for several)."""
    from columnhub import _malloc, _readahead
    from columnhub.cache import ColumnCache
    from columnhub.delivery import deliver
    from columnhub.errors import SampleError

    _readahead.arm(args.spec)  # a new process: read while the engine imports
    if args.scheduler is not None or os.environ.get("DASK_SCHEDULER_ADDRESS"):
        from columnhub.execute.dask import quiet_lost_connections

        quiet_lost_connections()  # a lost scheduler is said in one line, below

    cache: ColumnCache | str | bool | None = False if args.no_cache else args.cache
    if args.cache_read_only and not args.no_cache:
        cache = ColumnCache(args.cache, read_only=True)
    options: dict[str, Any] = {
        "output": args.output,
        "workers": args.workers,
        "chunk_size": args.chunk_size,
        "cache": cache,
        "progress": False if args.no_progress else None,
        "scheduler": args.scheduler,
    }
    try:  # the spec's path, not a parsed request: a known result is found without planning
        # a process that exits when done: it keeps freed buffers for the next chunk
        with _malloc.armed():
            delivered = deliver(args.spec, **options)
    except SampleError as err:
        _summarise_samples(err.results, json_out=args.json)  # the samples delivered come first
        raise
    if isinstance(delivered, dict):
        _summarise_samples(delivered, json_out=args.json)
    else:
        _summarise(delivered, json_out=args.json)
    return 0


def _summarise_samples(results: dict[str, Any], *, json_out: bool) -> None:
    if json_out:
        print(json.dumps({name: r.manifest for name, r in results.items()}, indent=2))
        return
    for name, result in results.items():
        print(f"sample {name}:")
        _summarise(result, json_out=False, indent="  ")


def _summarise(result: Any, *, json_out: bool, indent: str = "") -> None:
    m = result.manifest
    if json_out:
        print(json.dumps(m, indent=2))
        return
    timing = m["timing"]
    size = sum(p["bytes"] for p in m["parts"])
    reused = m["cache"].get("reused_result")
    read = (  # a reused result read nothing this time
        "events (nothing read)" if reused else f"of {m['events_read']:,} events"
    )
    print(
        f"{indent}delivered {m['events']:,} {read}, "
        f"{len(m['columns'])} columns, {len(m['files'])} file(s), {size / 1e6:.2f} MB "
        f"in {timing['total_s']:.2f} s ({timing['events_per_s']:,.0f} events/s) "
        f"-> {result.directory}"
    )
    print(
        f"{indent}cache: {m['cache']['hits']} hits, {m['cache']['misses']} misses"
        + (f" (whole result reused from {reused})" if reused else "")
    )
    for name, kind in m["columns"].items():
        print(f"{indent}  {name}: {kind}")
