"""Run every ``benchmarks/bench_*.py`` and write ``docs/benchmarks.md``.

Each script runs in its own subprocess (with ``--json`` to a temporary file
where it accepts one); its printed table goes into the document verbatim, and
the figures it reports are compared with the project's targets.

    python benchmarks/run_all.py                 # everything, full sizes
    python benchmarks/run_all.py --only cache    # one benchmark (repeatable)
    python benchmarks/run_all.py --quick         # smaller sizes, one repeat

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
    "delivery": ["--events", "200000", "--repeat", "1"],
    "join": ["--events", "500000", "--repeat", "1"],
    "cache": ["--events", "200000", "--repeat", "1"],
    "inference": ["--events", "100000", "--triton-events", "20000", "--repeat", "1"],
}


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
    """

    label: str
    op: str
    threshold: float
    keys: tuple[str, ...] = ()
    pattern: str | None = None
    unit: str = "x"

    def met(self, value: float) -> bool:
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
        shown = (
            f"{self.threshold:.0%}"
            if self.unit == "%"
            else f"{self.threshold:g}{self.unit if self.unit == 'x' else ' ' + self.unit}"
        )
        return f"{self.op} {shown}"


TARGETS: dict[str, list[Target]] = {
    "delivery": [
        Target(
            "columnhub arrays (in memory, like the peers) vs uproot ceiling",
            ">=",
            0.9,
            ("columnhub_arrays_vs_uproot",),
            r"columnhub arrays\s*/ uproot ceiling\s*=\s*([\d.]+)x",
        ),
        Target(
            "columnhub arrays (in memory) vs func_adl_uproot",
            ">=",
            2.0,
            ("columnhub_arrays_vs_func_adl",),
            r"columnhub arrays\s*/ func_adl_uproot\s*=\s*([\d.]+)x",
        ),
        Target(
            "columnhub deliver (Parquet written) vs uproot ceiling",
            ">=",
            0.9,
            ("columnhub_vs_uproot",),
            r"columnhub deliver\s*/ uproot ceiling\s*=\s*([\d.]+)x",
        ),
        Target(
            "columnhub deliver (Parquet written) vs func_adl_uproot (ServiceX engine)",
            ">=",
            2.0,
            ("columnhub_vs_func_adl",),
            r"columnhub deliver\s*/ func_adl_uproot\s*=\s*([\d.]+)x",
        ),
    ],
    "join": [
        Target(
            "simulation-like keys: join_arrays from scratch vs fastest of pandas/polars/DuckDB",
            ">=",
            2.0,
            ("columnhub_vs_fastest_peer", "ratios.columnhub_vs_fastest_peer"),
            r"^columnhub join_arrays \(from scratch[^\n]*?([\d.]+)x\s*$",
        ),
        Target(
            "simulation-like keys: chunked on 2 workers (index built in the timing) vs fastest"
            " peer",
            ">=",
            2.0,
            ("columnhub_chunked_vs_fastest_peer",),
            r"^columnhub chunked[^\n]*?([\d.]+)x\s*$",
        ),
        Target(
            "simulation-like keys: chunked on 2 workers, friend key index cached",
            ">=",
            2.0,
            ("columnhub_chunked_cached_vs_fastest_peer",),
            r"^columnhub chunked, 2 workers \(cached[^\n]*?([\d.]+)x\s*$",
        ),
        Target(
            "simulation-like keys: prebuilt friend key index vs fastest peer",
            ">=",
            2.0,
            ("columnhub_prebuilt_vs_fastest_peer",),
            r"^columnhub join_arrays \(prebuilt[^\n]*?([\d.]+)x\s*$",
        ),
        Target(
            "collision-data-like keys (58 bits): join_arrays from scratch vs fastest peer",
            ">=",
            2.0,
            ("data_keys_columnhub_vs_fastest_peer",),
        ),
        Target(
            "collision-data-like keys (58 bits): prebuilt friend key index vs fastest peer",
            ">=",
            2.0,
            ("data_keys_columnhub_prebuilt_vs_fastest_peer",),
        ),
        Target(
            "aligned join overhead (vs reading alone)",
            "<=",
            0.05,
            ("aligned_overhead", "ratios.aligned_overhead"),
            unit="%",
        ),
        Target(
            "20M-event friend join peak memory",
            "<",
            2.0,
            ("peak_memory_gb", "friend_20m_peak_gb"),
            unit="GB",
        ),
    ],
    "cache": [
        Target(
            "repeated request vs cold, same output dir",
            ">=",
            20.0,
            ("ratios.repeat_same_dir",),
            r"repeat vs cold, same dir\s*=\s*([\d.]+)x",
        ),
        Target(
            "repeated request vs cold, new output dir",
            ">=",
            20.0,
            ("ratios.repeat_new_dir",),
            r"repeat vs cold, new dir\s*=\s*([\d.]+)x",
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
    """Benchmark name -> script, for every ``benchmarks/bench_*.py``."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCH.glob("bench_*.py"))}


def script_flags(script: Path) -> set[str]:
    """The ``--flags`` a script's ``--help`` lists."""
    out = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
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


def run_one(name: str, script: Path, *, quick: bool, timeout: float) -> Outcome:
    """Run one benchmark script in a subprocess."""
    flags = script_flags(script)
    with tempfile.TemporaryDirectory() as tmp:
        figures_path = Path(tmp) / f"{name}.json"
        command = [sys.executable, str(script.relative_to(ROOT))]
        if quick:
            command += quick_args(name, flags)
        if "--json" in flags:
            command += ["--json", str(figures_path)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                command, capture_output=True, text=True, cwd=ROOT, timeout=timeout, check=False
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


def render(outcomes: list[Outcome], *, argv: list[str], started: dt.datetime) -> str:
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
        f"- command: `{shlex.join(['python', 'benchmarks/run_all.py', *argv])}`",
        "",
        "Timings are wall-clock seconds on the machine above (best of each script's",
        "`--repeat` where it has one); a shared or busy machine makes them noisy.",
        "",
        "## Targets",
        "",
        "| benchmark | figure | target | measured | met |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        for t in TARGETS.get(o.name, []):
            value = t.find(o.figures, o.stdout) if o.returncode == 0 else None
            if value is None:
                why = "failed" if o.returncode != 0 else "not reported by the script"
                lines.append(f"| {o.name} | {t.label} | {t.wanted()} | {why} | - |")
            else:
                ok = "yes" if t.met(value) else "**no**"
                lines.append(f"| {o.name} | {t.label} | {t.wanted()} | {t.show(value)} | {ok} |")
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
        outcome = run_one(name, scripts[name], quick=args.quick, timeout=args.timeout)
        print(outcome.stdout, end="", flush=True)
        if outcome.returncode != 0:
            print(
                f"== {name} failed (exit code {outcome.returncode}):\n{outcome.stderr[-2000:]}",
                file=sys.stderr,
            )
        outcomes.append(outcome)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(outcomes, argv=raw, started=started))
    print(f"wrote {args.output}", file=sys.stderr)
    return 1 if any(o.returncode != 0 for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
