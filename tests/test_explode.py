"""``output.explode``: one output row per object instead of one per event.

Each delivery is compared with a direct uproot (or pyarrow) read of the
inputs, selected and flattened with awkward in the test.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uproot
from hypothesis import given, settings
from hypothesis import strategies as st

import columnhub
from columnhub.errors import JoinError, SpecError


def _spec(path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "dataset": {"files": [str(path)]},
        "columns": ["Jet_pt", "Jet_eta", "central"],
        "define": {"central": "abs(Jet_eta) < 2.4"},
        "where": "MET_pt > 20",
        "chunk_size": 100,
        "output": {"explode": True, **extra},
    }


def _reference(path: Path) -> dict[str, np.ndarray]:
    """Direct uproot read, the event selection and the flatten done here."""
    with uproot.open(path) as f:
        events = f["Events"].arrays(["Jet_pt", "Jet_eta", "MET_pt"])
    events = events[events.MET_pt > 20]
    return {
        "Jet_pt": ak.to_numpy(ak.flatten(events.Jet_pt)),
        "Jet_eta": ak.to_numpy(ak.flatten(events.Jet_eta)),
        "central": ak.to_numpy(ak.flatten(abs(events.Jet_eta) < 2.4)),
        "events": np.asarray(len(events)),
    }


def test_explode_is_the_flattened_selection(shared_data: Path, tmp_path: Path) -> None:
    tt = shared_data / "nano_tt_v12.root"
    result = columnhub.deliver(_spec(tt), output=tmp_path / "out")
    want = _reference(tt)
    got = result.to_awkward()
    assert got.fields == ["Jet_pt", "Jet_eta", "central"]  # no keys, no nJet counter
    for name in got.fields:
        assert ak.to_numpy(got[name]).tolist() == want[name].tolist(), name
    manifest = result.manifest
    assert manifest["events"] == int(want["events"])  # events stay events
    assert sum(p["rows"] for p in manifest["parts"]) == len(want["Jet_pt"])  # rows are objects
    assert manifest["keys"] == []
    assert sum(c["rows_out"] for c in manifest["chunks"]) == int(want["events"])


def test_explode_in_memory_arrays(shared_data: Path) -> None:
    """columnhub.arrays (no files) explodes as deliver does."""
    tt = shared_data / "nano_tt_v12.root"
    got = columnhub.arrays(_spec(tt))
    want = _reference(tt)
    assert got.fields == ["Jet_pt", "Jet_eta", "central"]
    for name in got.fields:
        assert ak.to_numpy(got[name]).tolist() == want[name].tolist(), name


def test_explode_root_output(shared_data: Path, tmp_path: Path) -> None:
    dy = shared_data / "nano_dy.root"
    result = columnhub.deliver(_spec(dy, format="root"), output=tmp_path / "out")
    want = _reference(dy)
    got = {name: [] for name in ("Jet_pt", "Jet_eta", "central")}
    for part in result.files:
        with uproot.open(part) as f:
            tree = f["Events"]
            names = tree.keys()  # uproot: names (iterating gives the branches)
            assert not [b for b in names if b.startswith("n")]  # flat: no counters
            arrays = tree.arrays(list(got), library="np")
        for name in got:
            got[name] += arrays[name].tolist()
    for name, values in got.items():
        assert values == want[name].tolist(), name


def test_explode_is_part_of_the_request_hash(shared_data: Path, tmp_path: Path) -> None:
    """The per-event result in the cache is never served for the exploded request."""
    tt = shared_data / "nano_tt_v12.root"
    per_event = {**_spec(tt), "output": {}}
    assert (
        columnhub.Request.from_dict(per_event).hash != columnhub.Request.from_dict(_spec(tt)).hash
    )
    assert "explode" not in columnhub.Request.from_dict(per_event).canonical()["output"]
    cache = tmp_path / "cache"
    first = columnhub.deliver(per_event, cache=cache)
    again = columnhub.deliver(_spec(tt), cache=cache)
    assert len(first.to_awkward()) == int(_reference(tt)["events"])
    assert len(again.to_awkward()) == len(_reference(tt)["Jet_pt"])


def test_explode_refuses_two_collections(shared_data: Path, tmp_path: Path) -> None:
    spec = {**_spec(shared_data / "nano_tt_v12.root"), "columns": ["Jet_pt", "Muon_pt"]}
    with pytest.raises(JoinError, match=r"'Jet_pt' and 'Muon_pt' have \d+ and \d+ objects"):
        columnhub.deliver(spec, output=tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_explode_refuses_per_event_columns(shared_data: Path, tmp_path: Path) -> None:
    spec = {**_spec(shared_data / "nano_tt_v12.root"), "columns": ["Jet_pt", "MET_pt"]}
    with pytest.raises(SpecError, match="MET_pt hold one value per event"):
        columnhub.deliver(spec, output=tmp_path / "out")


_jagged = st.lists(st.lists(st.floats(0, 100, width=32), max_size=4), min_size=1, max_size=40)


@settings(deadline=None)
@given(events=_jagged, cut=st.integers(0, 100), chunk=st.integers(1, 50), data=st.data())
def test_explode_equals_flatten_of_the_selection(
    events: list[list[float]], cut: int, chunk: int, data: st.DataObject
) -> None:
    """Random jagged Parquet: the exploded output is ak.flatten of the selected events."""
    n = len(events)
    met = data.draw(st.lists(st.floats(0, 100, width=32), min_size=n, max_size=n))
    phi = [[x / 10 for x in row] for row in events]
    table = pa.table(
        {
            "run": pa.array(np.ones(n, dtype=np.uint32)),
            "luminosityBlock": pa.array(np.ones(n, dtype=np.uint32)),
            "event": pa.array(np.arange(n, dtype=np.uint64)),
            "MET_pt": pa.array(met, pa.float32()),
            "Jet_pt": pa.array(events, pa.list_(pa.float32())),
            "Jet_phi": pa.array(phi, pa.list_(pa.float32())),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.parquet"
        pq.write_table(table, path, row_group_size=max(1, n // 3))
        spec = {
            "dataset": {"files": [str(path)]},
            "columns": ["Jet_pt", "Jet_phi", "hard"],
            "define": {"hard": f"Jet_pt > {cut}"},  # exact in float32
            "where": f"MET_pt > {cut}",
            "chunk_size": chunk,
            "output": {"explode": True},
        }
        result = columnhub.deliver(spec, output=Path(tmp) / "out")
        got = result.to_awkward() if result.files else None
        events_out = result.manifest["events"]
    ref = ak.from_arrow(table)
    ref = ref[ref.MET_pt > cut]
    assert events_out == len(ref)
    want = {
        "Jet_pt": ak.flatten(ref.Jet_pt).tolist(),
        "Jet_phi": ak.flatten(ref.Jet_phi).tolist(),
        "hard": ak.flatten(ref.Jet_pt > cut).tolist(),
    }
    for name, values in want.items():
        assert (got[name].tolist() if got is not None and len(got) else []) == values, name
