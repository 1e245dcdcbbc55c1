"""Friend joins through the full delivery path (``columnhub.deliver`` and the CLI).

Every join here is checked against an independent reference written in this
file: a brute-force dictionary lookup over the rows as written to ROOT, or a
direct uproot read of the original file.
"""

from __future__ import annotations

import collections
import json
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


def friend(name: str, files: list[Path] | list[str], columns: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": {"name": name, "files": [str(f) for f in files]},
        "columns": columns,
        **extra,
    }


def request(files: list[Path] | list[str], columns: list[str], **extra: Any) -> dict[str, Any]:
    return {"dataset": {"name": "primary", "files": [str(f) for f in files]}, "columns": columns, **extra}


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
    return [rows[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


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
            ["x", "j", "fr.fx", "fr.fj", "fr.matched"],
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
            rows_of(result, [*KEYS, "x", "j", "fr.fx", "fr.fj", "fr.matched"])
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
def test_real_schema_split_and_joined_back(split_nano: dict[str, Any], tmp_path: Path, how: str) -> None:
    original = split_nano["original"]
    kept = split_nano["kept"]
    n = len(original)
    assert 0 < len(kept) < n  # some events were really dropped
    req = request(
        split_nano["primary"],
        [*PRIMARY_BRANCHES, *(f"mu.{b}" for b in FRIEND_BRANCHES), "mu.matched"],
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
        assert got["mu.matched"] is present
        for b in FRIEND_BRANCHES:  # None exactly where the event was dropped from the friend
            assert got[f"mu.{b}"] == (want[b] if present else None), (b, key)
