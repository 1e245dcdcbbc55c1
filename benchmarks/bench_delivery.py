"""Delivery: columnhub deliver vs the physicist's script vs ServiceX's engine, whole processes.

The same synthetic NanoAOD file for every side (``columnhub synth``, 2M
events, default branch set), 7 branches (keys, MET_pt, Jet_pt, Jet_eta,
Muon_pt) with the selection ``(nJet >= 4) & (MET_pt > 30)``, Parquet out
(zstd).

**Headline (``--parts process``): the user's job**, each a new process
(start-up and imports timed), runs taking turns, best of ``--repeat``:

- ``columnhub deliver SPEC -o DIR`` (the CLI), a fresh empty
  ``COLUMNHUB_CACHE`` each run;
- the script a physicist writes: ``uproot.open(f)["Events"].arrays(branches,
  cut=...)`` then ``ak.to_parquet(arrays, out, compression="zstd")``;
- ServiceX's engine: the equivalent ``func_adl_uproot`` query (``Where`` +
  ``Select``, ``.value()``) and the same ``ak.to_parquet``;
- the CPU floor: one process that reads (uproot, with the cut) and encodes
  (pyarrow, zstd) the same table and reports the CPU seconds of each; floor =
  start-up (a process importing uproot, awkward and pyarrow) + (read CPU +
  encode CPU) / cores. Target: columnhub within 15 % of it.
- what the cores give here: two copies of that floor process started
  together, against one alone (``speed-up = 2 x alone / together``; 2 on
  perfect cores). The floor this machine can reach divides the read and
  encode CPU by that speed-up instead of the cores (an extra row, not the
  target).

Every output is checked (first round) against a direct uproot read in this
process: the same rows and, branch by branch, the same values.

**Secondary (``--parts kernel``): kernel, warm process.** In one process
after an untimed warm-up: ``uproot arrays(cut=)``, ``columnhub.arrays``,
``columnhub.deliver`` and ``func_adl_uproot`` with arrays in memory (no
Parquet), and columnhub's Parquet writer alone on the delivered table.

    python benchmarks/bench_delivery.py                  # full size
    python benchmarks/bench_delivery.py --quick          # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import awkward as ak
import uproot
from _common import (
    DATA,
    PageCache,
    Run,
    add_page_cache_option,
    columnhub_cmd,
    cores,
    fresh,
    python_script,
    run_process,
    run_together,
    scratch_dir,
    synth_root,
    write_json,
)

__all__ = ["main"]

BRANCHES = ["run", "luminosityBlock", "event", "MET_pt", "Jet_pt", "Jet_eta", "Muon_pt"]
CUT = "(nJet >= 4) & (MET_pt > 30)"


def ensure_input(events: int, directory: Path) -> Path:
    """The synthetic input file (``columnhub synth``, seed 1), made once."""
    return synth_root(events, data=directory)


# ---------------------------------------------------------------------------
# the user's job: whole processes

_SCRIPT = """
import sys, uproot, awkward as ak
path, out, branches, cut = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
arrays = uproot.open(path)["Events"].arrays(branches, cut=cut)
ak.to_parquet(arrays, out, compression="zstd")
"""

_FUNC_ADL = """
import sys, awkward as ak
from func_adl_uproot import UprootDataset
path, out, branches = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
fields = ", ".join(f"'{b}': e.{b}" for b in branches)
query = (
    UprootDataset(path, "Events")
    .Where("lambda e: e.nJet >= 4 and e.MET_pt > 30")
    .Select(f"lambda e: {{{fields}}}")
)
ak.to_parquet(query.value(), out, compression="zstd")
"""

_FLOOR = """
import json, sys, time
import uproot, awkward as ak, pyarrow.parquet as pq
path, out, branches, cut = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
c0 = time.process_time()
arrays = uproot.open(path)["Events"].arrays(branches, cut=cut)
c1 = time.process_time()
pq.write_table(ak.to_arrow_table(arrays, extensionarray=False), out, compression="zstd")
c2 = time.process_time()
print(json.dumps({"read_cpu": c1 - c0, "encode_cpu": c2 - c1}))
"""

_IMPORTS = "import uproot, awkward, pyarrow.parquet"

PROCESS_LABELS = {
    "columnhub": "columnhub deliver (CLI)",
    "columnhub_no_cache": "  the same, --no-cache (fills no column cache)",
    "script": "physicist's script: uproot arrays(cut=) + ak.to_parquet",
    "func_adl": "ServiceX engine: func_adl_uproot + ak.to_parquet",
}


def read_any(out: Path) -> ak.Array:
    """An output file, or the parts of a columnhub output directory, as one array."""
    import awkward as ak
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(out.glob("part-*.parquet")) if out.is_dir() else [out]
    return ak.from_arrow(pa.concat_tables(pq.read_table(f) for f in files))


def check_delivered(label: str, out: Path, reference: ak.Array) -> None:
    """The delivered rows and values against a direct uproot read, branch by branch."""
    import awkward as ak
    import numpy as np

    got = read_any(out)
    if len(got) != len(reference):
        msg = f"{label}: {len(got)} rows delivered, the direct uproot read selects {len(reference)}"
        raise SystemExit(msg)
    for b in BRANCHES:
        mine, want = got[b], reference[b]
        if want.ndim > 1 and not np.array_equal(
            np.asarray(ak.num(mine)), np.asarray(ak.num(want))
        ):
            msg = f"{label}: the list lengths of {b} differ from the direct uproot read"
            raise SystemExit(msg)
        flat_mine = np.asarray(ak.flatten(mine, axis=None))
        flat_want = np.asarray(ak.flatten(want, axis=None))
        if not np.array_equal(flat_mine, flat_want):
            msg = f"{label}: the values of {b} differ from the direct uproot read"
            raise SystemExit(msg)


def bench_process(path: Path, *, repeat: int, page_cache: PageCache) -> dict[str, Any]:
    """Each side as a new process, Parquet out, runs taking turns; best of ``repeat``."""
    import json as _json

    reference = uproot.open(path)["Events"].arrays(BRANCHES, cut=CUT)
    spec = {
        "dataset": {"name": "bench", "files": [str(path)]},
        "columns": BRANCHES,
        "where": CUT,
        "output": {"include_keys": False},
    }
    args = [str(path), "{out}", ",".join(BRANCHES), CUT]
    runs: dict[str, list[Run]] = {k: [] for k in [*PROCESS_LABELS, "floor", "imports"]}
    sizes: dict[str, int] = {}
    floor_cpu: list[dict[str, float]] = []
    with scratch_dir(path.parent) as tmp:
        scratch = Path(tmp)
        spec_file = write_json(scratch / "spec.json", spec)
        for r in range(repeat):
            cache = scratch / f"cache-{r}"
            cmds = {
                "columnhub": columnhub_cmd("deliver", str(spec_file), "-o", "{out}", "--no-progress"),
                "columnhub_no_cache": columnhub_cmd(
                    "deliver", str(spec_file), "-o", "{out}", "--no-progress", "--no-cache"
                ),
                "script": python_script(_SCRIPT, *args),
                "func_adl": python_script(_FUNC_ADL, *args[:3]),
                "floor": python_script(_FLOOR, *args),
                "imports": python_script(_IMPORTS),
            }
            for name, cmd in cmds.items():
                out = scratch / f"out-{name}-{r}"
                if not name.startswith("columnhub"):
                    out = out.with_suffix(".parquet")
                cmd = [str(out) if c == "{out}" else c for c in cmd]
                page_cache.prepare([path])
                fresh(cache)
                run = run_process(cmd, extra_env={"COLUMNHUB_CACHE": str(cache)}).check(name)
                runs[name].append(run)
                if name == "floor":
                    floor_cpu.append(_json.loads(run.stdout.strip().splitlines()[-1]))
                if out.exists():
                    files = list(out.glob("*.parquet")) if out.is_dir() else [out]
                    sizes[name] = sum(f.stat().st_size for f in files)
                    if r == 0 and name in PROCESS_LABELS:
                        check_delivered(PROCESS_LABELS[name], out, reference)
                    if out.is_dir():
                        shutil.rmtree(out)
                    else:
                        out.unlink()
        # what two cores give this work: the floor's process, two copies at once
        together = []
        for r in range(repeat):
            outs = [scratch / f"out-floor2-{r}-{k}.parquet" for k in (0, 1)]
            page_cache.prepare([path])
            cmds = [python_script(_FLOOR, str(path), str(out), *args[2:]) for out in outs]
            together.append(run_together(cmds, extra_envs=[{}, {}]))
            for out in outs:
                out.unlink(missing_ok=True)
    n = uproot.open(path)["Events"].num_entries
    best_runs = {k: min(v, key=lambda x: x.wall) for k, v in runs.items()}
    ncores = cores()
    read_cpu = min(f["read_cpu"] for f in floor_cpu)
    encode_cpu = min(f["encode_cpu"] for f in floor_cpu)
    startup = best_runs["imports"].wall
    floor = startup + (read_cpu + encode_cpu) / ncores
    ch = best_runs["columnhub"].wall
    speedup = 2 * best_runs["floor"].wall / min(together)
    machine_floor = startup + (read_cpu + encode_cpu) / speedup
    figures: dict[str, Any] = {
        "events": n,
        "selected": len(reference),
        "repeat": repeat,
        "cores": ncores,
        "page_cache": page_cache.mode,
        "memory": page_cache.memory,
        "seconds": {k: round(v.wall, 4) for k, v in best_runs.items()},
        "cpu_seconds": {k: round(v.cpu, 4) for k, v in best_runs.items()},
        "all_seconds": {k: [round(x.wall, 4) for x in v] for k, v in runs.items()},
        "output_bytes": sizes,
        "floor": {
            "startup_s": round(startup, 4),
            "read_cpu_s": round(read_cpu, 4),
            "encode_cpu_s": round(encode_cpu, 4),
            "seconds": round(floor, 4),
        },
        "two_floor_processes_s": round(min(together), 4),
        "speedup_two_processes": round(speedup, 3),
        "machine_floor_s": round(machine_floor, 4),
        "deliver_over_machine_floor": ch / machine_floor - 1,
        "deliver_no_cache_over_floor": best_runs["columnhub_no_cache"].wall / floor - 1,
        "deliver_vs_script": best_runs["script"].wall / ch,
        "deliver_vs_func_adl": best_runs["func_adl"].wall / ch,
        "deliver_over_floor": ch / floor - 1,
    }
    print(
        f"delivery, user's job: {path.name} ({n:,} events), 7 branches, where {CUT}: "
        f"{len(reference):,} selected; Parquet out (zstd); each a new process, best of {repeat}"
    )
    print(f"{'engine (whole process)':58s} {'seconds':>8s} {'CPU s':>7s} {'out MB':>7s}")
    for k, label in PROCESS_LABELS.items():
        print(
            f"{label:58s} {best_runs[k].wall:8.3f} {best_runs[k].cpu:7.2f} {sizes.get(k, 0) / 1e6:7.1f}"
        )
    print(
        f"{'CPU floor: start-up + (read + encode CPU) / cores':58s} {floor:8.3f}"
        f"   ({startup:.3f} s start-up + ({read_cpu:.3f} + {encode_cpu:.3f}) CPU s / {ncores})"
    )
    print(f"columnhub deliver vs script          = {figures['deliver_vs_script']:.2f}x")
    print(f"columnhub deliver vs func_adl_uproot = {figures['deliver_vs_func_adl']:.2f}x")
    print(
        f"{'floor this machine reaches: start-up + CPU / speed-up':58s} {machine_floor:8.3f}"
        f"   (two floor processes at once: {min(together):.3f} s vs one alone "
        f"{best_runs['floor'].wall:.3f} s, speed-up {speedup:.2f} of {ncores})"
    )
    print(f"columnhub deliver over the CPU floor = {figures['deliver_over_floor']:+.1%}")
    print(
        "columnhub deliver --no-cache over the CPU floor = "
        f"{figures['deliver_no_cache_over_floor']:+.1%}"
    )
    print(
        "columnhub deliver over the floor this machine reaches = "
        f"{figures['deliver_over_machine_floor']:+.1%}"
    )
    return figures


# ---------------------------------------------------------------------------
# kernel, warm process


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

    from columnhub.output.parquet import ParquetPart

    table = pa.concat_tables(pq.read_table(p) for p in sorted(parts.glob("part-*.parquet")))
    batches = table.to_batches(max_chunksize=500_000)

    def write() -> None:
        out = scratch / "encode-alone"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        writer = ParquetPart(out, 0, schema=table.schema)
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


def bench_kernel(path: Path, repeat: int) -> dict[str, Any]:
    """The in-process rows (kernel, warm process)."""
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
        t_up, k_up = best(lambda: run_uproot(path), repeat, name=names["up"])
        rows[names["up"]] = (t_up, k_up)
        t_mem, k_mem = best(lambda: run_columnhub_arrays(path), repeat, name=names["mem"])
        rows[names["mem"]] = (t_mem, k_mem)
        t_ch, k_ch = best(lambda: run_columnhub(path, scratch), repeat, name=names["ch"])
        rows[names["ch"]] = (t_ch, k_ch)
        t_enc, cpu_enc = encode_alone(scratch / "columnhub-out", scratch, repeat)
        t_fa, k_fa = best(lambda: run_func_adl(path), repeat, name=names["fa"])
        rows[names["fa"]] = (t_fa, k_fa)
    assert k_up == k_ch == k_fa == k_mem, f"peers disagree: {k_up}, {k_ch}, {k_fa}, {k_mem}"
    print(
        f"kernel, warm process: {path.name} ({n:,} events), selected {k_up:,}; in one process"
        f" after a warm-up, best of {repeat}"
    )
    print(f"{'engine':48s} {'seconds':>8s} {'events/s':>12s} {'CPU s':>7s}")
    for name, (t, _) in rows.items():
        print(f"{name:48s} {t:8.3f} {n / t:12,.0f} {CPU[name]:7.3f}")
    print(
        f"{'  of which: Parquet writing alone (same table)':48s} {t_enc:8.3f} {'':12s} {cpu_enc:7.3f}"
    )
    ncores = cores()
    # Any delivery through uproot and pyarrow must read and select (at least the
    # ceiling's CPU) and encode; on `cores` cores it cannot take less than those
    # CPU seconds spread over every core.
    floor = (CPU[names["up"]] + cpu_enc) / ncores
    print(
        f"CPU floor of any uproot+pyarrow delivery on {ncores} cores: ({CPU[names['up']]:.3f} "
        f"uproot read+cut + {cpu_enc:.3f} Parquet encode) / {ncores} = {floor:.3f} s, "
        f"i.e. at best {t_up / floor:.2f}x the uproot ceiling"
    )
    print(
        f"columnhub deliver used {CPU[names['ch']]:.3f} CPU s: on {ncores} cores at best "
        f"{t_up / (CPU[names['ch']] / ncores):.2f}x the uproot ceiling"
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
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200k events, one round")
    parser.add_argument(
        "--parts", nargs="+", choices=["process", "kernel"], default=["process", "kernel"]
    )
    add_page_cache_option(parser)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.repeat = 200_000, 1
    path = ensure_input(args.events, args.data)
    page_cache = PageCache(args.page_cache, memory=args.memory)
    figures: dict[str, Any] = {}
    if "process" in args.parts:
        print(f"page cache: {page_cache.describe()}", *page_cache.notes, sep="\n")
        figures["process"] = bench_process(path, repeat=args.repeat, page_cache=page_cache)
        for key in (
            "deliver_vs_script",
            "deliver_vs_func_adl",
            "deliver_over_floor",
            "deliver_no_cache_over_floor",
            "deliver_over_machine_floor",
        ):
            figures[key] = figures["process"][key]
        print()
    if "kernel" in args.parts:
        figures.update(bench_kernel(path, args.repeat))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
