"""The benchmarks' own checks: a fast wrong answer must fail a benchmark, not win it.

The benchmarks in ``benchmarks/`` time whole processes against peers and
check every side's output against an independent reference before they
report a ratio. These tests run those checks on small real inputs (the
shared NanoAOD sample, Parquet files the benchmark writes) and make sure
they reject outputs that are wrong (an unjoined friend, another selection).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
from hypothesis import given
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import bench_delivery  # noqa: E402
import bench_join  # noqa: E402
import run_all  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nano_tt_v12.root"


@given(
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=40),
    data=st.data(),
)
def test_gather_jagged_equals_a_python_gather(counts: list[int], data: st.DataObject) -> None:
    n = len(counts)
    index = np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=60)), dtype=np.int64)
    c = np.array(counts, dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(c, out=offsets[1:])
    values = np.arange(int(offsets[-1]), dtype=np.float32) * 0.5
    truth = {"counts": c, "offsets": offsets, "values": values}
    lists = [values[offsets[i] : offsets[i + 1]].tolist() for i in range(n)]
    want = [lists[i] for i in index]
    got_offsets, got_counts, got_values = _common.gather_jagged(truth, index)
    assert got_counts.tolist() == [len(x) for x in want]
    got = [got_values[a:b].tolist() for a, b in zip(got_offsets[:-1], got_offsets[1:], strict=True)]
    assert got == want


@pytest.fixture(scope="module")
def join_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return _common.join_inputs(3000, data=tmp_path_factory.mktemp("bench-data"))


@pytest.mark.parametrize("layout", ["shuffled", "regrouped"])
def test_join_inputs_hold_every_event_once_with_the_reference_values(
    join_files: dict[str, list[Path]], layout: str
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    truth = _common.join_truth(3000)
    friend = pa.concat_tables(pq.read_table(p) for p in join_files[layout])
    index = friend["event"].to_numpy().astype(np.int64) - 1
    assert sorted(index.tolist()) == list(range(3000))
    x = dict(zip(index.tolist(), friend["x"].to_numpy().tolist(), strict=True))
    jets = dict(zip(index.tolist(), friend["jets"].to_pylist(), strict=True))
    for i in (0, 1, 1234, 2999):
        assert x[i] == float(truth["x"][i])
        assert jets[i] == truth["values"][truth["offsets"][i] : truth["offsets"][i + 1]].tolist()
    primary = pq.read_table(join_files["primary"][0])
    assert primary["event"].to_numpy().tolist() == list(range(1, 3001))
    if layout == "shuffled":
        assert index.tolist() != list(range(3000))


@pytest.mark.parametrize("layout", ["shuffled", "regrouped"])
def test_join_check_accepts_duckdb_and_rejects_the_unjoined_floor(
    join_files: dict[str, list[Path]], layout: str, tmp_path: Path
) -> None:
    truth = _common.join_truth(3000)
    primary = join_files["primary"][0]
    cols = bench_join.REQUEST_COLUMNS["first"]
    outs = {}
    for name, code in (("duckdb", bench_join._DUCKDB), ("floor", bench_join._PYARROW_FLOOR)):
        out = tmp_path / f"{name}.parquet"
        args = [str(primary), str(out), ",".join(cols), *map(str, join_files[layout])]
        _common.run_process(_common.python_script(code, *args)).check(name)
        outs[name] = out
    bench_join.check_joined("duckdb", outs["duckdb"], primary, cols, truth)
    with pytest.raises(SystemExit, match="differs from the reference"):
        bench_join.check_joined("floor", outs["floor"], primary, cols, truth)


def test_join_check_accepts_columnhub_deliver(
    join_files: dict[str, list[Path]], tmp_path: Path
) -> None:
    truth = _common.join_truth(3000)
    cols = bench_join.REQUEST_COLUMNS["later"]
    spec = _common.write_json(
        tmp_path / "spec.json",
        bench_join.join_spec(join_files["primary"], join_files["shuffled"], cols),
    )
    out = tmp_path / "out"
    cmd = _common.columnhub_cmd("deliver", str(spec), "-o", str(out), "--no-progress")
    _common.run_process(cmd, extra_env={"COLUMNHUB_CACHE": str(tmp_path / "cache")}).check("deliver")
    bench_join.check_joined("columnhub", out, join_files["primary"][0], cols, truth)


def test_delivery_check_accepts_the_script_and_rejects_another_cut(tmp_path: Path) -> None:
    reference = uproot.open(SAMPLE)["Events"].arrays(bench_delivery.BRANCHES, cut=bench_delivery.CUT)
    branches = ",".join(bench_delivery.BRANCHES)
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    for out, cut in ((good, bench_delivery.CUT), (bad, "(nJet >= 4) & (MET_pt > 60)")):
        cmd = _common.python_script(bench_delivery._SCRIPT, str(SAMPLE), str(out), branches, cut)
        _common.run_process(cmd).check("script")
    bench_delivery.check_delivered("script", good, reference)
    with pytest.raises(SystemExit, match="rows delivered"):
        bench_delivery.check_delivered("other cut", bad, reference)
    # same rows, one value changed: caught too
    table = ak.from_parquet(good)
    changed = ak.with_field(table, table["MET_pt"] + np.float32(1e-3), "MET_pt")
    ak.to_parquet(changed, bad)
    with pytest.raises(SystemExit, match="values of MET_pt differ"):
        bench_delivery.check_delivered("changed", bad, reference)


def test_targets_report_not_available_and_unmet_honestly() -> None:
    outcomes = [
        run_all.Outcome("scaleout", ["python"], 0, 1.0, "", "", {"available": False}),
        run_all.Outcome(
            "delivery",
            ["python"],
            0,
            1.0,
            "",
            "",
            {"deliver_vs_script": 0.6, "deliver_over_floor": 0.10},
        ),
    ]
    text = run_all.render(outcomes, argv=[], started=datetime.datetime.now())
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ")}
    scale = next(v for k, v in rows.items() if k.startswith("Dask LocalCluster"))
    assert "not available" in scale
    script = next(v for k, v in rows.items() if k.startswith("columnhub deliver vs the physicist"))
    assert "0.60x | **no**" in script
    floor = next(v for k, v in rows.items() if k.startswith("columnhub deliver over the CPU floor"))
    assert "10.0% | yes" in floor


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_warm_memory_touches_the_memory_and_gives_it_back() -> None:
    import resource

    nbytes = 256 << 20
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss_before = _rss_bytes()
    _common.warm_memory(nbytes + peak_before)  # past this process's peak: the peak must grow
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak_after - peak_before >= nbytes  # every page written, not only reserved
    assert _rss_bytes() - rss_before < nbytes // 4  # and freed again


def test_page_cache_says_how_each_process_starts(tmp_path: Path) -> None:
    inputs = tmp_path / "in.bin"
    inputs.write_bytes(b"x" * 1000)
    warm = _common.PageCache("warm")
    warm.prepare([inputs])
    assert "GiB of memory touched and freed" in warm.describe()
    as_is = _common.PageCache("warm", memory="as-is")
    as_is.prepare([inputs])
    assert "memory" not in as_is.describe()


def test_children_start_with_the_allocator_this_process_started_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # what a Dask nanny started in the benchmark's process copies into os.environ
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    monkeypatch.setattr(_common, "_ALLOCATOR_ENV", {"MALLOC_ARENA_MAX": "2"})
    child = _common.env()
    assert not {"MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"} & set(child)
    assert child["MALLOC_ARENA_MAX"] == "2"  # the user's own setting stays


def test_the_recorded_scale_out_section_shows_each_recorded_figure(tmp_path: Path) -> None:
    """The 16-core section of docs/benchmarks.md comes from the recorded JSON, figure by figure."""
    import json

    import bench_scaleout

    doc = json.loads(bench_scaleout.RECORDED.read_text())
    text = "\n".join(bench_scaleout.recorded_section())
    last = doc["runs"][-1]["figures"]
    for n, r in last["scaling"].items():
        row = f"| {n} | {last['seconds'][f'running{n}']:.2f} | {r['running']:.2f}x |"
        assert row in text
    for run in doc["runs"]:
        assert f"`{run['commit']}` | {run['figures']['dask2_vs_dask1']:.2f}x |" in text
    assert bench_scaleout.recorded_section(tmp_path / "none.json") == []  # nothing recorded: no section


@given(
    one_s=st.floats(1.0, 100.0),
    serial=st.floats(0.0, 0.5),
    idle=st.floats(0.0, 0.3),
    ceiling=st.floats(1.05, 2.0),
)
def test_the_scale_out_bound_is_what_a_perfect_two_worker_run_would_take(
    one_s: float, serial: float, idle: float, ceiling: float
) -> None:
    """The 2-vs-1 bound against a run worked out second by second, and the serial share it allows."""
    import bench_scaleout

    first, after = serial * one_s * 0.8, serial * one_s * 0.2
    gaps = idle * (one_s - first - after)
    busy = one_s - first - after - gaps
    stream = {"first_task_s": first, "after_last_task_s": after, "some_worker_busy_s": busy}
    # two workers at best: the client alone as before, each worker half the busy seconds at
    # the machine's pace (2/ceiling slower than alone), and half the idle gaps
    perfect = first + after + (busy / 2) * (2 / ceiling) + gaps / 2
    assert bench_scaleout.amdahl_bound(one_s, stream, ceiling) == pytest.approx(one_s / perfect)
    assert bench_scaleout.amdahl_bound(one_s, stream, ceiling) <= 2 * (1 + 1e-9)  # never past 2 workers
    # the largest serial share that still reaches a target: exactly it, with nothing idle
    target = 1 + (ceiling - 1) * 0.9
    s = bench_scaleout.serial_share_for(target, ceiling)
    plain = {"first_task_s": s * one_s, "after_last_task_s": 0.0, "some_worker_busy_s": (1 - s) * one_s}
    assert bench_scaleout.amdahl_bound(one_s, plain, ceiling) == pytest.approx(target)
    assert bench_scaleout.serial_share_for(ceiling * 1.01, ceiling) == 0.0  # past the ceiling: none
