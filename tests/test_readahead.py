"""Read-ahead while a new process imports (``columnhub._readahead``).

The command line reads a keyed Parquet join's key columns and friend columns
on a thread of its own while the engine imports; reads take those row groups
instead of reading them again. Checked here: the results equal a brute-force
join and a delivery without read-ahead; held groups are given only for the
file the plan saw; a group the read-ahead has not started is read by the
reader; any mix of held and read groups gives pyarrow's own rows
(hypothesis); what is and is not read ahead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_exchange import (
    CHUNK,
    N,
    friend_events,
    reference,
    rows,
    write_friend_parquet,
    write_primary,
)

import columnhub
from columnhub import _readahead
from columnhub.cache import ColumnCache
from columnhub.sources import parquet
from columnhub.spec import DatasetSpec


@pytest.fixture(autouse=True)
def _no_read_ahead_left() -> Any:
    yield
    _readahead.close()
    _readahead._armed.clear()


def make_spec(tmp_path: Path, kind: str, *, relative: bool = True) -> tuple[Path, list[Path]]:
    """A spec file (paths relative to its folder) joining a Parquet friend laid out as ``kind``."""
    rng = np.random.default_rng(5)
    write_primary(tmp_path / "primary.parquet", np.arange(N))
    kept = np.sort(rng.permutation(N)[: int(0.9 * N)])
    if kind == "shuffled":
        files = [write_friend_parquet(tmp_path / "friend.parquet", rng.permutation(kept))]
    else:  # regrouped: nearly the primary's order, 3 files of other row groups
        files = [
            write_friend_parquet(tmp_path / f"friend{i}.parquet", part, row_group=330)
            for i, part in enumerate(np.array_split(kept, 3))
        ]
    spec = {
        "dataset": {"name": "primary", "files": ["primary.parquet" if relative else
                                                  str(tmp_path / "primary.parquet")]},
        "columns": ["event", "x", "fx", "fj", "f_matched"],
        "chunk_size": CHUNK,
        "friends": [
            {
                "name": "f",
                "dataset": {"name": "f", "files": [f.name if relative else str(f) for f in files]},
                "columns": ["fx", "fj"],
                "how": "left",
            }
        ],
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path, files


def counting_takes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the file of every row group a read took from the read-ahead."""
    served: list[str] = []
    take = _readahead.take

    def spy(path: str, groups: Any, columns: Any, check: Any) -> list[Any]:
        out = take(path, groups, columns, check)
        served.extend(path for t in out if t is not None)
        return out

    monkeypatch.setattr(_readahead, "take", spy)
    return served


@pytest.mark.parametrize("kind", ["shuffled", "regrouped"])
def test_read_ahead_gives_the_joined_rows_of_the_brute_force(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, files = make_spec(tmp_path, kind)
    served = counting_takes(monkeypatch)
    _readahead.arm(spec)
    result = columnhub.deliver(spec, output=tmp_path / "on", cache=tmp_path / "cache")
    assert rows(result) == reference(np.arange(N), friend_events(files), how="left")
    # the primary's keys, the friend's keys and the friend's columns were all taken
    assert str(tmp_path / "primary.parquet") in served
    assert {str(f) for f in files} <= set(served)
    assert _readahead._state is None  # closed with the delivery
    # the same request read without read-ahead: the same table, types included
    monkeypatch.setenv("COLUMNHUB_READAHEAD_BYTES", "0")
    before = len(served)
    _readahead.arm(spec)
    off = columnhub.deliver(spec, output=tmp_path / "off", cache=False)
    assert len(served) == before
    assert off.to_arrow().equals(result.to_arrow())


def test_a_parquet_primary_alone_is_read_ahead_and_delivered_as_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    primary = write_primary(tmp_path / "p.parquet", np.arange(N))
    spec = tmp_path / "plain.yaml"  # YAML: parsed by the read-ahead too
    spec.write_text(
        "dataset: {name: p, files: [p.parquet]}\n"
        f"columns: [x, y]\nwhere: y > 3\nchunk_size: {CHUNK}\n"
    )
    served = counting_takes(monkeypatch)
    _readahead.arm(spec)
    result = columnhub.deliver(spec, output=tmp_path / "out", cache=tmp_path / "cache")
    assert served and set(served) == {str(primary)}
    direct = pq.read_table(primary).to_pylist()
    want = [(r["event"], r["x"], r["y"]) for r in direct if r["y"] > 3]
    got = [(r["event"], r["x"], r["y"]) for r in result.to_arrow().to_pylist()]
    assert got == want


def test_a_friend_changed_after_it_was_read_ahead_is_read_again(tmp_path: Path) -> None:
    spec, files = make_spec(tmp_path, "shuffled")
    friend = files[0]
    _readahead.arm(spec)
    _readahead.start(spec, None)
    assert _readahead._state is not None
    _readahead._state.thread.join()
    held = [h for passes in _readahead._state.groups.values() for h in passes]
    assert held
    assert all(h.table is not None for h in held)
    # the same events, other values; the old modification time put back
    old = os.stat(friend)
    write_friend_parquet(friend, friend_events(files), scale=2.0)
    os.utime(friend, ns=(old.st_atime_ns, old.st_mtime_ns))
    _readahead._armed.clear()  # deliver() must not start another one: this one is kept
    result = columnhub.deliver(spec, output=tmp_path / "out", cache=False)
    assert rows(result) == reference(np.arange(N), friend_events(files), how="left", scale=2.0)


def test_a_group_not_started_is_read_by_the_reader_and_not_read_ahead(tmp_path: Path) -> None:
    spec, files = make_spec(tmp_path, "shuffled")
    path = str(files[0])
    info, _ = parquet.describe(path, DatasetSpec(name="f", files=(path,)))
    state = _readahead._state = _readahead._ReadAhead(_readahead._wanted(str(spec), None))
    passes = state._plan()  # registered, nothing read yet
    assert [(p.path, p.columns) for p in passes][1:] == [
        (path, ["run", "luminosityBlock", "event"]),
        (path, ["fx", "fj"]),
        (str(tmp_path / "primary.parquet"), ["x"]),  # the request's own (others: not in it)
    ]
    # a read that comes first claims group 0 of the friend's columns: it reads it itself
    assert _readahead.take(path, [0], ["fx", "fj"], info.check) == [None]
    state._read(passes)
    assert [h.state for h in state.groups[(path, 0)]] == ["reading", "claimed"]
    assert state.groups[(path, 0)][1].table is None  # never read ahead
    got = _readahead.take(path, [1], ["fx", "fj"], info.check)
    assert got[0] is not None
    assert got[0].equals(pq.ParquetFile(path).read_row_group(1, columns=["fx", "fj"]))
    # held groups of a file other than the one planned are never given
    other = {**dict(info.check), "size": dict(info.check)["size"] + 1}
    assert _readahead.take(path, [1], ["fx", "fj"], tuple(other.items())) == [None]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mix_of_held_and_read_groups_gives_pyarrows_rows(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    d = tmp_path_factory.mktemp("mix")
    sizes = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=6), label="group sizes")
    n = sum(sizes)
    events = np.arange(n, dtype=np.uint64)
    table = pa.table({
        "run": np.ones(n, np.uint32),
        "luminosityBlock": np.ones(n, np.uint32),
        "event": events,
        "v": pa.array([[float(e)] * int(e % 3) for e in events], type=pa.list_(pa.float64())),
    })
    path = d / "f.parquet"
    with pq.ParquetWriter(path, table.schema) as writer:
        start = 0
        for size in sizes:
            writer.write_table(table.slice(start, size))
            start += size
    spec = d / "spec.json"
    spec.write_text(json.dumps({
        "dataset": {"name": "p", "files": ["f.parquet"]},
        "columns": ["v"],
        "friends": [{"name": "g", "dataset": {"name": "g", "files": ["f.parquet"]},
                     "columns": ["v"]}],
    }))
    info, _ = parquet.describe(str(path), DatasetSpec(name="g", files=(str(path),)))
    state = _readahead._state = _readahead._ReadAhead(_readahead._wanted(str(spec), None))
    try:
        passes = state._plan()
        # reads that came first claim some groups of some passes; the read-ahead reads the rest
        for p in passes:
            for group in data.draw(st.sets(st.sampled_from(range(len(sizes)))), label="claimed"):
                _readahead.take(str(path), [group], p.columns, info.check)
        state._read(passes)
        start = data.draw(st.integers(0, n - 1), label="start")
        stop = data.draw(st.integers(start + 1, n), label="stop")
        columns = data.draw(st.sampled_from([["v"], ["event"], ["event", "v"]]), label="columns")
        got = parquet.read_table(info, columns, start=start, stop=stop)
        want = pq.read_table(path, columns=columns).slice(start, stop - start)
        assert got.to_pylist() == want.to_pylist()
        assert got.schema == want.schema
    finally:
        _readahead.close()


def test_what_is_read_ahead(tmp_path: Path) -> None:
    spec, files = make_spec(tmp_path, "regrouped")
    wanted = _readahead._wanted(str(spec), None)
    keys = ["run", "luminosityBlock", "event"]
    primary = str(tmp_path / "primary.parquet")
    own = (primary, ["x", "fx", "fj", "f_matched"])  # the request's columns, keys aside
    # relative paths are the spec folder's; the primary's keys, the friend's keys, its
    # columns, then the request's own columns of the primary
    assert wanted == [
        (primary, keys),
        *[(str(f), keys) for f in files],
        *[(str(f), ["fx", "fj"]) for f in files],
        own,
    ]

    def variant(change: Any) -> list[Any]:
        data = json.loads(spec.read_text())
        change(data)
        other = tmp_path / "other.json"
        other.write_text(json.dumps(data))
        return _readahead._wanted(str(other), None)

    f = "friends"
    # no friend read where a guess could be wrong: the primary's own columns only
    only_own = [(primary, [*keys, "x", "fx", "fj", "f_matched"])]
    assert variant(lambda d: d[f][0]["dataset"].update(files=["friend*.parquet"])) == only_own
    assert variant(lambda d: d[f][0]["dataset"].update(files=["root://h//f.parquet"])) == only_own
    assert variant(lambda d: d[f][0]["dataset"].update(files=["f.root"])) == only_own
    assert variant(lambda d: d[f][0].update(match="aligned")) == only_own
    assert variant(lambda d: d.pop(f)) == only_own
    # nothing at all for several samples, a fileset, or a primary that is not local Parquet
    assert variant(lambda d: d.update(samples={"a": {}})) == []
    assert variant(lambda d: d["dataset"].update(files={"a.root": "Events"})) == []
    assert variant(lambda d: (d.pop(f), d["dataset"].update(files=["p.root"]))) == []
    # a ROOT primary: the friend is read ahead, not the primary
    assert variant(lambda d: d["dataset"].update(files=["primary.root"])) == wanted[1:-1]
    # the friend's own keys when it names them
    on = variant(lambda d: d[f][0].update(on=["run", "event"]))
    assert on[1] == (str(files[0]), ["run", "event"])


def test_nothing_is_read_ahead_past_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, _ = make_spec(tmp_path, "shuffled")
    monkeypatch.setenv("COLUMNHUB_READAHEAD_BYTES", "1000")
    served = counting_takes(monkeypatch)
    _readahead.arm(spec)
    columnhub.deliver(spec, output=tmp_path / "out", cache=False)
    assert served == []


def test_a_later_process_reads_none_of_a_friend_whose_columns_are_cached(tmp_path: Path) -> None:
    spec, files = make_spec(tmp_path, "shuffled")
    cache = ColumnCache(tmp_path / "cache")

    def friend_read(wanted: list[Any]) -> bool:
        return any(path == str(files[0]) for path, _ in wanted)

    assert friend_read(_readahead._wanted(str(spec), cache))
    columnhub.deliver(spec, output=tmp_path / "out", cache=cache)
    # the friend's columns are in the cache now: a later request reads only the primary's own
    primary = str(tmp_path / "primary.parquet")
    assert _readahead._wanted(str(spec), cache) == [
        (primary, ["run", "luminosityBlock", "event", "x", "fx", "fj", "f_matched"])
    ]
    # a read-only cache gets no note, and a changed friend file is read ahead again
    ro = tmp_path / "ro"
    columnhub.deliver(spec, output=tmp_path / "out2", cache=ColumnCache(ro, read_only=True))
    assert friend_read(_readahead._wanted(str(spec), ColumnCache(ro)))
    write_friend_parquet(files[0], friend_events(files), scale=3.0)
    assert friend_read(_readahead._wanted(str(spec), cache))


def test_the_cache_note_covers_a_root_primary(tmp_path: Path) -> None:
    """A ROOT primary joined to a Parquet friend: a later process reads nothing ahead."""
    from test_exchange import write_friend_root

    _, files = make_spec(tmp_path, "shuffled")
    write_friend_root(tmp_path / "primary.root", np.arange(N))
    spec = tmp_path / "root.json"
    spec.write_text(json.dumps({
        "dataset": {"name": "p", "files": ["primary.root"]},
        "columns": ["event", "g_fx"],
        "chunk_size": CHUNK,
        "friends": [{"name": "g", "dataset": {"name": "g", "files": [files[0].name]},
                     "columns": ["fx", "fj"], "prefix": "g_"}],
    }))
    cache = ColumnCache(tmp_path / "cache")
    reads = _readahead._wanted(str(spec), cache)
    assert [p for p, _ in reads] == [str(files[0])] * 2  # the friend's keys, then its columns
    result = columnhub.deliver(spec, output=tmp_path / "out", cache=cache)
    assert result.complete
    assert _readahead._wanted(str(spec), cache) == []  # and nothing of the ROOT primary


def test_arm_applies_to_the_named_spec_only(tmp_path: Path) -> None:
    spec, _ = make_spec(tmp_path, "shuffled")
    _readahead.arm(spec)
    _readahead.start(tmp_path / "another.json", None)  # not the armed spec: nothing starts
    assert _readahead._state is None
    _readahead.arm(spec)
    _readahead.start(json.loads(spec.read_text()), None)  # a dictionary: nothing starts
    assert _readahead._state is None
    _readahead.start(spec, None)  # disarmed by the call before
    assert _readahead._state is None
