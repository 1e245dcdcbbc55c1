"""Run every ``benchmarks/bench_*.py`` and write ``docs/benchmarks.md``.

Each script runs in its own subprocess (with ``--json`` to a temporary file
where it accepts one); its printed table goes into the document verbatim, and
the figures it reports are compared with the project's targets. The headline
figures time whole processes (what a user runs); the in-process figures are
secondary rows labelled "kernel, warm process". Inputs are made once into
``bench-data/`` and reused.

    python benchmarks/run_all.py                 # everything, full sizes
    python benchmarks/run_all.py --only cache    # one benchmark (repeatable)
    python benchmarks/run_all.py --quick         # smaller sizes, one repeat
    python benchmarks/run_all.py --page-cache drop   # inputs read from disk (root)
    python benchmarks/run_all.py --note "shared machine"   # a caveat in the header

A benchmark that fails is reported as failed (with its output) and the others
still run; the exit code is 1 when any failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "Target", "main"]

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
DOC = ROOT / "docs" / "benchmarks.md"

#: extra arguments for ``--quick``, per benchmark; only flags a script's
#: ``--help`` lists are passed.
QUICK: dict[str, list[str]] = {
    "delivery": ["--quick"],
    "join": ["--quick"],
    "cache": ["--quick"],
    "scaleout": ["--quick"],
    "inference": ["--events", "100000", "--triton-events", "20000", "--repeat", "1"],
    "service": ["--quick"],
}

#: the order of the sections (the user's-job benchmarks first); others follow
ORDER = ["join", "delivery", "scaleout", "cache", "inference", "service"]


@dataclass(frozen=True)
class Target:
    """One figure a benchmark must reach.

    Attributes:
        label: what is compared.
        op: ``>=``, ``<=`` or ``<``.
        threshold: the target value.
        keys: dotted paths of the figure in the script's ``--json`` output
            (the first one present is used).
        pattern: a regular expression whose first group finds the figure in
            the script's stdout, when the JSON lacks it.
        unit: how the value is shown (``x`` for ratios).
        command: the command that reproduces this figure alone (from the
            repository root, ``PYTHONPATH=src``).
        missing: what to show when the figure is absent because the script
            says so (``figures[available] is False``).
    """

    label: str
    op: str
    threshold: float
    keys: tuple[str, ...] = ()
    pattern: str | None = None
    unit: str = "x"
    command: str = ""
    missing: str = ""

    def met(self, value: float) -> bool:
        if self.op == "info":
            return True
        if self.op == ">=":
            return value >= self.threshold
        if self.op == "<=":
            return value <= self.threshold
        return value < self.threshold

    def find(self, figures: dict[str, Any] | None, stdout: str) -> float | None:
        """The measured value, from the JSON figures or else the printed output."""
        for key in self.keys:
            value: Any = figures
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        if self.pattern is not None:
            match = re.search(self.pattern, stdout, flags=re.MULTILINE)
            if match:
                return float(match.group(1).replace(",", ""))
        return None

    def show(self, value: float) -> str:
        if self.unit == "%":
            return f"{value:.1%}"
        if self.unit == "x":
            return f"{value:.2f}x"
        return f"{value:.2f} {self.unit}"

    def wanted(self) -> str:
        if self.op == "info":
            return "-"
        shown = (
            f"{self.threshold:.0%}"
            if self.unit == "%"
            else f"{self.threshold:g}{self.unit if self.unit == 'x' else ' ' + self.unit}"
        )
        return f"{self.op} {shown}"


_J = "python benchmarks/bench_join.py"
_D = "python benchmarks/bench_delivery.py"
_C = "python benchmarks/bench_cache.py"
_K = "kernel, warm process: "

TARGETS: dict[str, list[Target]] = {
    "join": [
        Target(
            "keyed left join, shuffled friend, cold first request: columnhub deliver vs DuckDB",
            ">=",
            1.0,
            ("process_shuffled_first_vs_duckdb",),
            command=f"{_J} --parts process --layouts shuffled",
        ),
        Target(
            "keyed left join, shuffled friend, cold, `--no-cache` (no column cache filled): vs"
            " DuckDB",
            "info",
            0.0,
            ("process_shuffled_first_no_cache_vs_duckdb",),
            command=f"{_J} --parts process --layouts shuffled",
        ),
        Target(
            "keyed left join, shuffled friend, later request (friend cached): vs DuckDB",
            ">=",
            1.5,
            ("process_shuffled_later_vs_duckdb",),
            command=f"{_J} --parts process --layouts shuffled",
        ),
        Target(
            "keyed left join, regrouped friend, cold first request: vs DuckDB",
            ">=",
            1.0,
            ("process_regrouped_first_vs_duckdb",),
            command=f"{_J} --parts process --layouts regrouped",
        ),
        Target(
            "keyed left join, regrouped friend, later request (friend cached): vs DuckDB",
            ">=",
            1.5,
            ("process_regrouped_later_vs_duckdb",),
            command=f"{_J} --parts process --layouts regrouped",
        ),
        Target(
            "keyed left join, shuffled friend, cold: vs polars",
            "info",
            0,
            ("process_shuffled_first_vs_polars",),
            command=f"{_J} --parts process --layouts shuffled",
        ),
        Target(
            "keyed left join, shuffled friend, cold: vs a minimal pyarrow+numpy join script",
            "info",
            0,
            ("process_shuffled_first_vs_numpy_join",),
            command=f"{_J} --parts process --layouts shuffled",
        ),
        Target(
            "keyed left join, shuffled friend, later request: vs a minimal pyarrow+numpy join",
            "info",
            0,
            ("process_shuffled_later_vs_numpy_join",),
            command=f"{_J} --parts process --layouts shuffled",
        ),
        Target(
            "keyed left join, shuffled friend, cold: vs the pyarrow floor (no join)",
            "info",
            0,
            ("process_shuffled_first_vs_pyarrow_floor",),
            command=f"{_J} --parts process --layouts shuffled",
        ),
        Target(
            _K + "join_arrays from scratch vs fastest of pandas/polars/DuckDB (in memory)",
            ">=",
            2.0,
            ("columnhub_vs_fastest_peer", "ratios.columnhub_vs_fastest_peer"),
            command=f"{_J} --parts in-memory --keys mc",
        ),
        Target(
            _K + "chunked on 2 workers, friend key index cached, vs fastest peer",
            ">=",
            2.0,
            ("columnhub_chunked_cached_vs_fastest_peer",),
            command=f"{_J} --parts in-memory --keys mc",
        ),
        Target(
            _K + "collision-data-like keys: join_arrays from scratch vs fastest peer",
            ">=",
            2.0,
            ("data_keys_columnhub_vs_fastest_peer",),
            command=f"{_J} --parts in-memory --keys data",
        ),
        Target(
            _K + "aligned join overhead (vs reading alone)",
            "<=",
            0.05,
            ("aligned_overhead", "ratios.aligned_overhead"),
            unit="%",
            command=f"{_J} --parts aligned",
        ),
        Target(
            "20M-event friend join peak memory (child process)",
            "<",
            2.0,
            ("peak_memory_gb", "friend_20m_peak_gb"),
            unit="GB",
            command=f"{_J} --parts memory",
        ),
    ],
    "delivery": [
        Target(
            "columnhub deliver vs the physicist's script (uproot + ak.to_parquet)",
            ">=",
            1.3,
            ("deliver_vs_script",),
            command=f"{_D} --parts process",
        ),
        Target(
            "columnhub deliver over the CPU floor (start-up + read and encode CPU / cores)",
            "<=",
            0.15,
            ("deliver_over_floor",),
            unit="%",
            command=f"{_D} --parts process",
        ),
        Target(
            "columnhub deliver --no-cache (no column cache filled) over the CPU floor",
            "info",
            0,
            ("deliver_no_cache_over_floor",),
            unit="%",
            command=f"{_D} --parts process",
        ),
        Target(
            "columnhub deliver over the floor this machine reaches (read and encode CPU / the "
            "speed-up of two floor processes at once, instead of / cores)",
            "info",
            0,
            ("deliver_over_machine_floor",),
            unit="%",
            command=f"{_D} --parts process",
        ),
        Target(
            "columnhub deliver vs ServiceX's engine (func_adl_uproot + ak.to_parquet)",
            "info",
            0,
            ("deliver_vs_func_adl",),
            command=f"{_D} --parts process",
        ),
        Target(
            _K + "columnhub.deliver (Parquet written) vs uproot arrays in memory",
            ">=",
            0.9,
            ("columnhub_vs_uproot",),
            command=f"{_D} --parts kernel",
        ),
        Target(
            _K + "columnhub.deliver (Parquet written) vs func_adl_uproot in memory",
            ">=",
            2.0,
            ("columnhub_vs_func_adl",),
            command=f"{_D} --parts kernel",
        ),
    ],
    "scaleout": [
        Target(
            "Dask LocalCluster: 2 single-threaded workers vs 1 (4M events with a join)",
            ">=",
            1.7,
            ("dask2_vs_dask1",),
            command="python benchmarks/bench_scaleout.py",
            missing="not available (no `--scheduler` in `columnhub deliver`: Dask executor not merged)",
        ),
        Target(
            "machine ceiling: two single-threaded processes of the same request at once vs one"
            " (what 2 workers can reach on these cores at best)",
            "info",
            0.0,
            ("machine_ceiling.ceiling",),
            command="python benchmarks/bench_scaleout.py",
        ),
        Target(
            "Dask 2 vs 1: the most it can reach here (the one-worker run with its client's"
            " serial share kept, the worker's busy time divided by the machine ceiling, its idle"
            " gaps between tasks halved)",
            "info",
            0.0,
            ("dask2_vs_dask1_bound",),
            command="python benchmarks/bench_scaleout.py",
            missing="not available (no `--scheduler` in `columnhub deliver`: Dask executor not merged)",
        ),
        Target(
            "Dask 2 vs 1 workers as a share of that machine ceiling",
            "info",
            0.0,
            ("dask2_vs_dask1_of_ceiling",),
            command="python benchmarks/bench_scaleout.py",
            missing="not available (no `--scheduler` in `columnhub deliver`: Dask executor not merged)",
        ),
        Target(
            "Dask: 2 workers vs 1, the cluster start included in the command (--scheduler local)",
            "info",
            0.0,
            ("dask2_vs_dask1_with_start",),
            command="python benchmarks/bench_scaleout.py",
            missing="not available (no `--scheduler` in `columnhub deliver`: Dask executor not merged)",
        ),
        Target(
            "Dask: 2 workers vs 1 on a running cluster whose workers ran the request before",
            "info",
            0.0,
            ("dask2_vs_dask1_warm_workers",),
            command="python benchmarks/bench_scaleout.py",
            missing="not available (no `--scheduler` in `columnhub deliver`: Dask executor not merged)",
        ),
    ],
    "cache": [
        Target(
            "repeated request vs cold, whole processes, new output dir",
            ">=",
            10.0,
            ("process.repeat_new_dir",),
            command=f"{_C} --parts process",
        ),
        Target(
            "repeated request vs cold, whole processes, same output dir",
            ">=",
            10.0,
            ("process.repeat_same_dir",),
            command=f"{_C} --parts process",
        ),
        Target(
            _K + "repeated request vs cold, new output dir",
            ">=",
            20.0,
            ("ratios.repeat_new_dir",),
            command=f"{_C} --parts kernel",
        ),
    ],
    "inference": [
        Target(
            "local inference vs direct ONNX Runtime",
            ">=",
            0.9,
            ("local_vs_ort",),
            r"^columnhub local vs direct ORT[^\n]*?\s([\d.]+)\s+>=",
        ),
        Target(
            "Triton (gRPC) vs coffea triton_wrapper, server max_batch_size 8192",
            ">=",
            2.0,
            ("triton_grpc_8192_vs_coffea",),
            r"^columnhub grpc vs coffea grpc, server max batch 8192\s+([\d.]+)\s+>=",
        ),
        Target(
            "Triton (HTTP) vs coffea triton_wrapper, server max_batch_size 8192",
            ">=",
            2.0,
            ("triton_http_8192_vs_coffea",),
            r"^columnhub http vs coffea grpc, server max batch 8192\s+([\d.]+)\s+>=",
        ),
        Target(
            "Triton (gRPC) vs coffea triton_wrapper, server max_batch_size 65536",
            ">=",
            2.0,
            ("triton_grpc_65536_vs_coffea",),
            r"^columnhub grpc vs coffea grpc, server max batch 65536\s+([\d.]+)\s+>=",
        ),
        Target(
            "Triton (HTTP) vs coffea triton_wrapper, server max_batch_size 65536",
            ">=",
            2.0,
            ("triton_http_65536_vs_coffea",),
            r"^columnhub http vs coffea grpc, server max batch 65536\s+([\d.]+)\s+>=",
        ),
    ],    "service": [
        Target(
            "50 concurrent clients on one `columnhub serve --scheduler local --workers 2`: failed",
            "<=",
            0,
            ("failed",),
            unit="requests",
            command="python benchmarks/bench_service.py",
        ),
        Target(
            "identical requests (25 at once): jobs that computed",
            "<=",
            1,
            ("identical_computed",),
            unit="jobs",
            command="python benchmarks/bench_service.py",
        ),
        Target(
            "fully cached request, submit to complete seen by the client: p95",
            "<",
            100,
            ("cached_p95_ms",),
            unit="ms",
            command="python benchmarks/bench_service.py",
        ),
        Target(
            "time to result under the load: p95",
            "info",
            0,
            ("time_to_result_p95_s",),
            unit="s",
            command="python benchmarks/bench_service.py",
        ),
        Target(
            "column cache hit ratio after the load",
            "info",
            0,
            ("cache_hit_ratio",),
            unit="%",
            command="python benchmarks/bench_service.py",
        ),
    ],
}


@dataclass
class Outcome:
    name: str
    command: list[str]
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    figures: dict[str, Any] | None


def discover() -> dict[str, Path]:
    """Benchmark name -> script, for every ``benchmarks/bench_*.py`` (in :data:`ORDER`)."""
    found = {p.stem.removeprefix("bench_"): p for p in sorted(BENCH.glob("bench_*.py"))}
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(ORDER)), kv[0])))


def child_env() -> dict[str, str]:
    """This checkout's sources first on the path of every benchmark and its children."""
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def script_flags(script: Path) -> set[str]:
    """The ``--flags`` a script's ``--help`` lists."""
    out = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
        check=False,
    )
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))


def quick_args(name: str, flags: set[str]) -> list[str]:
    """The ``--quick`` arguments of ``name`` that its script accepts."""
    args, extra = [], QUICK.get(name, [])
    for i, token in enumerate(extra):
        if token.startswith("--") and token in flags:
            args.append(token)
            if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                args.append(extra[i + 1])
    return args


def run_one(
    name: str,
    script: Path,
    *,
    quick: bool,
    timeout: float,
    page_cache: str | None = None,
    memory: str | None = None,
) -> Outcome:
    """Run one benchmark script in a subprocess."""
    flags = script_flags(script)
    with tempfile.TemporaryDirectory() as tmp:
        figures_path = Path(tmp) / f"{name}.json"
        command = [sys.executable, str(script.relative_to(ROOT))]
        if quick:
            command += quick_args(name, flags)
        if page_cache and "--page-cache" in flags:
            command += ["--page-cache", page_cache]
        if memory and "--memory" in flags:
            command += ["--memory", memory]
        if "--json" in flags:
            command += ["--json", str(figures_path)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                command,
                capture_output=True,
                text=True,
                cwd=ROOT,
                env=child_env(),
                timeout=timeout,
                check=False,
            )
            code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as err:
            code = -1
            stdout = _text(err.stdout)
            stderr = _text(err.stderr) + f"\n(timed out after {timeout:g} s)"
        seconds = time.perf_counter() - t0
        figures = None
        if figures_path.is_file():
            try:
                figures = json.loads(figures_path.read_text())
            except json.JSONDecodeError:
                figures = None
    shown = [c if c != str(figures_path) else "FIGURES.json" for c in command]
    shown[0] = "python"
    return Outcome(name, shown, code, seconds, stdout, stderr, figures)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def machine() -> dict[str, Any]:
    """Platform, CPU model, cores and memory of this machine."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram / 2**30, 1) if ram else None,
    }


def render(
    outcomes: list[Outcome], *, argv: list[str], started: dt.datetime, note: str = ""
) -> str:
    """The Markdown of ``docs/benchmarks.md``."""
    m = machine()
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/run_all.py; edit that script, not this file. -->",
        "",
        f"- date: {started.isoformat(timespec='seconds')}",
        f"- machine: {m['platform']}, Python {m['python']}",
        f"- CPU: {m['cpu']}, {m['cores']} cores; RAM {m['ram_gib']} GiB",
        (
            f"- command: `{shlex.join(['python', 'benchmarks/run_all.py', *argv])}`"
            " (from the repository root)"
        ),
    ]
    if note:
        lines.append(f"- **caveat: {note}**")
    lines += [
        "",
        "## How the figures are taken",
        "",
        "- **Headline figures time the user's job**: each side runs as a *new process*",
        "  (interpreter start-up and imports inside the timing), reads its input files and",
        "  writes Parquet files, against the tool the user would otherwise pick, on the same",
        "  inputs, side by side in one run with the runs taking turns; best of `--repeat`.",
        "  Each is printed as a ratio *peer seconds / columnhub seconds* (> 1: columnhub faster).",
        "- **Cold cache**: every cold columnhub run gets a fresh, empty `COLUMNHUB_CACHE`",
        "  directory. A *later request* reuses the cache the first request of the same round",
        "  left; the peers have no such cache and do the whole job again.",
        "- **Installed as a user installs it**: the checkout's `columnhub` is byte-compiled",
        "  first (as `pip install` does; an editable install on a machine with",
        "  `PYTHONDONTWRITEBYTECODE=1` would compile its sources in every timed process,",
        "  0.06-0.08 s that no installed peer pays).",
        "- **OS page cache**: by default (`--page-cache warm`) every input file is read once",
        "  before each timed process, so every side finds its inputs in memory (as on a",
        "  laptop where the user reruns; the same for both sides, and it does not disturb",
        "  other work on a shared machine). `--page-cache drop` runs `sync; echo 3 >",
        "  /proc/sys/vm/drop_caches` before each timed process instead (root only; checked",
        "  to work on the development machine), so every side reads its inputs, and its",
        "  Python modules and shared libraries, from disk (imports get slower for all).",
        "  Outputs go to files on the same disk as the inputs (`bench-data/scratch-*`).",
        "  Either way, `sync` runs before each timed process, so the kernel's write-back",
        "  of the outputs before it does not take cores from it.",
        "- **Memory** (`--memory warm`, the default): after that, the harness touches and",
        "  frees 2 GiB before each timed process. The development machine is a Firecracker VM whose",
        "  balloon device hands free guest memory back to the host (free page reporting,",
        "  2 MiB blocks, ~2 s after they are freed). A process that touches memory the",
        "  host took back pays the host's page faults as system time: 500 MB of fresh",
        "  arrays cost 0.3-0.9 s then, 0.04 s when freed moments before. Without this",
        "  step, which one a timed process got depended on what ran before it (sys time",
        "  of the same cold join alternated 0.25 / 0.5-0.9 s run after run), and a side",
        "  paid 8-20x more for each MB it touches. Warmed, every side starts in the state",
        "  a machine without such reclaim is always in. `--memory as-is` leaves it out.",
        "  Two limits of the warming, measured 2026-12-01: 256 MiB freed 0-1 s before is",
        "  touched again in 19-33 ms, 2-8 s after in 390-570 ms, so it lasts about 2 s, less",
        "  than a Dask run (a request's part tasks on one worker took 0.24-0.25 s for the",
        "  first two to four, 0.30-0.33 s after, with its output and cache on disk; 0.24-0.26",
        "  s throughout with both on tmpfs). And a transparent huge page (NumPy and mimalloc",
        "  ask for them for large buffers) takes a whole free 2 MiB block, the unit the",
        "  balloon takes back: with huge pages turned off for the process (`prctl`), a cold",
        "  2M-event delivery took 1.07 s against 1.20 s (medians of 10, in a period when",
        "  every run was slow). Neither is changed here: the figures are this VM's.",
        "- **Allocator**: every side runs with the allocator settings it ships with.",
        "  `columnhub deliver` fixes glibc's `mmap` threshold at 32 MiB for itself and",
        "  gives its threads one arena (`src/columnhub/_malloc.py`), and",
        "  the Dask workers of `bench_scaleout` start as `--scheduler local` starts them",
        "  (distributed's defaults plus `MALLOC_MMAP_THRESHOLD_`, the setting",
        "  `docs/scaleout.md` recommends to operators; `--worker-malloc dask-default`",
        "  leaves distributed's defaults alone: every request slower, 2 vs 1 higher).",
        "- Every output of every side is checked (first round) against an independent",
        "  reference (a direct uproot read; the friend values generated from the event index),",
        "  so a fast wrong answer fails the benchmark instead of winning it.",
        "- **Secondary rows, \"kernel, warm process\"**: in-memory figures in one process after",
        "  a warm-up (the kernels alone, no start-up, no files written).",
        "- Every figure below comes with the command that reproduces it alone (from the",
        "  repository root, with `PYTHONPATH=src`).",
        "",
        "## Targets",
        "",
        "| benchmark | figure | target | measured | met | command |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        for t in TARGETS.get(o.name, []):
            value = t.find(o.figures, o.stdout) if o.returncode == 0 else None
            cmd = f"`{t.command}`" if t.command else ""
            if value is None:
                if o.returncode != 0:
                    why = "failed"
                elif t.missing and (o.figures or {}).get("available") is False:
                    why = t.missing
                else:
                    why = "not reported by the script"
                lines.append(f"| {o.name} | {t.label} | {t.wanted()} | {why} | - | {cmd} |")
            else:
                ok = "-" if t.op == "info" else ("yes" if t.met(value) else "**no**")
                lines.append(
                    f"| {o.name} | {t.label} | {t.wanted()} | {t.show(value)} | {ok} | {cmd} |"
                )
    join = next((o for o in outcomes if o.name == "join" and o.figures), None)
    if join is not None and join.figures is not None:
        lines += cold_join(join.figures)
    scale = next((o for o in outcomes if o.name == "scaleout" and o.figures), None)
    if scale is not None and scale.figures is not None and "model" in scale.figures:
        lines += scaling_model(scale.figures)
    lines += recorded_scaleout()
    for o in outcomes:
        lines += ["", f"## {o.name}", ""]
        script = BENCH / f"bench_{o.name}.py"
        summary = _docstring_summary(script)
        if summary:
            lines += [summary, ""]
        status = "ok" if o.returncode == 0 else f"**failed** (exit code {o.returncode})"
        lines += [f"`{shlex.join(o.command)}` — {status}, {o.seconds:.1f} s", ""]
        lines += ["```text", o.stdout.rstrip() or "(no output)", "```"]
        if o.returncode != 0 and o.stderr.strip():
            tail = "\n".join(o.stderr.rstrip().splitlines()[-20:])
            lines += ["", "stderr (last lines):", "", "```text", tail, "```"]
        if o.figures is not None:
            blob = json.dumps(o.figures, indent=2)
            lines += [
                "",
                "<details><summary>figures (JSON)</summary>",
                "",
                "```json",
                blob,
                "```",
                "",
                "</details>",
            ]
    return "\n".join(lines) + "\n"


def cold_join(f: dict[str, Any]) -> list[str]:
    """The cold keyed join section (from ``bench_join``'s own figures)."""
    sys.path.insert(0, str(BENCH))
    try:
        from bench_join import cold_join_section
    finally:
        sys.path.pop(0)
    return cold_join_section(f)


def scaling_model(f: dict[str, Any]) -> list[str]:
    """The scaling model section, written by ``bench_scaleout.py`` from its measured figures."""
    sys.path.insert(0, str(BENCH))
    try:
        from bench_scaleout import scaling_model_section
    finally:
        sys.path.remove(str(BENCH))
    return scaling_model_section(f)


def recorded_scaleout() -> list[str]:
    """The scale-out figures recorded on a larger machine (``benchmarks/recorded``)."""
    sys.path.insert(0, str(BENCH))
    try:
        from bench_scaleout import recorded_section
    finally:
        sys.path.remove(str(BENCH))
    return recorded_section()


def _docstring_summary(script: Path) -> str:
    import ast

    try:
        doc = ast.get_docstring(ast.parse(script.read_text()))
    except (OSError, SyntaxError):
        return ""
    return doc.split("\n\n")[0].replace("\n", " ").strip() if doc else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this benchmark (repeatable; e.g. cache, delivery)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one repeat")
    parser.add_argument("--output", type=Path, default=DOC, help="the Markdown file to write")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    parser.add_argument(
        "--page-cache",
        choices=["warm", "drop"],
        help="passed to every benchmark that takes it (default: theirs, warm)",
    )
    parser.add_argument(
        "--memory",
        choices=["warm", "as-is"],
        help="passed to every benchmark that takes it (default: theirs, warm)",
    )
    parser.add_argument("--note", default="", help="a caveat printed in the document's header")
    args = parser.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    scripts = discover()
    names = list(scripts)
    if args.only:
        wanted = [n.removeprefix("bench_").removesuffix(".py") for n in args.only]
        unknown = [n for n in wanted if n not in scripts]
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; choose from {sorted(scripts)}")
        names = [n for n in names if n in wanted]
    started = dt.datetime.now().astimezone()
    outcomes = []
    for name in names:
        print(f"== {name}: running {scripts[name].name}", file=sys.stderr, flush=True)
        outcome = run_one(
            name,
            scripts[name],
            quick=args.quick,
            timeout=args.timeout,
            page_cache=args.page_cache,
            memory=args.memory,
        )
        print(outcome.stdout, end="", flush=True)
        if outcome.returncode != 0:
            print(
                f"== {name} failed (exit code {outcome.returncode}):\n{outcome.stderr[-2000:]}",
                file=sys.stderr,
            )
        outcomes.append(outcome)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(outcomes, argv=raw, started=started, note=args.note))
    print(f"wrote {args.output}", file=sys.stderr)
    return 1 if any(o.returncode != 0 for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
