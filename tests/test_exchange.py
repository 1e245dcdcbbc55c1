"""The friend exchange: a scattered keyed friend is read once per request.

Friends here are shuffled, re-sorted (by a value column) or regrouped into
other files in nearly the primary's order, written with pyarrow or uproot in
``tmp_path``. Every result is checked against a brute-force dictionary join
written in this file and against the per-chunk path
(``$COLUMNHUB_EXCHANGE=0``); reads are checked against the friend files' own
row groups and baskets, read with pyarrow and uproot.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uproot
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import columnhub
from columnhub.errors import JoinError, SpecError
from columnhub.join.exchange import MEMORY_ENV, SWITCH_ENV, memory_budget

KEYS = ("run", "luminosityBlock", "event")
N = 3000
CHUNK = 500  # 6 primary chunks of 2 row groups each


# ---------------------------------------------------------------------------
# data: values are functions of the event number, so the reference is a dict


def keys_of(events: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "run": np.ones(len(events), dtype=np.uint32),
        "luminosityBlock": (events // 100).astype(np.uint32),
        "event": events.astype(np.uint64),
    }


def fx_of(events: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return np.sin(events.astype(np.float64)) * 100.0 * scale


def fj_of(events: np.ndarray, scale: float = 1.0) -> ak.Array:
    counts = (events * 7) % 5  # 0..4 items an event
    pieces = [np.cos(e + np.arange(c)) * scale for e, c in zip(events, counts, strict=True)]
    flat = np.concatenate([np.zeros(0), *pieces])
    return ak.unflatten(flat.astype(np.float64), counts.astype(np.int64))


def write_primary(path: Path, events: np.ndarray, *, row_group: int = 250) -> Path:
    table = pa.table(
        {
            **keys_of(events),
            "x": events.astype(np.float64) * 0.5,
            "y": events.astype(np.int64) % 13,
        }
    )
    pq.write_table(table, path, row_group_size=row_group)
    return path


def write_friend_parquet(
    path: Path, events: np.ndarray, *, row_group: int = 400, scale: float = 1.0
) -> Path:
    table = pa.table(
        {
            **keys_of(events),
            "fx": fx_of(events, scale),
            "fj": ak.to_arrow(fj_of(events, scale), extensionarray=False),
        }
    )
    pq.write_table(table, path, row_group_size=row_group)
    return path


def write_friend_root(path: Path, events: np.ndarray, *, basket: int = 300) -> Path:
    """A ROOT friend, one basket per ``basket`` events (one ``extend`` each)."""
    with uproot.recreate(path) as f:
        tree = f.mktree(
            "Events",
            {"run": np.uint32, "luminosityBlock": np.uint32, "event": np.uint64,
             "fx": np.float64, "fj": "var * float64"},
        )
        for i in range(0, len(events), basket):
            part = events[i : i + basket]
            tree.extend({**keys_of(part), "fx": fx_of(part), "fj": fj_of(part)})
    return path


def make_friend(kind: str, d: Path, seed: int = 0) -> list[Path]:
    """A friend of the events ``0..N``, 90 % of them, laid out as ``kind``."""
    rng = np.random.default_rng(seed)
    kept = np.sort(rng.permutation(N)[: int(0.9 * N)])
    if kind == "shuffled":
        return [write_friend_parquet(d / "friend.parquet", rng.permutation(kept))]
    if kind == "resorted":  # re-sorted by a value column: scattered relative to the keys
        return [write_friend_parquet(d / "friend.parquet", kept[np.argsort(fx_of(kept))])]
    if kind == "regrouped":  # nearly the primary's order, in 3 ROOT files of other baskets
        order = kept.copy()
        swaps = rng.integers(0, len(order) - 1, size=40)
        order[swaps], order[swaps + 1] = order[swaps + 1], order[swaps]
        return [
            write_friend_root(d / f"friend{i}.root", part)
            for i, part in enumerate(np.array_split(order, 3))
        ]
    raise AssertionError(kind)


def request(
    primary: Path, friend_files: list[Path], columns: list[str], **friend: Any
) -> dict[str, Any]:
    return {
        "dataset": {"name": "primary", "files": [str(primary)]},
        "columns": columns,
        "chunk_size": CHUNK,
        "friends": [
            {
                "name": "f",
                "dataset": {"name": "f", "files": [str(f) for f in friend_files]},
                "columns": ["fx", "fj"],
                **friend,
            }
        ],
    }


def friend_events(files: list[Path]) -> np.ndarray:
    """The friend's event numbers, read directly from its files."""
    out = []
    for f in files:
        if f.suffix == ".parquet":
            out.append(pq.read_table(f, columns=["event"]).column("event").to_numpy())
        else:
            with uproot.open(f) as r:
                out.append(r["Events"]["event"].array(library="np"))
    return np.concatenate(out)


def reference(
    primary: np.ndarray, friend: np.ndarray, *, how: str, scale: float = 1.0
) -> list[tuple[Any, ...]]:
    """Brute force: ``(event, x, fx, fj, matched)`` per output row, in primary order."""
    fx = dict(zip(friend.tolist(), fx_of(friend, scale).tolist(), strict=True))
    fj = dict(zip(friend.tolist(), ak.to_list(fj_of(friend, scale)), strict=True))
    out = []
    for e in primary.tolist():
        if e in fx:
            out.append((e, e * 0.5, fx[e], fj[e], True))
        elif how == "left":
            out.append((e, e * 0.5, None, None, False))
    return out


def rows(result: columnhub.Result) -> list[tuple[Any, ...]]:
    table = result.to_arrow().to_pylist()
    return [(r["event"], r["x"], r["fx"], r["fj"], r["f_matched"]) for r in table]


def file_groups(path: Path) -> list[tuple[int, int]]:
    """Entry ranges of the row groups (Parquet) or baskets (ROOT) of one file."""
    if path.suffix == ".parquet":
        md = pq.ParquetFile(path).metadata
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    else:
        with uproot.open(path) as r:
            edges = r["Events"]["fx"].entry_offsets
        sizes = list(np.diff(edges))
    edges = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))


def assert_each_group_read_once(manifest: dict[str, Any], files: list[Path]) -> None:
    """No friend row group / basket is touched by two reads, nor by a chunk task."""
    exchange = manifest["friend_exchange"]["f"]
    assert exchange["ran"], exchange
    for chunk in manifest["chunks"]:
        assert chunk["friend_entries_read"] == 0
        assert chunk["friend_bytes"] == {}
    assert exchange["chunk_bytes_read"] == 0
    reads: dict[str, list[tuple[int, int]]] = {}
    for path, start, stop in exchange["reads"]:
        reads.setdefault(path, []).append((start, stop))
    for f in files:
        for lo, hi in file_groups(f):
            touching = [r for r in reads.get(str(f), []) if r[0] < hi and r[1] > lo]
            assert len(touching) <= 1, (f, lo, hi, touching)
    total = sum(stop - start for r in reads.values() for start, stop in r)
    assert total <= len(friend_events(files))
    assert exchange["bytes_read"] > 0
    assert exchange["bytes_stored"] > 0


@pytest.fixture
def primary(tmp_path: Path) -> Path:
    return write_primary(tmp_path / "primary.parquet", np.arange(N))


# ---------------------------------------------------------------------------
# read once, same values as the per-chunk path and the brute force


@pytest.mark.parametrize("how", ["left", "inner"])
@pytest.mark.parametrize("kind", ["shuffled", "resorted", "regrouped"])
def test_friend_read_once_and_joined_right(
    primary: Path, tmp_path: Path, kind: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_friend(kind, tmp_path)
    req = request(primary, files, ["event", "x", "fx", "fj", "f_matched"], how=how)
    result = columnhub.deliver(req, output=tmp_path / "on", cache=tmp_path / "cache")
    assert len(result.manifest["chunks"]) == N // CHUNK
    assert rows(result) == reference(np.arange(N), friend_events(files), how=how)
    assert_each_group_read_once(result.manifest, files)
    # the per-chunk path, for comparison: same table, types included
    monkeypatch.setenv(SWITCH_ENV, "0")
    off = columnhub.deliver(req, output=tmp_path / "off", cache=False)
    assert off.manifest["friend_exchange"]["f"]["ran"] is False
    assert off.to_arrow().equals(result.to_arrow())
    if kind != "regrouped":  # scattered: every chunk read (nearly) the whole friend
        read = sum(c["friend_entries_read"] for c in off.manifest["chunks"])
        assert read > 3 * len(friend_events(files))


def test_later_request_with_other_primary_columns_reads_no_friend(
    primary: Path, tmp_path: Path
) -> None:
    files = make_friend("shuffled", tmp_path)
    cache = tmp_path / "cache"
    first = columnhub.deliver(
        request(primary, files, ["event", "x", "fx", "fj", "f_matched"]),
        output=tmp_path / "one",
        cache=cache,
    )
    assert first.manifest["friend_exchange"]["f"]["ran"]
    # the exchange's columns are misses of this request, not hits
    assert first.manifest["cache"]["hits"] == 0
    second = columnhub.deliver(
        request(primary, files, ["event", "x", "y", "fx", "fj", "f_matched"]),
        output=tmp_path / "two",
        cache=cache,
    )
    exchange = second.manifest["friend_exchange"]["f"]
    assert exchange["ran"] is False and exchange["reason"].startswith("cached")
    assert exchange["bytes_read"] == 0
    for chunk in second.manifest["chunks"]:
        assert chunk["friend_entries_read"] == 0
        assert chunk["read"] == ["y"]  # only the new primary column is read
    expected = reference(np.arange(N), friend_events(files), how="left")
    assert rows(second) == expected
    assert second.to_arrow().column("y").to_pylist() == [e % 13 for e in range(N)]


def test_spill_in_rounds_gives_the_same_result(
    primary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_friend("shuffled", tmp_path)
    req = request(primary, files, ["event", "x", "fx", "fj", "f_matched"])
    memory = columnhub.deliver(req, output=tmp_path / "memory", cache=tmp_path / "c1")
    assert memory.manifest["friend_exchange"]["f"]["rounds"] == 0
    monkeypatch.setenv(MEMORY_ENV, "2000")  # a few kB: a round per block
    spilled = columnhub.deliver(req, output=tmp_path / "spilled", cache=tmp_path / "c2")
    exchange = spilled.manifest["friend_exchange"]["f"]
    assert exchange["rounds"] >= 2
    assert_each_group_read_once(spilled.manifest, files)
    assert spilled.to_arrow().equals(memory.to_arrow())
    assert rows(spilled) == reference(np.arange(N), friend_events(files), how="left")
    assert not list(tmp_path.rglob(".exchange"))  # the spill store is gone


@pytest.mark.parametrize("kind", ["shuffled", "regrouped"])
def test_without_a_cache_a_temporary_store_is_used_and_removed(
    primary: Path, tmp_path: Path, kind: str
) -> None:
    files = make_friend(kind, tmp_path)
    req = request(primary, files, ["event", "x", "fx", "fj", "f_matched"], how="inner")
    result = columnhub.deliver(req, output=tmp_path / "out", cache=False)
    assert_each_group_read_once(result.manifest, files)
    assert rows(result) == reference(np.arange(N), friend_events(files), how="inner")
    assert not list((tmp_path / "out").rglob(".exchange"))
    hidden = [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    assert set(hidden) <= {".columnhub.lock"}  # no staging, no temporary store left


def test_changed_friend_is_never_served_from_exchanged_entries(
    primary: Path, tmp_path: Path
) -> None:
    d = tmp_path / "friend"
    d.mkdir()
    files = make_friend("shuffled", d)
    cache = tmp_path / "cache"
    req = request(primary, files, ["event", "x", "fx", "fj", "f_matched"])
    first = columnhub.deliver(req, output=tmp_path / "one", cache=cache)
    events = friend_events(files)
    assert rows(first) == reference(np.arange(N), events, how="left")
    # same keys in the same order, other values (and another size: a new identity)
    write_friend_parquet(files[0], events, scale=-3.0, row_group=300)
    second = columnhub.deliver(req, output=tmp_path / "two", cache=cache)
    assert second.manifest["friend_exchange"]["f"]["ran"]
    assert rows(second) == reference(np.arange(N), events, how="left", scale=-3.0)
    assert_each_group_read_once(second.manifest, files)


@pytest.mark.parametrize("coverage", ["every event", "90 % of events"])
def test_in_memory_exchange_gives_the_bytes_of_pieces_and_of_the_per_chunk_path(
    primary: Path, tmp_path: Path, coverage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Arrow-native in-memory exchange, the exchange through per-chunk pieces and
    the per-chunk path write byte-identical parts (types included: a friend that
    matches every event still gives option types), equal to the brute force."""
    rng = np.random.default_rng(5)
    events = np.arange(N) if coverage == "every event" else np.sort(rng.permutation(N)[:2700])
    files = [write_friend_parquet(tmp_path / "friend.parquet", rng.permutation(events))]
    req = request(primary, files, ["event", "x", "fx", "fj", "f_matched"])
    req["output"] = {"target_part_bytes": 40_000}  # several parts
    held = columnhub.deliver(req, output=tmp_path / "held", cache=tmp_path / "c1", workers=2)
    assert len(held.files) >= 2
    exchange = held.manifest["friend_exchange"]["f"]
    assert exchange["ran"], exchange
    assert exchange["in_memory"], exchange
    assert_each_group_read_once(held.manifest, files)
    assert rows(held) == reference(np.arange(N), events, how="left")
    needed = sum(
        pq.ParquetFile(files[0]).metadata.row_group(g).column(c).total_uncompressed_size
        for g in range(pq.ParquetFile(files[0]).metadata.num_row_groups)
        for c in (3, 4)  # fx, fj
    )
    monkeypatch.setenv(MEMORY_ENV, str(needed))  # the columns fit once, not twice
    pieces = columnhub.deliver(req, output=tmp_path / "pieces", cache=tmp_path / "c2")
    assert pieces.manifest["friend_exchange"]["f"]["ran"]
    assert not pieces.manifest["friend_exchange"]["f"]["in_memory"]
    monkeypatch.setenv(SWITCH_ENV, "0")
    off = columnhub.deliver(req, output=tmp_path / "off", cache=tmp_path / "c3")
    assert not off.manifest["friend_exchange"]["f"]["ran"]
    monkeypatch.delenv(SWITCH_ENV)
    monkeypatch.delenv(MEMORY_ENV)
    one = columnhub.deliver(req, output=tmp_path / "one", cache=tmp_path / "c4", workers=1)
    assert one.manifest["friend_exchange"]["f"]["in_memory"]
    for result in (pieces, off, one):
        assert [p.read_bytes() for p in result.files] == [p.read_bytes() for p in held.files]


def test_in_memory_exchange_leaves_every_column_in_the_cache_and_a_lost_write_is_a_miss(
    primary: Path, tmp_path: Path
) -> None:
    """The cache writes behind the chunk tasks are all done when deliver returns (a
    later request reads the friend from the cache alone); an entry whose data never
    reached the disk (zeroed, cut short) is a miss and is recomputed right."""
    from columnhub.cache import ColumnCache

    files = make_friend("shuffled", tmp_path)
    cache = tmp_path / "cache"
    first = columnhub.deliver(
        request(primary, files, ["event", "x", "fx", "fj", "f_matched"]),
        output=tmp_path / "one",
        cache=cache,
    )
    assert first.manifest["friend_exchange"]["f"]["in_memory"]
    later = request(primary, files, ["event", "x", "y", "fx", "fj", "f_matched"])
    second = columnhub.deliver(later, output=tmp_path / "two", cache=cache)
    assert second.manifest["friend_exchange"]["f"]["reason"].startswith("cached")
    assert all(c["friend_entries_read"] == 0 for c in second.manifest["chunks"])
    expected = reference(np.arange(N), friend_events(files), how="left")
    assert rows(second) == expected
    # what a crash before the data reached the disk leaves: the size with zeros, a
    # first page only, nothing
    entries = sorted(p for p in (cache / "objects").rglob("*") if p.is_file())
    for i, path in enumerate(entries):
        size = path.stat().st_size
        if i % 3 == 0:
            path.write_bytes(bytes(size))
        elif i % 3 == 1:
            keep = min(4096, size // 2)
            path.write_bytes(path.read_bytes()[:keep] + bytes(size - keep))
        else:
            path.write_bytes(b"")
    shutil.rmtree(tmp_path / "two")
    third = columnhub.deliver(later, output=tmp_path / "two", cache=cache)
    assert third.manifest["cache"]["hits"] == 0
    assert rows(third) == expected
    assert third.to_arrow().column("y").to_pylist() == [e % 13 for e in range(N)]
    assert ColumnCache(cache).stats().corrupt >= len(entries) // 2


@pytest.mark.parametrize("broken", [False, True])
def test_in_memory_exchange_of_a_collection_list_is_filled_and_checked(
    shared_data: Path, tmp_path: Path, broken: bool
) -> None:
    """A Parquet friend's list joining the primary's Jet collection, exchanged in memory
    (its chunks assembled while the chunk tasks run): filled to nJet where the event
    has no partner; a list of another length is the join error the per-chunk path
    gives, raised from the chunk that needs it, and nothing is published."""
    source = shared_data / "nano_tt_v12.root"
    with uproot.open(source) as f:
        original = f["Events"].arrays([*KEYS, "nJet", "Jet_btagDeepFlavB"], library="ak")
    rng = np.random.default_rng(9)
    picked = rng.permutation(len(original))[: int(0.8 * len(original))]
    ev = original[picked]
    btag = ev.Jet_btagDeepFlavB * 2 + 1
    if broken:  # one event's list loses an item
        row = int(np.flatnonzero(ak.to_numpy(ev.nJet) > 0)[0])
        lists = ak.to_list(btag)
        lists[row] = lists[row][:-1]
        btag = ak.Array(lists)
    friend = tmp_path / "btag.parquet"
    pq.write_table(
        pa.table(
            {
                **{k: ak.to_numpy(ev[k]) for k in KEYS},
                "Jet_btagNew": ak.to_arrow(btag, extensionarray=False),
            }
        ),
        friend,
        row_group_size=50,
    )
    req = {
        "dataset": {"name": "tt", "files": [str(source)]},
        "columns": ["Jet_btagNew", "btag_matched"],
        "chunk_size": 37,
        "friends": [
            {"name": "btag", "dataset": {"name": "btag", "files": [str(friend)]},
             "columns": ["Jet_btagNew"]}
        ],
    }
    if broken:
        key = ", ".join(str(int(ev[k][row])) for k in KEYS)
        with pytest.raises(JoinError, match="'Jet_btagNew' joins the primary's collection") as err:
            columnhub.deliver(req, output=tmp_path / "out", cache=tmp_path / "cache")
        assert key in str(err.value) or str(int(ev.event[row])) in str(err.value)
        failed = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert failed["complete"] is False
        assert failed["files"] == []
        assert "Jet_btagNew" in failed["error"]
        assert not list((tmp_path / "out").glob("part-*"))
        return
    result = columnhub.deliver(req, output=tmp_path / "out", cache=tmp_path / "cache")
    exchange = result.manifest["friend_exchange"]["btag"]
    assert exchange["ran"], exchange
    assert exchange["in_memory"], exchange
    assert exchange["bytes_stored"] > 0
    table = {
        tuple(int(original[k][i]) for k in KEYS): ak.to_list(original.Jet_btagDeepFlavB[i] * 2 + 1)
        for i in picked.tolist()
    }
    expected = [
        table.get(tuple(int(original[k][i]) for k in KEYS), [None] * int(original.nJet[i]))
        for i in range(len(original))
    ]
    assert ak.to_list(result.to_awkward().Jet_btagNew) == expected


def _taken_reference(values: list[Any], rows: list[int]) -> list[Any]:
    return [values[r] if r >= 0 else None for r in rows]


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    kind=st.sampled_from(["float32", "int64", "list<float64>", "large_list<int32>", "string"]),
    nulls=st.booleans(),
    sliced=st.booleans(),
)
def test_take_matches_brute_force(data: st.DataObject, kind: str, nulls: bool, sliced: bool) -> None:
    """``_take`` (numpy for numbers and lists of numbers) against a list comprehension."""
    from columnhub.join.exchange import _take

    n = data.draw(st.integers(0, 40))
    maybe = (lambda s: st.one_of(st.none(), s)) if nulls else (lambda s: s)
    if kind == "float32":
        values = data.draw(st.lists(maybe(st.floats(-1e3, 1e3, width=32)), min_size=n, max_size=n))
        array = pa.array(values, type=pa.float32())
    elif kind == "int64":
        values = data.draw(st.lists(maybe(st.integers(-(2**62), 2**62)), min_size=n, max_size=n))
        array = pa.array(values, type=pa.int64())
    elif kind == "list<float64>":
        item = st.lists(maybe(st.floats(-1e3, 1e3)), max_size=5)
        values = data.draw(st.lists(maybe(item), min_size=n, max_size=n))
        array = pa.array(values, type=pa.list_(pa.float64()))
    elif kind == "large_list<int32>":
        item = st.lists(maybe(st.integers(-100, 100)), max_size=5)
        values = data.draw(st.lists(maybe(item), min_size=n, max_size=n))
        array = pa.array(values, type=pa.large_list(pa.int32()))
    else:
        values = data.draw(st.lists(maybe(st.text(max_size=3)), min_size=n, max_size=n))
        array = pa.array(values, type=pa.string())
    if sliced and n > 2:
        array, values = array.slice(1, n - 2), values[1 : n - 1]
    rows = data.draw(st.lists(st.integers(-1, len(values) - 1), max_size=30)) if values else (
        data.draw(st.lists(st.just(-1), max_size=5))
    )
    got = _take(array, np.array(rows, dtype=np.int64))
    assert got.type == array.type
    assert got.to_pylist() == _taken_reference(values, rows)


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    dtype=st.sampled_from(["bool", "int8", "uint16", "int32", "uint64", "float32", "float64"]),
)
def test_arrow_of_and_numpy_of_agree_with_pyarrows_own(data: st.DataObject, dtype: str) -> None:
    """The pandas-free conversions give what ``pa.array`` / ``to_numpy`` give."""
    from columnhub._arrow import arrow_of, numpy_of

    n = data.draw(st.integers(0, 70))
    raw = data.draw(st.lists(st.integers(0, 255), min_size=n, max_size=n))
    values = np.array(raw).astype(dtype) if dtype != "bool" else np.array(raw) % 3 == 0
    mask = data.draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n)))
    mask = None if mask is None else np.array(mask, dtype=bool)
    got = arrow_of(values, mask)
    want = pa.array(values, mask=mask)
    assert got.type == want.type
    assert got.null_count == want.null_count
    assert got.equals(want)
    got.validate(full=True)
    # back, also from a slice (an offset into the buffers), nulls' slots left aside
    start = data.draw(st.integers(0, n))
    stop = data.draw(st.integers(start, n))
    piece = want.slice(start, stop - start)
    back = numpy_of(piece)
    assert back.dtype == values.dtype
    keep = ~mask[start:stop] if mask is not None else np.ones(stop - start, dtype=bool)
    assert np.array_equal(back[keep], values[start:stop][keep])


def test_a_cold_keyed_join_never_imports_pandas(tmp_path: Path) -> None:
    """pyarrow imports pandas on its first ``pa.array(numpy)`` or ``to_numpy()``: 0.14 s."""
    import subprocess
    import sys

    rng = np.random.default_rng(3)
    n = 5000
    keys = {"run": np.ones(n, np.uint32), "luminosityBlock": np.ones(n, np.uint32),
            "event": np.arange(1, n + 1, dtype=np.uint64)}
    jets = pa.array([[1.0] * int(k) for k in rng.integers(0, 4, n)], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({**keys, "MET_pt": rng.random(n).astype(np.float32)}),
                   tmp_path / "p.parquet")
    order = rng.permutation(n)
    pq.write_table(
        pa.table({**{k: v[order] for k, v in keys.items()},
                  "x": np.arange(n, dtype=np.float32)[order], "jets": jets.take(order)}),
        tmp_path / "f.parquet",
    )
    spec = {
        "dataset": {"name": "p", "files": [str(tmp_path / "p.parquet")]},
        "columns": ["MET_pt", "x", "jets"],
        "chunk_size": 1000,
        "friends": [{"name": "f", "dataset": {"name": "f", "files": [str(tmp_path / "f.parquet")]},
                     "columns": ["x", "jets"], "how": "left"}],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cli = Path(sys.executable).parent / "columnhub"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(cli), "deliver", str(tmp_path / "spec.json"),
         "-o", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--no-progress"],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "pyarrow.compute" in imported  # the run did join (it read the importtime lines)
    assert "pandas" not in imported
    got = columnhub.Result.open(tmp_path / "out").to_arrow()
    assert got["event"].to_pylist() == keys["event"].tolist()
    assert got["x"].to_pylist() == (keys["event"] - 1).astype(np.float32).tolist()
    assert got["jets"].to_pylist() == jets.to_pylist()


def test_memory_budget_must_be_a_positive_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(SpecError, match="COLUMNHUB_EXCHANGE_MEMORY='lots'.*1 GiB"):
        memory_budget()
    monkeypatch.setenv(MEMORY_ENV, "4096")
    assert memory_budget() == 4096


def test_one_to_many_stays_on_the_per_chunk_path(primary: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    twice = rng.permutation(np.concatenate([np.arange(0, N, 3), np.arange(0, N, 6)]))
    files = [write_friend_parquet(tmp_path / "f.parquet", twice)]
    req = request(primary, files, ["event", "fx"], validate="one_to_many", how="inner")
    result = columnhub.deliver(req, output=tmp_path / "out", cache=False)
    exchange = result.manifest["friend_exchange"]["f"]
    assert exchange["ran"] is False and "one_to_many" in exchange["reason"]
    got = sorted((r["event"], r["fx"]) for r in result.to_arrow().to_pylist())
    counts = {int(e): 0 for e in twice}
    for e in twice:
        counts[int(e)] += 1
    expected = sorted(
        (e, fx) for e in range(N) for fx in [float(fx_of(np.array([e]))[0])] * counts.get(e, 0)
    )
    assert got == expected


# ---------------------------------------------------------------------------
# friend lists inside a primary collection: filled to nJet, checked, as per chunk


def test_friend_lists_of_a_primary_collection(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = shared_data / "nano_tt_v12.root"
    with uproot.open(source) as f:
        original = f["Events"].arrays([*KEYS, "nJet", "Jet_btagDeepFlavB"], library="ak")
    rng = np.random.default_rng(3)
    picked = rng.permutation(len(original))[: int(0.8 * len(original))]
    files = []
    for i, part in enumerate(np.array_split(picked, 2)):
        ev = original[part]
        path = tmp_path / f"btag{i}.root"
        with uproot.recreate(path) as f:
            f["Events"] = {
                **{k: ak.to_numpy(ev[k]) for k in KEYS},
                "Jet_btagNew": ev.Jet_btagDeepFlavB * 2 + 1,
            }
        files.append(path)
    req = {
        "dataset": {"name": "tt", "files": [str(source)]},
        "columns": ["Jet_btagNew", "btag_matched"],
        "chunk_size": 37,
        "friends": [
            {
                "name": "btag",
                "dataset": {"name": "btag", "files": [str(f) for f in files]},
                "columns": ["Jet_btagNew"],
            }
        ],
    }
    on = columnhub.deliver(req, output=tmp_path / "on", cache=tmp_path / "cache")
    assert on.manifest["friend_exchange"]["btag"]["ran"]
    assert all(c["friend_entries_read"] == 0 for c in on.manifest["chunks"])
    table = {
        tuple(int(original[k][i]) for k in KEYS): ak.to_list(original.Jet_btagDeepFlavB[i] * 2 + 1)
        for i in picked.tolist()
    }
    expected = []
    for i in range(len(original)):
        key = tuple(int(original[k][i]) for k in KEYS)
        expected.append(table.get(key, [None] * int(original.nJet[i])))
    got = on.to_awkward()
    assert ak.to_list(got.Jet_btagNew) == expected
    assert ak.to_list(got.nJet) == ak.to_list(original.nJet)
    monkeypatch.setenv(SWITCH_ENV, "off")
    off = columnhub.deliver(req, output=tmp_path / "off", cache=False)
    assert off.to_arrow().equals(on.to_arrow())


# ---------------------------------------------------------------------------
# the stage's tasks are picklable (for Dask workers)


def test_tasks_and_their_arguments_pickle(primary: Path, tmp_path: Path) -> None:
    from columnhub.cache import ColumnCache
    from columnhub.join import exchange as ex
    from columnhub.join.provider import prepare
    from columnhub.plan import make_plan
    from columnhub.spec import Request

    files = make_friend("shuffled", tmp_path)
    plan = make_plan(Request.model_validate(request(primary, files, ["x", "fx", "fj"])))
    cache = ColumnCache(tmp_path / "cache")
    prepare(plan, cache=cache)
    matches = [
        ex.match_chunk(plan, c, friends=["f"], store=cache, cache=cache) for c in plan.chunks
    ]
    again = pickle.loads(pickle.dumps((plan, matches[1], cache)))
    redo = ex.match_chunk(again[0], again[0].chunks[1], friends=["f"], store=again[2])
    assert np.array_equal(redo.rows["f"], matches[1].rows["f"])  # idempotent, picklable
    friend = plan.friend("f")
    layout = ex.blocks([f.boundaries for f in friend.dataset.files], 10**9)
    routing = ex.route(ex._index(plan, friend, cache), "f", matches, layout)
    for task in (ex.match_chunk, ex.read_block, ex.assemble_chunk, ex.route):
        assert pickle.loads(pickle.dumps(task)) is task
    pieces = ex.read_block(
        plan, "f", routing.blocks[0], routing.ranges[0], routing.targets[0], columns=["fx", "fj"]
    )
    back = pickle.loads(pickle.dumps(pieces))
    assert back.chunks == pieces.chunks
    assert all(np.array_equal(a, b) for a, b in zip(back.positions, pieces.positions, strict=True))


# ---------------------------------------------------------------------------
# property test: random keys, layouts and chunkings against the brute force


@st.composite
def layouts(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(2, 60))
    events = np.array(draw(st.lists(st.integers(0, 200), min_size=n, max_size=n, unique=True)))
    friend = draw(st.lists(st.sampled_from([*events.tolist(), 500, 501]), max_size=70, unique=True))
    return {
        "primary": events,
        "primary_groups": draw(st.integers(1, 20)),
        "friend": np.array(draw(st.permutations(friend)), dtype=np.int64),
        "friend_groups": draw(st.integers(1, 30)),
        "chunk_size": draw(st.integers(1, 25)),
        "how": draw(st.sampled_from(["left", "inner", "right", "outer"])),
        "budget": draw(st.sampled_from([None, "1"])),
    }


def assert_brute_force(
    result: columnhub.Result, primary: np.ndarray, friend: np.ndarray, *, how: str
) -> None:
    """The rows of a join of any ``how``: the chunks' rows in order, then the tail in any."""
    per_chunk = "left" if how in ("left", "outer") else "inner"
    head = reference(primary, friend, how=per_chunk)
    tail = []
    if how in ("right", "outer"):  # friend rows without a partner, after the chunks
        primary_set = set(primary.tolist())
        fx = dict(zip(friend.tolist(), fx_of(friend).tolist(), strict=True))
        fj = dict(zip(friend.tolist(), ak.to_list(fj_of(friend)), strict=True))
        tail = [(e, None, fx[e], fj[e], False) for e in friend.tolist() if e not in primary_set]
    got = rows(result)
    assert got[: len(head)] == head
    assert sorted(got[len(head) :]) == sorted(tail)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layouts())
def test_exchange_matches_brute_force(case: dict[str, Any]) -> None:
    how = case["how"]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        p = write_primary(d / "p.parquet", case["primary"], row_group=case["primary_groups"])
        if len(case["friend"]):
            f = write_friend_parquet(
                d / "f.parquet", case["friend"], row_group=case["friend_groups"]
            )
        else:
            f = write_friend_parquet(d / "f.parquet", np.array([999], dtype=np.int64))
        req = request(p, [f], ["event", "x", "fx", "fj", "f_matched"], how=how)
        req["chunk_size"] = case["chunk_size"]
        old = os.environ.get(MEMORY_ENV)
        if case["budget"] is not None:
            os.environ[MEMORY_ENV] = case["budget"]
        try:
            result = columnhub.deliver(req, output=d / "out", cache=d / "cache")
        finally:
            if old is None:
                os.environ.pop(MEMORY_ENV, None)
            else:
                os.environ[MEMORY_ENV] = old
        assert_brute_force(result, case["primary"], friend_events([f]), how=how)
        exchange = result.manifest["friend_exchange"]["f"]
        spilled = "spilled" if exchange["rounds"] else "in memory"
        event(f"exchanged, {spilled}" if exchange["ran"] else "per chunk")
        if exchange["ran"]:
            assert all(c.get("friend_entries_read", 0) == 0 for c in result.manifest["chunks"])


def test_read_only_cache_exchanges_through_a_temporary_store(
    primary: Path, tmp_path: Path
) -> None:
    from columnhub.cache import ColumnCache

    files = make_friend("shuffled", tmp_path)
    shared = ColumnCache(tmp_path / "shared", read_only=True)
    req = request(primary, files, ["event", "x", "fx", "fj", "f_matched"])
    result = columnhub.deliver(req, output=tmp_path / "out", cache=shared)
    assert_each_group_read_once(result.manifest, files)
    assert rows(result) == reference(np.arange(N), friend_events(files), how="left")
    assert not (tmp_path / "shared").exists()  # nothing written to the shared cache
    assert not list((tmp_path / "out").rglob(".exchange"))


# ---------------------------------------------------------------------------
# on a Dask cluster: tasks on the workers, partitioned by friend blocks


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """Two single-threaded worker processes (with nannies, which restart a killed one)."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    with distributed.Client(cluster) as client:
        yield client
    cluster.close()


def exchange_keys(keys: list[str], request_hash: str) -> dict[str, list[str]]:
    """The exchange's task keys, by step (``match``, ``route``, ``read``, ``assemble``)."""
    out: dict[str, list[str]] = {}
    for key in keys:
        prefix = f"columnhub-{request_hash[:16]}-exchange-"
        if key.startswith(prefix):
            out.setdefault(key[len(prefix) :].split("-")[0], []).append(key)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("cached", [True, False])
def test_exchange_on_a_local_cluster_gives_the_local_bytes(
    primary: Path, tmp_path: Path, dask_client: Any, cached: bool
) -> None:
    distributed = pytest.importorskip("distributed")
    files = make_friend("shuffled", tmp_path)
    req = request(primary, files, ["event", "x", "fx", "fj", "f_matched"])
    req["output"] = {"target_part_bytes": 40_000}  # several parts
    local = columnhub.deliver(
        req, output=tmp_path / "threads", workers=2,
        cache=tmp_path / "c-local" if cached else False,
    )
    with distributed.get_task_stream(client=dask_client) as stream:
        on_dask = columnhub.deliver(
            req, output=tmp_path / "dask", scheduler=dask_client,
            cache=tmp_path / "c-dask" if cached else False,
        )
    assert len(local.files) >= 2
    assert [f.name for f in on_dask.files] == [f.name for f in local.files]
    for a, b in zip(local.files, on_dask.files, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert rows(on_dask) == reference(np.arange(N), friend_events(files), how="left")
    assert_each_group_read_once(on_dask.manifest, files)
    exchange = on_dask.manifest["friend_exchange"]["f"]
    assert exchange["reads"] == local.manifest["friend_exchange"]["f"]["reads"]
    # locally the Parquet friend is exchanged in memory (Arrow takes), on the cluster
    # through pieces: the same values (the parts above), held in other layouts
    assert local.manifest["friend_exchange"]["f"]["in_memory"]
    assert not exchange["in_memory"]
    assert exchange["bytes_stored"] > 0
    # the stage ran on the workers: a task per chunk, per block, per chunk again
    steps = exchange_keys([str(t["key"]) for t in stream.data], on_dask.manifest["request_hash"])
    assert len(steps.get("match", [])) == N // CHUNK
    assert len(steps.get("read", [])) == exchange["blocks"] == len(exchange["reads"])
    assert len(steps.get("assemble", [])) == N // CHUNK
    assert len(steps.get("route", [])) == 1
    assert not list((tmp_path / "dask").rglob(".exchange"))
    if cached:  # the workers stored the friend's columns: a later request reads them aligned
        again = columnhub.deliver(
            request(primary, files, ["event", "x", "y", "fx", "fj", "f_matched"]),
            output=tmp_path / "again", scheduler=dask_client, cache=tmp_path / "c-dask",
        )
        assert again.manifest["friend_exchange"]["f"]["reason"].startswith("cached")
        assert all(c["friend_entries_read"] == 0 for c in again.manifest["chunks"])
        assert rows(again) == rows(on_dask)


@pytest.mark.distributed
def test_a_worker_killed_during_the_exchange_has_its_reads_retried(
    primary: Path, tmp_path: Path, dask_client: Any, deliver_killing_a_worker: Any
) -> None:
    files = make_friend("resorted", tmp_path)
    req = request(primary, files, ["event", "x", "fx", "fj", "f_matched"], how="inner")
    result = deliver_killing_a_worker(
        dask_client,
        lambda: columnhub.deliver(
            req, output=tmp_path / "out", scheduler=dask_client, cache=tmp_path / "cache"
        ),
        sleep_env="COLUMNHUB_TEST_EXCHANGE_SLEEP",
        seconds="1.0",
        task_key="-exchange-read-",
    )
    assert result.complete
    assert result.manifest["friend_exchange"]["f"]["ran"]
    assert rows(result) == reference(np.arange(N), friend_events(files), how="inner")
    assert_each_group_read_once(result.manifest, files)  # each block listed once, none per chunk


@pytest.mark.distributed
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layouts())
def test_exchange_on_a_cluster_matches_brute_force(
    dask_client: Any, tmp_path_factory: pytest.TempPathFactory, case: dict[str, Any]
) -> None:
    how = case["how"]
    # not a TemporaryDirectory: workers may still flush the cache's statistics into it
    d = tmp_path_factory.mktemp("case")
    p = write_primary(d / "p.parquet", case["primary"], row_group=case["primary_groups"])
    friend = case["friend"] if len(case["friend"]) else np.array([999], dtype=np.int64)
    f = write_friend_parquet(d / "f.parquet", friend, row_group=case["friend_groups"])
    req = request(p, [f], ["event", "x", "fx", "fj", "f_matched"], how=how)
    req["chunk_size"] = case["chunk_size"]
    result = columnhub.deliver(req, output=d / "out", scheduler=dask_client, cache=d / "cache")
    assert_brute_force(result, case["primary"], friend_events([f]), how=how)
    exchange = result.manifest["friend_exchange"]["f"]
    event("exchanged on the cluster" if exchange["ran"] else "per chunk")
    if exchange["ran"]:
        assert all(c.get("friend_entries_read", 0) == 0 for c in result.manifest["chunks"])
        assert len(exchange["reads"]) == exchange["blocks"]


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_layout_tasks_give_the_routing_block_by_block(data: st.DataObject) -> None:
    """The cluster's per-layout-block tasks against the routing they are cut from."""
    from columnhub.join import exchange as ex

    files = data.draw(st.integers(1, 3))
    boundaries = []
    for _ in range(files):
        sizes = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=6))
        boundaries.append(np.concatenate([[0], np.cumsum(sizes)]).tolist())
    layout = ex.blocks(boundaries, data.draw(st.integers(1, 12)))
    entries = [(f, e) for f, edges in enumerate(boundaries) for e in range(edges[-1])]
    chunks = []
    for _ in range(data.draw(st.integers(1, 4))):
        picked = data.draw(st.lists(st.sampled_from(entries), max_size=10, unique=True))
        chunks.append(
            {
                b: (np.array([p for p, _ in rows], dtype=np.int64),
                    np.array([e for _, e in rows], dtype=np.int64))
                for b, rows in _by_block(layout, picked).items()
            }
        )
    routing = ex.combine_routes(chunks, layout)
    of_chunks = ex._blocks_of_chunks(routing, layout)
    if routing.repeated <= 0:
        assert of_chunks is None
        assert all(ex._layout_block_task(routing, b) is None for b in layout)
        return
    assert of_chunks is not None
    for number, block in enumerate(layout):
        got = ex._layout_block_task(routing, block)
        if block not in routing.blocks:
            assert got is None
            continue
        assert got is not None
        (routed, span, targets), at = got
        assert routed == block
        assert routing.blocks[at] == block
        assert span == routing.ranges[at]
        assert targets is routing.targets[at]
        for chunk in range(len(chunks)):  # the chunk lists the block iff it takes rows of it
            wants = any(c == chunk for c, _, _ in targets)
            listed = chunk < len(of_chunks) and number in of_chunks[chunk]
            assert wants == listed
    for listed in of_chunks:
        assert listed == sorted(listed)  # in layout order, as the reads were before


def _by_block(layout: list[Any], picked: list[tuple[int, int]]) -> dict[int, list[tuple[int, int]]]:
    """``(position, entry)`` pairs of chunk rows ``picked`` (file, entry) by layout block."""
    out: dict[int, list[tuple[int, int]]] = {}
    for position, (f, e) in enumerate(picked):
        b = next(i for i, x in enumerate(layout) if x.file == f and x.start <= e < x.stop)
        out.setdefault(b, []).append((position, e))
    return dict(sorted(out.items()))
