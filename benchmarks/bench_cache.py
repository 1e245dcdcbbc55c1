"""Repeat: a repeated request vs the cold one, whole processes; column cache kernels.

**Headline (``--parts process``): the user's job.** ``columnhub deliver
SPEC -o DIR`` of request A (below) as a new process, each round with a fresh,
empty ``COLUMNHUB_CACHE`` directory: cold; then repeated as a new process
into the same output directory and into a new one (the whole result is
reused: a cache hit). Target: repeat >= 10x faster than cold. The repeats'
parts are checked byte-identical to the cold run's. For reference, the
start-up of ``python -c pass`` and ``columnhub --help``.

**Secondary (``--parts kernel``): kernel, warm process.** On a synthetic NanoAOD file (``--events``, default 2M) with a fresh cache
directory:

(a) request A (MET_pt, Jet_pt, Jet_eta, Muon_pt and ``ht = sum(Jet_pt[Jet_pt > 30])``,
    with ``where (nJet >= 4) & (MET_pt > 30)``; the event keys are delivered
    too) is delivered cold, then repeated identically

    - into the same output directory (the result there is kept as it is),
    - into a new output directory (the stored parts are copied byte for byte),
    - and, after deleting every earlier result directory so the whole-result
      reuse cannot apply, into a third directory: the *column-level* warm
      path, where every column chunk (branches, ``ht``, the selection mask)
      is a cache hit and the Parquet parts are written again.

(b) request B shares 3 of its 5 columns with A (MET_pt, Jet_pt, Jet_eta;
    new: Jet_phi, Electron_pt) and the same selection. It is delivered once
    with A's cache (overlapping) and once with an empty cache (cold), and the
    manifests say which branches each chunk read from the input.

Bytes read from the input are counted two ways: ``input bytes`` sums the
compressed size of the baskets of every branch a chunk read (from the
manifest's per-chunk ``read`` list and the file's basket layout), and
``rchar`` is the ``/proc/self/io`` delta around the ``deliver`` call (every
byte this process read from any file: input, cache entries, metadata).
The input file is read once beforehand so every run finds it in the page cache,
and one untimed delivery pays the process's one-time costs. Every row is the
best of ``--repeat`` runs; each cold run starts from an empty cache, each
overlapping run from a copy of the cache as request A left it.

    python benchmarks/bench_cache.py                     # full size
    python benchmarks/bench_cache.py --quick             # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import uproot
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

import columnhub
from columnhub.cache import ColumnCache

__all__ = ["main"]

WHERE = "(nJet >= 4) & (MET_pt > 30)"
REQUEST_A = {
    "columns": ["MET_pt", "Jet_pt", "Jet_eta", "Muon_pt", "ht"],
    "define": {"ht": "sum(Jet_pt[Jet_pt > 30])"},
    "where": WHERE,
}
REQUEST_B = {
    "columns": ["MET_pt", "Jet_pt", "Jet_eta", "Jet_phi", "Electron_pt"],
    "where": WHERE,
}
TARGET_REPEAT = 20.0


def ensure_input(events: int, directory: Path) -> Path:
    """The synthetic input file (``columnhub synth``, seed 1), made once."""
    return synth_root(events, data=directory)


def bench_process(path: Path, *, repeat: int, page_cache: PageCache) -> dict[str, Any]:
    """Cold vs repeated ``columnhub deliver``, each a new process; best of ``repeat``."""
    runs: dict[str, list[Run]] = {k: [] for k in PROCESS_LABELS}
    identical = True
    with scratch_dir(path.parent) as tmp:
        scratch = Path(tmp)
        spec = write_json(scratch / "a.json", request(path, REQUEST_A))
        deliver = columnhub_cmd("deliver", str(spec), "--no-progress", "-o")
        for r in range(repeat):
            cache = fresh(scratch / f"cache-{r}")
            same, other = fresh(scratch / f"out-{r}"), fresh(scratch / f"other-{r}")
            cmds = {
                "python": [sys.executable, "-c", "pass"],
                "help": columnhub_cmd("--help"),
                "cold": [*deliver, str(same)],
                "same": [*deliver, str(same)],
                "new": [*deliver, str(other)],
            }
            parts: dict[str, dict[str, bytes]] = {}
            for name, cmd in cmds.items():
                page_cache.prepare([path])
                before = {p.name: p.read_bytes() for p in same.glob("*.parquet")}
                run = run_process(cmd, extra_env={"COLUMNHUB_CACHE": str(cache)})
                runs[name].append(run.check(PROCESS_LABELS[name]))
                if name == "cold":
                    parts["cold"] = {p.name: p.read_bytes() for p in same.glob("*.parquet")}
                elif name == "same":
                    parts["same"] = before | {p.name: p.read_bytes() for p in same.glob("*.parquet")}
                elif name == "new":
                    parts["new"] = {p.name: p.read_bytes() for p in other.glob("*.parquet")}
            identical &= bool(parts["cold"]) and parts["cold"] == parts["same"] == parts["new"]
            shutil.rmtree(same)
            shutil.rmtree(other)
    best_runs = {k: min(v, key=lambda x: x.wall) for k, v in runs.items()}
    cold = best_runs["cold"].wall
    figures: dict[str, Any] = {
        "events": uproot.open(path)["Events"].num_entries,
        "repeat": repeat,
        "page_cache": page_cache.mode,
        "memory": page_cache.memory,
        "seconds": {k: round(v.wall, 4) for k, v in best_runs.items()},
        "cpu_seconds": {k: round(v.cpu, 4) for k, v in best_runs.items()},
        "all_seconds": {k: [round(x.wall, 4) for x in v] for k, v in runs.items()},
        "repeat_same_dir": cold / best_runs["same"].wall,
        "repeat_new_dir": cold / best_runs["new"].wall,
        "parts_byte_identical": identical,
    }
    print(
        f"repeat, user's job: request A on {path.name} ({figures['events']:,} events); each a new"
        f" process, best of {repeat}"
    )
    print(f"{'process':64s} {'seconds':>8s} {'CPU s':>7s}")
    for k, label in PROCESS_LABELS.items():
        print(f"{label:64s} {best_runs[k].wall:8.3f} {best_runs[k].cpu:7.2f}")
    print(f"repeat vs cold, same output dir (process) = {figures['repeat_same_dir']:.1f}x")
    print(f"repeat vs cold, new output dir (process)  = {figures['repeat_new_dir']:.1f}x")
    print(f"check: repeats' parts byte-identical to the cold run's = {identical}")
    return figures


PROCESS_LABELS = {
    "python": "python -c pass (interpreter start-up, for reference)",
    "help": "columnhub --help",
    "cold": "columnhub deliver, cold (empty COLUMNHUB_CACHE)",
    "same": "columnhub deliver, repeated into the same output dir",
    "new": "columnhub deliver, repeated into a new output dir",
}


def rchar() -> int:
    """Bytes this process has read through read() calls so far (``/proc/self/io``)."""
    try:
        with open("/proc/self/io") as io:
            for line in io:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def warm_page_cache(path: Path) -> None:
    """Read the whole file once so every timed run finds it in memory."""
    with open(path, "rb") as f:
        while f.read(16 * 2**20):
            pass


class BasketBytes:
    """Compressed bytes of a branch's baskets overlapping an entry range."""

    def __init__(self, path: Path, tree: str = "Events") -> None:
        self.tree = uproot.open(path)[tree]
        self._layout: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, branch: str, start: int, stop: int) -> int:
        if branch not in self._layout:
            b = self.tree[branch]
            n = b.num_baskets
            edges = np.asarray(b.member("fBasketEntry")[: n + 1], dtype=np.int64)
            sizes = np.asarray(b.member("fBasketBytes")[:n], dtype=np.int64)
            if len(edges) == n:  # fBasketEntry without the final edge
                edges = np.append(edges, b.num_entries)
            self._layout[branch] = (edges, sizes)
        edges, sizes = self._layout[branch]
        overlap = (edges[:-1] < stop) & (edges[1:] > start)
        return int(sizes[overlap].sum())


def input_bytes(manifest: dict[str, Any], baskets: BasketBytes) -> tuple[int, list[str]]:
    """Compressed input bytes the manifest's chunks read, and the branches read."""
    total, read = 0, set()
    for chunk in manifest["chunks"]:
        for branch in chunk.get("read", []):
            read.add(branch)
            total += baskets(branch, chunk["entry_start"], chunk["entry_stop"])
    return total, sorted(read)


def timed(fn: Callable[[], columnhub.Result]) -> tuple[float, int, columnhub.Result]:
    """Seconds, rchar delta and the result of one delivery."""
    r0 = rchar()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    return seconds, rchar() - r0, result


def best(fn: Callable[[], columnhub.Result], repeat: int) -> tuple[float, int, columnhub.Result]:
    """The fastest of ``repeat`` runs (seconds, its rchar delta, its result)."""
    runs = [timed(fn) for _ in range(max(1, repeat))]
    return min(runs, key=lambda r: r[0])


def request(path: Path, body: dict[str, Any]) -> dict[str, Any]:
    return {"dataset": {"name": "bench", "files": [str(path)]}, **body}


def same_bytes(a: columnhub.Result, b: columnhub.Result) -> bool:
    if [f.name for f in a.files] != [f.name for f in b.files]:
        return False
    return all(x.read_bytes() == y.read_bytes() for x, y in zip(a.files, b.files, strict=True))


def row(
    name: str, seconds: float, rchar_bytes: int, result: columnhub.Result, baskets: BasketBytes
) -> dict[str, Any]:
    m = result.manifest
    reused = "reused_result" in m["cache"]
    # a reused result's manifest keeps the chunk records of the run that made it
    in_bytes, read = (0, []) if reused else input_bytes(m, baskets)
    return {
        "run": name,
        "seconds": round(seconds, 4),
        "cache_hits": m["cache"]["hits"],
        "cache_misses": m["cache"]["misses"],
        "whole_result_reused": reused,
        "branches_read": read,
        "input_bytes": in_bytes,
        "rchar_bytes": rchar_bytes,
        "events": m["events"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="chunk tasks at once in the kernel rows (default: deliver's)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="best of N for every row")
    parser.add_argument("--quick", action="store_true", help="200k events, one round")
    parser.add_argument(
        "--parts", nargs="+", choices=["process", "kernel"], default=["process", "kernel"]
    )
    add_page_cache_option(parser)
    parser.add_argument(
        "--scratch", type=Path, help="where the kernel rows' caches and outputs go"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.repeat = 200_000, 1
    path = ensure_input(args.events, args.data)
    figures: dict[str, Any] = {}
    if "process" in args.parts:
        page_cache = PageCache(args.page_cache, memory=args.memory)
        print(f"page cache: {page_cache.describe()}", *page_cache.notes, sep="\n")
        figures["process"] = bench_process(path, repeat=args.repeat, page_cache=page_cache)
        print()
    if "kernel" in args.parts:
        figures.update(bench_kernel(path, args))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


def bench_kernel(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Column cache in one warm process: repeats, column-level hits, overlap."""
    warm_page_cache(path)
    baskets = BasketBytes(path)
    n = baskets.tree.num_entries
    opts: dict[str, Any] = {"workers": args.workers, "progress": False}
    req_a, req_b = request(path, REQUEST_A), request(path, REQUEST_B)

    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        scratch = Path(tmp)
        names = iter(range(1_000_000))

        def deliver(
            req: dict[str, Any], store: ColumnCache, out: str | None = None
        ) -> columnhub.Result:
            out = out or f"out-{next(names)}"
            return columnhub.deliver(req, output=scratch / out, cache=store, **opts)

        def fresh(label: str, like: Path | None = None) -> ColumnCache:
            """A new cache directory, empty or a copy of ``like``."""
            where = scratch / f"cache-{label}-{next(names)}"
            if like is not None:
                shutil.copytree(like, where)
            return ColumnCache(where)

        def drop(*results: columnhub.Result) -> None:
            for r in results:
                shutil.rmtree(r.directory, ignore_errors=True)

        # untimed: the process's one-time costs (imports, first file open, thread pool)
        columnhub.deliver(req_a, output=scratch / "warm-up", cache=False, **opts)
        shutil.rmtree(scratch / "warm-up")
        rows = []

        # (a) cold (each run with an empty cache), then repeats on the last one's cache
        colds: list[tuple[ColumnCache, columnhub.Result]] = []

        def cold_a() -> columnhub.Result:
            store = fresh("a")
            colds.append((store, deliver(req_a, store)))
            return colds[-1][1]

        t, rc, _ = best(cold_a, args.repeat)
        rows.append(row("A cold (empty cache)", t, rc, colds[-1][1], baskets))
        cache, cold = colds[-1]
        for store, result in colds[:-1]:
            store.close()
            shutil.rmtree(store.location, ignore_errors=True)
            drop(result)
        cache.close()
        snapshot = scratch / "cache-after-a"
        shutil.copytree(cache.location, snapshot)  # A's columns only, for (b)
        cache = ColumnCache(cache.location)
        out_a = cold.directory.name
        t, rc, same = best(lambda: deliver(req_a, cache, out_a), args.repeat)
        rows.append(row("A repeat, same output dir", t, rc, same, baskets))
        others: list[columnhub.Result] = []

        def new_dir() -> columnhub.Result:
            others.append(deliver(req_a, cache))
            return others[-1]

        t, rc, other = best(new_dir, args.repeat)
        rows.append(row("A repeat, new output dir", t, rc, other, baskets))
        identical = same_bytes(cold, same) and all(same_bytes(cold, o) for o in others)
        cold_table = cold.to_arrow()
        drop(cold, *others)  # no stored result left: only column chunks
        last: list[columnhub.Result] = []

        def column_level() -> columnhub.Result:
            drop(*last)  # the previous run's result must not be found either
            last[:] = [deliver(req_a, cache)]
            return last[0]

        t, rc, _ = best(column_level, args.repeat)
        rows.append(row("A repeat, column-level (results deleted)", t, rc, last[0], baskets))
        latest = last[0]
        column_level_ok = (
            latest.manifest["cache"]["misses"] == 0
            and "reused_result" not in latest.manifest["cache"]
            and latest.to_arrow().equals(cold_table)
        )
        drop(latest)
        cache.close()

        # (b) overlap: 3 of 5 columns (and the keys, the selection mask) cached
        overlaps: list[columnhub.Result] = []
        copies = [fresh("overlap", like=snapshot) for _ in range(max(1, args.repeat))]

        def overlap_b() -> columnhub.Result:  # the copies are made before the timing
            drop(*overlaps)
            overlaps[:] = [deliver(req_b, copies.pop())]
            return overlaps[0]

        t, rc, _ = best(overlap_b, args.repeat)
        rows.append(row("B overlapping (3 of 5 cached)", t, rc, overlaps[0], baskets))
        b_colds: list[columnhub.Result] = []

        def cold_b() -> columnhub.Result:
            drop(*b_colds)
            b_colds[:] = [deliver(req_b, fresh("b"))]
            return b_colds[0]

        t, rc, _ = best(cold_b, args.repeat)
        rows.append(row("B cold (empty cache)", t, rc, b_colds[0], baskets))
        same_b = overlaps[0].to_arrow().equals(b_colds[0].to_arrow())

    by = {r["run"]: r for r in rows}
    cold_s = by["A cold (empty cache)"]["seconds"]
    figures: dict[str, Any] = {
        "events": n,
        "selected": cold.events,
        "workers": args.workers,
        "repeat": args.repeat,
        "runs": rows,
        "ratios": {
            "repeat_same_dir": round(cold_s / by["A repeat, same output dir"]["seconds"], 2),
            "repeat_new_dir": round(cold_s / by["A repeat, new output dir"]["seconds"], 2),
            "column_level": round(
                cold_s / by["A repeat, column-level (results deleted)"]["seconds"], 2
            ),
            "overlap_vs_cold_seconds": round(
                by["B cold (empty cache)"]["seconds"]
                / by["B overlapping (3 of 5 cached)"]["seconds"],
                2,
            ),
            "overlap_vs_cold_input_bytes": round(
                by["B overlapping (3 of 5 cached)"]["input_bytes"]
                / max(1, by["B cold (empty cache)"]["input_bytes"]),
                3,
            ),
        },
        "checks": {
            "repeat_parts_byte_identical": identical,
            "column_level_all_hits_same_table": column_level_ok,
            "overlap_equals_cold": same_b,
        },
        "target_repeat": TARGET_REPEAT,
    }
    print_table(path, figures)
    return figures


def print_table(path: Path, f: dict[str, Any]) -> None:
    print(
        f"kernel, warm process: {path.name} ({f['events']:,} events), selected {f['selected']:,}; "
        f"best of {f['repeat']} per row, workers={f['workers'] or 'default'}"
    )
    print(
        f"{'run':42s} {'seconds':>8s} {'hits':>6s} {'misses':>6s} {'input MB':>9s} "
        f"{'rchar MB':>9s}  branches read"
    )
    for r in f["runs"]:
        read = ", ".join(r["branches_read"]) or "-"
        if r["whole_result_reused"]:
            read = "- (whole result reused)"
        print(
            f"{r['run']:42s} {r['seconds']:8.3f} {r['cache_hits']:6d} {r['cache_misses']:6d} "
            f"{r['input_bytes'] / 1e6:9.1f} {r['rchar_bytes'] / 1e6:9.1f}  {read}"
        )
    q = f["ratios"]
    for label, key in (("same dir", "repeat_same_dir"), ("new dir ", "repeat_new_dir")):
        ok = "met" if q[key] >= f["target_repeat"] else "NOT met"
        print(
            f"repeat vs cold, {label}     = {q[key]:.1f}x (target >= {f['target_repeat']:g}: {ok})"
        )
    print(
        f"column-level warm vs cold    = {q['column_level']:.1f}x (every column chunk a hit, parts rewritten)"
    )
    print(
        f"overlapping B vs cold B      = {q['overlap_vs_cold_seconds']:.1f}x faster, "
        f"{q['overlap_vs_cold_input_bytes']:.1%} of the input bytes"
    )
    print("checks: " + ", ".join(f"{k}={v}" for k, v in f["checks"].items()))


if __name__ == "__main__":
    main()
