"""Friend joins through the full delivery path (``columnhub.deliver`` and the CLI).

Every join here is checked against an independent reference written in this
file: a brute-force dictionary lookup over the rows as written to ROOT, or a
direct uproot read of the original file.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import uproot
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import columnhub
from columnhub.errors import (
    ColumnNotFoundError,
    DuplicateKeyError,
    JoinError,
    KeyMismatchError,
    KeyTypeError,
    SpecError,
)
from columnhub.synth import regroup, synthesize

KEYS = ("run", "luminosityBlock", "event")
HOWS = ("inner", "left", "right", "outer")
VALIDATES = ("one_to_one", "many_to_one", "one_to_many")
CLI = Path(sys.executable).parent / "columnhub"

# ---------------------------------------------------------------------------
# helpers


Row = tuple[int, int, int, float, tuple[float, ...]]


def write_rows(path: Path, rows: list[Row], *, x: str = "x", j: str = "j") -> None:
    """Write rows ``(run, lumi, event, x, [j...])`` as a flat ROOT tree with uproot."""
    with uproot.recreate(path) as f:
        f["Events"] = {
            "run": np.array([r[0] for r in rows], dtype=np.uint32),
            "luminosityBlock": np.array([r[1] for r in rows], dtype=np.uint32),
            "event": np.array([r[2] for r in rows], dtype=np.uint64),
            x: np.array([r[3] for r in rows], dtype=np.float64),
            j: jagged([r[4] for r in rows]),
        }


def jagged(lists: list[tuple[float, ...]]) -> ak.Array:
    """A ``var * float64`` array (typed even when every list is empty)."""
    counts = np.array([len(v) for v in lists], dtype=np.int64)
    flat = np.array([x for v in lists for x in v], dtype=np.float64)
    return ak.unflatten(flat, counts)


def friend(
    name: str, files: list[Path] | list[str], columns: list[str], **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": {"name": name, "files": [str(f) for f in files]},
        "columns": columns,
        **extra,
    }


def request(files: list[Path] | list[str], columns: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "dataset": {"name": "primary", "files": [str(f) for f in files]},
        "columns": columns,
        **extra,
    }


def rows_of(result: columnhub.Result, names: list[str]) -> list[tuple[Any, ...]]:
    """The result's rows as tuples of plain Python values (lists become tuples)."""
    table = result.to_arrow().to_pylist()

    def plain(v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    return [tuple(plain(r[n]) for n in names) for r in table]


def reference_join(
    primary: list[Row], friend_rows: list[Row], *, how: str
) -> collections.Counter[tuple[Any, ...]]:
    """Brute force: every output row as ``(run, lumi, event, x, j, fx, fj, matched)``."""
    by_key: dict[tuple[int, int, int], list[Row]] = collections.defaultdict(list)
    for f in friend_rows:
        by_key[f[:3]].append(f)
    out: collections.Counter[tuple[Any, ...]] = collections.Counter()
    for p in primary:
        partners = by_key.get(p[:3], [])
        for f in partners:
            out[(*p[:3], p[3], p[4], f[3], f[4], True)] += 1
        if not partners and how in ("left", "outer"):
            out[(*p[:3], p[3], p[4], None, None, False)] += 1
    if how in ("right", "outer"):
        primary_keys = {p[:3] for p in primary}
        for f in friend_rows:
            if f[:3] not in primary_keys:
                out[(*f[:3], None, None, f[3], f[4], False)] += 1
    return out


def violates(primary: list[Row], friend_rows: list[Row], validate: str) -> bool:
    def dup(rows: list[Row]) -> bool:
        keys = [r[:3] for r in rows]
        return len(set(keys)) != len(keys)

    if validate == "one_to_one":
        return dup(primary) or dup(friend_rows)
    if validate == "many_to_one":
        return dup(friend_rows)
    return dup(primary)


def split(rows: list[Row], cuts: list[int]) -> list[list[Row]]:
    """``rows`` cut into non-empty pieces at the (sorted, distinct) positions ``cuts``."""
    edges = [0, *sorted({c for c in cuts if 0 < c < len(rows)}), len(rows)]
    return [rows[a:b] for a, b in itertools.pairwise(edges)]


# ---------------------------------------------------------------------------
# property test: every how x validate against the brute-force reference

key_st = st.tuples(
    st.integers(1, 2),
    st.integers(0, 2),
    st.one_of(st.integers(0, 12), st.sampled_from([2**32 + 5, 2**63 - 1, 2**64 - 1])),
)


@st.composite
def join_case(draw: st.DrawFn) -> dict[str, Any]:
    pool = draw(st.lists(key_st, min_size=1, max_size=14, unique=True))
    value = st.floats(-1e6, 1e6, allow_nan=False, width=64)
    jagged = st.lists(st.floats(-100, 100, allow_nan=False), max_size=3).map(tuple)

    def side(min_size: int) -> list[Row]:
        keys = draw(st.lists(st.sampled_from(pool), min_size=min_size, max_size=12))
        if not draw(st.booleans()):  # often unique, sometimes with duplicates
            keys = list(dict.fromkeys(keys))
        return [(*k, draw(value), draw(jagged)) for k in keys]

    primary = side(1)
    friend_rows = side(1)
    friend_rows = draw(st.permutations(friend_rows))
    return {
        "primary": primary,
        "primary_cuts": draw(st.lists(st.integers(1, 12), max_size=1)),
        "friend": friend_rows,
        "friend_cuts": draw(st.lists(st.integers(1, 12), max_size=3)),
        "chunk_size": draw(st.integers(1, 8)),
    }


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("validate", VALIDATES)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=join_case())
def test_join_matches_brute_force(how: str, validate: str, case: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        p_files, f_files = [], []
        for i, piece in enumerate(split(case["primary"], case["primary_cuts"])):
            p_files.append(d / f"p{i}.root")
            write_rows(p_files[-1], piece)
        for i, piece in enumerate(split(case["friend"], case["friend_cuts"])):
            f_files.append(d / f"f{i}.root")
            write_rows(f_files[-1], piece, x="fx", j="fj")
        req = request(
            p_files,
            ["x", "j", "fx", "fj", "fr_matched"],
            chunk_size=case["chunk_size"],
            friends=[friend("fr", f_files, ["fx", "fj"], how=how, validate=validate)],
        )
        if violates(case["primary"], case["friend"], validate):
            event("validate violated")
            with pytest.raises(DuplicateKeyError, match="duplicated event key"):
                columnhub.deliver(req, output=d / "out", cache=False, workers=2)
            return
        event(f"joined ({how})")
        result = columnhub.deliver(req, output=d / "out", cache=False, workers=2)
        got = collections.Counter(
            rows_of(result, [*KEYS, "x", "j", "fx", "fj", "fr_matched"])
        )
    assert got == reference_join(case["primary"], case["friend"], how=how)


# ---------------------------------------------------------------------------
# real NanoAOD schema: split a file in two, shuffle/regroup/thin one half, join back

PRIMARY_BRANCHES = ["Jet_pt", "Jet_eta", "MET_pt"]
FRIEND_BRANCHES = ["Muon_pt", "Muon_charge", "Electron_pt", "PV_npvs"]


@pytest.fixture(scope="module")
def split_nano(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Any]:
    source = shared_data / "nano_tt_v12.root"
    d = tmp_path_factory.mktemp("split_nano")
    primary = regroup(source, output=d / "primary.root", branches=["Jet_*", "MET_pt"])
    friends = regroup(
        source,
        output=d / "friend",
        files=3,
        shuffle=True,
        subset=0.9,
        seed=7,
        branches=["Muon_*", "Electron_pt", "PV_npvs"],
    )
    with uproot.open(source) as f:
        original = f["Events"].arrays([*KEYS, *PRIMARY_BRANCHES, *FRIEND_BRANCHES], library="ak")
    kept = set()
    for path in friends:
        with uproot.open(path) as f:
            keys = f["Events"].arrays(list(KEYS), library="np")
        kept.update(zip(*(keys[k].tolist() for k in KEYS), strict=True))
    return {"primary": primary, "friends": friends, "original": original, "kept": kept}


@pytest.mark.parametrize("how", ["left", "inner"])
def test_real_schema_split_and_joined_back(
    split_nano: dict[str, Any], tmp_path: Path, how: str
) -> None:
    original = split_nano["original"]
    kept = split_nano["kept"]
    n = len(original)
    assert 0 < len(kept) < n  # some events were really dropped
    req = request(
        split_nano["primary"],
        [*PRIMARY_BRANCHES, *FRIEND_BRANCHES, "mu_matched"],
        chunk_size=37,
        friends=[friend("mu", split_nano["friends"], FRIEND_BRANCHES, how=how)],
    )
    out = columnhub.deliver(req, output=tmp_path / "out", cache=False).to_awkward().to_list()
    events = original.to_list()
    expected = [e for e in events if how == "left" or tuple(e[k] for k in KEYS) in kept]
    assert len(out) == len(expected)
    for got, want in zip(out, expected, strict=True):
        key = tuple(want[k] for k in KEYS)
        assert tuple(got[k] for k in KEYS) == key
        for b in PRIMARY_BRANCHES:
            assert got[b] == want[b], (b, key)
        present = key in kept
        assert got["mu_matched"] is present
        for b in FRIEND_BRANCHES:  # None exactly where the event was dropped from the friend
            assert got[b] == (want[b] if present else None), (b, key)


def test_define_listed_before_the_friend_column_it_reads(
    split_nano: dict[str, Any], tmp_path: Path
) -> None:
    """A friend column reached first as a dependency is joined once (it was read twice
    into one array, and a keyed join over several friend files then gathered wrong rows)."""
    original = split_nano["original"]
    kept = split_nano["kept"]
    req = request(
        split_nano["primary"],
        ["mu_sum", "Muon_pt", "Muon_charge"],
        define={"mu_sum": "sum(Muon_pt)"},
        chunk_size=37,
        friends=[friend("mu", split_nano["friends"], ["Muon_pt", "Muon_charge"])],
    )
    out = columnhub.deliver(req, output=tmp_path / "out", cache=False).to_awkward().to_list()
    for got, want in zip(out, original.to_list(), strict=True):
        key = tuple(want[k] for k in KEYS)
        present = key in kept
        assert got["Muon_pt"] == (want["Muon_pt"] if present else None), key
        assert got["Muon_charge"] == (want["Muon_charge"] if present else None), key
        assert got["mu_sum"] == (pytest.approx(sum(want["Muon_pt"])) if present else None)


# ---------------------------------------------------------------------------
# synthetic NanoAOD: aligned friends, systematics friends, define/where, augmentation

LIKE = "nano_tt_v12.root"
N_SYNTH = 1200


def read(files: list[Path], branches: list[str]) -> dict[str, Any]:
    """Branches of ``files`` concatenated, straight from uproot (the reference)."""
    parts = []
    for path in files:
        with uproot.open(path) as f:
            parts.append(f["Events"].arrays(branches, library="ak"))
    joined = ak.concatenate(parts)
    return {b: joined[b] for b in branches}


def by_key(columns: dict[str, Any], value: str) -> dict[tuple[int, int, int], Any]:
    keys = zip(*(np.asarray(columns[k]).tolist() for k in KEYS), strict=True)
    return dict(zip(keys, ak.to_list(columns[value]), strict=True))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, list[Path]]:
    """A primary, an aligned friend, shuffled / thinned friends: same event keys."""
    d = tmp_path_factory.mktemp("synth")
    like = shared_data / LIKE
    common = {"events": N_SYNTH, "files": 2, "basket_events": 400}
    return {
        "primary": synthesize(like, output=d / "primary", branches=["Jet_pt", "MET_pt"], **common),
        "aligned": synthesize(like, output=d / "aligned", branches=["MET_pt"], seed=1, **common),
        "up": synthesize(
            like, output=d / "up", branches=["MET_pt"], seed=2, shuffle=True, **common
        ),
        "down": synthesize(
            like,
            output=d / "down",
            branches=["MET_pt"],
            seed=3,
            subset=0.8,
            shuffle=True,
            events=N_SYNTH,
            files=3,
        ),
        "thinned": synthesize(
            like, output=d / "thinned", branches=["MET_pt"], seed=1, subset=0.9, **common
        ),
    }


def test_aligned_friend_on_identical_layout(synth: dict[str, list[Path]], tmp_path: Path) -> None:
    req = request(
        synth["primary"],
        ["MET_pt", "sys_MET_pt"],
        chunk_size=250,
        friends=[friend("sys", synth["aligned"], ["MET_pt"], match="aligned", prefix="sys_")],
    )
    out = columnhub.deliver(req, output=tmp_path / "out", cache=False).to_awkward()
    primary = read(synth["primary"], [*KEYS, "MET_pt"])
    aligned = read(synth["aligned"], [*KEYS, "MET_pt"])
    for k in KEYS:  # the synthetic keys agree entry by entry
        assert out[k].to_list() == primary[k].to_list() == aligned[k].to_list()
    assert out["MET_pt"].to_list() == primary["MET_pt"].to_list()
    assert out["sys_MET_pt"].to_list() == aligned["MET_pt"].to_list()
    assert out["sys_MET_pt"].to_list() != out["MET_pt"].to_list()  # another seed: other values


def test_aligned_friend_out_of_order_names_file_entry_and_keys(
    synth: dict[str, list[Path]], tmp_path: Path
) -> None:
    req = request(
        synth["primary"],
        ["sys_MET_pt"],
        chunk_size=10_000,
        friends=[friend("sys", synth["up"], ["MET_pt"], match="aligned", prefix="sys_")],
    )
    primary = read(synth["primary"][:1], list(KEYS))
    shuffled = read(synth["up"][:1], list(KEYS))
    differ = np.zeros(len(primary["event"]), dtype=bool)
    for k in KEYS:
        differ |= np.asarray(primary[k]) != np.asarray(shuffled[k])
    i = int(np.flatnonzero(differ)[0])
    with pytest.raises(KeyMismatchError) as err:
        columnhub.deliver(req, output=tmp_path / "out", cache=False, workers=1)
    text = str(err.value)
    assert str(synth["primary"][0]) in text
    assert str(synth["up"][0]) in text
    assert f"entry {i}" in text
    for side in (primary, shuffled):
        assert f"event={int(side['event'][i])}" in text
        assert f"luminosityBlock={int(side['luminosityBlock'][i])}" in text
    assert "match: keyed" in text


def test_aligned_friend_with_other_entry_counts(
    synth: dict[str, list[Path]], tmp_path: Path
) -> None:
    req = request(
        synth["primary"],
        ["sys_MET_pt"],
        friends=[friend("sys", synth["thinned"], ["MET_pt"], match="aligned", prefix="sys_")],
    )
    counts = [uproot.open(p)["Events"].num_entries for p in synth["thinned"]]
    with pytest.raises(KeyMismatchError, match="aligned") as err:
        columnhub.deliver(req, output=tmp_path / "out", cache=False)
    assert str(counts) in str(err.value)


def test_systematics_friends_in_define_and_where(
    synth: dict[str, list[Path]], tmp_path: Path
) -> None:
    req = request(
        synth["primary"],
        ["MET_pt", "up_MET_pt", "down_MET_pt", "down_matched", "shift", "ht"],
        define={"shift": "up_MET_pt - nom_MET_pt", "ht": "sum(Jet_pt)"},
        where="up_MET_pt > 30",
        chunk_size=300,
        friends=[
            friend("nom", synth["aligned"], ["MET_pt"], match="aligned", prefix="nom_"),
            friend("up", synth["up"], ["MET_pt"], prefix="up_"),
            friend("down", synth["down"], ["MET_pt"], prefix="down_"),
        ],
    )
    out = columnhub.deliver(req, output=tmp_path / "out", cache=False).to_awkward().to_list()
    primary = read(synth["primary"], [*KEYS, "MET_pt", "Jet_pt"])
    nom = by_key(read(synth["aligned"], [*KEYS, "MET_pt"]), "MET_pt")
    up = by_key(read(synth["up"], [*KEYS, "MET_pt"]), "MET_pt")
    down = by_key(read(synth["down"], [*KEYS, "MET_pt"]), "MET_pt")
    jets = by_key(primary, "Jet_pt")
    met = by_key(primary, "MET_pt")
    expected = [k for k in zip(*(primary[k].to_list() for k in KEYS), strict=True) if up[k] > 30]
    assert 0 < len(expected) < N_SYNTH
    assert [tuple(r[k] for k in KEYS) for r in out] == expected
    for row in out:
        key = tuple(row[k] for k in KEYS)
        assert row["MET_pt"] == met[key]
        assert row["up_MET_pt"] == up[key]
        assert row["down_MET_pt"] == down.get(key)
        assert row["down_matched"] is (key in down)
        assert row["shift"] == pytest.approx(np.float32(up[key]) - np.float32(nom[key]))
        assert row["ht"] == pytest.approx(sum(jets[key]), rel=1e-5)


def test_augmentation_loop_output_as_friend(synth: dict[str, list[Path]], tmp_path: Path) -> None:
    """Deliver derived columns once (with keys); join them into a later request."""
    first = columnhub.deliver(
        request(
            synth["primary"], ["ht", "njet"], define={"ht": "sum(Jet_pt)", "njet": "num(Jet_pt)"}
        ),
        output=tmp_path / "derived",
        cache=False,
    )
    assert first.manifest["keys"] == list(KEYS)
    later = request(
        synth["down"],  # another layout: 3 shuffled files holding 80% of the events
        ["MET_pt", "ht", "njet"],
        friends=[friend("aug", [tmp_path / "derived"], ["ht", "njet"], validate="many_to_one")],
    )
    out = columnhub.deliver(later, output=tmp_path / "later", cache=False).to_awkward().to_list()
    jets = by_key(read(synth["primary"], [*KEYS, "Jet_pt"]), "Jet_pt")
    assert len(out) == sum(uproot.open(p)["Events"].num_entries for p in synth["down"])
    for row in out:
        key = tuple(row[k] for k in KEYS)
        assert row["njet"] == len(jets[key])
        assert row["ht"] == pytest.approx(sum(jets[key]), rel=1e-5)


def test_name_clash_needs_a_prefix(synth: dict[str, list[Path]], tmp_path: Path) -> None:
    """A friend column keeps its own name; a name already taken names both owners."""
    for prefix in ({}, {"prefix": ""}):  # no prefix, or an empty one: MET_pt is the primary's
        clash_primary = request(
            synth["primary"], ["MET_pt"], friends=[friend("up", synth["up"], ["MET_pt"], **prefix)]
        )
        with pytest.raises(JoinError, match="prefix") as err:
            columnhub.deliver(clash_primary, output=tmp_path / "a", cache=False)
        assert "'MET_pt'" in str(err.value)
        assert "friend 'up'" in str(err.value)
        assert "dataset 'primary'" in str(err.value)
        assert "up_MET_pt" in str(err.value)  # the name a prefix would give
    clash_define = request(
        synth["primary"],
        ["up_MET_pt"],
        define={"up_MET_pt": "MET_pt * 2"},
        friends=[friend("up", synth["up"], ["MET_pt"], prefix="up_")],
    )
    with pytest.raises(JoinError, match="define 'up_MET_pt'"):
        columnhub.deliver(clash_define, output=tmp_path / "b", cache=False)
    two_friends = request(
        synth["primary"],
        ["sys_MET_pt"],
        friends=[
            friend("up", synth["up"], ["MET_pt"], prefix="sys_"),
            friend("down", synth["down"], ["MET_pt"], prefix="sys_"),
        ],
    )
    with pytest.raises(JoinError, match="friend 'up'") as err:
        columnhub.deliver(two_friends, output=tmp_path / "c", cache=False)
    assert "friend 'down'" in str(err.value)
    flag = request(  # the match flag is a name too
        synth["primary"],
        ["MET_pt"],
        define={"up_matched": "MET_pt > 0"},
        friends=[friend("up", synth["up"], ["MET_pt"], prefix="up_")],
    )
    with pytest.raises(JoinError, match="'up_matched'") as err:
        columnhub.deliver(flag, output=tmp_path / "d", cache=False)
    assert "define 'up_matched'" in str(err.value)


def test_friend_column_named_like_a_model_output(shared_data: Path, tmp_path: Path) -> None:
    from columnhub.inference.testing import make_mlp_onnx, write_card

    make_mlp_onnx(tmp_path / "models" / "evt" / "evt-1.onnx", n_features=1, hidden=(4,), seed=1)
    card = {"name": "evt", "version": 1, "file": "evt-1.onnx", "inputs": ["MET_pt"],
            "outputs": [{"name": "score"}]}
    write_card(tmp_path / "models" / "evt" / "1.yaml", card)
    source = shared_data / "nano_tt_v12.root"
    keys = uproot.open(source)["Events"].arrays(list(KEYS), library="np")
    with uproot.recreate(tmp_path / "ore.root") as f:
        f["Events"] = {**keys, "ore": np.arange(len(keys["event"]), dtype=np.float64)}
    req = request(
        [source],
        ["score", "sc_ore"],
        registry=str(tmp_path / "models"),
        models=[{"model": "evt", "version": 1}],
        friends=[friend("f", [tmp_path / "ore.root"], ["ore"], prefix="sc_")],
    )
    got = columnhub.deliver(req, output=tmp_path / "free", cache=False).to_awkward()
    assert got.sc_ore.to_list() == list(range(len(keys["event"])))  # same file, same order
    req["friends"][0]["prefix"] = "sc"  # 'sc' + 'ore' is the model's 'score'
    req["columns"] = ["score"]
    with pytest.raises(JoinError, match="'score'") as err:
        columnhub.deliver(req, output=tmp_path / "clash", cache=False)
    assert "model 'evt'" in str(err.value)
    assert "friend 'f'" in str(err.value)


def test_define_may_not_replace_a_branch(synth: dict[str, list[Path]], tmp_path: Path) -> None:
    """A define named like a primary branch is an error (it used to replace the branch)."""
    req = request(synth["primary"], ["MET_pt"], define={"MET_pt": "MET_pt * 2"})
    with pytest.raises(SpecError, match="define 'MET_pt'") as err:
        columnhub.deliver(req, output=tmp_path / "a", cache=False)
    assert "choose another name" in str(err.value)
    # the reference: an unused name works and holds twice the branch, read directly
    ok = columnhub.deliver(
        request(synth["primary"], ["MET_pt", "met2"], define={"met2": "MET_pt * 2"}),
        output=tmp_path / "b",
        cache=False,
    ).to_awkward()
    direct = read(synth["primary"], ["MET_pt"])["MET_pt"]
    assert ok["MET_pt"].to_list() == direct.to_list()
    assert ok["met2"].to_list() == (direct * 2).to_list()


def test_missing_friend_columns_suggest_closest(
    synth: dict[str, list[Path]], tmp_path: Path
) -> None:
    bad_column = request(
        synth["primary"], ["sys_MET_pt"], friends=[friend("sys", synth["up"], ["MET_ptt"])]
    )
    with pytest.raises(ColumnNotFoundError, match="'MET_ptt'") as err:
        columnhub.deliver(bad_column, output=tmp_path / "a", cache=False)
    assert "closest names: MET_pt" in str(err.value)
    bad_key = request(
        synth["primary"],
        ["sys_MET_pt"],
        friends=[friend("sys", synth["up"], ["MET_pt"], on=["run", "luminosityBlock", "evnt"])],
    )
    with pytest.raises(ColumnNotFoundError, match="'evnt'") as err:
        columnhub.deliver(bad_key, output=tmp_path / "b", cache=False)
    assert "closest names: event" in str(err.value)
    unknown = request(
        synth["primary"],
        ["sys_MET_px"],
        friends=[friend("sys", synth["up"], ["MET_pt"], prefix="sys_")],
    )
    with pytest.raises(ColumnNotFoundError, match="closest names: sys_MET_pt"):
        columnhub.deliver(unknown, output=tmp_path / "c", cache=False)


# ---------------------------------------------------------------------------
# key types, one_to_many expansion, right/outer tails


def write_keys(path: Path, keys: dict[str, np.ndarray], x: np.ndarray) -> Path:
    with uproot.recreate(path) as f:
        f["Events"] = {**keys, "x": x}
    return path


def cms_keys(event: np.ndarray, *, event_dtype: Any = np.uint64) -> dict[str, np.ndarray]:
    n = len(event)
    return {
        "run": np.ones(n, dtype=np.uint32),
        "luminosityBlock": np.ones(n, dtype=np.uint32),
        "event": np.asarray(event, dtype=event_dtype),
    }


def test_bad_key_types(tmp_path: Path) -> None:
    good = write_keys(tmp_path / "good.root", cms_keys(np.arange(5)), np.arange(5.0))
    floats = write_keys(
        tmp_path / "float.root", cms_keys(np.arange(5), event_dtype=np.float64), np.arange(5.0)
    )
    negative = write_keys(
        tmp_path / "negative.root",
        cms_keys(np.array([3, 1, -7, 0, 2]), event_dtype=np.int64),
        np.arange(5.0),
    )
    float_friend = request([good], ["f_x"], friends=[friend("f", [floats], ["x"], prefix="f_")])
    with pytest.raises(KeyTypeError, match="'event'") as err:
        columnhub.deliver(float_friend, output=tmp_path / "a", cache=False)
    assert "float" in str(err.value)
    negative_primary = request(
        [negative], ["f_x"], friends=[friend("f", [good], ["x"], prefix="f_")]
    )
    with pytest.raises(KeyTypeError, match="'event'") as err:
        columnhub.deliver(negative_primary, output=tmp_path / "b", cache=False)
    assert "-7" in str(err.value)


def test_one_to_many_expands_rows(tmp_path: Path) -> None:
    """One primary event, several friend rows (e.g. per-object records): one row per pair."""
    primary = write_keys(
        tmp_path / "p.root", cms_keys(np.array([10, 11, 12])), np.array([1.0, 2.0, 3.0])
    )
    objects = write_keys(
        tmp_path / "o.root",
        cms_keys(np.array([12, 10, 12, 13, 12])),
        np.array([120.0, 100.0, 121.0, 130.0, 122.0]),
    )
    req = request(
        [primary],
        ["x", "obj_x", "obj_matched"],
        friends=[friend("obj", [objects], ["x"], validate="one_to_many", prefix="obj_")],
    )
    rows = rows_of(
        columnhub.deliver(req, output=tmp_path / "left", cache=False),
        ["event", "x", "obj_x", "obj_matched"],
    )
    assert sorted(rows, key=repr) == sorted(
        [
            (10, 1.0, 100.0, True),
            (11, 2.0, None, False),
            (12, 3.0, 120.0, True),
            (12, 3.0, 121.0, True),
            (12, 3.0, 122.0, True),
        ],
        key=repr,
    )
    inner = dict(
        req,
        friends=[
            friend("obj", [objects], ["x"], validate="one_to_many", how="inner", prefix="obj_")
        ],
    )
    rows = rows_of(
        columnhub.deliver(inner, output=tmp_path / "inner", cache=False), ["event", "obj_x"]
    )
    assert sorted(rows) == [(10, 100.0), (12, 120.0), (12, 121.0), (12, 122.0)]
    # the primary's duplicates are refused: one_to_many needs unique primary keys
    dup_primary = write_keys(
        tmp_path / "dp.root", cms_keys(np.array([10, 10])), np.array([1.0, 2.0])
    )
    with pytest.raises(DuplicateKeyError, match="primary"):
        columnhub.deliver(
            dict(req, dataset={"name": "dp", "files": [str(dup_primary)]}),
            output=tmp_path / "d",
            cache=False,
        )


@pytest.mark.parametrize("how", ["right", "outer"])
def test_tail_rows_carry_keys_and_none(tmp_path: Path, how: str) -> None:
    primary = write_keys(
        tmp_path / "p.root", cms_keys(np.array([1, 2, 3])), np.array([1.0, 2.0, 3.0])
    )
    other = write_keys(
        tmp_path / "f.root", cms_keys(np.array([4, 2, 9])), np.array([40.0, 20.0, 90.0])
    )
    req = request(
        [primary],
        ["x", "twice", "f_x", "f_matched"],
        define={"twice": "x * 2"},
        friends=[friend("f", [other], ["x"], how=how, prefix="f_")],
    )
    result = columnhub.deliver(req, output=tmp_path / "out", cache=False)
    rows = rows_of(result, [*KEYS, "x", "twice", "f_x", "f_matched"])
    expected = [
        (1, 1, 2, 2.0, 4.0, 20.0, True),
        (1, 1, 4, None, None, 40.0, False),
        (1, 1, 9, None, None, 90.0, False),
    ]
    if how == "outer":
        expected += [(1, 1, 1, 1.0, 2.0, None, False), (1, 1, 3, 3.0, 6.0, None, False)]
    assert sorted(rows, key=repr) == sorted(expected, key=repr)
    schema = result.to_arrow().schema
    assert not schema.field("event").nullable  # keys are never missing
    assert schema.field("x").nullable


# ---------------------------------------------------------------------------
# cache: a rewritten friend never serves stale columns


def test_changed_friend_invalidates_only_friend_columns(tmp_path: Path) -> None:
    events = np.arange(40)
    primary = write_keys(tmp_path / "p.root", cms_keys(events), events * 1.0)
    friend_file = tmp_path / "f.root"
    write_keys(friend_file, cms_keys(events[::-1]), events[::-1] * 10.0)
    req = request(
        [primary],
        ["x", "f_x"],
        chunk_size=10,
        friends=[friend("f", [friend_file], ["x"], prefix="f_")],
    )
    cache = tmp_path / "cache"
    first = columnhub.deliver(req, output=tmp_path / "one", cache=cache)
    assert rows_of(first, ["event", "f_x"]) == [(e, e * 10.0) for e in events]
    chunks = len(first.manifest["chunks"])
    write_keys(friend_file, cms_keys(events[::-1]), events[::-1] * -3.0)  # same keys, new values
    second = columnhub.deliver(req, output=tmp_path / "two", cache=cache)
    assert rows_of(second, ["event", "x", "f_x"]) == [(e, e * 1.0, e * -3.0) for e in events]
    assert second.manifest["cache"].get("reused_result") is None
    for chunk in second.manifest["chunks"]:
        assert chunk["cache_hits"] == 4  # run, luminosityBlock, event, x
        assert chunk["cache_misses"] == 1  # f_x
    assert len(second.manifest["chunks"]) == chunks
    third = columnhub.deliver(req, output=tmp_path / "three", cache=cache)  # unchanged: all hits
    assert rows_of(third, ["event", "f_x"]) == [(e, e * -3.0) for e in events]
    assert third.manifest["cache"]["misses"] == 0


# ---------------------------------------------------------------------------
# CLI: every join error exits 2 with one clear message, no traceback


def test_cli_join_errors_exit_2(synth: dict[str, list[Path]], tmp_path: Path) -> None:
    dup = write_keys(tmp_path / "dup.root", cms_keys(np.array([1, 1, 2])), np.arange(3.0))
    floats = write_keys(
        tmp_path / "float.root", cms_keys(np.arange(3), event_dtype=np.float32), np.arange(3.0)
    )
    cases = {
        "duplicate": (
            request(synth["primary"], ["x"], friends=[friend("d", [dup], ["x"])]),
            "duplicated event key",
        ),
        "mismatch": (
            request(
                synth["primary"],
                ["s_MET_pt"],
                friends=[friend("s", synth["up"], ["MET_pt"], match="aligned", prefix="s_")],
            ),
            "aligned join: keys differ",
        ),
        "clash": (
            request(
                synth["primary"],
                ["MET_pt"],
                friends=[friend("s", synth["up"], ["MET_pt"], prefix="")],
            ),
            "give the friend a 'prefix'",
        ),
        "missing": (
            request(
                synth["primary"], ["s_MET_pt"], friends=[friend("s", synth["up"], ["MET_ptt"])]
            ),
            "closest names: MET_pt",
        ),
        "key_type": (
            request(synth["primary"], ["x"], friends=[friend("f", [floats], ["x"])]),
            "'event'",
        ),
    }
    procs = {}
    for name, (req, _) in cases.items():
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(json.dumps(req))  # JSON is YAML
        procs[name] = subprocess.Popen(
            [str(CLI), "deliver", str(spec), "-o", str(tmp_path / f"out-{name}"), "--no-cache"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, err)
        assert err.startswith("columnhub: error: "), (name, err)
        assert cases[name][1] in err, (name, err)
        assert "Traceback" not in err, (name, err)


def test_key_index_build_shows_progress(
    synth: dict[str, list[Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Building a friend's key index reads every file's keys: with bars on, one bar shows it."""
    from collections import OrderedDict

    from columnhub.join import provider

    monkeypatch.setattr(provider, "_memo", OrderedDict())  # built here, not by another test
    monkeypatch.setattr(provider, "_facts", OrderedDict())
    req = request(
        synth["primary"],
        ["up_MET_pt"],
        friends=[friend("up", synth["up"], ["MET_pt"], prefix="up_")],
    )
    columnhub.deliver(req, output=tmp_path / "bars", cache=False, progress=True)
    err = capsys.readouterr().err
    assert "key index of 'up'" in err
    assert f"{len(synth['up'])}/{len(synth['up'])}" in err
    # a progress callable hears of events only, as before
    calls: list[tuple[int, int]] = []
    columnhub.deliver(
        req, output=tmp_path / "calls", cache=False, progress=lambda d, t: calls.append((d, t))
    )
    total = sum(uproot.open(p)["Events"].num_entries for p in synth["primary"])
    assert calls
    assert calls[-1] == (total, total)
    assert "key index" not in capsys.readouterr().err


def test_key_indexes_in_memory_are_bounded_by_bytes(
    synth: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process keeps key indexes up to COLUMNHUB_INDEX_MEMORY bytes, the newest always."""
    from collections import OrderedDict

    from columnhub.datasets import resolve
    from columnhub.join import provider
    from columnhub.spec import DatasetSpec

    monkeypatch.setattr(provider, "_memo", OrderedDict())
    up = resolve(DatasetSpec(name="up", files=[str(p) for p in synth["up"]]))
    down = resolve(DatasetSpec(name="down", files=[str(p) for p in synth["down"]]))
    first = provider.dataset_index(up, list(KEYS))
    assert provider.dataset_index(up, list(KEYS)) is first  # kept: built once
    monkeypatch.setattr(provider, "_MEMO_BYTES", first.nbytes + 1)
    second = provider.dataset_index(down, list(KEYS))
    assert list(provider._memo.values()) == [second]  # both do not fit: the older went
    assert provider.dataset_index(up, list(KEYS)) is not first  # built again
    assert first.nbytes >= len(first) * 16  # packed key and row per event at least


# ---------------------------------------------------------------------------
# a Parquet -> Parquet keyed join never loads numba (0.75 s of every process)


def _imported(stderr: str) -> set[str]:
    """Every module a process imported, from its ``-X importtime`` lines."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:"):
            names.add(line.rsplit("|", 1)[-1].strip())
    return names


def _compiler(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in ("numba", "llvmlite"))


def test_the_import_check_sees_numba() -> None:
    """The check below can fail: a process that loads numba is seen doing it."""
    code = "import numpy as np; from columnhub import _kernels; _kernels._load_numba()"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        check=True, capture_output=True, text=True, timeout=300,
    )
    assert "numba" in _compiler(_imported(done.stderr))


def parquet_join_inputs(tmp_path: Path, *, n: int = 3000) -> dict[str, Any]:
    """A primary in key order (row groups of 1000) and a shuffled friend (row groups of 700)
    missing 200 of its events, with a flat and a jagged column; event numbers above 2**63.

    Returns the paths, the primary table, and per event number the friend's values.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(7)
    event = np.sort(rng.choice(2**40, n, replace=False)).astype(np.uint64) + np.uint64(2**63)
    primary = pa.table({
        "run": np.full(n, 316000, dtype=np.uint32),
        "luminosityBlock": (1 + np.arange(n) // 700).astype(np.uint32),
        "event": event,
        "MET_pt": rng.random(n).astype(np.float32),
        "PV_npvs": rng.integers(0, 60, n).astype(np.int32),
    })
    pq.write_table(primary, tmp_path / "primary.parquet", row_group_size=1000)
    keep = rng.permutation(n)[: n - 200]  # 200 primary events without a partner
    counts = rng.poisson(3, len(keep))
    jets = [list(rng.random(c).astype(np.float32)) for c in counts]
    friend_table = pa.table({
        "run": primary["run"].to_numpy()[keep],
        "luminosityBlock": primary["luminosityBlock"].to_numpy()[keep],
        "event": event[keep],
        "x": rng.random(len(keep)),
        "jets": pa.array(jets, type=pa.list_(pa.float32())),
    })
    pq.write_table(friend_table, tmp_path / "friend.parquet", row_group_size=700)
    truth = {
        int(e): (float(x), [float(v) for v in j])
        for e, x, j in zip(event[keep], friend_table["x"].to_numpy(), jets, strict=True)
    }
    spec = {
        "dataset": {"name": "p", "files": [str(tmp_path / "primary.parquet")]},
        "friends": [friend("f", [tmp_path / "friend.parquet"], ["x", "jets"], how="left")],
        "chunk_size": 1000,
    }
    return {"spec": spec, "primary": primary, "truth": truth}


def check_parquet_join(out: Path, inputs: dict[str, Any], column: str) -> dict[str, Any]:
    """The delivered rows against the primary (in order) and a dict join; the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = json.loads((out / "manifest.json").read_text())
    table = pa.concat_tables(pq.read_table(out / name) for name in manifest["files"])
    primary, truth = inputs["primary"], inputs["truth"]
    assert table["event"].to_pylist() == primary["event"].to_pylist()
    assert table[column].to_pylist() == primary[column].to_pylist()
    for e, x, j in zip(
        table["event"].to_pylist(), table["x"].to_pylist(), table["jets"].to_pylist(), strict=True
    ):
        want = truth.get(e)
        assert (x, j) == ((None, None) if want is None else want)
    return manifest


@pytest.mark.parametrize("exchange", ["on", "off"])
def test_keyed_parquet_join_through_the_cli_never_loads_numba(
    tmp_path: Path, exchange: str
) -> None:
    """A cold keyed LEFT JOIN of a shuffled Parquet friend (flat + jagged columns), then a
    later request over the same friend, through the ``columnhub`` entry point: the key
    indexes, the matching, the friend exchange (or the per-chunk fetch plan) and the
    gathers all run without numba; the output equals a dict join of the inputs."""
    inputs = parquet_join_inputs(tmp_path)
    env = {**os.environ, "COLUMNHUB_EXCHANGE": "1" if exchange == "on" else "0"}
    for number, columns in enumerate([["MET_pt", "x", "jets"], ["PV_npvs", "x", "jets"]]):
        path = tmp_path / f"spec-{number}.json"
        path.write_text(json.dumps({**inputs["spec"], "columns": columns}))
        out = tmp_path / f"out-{number}"
        done = subprocess.run(
            [sys.executable, "-X", "importtime", str(CLI), "deliver", str(path), "-o", str(out),
             "--cache", str(tmp_path / "cache"), "--no-progress"],
            check=False, capture_output=True, text=True, timeout=300, env=env,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert _compiler(_imported(done.stderr)) == []
        manifest = check_parquet_join(out, inputs, columns[0])
        if number == 0:
            assert manifest["friend_exchange"]["f"]["ran"] == (exchange == "on")


def _cold_memory(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The key indexes and facts a process holds, emptied (a new process)."""
    from collections import OrderedDict

    from columnhub.join import provider

    monkeypatch.setattr(provider, "_memo", OrderedDict())
    monkeypatch.setattr(provider, "_facts", OrderedDict())
    return provider


def test_primary_keys_are_read_once_per_cold_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The primary's key index (one_to_one) and the matching share one read of the keys:
    every primary entry's key columns are read from the file once, and a cold request
    still counts no cache hit."""
    from columnhub import sources

    inputs = parquet_join_inputs(tmp_path)
    _cold_memory(monkeypatch)
    primary_file = str(tmp_path / "primary.parquet")
    entries_read: collections.Counter[str] = collections.Counter()
    real_read = sources.read

    def counting_read(file: Any, spec: Any, columns: Any, **where: Any) -> Any:
        if file.path == primary_file:
            for name in columns:
                entries_read[name] += where["stop"] - where["start"]
        return real_read(file, spec, columns, **where)

    monkeypatch.setattr(sources, "read", counting_read)
    result = columnhub.deliver(
        {**inputs["spec"], "columns": ["MET_pt", "x", "jets"]},
        output=tmp_path / "out", cache=tmp_path / "cache",
    )
    n = inputs["primary"].num_rows
    assert {k: entries_read[k] for k in KEYS} == dict.fromkeys(KEYS, n)
    assert entries_read["MET_pt"] == n
    assert result.manifest["cache"]["hits"] == 0
    check_parquet_join(tmp_path / "out", inputs, "MET_pt")


def test_later_request_with_cached_friend_columns_loads_no_key_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation takes the facts stored next to each key index: a later request whose
    chunks find the friend's columns in the cache loads neither index (tens of MB each);
    one whose chunks miss them loads the friend's index when a chunk needs it."""
    inputs = parquet_join_inputs(tmp_path)
    cache = tmp_path / "cache"
    provider = _cold_memory(monkeypatch)
    columnhub.deliver({**inputs["spec"], "columns": ["MET_pt", "x", "jets"]},
                      output=tmp_path / "first", cache=cache)
    assert len(provider._memo) == 2  # the friend's and the primary's, built

    provider = _cold_memory(monkeypatch)
    later = columnhub.deliver({**inputs["spec"], "columns": ["PV_npvs", "x", "jets"]},
                              output=tmp_path / "later", cache=cache)
    assert not provider._memo  # no index loaded
    assert len(provider._facts) == 2
    assert later.manifest["friend_exchange"]["f"]["ran"] is False
    check_parquet_join(tmp_path / "later", inputs, "PV_npvs")

    provider = _cold_memory(monkeypatch)  # other chunks: the friend's columns are not cached
    other = columnhub.deliver({**inputs["spec"], "columns": ["PV_npvs", "x", "jets"],
                               "chunk_size": 700}, output=tmp_path / "other", cache=cache)
    assert [i.names for i in provider._memo.values()] == [KEYS]  # the friend's, loaded
    assert other.manifest["friend_exchange"]["f"]["ran"] is True
    check_parquet_join(tmp_path / "other", inputs, "PV_npvs")


def test_key_indexes_are_in_the_cache_when_deliver_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index is written on a thread of its own while the request goes on; deliver
    waits for the write, so the next process finds it, equal to the one built."""
    from columnhub.cache import ColumnCache
    from columnhub.join.index import KeyIndex

    inputs = parquet_join_inputs(tmp_path)
    provider = _cold_memory(monkeypatch)
    columnhub.deliver({**inputs["spec"], "columns": ["MET_pt", "x", "jets"]},
                      output=tmp_path / "first", cache=tmp_path / "cache")
    assert not provider._pending  # every write waited for
    cache = ColumnCache(tmp_path / "cache")
    assert len(provider._memo) == 2  # the friend's and the primary's, built
    stored_keys = [key for key in provider._memo if cache.contains(key)]
    assert len(stored_keys) == 1  # the friend's: a left join keeps no primary index
    for key in stored_keys:
        built = provider._memo[key]
        blob = cache.get_bytes(key)
        assert blob is not None
        stored = KeyIndex.from_bytes(blob)
        assert np.array_equal(stored.sorted_words, built.sorted_words)
        assert np.array_equal(stored.order, built.order)
        assert stored.packing == built.packing


def test_a_failed_index_write_is_reported_by_wait_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from columnhub.cache import ColumnCache, entry_key
    from columnhub.errors import CacheError
    from columnhub.join.index import KeyIndex

    provider = _cold_memory(monkeypatch)
    index = KeyIndex.build({"event": np.arange(10, dtype=np.uint64)})

    class Full(ColumnCache):
        def put_bytes(self, key: str, data: Any) -> None:
            msg = f"cannot write cache entry {key}: No space left on device"
            raise CacheError(msg)

    provider._store_later(ColumnCache(tmp_path / "ok"), entry_key(kind="t", n=1), index)
    provider._store_later(Full(tmp_path / "full"), entry_key(kind="t", n=2), index)
    errors = provider.wait_stored()
    assert [type(e) for e in errors] == [CacheError]
    assert "No space left" in str(errors[0])
    assert provider.wait_stored() == []  # reported once: nothing pending any more
    blob = ColumnCache(tmp_path / "ok").get_bytes(entry_key(kind="t", n=1))
    assert blob is not None
    assert np.array_equal(KeyIndex.from_bytes(blob).sorted_words, index.sorted_words)


def test_a_key_index_the_cache_cannot_take_costs_a_warning_not_the_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from columnhub.errors import CacheError
    from columnhub.join.index import KeyIndex

    inputs = parquet_join_inputs(tmp_path)
    _cold_memory(monkeypatch)

    def full(self: KeyIndex) -> Any:
        msg = "cannot write cache entry: No space left on device"
        raise CacheError(msg)

    monkeypatch.setattr(KeyIndex, "to_chunks", full)
    with pytest.warns(RuntimeWarning, match="could not store a key index.*No space left"):
        result = columnhub.deliver({**inputs["spec"], "columns": ["MET_pt", "x", "jets"]},
                                   output=tmp_path / "out", cache=tmp_path / "cache")
    assert result.manifest["complete"] is True
    assert result.manifest["cache"]["partial"] is True
    assert "No space left" in result.manifest["cache"]["error"]
    check_parquet_join(tmp_path / "out", inputs, "MET_pt")


def test_duplicates_reported_alike_from_index_facts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A friend with repeated keys fails validation the same way whether its index is
    built or only its cached facts are read (keys, counts and locations in the message)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    inputs = parquet_join_inputs(tmp_path)
    friend_table = pq.read_table(tmp_path / "friend.parquet")
    dup = pa.concat_tables([friend_table, friend_table.slice(10, 3), friend_table.slice(500, 1)])
    pq.write_table(dup, tmp_path / "dup.parquet", row_group_size=700)
    spec = {**inputs["spec"], "columns": ["MET_pt", "x"],
            "friends": [friend("f", [tmp_path / "dup.parquet"], ["x", "jets"])]}
    messages = []
    for _ in range(2):
        provider = _cold_memory(monkeypatch)
        with pytest.raises(DuplicateKeyError) as err:
            columnhub.deliver(spec, output=tmp_path / "out", cache=tmp_path / "cache")
        messages.append(str(err.value))
    assert not provider._memo  # the second time from the facts alone
    assert messages[0] == messages[1]
    events = friend_table["event"].to_pylist()
    assert "4 duplicated event key(s)" in messages[0]
    for row in (10, 11, 12, 500):
        assert f"event={events[row]}) x2 at " in messages[0]
        assert f"dup.parquet entry {row}," in messages[0]


@settings(max_examples=80, deadline=None)
@given(
    lists=st.lists(
        st.one_of(st.none(), st.lists(st.one_of(st.none(), st.floats(-9, 9, width=32)), max_size=4)),
        max_size=12,
    ),
    rows=st.lists(st.integers(-1, 11), max_size=15),
    optional=st.booleans(),
    source=st.sampled_from(["arrow", "awkward"]),
    compiled=st.booleans(),
)
def test_gather_of_option_typed_numbers_equals_python(
    lists: list[list[float | None] | None],
    rows: list[int],
    optional: bool,
    source: str,
    compiled: bool,
) -> None:
    """Option-typed numbers and lists of them (Parquet's nullable fields: bit masks from
    Arrow; byte masks and unmasked from awkward) gathered with the numpy or the compiled
    kernels: the Python lists' values, the types of an index view over the source."""
    import pyarrow as pa

    from columnhub import _kernels
    from columnhub.join.gather import compact, gather

    flat_values = [None if v is None else (v[0] if v and v[0] is not None else None) for v in lists]
    item_lists = [v if v is not None else [] for v in lists]  # the list column's lists
    if source == "arrow":
        arrays = [
            ak.from_arrow(pa.array(flat_values, type=pa.float32())),
            ak.from_arrow(pa.array(item_lists, type=pa.list_(pa.float32()))),
        ]
    else:
        arrays = [ak.Array(flat_values), ak.Array(item_lists)]
    rows = [r for r in rows if r < len(lists) and (optional or r >= 0)]
    idx = np.array(rows, dtype=np.int64)
    saved = _kernels.numba_loaded
    _kernels.numba_loaded = lambda: compiled  # type: ignore[assignment]
    try:
        for array, plain in zip(arrays, [flat_values, item_lists], strict=True):
            got = compact(gather(array, idx, optional=optional))
            assert got.tolist() == [plain[r] if r >= 0 else None for r in rows]
            # awkward's own index view over the source: same type
            index = ak.index.Index64(idx)
            view = (
                ak.contents.IndexedOptionArray.simplified(index, array.layout)
                if optional
                else ak.contents.IndexedArray.simplified(index, array.layout)
            )
            assert str(got.type) == str(ak.Array(view).type)
    finally:
        _kernels.numba_loaded = saved  # type: ignore[assignment]


def test_facts_of_an_index_held_in_memory_are_made_from_it(
    synth: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index a process still holds whose facts it no longer holds (a long-running
    service forgets facts first): the facts come from the index, uniqueness included."""
    from columnhub.datasets import resolve
    from columnhub.spec import DatasetSpec

    provider = _cold_memory(monkeypatch)
    up = resolve(DatasetSpec(name="up", files=[str(p) for p in synth["up"]]))
    index = provider.dataset_index(up, list(KEYS))
    provider._facts.clear()
    facts = provider.index_facts(up, list(KEYS))
    assert (facts.rows, facts.is_unique) == (len(index), index.is_unique) == (len(index), True)
