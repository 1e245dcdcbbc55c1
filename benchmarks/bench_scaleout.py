"""Scale-out: columnhub deliver on a Dask LocalCluster with 1 and 2 single-threaded workers.

A 4M-event delivery with a join: the synthetic NanoAOD primary
(``columnhub synth``, MET, jets, muons) LEFT JOIN a shuffled 4-file friend
holding ``MET_pt`` of the same events (prefix ``f_``), 5 columns + the
friend's, ``where (nJet >= 4) & (MET_pt > 30)``. Each run is a new process
with a fresh, empty ``COLUMNHUB_CACHE``:

    columnhub deliver SPEC -o DIR --scheduler local --workers N     (N = 1, 2)

Target: 2 workers >= 1.7x one. The interface comes with the Dask executor
(issue 11, item 2); when ``columnhub deliver --help`` has no ``--scheduler``
the Dask rows are reported as "not available" and the script still exits 0.

Measured either way, for the scaling model (``docs/benchmarks.md``):

- per-task figures: the same request on the local executor with one worker
  (``--workers 1``): tasks, seconds of work per task (the manifest's chunk
  ``seconds``), compressed input bytes per task (the requested branches'
  baskets, primary and friend) and output bytes per task;
- Dask's overhead per task: 2000 empty tasks through a ``LocalCluster`` of
  one single-threaded worker process (submit to result, in a warm process).

The model: a request of ``T`` tasks of ``t`` seconds each, reading ``b``
bytes each, on ``N`` workers, against a file system of aggregate bandwidth
``BW`` and a scheduler costing ``o`` seconds a task, takes about
``start + max(ceil(T / N) * t, T * b / BW, T * o)``; the script prints it
for this request and for a 100-worker facility.

    python benchmarks/bench_scaleout.py                 # full size (4M events)
    python benchmarks/bench_scaleout.py --quick         # 400k events
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from _common import (
    DATA,
    PageCache,
    Run,
    add_page_cache_option,
    columnhub_cmd,
    fresh,
    run_process,
    scratch_dir,
    synth_root,
    write_json,
)

__all__ = ["main"]

CUT = "(nJet >= 4) & (MET_pt > 30)"
COLUMNS = ["MET_pt", "Jet_pt", "Jet_eta", "Muon_pt", "f_MET_pt"]
BRANCHES = ["MET_*", "Jet_*", "Muon_*"]
#: aggregate storage bandwidths of the model's network file systems, bytes/s
#: ("1 GB/s": one NFS server on 10 GbE; "10 GB/s": a parallel file system)
BANDWIDTHS = {"1 GB/s": 1.0e9, "10 GB/s": 1.0e10}
FACILITY_WORKERS = 100
FACILITY_EVENTS = 100_000_000


def has_scheduler_flag() -> bool:
    """Whether ``columnhub deliver`` takes ``--scheduler`` (the Dask executor is merged)."""
    run = run_process(columnhub_cmd("deliver", "--help"))
    return run.returncode == 0 and "--scheduler" in run.stdout


def inputs(events: int, data: Path) -> tuple[Path, Path]:
    primary = synth_root(
        events, data=data, name=f"scaleout-{events}.root", extra=["--branches", *BRANCHES]
    )
    friend = synth_root(
        events,
        data=data,
        name=f"scaleout-{events}-friend",
        extra=["--branches", "MET_pt", "--files", "4", "--shuffle"],
        seed=7,
    )
    return primary, friend


def spec(primary: Path, friend: Path) -> dict[str, Any]:
    return {
        "dataset": {"name": "primary", "files": [str(primary)]},
        "columns": COLUMNS,
        "where": CUT,
        "friends": [
            {
                "name": "f",
                "dataset": {"name": "friend", "files": sorted(str(p) for p in friend.glob("*.root"))},
                "columns": ["MET_pt"],
                "prefix": "f_",
                "how": "left",
            }
        ],
    }


def input_bytes(primary: Path, friend: Path) -> int:
    """Compressed bytes of the branches the request reads (primary and friend)."""
    import uproot

    total = 0
    tree = uproot.open(primary)["Events"]
    for name in ["run", "luminosityBlock", "event", "MET_pt", "nJet", "Jet_pt", "Jet_eta", "nMuon", "Muon_pt"]:
        total += tree[name].compressed_bytes
    for f in sorted(friend.glob("*.root")):
        t = uproot.open(f)["Events"]
        for name in ["run", "luminosityBlock", "event", "MET_pt"]:
            total += t[name].compressed_bytes
    return int(total)


def dask_overhead(tasks: int = 2000) -> float:
    """Seconds per empty task through a LocalCluster of one single-threaded worker."""
    import logging

    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.gather(client.map(_noop, range(50), pure=False))  # warm-up
        t0 = time.perf_counter()
        client.gather(client.map(_noop, range(tasks), pure=False))
        return (time.perf_counter() - t0) / tasks


def _noop(i: int) -> int:
    return i


def manifest_tasks(out: Path) -> dict[str, Any]:
    """Tasks (chunks) of a delivery and their seconds, from its manifest."""
    m = json.loads((out / "manifest.json").read_text())
    seconds = [float(c.get("seconds", 0.0)) for c in m.get("chunks", [])]
    parts = m.get("files") or m.get("parts") or []
    out_bytes = sum(p.stat().st_size for p in out.glob("*.parquet"))
    return {
        "tasks": len(seconds),
        "task_seconds": seconds,
        "parts": len(parts) if isinstance(parts, list) else None,
        "output_bytes": out_bytes,
        "events": m.get("events"),
    }


def bench(events: int, *, data: Path, repeat: int, page_cache: PageCache) -> dict[str, Any]:
    primary, friend = inputs(events, data)
    available = has_scheduler_flag()
    runs: dict[str, list[Run]] = {"local1": []}
    if available:
        runs |= {"dask1": [], "dask2": [], "local2": []}
    tasks: dict[str, Any] = {}
    with scratch_dir(data) as tmp:
        scratch = Path(tmp)
        spec_file = write_json(scratch / "spec.json", spec(primary, friend))
        base = columnhub_cmd("deliver", str(spec_file), "--no-progress", "-o")
        cmds = {
            "local1": ["--workers", "1"],
            "local2": ["--workers", "2"],
            "dask1": ["--scheduler", "local", "--workers", "1"],
            "dask2": ["--scheduler", "local", "--workers", "2"],
        }
        rows: dict[str, int] = {}
        for r in range(repeat):
            for name in runs:
                out = fresh(scratch / f"out-{name}")
                cache = fresh(scratch / "cache")
                page_cache.prepare([primary, friend])
                run = run_process([*base, str(out), *cmds[name]], extra_env={"COLUMNHUB_CACHE": str(cache)})
                runs[name].append(run.check(f"columnhub deliver {' '.join(cmds[name])}"))
                info = manifest_tasks(out)
                rows[name] = info["events"]
                if name == "local1" and (not tasks or run.wall <= min(x.wall for x in runs[name])):
                    tasks = info
                shutil.rmtree(out)
        if len(set(rows.values())) != 1:
            msg = f"the executors delivered different numbers of events: {rows}"
            raise SystemExit(msg)
    best = {k: min(v, key=lambda x: x.wall) for k, v in runs.items()}
    overhead = dask_overhead()
    nbytes = input_bytes(primary, friend)
    t_task = sum(tasks["task_seconds"]) / max(1, tasks["tasks"])
    figures: dict[str, Any] = {
        "events": events,
        "selected": next(iter(rows.values())),
        "repeat": repeat,
        "page_cache": page_cache.mode,
        "available": available,
        "seconds": {k: round(v.wall, 4) for k, v in best.items()},
        "cpu_seconds": {k: round(v.cpu, 4) for k, v in best.items()},
        "per_task": {
            "tasks": tasks["tasks"],
            "events_per_task": events / max(1, tasks["tasks"]),
            "seconds": round(t_task, 4),
            "input_bytes": nbytes / max(1, tasks["tasks"]),
            "output_bytes": tasks["output_bytes"] / max(1, tasks["tasks"]),
            "dask_overhead_s": overhead,
            "start_s": round(best["local1"].wall - sum(tasks["task_seconds"]), 4),
        },
    }
    if available:
        figures["dask2_vs_dask1"] = best["dask1"].wall / best["dask2"].wall
    print_figures(figures)
    figures["model"] = model(figures)
    return figures


def model(f: dict[str, Any]) -> dict[str, Any]:
    """The scaling model at N workers, from the measured per-task figures."""
    p = f["per_task"]
    t, b, o = p["seconds"], p["input_bytes"] + p["output_bytes"], p["dask_overhead_s"]
    start = max(0.0, p["start_s"])
    epp = p["events_per_task"]
    out: dict[str, Any] = {}
    print(
        "\nscaling model: T(N) = start + max(ceil(tasks / N) * t_task, tasks * bytes_task / BW,"
        " tasks * o_sched)"
    )
    print(
        f"measured: t_task = {t:.3f} s for {epp:,.0f} events, bytes_task = {b / 1e6:.1f} MB"
        f" (in + out), o_sched = {o * 1e3:.2f} ms, start = {start:.2f} s"
    )
    print(
        f"{'request':34s} {'N':>4s} {'storage':>9s} {'tasks':>6s} {'compute':>8s} {'I/O':>7s}"
        f" {'sched':>7s} {'T(N) s':>8s} {'speed-up':>9s}  bound"
    )
    this = f["events"]
    cases = [
        (f"this request ({this:,} events)", this, n, "1 GB/s")
        for n in sorted({1, 2, math.ceil(this / epp)})
    ]
    cases += [
        (f"{FACILITY_EVENTS:,} events", FACILITY_EVENTS, n, bw)
        for n in (1, 2, FACILITY_WORKERS)
        for bw in ("1 GB/s", "10 GB/s")
    ]
    for label, events, workers, storage in cases:
        bw = BANDWIDTHS[storage]
        tasks = math.ceil(events / epp)
        one = start + max(tasks * t, tasks * b / bw, tasks * o)
        terms = {
            "compute (waves of tasks)": math.ceil(tasks / workers) * t,
            "storage bandwidth": tasks * b / bw,
            "scheduler": tasks * o,
        }
        total = start + max(terms.values())
        bound = max(terms, key=terms.__getitem__)
        out[f"{events}_{workers}_{storage}"] = {
            "events": events,
            "workers": workers,
            "bandwidth": bw,
            "tasks": tasks,
            "compute_s": terms["compute (waves of tasks)"],
            "io_s": terms["storage bandwidth"],
            "sched_s": terms["scheduler"],
            "total_s": total,
            "speedup": one / total,
            "bound": bound,
        }
        print(
            f"{label:34s} {workers:4d} {storage:>9s} {tasks:6d} {terms['compute (waves of tasks)']:8.2f}"
            f" {terms['storage bandwidth']:7.2f} {terms['scheduler']:7.3f} {total:8.2f}"
            f" {one / total:8.1f}x  {bound}"
        )
    return out


def print_figures(f: dict[str, Any]) -> None:
    print(
        f"scale-out: {f['events']:,}-event primary LEFT JOIN a shuffled 4-file friend, {len(COLUMNS)}"
        f" columns, where {CUT}: {f['selected']:,} selected; each a new process, empty cache,"
        f" best of {f['repeat']}"
    )
    labels = {
        "local1": "columnhub deliver --workers 1 (local executor)",
        "local2": "columnhub deliver --workers 2 (local executor)",
        "dask1": "columnhub deliver --scheduler local --workers 1",
        "dask2": "columnhub deliver --scheduler local --workers 2",
    }
    print(f"{'command':52s} {'seconds':>8s} {'CPU s':>7s}")
    for k, label in labels.items():
        if k in f["seconds"]:
            print(f"{label:52s} {f['seconds'][k]:8.3f} {f['cpu_seconds'][k]:7.2f}")
        else:
            print(f"{label:52s} {'not available':>16s}")
    if f["available"]:
        print(f"Dask, 2 workers vs 1 = {f['dask2_vs_dask1']:.2f}x")
    else:
        print(
            "Dask, 2 workers vs 1 = not available (columnhub deliver has no --scheduler: the Dask"
            " executor is not merged)"
        )
    p = f["per_task"]
    print(
        f"per task (local executor, 1 worker): {p['tasks']} tasks of {p['events_per_task']:,.0f}"
        f" events, {p['seconds']:.3f} s of work, {p['input_bytes'] / 1e6:.1f} MB read,"
        f" {p['output_bytes'] / 1e6:.1f} MB written; Dask overhead {p['dask_overhead_s'] * 1e3:.2f}"
        " ms per task (2000 empty tasks, LocalCluster, 1 worker)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=4_000_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="400k events, one round")
    parser.add_argument("--data", type=Path, default=DATA)
    add_page_cache_option(parser)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.repeat = 400_000, 1
    page_cache = PageCache(args.page_cache)
    print(f"page cache: {page_cache.describe()}", *page_cache.notes, sep="\n")
    figures = bench(args.events, data=args.data, repeat=args.repeat, page_cache=page_cache)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
