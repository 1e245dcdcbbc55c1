"""Tests of columnhub.synth (synthetic NanoAOD) and the synth/regroup CLI."""

from __future__ import annotations

import argparse
import fnmatch
import pathlib

import awkward as ak
import numpy as np
import pytest
import uproot
from hypothesis import given, settings
from hypothesis import strategies as st

from columnhub.cli import synth as cli_synth
from columnhub.errors import (
    ColumnhubError,
    ColumnNotFoundError,
    DatasetFileNotFoundError,
    SpecError,
)
from columnhub.synth import DEFAULT_BRANCHES, event_keys, regroup, synthesize

DATA = pathlib.Path("/work/shared/data")
TT = DATA / "nano_tt_v12.root"
DY = DATA / "nano_dy.root"
DIMUON = DATA / "nano_dimuon.root"
N = 10_000

pytestmark = pytest.mark.skipif(not TT.exists(), reason="shared NanoAOD samples missing")


def read(paths: list[pathlib.Path], names: list[str] | None = None) -> ak.Array:
    """All events of ``paths``, concatenated in file order."""
    parts = []
    for p in paths:
        with uproot.open(p) as f:
            parts.append(f["Events"].arrays(names))
    return ak.concatenate(parts)


def typenames(path: pathlib.Path) -> dict[str, str]:
    with uproot.open(path) as f:
        tree = f["Events"]
        return {k: tree[k].typename for k in tree.keys()}  # noqa: SIM118


def by_event(arr: ak.Array) -> dict[int, int]:
    return {int(e): i for i, e in enumerate(np.asarray(arr["event"]))}


def reference_keys(index: np.ndarray) -> list[tuple[int, int, int]]:
    # written independently of the module: 1000 events per lumi, 1000 lumis per run
    return [(1 + i // 1_000_000, 1 + (i // 1000) % 1000, i + 1) for i in index.tolist()]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> list[pathlib.Path]:
    out = tmp_path_factory.mktemp("base")
    return synthesize(TT, events=N, output=out / "base.root", seed=7)


def test_deterministic_for_a_seed(base: list[pathlib.Path], tmp_path: pathlib.Path) -> None:
    again = synthesize(TT, events=N, output=tmp_path / "again.root", seed=7, basket_events=3001)
    a, b = read(base), read(again)
    assert a.fields == b.fields
    for name in a.fields:
        assert ak.array_equal(a[name], b[name]), name
    other = read(synthesize(TT, events=N, output=tmp_path / "other.root", seed=8))
    for key in ("run", "luminosityBlock", "event"):
        assert np.array_equal(np.asarray(a[key]), np.asarray(other[key]))
    assert not ak.array_equal(a["Jet_pt"], other["Jet_pt"])
    assert not np.array_equal(np.asarray(a["MET_pt"]), np.asarray(other["MET_pt"]))


def test_keys_unique_and_from_index(tmp_path: pathlib.Path) -> None:
    first = 2_999_000  # crosses a run boundary at index 3_000_000
    out = synthesize(TT, events=3000, output=tmp_path / "k.root", first_event=first, seed=1)
    arr = read(out, ["run", "luminosityBlock", "event"])
    got = list(zip(*(np.asarray(arr[k]).tolist() for k in arr.fields), strict=True))
    assert got == reference_keys(np.arange(first, first + 3000))
    assert len(set(got)) == len(got)
    types = typenames(out[0])
    assert (types["run"], types["luminosityBlock"], types["event"]) == (
        "uint32_t",
        "uint32_t",
        "uint64_t",
    )


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**40), min_size=1, max_size=200, unique=True))
def test_event_keys_unique(index: list[int]) -> None:
    keys = event_keys(index)
    got = list(zip(*(keys[k].tolist() for k in ("run", "luminosityBlock", "event")), strict=True))
    assert got == reference_keys(np.array(index, dtype=np.int64))
    assert len(set(got)) == len(index)


def _expected_branches(template: dict[str, str], patterns: tuple[str, ...]) -> set[str]:
    chosen = {b for b in template if any(fnmatch.fnmatchcase(b, p) for p in patterns)}
    counters = {"n" + b.split("_")[0] for b in chosen if template[b].endswith("[]")}
    return chosen | counters | {"run", "luminosityBlock", "event"}


@pytest.mark.parametrize("template", [TT, DY], ids=["tt_v12", "dy"])
def test_structure_matches_template(template: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = synthesize(template, events=2000, output=tmp_path / "s.root", seed=2)
    want = typenames(template)
    got = typenames(out[0])
    assert set(got) == _expected_branches(want, DEFAULT_BRANCHES)
    for name, typename in got.items():
        assert typename == want[name], name
    assert got["Jet_pt"] == "float[]"
    arr = read(out, ["nJet", "Jet_pt", "Jet_eta", "nMuon", "Muon_pt"])
    assert ak.all(ak.num(arr["Jet_pt"]) == arr["nJet"])
    assert ak.all(ak.num(arr["Muon_pt"]) == arr["nMuon"])


def test_every_branch(tmp_path: pathlib.Path) -> None:
    out = synthesize(TT, events=500, output=tmp_path / "all.root", branches=["*"])
    want, got = typenames(TT), typenames(out[0])
    assert got == want
    # uproot-written templates carry per-branch counters (nJet_pt): kept consistent
    arr = read(out, ["nJet", "nJet_pt", "nMuon_eta", "Muon_eta"])
    assert ak.all(arr["nJet_pt"] == arr["nJet"])
    assert ak.all(arr["nMuon_eta"] == ak.num(arr["Muon_eta"]))


def test_resampling_statistics(base: list[pathlib.Path]) -> None:
    fields = ["pt", "eta", "phi", "mass"]
    tmpl = read([TT], ["nJet", *(f"Jet_{f}" for f in fields), "MET_pt", "MET_phi"])
    synth = read(base, ["nJet", *(f"Jet_{f}" for f in fields), "MET_pt", "MET_phi"])
    nj_t = np.asarray(tmpl["nJet"], dtype=float)
    nj_s = np.asarray(synth["nJet"], dtype=float)
    assert abs(nj_s.mean() - nj_t.mean()) < 5 * nj_t.std() / np.sqrt(len(nj_s))
    assert set(np.unique(nj_s)) <= set(np.unique(nj_t))

    # whole objects are resampled: every synthetic jet is one template jet
    def rows(a: ak.Array) -> set[tuple[float, ...]]:
        cols = [np.asarray(ak.flatten(a[f"Jet_{f}"])).tolist() for f in fields]
        return set(zip(*cols, strict=True))

    assert rows(synth) <= rows(tmpl)

    # flat branches: whole template events (MET pt and phi stay paired)
    def pairs(a: ak.Array) -> set[tuple[float, float]]:
        met = (np.asarray(a["MET_pt"]).tolist(), np.asarray(a["MET_phi"]).tolist())
        return set(zip(*met, strict=True))

    pairs_t, pairs_s = pairs(tmpl), pairs(synth)
    assert pairs_s <= pairs_t
    assert len(pairs_s) > 0.9 * len(pairs_t)
    # jets sorted by descending pt, as in the template
    pt = synth["Jet_pt"]
    assert ak.all(pt[:, 1:] <= pt[:, :-1])


def test_cross_reference_indices_are_valid(base: list[pathlib.Path]) -> None:
    arr = read(base, ["nMuon", "Jet_muonIdx1", "nJet", "Muon_jetIdx"])
    for field, target in (("Jet_muonIdx1", "nMuon"), ("Muon_jetIdx", "nJet")):
        idx = arr[field]
        limit = ak.broadcast_arrays(arr[target], idx)[0]
        assert ak.all((idx == -1) | ((idx >= 0) & (idx < limit))), field


def test_shuffle_files_subset_same_values(base: list[pathlib.Path], tmp_path: pathlib.Path) -> None:
    out = synthesize(
        TT,
        events=N,
        output=tmp_path / "layout",
        seed=7,
        shuffle=True,
        files=3,
        subset=0.8,
        basket_events=1234,
    )
    assert [p.name for p in out] == ["part-00000.root", "part-00001.root", "part-00002.root"]
    sizes = [uproot.open(p)["Events"].num_entries for p in out]
    assert max(sizes) - min(sizes) <= 1
    ref, got = read(base), read(out)
    assert abs(len(got) - 0.8 * N) < 5 * np.sqrt(N * 0.8 * 0.2)
    events = np.asarray(got["event"])
    assert len(np.unique(events)) == len(events)
    assert not np.all(np.diff(events.astype(np.int64)) > 0)  # really shuffled
    pos = by_event(ref)
    rows = np.array([pos[int(e)] for e in events])
    for name in ref.fields:
        assert ak.array_equal(ref[name][rows], got[name]), name
    # the same subset without shuffle keeps the same events, in index order
    plain = read(synthesize(TT, events=N, output=tmp_path / "p.root", seed=7, subset=0.8))
    assert np.array_equal(np.sort(events), np.asarray(plain["event"]))


def test_branch_selection(base: list[pathlib.Path], tmp_path: pathlib.Path) -> None:
    out = synthesize(TT, events=N, output=tmp_path / "j.root", seed=7, branches=["Jet_pt"])
    assert set(typenames(out[0])) == {"run", "luminosityBlock", "event", "nJet", "Jet_pt"}
    # values of an event do not depend on which other branches are written
    assert ak.array_equal(read(out)["Jet_pt"], read(base)["Jet_pt"])
    with pytest.raises(ColumnNotFoundError, match="Jet_ptt"):
        synthesize(TT, events=10, output=tmp_path / "x.root", branches=["Jet_ptt"])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"events": 0}, SpecError),
        ({"events": -5}, SpecError),
        ({"subset": 0.0}, SpecError),
        ({"subset": 1.5}, SpecError),
        ({"files": 0}, SpecError),
        ({"files": 2}, SpecError),  # a .root output holds one file
        ({"compression": "brotli:3"}, SpecError),
        ({"like": DATA / "no_such.root"}, DatasetFileNotFoundError),
    ],
)
def test_user_errors(kwargs: dict[str, object], error: type, tmp_path: pathlib.Path) -> None:
    args: dict[str, object] = {"like": TT, "events": 10, "output": tmp_path / "e.root"}
    args.update(kwargs)
    like = args.pop("like")
    with pytest.raises(error):
        synthesize(like, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("shuffle", [False, True])
def test_regroup_shared_file(shuffle: bool, tmp_path: pathlib.Path) -> None:
    # a branch subset keeps the test fast (uproot's writer is slow for 1600 branches)
    patterns = ["Muon_*", "Jet_*", "MET_*", "HLT_IsoMu*"]
    out = regroup(
        [DIMUON],
        output=tmp_path / "rg",
        files=3,
        shuffle=shuffle,
        subset=0.75,
        seed=3,
        basket_events=7,
        branches=patterns,
    )
    assert len(out) == 3
    ref, got = (
        read([DIMUON], sorted(_expected_branches(typenames(DIMUON), tuple(patterns)))),
        read(out),
    )
    assert set(typenames(out[0])) == _expected_branches(typenames(DIMUON), tuple(patterns))
    assert typenames(out[0])["nMuon"] == typenames(DIMUON)["nMuon"]
    assert 0 < len(got) < len(ref)
    pos = by_event(ref)
    rows = np.array([pos[int(e)] for e in np.asarray(got["event"])])
    assert len(set(rows.tolist())) == len(rows)
    if not shuffle:
        assert np.all(np.diff(rows) > 0)
    for name in ref.fields:
        assert ak.array_equal(ref[name][rows], got[name]), name


def test_regroup_synth_output_all_events(base: list[pathlib.Path], tmp_path: pathlib.Path) -> None:
    out = regroup(base, output=tmp_path / "rg", files=2, shuffle=True, seed=5, basket_events=999)
    ref, got = read(base), read(out)
    assert len(got) == len(ref)
    pos = by_event(ref)
    rows = np.array([pos[int(e)] for e in np.asarray(got["event"])])
    assert sorted(rows.tolist()) == list(range(len(ref)))
    for name in ("nJet", "Jet_pt", "Muon_eta", "MET_pt"):
        assert ak.array_equal(ref[name][rows], got[name]), name


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="columnhub")
    cli_synth.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_synth_and_regroup(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser()
    args = parser.parse_args(
        [
            "synth",
            "--like",
            str(DY),
            "--events",
            "500",
            "-o",
            str(tmp_path / "s"),
            "--files",
            "2",
            "--shuffle",
            "--seed",
            "4",
            "--branches",
            "Muon_*",
            "MET_pt",
        ]
    )
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("synth: wrote 2 file(s), 500 events")
    files = sorted((tmp_path / "s").glob("*.root"))
    assert len(files) == 2
    assert set(typenames(files[0])) == _expected_branches(typenames(DY), ("Muon_*", "MET_pt"))
    args = parser.parse_args(
        ["regroup", *map(str, files), "-o", str(tmp_path / "one.root"), "--subset", "0.5"]
    )
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip()
    kept = uproot.open(tmp_path / "one.root")["Events"].num_entries
    assert 0 < kept < 500
    assert line.startswith(f"regroup: wrote 1 file(s), {kept} events")


def test_cli_user_error(tmp_path: pathlib.Path) -> None:
    args = _parser().parse_args(
        ["synth", "--like", str(TT), "--events", "0", "-o", str(tmp_path / "x.root")]
    )
    with pytest.raises(ColumnhubError, match="events"):
        args.func(args)
