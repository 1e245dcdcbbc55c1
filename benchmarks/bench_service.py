"""Service load: 50 concurrent clients against one ``columnhub serve --scheduler local --workers 2``.

One service on loopback (auth off, SQLite, a Dask ``LocalCluster`` of two
single-threaded worker processes) over a synthetic NanoAOD file. ``--clients``
threads (default 50) start together, each with its own ``httpx`` client:

- half submit the *identical* request A (MET_pt, Jet_pt, nJet and
  ``ht = sum(Jet_pt[Jet_pt > 30])`` where ``nJet >= 2``): single flight must
  compute it once and answer everyone;
- half submit a request *sharing columns* with A: the same columns and
  selection plus one new column ``ht_k = sum(Jet_pt[Jet_pt > k])`` with its own
  ``k`` (25 distinct requests), so their shared column chunks are cache hits.

Each client submits, polls its status (every 20 ms) until final and records
the time to result. Then ``--cached`` more identical requests A are sent one
after the other (polled every 2 ms): a fully cached request, target p95 < 100 ms.

Reported: completed/failed, p50/p95 time to result, requests/s, the column
cache's hit ratio (``/api/v1/overview``), how many jobs of the identical
requests computed anything (manifests' cache misses: target 1), the p95 of a
fully cached request, and the service's CPU seconds and peak memory (its
process and the LocalCluster's, psutil). Every result's event count is checked
against a direct uproot read. From these figures the script works out what a
facility of 100 workers and 300 users needs (database writes/s, scheduler
tasks/s, cache bandwidth).

    python benchmarks/bench_service.py             # 200k events
    python benchmarks/bench_service.py --quick     # 40k events
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import uproot
from _common import DATA, columnhub_cmd, env, synth_root, write_json

FINAL = ("complete", "failed", "cancelled")
#: the facility the sizing is worked out for
FACILITY_WORKERS = 100
FACILITY_USERS = 300
#: assumption of the sizing: at peak, each user submits a request this often (seconds)
USER_PERIOD_S = 60.0
#: facility part tasks: the default chunk_size; a typical request's events
PROD_CHUNK = 500_000
REQUEST_EVENTS = 20_000_000


def spec_a(path: Path, chunk: int) -> dict[str, Any]:
    return {
        "dataset": {"name": "synth", "files": [str(path)]},
        "columns": ["MET_pt", "Jet_pt", "nJet", "ht"],
        "define": {"ht": "sum(Jet_pt[Jet_pt > 30])"},
        "where": "nJet >= 2",
        "chunk_size": chunk,
    }


def spec_shared(path: Path, chunk: int, k: int) -> dict[str, Any]:
    spec = spec_a(path, chunk)
    spec["columns"] = [*spec["columns"], f"ht_{k}"]
    spec["define"] = {**spec["define"], f"ht_{k}": f"sum(Jet_pt[Jet_pt > {k}])"}
    return spec


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sampler:
    """Peak RSS of the service's process tree (the LocalCluster's workers included)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def rss(self) -> int:
        total = 0
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def cpu(self) -> float:
        total = 0.0
        for p in self.tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, self.rss())


def wait_final(client: httpx.Client, rid: str, poll: float, deadline: float) -> dict[str, Any]:
    while True:
        status: dict[str, Any] = client.get(f"/api/v1/requests/{rid}").json()
        if status["status"] in FINAL:
            return status
        if time.monotonic() > deadline:
            return {**status, "status": "timeout"}
        time.sleep(poll)


def run_client(
    url: str,
    token: str,
    spec: dict[str, Any],
    out: dict[str, Any],
    start: threading.Barrier,
    timeout: float,
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
        start.wait()
        t0 = time.monotonic()
        try:
            resp = client.post("/api/v1/requests", json=spec)
            if resp.status_code != 202:
                out.update(status="rejected", error=resp.text, seconds=time.monotonic() - t0)
                return
            rid = resp.json()["id"]
            status = wait_final(client, rid, 0.02, t0 + timeout)
        except httpx.HTTPError as err:
            out.update(status="error", error=repr(err), seconds=time.monotonic() - t0)
            return
        out.update(
            id=rid,
            status=status["status"],
            seconds=time.monotonic() - t0,
            job=status["samples"][""]["job"],
            t_end=time.monotonic(),
            token=token,
        )


def reference_events(path: Path) -> int:
    """Independent reference: events with nJet >= 2, read with uproot."""
    with uproot.open(path) as f:
        return int(np.count_nonzero(f["Events"]["nJet"].array(library="np") >= 2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events of the input file")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: events / 4")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--cached", type=int, default=30, help="fully cached requests timed")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a client waits")
    parser.add_argument("--quick", action="store_true", help="40k events")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.events = 40_000
    chunk = args.chunk_size or max(1, args.events // 4)
    path = synth_root(args.events)
    expected = reference_events(path)

    tmp = Path(tempfile.mkdtemp(prefix="bench-service-", dir=DATA))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "serve.log"
    # one user per client (a user may hold 8 active requests: the per-user limit)
    tokens = [f"bench-token-{i}-{os.urandom(8).hex()}" for i in range(args.clients)]
    (tmp / "tokens.yaml").write_text(
        json.dumps(
            {
                "tokens": {
                    hashlib.sha256(t.encode()).hexdigest(): {
                        "user": f"user{i}",
                        "scopes": ["read", "submit"],
                    }
                    for i, t in enumerate(tokens)
                }
            }
        )
    )
    cmd = columnhub_cmd(
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--scheduler",
        "local",
        "--workers",
        str(args.workers),
        "--state-dir",
        str(tmp / "state"),
        "--cache",
        str(tmp / "cache"),
        "--token-file",
        str(tmp / "tokens.yaml"),
        "--data-root",
        str(path.parent),
        "--log-level",
        "warning",
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env())
    try:
        t_start = time.monotonic()
        while True:
            if proc.poll() is not None:
                sys.exit(f"columnhub serve exited:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - t_start > 180:
                sys.exit(f"service not ready after 180 s:\n{log.read_text()}")
            time.sleep(0.2)
        ready_s = time.monotonic() - t_start
        sampler = Sampler(proc.pid)
        sampler.thread.start()
        cpu0 = sampler.cpu()

        # -- the load: half identical, half sharing columns -----------------------
        half = args.clients // 2
        specs = [spec_a(path, chunk)] * half + [
            spec_shared(path, chunk, 20 + i) for i in range(args.clients - half)
        ]
        results: list[dict[str, Any]] = [{} for _ in specs]
        barrier = threading.Barrier(len(specs))
        threads = [
            threading.Thread(target=run_client, args=(url, tok, s, r, barrier, args.timeout))
            for tok, s, r in zip(tokens, specs, results, strict=True)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        load_s = max((r.get("t_end", t0) for r in results), default=t0) - t0
        cpu_load = sampler.cpu() - cpu0

        user0 = {"Authorization": f"Bearer {tokens[0]}"}
        with httpx.Client(base_url=url, timeout=60, headers=user0) as client:
            overview = client.get("/api/v1/overview").json()
            manifests: dict[str, dict[str, Any]] = {}
            wrong = []
            for r in results:
                if r.get("status") == "complete" and r["job"] not in manifests:
                    m = client.get(
                        f"/api/v1/requests/{r['id']}/manifest",
                        headers={"Authorization": f"Bearer {r['token']}"},
                    ).json()
                    manifests[r["job"]] = m
                    if m["events"] != expected:
                        wrong.append((r["id"], m["events"]))
            identical_jobs = {r.get("job") for r in results[:half] if r.get("job")}
            # a job computed unless deliver answered it with a stored result
            computed_identical = sum(
                1
                for j in identical_jobs
                if j in manifests and not manifests[j]["cache"].get("reused_result")
            )
            computed = [m for m in manifests.values() if not m["cache"].get("reused_result")]

            # -- fully cached requests, one after the other ---------------------------
            cached, cached_jobs, post_s = [], [], []
            answered_at_submit = 0  # complete in the POST reply: the completed job shared
            for _ in range(args.cached):
                c0 = time.monotonic()
                posted = client.post("/api/v1/requests", json=spec_a(path, chunk)).json()
                rid = posted["id"]
                post_s.append(time.monotonic() - c0)
                status = wait_final(client, rid, 0.002, c0 + 60)
                cached.append(time.monotonic() - c0)
                if posted["status"] == "complete":
                    answered_at_submit += 1
                else:  # a job of its own: where its time went is in the database
                    cached_jobs.append(status["samples"][""]["job"])
                if status["status"] != "complete":
                    wrong.append((rid, status["status"]))
            cache_stats = client.get("/api/v1/cache/stats").json()
        sampler.stop.set()
        sampler.thread.join()
        cpu_total = sampler.cpu() - cpu0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # where a fully cached request's time goes: the jobs' own timestamps (the database)
    with contextlib.closing(sqlite3.connect(tmp / "state" / "columnhub.db")) as conn:
        stamps = {
            job: (created, started, finished)
            for job, created, started, finished in conn.execute(
                "SELECT id, created_at, started_at, finished_at FROM jobs"
            )
        }
    queue_ms, run_ms = [], []
    for job in cached_jobs:
        created, started, finished = (dt.datetime.fromisoformat(x) for x in stamps[job])
        queue_ms.append((started - created).total_seconds() * 1e3)
        run_ms.append((finished - started).total_seconds() * 1e3)
    seconds = [r["seconds"] for r in results if r.get("status") == "complete"]
    failed = [r for r in results if r.get("status") != "complete"]
    ident_s = [r["seconds"] for r in results[:half] if r.get("status") == "complete"]
    shared_s = [r["seconds"] for r in results[half:] if r.get("status") == "complete"]
    # the cold job (most cache misses) sizes a worker: events per part over its part seconds
    cold = max(computed, key=lambda m: m["cache"]["misses"]) if computed else None
    if cold is not None and cold["timing"].get("parts_s"):
        t_part = float(np.mean(cold["timing"]["parts_s"]))
        events_part = cold["events_read"] / len(cold["parts"])
        worker_rate = events_part / t_part
        out_per_event = sum(p["bytes"] for p in cold["parts"]) / cold["events_read"]
    else:
        t_part = events_part = worker_rate = out_per_event = float("nan")
    # column-cache bytes written per event a computing job read (all computed jobs)
    read_events = sum(m["events_read"] for m in computed)
    cache_per_event = cache_stats.get("bytes", 0) / read_events if read_events else float("nan")

    figures: dict[str, Any] = {
        "events": args.events,
        "chunk_size": chunk,
        "clients": args.clients,
        "workers": args.workers,
        "ready_s": ready_s,
        "completed": len(seconds),
        "failed": len(failed),
        "wrong_results": len(wrong),
        "time_to_result_p50_s": pct(seconds, 50),
        "time_to_result_p95_s": pct(seconds, 95),
        "identical_p95_s": pct(ident_s, 95),
        "shared_p95_s": pct(shared_s, 95),
        "load_wall_s": load_s,
        "requests_per_s": len(seconds) / load_s if load_s > 0 else float("nan"),
        "cache_hit_ratio": overview["cache"]["hit_ratio"],
        "identical_jobs": len(identical_jobs),
        "identical_computed": computed_identical,
        "jobs_computed": len(computed),
        "cached_n": len(cached),
        "cached_p50_ms": pct(cached, 50) * 1e3,
        "cached_p95_ms": pct(cached, 95) * 1e3,
        "cached_post_p50_ms": pct(post_s, 50) * 1e3,
        "cached_answered_at_submit": answered_at_submit,
        "cached_queue_p50_ms": pct(queue_ms, 50),
        "cached_run_p50_ms": pct(run_ms, 50),
        "cached_run_p95_ms": pct(run_ms, 95),
        "cpu_load_s": cpu_load,
        "cpu_total_s": cpu_total,
        "peak_rss_mb": sampler.peak / 1e6,
        "cold_part_s": t_part,
        "cold_events_per_part": events_part,
        "worker_events_per_s": worker_rate,
        "output_bytes_per_event": out_per_event,
        "cache_bytes_per_event": cache_per_event,
        "cache_bytes": cache_stats.get("bytes"),
    }
    figures["sizing"] = sizing(figures)
    print_report(figures, failed, wrong)
    if args.json:
        write_json(args.json, figures)
    return 0 if not failed and not wrong else 1


def sizing(f: dict[str, Any]) -> dict[str, float]:
    """A facility of 100 workers and 300 users, from the measured figures.

    The cold job's part tasks give a worker's rate (events/s); facility tasks are
    chunks of the default ``chunk_size`` (500k events), requests of
    :data:`REQUEST_EVENTS` events. Every worker busy with part tasks; a job
    spreads over ``min(parts, workers)`` workers, so ``workers / min(parts,
    workers)`` jobs run at once; each writes its progress after each part (at
    most every 0.2 s) and heartbeats at least every 2 s; a request costs three
    more writes (submit, claim, finish). Cache and output bytes scale with the
    events the workers read.
    """
    submit_rate = FACILITY_USERS / USER_PERIOD_S
    rate = f["worker_events_per_s"]
    t_task = PROD_CHUNK / rate
    parts = math.ceil(REQUEST_EVENTS / PROD_CHUNK)
    tasks_per_s = FACILITY_WORKERS / t_task
    running_jobs = FACILITY_WORKERS / min(parts, FACILITY_WORKERS)
    per_job = min(5.0, min(parts, FACILITY_WORKERS) / t_task) + 0.5
    events_per_s = FACILITY_WORKERS * rate
    return {
        "submit_rate": submit_rate,
        "worker_events_per_s": rate,
        "t_task_s": t_task,
        "parts_per_request": parts,
        "scheduler_tasks_per_s": tasks_per_s,
        "running_jobs": running_jobs,
        "db_writes_per_s": submit_rate * 3.0 + running_jobs * per_job,
        "cache_write_bytes_per_s": events_per_s * f["cache_bytes_per_event"],
        "output_bytes_per_s": events_per_s * f["output_bytes_per_event"],
        "request_s": parts / min(parts, FACILITY_WORKERS) * t_task,
        "service_cpu_per_request_s": f["cpu_load_s"] / max(f["completed"], 1),
    }


def print_report(f: dict[str, Any], failed: list[dict[str, Any]], wrong: list[Any]) -> None:
    s = f["sizing"]
    print(
        f"columnhub serve --scheduler local --workers {f['workers']}: {f['events']:,} events, "
        f"chunk {f['chunk_size']:,}, {f['clients']} concurrent clients "
        f"(half identical, half sharing columns); service ready in {f['ready_s']:.1f} s"
    )
    rows = [
        ("completed / failed", f"{f['completed']} / {f['failed']}"),
        ("results checked against uproot (wrong)", f"{f['wrong_results']}"),
        (
            "time to result p50 / p95 (s)",
            f"{f['time_to_result_p50_s']:.2f} / {f['time_to_result_p95_s']:.2f}",
        ),
        (
            "  identical half p95 / sharing half p95 (s)",
            f"{f['identical_p95_s']:.2f} / {f['shared_p95_s']:.2f}",
        ),
        ("requests/s (load phase)", f"{f['requests_per_s']:.2f}"),
        ("column cache hit ratio", f"{100 * (f['cache_hit_ratio'] or 0):.1f} %"),
        (
            "identical requests: jobs / jobs that computed",
            f"{f['identical_jobs']} / {f['identical_computed']}",
        ),
        ("jobs that computed (all)", f"{f['jobs_computed']}"),
        (
            "fully cached request p50 / p95 (ms)",
            f"{f['cached_p50_ms']:.1f} / {f['cached_p95_ms']:.1f}",
        ),
        (
            "  answered in the POST reply (the completed job shared)",
            f"{f['cached_answered_at_submit']} of {f['cached_n']}",
        ),
        (
            "  POST p50; the others: queued p50 / job run p50, p95 (ms)",
            (
                f"{f['cached_post_p50_ms']:.1f}; {f['cached_queue_p50_ms']:.1f}"
                f" / {f['cached_run_p50_ms']:.1f}, {f['cached_run_p95_ms']:.1f}"
            ),
        ),
        (
            "service CPU s (load / total), whole process tree",
            f"{f['cpu_load_s']:.1f} / {f['cpu_total_s']:.1f}",
        ),
        ("service peak RSS (MB), with the LocalCluster", f"{f['peak_rss_mb']:.0f}"),
        (
            "cold job: events per part / part seconds / events/s per worker",
            (
                f"{f['cold_events_per_part']:,.0f} / {f['cold_part_s']:.3f}"
                f" / {f['worker_events_per_s']:,.0f}"
            ),
        ),
        (
            "bytes per event read: output / column cache",
            f"{f['output_bytes_per_event']:.1f} / {f['cache_bytes_per_event']:.1f}",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print()
    print(
        f"Sizing for {FACILITY_WORKERS} workers and {FACILITY_USERS} users (each user submitting"
        f" a request every {USER_PERIOD_S:.0f} s at peak: {s['submit_rate']:.1f} requests/s):"
    )
    print(
        f"- tasks: one worker reads {s['worker_events_per_s']:,.0f} events/s here (cold), so a"
        f" part task of the default 500k-event chunk takes {s['t_task_s']:.1f} s; a"
        f" {REQUEST_EVENTS / 1e6:.0f}M-event request is {s['parts_per_request']} tasks,"
        f" {s['request_s']:.1f} s on {FACILITY_WORKERS} workers when alone"
    )
    print(
        f"- scheduler: {FACILITY_WORKERS} busy workers = {s['scheduler_tasks_per_s']:,.1f}"
        " tasks/s (Dask's scheduler handles ~1000 tasks/s: far from its limit)"
    )
    print(
        f"- database: {s['db_writes_per_s']:,.0f} writes/s ({s['submit_rate']:.0f} requests/s"
        f" x 3 + {s['running_jobs']:.1f} running jobs writing progress after each part and"
        " a heartbeat every 2 s); one PostgreSQL (or even SQLite) copes; PostgreSQL for"
        " several API replicas"
    )
    print(
        f"- column cache: {s['cache_write_bytes_per_s'] / 1e6:,.1f} MB/s written with every"
        f" worker computing ({f['cache_bytes_per_event']:.1f} bytes per event read here);"
        " a cached request reads its columns back at the same rate per worker"
    )
    print(f"- outputs: {s['output_bytes_per_s'] / 1e6:,.1f} MB/s to the shared filesystem")
    print(
        f"- service CPU: {s['service_cpu_per_request_s']:.2f} CPU s per request"
        " (API + runner + LocalCluster here; with a facility scheduler the API replica"
        " only submits and polls)"
    )
    if failed:
        print(f"FAILED requests: {json.dumps(failed[:5], default=str)}")
    if wrong:
        print(f"WRONG results: {wrong[:5]}")


if __name__ == "__main__":
    sys.exit(main())
