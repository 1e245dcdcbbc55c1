"""The Parquet part writer: encodings, readers, part order and sizes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import awkward as ak
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uproot
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import columnhub
from columnhub.errors import OutputError
from columnhub.output.parquet import PartWriter, float_leaves

KEYS = ["run", "luminosityBlock", "event"]


def encodings(path: Path) -> dict[str, tuple[str, ...]]:
    """Parquet column path -> the encodings of its chunk in the first row group."""
    row_group = pq.ParquetFile(path).metadata.row_group(0)
    return {
        row_group.column(i).path_in_schema: row_group.column(i).encodings
        for i in range(row_group.num_columns)
    }


def test_float_leaves_are_byte_stream_split(shared_data: Path, tmp_path: Path) -> None:
    columns = ["MET_pt", "nJet", "Jet_pt", "Jet_eta", "Muon_pt"]
    result = columnhub.deliver(
        {
            "dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
            "columns": columns,
            "where": "nJet >= 2",
        },
        output=tmp_path / "out",
        workers=2,
        progress=False,
        cache=False,
    )
    got = encodings(result.files[0])
    for path in ("MET_pt", "Jet_pt.list.element", "Jet_eta.list.element", "Muon_pt.list.element"):
        assert "BYTE_STREAM_SPLIT" in got[path], path
        assert "RLE_DICTIONARY" not in got[path], path
    for path in ("run", "luminosityBlock", "event", "nJet"):  # integers: dictionary, as before
        assert "BYTE_STREAM_SPLIT" not in got[path], path
        assert "RLE_DICTIONARY" in got[path], path

    # every reader in the package, and common outside ones, read it back unchanged
    tree = uproot.open(shared_data / "nano_tt_v12.root")["Events"]
    ref = tree.arrays(KEYS + columns, cut="nJet >= 2")
    arrays = result.to_awkward()
    for name in KEYS + columns:
        assert ak.to_list(arrays[name]) == ak.to_list(ref[name]), name
    frame = result.to_pandas()
    assert np.array_equal(frame["MET_pt"].to_numpy(), ref["MET_pt"].to_numpy())
    assert ak.to_list(ak.from_parquet(result.files[0])["Jet_pt"]) == ak.to_list(ref["Jet_pt"])
    pytest.importorskip("dask_awkward")
    lazy = result.to_dask()
    assert ak.to_list(lazy["Jet_eta"].compute()) == ak.to_list(ref["Jet_eta"])


def test_byte_stream_split_reaches_nested_float_leaves(tmp_path: Path) -> None:
    table = pa.table(
        {
            "n": pa.array([1, 2, 3], pa.int64()),
            "x": pa.array([1.5, 2.5, None], pa.float64()),
            "jagged": pa.array([[1.0], [], [2.0, 3.0]], pa.list_(pa.float32())),
            "nested": pa.array([[[1.0]], [[2.0, 3.0], []], []], pa.list_(pa.list_(pa.float64()))),
            "rec": pa.array(
                [{"a": 1.0, "b": 1}, {"a": None, "b": 2}, {"a": 3.0, "b": 3}],
                pa.struct([("a", pa.float32()), ("b", pa.int32())]),
            ),
            "half": pa.array(np.array([1, 2, 3], np.float16())),
            "text": pa.array(["a", "b", "c"]),
        }
    )
    assert float_leaves(table.schema) == [
        "x",
        "jagged.list.element",
        "nested.list.element.list.element",
        "rec.a",
    ]
    writer = PartWriter(tmp_path, target_bytes=1 << 20)
    writer.write(table)
    [part] = writer.close()
    got = encodings(tmp_path / part.name)
    for path in float_leaves(table.schema):
        assert "BYTE_STREAM_SPLIT" in got[path], path
    for path in ("n", "rec.b", "half", "text"):
        assert "BYTE_STREAM_SPLIT" not in got[path], path
    assert pq.read_table(tmp_path / part.name).equals(table)


@pytest.mark.parametrize("reader", ["polars", "duckdb"])
def test_other_readers_read_byte_stream_split(tmp_path: Path, reader: str) -> None:
    table = pa.table(
        {
            "event": pa.array([1, 2, 3], pa.uint64()),
            "MET_pt": pa.array([10.5, 20.25, 30.125], pa.float32()),
            "Jet_pt": pa.array([[1.5], [], [2.5, 3.5]], pa.list_(pa.float32())),
        }
    )
    writer = PartWriter(tmp_path, target_bytes=1 << 20)
    writer.write(table)
    [part] = writer.close()
    path = str(tmp_path / part.name)
    if reader == "polars":
        pl = pytest.importorskip("polars")
        got = pl.read_parquet(path).to_dict(as_series=False)
    else:
        duckdb = pytest.importorskip("duckdb")
        rows = duckdb.sql(f"SELECT event, MET_pt, Jet_pt FROM '{path}'").fetchall()
        got = {k: [r[i] for r in rows] for i, k in enumerate(("event", "MET_pt", "Jet_pt"))}
    assert got == table.to_pydict()


# -- parts: order, sizes, parallel encoding, errors ----------------------------


def make_tables(sizes: list[int], seed: int = 0) -> list[pa.Table]:
    """Tables shaped like a delivery's chunks (keys, a flat float, a jagged float)."""
    rng = np.random.default_rng(seed)
    tables, start = [], 0
    for n in sizes:
        counts = rng.integers(0, 6, n)
        jagged = pa.ListArray.from_arrays(
            pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)),
            pa.array(rng.exponential(30, int(counts.sum())).astype(np.float32)),
        )
        tables.append(
            pa.table(
                {
                    "event": pa.array(np.arange(start, start + n, dtype=np.uint64)),
                    "MET_pt": pa.array(rng.exponential(40, n).astype(np.float32)),
                    "Jet_pt": jagged,
                }
            )
        )
        start += n
    return tables


def write_all(directory: Path, tables: list[pa.Table], **options: object) -> list:
    directory.mkdir(parents=True, exist_ok=True)
    writer = PartWriter(directory, **options)  # type: ignore[arg-type]
    for table in tables:
        writer.write(table)
    return writer.close()


def read_parts(directory: Path, parts: list) -> pa.Table:
    return pa.concat_tables([pq.read_table(directory / p.name) for p in parts])


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("columnhub-parquet")]


def test_parts_come_in_order_and_match_uproot(shared_data: Path, tmp_path: Path) -> None:
    columns = ["MET_pt", "Jet_pt", "Jet_eta", "Muon_pt", "nJet"]
    request = {
        "dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
        "columns": columns,
        "chunk_size": 7,
        "output": {"target_part_bytes": 5_000},
    }
    result = columnhub.deliver(request, output=tmp_path / "out", workers=3, cache=False)
    assert len(result.files) > 3
    assert [f.name for f in result.files] == [
        f"part-{i:05d}.parquet" for i in range(len(result.files))
    ]
    ref = uproot.open(shared_data / "nano_tt_v12.root")["Events"].arrays(KEYS + columns)
    got = result.to_awkward()
    for name in KEYS + columns:
        assert ak.to_list(got[name]) == ak.to_list(ref[name]), name
    rows = [pq.ParquetFile(f).metadata.num_rows for f in result.files]
    assert rows == [p["rows"] for p in result.manifest["parts"]]
    assert sum(rows) == result.events
    assert not list((tmp_path / "out").glob(".*"))
    assert not writer_threads()


def test_workers_give_byte_identical_parts(shared_data: Path, tmp_path: Path) -> None:
    request = {
        "dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
        "columns": ["Jet_pt", "Jet_eta", "MET_pt"],
        "where": "nJet >= 1",
        "chunk_size": 5,
        "output": {"target_part_bytes": 4_000},
    }
    one = columnhub.deliver(request, output=tmp_path / "one", workers=1, cache=False)
    four = columnhub.deliver(request, output=tmp_path / "four", workers=4, cache=False)
    assert len(one.files) > 3
    assert [(p["name"], p["rows"], p["xxh3"]) for p in one.manifest["parts"]] == [
        (p["name"], p["rows"], p["xxh3"]) for p in four.manifest["parts"]
    ]
    for a, b in zip(one.files, four.files, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_parts_encode_in_parallel_and_never_depend_on_timing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tables = make_tables([300] * 40)
    fast = write_all(tmp_path / "fast", tables, target_bytes=20_000, threads=3)
    import columnhub.output.parquet as module

    encode = module._encode
    lock = threading.Lock()
    busy = [0]
    overlap: list[int] = []
    rng = np.random.default_rng(1)

    def slow(table: pa.Table, *args: object) -> object:  # encoders finish out of order
        with lock:
            busy[0] += 1
            overlap.append(busy[0])
        time.sleep(float(rng.uniform(0, 0.01)))
        try:
            return encode(table, *args)  # type: ignore[arg-type]
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(module, "_encode", slow)
    slow_parts = write_all(tmp_path / "slow", tables, target_bytes=20_000, threads=3, queued=6)
    one = write_all(tmp_path / "one", tables, target_bytes=20_000, threads=1)
    assert len(fast) > 4
    assert max(overlap) == 3  # three tables encoded at once, never more
    for parts in (slow_parts, one):
        assert [(p.name, p.rows, p.xxh3) for p in parts] == [(p.name, p.rows, p.xxh3) for p in fast]
    assert read_parts(tmp_path / "slow", slow_parts).equals(pa.concat_tables(tables))
    assert all(p.bytes >= 20_000 for p in fast[:-1])  # cut at the real size
    assert not writer_threads()


def test_queued_tables_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import columnhub.output.parquet as module

    gate = threading.Event()
    encode = module._encode

    def blocked(table: pa.Table, *args: object) -> object:
        gate.wait()
        return encode(table, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "_encode", blocked)
    writer = PartWriter(tmp_path, target_bytes=1 << 20, threads=1, queued=2)
    tables = make_tables([10] * 5)
    done = threading.Event()

    def drive() -> None:
        for table in tables:
            writer.write(table)
        done.set()

    driver = threading.Thread(target=drive)
    driver.start()
    # two tables queued: the third write() waits for the oldest to be encoded
    assert not done.wait(0.3)
    gate.set()
    driver.join(5)
    assert done.is_set()
    parts = writer.close()
    assert read_parts(tmp_path, parts).equals(pa.concat_tables(tables))


@pytest.mark.parametrize("failing", [0, 5])  # the first table, a later one
def test_encoding_error_surfaces_and_leaves_nothing(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    import columnhub.output.parquet as module

    encode = module._encode
    calls = []

    def broken(table: pa.Table, *args: object) -> object:
        calls.append(table)
        if len(calls) == failing + 1:
            msg = "disk on fire"
            raise OSError(msg)
        return encode(table, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "_encode", broken)
    request = {
        "dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
        "columns": ["Jet_pt", "MET_pt"],
        "chunk_size": 5,
        "output": {"target_part_bytes": 3_000},
    }
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk on fire"):
        columnhub.deliver(request, output=out, workers=2, cache=False)
    assert calls
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False
    assert "disk on fire" in manifest["error"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # no part, no temp file
    assert not writer_threads()


def test_error_in_a_later_part_raises_from_write_or_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import columnhub.output.parquet as module

    encode = module._encode
    calls = [0]

    def broken(table: pa.Table, *args: object) -> object:
        calls[0] += 1
        if calls[0] == 12:
            msg = "bad block"
            raise OSError(msg)
        return encode(table, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "_encode", broken)
    writer = PartWriter(tmp_path, target_bytes=10_000)

    def write_then_close() -> None:
        for table in make_tables([200] * 30):
            writer.write(table)
        writer.close()

    with pytest.raises(OSError, match="bad block"):
        write_then_close()
    writer.abort()
    assert not list(tmp_path.glob(".*"))  # the temporary file of the unfinished part is gone
    names = [p.name for p in writer.parts]  # finished ones stay, listed
    assert len(names) >= 1
    assert names == [f"part-{i:05d}.parquet" for i in range(len(names))]
    assert sorted(f.name for f in tmp_path.iterdir()) == names
    assert not writer_threads()


def test_abort_deletes_unfinished_parts(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path, target_bytes=15_000)
    for table in make_tables([200] * 20):
        writer.write(table)
    writer.abort()
    assert not list(tmp_path.glob(".*"))
    assert not writer_threads()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [p.name for p in writer.parts]  # finished parts stay, listed


def test_empty_writer_has_its_columns(tmp_path: Path) -> None:
    [empty] = make_tables([0])
    parts = write_all(tmp_path, [empty, empty], target_bytes=1_000)
    assert [p.rows for p in parts] == [0]
    assert pq.read_table(tmp_path / parts[0].name).schema == empty.schema
    assert write_all(tmp_path / "none", [], target_bytes=1_000) == []


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(0, 400), max_size=25),
    target=st.integers(1, 40_000),
    threads=st.integers(1, 3),
    queued=st.integers(1, 4),
    compression=st.sampled_from(["zstd", "none"]),
)
@example(sizes=[0, 1], target=1, threads=1, queued=1, compression="zstd")  # an empty chunk first
def test_parts_concatenate_to_the_input(
    tmp_path_factory: pytest.TempPathFactory,
    sizes: list[int],
    target: int,
    threads: int,
    queued: int,
    compression: str,
) -> None:
    directory = tmp_path_factory.mktemp("parts")
    tables = make_tables(sizes, seed=len(sizes))
    parts = write_all(
        directory,
        tables,
        target_bytes=target,
        threads=threads,
        queued=queued,
        compression=compression,
    )
    if not tables:
        assert parts == []
        return
    got = read_parts(directory, parts)
    assert got.equals(pa.concat_tables(tables))
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(len(parts))]
    assert sorted(f.name for f in directory.iterdir()) == [p.name for p in parts]
    assert all(p.rows > 0 for p in parts) or len(parts) == 1
    assert all(p.bytes >= target for p in parts[:-1])
    assert not writer_threads()


def test_aborted_writer_writes_nothing_more(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path, target_bytes=1 << 20)
    writer.write(make_tables([10])[0])
    writer.abort()
    with pytest.raises(OutputError, match="aborted"):
        writer.write(make_tables([10])[0])
    with pytest.raises(OutputError, match="aborted"):
        writer.close()
    assert not list(tmp_path.iterdir())
