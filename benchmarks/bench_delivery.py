"""Delivery throughput: columnhub vs the uproot ceiling vs func_adl_uproot (ServiceX's engine).

One process, one worker, the same synthetic NanoAOD file for every peer:
7 branches (keys, MET_pt, Jet_pt, Jet_eta, Muon_pt) with the selection
``(nJet >= 4) & (MET_pt > 30)``.

    python benchmarks/bench_delivery.py --events 2000000

- uproot: ``TTree.arrays(branches, cut=...)``, arrays in memory (the ceiling:
  columnhub reads through uproot and also writes Parquet).
- func_adl_uproot: the equivalent func_adl query (``Where`` + ``Select``),
  the engine of ServiceX's uproot transformer, ``.value()`` in memory.
- columnhub arrays: ``columnhub.arrays(..., workers=1)``, the selected rows in
  memory like the two peers (the like-for-like comparison).
- columnhub deliver: ``columnhub.deliver(..., workers=1)`` writing Parquet parts
  (zstd) and the manifest; strictly more work than the peers do.

Both columnhub rows run cold (no column cache).

Best of ``--repeat`` runs, after one untimed warm-up each (so every peer
reads from the page cache). Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uproot

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BRANCHES = ["run", "luminosityBlock", "event", "MET_pt", "Jet_pt", "Jet_eta", "Muon_pt"]
CUT = "(nJet >= 4) & (MET_pt > 30)"


def ensure_input(events: int, directory: Path) -> Path:
    path = directory / f"synth-{events}.root"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "columnhub.cli.main", "synth",
             "--like", str(SHARED / "nano_tt_v12.root"), "--events", str(events),
             "-o", str(path), "--seed", "1"],
            check=True,
        )
    return path


def best(fn, repeat: int) -> tuple[float, object]:
    fn()  # warm-up: page cache, imports
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def run_uproot(path: Path) -> int:
    arrays = uproot.open(path)["Events"].arrays(BRANCHES, cut=CUT)
    return len(arrays)


def run_func_adl(path: Path) -> int:
    from func_adl_uproot import UprootDataset

    fields = ", ".join(f"'{b}': e.{b}" for b in BRANCHES)
    query = (
        UprootDataset(str(path), "Events")
        .Where("lambda e: e.nJet >= 4 and e.MET_pt > 30")
        .Select(f"lambda e: {{{fields}}}")
    )
    return len(query.value())


def run_columnhub_arrays(path: Path) -> int:
    import columnhub

    request = {
        "dataset": {"name": "bench", "files": [str(path)]},
        "columns": BRANCHES,
        "where": CUT,
        "output": {"include_keys": False},
    }
    return len(columnhub.arrays(request, workers=1, cache=False))


def run_columnhub(path: Path, scratch: Path) -> int:
    import columnhub

    out = scratch / "columnhub-out"
    shutil.rmtree(out, ignore_errors=True)
    request = {
        "dataset": {"name": "bench", "files": [str(path)]},
        "columns": BRANCHES,
        "where": CUT,
        "output": {"include_keys": False},
    }
    result = columnhub.deliver(request, output=out, workers=1, progress=False, cache=False)
    return result.events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    path = ensure_input(args.events, args.data)
    n = uproot.open(path)["Events"].num_entries
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        rows = {}
        t_up, k_up = best(lambda: run_uproot(path), args.repeat)
        rows["uproot arrays(cut=) [ceiling]"] = (t_up, k_up)
        t_mem, k_mem = best(lambda: run_columnhub_arrays(path), args.repeat)
        rows["columnhub arrays (1 worker, in memory)"] = (t_mem, k_mem)
        t_ch, k_ch = best(lambda: run_columnhub(path, scratch), args.repeat)
        rows["columnhub deliver (1 worker, Parquet out)"] = (t_ch, k_ch)
        t_fa, k_fa = best(lambda: run_func_adl(path), args.repeat)
        rows["func_adl_uproot (ServiceX engine)"] = (t_fa, k_fa)
    assert k_up == k_ch == k_fa == k_mem, f"peers disagree: {k_up}, {k_ch}, {k_fa}, {k_mem}"
    print(f"input: {path} ({n:,} events), selected {k_up:,}; best of {args.repeat}")
    print(f"{'engine':48s} {'seconds':>8s} {'events/s':>12s}")
    for name, (t, _) in rows.items():
        print(f"{name:48s} {t:8.3f} {n / t:12,.0f}")
    figures = {
        "events": n,
        "selected": k_up,
        "seconds": {k: round(t, 4) for k, (t, _) in rows.items()},
        "columnhub_arrays_vs_uproot": round(t_up / t_mem, 3),
        "columnhub_arrays_vs_func_adl": round(t_fa / t_mem, 3),
        "columnhub_vs_uproot": round(t_up / t_ch, 3),
        "columnhub_vs_func_adl": round(t_fa / t_ch, 3),
    }
    f = figures
    print(f"columnhub arrays  / uproot ceiling  = {f['columnhub_arrays_vs_uproot']:.2f}x (target >= 0.9)")
    print(f"columnhub arrays  / func_adl_uproot = {f['columnhub_arrays_vs_func_adl']:.2f}x (target >= 2)")
    print(f"columnhub deliver / uproot ceiling  = {f['columnhub_vs_uproot']:.2f}x (target >= 0.9)")
    print(f"columnhub deliver / func_adl_uproot = {f['columnhub_vs_func_adl']:.2f}x (target >= 2)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
