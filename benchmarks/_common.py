"""Shared helpers of the benchmarks: inputs made once, whole processes timed.

Every headline figure times what a user runs: a new Python process (its
start-up and imports included), files in, files out. This module owns

- the input files, made once into ``bench-data/`` and reused (a synthetic
  NanoAOD ROOT file from ``columnhub synth``; Parquet primaries and friends
  written here with numpy and pyarrow, whose values are a pure function of
  the event index so that every output can be checked against them);
- :func:`run_process`: one command as a new process, wall-clock seconds and
  CPU seconds (``RUSAGE_CHILDREN``: every thread of the child);
- the page cache policy (:class:`PageCache`): ``warm`` (default) reads every
  input file once before each timed run so every side finds its inputs in
  memory, as on a laptop where the user reruns; ``drop`` empties the OS page
  cache before each timed run (``sync; echo 3 > /proc/sys/vm/drop_caches``,
  root only; it slows down everyone else on a shared machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DATA",
    "KEYS",
    "ROOT",
    "PageCache",
    "Run",
    "columnhub_cmd",
    "gather_jagged",
    "join_inputs",
    "join_truth",
    "run_process",
    "synth_root",
]

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LIKE = SHARED / "nano_tt_v12.root"
DATA = ROOT / "bench-data"
KEYS = ["run", "luminosityBlock", "event"]
PYTHON = sys.executable


def byte_compile() -> None:
    """Byte-compile this checkout's ``columnhub``, as ``pip install`` does for a user.

    An editable install leaves compiling to the first import, and a machine
    with ``PYTHONDONTWRITEBYTECODE=1`` (this one) never writes the ``.pyc``
    files: every timed ``columnhub`` process would compile its own sources
    (0.06-0.08 s), which no installed package (uproot, DuckDB, polars) pays.
    """
    import compileall

    compileall.compile_dir(str(ROOT / "src" / "columnhub"), quiet=1)


byte_compile()


#: glibc's allocator variables as this process started: a Dask nanny started
#: here copies its ``pre-spawn-environ`` (``MALLOC_TRIM_THRESHOLD_``, ...) into
#: ``os.environ``, and no child may inherit that
_ALLOCATOR_ENV = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}


def env() -> dict[str, str]:
    """The environment of a child: this checkout's sources first on the path.

    glibc's ``MALLOC_*`` variables are the ones this process started with, not
    what a Dask nanny started in this process added: every timed child runs
    with the allocator a user's shell gives it.
    """
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    e.update(_ALLOCATOR_ENV)
    src = str(ROOT / "src")
    e["PYTHONPATH"] = src + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("COLUMNHUB_CACHE", None)
    return e


def columnhub_cmd(*args: str) -> list[str]:
    """``columnhub ARGS`` as a new process: the installed entry point next to Python."""
    exe = Path(PYTHON).parent / "columnhub"
    if exe.exists():
        return [str(exe), *args]
    return [PYTHON, "-m", "columnhub.cli.main", *args]


# ---------------------------------------------------------------------------
# processes


@dataclass
class Run:
    """One timed process: wall and CPU seconds, exit code, output."""

    wall: float
    cpu: float
    returncode: int
    stdout: str
    stderr: str

    def check(self, what: str) -> Run:
        if self.returncode != 0:
            msg = f"{what} failed (exit code {self.returncode}):\n{self.stderr[-3000:]}"
            raise SystemExit(msg)
        return self


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_process(
    cmd: Sequence[str], *, extra_env: dict[str, str] | None = None, cwd: Path | None = None
) -> Run:
    """Run ``cmd`` as a new process; wall and CPU seconds of the child."""
    e = env()
    if extra_env:
        e.update(extra_env)
    c0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, env=e, cwd=cwd or ROOT, check=False
    )
    wall = time.perf_counter() - t0
    return Run(wall, _children_cpu() - c0, proc.returncode, proc.stdout, proc.stderr)


def run_together(cmds: Sequence[Sequence[str]], *, extra_envs: Sequence[dict[str, str]]) -> float:
    """Start every command of ``cmds`` at once (each with its extra environment); wall seconds.

    Raises ``SystemExit`` with the stderr tail of the first command that fails.
    """
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            list(cmd), env={**env(), **extra}, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for cmd, extra in zip(cmds, extra_envs, strict=True)
    ]
    errors = [(cmd, proc.communicate()[1], proc.returncode) for cmd, proc in zip(cmds, procs, strict=True)]
    wall = time.perf_counter() - t0
    for cmd, err, rc in errors:
        if rc:
            msg = f"{' '.join(cmd[:3])} ... (started together with others) failed:\n{err[-2000:]}"
            raise SystemExit(msg)
    return wall


def python_script(code: str, *args: str) -> list[str]:
    """``python -c CODE ARGS``: a peer's script as a new process."""
    return [PYTHON, "-c", code, *args]


# ---------------------------------------------------------------------------
# page cache


def add_page_cache_option(parser: Any) -> None:
    """The ``--page-cache warm|drop`` option every whole-process benchmark takes."""
    parser.add_argument(
        "--page-cache",
        choices=["warm", "drop"],
        default="warm",
        help="warm: inputs read once before each timed process (every side reads from memory);"
        " drop: sync + drop_caches before each (root only; disturbs a shared machine)",
    )
    parser.add_argument(
        "--memory",
        choices=["warm", "as-is"],
        default="warm",
        help="warm: touch and free 2 GiB before each timed process, so no side pays the host's"
        " faults for memory the VM handed back (see PageCache); as-is: leave memory as the run"
        " before left it",
    )


@dataclass
class PageCache:
    """How the OS page cache is prepared before each timed process.

    ``warm``: every input file is read once (so every side reads from memory;
    outputs are written through the page cache as usual). ``drop``: the page
    cache is emptied (root only), so every side reads its inputs from disk.
    Either way the data the runs before wrote is flushed to disk first
    (``sync``), so the kernel's write-back of one run's output does not take
    cores from the next timed process.

    ``memory="warm"`` then touches and frees :data:`WARM_MEMORY_BYTES` in this
    process. The development machine is a Firecracker VM whose balloon device hands free
    guest memory back to the host (free page reporting, 2 MiB blocks, about
    2 s after they are freed); a process that touches memory the host took back
    pays the host's page faults as system time: 500 MB of fresh arrays cost
    0.3-0.9 s, against 0.04 s for memory freed moments before. Which of the two
    a timed process got depended on what happened to run before it, and it
    charged a side 8-20x more for each MB it touches than the warm state does.
    Warmed, every side starts in the same state, the one a machine without
    such reclaim (bare metal, a VM without free page reporting) is always in.
    ``memory="as-is"`` leaves it out.
    """

    mode: str = "warm"
    notes: list[str] = field(default_factory=list)
    memory: str = "warm"

    def __post_init__(self) -> None:
        if self.mode == "drop" and not self._can_drop():
            self.notes.append(
                "--page-cache drop asked for, but /proc/sys/vm/drop_caches is not writable "
                "here (not root?): fell back to warm"
            )
            self.mode = "warm"

    @staticmethod
    def _can_drop() -> bool:
        return os.access("/proc/sys/vm/drop_caches", os.W_OK)

    def describe(self) -> str:
        if self.mode == "drop":
            text = "page cache dropped before every timed process (inputs read from disk)"
        else:
            text = "inputs in the page cache for every side (read once before every timed process)"
        if self.memory == "warm":
            text += f"; {WARM_MEMORY_BYTES >> 30} GiB of memory touched and freed before each"
        return text

    def prepare(self, inputs: Iterable[Path]) -> None:
        os.sync()
        if self.mode == "drop":
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return
        for path in inputs:
            files = sorted(path.rglob("*")) if path.is_dir() else [path]
            for f in files:
                if f.is_file():
                    with open(f, "rb") as fh:
                        while fh.read(1 << 24):
                            pass
        if self.memory == "warm":
            warm_memory()


#: bytes :func:`warm_memory` touches (at most half of the memory available)
WARM_MEMORY_BYTES = 2 << 30


def warm_memory(nbytes: int = WARM_MEMORY_BYTES) -> None:
    """Touch ``nbytes`` of fresh memory and free it again (see :class:`PageCache`)."""
    available = nbytes
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            line = next(x for x in f if x.startswith("MemAvailable:"))
        available = int(line.split()[1]) * 1024
    block = np.ones(min(nbytes, available // 2), dtype=np.uint8)  # writes every page
    del block


# ---------------------------------------------------------------------------
# inputs


def synth_root(
    events: int,
    *,
    data: Path = DATA,
    name: str | None = None,
    extra: Sequence[str] = (),
    seed: int = 1,
) -> Path:
    """A synthetic NanoAOD file (or directory) from ``columnhub synth``, made once."""
    path = data / (name or f"synth-{events}.root")
    done = path if path.suffix == ".root" else path / ".complete"
    if done.exists():
        return path
    data.mkdir(parents=True, exist_ok=True)
    print(f"making {path} (once) ...", file=sys.stderr, flush=True)
    cmd = columnhub_cmd(
        "synth", "--like", str(LIKE), "--events", str(events), "-o", str(path), "--seed", str(seed),
        *extra,
    )
    run_process(cmd).check(f"columnhub synth -> {path}")
    if path.suffix != ".root":
        done.write_text("")
    return path


#: primary columns of the Parquet join inputs (flat, NanoAOD dtypes)
PRIMARY_COLUMNS = {"MET_pt": "float32", "MET_phi": "float32", "PV_npvs": "int32", "genWeight": "float32"}
#: friend columns: one flat float, one jagged float (Poisson(5) items per event)
FRIEND_FLAT, FRIEND_JAGGED = "x", "jets"


def keys_of(index: np.ndarray) -> dict[str, np.ndarray]:
    """CMS event keys of event indices, as ``columnhub synth`` makes them."""
    i = index.astype(np.int64)
    return {
        "run": (1 + i // 1_000_000).astype(np.uint32),
        "luminosityBlock": (1 + i // 1000 % 1000).astype(np.uint32),
        "event": (i + 1).astype(np.uint64),
    }


def join_truth(events: int, *, seed: int = 11) -> dict[str, np.ndarray]:
    """The friend's values by event index: ``x``, and ``jets`` as counts + flat values.

    The reference every joined output is checked against (event index =
    ``event - 1``).
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=events).astype(np.float32)
    counts = rng.poisson(5, size=events).astype(np.int64)
    values = rng.normal(size=int(counts.sum())).astype(np.float32)
    offsets = np.zeros(events + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return {"x": x, "counts": counts, "offsets": offsets, "values": values}


def gather_jagged(truth: dict[str, np.ndarray], index: np.ndarray) -> tuple[np.ndarray, ...]:
    """Offsets, counts and flat values of the friend's jagged column for events ``index``."""
    counts = truth["counts"][index]
    starts = truth["offsets"][:-1][index]
    offsets = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    take = np.repeat(starts - offsets[:-1], counts) + np.arange(int(offsets[-1]))
    return offsets, counts, truth["values"][take]


def _friend_table(order: np.ndarray, truth: dict[str, np.ndarray]) -> Any:
    import pyarrow as pa

    offsets, _, values = gather_jagged(truth, order)
    jets = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    cols = {k: pa.array(v) for k, v in keys_of(order).items()}
    cols[FRIEND_FLAT] = pa.array(truth["x"][order])
    cols[FRIEND_JAGGED] = jets.cast(pa.list_(pa.float32()))
    return pa.table(cols)


def join_inputs(events: int, *, data: Path = DATA) -> dict[str, Any]:
    """Parquet inputs of the keyed join, made once.

    - ``primary``: one file, events in key order, keys + :data:`PRIMARY_COLUMNS`.
    - ``shuffled``: the friend, every event once, in a random order (one file).
    - ``regrouped``: the friend in nearly the primary's order (each event
      displaced by up to ~2000 places), regrouped into 3 files whose
      boundaries are not the primary's (a re-processed tree).

    pyarrow's default row groups (1Mi rows), zstd.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = data / f"join-{events}"
    paths = {
        "primary": [where / "primary.parquet"],
        "shuffled": [where / "friend-shuffled.parquet"],
        "regrouped": [where / f"friend-regrouped-{k}.parquet" for k in range(3)],
    }
    if (where / ".complete").exists():
        return paths
    print(f"making {where} (once) ...", file=sys.stderr, flush=True)
    where.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    index = np.arange(events)
    cols = {k: pa.array(v) for k, v in keys_of(index).items()}
    cols["MET_pt"] = pa.array(rng.exponential(40, events).astype(np.float32))
    cols["MET_phi"] = pa.array(rng.uniform(-np.pi, np.pi, events).astype(np.float32))
    cols["PV_npvs"] = pa.array(rng.poisson(30, events).astype(np.int32))
    cols["genWeight"] = pa.array(rng.choice([-1.0, 1.0], events).astype(np.float32))
    pq.write_table(pa.table(cols), paths["primary"][0], compression="zstd")
    truth = join_truth(events)
    pq.write_table(
        _friend_table(rng.permutation(events), truth), paths["shuffled"][0], compression="zstd"
    )
    nearly = np.argsort(index + rng.uniform(0, 2000, events), kind="stable")
    bounds = np.linspace(0, events, 4).astype(int) + np.array([0, 12_345, -6_789, 0]) * (events > 100_000)
    for k, path in enumerate(paths["regrouped"]):
        part = nearly[bounds[k] : bounds[k + 1]]
        pq.write_table(_friend_table(part, truth), path, compression="zstd")
    (where / ".complete").write_text("")
    return paths


# ---------------------------------------------------------------------------
# small things


def scratch_dir(data: Path = DATA) -> tempfile.TemporaryDirectory[str]:
    """A scratch directory on the same disk as the inputs (outputs are files on disk)."""
    data.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=data, prefix="scratch-")


def fresh(path: Path) -> Path:
    """``path``, emptied."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=2))
    return path


def cores() -> int:
    return len(os.sched_getaffinity(0))
