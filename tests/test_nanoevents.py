"""Delivered NanoAOD opens as coffea NanoEvents; friend columns join their collections.

References are written here: a direct uproot read of the input files, and
brute-force joins by dictionary lookup. coffea itself is the reader under
test (the physicist's ``NanoEventsFactory.from_parquet(part,
schemaclass=NanoAODSchema)``), never a reference.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import uproot
from hypothesis import given, settings
from hypothesis import strategies as st

import columnhub
from columnhub.errors import JoinError, SpecError
from columnhub.join.collection import collection_of, fill_to_counts, first_mismatch

coffea_nanoevents = pytest.importorskip("coffea.nanoevents")
NanoAODSchema = coffea_nanoevents.NanoAODSchema
NanoEventsFactory = coffea_nanoevents.NanoEventsFactory

# coffea warns for every NanoAOD cross-reference (Jet_muonIdx1 -> Muon, ...)
# whose index branch a partial delivery does not carry: expected, not a fault
pytestmark = pytest.mark.filterwarnings(
    "ignore:Missing cross-reference (index|target):RuntimeWarning"
)

KEYS = ["run", "luminosityBlock", "event"]
SAMPLES = ["nano_dy.root", "nano_dimuon.root", "nano_tt_v12.root"]
JETS = ["Jet_pt", "Jet_eta", "Jet_phi", "Jet_mass"]
MUONS = ["Muon_pt", "Muon_eta", "Muon_phi", "Muon_mass", "Muon_charge"]


def read(path: Path, branches: list[str]) -> ak.Array:
    with uproot.open(path) as f:
        return f["Events"].arrays(branches, library="ak")


def open_parts(result: columnhub.Result) -> list[Any]:
    """Every part as the physicist opens it: coffea's own Parquet reader and NanoAODSchema."""
    return [
        NanoEventsFactory.from_parquet(part, schemaclass=NanoAODSchema, mode="eager").events()
        for part in result.files
    ]


def same_lists(got: Any, want: list[list[float]]) -> None:
    """Lists of floats equal value by value (NaN equal to NaN)."""
    assert ak.to_list(ak.num(got)) == [len(w) for w in want]
    flat = np.asarray(ak.to_numpy(ak.flatten(got)), dtype=np.float64)
    np.testing.assert_array_equal(flat, np.array([v for w in want for v in w], dtype=np.float64))


def key_tuples(columns: Any) -> list[tuple[int, int, int]]:
    return list(zip(*(ak.to_list(columns[k]) for k in KEYS), strict=True))


# ---------------------------------------------------------------------------
# counters: every collection opens in coffea


@pytest.mark.parametrize("sample", SAMPLES)
def test_delivered_nanoaod_opens_as_nanoevents(
    shared_data: Path, tmp_path: Path, sample: str
) -> None:
    source = shared_data / sample
    result = columnhub.deliver(
        {
            "dataset": {"name": sample, "files": [str(source)]},
            "columns": ["MET_pt", "MET_phi", *JETS, *MUONS],
            "where": "MET_pt > 10",
            "chunk_size": 13,
            "output": {"target_part_bytes": 1},  # a part per chunk
        },
        output=tmp_path / "out",
        cache=False,
    )
    assert len(result.files) > 1  # several parts, each opened on its own
    names = list(result.columns)
    # counters were not asked for: each comes just before its collection's first column
    assert names == [*KEYS, "MET_pt", "MET_phi", "nJet", *JETS, "nMuon", *MUONS]
    ref = read(source, [*KEYS, "MET_pt", "MET_phi", "nJet", "nMuon", *JETS, *MUONS])
    ref = ref[ref.MET_pt > 10]
    parts = open_parts(result)
    events = ak.concatenate(parts)
    assert len(events) == len(ref) > 0
    assert key_tuples(events) == key_tuples(ref)
    for field in ("pt", "eta", "phi", "mass"):
        assert ak.to_list(events.Jet[field]) == ak.to_list(ref[f"Jet_{field}"])
        assert ak.to_list(events.Muon[field]) == ak.to_list(ref[f"Muon_{field}"])
    assert ak.to_list(events.Muon.charge) == ak.to_list(ref.Muon_charge)
    assert ak.to_list(events.MET.pt) == ak.to_list(ref.MET_pt)
    assert ak.to_list(ak.num(events.Jet)) == ak.to_list(ref.nJet)
    # pairs of muons, per part (as coffea is used), against a brute force
    pairs = [ak.to_list(ak.combinations(p.Muon.pt, 2)) for p in parts]
    got = [pair for part in pairs for pair in part]
    want = [list(itertools.combinations(m, 2)) for m in ak.to_list(ref.Muon_pt)]
    assert [[tuple(p) for p in event] for event in got] == want
    dimuon = ak.combinations(parts[0].Muon, 2)  # the vector behaviour works too
    mass = (dimuon["0"] + dimuon["1"]).mass
    assert ak.all(ak.num(mass) == ak.num(dimuon))


def test_to_nanoevents_eager_and_dask(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "nano_dimuon.root"
    result = columnhub.deliver(
        {
            "dataset": {"name": "dimuon", "files": [str(source)]},
            "columns": [*JETS, *MUONS],
            "chunk_size": 10,
            "output": {"target_part_bytes": 3000},
        },
        output=tmp_path / "out",
        cache=False,
    )
    ref = read(source, [*KEYS, *JETS, *MUONS])
    n_pairs = int(sum(n * (n - 1) // 2 for n in ak.to_list(ak.num(ref.Muon_pt))))
    eager = result.to_nanoevents()
    lazy = result.to_nanoevents(mode="dask")
    assert lazy.npartitions == len(result.files) > 1
    for events in (eager, lazy.compute()):
        assert key_tuples(events) == key_tuples(ref)
        assert ak.to_list(events.Jet.pt) == ak.to_list(ref.Jet_pt)
        assert ak.to_list(events.Muon.charge) == ak.to_list(ref.Muon_charge)
    assert int(ak.sum(ak.num(ak.combinations(eager.Muon, 2)))) == n_pairs
    assert int(ak.sum(ak.num(ak.combinations(lazy.Muon, 2))).compute()) == n_pairs
    with pytest.raises(columnhub.errors.OutputError, match="'eager' or 'dask'"):
        result.to_nanoevents(mode="virtual-ish")


def test_to_nanoevents_without_coffea_names_the_extra(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = columnhub.deliver(
        {
            "dataset": {"name": "dy", "files": [str(shared_data / "nano_dy.root")]},
            "columns": ["Jet_pt"],
        },
        output=tmp_path / "out",
        cache=False,
    )
    monkeypatch.setitem(sys.modules, "coffea.nanoevents", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'columnhub\[coffea\]'"):
        result.to_nanoevents()


def write_tree(path: Path, branches: dict[str, Any]) -> Path:
    with uproot.recreate(path) as f:
        f["Events"] = branches
    return path


def cms_keys(n: int, *, start: int = 0) -> dict[str, np.ndarray]:
    return {
        "run": np.ones(n, dtype=np.uint32),
        "luminosityBlock": np.full(n, 7, dtype=np.uint32),
        "event": np.arange(start, start + n, dtype=np.uint64),
    }


def lists(rng: np.random.Generator, counts: np.ndarray) -> ak.Array:
    return ak.unflatten(rng.normal(size=int(counts.sum())).astype(np.float32), counts)


def test_counters_computed_for_files_without_them(tmp_path: Path) -> None:
    """PFNano- and scouting-style collections in a file with no nX branches."""
    rng = np.random.default_rng(3)
    n = 50
    cands = rng.integers(0, 6, n)
    scouting = rng.integers(0, 4, n)
    path = write_tree(  # uproot names its counters nJetPFCands_pt, ... (not nJetPFCands)
        tmp_path / "pfnano.root",
        {
            **cms_keys(n),
            "JetPFCands_pt": lists(rng, cands),
            "JetPFCands_eta": lists(rng, cands),
            "ScoutingJet_pt": lists(rng, scouting),
            "ScoutingMET_pt": rng.normal(size=n),
        },
    )
    with uproot.open(path) as f:
        assert "nJetPFCands" not in f["Events"]
    result = columnhub.deliver(
        {
            "dataset": {"name": "pfnano", "files": [str(path)]},
            "columns": ["ScoutingMET_pt", "JetPFCands_pt", "JetPFCands_eta", "ScoutingJet_pt"],
        },
        output=tmp_path / "out",
        cache=False,
    )
    assert list(result.columns) == [
        *KEYS,
        "ScoutingMET_pt",  # flat: no counter
        "nJetPFCands",
        "JetPFCands_pt",
        "JetPFCands_eta",
        "nScoutingJet",
        "ScoutingJet_pt",
    ]
    ref = read(path, ["JetPFCands_pt", "JetPFCands_eta", "ScoutingJet_pt", "ScoutingMET_pt"])
    delivered = result.to_awkward()
    assert ak.to_list(delivered.nJetPFCands) == cands.tolist()
    assert ak.to_list(delivered.nScoutingJet) == scouting.tolist()
    events = result.to_nanoevents()
    assert ak.to_list(ak.num(events.JetPFCands)) == cands.tolist()
    assert ak.to_list(events.JetPFCands.pt) == ak.to_list(ref.JetPFCands_pt)
    assert ak.to_list(events.JetPFCands.eta) == ak.to_list(ref.JetPFCands_eta)
    assert ak.to_list(events.ScoutingJet.pt) == ak.to_list(ref.ScoutingJet_pt)
    assert ak.to_list(events.ScoutingMET.pt) == ak.to_list(ref.ScoutingMET_pt)


def test_lists_of_one_collection_with_other_lengths_are_refused(
    shared_data: Path, tmp_path: Path
) -> None:
    """A define named into a collection but of other lengths would be zipped wrongly.

    Branches of a file without counters (an ntuple's ``Foo_a``, ``Foo_b`` of
    different lengths) cannot be renamed by the user: they are delivered as
    they are, and the computed counter counts the first list.
    """
    rng = np.random.default_rng(5)
    n = 30
    a = rng.integers(0, 4, n)
    b = a.copy()
    b[17] += 1
    foo_a, foo_b = lists(rng, a), lists(rng, b)
    path = write_tree(tmp_path / "odd.root", {**cms_keys(n), "Foo_a": foo_a, "Foo_b": foo_b})
    req = {"dataset": {"name": "odd", "files": [str(path)]}, "columns": ["Foo_a", "Foo_b"]}
    got = columnhub.deliver(req, output=tmp_path / "out", cache=False).to_awkward()
    assert ak.to_list(got.Foo_a) == ak.to_list(foo_a)
    assert ak.to_list(got.Foo_b) == ak.to_list(foo_b)
    assert got.nFoo.to_list() == a.tolist()
    # a define named into the Jet collection but holding fewer jets is refused
    source = shared_data / "nano_tt_v12.root"
    nano = {
        "dataset": {"name": "tt", "files": [str(source)]},
        "columns": ["Jet_pt", "Jet_hard"],
        "define": {"Jet_hard": "Jet_pt[Jet_pt > 30]"},
    }
    with pytest.raises(SpecError, match="define column 'Jet_hard'") as err:
        columnhub.deliver(nano, output=tmp_path / "out2", cache=False)
    ref = read(source, [*KEYS, "Jet_pt"])
    fewer = ak.num(ref.Jet_pt[ref.Jet_pt > 30]) != ak.num(ref.Jet_pt)
    first = int(np.flatnonzero(ak.to_numpy(fewer))[0])
    assert f"event={int(ref.event[first])}" in str(err.value)
    assert "does not start with 'Jet_'" in str(err.value)
    nano["define"] = {"hard_pt": "Jet_pt[Jet_pt > 30]"}  # another name: its own collection
    nano["columns"] = ["Jet_pt", "hard_pt"]
    got = columnhub.deliver(nano, output=tmp_path / "out3", cache=False).to_awkward()
    assert ak.to_list(got.hard_pt) == ak.to_list(ref.Jet_pt[ref.Jet_pt > 30])


# ---------------------------------------------------------------------------
# friend columns join their collections


@pytest.fixture(scope="module")
def btag(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Any]:
    """A new per-jet tagger score for 85 % of the ttbar events, shuffled over two files."""
    source = shared_data / "nano_tt_v12.root"
    d = tmp_path_factory.mktemp("btag")
    original = read(source, [*KEYS, "nJet", "Jet_pt", "Jet_btagDeepFlavB"])
    rng = np.random.default_rng(11)
    rows = rng.permutation(len(original))[: int(0.85 * len(original))]
    files = []
    for i, part in enumerate(np.array_split(rows, 2)):
        ev = original[part]
        files.append(
            write_tree(
                d / f"btag{i}.root",
                {
                    **{k: ak.to_numpy(ev[k]) for k in KEYS},
                    "Jet_btagNew": ev.Jet_btagDeepFlavB * 2 + 1,
                },
            )
        )
    friend_rows = original[rows]
    table = dict(
        zip(key_tuples(friend_rows), ak.to_list(friend_rows.Jet_btagDeepFlavB * 2 + 1), strict=True)
    )
    return {"source": source, "files": files, "original": original, "table": table}


def btag_request(btag: dict[str, Any], columns: list[str], **friend: Any) -> dict[str, Any]:
    return {
        "dataset": {"name": "tt", "files": [str(btag["source"])]},
        "columns": columns,
        "chunk_size": 37,
        "friends": [
            {
                "name": "btag",
                "dataset": {"name": "btag", "files": [str(f) for f in btag["files"]]},
                "columns": ["Jet_btagNew"],
                **friend,
            }
        ],
    }


@pytest.mark.parametrize("how", ["left", "inner"])
def test_friend_column_joins_the_primary_collection(
    btag: dict[str, Any], tmp_path: Path, how: str
) -> None:
    req = btag_request(btag, [*JETS, "Jet_btagNew", "btag_matched"], how=how)
    result = columnhub.deliver(req, output=tmp_path / "out", cache=False)
    assert list(result.columns) == [*KEYS, "nJet", *JETS, "Jet_btagNew", "btag_matched"]
    original, table = btag["original"], btag["table"]
    # brute force: a dict lookup per primary event; no partner -> nJet missing values
    expected = []
    for key, njet in zip(key_tuples(original), ak.to_list(original.nJet), strict=True):
        if key in table:
            expected.append((key, table[key], True))
        elif how == "left":
            expected.append((key, [None] * njet, False))
    assert 0 < sum(not m for _, _, m in expected) or how == "inner"
    got = result.to_awkward()
    assert key_tuples(got) == [k for k, _, _ in expected]
    got_values = ak.to_list(got.Jet_btagNew)
    assert got_values == [want for _, want, _ in expected]
    assert ak.to_list(got.btag_matched) == [m for _, _, m in expected]
    # coffea: the new score is a field of events.Jet, jet by jet with Jet_pt
    events = result.to_nanoevents()
    assert ak.to_list(ak.num(events.Jet.btagNew)) == ak.to_list(ak.num(events.Jet.pt))
    # coffea's Parquet reader drops Arrow's validity: a missing float reads as NaN
    nan_for_none = [[np.nan if v is None else v for v in event] for event in got_values]
    same_lists(events.Jet.btagNew, nan_for_none)
    pt_by_key = dict(zip(key_tuples(original), ak.to_list(original.Jet_pt), strict=True))
    assert ak.to_list(events.Jet.pt) == [pt_by_key[k] for k, _, _ in expected]
    lead = events.Jet[:, :1]  # slicing the collection keeps the new field with its jet
    same_lists(lead.btagNew, [v[:1] for v in nan_for_none])


def test_friend_collection_columns_from_the_cache(btag: dict[str, Any], tmp_path: Path) -> None:
    """Filled friend lists are cached as filled: a warm delivery gives the same result."""
    req = btag_request(btag, ["Jet_pt", "Jet_btagNew", "btag_matched"])
    cold = columnhub.deliver(req, output=tmp_path / "cold", cache=tmp_path / "cache")
    req["output"] = {"compression": "lz4"}  # another request (no whole-result reuse), same columns
    warm = columnhub.deliver(req, output=tmp_path / "warm", cache=tmp_path / "cache")
    assert warm.manifest["cache"]["misses"] == 0
    assert warm.manifest["cache"]["hits"] > 0
    assert warm.to_arrow().equals(cold.to_arrow())
    assert str(warm.to_awkward().Jet_btagNew.type) == str(cold.to_awkward().Jet_btagNew.type)


def test_friend_collection_with_other_counts_is_an_error(
    btag: dict[str, Any], tmp_path: Path
) -> None:
    original = btag["original"]
    i = int(np.flatnonzero(ak.to_numpy(original.nJet) > 0)[100])  # one event, in a later chunk
    scores = ak.to_list(original.Jet_btagDeepFlavB)
    scores[i] = scores[i][:-1]  # one jet fewer there
    wrong = ak.values_astype(ak.Array(scores), np.float32)
    path = write_tree(
        tmp_path / "short.root",
        {**{k: ak.to_numpy(original[k]) for k in KEYS}, "Jet_btagNew": wrong},
    )
    req = btag_request(btag, ["Jet_pt", "Jet_btagNew"])
    req["friends"][0]["dataset"]["files"] = [str(path)]
    with pytest.raises(JoinError, match="prefix") as err:
        columnhub.deliver(req, output=tmp_path / "out", cache=False)
    text = str(err.value)
    key = key_tuples(original[i : i + 1])[0]
    assert f"run={key[0]}, luminosityBlock={key[1]}, event={key[2]}" in text
    njet = int(original.nJet[i])
    assert f"holds {njet - 1} value(s) where the primary's nJet is {njet}" in text
    # with a prefix it is a collection of its own: not checked against nJet
    req["friends"][0]["prefix"] = "short_"
    req["columns"] = ["Jet_pt", "short_Jet_btagNew"]
    result = columnhub.deliver(req, output=tmp_path / "ok", cache=False)
    assert list(result.columns) == [*KEYS, "nJet", "Jet_pt", "nshort", "short_Jet_btagNew"]
    got = result.to_awkward()
    assert ak.to_list(got.short_Jet_btagNew) == ak.to_list(wrong)
    assert ak.to_list(got.nshort) == ak.to_list(ak.num(wrong))


def test_to_dask_with_friends(btag: dict[str, Any], tmp_path: Path) -> None:
    """Dotted friend names broke dask-awkward; plain names work in every reader."""
    req = btag_request(btag, ["Jet_pt", "Jet_btagNew", "btag_matched", "MET_pt"], how="left")
    req["friends"].append(
        {
            "name": "up",
            "dataset": {"name": "tt-up", "files": [str(btag["source"])]},
            "columns": ["MET_pt"],
            "prefix": "up_",
            "match": "aligned",
        }
    )
    req["columns"] += ["up_MET_pt", "up_matched"]
    result = columnhub.deliver(
        req, output=tmp_path / "out", cache=False, chunk_size=50
    )
    eager = result.to_awkward()
    lazy = result.to_dask()
    assert lazy.fields == eager.fields == list(result.columns)
    assert ak.to_list(lazy.compute()) == ak.to_list(eager)
    assert ak.to_list(lazy.up_MET_pt.compute()) == ak.to_list(eager.MET_pt)
    assert ak.to_list(lazy.Jet_btagNew.compute()) == ak.to_list(eager.Jet_btagNew)


@st.composite
def collection_case(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 25))
    njet = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    partners = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    order = draw(st.permutations(range(n)))
    return {
        "njet": njet,
        "partners": partners,
        "order": order,
        "cut": draw(st.integers(0, n)),
        "chunk_size": draw(st.integers(1, 9)),
        "how": draw(st.sampled_from(["left", "inner"])),
    }


@settings(max_examples=15, deadline=None)
@given(case=collection_case())
def test_friend_collection_join_matches_brute_force(case: dict[str, Any]) -> None:
    """Random jets per event, random partners, shuffled over two friend files."""
    import tempfile

    njet = np.array(case["njet"], dtype=np.int32)
    n = len(njet)
    pt = ak.unflatten(np.arange(int(njet.sum()), dtype=np.float32), njet)
    tag = ak.unflatten(1000 + np.arange(int(njet.sum()), dtype=np.float32), njet)
    rows = [i for i in case["order"] if case["partners"][i]]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        primary = write_tree(d / "p.root", {**cms_keys(n), "nJet": njet, "Jet_pt": pt})
        files = []
        for part in (rows[: case["cut"]], rows[case["cut"] :]):
            if part:
                keys = {k: v[part] for k, v in cms_keys(n).items()}
                files.append(write_tree(d / f"f{len(files)}.root", {**keys, "Jet_new": tag[part]}))
        if not files:  # no partner at all: a friend file of no rows
            empty = {k: v[:0] for k, v in cms_keys(n).items()}
            files.append(write_tree(d / "f0.root", {**empty, "Jet_new": tag[:0]}))
        result = columnhub.deliver(
            {
                "dataset": {"name": "p", "files": [str(primary)]},
                "columns": ["Jet_pt", "Jet_new", "f_matched"],
                "chunk_size": case["chunk_size"],
                "friends": [
                    {
                        "name": "f",
                        "dataset": {"name": "f", "files": [str(f) for f in files]},
                        "columns": ["Jet_new"],
                        "how": case["how"],
                    }
                ],
            },
            output=d / "out",
            cache=False,
        )
        got = result.to_awkward()
    want = [
        (i, ak.to_list(tag[i]) if case["partners"][i] else [None] * int(njet[i]))
        for i in range(n)
        if case["partners"][i] or case["how"] == "left"
    ]
    assert ak.to_list(got.event) == [i for i, _ in want]
    assert ak.to_list(got.Jet_new) == [values for _, values in want]
    assert ak.to_list(got.nJet) == [int(njet[i]) for i, _ in want]
    assert ak.to_list(ak.num(got.Jet_new)) == ak.to_list(got.nJet)


# ---------------------------------------------------------------------------
# the pure functions, against brute force


def test_collection_doctests() -> None:
    import doctest

    import columnhub.join.collection

    failures, attempted = doctest.testmod(columnhub.join.collection)
    assert attempted > 0
    assert failures == 0


def test_collection_names() -> None:
    assert collection_of("Jet_pt") == "Jet"
    assert collection_of("JetPFCands_pt") == "JetPFCands"
    assert collection_of("jesup_Jet_pt") == "jesup"
    assert collection_of("nJet") is None
    assert collection_of("AnalysisElectronsAuxDyn.pt") is None


row_st = st.one_of(st.none(), st.lists(st.floats(-5, 5, allow_nan=False, width=32), max_size=4))


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(row_st, max_size=12), extra=st.lists(st.integers(0, 3), max_size=12))
def test_fill_to_counts_matches_brute_force(
    rows: list[list[float] | None], extra: list[int]
) -> None:
    """Present rows keep their lists; missing rows get counter-many None; lengths checked."""
    counts = [
        len(r) if r is not None else (extra[i] if i < len(extra) else 2)
        for i, r in enumerate(rows)
    ]
    flat = np.array([v for r in rows if r is not None for v in r], dtype=np.float32)
    lengths = np.array([len(r) if r is not None else 0 for r in rows], dtype=np.int64)
    array = ak.mask(ak.unflatten(flat, lengths), np.array([r is not None for r in rows], bool))
    assert first_mismatch(array, counts) is None
    filled = fill_to_counts(array, counts)
    want = [r if r is not None else [None] * c for r, c in zip(rows, counts, strict=True)]
    assert [[None if v is None else pytest.approx(v) for v in r] for r in want] == filled.tolist()
    assert ak.to_list(ak.num(filled)) == counts
    if any(r is not None for r in rows):  # one list one longer: the first such row is named
        i = next(i for i, r in enumerate(rows) if r is not None)
        wrong = list(counts)
        wrong[i] += 1
        assert first_mismatch(array, wrong) == (i, counts[i], counts[i] + 1)


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 4), min_size=1, max_size=15),
    counter_delta=st.lists(st.integers(-1, 1), min_size=15, max_size=15),
    start=st.integers(0, 3),
    dtype=st.sampled_from([np.uint32, np.int32, np.int64, np.uint8]),
)
def test_first_mismatch_of_plain_lists_and_counters_matches_brute_force(
    lengths: list[int], counter_delta: list[int], start: int, dtype: type
) -> None:
    """The fast path (a file's lists: offsets, numpy counters, sliced) against a loop."""
    n = len(lengths)
    whole = ak.unflatten(np.arange(sum(lengths) + 7, dtype=np.float32)[: sum(lengths)], lengths)
    array = whole[min(start, n - 1) :]  # sliced: offsets need not start at 0
    got_lengths = lengths[min(start, n - 1) :]
    counter = np.array(
        [max(0, x + d) for x, d in zip(got_lengths, counter_delta, strict=False)], dtype=dtype
    )
    want = next(
        ((i, x, int(c)) for i, (x, c) in enumerate(zip(got_lengths, counter, strict=True)) if x != c),
        None,
    )
    assert first_mismatch(array, counter) == want
    assert first_mismatch(array, ak.Array(counter)) == want
    assert first_mismatch(array, counter.tolist()) == want  # the general path agrees


# ---------------------------------------------------------------------------
# ATLAS PHYSLITE: coffea's PHYSLITESchema groups the AuxDyn columns itself

PHYSLITE_KEYS = ["EventInfoAuxDyn.runNumber", "EventInfoAuxDyn.eventNumber"]


def test_physlite_like_delivery_opens_with_physlite_schema(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n = 60
    electrons = rng.integers(0, 4, n)
    jets = rng.integers(0, 6, n)
    branches: dict[str, Any] = {
        "EventInfoAuxDyn.runNumber": np.full(n, 410470, dtype=np.uint32),
        "EventInfoAuxDyn.eventNumber": rng.permutation(10 * n)[:n].astype(np.uint64),
    }
    for field in ("pt", "eta", "phi", "m", "charge"):
        branches[f"AnalysisElectronsAuxDyn.{field}"] = lists(rng, electrons)
    for field in ("pt", "eta", "phi", "m"):
        branches[f"AnalysisJetsAuxDyn.{field}"] = lists(rng, jets)
    with uproot.recreate(tmp_path / "physlite.root") as f:
        f["CollectionTree"] = branches
    columns = [b for b in branches if b not in PHYSLITE_KEYS]
    result = columnhub.deliver(
        {
            "dataset": {
                "name": "physlite",
                "files": [str(tmp_path / "physlite.root")],
                "tree": "CollectionTree",
                "keys": PHYSLITE_KEYS,
            },
            "columns": columns,
            "chunk_size": 25,
            "output": {"target_part_bytes": 2000},
        },
        output=tmp_path / "out",
        cache=False,
    )
    assert list(result.columns) == [*PHYSLITE_KEYS, *columns]  # no NanoAOD counters made up
    physlite = coffea_nanoevents.PHYSLITESchema
    for events in (
        result.to_nanoevents(schema=physlite),
        result.to_nanoevents(schema=physlite, mode="dask").compute(),
    ):
        assert ak.to_list(events.EventInfo.eventNumber) == branches[
            "EventInfoAuxDyn.eventNumber"
        ].tolist()
        for field in ("pt", "eta", "phi", "charge"):
            want = ak.to_list(branches[f"AnalysisElectronsAuxDyn.{field}"])
            assert ak.to_list(events.Electrons[field]) == want
        assert ak.to_list(events.Jets.pt) == ak.to_list(branches["AnalysisJetsAuxDyn.pt"])
        pairs = ak.num(ak.combinations(events.Electrons, 2))
        assert ak.to_list(pairs) == [k * (k - 1) // 2 for k in electrons.tolist()]

