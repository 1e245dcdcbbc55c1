"""A fully cached request through the service: submit to complete, p50/p95, CPU per request.

One request over the ttbar sample is delivered once (cold); then ``--n``
identical requests are sent one after the other, each polled every 2 ms
until it is final, in process (``httpx.ASGITransport``) and through
``columnhub serve`` on a loopback port. CPU per request is the service's
CPU seconds over the timed requests divided by their number (in process:
the whole process, the client's polling included; served: the server
process and its children).

    python benchmarks/bench_service_cached.py [--n 50] [--mode inproc|serve|both]

Prints one JSON object per mode. Times are wall times on whatever else the
machine runs: compare CPU seconds too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

DATA = Path(
    os.environ.get("COLUMNHUB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
FINAL = ("complete", "failed", "cancelled")


def spec(path: Path) -> dict[str, Any]:
    return {
        "dataset": {"files": [str(path)]},
        "columns": ["Jet_pt", "nJet", "MET_pt"],
        "where": "nJet >= 4",
        "chunk_size": 50,
        "output": {"target_part_bytes": 1},
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def timed(
    post: Callable[[], dict[str, Any]], get: Callable[[str], dict[str, Any]], n: int
) -> tuple[list[float], set[str]]:
    """``n`` requests one after the other: seconds from submit to final, and their jobs."""
    first = post()
    while get(first["id"])["status"] not in FINAL:
        time.sleep(0.05)
    out, jobs = [], set()
    for _ in range(n):
        t0 = time.perf_counter()
        answer = post()
        status = answer
        while status["status"] not in FINAL:
            time.sleep(0.002)
            status = get(answer["id"])
        out.append(time.perf_counter() - t0)
        if status["status"] != "complete":
            sys.exit(f"a cached request ended {status['status']}: {status}")
        jobs.add(get(answer["id"])["samples"][""]["job"])
    return out, jobs


def summary(
    mode: str, seconds: list[float], cpu: float, jobs: set[str], results: Path
) -> dict[str, Any]:
    return {
        "mode": mode,
        "n": len(seconds),
        "p50_ms": round(pct(seconds, 50) * 1e3, 2),
        "p95_ms": round(pct(seconds, 95) * 1e3, 2),
        "mean_ms": round(sum(seconds) / len(seconds) * 1e3, 2),
        "cpu_ms_per_request": round(cpu / len(seconds) * 1e3, 2),
        "jobs": len(jobs),
        "result_folders": len(list(results.iterdir())),
    }


def inproc(tmp: Path, n: int) -> dict[str, Any]:
    import anyio.from_thread

    from columnhub.service.app import create_app
    from columnhub.service.config import load_config

    config = load_config(state_dir=tmp / "state", data_roots=[DATA], workers=2)
    app = create_app(config)
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(app.router.lifespan_context(app)),
    ):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x")

        def post() -> dict[str, Any]:
            r = portal.call(
                lambda: client.post("/api/v1/requests", json=spec(DATA / "nano_tt_v12.root"))
            )
            return dict(r.json())

        def get(rid: str) -> dict[str, Any]:
            return dict(portal.call(lambda: client.get(f"/api/v1/requests/{rid}")).json())

        post()  # warm: imports, first delivery
        c0 = time.process_time()
        seconds, jobs = timed(post, get, n)
        cpu = time.process_time() - c0
        portal.call(client.aclose)
    return summary("inproc", seconds, cpu, jobs, config.results_dir)


@contextlib.contextmanager
def served(tmp: Path) -> Iterator[tuple[str, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "columnhub"
    cmd = [
        str(exe),
        "serve",
        "--port",
        str(port),
        "--state-dir",
        str(tmp / "state"),
        "--data-root",
        str(DATA),
        "--workers",
        "2",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > end:
                sys.exit("columnhub serve did not start")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def serve(tmp: Path, n: int) -> dict[str, Any]:
    import psutil

    with served(tmp) as (url, pid), httpx.Client(base_url=url) as client:
        server = psutil.Process(pid)

        def cpu() -> float:
            total = 0.0
            for p in [server, *server.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            return total

        def post() -> dict[str, Any]:
            return dict(
                client.post("/api/v1/requests", json=spec(DATA / "nano_tt_v12.root")).json()
            )

        def get(rid: str) -> dict[str, Any]:
            return dict(client.get(f"/api/v1/requests/{rid}").json())

        post()
        c0 = cpu()
        seconds, jobs = timed(post, get, n)
        used = cpu() - c0
    return summary("serve", seconds, used, jobs, tmp / "state" / "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--mode", choices=["inproc", "serve", "both"], default="both")
    args = parser.parse_args()
    for mode in ["inproc", "serve"] if args.mode == "both" else [args.mode]:
        with tempfile.TemporaryDirectory(prefix="columnhub-cached-") as tmp:
            os.environ["COLUMNHUB_CACHE"] = str(Path(tmp) / "default-cache")
            run = inproc if mode == "inproc" else serve
            print(json.dumps(run(Path(tmp), args.n)), flush=True)


if __name__ == "__main__":
    main()
