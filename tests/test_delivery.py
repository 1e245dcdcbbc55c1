"""Delivery against an independent reference: direct uproot + awkward reads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import awkward as ak
import numpy as np
import pyarrow.parquet as pq
import pytest
import uproot
from hypothesis import given, settings
from hypothesis import strategies as st

import columnhub
from columnhub.errors import (
    ColumnNotFoundError,
    CorruptFileError,
    DatasetFileNotFoundError,
    ExpressionError,
    OutputError,
    SpecError,
    TreeNotFoundError,
)
from columnhub.plan import MAX_BASKET_SPLIT, split_entries

SAMPLES = ["nano_dy.root", "nano_dimuon.root", "nano_tt_v12.root"]
KEYS = ["run", "luminosityBlock", "event"]


def events(path: Path, branches: list[str]) -> dict[str, ak.Array]:
    tree = uproot.open(path)["Events"]
    return {b: tree[b].array() for b in branches}


def deliver(shared_data: Path, tmp_path: Path, name: str, **spec: object) -> columnhub.Result:
    request = {"dataset": {"name": name, "files": [str(shared_data / name)]}, **spec}
    return columnhub.deliver(
        request, output=tmp_path / "out", workers=2, progress=False, cache=tmp_path / "cache"
    )


def assert_columns_equal(got: ak.Array, want: dict[str, ak.Array]) -> None:
    for name, array in want.items():
        assert ak.to_list(got[name]) == ak.to_list(array), name


@pytest.mark.parametrize("sample", SAMPLES)
def test_raw_columns_match_uproot(shared_data: Path, tmp_path: Path, sample: str) -> None:
    columns = ["MET_pt", "nJet", "Jet_pt", "Jet_eta", "Muon_pt"]
    result = deliver(shared_data, tmp_path, sample, columns=columns, chunk_size=7)
    # the Muon collection's counter comes with it, just before it (as NanoAOD has it)
    columns = ["MET_pt", "nJet", "Jet_pt", "Jet_eta", "nMuon", "Muon_pt"]
    ref = events(shared_data / sample, KEYS + columns)
    got = result.to_awkward()
    assert got.fields == KEYS + columns
    assert "?" not in str(got.type)  # types as in the file: no option types made up
    assert_columns_equal(got, ref)
    m = result.manifest
    assert m["complete"] is True
    assert m["events"] == len(ref["event"]) == m["events_read"]
    assert sum(c["rows_in"] for c in m["chunks"]) == m["events_read"]
    assert [c["entry_start"] for c in m["chunks"]][0] == 0
    assert set(m["columns"]) == set(KEYS + columns)
    assert m["cache"]["hits"] == 0  # cold: every column chunk computed once
    assert m["cache"]["misses"] == len(KEYS + columns) * len(m["chunks"])


@pytest.mark.parametrize("sample", SAMPLES)
def test_selection_and_definitions_match_reference(
    shared_data: Path, tmp_path: Path, sample: str
) -> None:
    result = deliver(
        shared_data,
        tmp_path,
        sample,
        columns=["MET_pt", "goodjets", "ht", "lead", "nmu", "dphi"],
        define={
            "goodjets": "Jet_pt[(Jet_pt > 25) & (abs(Jet_eta) < 2.4)]",
            "ht": "sum(goodjets)",
            "lead": "Jet_pt[:, 0]",
            "nmu": "num(Muon_pt)",
            "dphi": "abs(delta_phi(MET_phi, Jet_phi[:, 0]))",
        },
        where="(nJet >= 2) & (MET_pt > 20)",
        chunk_size=13,
    )
    r = events(
        shared_data / sample,
        [*KEYS, "MET_pt", "MET_phi", "nJet", "Jet_pt", "Jet_eta", "Jet_phi", "Muon_pt"],
    )
    mask = (r["nJet"] >= 2) & (r["MET_pt"] > 20)
    good = r["Jet_pt"][(r["Jet_pt"] > 25) & (abs(r["Jet_eta"]) < 2.4)][mask]
    dphi = np.abs((r["MET_phi"][mask] - r["Jet_phi"][mask][:, 0] + np.pi) % (2 * np.pi) - np.pi)
    got = result.to_awkward()
    assert_columns_equal(
        got,
        {
            "event": r["event"][mask],
            "MET_pt": r["MET_pt"][mask],
            "goodjets": good,
            "nmu": ak.num(r["Muon_pt"][mask]),
        },
    )
    assert np.allclose(got["ht"].to_numpy(), ak.sum(good, axis=1).to_numpy())
    assert np.allclose(got["lead"].to_numpy(), r["Jet_pt"][mask][:, 0].to_numpy())
    assert np.allclose(got["dphi"].to_numpy(), dphi.to_numpy(), atol=1e-5)


def test_dimuon_mass_matches_direct_formula(shared_data: Path, tmp_path: Path) -> None:
    sample = "nano_dimuon.root"
    result = deliver(
        shared_data,
        tmp_path,
        sample,
        columns=["mmumu"],
        define={
            "mmumu": "mass(Muon_pt[:, :2], Muon_eta[:, :2], Muon_phi[:, :2], Muon_mass[:, :2])"
        },
        where="nMuon >= 2",
    )
    r = events(shared_data / sample, ["nMuon", "Muon_pt", "Muon_eta", "Muon_phi", "Muon_mass"])
    sel = r["nMuon"] >= 2
    pt, eta, phi, m = (r[f"Muon_{v}"][sel][:, :2] for v in ("pt", "eta", "phi", "mass"))
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    e = np.sqrt(px**2 + py**2 + pz**2 + m**2)
    sums = [ak.sum(x, axis=1) for x in (e, px, py, pz)]
    want = np.sqrt(np.maximum(sums[0] ** 2 - sums[1] ** 2 - sums[2] ** 2 - sums[3] ** 2, 0))
    got = result.to_awkward()["mmumu"].to_numpy()
    assert len(got) == int(ak.sum(sel))
    assert np.allclose(got, ak.to_numpy(want), rtol=1e-4)


def test_parts_are_sized_by_bytes_and_workers_agree(shared_data: Path, tmp_path: Path) -> None:
    request = {
        "dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
        "columns": ["Jet_pt", "Jet_eta", "MET_pt"],
        "chunk_size": 10,
        "output": {"target_part_bytes": 6_000, "compression": "none"},
    }
    one = columnhub.deliver(request, output=tmp_path / "one", workers=1, cache=False)
    four = columnhub.deliver(request, output=tmp_path / "four", workers=4, cache=False)
    assert len(one.files) > 1
    assert len(one.files) < len(one.manifest["chunks"])  # parts are not one per chunk
    for p in one.manifest["parts"][:-1]:
        assert p["bytes"] >= 6_000
    assert ak.to_list(one.to_awkward()) == ak.to_list(four.to_awkward())
    assert [f.name for f in one.files] == [f.name for f in four.files]
    for a, b in zip(one.files, four.files, strict=True):
        assert pq.read_table(a).equals(pq.read_table(b))
    assert not list((tmp_path / "one").glob(".*"))  # no temporary files left


def test_several_files_and_globs(shared_data: Path, tmp_path: Path) -> None:
    for name in ("nano_dy.root", "nano_dimuon.root"):
        shutil.copy(shared_data / name, tmp_path / name)
    result = columnhub.deliver(
        {"dataset": {"name": "both", "files": [str(tmp_path / "nano_d*.root")]},
         "columns": ["MET_pt"]},
        output=tmp_path / "out",
        progress=False,
    )
    want = np.concatenate(
        [uproot.open(tmp_path / n)["Events"]["MET_pt"].array(library="np")
         for n in ("nano_dimuon.root", "nano_dy.root")]
    )
    assert np.array_equal(result.to_awkward()["MET_pt"].to_numpy(), want)
    assert {c["file"] for c in result.manifest["chunks"]} == {
        str((tmp_path / n).resolve()) for n in ("nano_dimuon.root", "nano_dy.root")
    }


def test_root_output_roundtrip(shared_data: Path, tmp_path: Path) -> None:
    result = deliver(
        shared_data,
        tmp_path,
        "nano_tt_v12.root",
        columns=["MET_pt", "Jet_pt"],
        where="MET_pt > 40",
        output={"format": "root"},
    )
    tree = uproot.open(result.files[0])["Events"]
    ref = events(shared_data / "nano_tt_v12.root", ["MET_pt", "Jet_pt"])
    mask = ref["MET_pt"] > 40
    assert ak.to_list(tree["Jet_pt"].array()) == ak.to_list(ref["Jet_pt"][mask])
    assert ak.to_list(tree["MET_pt"].array()) == ak.to_list(ref["MET_pt"][mask])


def test_empty_selection_still_has_columns(shared_data: Path, tmp_path: Path) -> None:
    result = deliver(
        shared_data, tmp_path, "nano_dy.root", columns=["Jet_pt"], where="MET_pt < 0"
    )
    assert result.events == 0
    table = result.to_arrow()
    assert table.num_rows == 0
    assert table.column_names == [*KEYS, "nJet", "Jet_pt"]


# -- spec ---------------------------------------------------------------------


def test_yaml_json_python_build_the_same_request(tmp_path: Path) -> None:
    data = {
        # absolute: relative paths in a spec file are relative to its folder
        "dataset": {"name": "d", "files": [str(tmp_path / "b.root"), str(tmp_path / "a.root")]},
        "columns": ["x"],
        "define": {"x": "Jet_pt[Jet_pt>30]"},
        "where": "MET_pt>3",
    }
    spaced = {
        **data,
        "dataset": {"name": "d", "files": [str(tmp_path / "a.root"), str(tmp_path / "b.root")]},
        "define": {"x": "Jet_pt[ Jet_pt > 30 ]"},
        "where": " MET_pt >  3",
    }
    (tmp_path / "r.json").write_text(json.dumps(data))
    (tmp_path / "r.yaml").write_text(columnhub.Request.from_dict(spaced).to_yaml())
    hashes = {
        columnhub.Request.from_dict(data).hash,
        columnhub.Request.from_dict(spaced).hash,
        columnhub.load_request(tmp_path / "r.json").hash,
        columnhub.load_request(tmp_path / "r.yaml").hash,
    }
    assert len(hashes) == 1
    other = columnhub.Request.from_dict({**data, "where": "MET_pt > 4"})
    assert other.hash not in hashes
    with pytest.raises(Exception, match="frozen"):
        other.columns = ("y",)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"dataset": {"name": "d", "files": ["a"]}}, "columns: required"),
        ({"dataset": {"name": "d", "files": ["a"]}, "columns": ["x"], "colums": 1}, "colums"),
        ({"dataset": {"name": "d", "files": []}, "columns": ["x"]}, "dataset.files"),
        ({"dataset": {"name": "d", "files": ["a"]}, "columns": ["x"], "where": "x >"}, "where"),
        ({"dataset": {"name": "d", "files": ["a"]}, "columns": ["x", "x"]}, "twice"),
        ({"dataset": {"name": "d", "files": ["a"]}, "columns": ["x"], "chunk_size": 0}, "chunk"),
    ],
)
def test_invalid_requests_are_named(data: dict[str, object], fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        columnhub.Request.from_dict(data)


@settings(max_examples=200, deadline=None)
@given(
    boundaries=st.lists(st.integers(1, 5_000), min_size=1, max_size=30, unique=True),
    chunk=st.integers(1, 2_000),
)
def test_split_entries_covers_every_entry_once(boundaries: list[int], chunk: int) -> None:
    edges = [0, *sorted(boundaries)]
    ranges = split_entries(edges, chunk)
    assert ranges[0][0] == 0
    assert ranges[-1][1] == edges[-1]
    for (_, hi), (lo, _) in zip(ranges[:-1], ranges[1:], strict=True):
        assert hi == lo
    # at most ``chunk`` entries, unless a basket is cut at the floor (MAX_BASKET_SPLIT pieces)
    for lo, hi in ranges:
        basket = min(e for e in edges if e >= hi) - max(e for e in edges if e <= lo)
        assert 0 < hi - lo <= max(chunk, -(-basket // MAX_BASKET_SPLIT))


# -- bad input ------------------------------------------------------------------


def test_unknown_column_lists_closest_names(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ColumnNotFoundError, match="Jet_pt") as err:
        deliver(shared_data, tmp_path, "nano_dy.root", columns=["Jet_Pt"])
    assert "closest" in str(err.value)
    assert not (tmp_path / "out").exists()  # planning fails before anything is written


def test_bad_expression_points_at_position(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"\^"):
        deliver(shared_data, tmp_path, "nano_dy.root", columns=["x"], define={"x": "Jet_pt +* 2"})
    with pytest.raises(ExpressionError, match="one boolean per event"):
        deliver(shared_data, tmp_path, "nano_dy.root", columns=["MET_pt"], where="Jet_pt > 3")


def test_missing_file_and_tree(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetFileNotFoundError, match="nano_dy.root"):
        columnhub.deliver(
            {"dataset": {"name": "x", "files": [str(shared_data / "nano_dy.rot")]},
             "columns": ["MET_pt"]},
            output=tmp_path / "a",
        )
    with pytest.raises(TreeNotFoundError, match="Events"):
        columnhub.deliver(
            {"dataset": {"name": "x", "files": [str(shared_data / "nano_dy.root")],
                         "tree": "Event"},
             "columns": ["MET_pt"]},
            output=tmp_path / "b",
        )


def test_truncated_file_is_named(shared_data: Path, tmp_path: Path) -> None:
    data = (shared_data / "nano_tt_v12.root").read_bytes()
    bad = tmp_path / "truncated.root"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated.root"):
        columnhub.deliver(
            {"dataset": {"name": "x", "files": [str(bad)]}, "columns": ["Jet_pt", "MET_pt"]},
            output=tmp_path / "out",
        )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] is False
    assert manifest["files"] == []
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_output_directory_that_is_not_ours_is_refused(shared_data: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="not empty"):
        deliver(shared_data, tmp_path, "nano_dy.root", columns=["MET_pt"])
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_redelivery_replaces_previous_result(shared_data: Path, tmp_path: Path) -> None:
    first = deliver(shared_data, tmp_path, "nano_dy.root", columns=["MET_pt"])
    second = deliver(shared_data, tmp_path, "nano_dy.root", columns=["Jet_pt"], where="nJet > 2")
    assert first.directory == second.directory
    assert sorted(p.name for p in second.directory.iterdir()) == sorted(
        ["manifest.json", *second.manifest["files"]]
    )
    assert second.to_awkward().fields == [*KEYS, "nJet", "Jet_pt"]


# -- CLI --------------------------------------------------------------------------


def columnhub_cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "columnhub"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


def test_cli_delivers_and_summarises(shared_data: Path, tmp_path: Path) -> None:
    spec = tmp_path / "req.yaml"
    spec.write_text(
        f"dataset: {{name: tt, files: [{shared_data / 'nano_tt_v12.root'}]}}\n"
        "columns: [MET_pt, ht]\n"
        "define: {ht: 'sum(Jet_pt)'}\n"
        "where: MET_pt > 50\n"
    )
    done = columnhub_cli("deliver", str(spec), "-o", str(tmp_path / "out"), "--chunk-size", "64")
    assert done.returncode == 0, done.stderr
    ref = events(shared_data / "nano_tt_v12.root", ["MET_pt"])["MET_pt"]
    n = int(ak.sum(ref > 50))
    assert f"delivered {n:,} of 200 events" in done.stdout
    assert columnhub.Result.open(tmp_path / "out").events == n
    again = columnhub_cli("deliver", str(spec), "-o", str(tmp_path / "out"), "--chunk-size", "64")
    assert again.returncode == 0, again.stderr  # a full cache hit summarises too
    assert "whole result reused" in again.stdout
    assert "ht: float32" in again.stdout


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("columns: [Jet_Pt]", "closest names: Jet_pt"),
        ("columns: [x]\ndefine: {x: 'sqrt(Jet_pt'}", "define 'x'"),
        ("columns: [MET_pt]\nwhere: 'MET_pt >> '", "where"),
    ],
)
def test_cli_user_errors_exit_2_without_traceback(
    shared_data: Path, tmp_path: Path, spec: str, fragment: str
) -> None:
    path = tmp_path / "req.yaml"
    path.write_text(f"dataset: {{name: dy, files: [{shared_data / 'nano_dy.root'}]}}\n{spec}\n")
    done = columnhub_cli("deliver", str(path), "-o", str(tmp_path / "out"))
    assert done.returncode == 2
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_missing_spec_file_exits_2(tmp_path: Path) -> None:
    done = columnhub_cli("deliver", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_rntuple_source(tmp_path: Path) -> None:
    path = tmp_path / "rntuple.root"
    jets = ak.Array([[50.0, 20.0], [], [31.0], [40.0, 35.0, 10.0], [70.0]])
    with uproot.recreate(path) as f:
        f.mkrntuple("Events", {
            "run": np.ones(5, np.uint32), "luminosityBlock": np.ones(5, np.uint32),
            "event": np.arange(1, 6, dtype=np.uint64), "Jet_pt": jets,
        })
    result = columnhub.deliver(
        {"dataset": {"name": "rnt", "files": [str(path)]}, "columns": ["Jet_pt", "n"],
         "define": {"n": "num(Jet_pt[Jet_pt > 30])"}, "where": "num(Jet_pt) > 0",
         "chunk_size": 2},
        output=tmp_path / "out", cache=False,
    )
    got = result.to_awkward()
    keep = ak.num(jets) > 0
    assert ak.to_list(got.Jet_pt) == ak.to_list(jets[keep])
    assert ak.to_list(got.n) == ak.to_list(ak.num(jets[jets > 30])[keep])
    assert got.event.tolist() == [1, 3, 4, 5]


def test_file_descriptions_are_reused_until_the_file_changes(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second request does not re-read a file's metadata; a replaced file is read again."""
    from columnhub.sources import root as root_source

    path = tmp_path / "sample.root"
    shutil.copyfile(shared_data / "nano_dy.root", path)
    request = {"dataset": {"name": "s", "files": [str(path)]}, "columns": ["MET_pt"]}
    first = columnhub.deliver(request, output=tmp_path / "a", cache=False, progress=False)
    opened: list[str] = []
    real_open = root_source.open_tree

    def counting_open(p: str, spec: object) -> object:
        opened.append(p)
        return real_open(p, spec)  # type: ignore[arg-type]

    monkeypatch.setattr(root_source, "open_tree", counting_open)
    again = columnhub.deliver(request, output=tmp_path / "b", cache=False, progress=False)
    assert again.to_arrow().equals(first.to_arrow())
    assert opened == []  # described and opened by the first request, in this process

    # replaced by another file (a rename, as writers do): described again, new contents
    other = tmp_path / "other.root"
    shutil.copyfile(shared_data / "nano_dimuon.root", other)
    other.replace(path)
    third = columnhub.deliver(request, output=tmp_path / "c", cache=False, progress=False)
    assert opened == [str(path)]
    with uproot.open(shared_data / "nano_dimuon.root") as f:
        expected = f["Events"]["MET_pt"].array(library="np")
    assert np.array_equal(third.to_arrow()["MET_pt"].to_numpy(), expected)


def test_file_rewritten_in_place_with_same_size_and_mtime_is_described_again(
    shared_data: Path, tmp_path: Path
) -> None:
    """Size, mtime and inode unchanged but a new ROOT UUID: not the file described before."""
    import os
    import uuid

    from columnhub.sources import root as root_source
    from columnhub.spec import DatasetSpec

    path = tmp_path / "sample.root"
    shutil.copyfile(shared_data / "nano_dy.root", path)
    spec = DatasetSpec(name="s", files=[str(path)])
    before, _ = root_source.describe(str(path), spec)
    old = uuid.UUID(dict(before.identity)["uuid"]).bytes
    new = bytes([*old[:15], old[15] ^ 0xFF])
    stat = path.stat()
    with path.open("r+b") as f:  # the same inode, bytes changed in place
        head = f.read(4096)
        assert head.count(old) >= 1
        f.seek(0)
        f.write(head.replace(old, new))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after, _ = root_source.describe(str(path), spec)
    assert dict(after.identity)["uuid"] == str(uuid.UUID(bytes=new))
