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

Both columnhub rows run cold (no column cache). CPU seconds are printed per
engine, with the CPU of columnhub's Parquet writer alone on the delivered
table, and the floor they set: a delivery must read and select (at least
the uproot row's CPU) and encode, so on N cores it cannot take less than
their CPU seconds over N.

Best of ``--repeat`` runs, after one untimed warm-up each (so every peer
reads from the page cache). Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
            [
                sys.executable,
                "-m",
                "columnhub.cli.main",
                "synth",
                "--like",
                str(SHARED / "nano_tt_v12.root"),
                "--events",
                str(events),
                "-o",
                str(path),
                "--seed",
                "1",
            ],
            check=True,
        )
    return path


#: CPU seconds (user + system, every thread of this process) of the best run, by engine
CPU: dict[str, float] = {}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def best(fn, repeat: int, *, name: str | None = None) -> tuple[float, object]:
    fn()  # warm-up: page cache, imports
    runs, out = [], None
    for _ in range(repeat):
        c0, t0 = _cpu(), time.perf_counter()
        out = fn()
        runs.append((time.perf_counter() - t0, _cpu() - c0))
    wall, cpu = min(runs)
    if name is not None:
        CPU[name] = cpu
    return wall, out


def encode_alone(parts: Path, scratch: Path, repeat: int) -> tuple[float, float]:
    """Wall and CPU seconds of columnhub's Parquet writer on the delivered table alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from columnhub.output.parquet import PartWriter

    table = pa.concat_tables(pq.read_table(p) for p in sorted(parts.glob("part-*.parquet")))
    batches = table.to_batches(max_chunksize=500_000)

    def write() -> None:
        out = scratch / "encode-alone"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        writer = PartWriter(out, target_bytes=256 * 1024**2)
        for b in batches:
            writer.write(pa.Table.from_batches([b]))
        writer.close()

    wall, _ = best(write, repeat, name="encode")
    return wall, CPU["encode"]


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


def _first_request() -> None:
    """Forget open trees and file descriptions: open the file in the timing, as the peers do."""
    from columnhub.sources.root import forget_files

    forget_files()


def run_columnhub_arrays(path: Path) -> int:
    import columnhub

    _first_request()
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
    _first_request()
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
        names = {
            "up": "uproot arrays(cut=) [ceiling]",
            "mem": "columnhub arrays (1 worker, in memory)",
            "ch": "columnhub deliver (1 worker, Parquet out)",
            "fa": "func_adl_uproot (ServiceX engine)",
        }
        t_up, k_up = best(lambda: run_uproot(path), args.repeat, name=names["up"])
        rows[names["up"]] = (t_up, k_up)
        t_mem, k_mem = best(lambda: run_columnhub_arrays(path), args.repeat, name=names["mem"])
        rows[names["mem"]] = (t_mem, k_mem)
        t_ch, k_ch = best(lambda: run_columnhub(path, scratch), args.repeat, name=names["ch"])
        rows[names["ch"]] = (t_ch, k_ch)
        t_enc, cpu_enc = encode_alone(scratch / "columnhub-out", scratch, args.repeat)
        t_fa, k_fa = best(lambda: run_func_adl(path), args.repeat, name=names["fa"])
        rows[names["fa"]] = (t_fa, k_fa)
    assert k_up == k_ch == k_fa == k_mem, f"peers disagree: {k_up}, {k_ch}, {k_fa}, {k_mem}"
    print(f"input: {path} ({n:,} events), selected {k_up:,}; best of {args.repeat}")
    print(f"{'engine':48s} {'seconds':>8s} {'events/s':>12s} {'CPU s':>7s}")
    for name, (t, _) in rows.items():
        print(f"{name:48s} {t:8.3f} {n / t:12,.0f} {CPU[name]:7.3f}")
    print(
        f"{'  of which: Parquet writing alone (same table)':48s} {t_enc:8.3f} {'':12s} {cpu_enc:7.3f}"
    )
    cores = len(os.sched_getaffinity(0))
    # Any delivery through uproot and pyarrow must read and select (at least the
    # ceiling's CPU) and encode; on `cores` cores it cannot take less than those
    # CPU seconds spread over every core.
    floor = (CPU[names["up"]] + cpu_enc) / cores
    print(
        f"CPU floor of any uproot+pyarrow delivery on {cores} cores: ({CPU[names['up']]:.3f} "
        f"uproot read+cut + {cpu_enc:.3f} Parquet encode) / {cores} = {floor:.3f} s, "
        f"i.e. at best {t_up / floor:.2f}x the uproot ceiling"
    )
    print(
        f"columnhub deliver used {CPU[names['ch']]:.3f} CPU s: on {cores} cores at best "
        f"{t_up / (CPU[names['ch']] / cores):.2f}x the uproot ceiling"
    )
    figures = {
        "events": n,
        "selected": k_up,
        "seconds": {k: round(t, 4) for k, (t, _) in rows.items()},
        "columnhub_arrays_vs_uproot": round(t_up / t_mem, 3),
        "columnhub_arrays_vs_func_adl": round(t_fa / t_mem, 3),
        "columnhub_vs_uproot": round(t_up / t_ch, 3),
        "columnhub_vs_func_adl": round(t_fa / t_ch, 3),
        "cpu_seconds": {k: round(v, 4) for k, v in CPU.items()},
        "parquet_encode_alone_seconds": round(t_enc, 4),
        "deliver_cpu_floor_seconds": round(floor, 4),
        "deliver_best_possible_vs_uproot": round(t_up / floor, 3),
    }
    f = figures
    print(
        f"columnhub arrays  / uproot ceiling  = {f['columnhub_arrays_vs_uproot']:.2f}x (target >= 0.9)"
    )
    print(
        f"columnhub arrays  / func_adl_uproot = {f['columnhub_arrays_vs_func_adl']:.2f}x (target >= 2)"
    )
    print(f"columnhub deliver / uproot ceiling  = {f['columnhub_vs_uproot']:.2f}x (target >= 0.9)")
    print(f"columnhub deliver / func_adl_uproot = {f['columnhub_vs_func_adl']:.2f}x (target >= 2)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
