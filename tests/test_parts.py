"""Parts as the unit of work: the plan's parts, part tasks, identical bytes for any workers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uproot
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import columnhub
import columnhub.plan
from columnhub.plan import MIN_PART_BYTES, group_evenly, group_parts, make_plan, min_part_count
from columnhub.spec import load_request
from columnhub.synth import synthesize

KEYS = ["run", "luminosityBlock", "event"]
COLUMNS = ["MET_pt", "Jet_pt", "Jet_eta", "nMuon", "Muon_pt"]
WHERE = "(nJet >= 2) & (MET_pt > 20)"


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> list[Path]:
    """4,000 NanoAOD-like events in 2 files, baskets of 250 events."""
    d = tmp_path_factory.mktemp("parts-primary")
    return synthesize(
        shared_data / "nano_tt_v12.root",
        events=4000,
        output=d,
        files=2,
        basket_events=250,
        branches=["Jet_pt", "Jet_eta", "MET_pt", "Muon_pt"],
    )


def spec(files: list[Path], **extra: Any) -> dict[str, Any]:
    return {
        "dataset": {"name": "primary", "files": [str(f) for f in files]},
        "columns": COLUMNS,
        **extra,
    }


def uproot_reference(files: list[Path], names: list[str], cut: str | None) -> ak.Array:
    """The rows a delivery must hold: read straight with uproot, in file order."""
    arrays = [uproot.open(f)["Events"].arrays(names, cut=cut) for f in files]
    return ak.concatenate(arrays)


# -- the plan's parts -----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    entries=st.lists(st.integers(1, 1000), min_size=1, max_size=60),
    per_event=st.floats(0.1, 200.0),
    target=st.integers(100, 1_000_000),
)
def test_parts_cover_every_chunk_in_order_near_the_target(
    entries: list[int], per_event: float, target: int
) -> None:
    parts = group_parts(entries, bytes_per_event=per_event, target_bytes=target)
    assert [i for p in parts for i in p] == list(range(len(entries)))  # each chunk once, in order
    sizes = [sum(entries[i] for i in p) * per_event for p in parts]
    for part, size in zip(parts, sizes, strict=True):
        if len(part) > 1:  # only a single chunk may pass 2x the target
            assert size <= 2 * target
    if len(parts) > 1 and max(entries) * per_event <= target / 2:
        assert all(size >= target / 2 for size in sizes)  # chunks small: parts 0.5-2x target


def test_part_size_comes_from_the_branches_compressed_sizes(primary: list[Path]) -> None:
    plan = make_plan(
        load_request(spec(primary, chunk_size=250, output={"target_part_bytes": 30_000}))
    )
    tree = uproot.open(primary[0])["Events"]
    outputs = [*KEYS, "nJet", "Jet_pt", "Jet_eta", "MET_pt", "nMuon", "Muon_pt"]
    assert sorted(plan.outputs) == sorted(outputs)
    expected = sum(tree[n].compressed_bytes for n in outputs) / tree.num_entries
    assert plan.bytes_per_event == pytest.approx(expected)
    assert len(plan.parts) > 2
    assert [i for p in plan.parts for i in p.chunks] == list(range(len(plan.chunks)))

    result = columnhub.deliver(plan.request, output=Path(primary[0]).parent / "sized", cache=False)
    sizes = [p["bytes"] for p in result.manifest["parts"]]
    # every part but the last near the target (Parquet zstd vs the files' ROOT zstd:1)
    assert all(7_500 <= s <= 120_000 for s in sizes[:-1]), sizes


def test_a_friends_columns_count_their_own_bytes_per_entry(
    primary: list[Path], shared_data: Path, tmp_path: Path
) -> None:
    friend_files = synthesize(
        shared_data / "nano_tt_v12.root",
        events=4000,
        output=tmp_path / "friend",
        branches=["MET_pt", "Jet_pt"],
        seed=3,
        shuffle=True,
    )
    request = spec(
        primary,
        friends=[
            {
                "name": "sys",
                "dataset": {"name": "sys", "files": [str(f) for f in friend_files]},
                "columns": ["Jet_pt"],
                "prefix": "sys_",
            }
        ],
    )
    request["columns"] = ["MET_pt", "sys_Jet_pt"]
    plan = make_plan(load_request(request))
    assert plan.outputs == (*KEYS, "MET_pt", "nsys", "sys_Jet_pt")
    mine = uproot.open(primary[0])["Events"]
    theirs = uproot.open(friend_files[0])["Events"]
    expected = sum(mine[n].compressed_bytes for n in [*KEYS, "MET_pt"]) / mine.num_entries
    expected += theirs["Jet_pt"].compressed_bytes / theirs.num_entries
    expected += columnhub.plan._GUESS_BYTES  # the counter nsys: computed, its size a guess
    assert plan.bytes_per_event == pytest.approx(expected)


@settings(max_examples=200, deadline=None)
@given(
    total=st.floats(0.0, 1e12),
    target=st.integers(1, 2**40),
    min_parts=st.integers(1, 64),
)
def test_min_part_count_asks_for_min_parts_of_at_least_the_floor(
    total: float, target: int, min_parts: int
) -> None:
    count = min_part_count(total, target, min_parts=min_parts)
    by_target = math.ceil(total / target)  # what the target alone makes, about
    wanted = min(min_parts, int(total // MIN_PART_BYTES))  # min_parts, within the floor
    if count is None:
        assert wanted <= max(by_target, 1)  # the rule only ever adds parts
    else:
        assert by_target < count <= min_parts
        assert total / count >= MIN_PART_BYTES  # never below the floor
        assert count == min_parts or total / (count + 1) < MIN_PART_BYTES  # as many as it may


@settings(max_examples=200, deadline=None)
@given(
    entries=st.lists(st.integers(1, 1000), min_size=1, max_size=60),
    parts=st.integers(1, 12),
)
def test_group_evenly_covers_every_chunk_in_order(entries: list[int], parts: int) -> None:
    groups = group_evenly(entries, parts)
    assert [i for g in groups for i in g] == list(range(len(entries)))
    assert 1 <= len(groups) <= parts
    share = sum(entries) / parts
    if max(entries) <= share / 2:  # chunks small against a share: exactly the parts asked
        assert len(groups) == min(parts, len(entries))
        for g in groups:  # each within a chunk of its share
            assert abs(sum(entries[i] for i in g) - share) <= 2 * max(entries)


@pytest.mark.parametrize("workers", [1, 2])
def test_min_parts_splits_a_result_under_the_target(
    primary: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    monkeypatch.setattr(columnhub.plan, "MIN_PART_BYTES", 1)  # the test data is small
    request = spec(primary, chunk_size=500, where=WHERE)  # default target: 256 MiB
    plan = make_plan(load_request(request))
    assert len(plan.parts) == plan.request.output.min_parts == 4
    assert [i for p in plan.parts for i in p.chunks] == list(range(len(plan.chunks)))
    result = columnhub.deliver(request, output=tmp_path / "out", workers=workers, cache=False)
    assert len(result.files) == 4
    got = ak.from_arrow(pa.concat_tables(pq.read_table(f) for f in result.files))
    expected = uproot_reference(primary, [*KEYS, *COLUMNS], WHERE)
    for name in [*KEYS, *COLUMNS]:
        assert ak.to_list(got[name]) == ak.to_list(expected[name]), name
    request["output"] = {"min_parts": 1}
    assert len(make_plan(load_request(request)).parts) == 1


# -- identical bytes, the same rows ------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "root"])
def test_parts_are_byte_identical_for_any_number_of_workers(
    primary: list[Path], tmp_path: Path, fmt: str
) -> None:
    request = spec(
        primary, where=WHERE, chunk_size=300, output={"target_part_bytes": 15_000, "format": fmt}
    )
    results = [
        columnhub.deliver(request, output=tmp_path / str(n), workers=n, cache=False)
        for n in (1, 2, 3)
    ]
    first = results[0]
    assert len(first.files) >= 3
    for other in results[1:]:
        assert [f.name for f in other.files] == [f.name for f in first.files]
        for a, b in zip(first.files, other.files, strict=True):
            if fmt == "parquet":
                assert a.read_bytes() == b.read_bytes(), a.name
            else:  # a ROOT file holds its creation time: the same branches and entries
                ta, tb = uproot.open(a)["Events"], uproot.open(b)["Events"]
                assert [(x.name, x.title) for x in ta.branches] == [
                    (x.name, x.title) for x in tb.branches
                ]
                assert ak.to_list(ta.arrays()) == ak.to_list(tb.arrays())
    ref = uproot_reference(primary, [*KEYS, *COLUMNS], WHERE)
    got = first.to_awkward()
    for name in [*KEYS, *COLUMNS]:
        assert ak.to_list(got[name]) == ak.to_list(ref[name]), name
    for result in results:  # checksums (taken while writing) of the bytes on disk
        for part in result.manifest["parts"]:
            data = (result.directory / part["name"]).read_bytes()
            assert part["xxh3"] == xxhash.xxh3_64_hexdigest(data), part["name"]
            assert part["bytes"] == len(data)


def test_a_part_hashed_while_written_is_published_whole_or_not_at_all(tmp_path: Path) -> None:
    """The Parquet part writer: the checksum it computes while writing is the file's
    (read back independently); an aborted part leaves no file, temporary or final."""
    from columnhub.output.parquet import ParquetPart

    rng = np.random.default_rng(3)
    counts = rng.integers(0, 6, size=5000)
    table = pa.table(
        {
            "x": rng.normal(size=5000).astype(np.float32),
            "jets": ak.to_arrow(
                ak.unflatten(rng.normal(size=int(counts.sum())), counts), extensionarray=False
            ),
        }
    )
    part = ParquetPart(tmp_path, 7, schema=table.schema)
    for start in range(0, 5000, 1300):
        part.write(table.slice(start, 1300))
    info = part.close()
    data = (tmp_path / info.name).read_bytes()
    assert info.name == "part-00007.parquet"
    assert (info.xxh3, info.bytes, info.rows) == (xxhash.xxh3_64_hexdigest(data), len(data), 5000)
    assert pq.read_table(tmp_path / info.name).equals(table)
    aborted = ParquetPart(tmp_path, 8, schema=table.schema)
    aborted.write(table)
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00007.parquet"]


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunk_size=st.integers(100, 2500),
    target=st.integers(2_000, 200_000),
    cut=st.sampled_from([None, WHERE, "MET_pt > 1e9", "event % 7 == 0"]),
    workers=st.integers(1, 3),
)
def test_parts_concatenate_to_the_rows_of_arrays(
    primary: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
    chunk_size: int,
    target: int,
    cut: str | None,
    workers: int,
) -> None:
    request = spec(primary, chunk_size=chunk_size, output={"target_part_bytes": target})
    if cut is not None:
        request["where"] = cut
    out = tmp_path_factory.mktemp("parts")
    result = columnhub.deliver(request, output=out, workers=workers, cache=False)
    expected = columnhub.arrays(request, workers=1)
    names = [p["name"] for p in result.manifest["parts"]]
    assert names == [f"part-{i:05d}.parquet" for i in range(len(names))]  # no gaps
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "manifest.json"])
    tables = [pq.read_table(out / n) for n in names]
    assert len({t.schema for t in tables}) == 1
    rows = [t.num_rows for t in tables]
    assert rows == [p["rows"] for p in result.manifest["parts"]]
    assert all(rows) or len(rows) == 1  # empty parts dropped, one kept for an empty result
    got = ak.from_arrow(pa.concat_tables(tables))
    assert got.fields == expected.fields
    for name in expected.fields:
        assert ak.to_list(got[name]) == ak.to_list(expected[name]), name
    assert sum(rows) == result.events == len(expected)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chunk_size=st.integers(200, 2500),
    min_parts=st.integers(1, 7),
    floor=st.sampled_from([1, 20_000, 10**9]),
)
def test_min_parts_parts_are_the_same_bytes_for_any_workers(
    primary: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    chunk_size: int,
    min_parts: int,
    floor: int,
) -> None:
    """min_parts (with any floor on the part size): whole chunks per part, at least
    min(min_parts, chunks) parts when the floor allows, the same files for 1 and 3 workers."""
    monkeypatch.setattr(columnhub.plan, "MIN_PART_BYTES", floor)
    request = spec(primary, chunk_size=chunk_size, where=WHERE, output={"min_parts": min_parts})
    plan = make_plan(load_request(request))
    assert [i for p in plan.parts for i in p.chunks] == list(range(len(plan.chunks)))
    total = sum(c.entries for c in plan.chunks) * plan.bytes_per_event
    if total / min_parts >= floor:  # the floor does not bind: min_parts' worth of parts
        biggest = max(c.entries for c in plan.chunks) * plan.bytes_per_event
        if biggest <= total / min_parts / 2:  # chunks small enough to be grouped that finely
            assert len(plan.parts) >= min_parts
    else:
        assert len(plan.parts) <= max(1, -(-total // floor) + 1)
    files = {}
    for workers in (1, 3):
        out = tmp_path_factory.mktemp("min-parts")
        result = columnhub.deliver(request, output=out, workers=workers, cache=False)
        files[workers] = [(out / n).read_bytes() for n in result.manifest["files"]]
    assert files[1] == files[3]
    got = ak.from_arrow(pa.concat_tables(pq.read_table(pa.BufferReader(b)) for b in files[1]))
    expected = uproot_reference(primary, [*KEYS, *COLUMNS], WHERE)
    for name in [*KEYS, *COLUMNS]:
        assert ak.to_list(got[name]) == ak.to_list(expected[name]), name


def test_an_empty_result_keeps_one_part_with_the_columns(
    primary: list[Path], tmp_path: Path
) -> None:
    request = spec(
        primary, where="MET_pt < 0", chunk_size=500, output={"target_part_bytes": 5_000}
    )
    assert len(make_plan(load_request(request)).parts) > 1
    result = columnhub.deliver(request, output=tmp_path / "out", cache=False)
    assert [p["name"] for p in result.manifest["parts"]] == ["part-00000.parquet"]
    table = pq.read_table(result.files[0])
    assert table.num_rows == 0
    assert table.column_names == [*KEYS, "MET_pt", "nJet", "Jet_pt", "Jet_eta", "nMuon", "Muon_pt"]
    assert pa.types.is_list(table.schema.field("Jet_pt").type)


def test_an_outer_tail_part_has_the_first_parts_schema(
    primary: list[Path], shared_data: Path, tmp_path: Path
) -> None:
    friend_files = synthesize(
        shared_data / "nano_tt_v12.root",
        events=1500,
        first_event=3000,  # 500 events without a primary partner
        output=tmp_path / "friend",
        branches=["MET_pt"],
        seed=5,
        shuffle=True,
    )
    request = spec(
        primary,
        chunk_size=500,
        output={"target_part_bytes": 20_000},
        friends=[
            {
                "name": "sys",
                "dataset": {"name": "sys", "files": [str(f) for f in friend_files]},
                "columns": ["MET_pt"],
                "prefix": "sys_",
                "how": "outer",
            }
        ],
    )
    request["columns"] = ["MET_pt", "Jet_pt", "sys_MET_pt", "sys_matched"]
    result = columnhub.deliver(request, output=tmp_path / "out", cache=False, workers=2)
    tables = [pq.read_table(f) for f in result.files]
    assert len(tables) > 2
    assert len({t.schema for t in tables}) == 1
    assert pa.types.is_list(tables[-1].schema.field("Jet_pt").type)  # not null-typed
    tail = tables[-1].to_pydict()
    assert not any(tail["sys_matched"]) and all(v is None for v in tail["MET_pt"])
    # every event of either side once (uproot: the keys of both sides)
    keys = [(r["run"], r["luminosityBlock"], r["event"]) for t in tables for r in t.to_pylist()]
    both = set()
    for files in (primary, friend_files):
        ref = uproot_reference(files, KEYS, None)
        both |= set(zip(*(ak.to_list(ref[k]) for k in KEYS), strict=True))
    assert len(keys) == len(set(keys))
    assert set(keys) == both


# -- ROOT: the same branches in every part -------------------------------------------


def test_root_counters_come_from_the_plan_not_the_first_rows(tmp_path: Path) -> None:
    # a file without counters: A_x and A_y share a prefix but not their lengths,
    # which the first 40 events (both empty) cannot show
    n = 120
    x_counts = np.where(np.arange(n) < 40, 0, 1)
    y_counts = np.where(np.arange(n) < 40, 0, 2)
    table = pa.table(
        {
            "run": pa.array(np.ones(n, np.uint32)),
            "luminosityBlock": pa.array(np.ones(n, np.uint32)),
            "event": pa.array(np.arange(n, dtype=np.uint64)),
            "A_x": pa.array(
                [[float(i)] * int(c) for i, c in enumerate(x_counts)], pa.list_(pa.float32())
            ),
            "A_y": pa.array(
                [[float(-i)] * int(c) for i, c in enumerate(y_counts)], pa.list_(pa.float32())
            ),
        }
    )
    source = tmp_path / "in.parquet"
    pq.write_table(table, source, row_group_size=20)
    request = {
        "dataset": {"name": "plain", "files": [str(source)]},
        "columns": ["A_x", "A_y"],
        "chunk_size": 20,
        "output": {"format": "root", "target_part_bytes": 1},
    }
    result = columnhub.deliver(request, output=tmp_path / "out", cache=False, workers=2)
    assert len(result.files) > 2
    layouts = set()
    got: dict[str, list[Any]] = {"A_x": [], "A_y": []}
    for path in result.files:
        tree = uproot.open(path)["Events"]
        layouts.add(tuple((b.name, b.title) for b in tree.branches))
        arrays = tree.arrays(["A_x", "A_y"])
        for name in got:
            got[name].extend(ak.to_list(arrays[name]))
    assert len(layouts) == 1  # one set of branches and counters in every part
    assert got == {"A_x": table.column("A_x").to_pylist(), "A_y": table.column("A_y").to_pylist()}


# -- one concurrency setting ---------------------------------------------------------


def test_every_pool_takes_the_one_thread_setting(tmp_path: Path) -> None:
    script = """
from columnhub._concurrency import threads
from columnhub._kernels import kernel_pool_size
from columnhub.sources.root import read_executor
print(threads(), kernel_pool_size(), read_executor()._max_workers)
"""
    env = {**os.environ, "COLUMNHUB_THREADS": "3"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["3", "3", "3"]
    env["COLUMNHUB_THREADS"] = "many"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "COLUMNHUB_THREADS must be a positive integer" in done.stderr
    assert "'many'" in done.stderr


def test_the_deliver_command_runs_without_the_cyclic_collector(
    primary: list[Path], tmp_path: Path
) -> None:
    """``columnhub deliver`` (the installed command, a new process) turns the cyclic
    collector off; other commands keep it. Seen from inside the process: a
    ``sitecustomize`` on the path records ``gc.isenabled()`` at exit."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(
        "import atexit, gc, os\n"
        "atexit.register(lambda: open(os.environ['GC_PROBE'], 'w').write(str(gc.isenabled())))\n"
    )
    exe = Path(sys.executable).parent / "columnhub"
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec(primary[:1], chunk_size=1000)))
    seen = {}
    for name, args in {
        "deliver": ["deliver", str(spec_file), "-o", str(tmp_path / "out"), "--no-progress"],
        "cache": ["cache", "stats", "--cache", str(tmp_path / "cache")],
    }.items():
        env = {
            **os.environ,
            "GC_PROBE": str(tmp_path / f"gc-{name}"),
            "PYTHONPATH": os.pathsep.join([str(probe), os.environ.get("PYTHONPATH", "")]),
            "COLUMNHUB_CACHE": str(tmp_path / "cache"),
        }
        subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, check=True)
        seen[name] = (tmp_path / f"gc-{name}").read_text()
    assert seen == {"deliver": "False", "cache": "True"}
    got = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    ref = uproot_reference(primary[:1], ["MET_pt"], None)
    assert got.column("MET_pt").to_pylist() == ak.to_list(ref["MET_pt"])


def test_event_numbers_are_delta_encoded_and_read_back_by_other_readers(
    primary: list[Path], tmp_path: Path
) -> None:
    """64-bit key columns are written DELTA_BINARY_PACKED (a dictionary is built and
    abandoned for unique event numbers), small integers keep their dictionary, floats
    BYTE_STREAM_SPLIT; pyarrow and DuckDB read the values uproot reads."""
    duckdb = pytest.importorskip("duckdb")
    result = columnhub.deliver(spec(primary), output=tmp_path / "out", cache=False)
    path = result.files[0]
    meta = pq.ParquetFile(path).metadata
    encodings = {
        meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i).encodings
        for i in range(meta.num_columns)
    }
    assert "DELTA_BINARY_PACKED" in encodings["event"]
    assert "RLE_DICTIONARY" not in encodings["event"]
    assert "RLE_DICTIONARY" in encodings["run"]
    assert "BYTE_STREAM_SPLIT" in encodings["MET_pt"]
    ref = uproot_reference(primary, [*KEYS, "MET_pt"], None)
    got = pa.concat_tables(pq.read_table(f) for f in result.files)
    for name in [*KEYS, "MET_pt"]:
        assert got.column(name).to_pylist() == ak.to_list(ref[name]), name
    files = [str(f) for f in result.files]
    events = duckdb.sql(f"SELECT event FROM read_parquet({files!r})").fetchnumpy()["event"]
    assert events.tolist() == ak.to_list(ref["event"])
