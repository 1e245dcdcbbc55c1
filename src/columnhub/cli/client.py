"""``columnhub submit | status | fetch | cancel``: the service from the command line.

Each command is a thin layer over :class:`columnhub.Client`; the service's
URL and token come from ``--url``/``--token``, else ``$COLUMNHUB_URL`` /
``$COLUMNHUB_TOKEN``, else ``~/.config/columnhub/config.yaml``. User errors
exit 2, a service that cannot be reached exits 1 (``cli/main.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from columnhub.client import Client

__all__ = ["register"]


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url", metavar="URL", help="the service (default $COLUMNHUB_URL, else the config file)"
    )
    p.add_argument(
        "--token",
        metavar="TOKEN",
        help="bearer token (default $COLUMNHUB_TOKEN, else the config file)",
    )
    p.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="seconds per call (default 30)"
    )


def register(sub: Any) -> None:
    """Add the ``submit``, ``status``, ``fetch`` and ``cancel`` sub-commands."""
    p = sub.add_parser(
        "submit",
        help="submit a request (YAML/JSON spec) to a columnhub service",
        description=(
            "Submit a request to the service and print its id. With --wait, show its progress "
            "and print where its result is (with -o, download it there first)."
        ),
    )
    p.add_argument("spec", help="request file (YAML or JSON)")
    p.add_argument("--title", metavar="T", help="a title shown in status listings")
    p.add_argument("--wait", action="store_true", help="wait for the result")
    p.add_argument(
        "-o", "--output", metavar="DIR", help="with --wait: download the result into DIR"
    )
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    _connection(p)
    p.set_defaults(func=_submit)

    p = sub.add_parser(
        "status",
        help="list your requests on the service, or show one",
        description="Without ID: a table of your requests (newest first). With ID: its details.",
    )
    p.add_argument("id", nargs="?", help="a request id")
    p.add_argument(
        "--state",
        choices=("queued", "running", "complete", "failed", "cancelled"),
        help="list only requests in this state",
    )
    p.add_argument("--all", action="store_true", help="every user's requests (admin scope)")
    p.add_argument("--json", action="store_true", help="print the service's JSON")
    _connection(p)
    p.set_defaults(func=_status)

    p = sub.add_parser(
        "fetch",
        help="download a complete request's result into a directory",
        description=(
            "Download the result of a complete request into DIR (several samples: "
            "DIR/<sample>/), verifying every file; files already there are kept."
        ),
    )
    p.add_argument("id", help="a request id")
    p.add_argument("-o", "--output", metavar="DIR", required=True, help="local directory")
    p.add_argument(
        "--parallel", type=int, default=4, metavar="N", help="downloads at once (default 4)"
    )
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    _connection(p)
    p.set_defaults(func=_fetch)

    p = sub.add_parser(
        "cancel",
        help="cancel a request on the service",
        description="Cancel a request: its work stops unless another request shares it.",
    )
    p.add_argument("id", help="a request id")
    _connection(p)
    p.set_defaults(func=_cancel)


def _client(args: argparse.Namespace) -> Client:
    from columnhub.client import Client

    return Client(args.url, token=args.token, timeout=args.timeout)


def _submit(args: argparse.Namespace) -> int:
    if args.output and not args.wait:
        from columnhub.errors import SpecError

        msg = f"-o {args.output} downloads the result, so it needs --wait; add --wait"
        raise SpecError(msg)
    with _client(args) as client:
        request_id = client.submit(args.spec, title=args.title)
        print(request_id, flush=True)
        if not args.wait:
            return 0
        try:
            client.wait(request_id, progress=False if args.no_progress else None)
        except KeyboardInterrupt:  # the request goes on: say how to find it again
            print(
                f"columnhub: request {request_id} goes on on the service; "
                f"see `columnhub status {request_id}`, stop it with `columnhub cancel {request_id}`",
                file=sys.stderr,
            )
            raise
        if args.output:
            result = client.fetch(
                request_id, args.output, progress=False if args.no_progress else None
            )
            results = result if isinstance(result, dict) else {"": result}
            for name, one in results.items():
                print(_where(name, str(one.directory), one.manifest))
            return 0
        manifest = client.manifest(request_id)
        samples = (
            manifest["samples"]
            if "samples" in manifest and "files" not in manifest
            else {"": manifest}
        )
        for name, described in samples.items():
            print(_where(name, str(described.get("path", "")), described))
    return 0


def _where(sample: str, path: str, manifest: Mapping[str, Any]) -> str:
    label = f"result {sample}" if sample else "result"
    events = int(manifest.get("events") or 0)
    files = len(manifest.get("files", []))
    return f"{label}: {path} ({events:,} events, {files} file(s))"


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.id is not None:
            state = client.status(args.id)
            if args.json:
                print(json.dumps(state, indent=2))
            else:
                _print_one(state)
            return 0
        found = client.requests(state=args.state, all_users=args.all)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    _print_table(found)
    return 0


def _progress_text(progress: Mapping[str, Any] | None) -> tuple[str, str]:
    """``(parts, events)`` columns of a status."""
    p = progress or {}
    parts = f"{p.get('parts_done', 0)}/{p.get('parts_total', 0)}"
    total = p.get("events_total") or 0
    events = f"{p.get('events', 0):,}" + (f"/{total:,}" if total else "")
    return parts, events


def _print_table(found: list[dict[str, Any]]) -> None:
    if not found:
        print("no requests")
        return
    rows = [("ID", "STATUS", "PARTS", "EVENTS", "CREATED", "TITLE")]
    for r in found:
        parts, events = _progress_text(r.get("progress"))
        created = str(r.get("created_at") or "")[:19].replace("T", " ")
        rows.append(
            (str(r["id"]), str(r["status"]), parts, events, created, str(r.get("title") or ""))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _print_one(state: Mapping[str, Any]) -> None:
    p = state.get("progress") or {}
    parts, events = _progress_text(p)
    print(f"request   {state.get('id')}")
    print(f"status    {state.get('status')}")
    labels = {
        "title": "title",
        "owner": "owner",
        "created_at": "created",
        "finished_at": "finished",
    }
    for key, label in labels.items():
        if state.get(key):
            print(f"{label:<9} {state[key]}")
    print(f"parts     {parts}")
    print(f"events    {events}")
    if p.get("bytes"):
        print(f"bytes     {p['bytes']:,}")
    if p.get("rate_events_per_s"):
        print(f"rate      {p['rate_events_per_s']:,.0f} events/s")
    if "cache_hits" in p or "cache_misses" in p:
        print(f"cache     {p.get('cache_hits', 0)} hits, {p.get('cache_misses', 0)} misses")
    samples = state.get("samples") or {}
    if any(name for name in samples):
        print("samples")
        for name, s in samples.items():
            s_parts, s_events = _progress_text(s.get("progress"))
            line = f"  {name}: {s.get('status')} (parts {s_parts}, events {s_events})"
            error = s.get("error")
            if error:
                line += f" {error.get('type')}: {error.get('message')}"
            print(line)
    error = state.get("error")
    if error:
        print(f"error     {error.get('type')}: {error.get('message')}")


def _fetch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.fetch(
            args.id,
            args.output,
            parallel=args.parallel,
            progress=False if args.no_progress else None,
        )
    results = result if isinstance(result, dict) else {"": result}
    for name, one in results.items():
        print(_where(name, str(one.directory), one.manifest))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        state = client.cancel(args.id)
    print(f"{state.get('id', args.id)}: {state.get('status')}")
    return 0
