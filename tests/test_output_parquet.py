"""The Parquet part writer: encodings, readers, part order, atomic parts."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import awkward as ak
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uproot

import columnhub
from columnhub.errors import OutputError
from columnhub.output.parquet import ParquetPart, float_leaves

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
    for path in ("run", "luminosityBlock", "nJet"):  # narrow integers: dictionary, as before
        assert "BYTE_STREAM_SPLIT" not in got[path], path
        assert "RLE_DICTIONARY" in got[path], path
    # 64-bit event numbers (unique, nearly sorted): deltas, never a dictionary
    assert "DELTA_BINARY_PACKED" in got["event"]
    assert "RLE_DICTIONARY" not in got["event"]

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
    writer = ParquetPart(tmp_path, 0, schema=table.schema)
    writer.write(table)
    part = writer.close()
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
    writer = ParquetPart(tmp_path, 0, schema=table.schema)
    writer.write(table)
    part = writer.close()
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


def part_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("columnhub-part")]


def test_parts_come_in_order_and_match_uproot(shared_data: Path, tmp_path: Path) -> None:
    columns = ["MET_pt", "Jet_pt", "Jet_eta", "Muon_pt", "nJet"]
    request = {
        "dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
        "columns": columns,
        "chunk_size": 7,
        "output": {"target_part_bytes": 1_500},
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
    assert not part_threads()


def test_workers_give_byte_identical_parts(shared_data: Path, tmp_path: Path) -> None:
    request = {
        "dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
        "columns": ["Jet_pt", "Jet_eta", "MET_pt"],
        "where": "nJet >= 1",
        "chunk_size": 5,
        "output": {"target_part_bytes": 1_000},
    }
    one = columnhub.deliver(request, output=tmp_path / "one", workers=1, cache=False)
    four = columnhub.deliver(request, output=tmp_path / "four", workers=4, cache=False)
    assert len(one.files) > 3
    assert [(p["name"], p["rows"], p["xxh3"]) for p in one.manifest["parts"]] == [
        (p["name"], p["rows"], p["xxh3"]) for p in four.manifest["parts"]
    ]
    for a, b in zip(one.files, four.files, strict=True):
        assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("failing", [0, 5])  # the first table, a later one
def test_encoding_error_surfaces_and_leaves_nothing(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    write = ParquetPart.write
    calls = []
    lock = threading.Lock()

    def broken(self: ParquetPart, table: pa.Table) -> None:  # a write that fails (disk)
        with lock:
            calls.append(table)
            fail = len(calls) == failing + 1
        if fail:
            msg = "disk on fire"
            raise OSError(msg)
        write(self, table)

    monkeypatch.setattr(ParquetPart, "write", broken)
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
    assert not part_threads()


def test_a_part_is_written_atomically_and_abort_leaves_nothing(tmp_path: Path) -> None:
    tables = make_tables([50, 0, 70])
    writer = ParquetPart(tmp_path, 3, schema=tables[0].schema)
    for table in tables:
        writer.write(table)
    assert [p.name for p in tmp_path.iterdir()][0].startswith(".part-00003.parquet.tmp-")
    info = writer.close()
    assert info.name == "part-00003.parquet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00003.parquet"]
    assert pq.read_table(tmp_path / info.name).equals(pa.concat_tables(tables))
    assert info.rows == 120
    assert pq.ParquetFile(tmp_path / info.name).metadata.num_row_groups == 2  # one per table

    other = ParquetPart(tmp_path / "..", 0, schema=tables[0].schema)
    other.write(tables[0])
    other.abort()
    with pytest.raises(OutputError, match="closed or aborted"):
        other.write(tables[0])
    assert not list(tmp_path.parent.glob(".part-*"))


def test_an_empty_part_has_its_columns(tmp_path: Path) -> None:
    [empty] = make_tables([0])
    info = ParquetPart(tmp_path, 0, schema=empty.schema).close()
    assert info.rows == 0
    assert pq.read_table(tmp_path / info.name).schema == empty.schema


def test_a_retried_part_replaces_its_own_file_only(tmp_path: Path) -> None:
    first, second = make_tables([40, 60], seed=3)
    ParquetPart(tmp_path, 1, schema=first.schema).close()  # a neighbour, untouched
    neighbour = (tmp_path / "part-00001.parquet").read_bytes()
    for _ in range(2):  # the same task twice (a retry): one file, the same bytes
        writer = ParquetPart(tmp_path, 0, schema=first.schema)
        writer.write(first)
        writer.write(second)
        info = writer.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["part-00000.parquet", "part-00001.parquet"]
    assert (tmp_path / "part-00001.parquet").read_bytes() == neighbour
    assert pq.read_table(tmp_path / info.name).equals(pa.concat_tables([first, second]))
