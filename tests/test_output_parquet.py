"""The Parquet part writer: encodings, readers, part order and sizes."""

from __future__ import annotations

from pathlib import Path

import awkward as ak
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uproot

import columnhub
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
        {"dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
         "columns": columns, "where": "nJet >= 2"},
        output=tmp_path / "out", workers=2, progress=False, cache=False,
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
        "x", "jagged.list.element", "nested.list.element.list.element", "rec.a"
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
