"""Tests of the column cache: keys, entry format, store, gc, stats, CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import pickle
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import awkward as ak
import fsspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from columnhub.cache import ColumnCache, canonical_json, default_location, entry_key
from columnhub.cli import cache as cli_cache
from columnhub.errors import CacheError, ColumnhubError, SpecError

# --------------------------------------------------------------------------- helpers


def memory_url() -> str:
    return f"memory://cache-test-{secrets.token_hex(6)}"


@pytest.fixture(params=["path", "file-url", "memory"])
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> ColumnCache:
    if request.param == "path":
        return ColumnCache(tmp_path / "c")
    if request.param == "file-url":
        return ColumnCache(f"file://{tmp_path / 'c'}")
    return ColumnCache(memory_url())


def key(i: object) -> str:
    return entry_key(test="cache", i=i)


def same(a: ak.Array, b: ak.Array | None) -> bool:
    """Independent comparison: values as Python lists and the full type string."""
    return b is not None and a.to_list() == b.to_list() and str(a.type) == str(b.type)


def local_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


ARRAYS = {
    "flat-float32": ak.Array(np.arange(1000, dtype=np.float32) * 0.5),
    "flat-uint64": ak.Array(np.array([0, 1, 2**64 - 1], dtype=np.uint64)),
    "jagged": ak.Array([[1.5, 2.5], [], [3.0], [4.0, 5.0, 6.0]]),
    "option": ak.Array([1, None, 3, None]),
    "jagged-option": ak.Array([[1.0, None], None, [], [None]]),
    "bool": ak.Array([True, False, True, True]),
    "jagged-bool": ak.Array([[True], [], [False, True]]),
    "record": ak.Array([{"pt": 1.0, "idx": [1, 2]}, {"pt": 2.5, "idx": []}]),
    "string": ak.Array(["Jet_pt", "", "µ"]),
    "empty": ak.Array(np.zeros(0, dtype=np.float32)),
    "regular": ak.to_regular(ak.Array(np.arange(12, dtype=np.int16).reshape(4, 3)), axis=1),
}


# --------------------------------------------------------------------------- keys


def test_entry_key_matches_independent_digest() -> None:
    text = '{"column":"Jet_pt","entry_start":0,"entry_stop":100,"tree":"Events"}'
    expected = hashlib.blake2b(
        ("columnhub-cache-key/1\n" + text).encode(), digest_size=16
    ).hexdigest()
    got = entry_key(tree="Events", column="Jet_pt", entry_stop=100, entry_start=0)
    assert got == expected
    assert len(got) == 32


def test_entry_key_distinguishes_types_and_values() -> None:
    assert entry_key(x=1) != entry_key(x=1.0)
    assert entry_key(x=1) != entry_key(x="1")
    assert entry_key(x=True) != entry_key(x=1)
    assert entry_key(x=0.1) != entry_key(x=0.1 + 1e-17 * 2)
    assert entry_key(x=(1, 2)) == entry_key(x=[1, 2])
    assert entry_key(x=np.int64(5)) == entry_key(x=5)
    assert entry_key(x=b"\x00") != entry_key(x="\x00")
    assert canonical_json({"f": 0.5}) == '{"f":{"$float":"0x1.0000000000000p-1"}}'


@pytest.mark.parametrize("bad", [object(), {1: "a"}, {1.5}, Path("/x")])
def test_entry_key_refuses_values_without_canonical_form(bad: object) -> None:
    with pytest.raises(CacheError, match="cache key part"):
        entry_key(part=bad)
    with pytest.raises(CacheError, match="at least one part"):
        entry_key()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(parts=st.dictionaries(st.text(min_size=1, max_size=8), json_values, min_size=1, max_size=6))
def test_entry_key_order_free_and_sensitive_to_every_part(parts: dict[str, object]) -> None:
    reordered = dict(reversed(list(parts.items())))
    assert entry_key(**parts) == entry_key(**reordered)
    first = next(iter(parts))
    changed = {**parts, first: ["changed", parts[first]]}
    assert entry_key(**parts) != entry_key(**changed)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_round_trip_equals_original(cache: ColumnCache, name: str) -> None:
    array = ARRAYS[name]
    k = key(name)
    assert cache.get(k) is None
    assert not cache.contains(k)
    cache.put(k, array)
    assert cache.contains(k)
    assert same(array, cache.get(k))
    assert ak.array_equal(array, cache.get(k))


def test_bytes_round_trip_and_kind_mismatch(cache: ColumnCache) -> None:
    blob = json.dumps({"index": list(range(50))}).encode()
    cache.put_bytes(key("blob"), blob)
    assert cache.get_bytes(key("blob")) == blob
    cache.put_bytes(key("empty"), b"")
    assert cache.get_bytes(key("empty")) == b""
    with pytest.raises(CacheError, match="holds bytes"):
        cache.get(key("blob"))
    cache.put(key("arr"), ARRAYS["jagged"])
    with pytest.raises(CacheError, match="holds array"):
        cache.get_bytes(key("arr"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.binary(max_size=200), max_size=6))
def test_bytes_stored_from_pieces_read_back_as_their_concatenation(
    cache: ColumnCache, pieces: list[bytes]
) -> None:
    k = key(f"pieces-{len(pieces)}-{sum(map(len, pieces))}")
    views = [memoryview(p) if i % 2 else p for i, p in enumerate(pieces)]
    if not pieces:
        with pytest.raises(CacheError, match="takes bytes"):
            cache.put_bytes(k, views)
        return
    cache.put_bytes(k, views)
    assert cache.get_bytes(k) == b"".join(pieces)
    cache.put_bytes(k, tuple(pieces))
    assert cache.get_bytes(k) == b"".join(pieces)


def test_bad_keys_and_values_are_refused(tmp_path: Path) -> None:
    cache = ColumnCache(tmp_path)
    for bad in ["../../etc/passwd", "ABCDEF0123456789", "abc", ""]:
        with pytest.raises(CacheError, match="entry_key"):
            cache.get(bad)
    with pytest.raises(CacheError, match="awkward Array"):
        cache.put(key(1), np.arange(3))  # type: ignore[arg-type]
    with pytest.raises(CacheError, match="takes bytes"):
        cache.put_bytes(key(1), "text")  # type: ignore[arg-type]
    with pytest.raises(CacheError, match="takes bytes"):
        cache.put_bytes(key(1), [b"ok", "text"])  # type: ignore[list-item]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="not a directory"):
        ColumnCache(tmp_path / "file")


def test_layout_is_sharded_and_leaves_no_temp_files(tmp_path: Path) -> None:
    cache = ColumnCache(tmp_path)
    k = key("layout")
    cache.put(k, ARRAYS["jagged"])
    assert (tmp_path / "objects" / k[:2] / k).is_file()
    assert cache.entry_path(k) == str(tmp_path / "objects" / k[:2] / k)
    assert (tmp_path / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f59")
    assert not [p for p in local_files(tmp_path) if p.name.startswith(".")]


def root_base(a: np.ndarray) -> object:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a.base if a.base is not None else a


def test_read_is_zero_copy_view_of_one_buffer(tmp_path: Path) -> None:
    cache = ColumnCache(tmp_path)
    cache.put(key("zc"), ak.Array([[1.0, 2.0], [3.0]]))
    got = cache.get(key("zc"))
    assert got is not None
    _, _, container = ak.to_buffers(got)
    roots = {id(root_base(np.asarray(b))) for b in container.values()}
    assert len(roots) == 1  # every buffer views the one array the file was read into


array_strategy = st.lists(
    st.none()
    | st.lists(st.floats(allow_nan=False, width=32) | st.none(), max_size=5)
    | st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
    max_size=30,
)


@settings(
    max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
@given(data=array_strategy)
def test_round_trip_random_jagged_arrays(data: list[object], tmp_path: Path) -> None:
    array = ak.Array(data)
    cache = ColumnCache(tmp_path / "hyp")
    k = entry_key(data=repr(data))
    cache.put(k, array)
    got = cache.get(k)
    assert got is not None
    assert got.to_list() == array.to_list()
    assert str(got.type) == str(array.type)


# --------------------------------------------------------------------------- corruption


def corrupt_local(path: str, how: str) -> None:
    raw = bytearray(Path(path).read_bytes())
    if how == "truncate":
        raw = raw[: len(raw) // 2]
    elif how == "empty":
        raw = bytearray()
    elif how == "extend":
        raw += b"\x00"
    elif how == "zeros":  # a crash before the data reached the disk: the size, no bytes
        raw = bytearray(len(raw))
    elif how == "zero-tail":  # only the first page reached the disk
        raw[4096:] = bytes(len(raw) - 4096)
    else:  # flip one byte at a relative position: prefix, header or payload
        pos = {"flip-prefix": 9, "flip-header": 40, "flip-payload": len(raw) - 3}[how]
        raw[pos] ^= 0x01
    Path(path).write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "how",
    ["flip-prefix", "flip-header", "flip-payload", "truncate", "empty", "extend", "zeros",
     "zero-tail"],
)
def test_corrupt_entry_is_a_miss_removed_and_rewritable(tmp_path: Path, how: str) -> None:
    cache = ColumnCache(tmp_path)
    array = ak.Array([[float(i)] * (i % 4) for i in range(2000)])  # > 4096 bytes
    k = key(how)
    cache.put(k, array)
    corrupt_local(cache.entry_path(k), how)
    assert cache.get(k) is None
    assert not os.path.exists(cache.entry_path(k))
    stats = cache.stats()
    assert (stats.corrupt, stats.misses, stats.hits) == (1, 1, 0)
    cache.put(k, array)
    assert same(array, cache.get(k))


def test_entries_are_not_fsynced_and_a_lost_write_is_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries skip fsync (a cold request writes hundreds of MB); what a crash can
    leave of an entry whose data never reached the disk (its size with zeros, a
    short file, nothing) reads as a miss, never as data."""
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:  # the real fsync, counted
        synced.append(fd)
        real_fsync(fd)

    cache = ColumnCache(tmp_path)
    cache.put(key("nosync-first"), ak.Array([1.0]))  # the root and its CACHEDIR.TAG (synced)
    monkeypatch.setattr(os, "fsync", counting_fsync)
    arrays = {i: ak.Array(np.arange(3000, dtype=np.float64) * i) for i in range(4)}
    for i, array in arrays.items():
        cache.put(key(("nosync", i)), array)
    assert synced == []
    for i, how in enumerate(["zeros", "zero-tail", "truncate", "empty"]):
        corrupt_local(cache.entry_path(key(("nosync", i))), how)
        assert cache.get(key(("nosync", i))) is None
        cache.put(key(("nosync", i)), arrays[i])  # recomputed, rewritten, served
        assert same(arrays[i], cache.get(key(("nosync", i))))
    assert cache.stats().corrupt == 4


def test_corrupt_bytes_entry_on_memory_store() -> None:
    url = memory_url()
    cache = ColumnCache(url)
    k = key("mem-corrupt")
    cache.put_bytes(k, b"0123456789" * 10)
    fs, _ = fsspec.core.url_to_fs(url)
    raw = bytearray(fs.cat_file(cache.entry_path(k)))
    raw[-1] ^= 0xFF
    fs.pipe_file(cache.entry_path(k), bytes(raw))
    assert cache.get_bytes(k) is None
    assert not cache.contains(k)


def test_corrupt_entry_in_read_only_cache_is_a_miss_but_kept(tmp_path: Path) -> None:
    ColumnCache(tmp_path).put(key("ro"), ARRAYS["option"])
    ro = ColumnCache(tmp_path, read_only=True)
    corrupt_local(ro.entry_path(key("ro")), "flip-payload")
    assert ro.get(key("ro")) is None
    assert os.path.exists(ro.entry_path(key("ro")))


def test_unreadable_entry_is_a_miss(tmp_path: Path) -> None:
    cache = ColumnCache(tmp_path)
    k = key("dir")
    os.makedirs(cache.entry_path(k))  # a directory where the file should be
    assert cache.get(k) is None


# --------------------------------------------------------------------------- concurrency


def expected_array(i: int) -> ak.Array:
    counts = np.arange(20_000) % 7
    flat = np.arange(counts.sum(), dtype=np.float64) + 1000.0 * i
    return ak.unflatten(flat, counts)


def race_worker(root: str, rounds: int, seed: int) -> tuple[int, int, int]:
    """Put and get keys 0..3 in a random order; returns (hits, misses, wrong)."""
    rng = np.random.default_rng(seed)
    wanted = {i: expected_array(i).to_list() for i in range(4)}
    hits = misses = wrong = 0
    with ColumnCache(root) as cache:
        for _ in range(rounds):
            i = int(rng.integers(4))
            if rng.random() < 0.5:
                cache.put(key(("race", i)), expected_array(i))
            else:
                got = cache.get(key(("race", i)))
                if got is None:
                    misses += 1
                elif got.to_list() == wanted[i]:
                    hits += 1
                else:
                    wrong += 1
    return hits, misses, wrong


def test_processes_racing_put_get_leave_one_valid_entry(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.starmap(race_worker, [(str(tmp_path), 30, s) for s in range(3)])
    assert sum(r[2] for r in results) == 0  # no reader ever got a wrong/partial array
    cache = ColumnCache(tmp_path)
    entry_files = local_files(tmp_path / "objects")
    assert not [p for p in entry_files if p.name.startswith(".")]  # no temp files left
    parent_hits = 0
    for i in range(4):
        k = key(("race", i))
        assert [p.name for p in entry_files].count(k) <= 1
        got = cache.get(k)
        if got is not None:
            parent_hits += 1
            assert same(expected_array(i), got)
    assert parent_hits >= 1
    # counts persisted by the worker processes, plus this process's own gets
    stats = cache.stats()
    assert stats.hits == sum(r[0] for r in results) + parent_hits
    assert stats.misses == sum(r[1] for r in results) + 4 - parent_hits


def test_threads_racing_on_one_key_never_see_partial_entries(tmp_path: Path) -> None:
    cache = ColumnCache(tmp_path)
    k = key("threads")
    wanted = expected_array(1)
    wanted_list = wanted.to_list()
    stop = threading.Event()

    def writer() -> None:
        for _ in range(15):
            cache.put(k, wanted)
        stop.set()

    def reader() -> int:
        bad = 0
        while not stop.is_set():
            got = cache.get(k)
            if got is not None and got.to_list() != wanted_list:
                bad += 1
        return bad

    with ThreadPoolExecutor(4) as ex:
        readers = [ex.submit(reader) for _ in range(2)]
        writers = [ex.submit(writer) for _ in range(2)]
        for w in writers:
            w.result()
        assert sum(r.result() for r in readers) == 0
    assert [p.name for p in local_files(tmp_path / "objects")] == [k]


# --------------------------------------------------------------------------- gc


def test_gc_removes_least_recently_used_first(tmp_path: Path) -> None:
    cache = ColumnCache(tmp_path)
    keys = [key(("gc", i)) for i in range(5)]
    for i, k in enumerate(keys):
        cache.put(k, ak.Array(np.full(1000 + i, i, dtype=np.float64)))
    sizes = {k: os.path.getsize(cache.entry_path(k)) for k in keys}
    # recency: keys[3] oldest, then 0, 4, 1, 2
    for age, k in zip(
        [50, 40, 30, 20, 10], [keys[3], keys[0], keys[4], keys[1], keys[2]], strict=True
    ):
        cache.set_recency(k, 1_000_000_000.0 - age)
    cap = sizes[keys[1]] + sizes[keys[2]] + 10
    report = cache.gc(max_bytes=cap)
    assert report.removed_entries == 3
    assert report.removed_bytes == sizes[keys[3]] + sizes[keys[0]] + sizes[keys[4]]
    assert report.kept_bytes == sizes[keys[1]] + sizes[keys[2]] <= cap
    assert [cache.contains(k) for k in keys] == [False, True, True, False, False]
    # a get makes an entry the most recently used
    cache.set_recency(keys[2], 1.0)
    assert cache.get(keys[2]) is not None
    cache.set_recency(keys[1], 2.0)
    report = cache.gc(max_bytes=sizes[keys[2]])
    assert (cache.contains(keys[1]), cache.contains(keys[2])) == (False, True)
    assert cache.gc(max_bytes=0).kept_entries == 0
    assert cache.stats().entries == 0


def test_gc_on_memory_store_uses_set_recency() -> None:
    cache = ColumnCache(memory_url())
    keys = [key(("mgc", i)) for i in range(3)]
    for k in keys:
        cache.put(k, ak.Array(np.zeros(100)))
    cache.set_recency(keys[0], 300.0)
    cache.set_recency(keys[1], 100.0)
    cache.set_recency(keys[2], 200.0)
    size = cache.stats().bytes // 3
    report = cache.gc(max_bytes=2 * size)
    assert report.removed_entries == 1
    assert [cache.contains(k) for k in keys] == [True, False, True]
    assert cache.gc(max_bytes=10**9).removed_entries == 0


def test_gc_removes_stale_temp_files_and_folds_stats(tmp_path: Path) -> None:
    cache = ColumnCache(tmp_path)
    cache.put(key("t"), ARRAYS["bool"])
    stale = Path(cache.entry_path(key("t"))).parent / ".deadbeef.1-2-3.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (1.0, 1.0))
    fresh = stale.with_name(".fresh.tmp")
    fresh.write_bytes(b"being written")
    for i in range(3):
        with ColumnCache(tmp_path) as other:
            other.get(key(("miss", i)))
            other.get(key("t"))
    before = cache.stats()
    report = cache.gc(max_bytes=10**9)
    assert report.removed_temp_files == 1
    assert not stale.exists()
    assert fresh.exists()
    after = cache.stats()
    assert (after.hits, after.misses) == (before.hits, before.misses) == (3, 3)
    assert len(list((tmp_path / "stats").glob("*.json"))) == 1


def test_gc_rejects_bad_cap(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="max_bytes"):
        ColumnCache(tmp_path).gc(max_bytes=-1)


# --------------------------------------------------------------------------- stats, modes


def test_stats_count_hits_and_misses_across_instances(cache: ColumnCache) -> None:
    cache.put(key("s"), ARRAYS["jagged"])
    cache.get(key("s"))
    cache.get(key("s"))
    cache.get(key("absent"))
    cache.get_bytes(key("absent2"))
    cache.close()
    other = pickle.loads(pickle.dumps(cache))
    assert other.location == cache.location
    other.get(key("s"))
    stats = other.stats()
    assert (stats.hits, stats.misses, stats.puts, stats.entries) == (3, 2, 1, 1)
    assert stats.hit_ratio == pytest.approx(3 / 5)
    assert stats.to_dict()["hit_ratio"] == pytest.approx(0.6)
    assert stats.bytes > 0
    cache.clear()
    assert cache.stats().hits == 0


def test_read_only_serves_gets_and_never_writes(tmp_path: Path) -> None:
    writable = ColumnCache(tmp_path / "shared")
    writable.put(key("ro"), ARRAYS["record"])
    before = local_files(tmp_path)
    ro = ColumnCache(tmp_path / "shared", read_only=True)
    assert same(ARRAYS["record"], ro.get(key("ro")))
    ro.put(key("new"), ARRAYS["bool"])  # silent no-op
    ro.put_bytes(key("new2"), b"x")
    assert ro.get(key("new")) is None
    with pytest.raises(CacheError, match="read-only"):
        ro.gc(max_bytes=0)
    with pytest.raises(CacheError, match="read-only"):
        ro.clear()
    ro.close()
    stats = ro.stats()
    assert (stats.skipped_puts, stats.hits, stats.misses, stats.entries) == (2, 1, 1, 1)
    assert local_files(tmp_path) == before
    missing = ColumnCache(tmp_path / "nowhere", read_only=True)
    assert missing.get(key("x")) is None
    assert not (tmp_path / "nowhere").exists()


def test_default_location_follows_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("COLUMNHUB_CACHE", str(tmp_path / "env"))
    assert ColumnCache().root == str(tmp_path / "env")
    monkeypatch.delenv("COLUMNHUB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_location() == str(tmp_path / "xdg" / "columnhub")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_location() == str(tmp_path / "home" / ".cache" / "columnhub")


def test_unknown_url_protocol_is_a_cache_error() -> None:
    with pytest.raises(CacheError, match="fsspec URL"):
        ColumnCache("nosuchproto://x/y")


# --------------------------------------------------------------------------- CLI


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="columnhub")
    cli_cache.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    result: int = args.func(args)
    return result


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10G", 10 * 2**30), ("500M", 500 * 2**20), ("1.5KiB", 1536), ("7", 7), ("2tb", 2 * 2**40)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert cli_cache.parse_size(text) == expected


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(SpecError, match="10X"):
        cli_cache.parse_size("10X")


def test_cli_stats_gc_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = ColumnCache(tmp_path)
    for i in range(4):
        cache.put(key(("cli", i)), ak.Array(np.zeros(1000)))
        cache.set_recency(key(("cli", i)), 100.0 + i)
    cache.get(key(("cli", 0)))
    cache.close()
    assert run_cli("cache", "stats", "--cache", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "entries:      4" in out
    assert "hits:         1" in out
    assert run_cli("cache", "stats", "--cache", str(tmp_path), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["entries"], data["hits"], data["hit_ratio"]) == (4, 1, 1.0)
    one = data["bytes"] // 4
    assert run_cli("cache", "gc", "--cache", str(tmp_path), "--max-bytes", f"{2 * one}") == 0
    assert "removed 2 entries" in capsys.readouterr().out
    # cli 0 was used last (the get), so it survives with cli 3
    assert [cache.contains(key(("cli", i))) for i in range(4)] == [True, False, False, True]
    with pytest.raises(CacheError, match="--yes"):
        run_cli("cache", "clear", "--cache", str(tmp_path))
    assert run_cli("cache", "clear", "--cache", str(tmp_path), "--yes") == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert ColumnCache(tmp_path).stats().entries == 0


def test_cli_rejects_bad_size_with_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli("cache", "gc", "--cache", str(tmp_path), "--max-bytes", "lots")
    assert exc.value.code == 2
    assert "binary suffix" in capsys.readouterr().err
    assert issubclass(CacheError, ColumnhubError)


# --------------------------------------------------------------------------- large entries


def test_large_entries_are_mapped_read_only_and_verified(tmp_path: Path) -> None:
    from columnhub.cache._backends import MMAP_MIN_BYTES

    cache = ColumnCache(tmp_path)
    counts = np.arange(100_000) % 5
    array = ak.unflatten(np.arange(counts.sum(), dtype=np.float64), counts)
    k = key("large")
    cache.put(k, array)
    assert os.path.getsize(cache.entry_path(k)) > MMAP_MIN_BYTES
    got = cache.get(k)
    assert got is not None
    assert ak.array_equal(got, array)
    assert ak.sum(got) == counts.sum() * (counts.sum() - 1) // 2
    content = np.asarray(ak.flatten(got))
    with pytest.raises(ValueError, match="read-only"):
        content[0] = 1.0  # cached data cannot be modified through a result
    cache.put(k, array * 2)  # replacing the entry (as every writer does) ...
    assert same(array, got)  # ... leaves arrays already served untouched
    assert same(array * 2, cache.get(k))
    corrupt_local(cache.entry_path(k), "flip-payload")
    assert cache.get(k) is None
    assert not cache.contains(k)


def test_counts_of_a_process_that_exits_without_close_are_kept(tmp_path: Path) -> None:
    import subprocess
    import sys

    ColumnCache(tmp_path).put(key("exit"), ARRAYS["bool"])
    code = (
        "from columnhub.cache import ColumnCache, entry_key\n"
        f"c = ColumnCache({str(tmp_path)!r})\n"
        "c.get(entry_key(test='cache', i='exit'))\n"
        "c.get(entry_key(test='cache', i='absent'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    stats = ColumnCache(tmp_path).stats()
    assert (stats.hits, stats.misses, stats.puts) == (1, 1, 1)  # the put: flushed on drop


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.one_of(
        st.sampled_from([0, 1, 2**20 - 1, 2**20, 2**20 + 1, 3 * 2**20 + 5]),
        st.integers(0, 5 * 2**20),
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_file_checksum_and_its_copy_are_the_bytes_own(tmp_path: Path, size: int, seed: int) -> None:
    """The digest read (and copied) block by block is xxh3 of the whole file; the copy is the file.

    Sizes around the read block (1 MiB) and across several blocks.
    """
    import xxhash

    from columnhub._checksum import file_checksum

    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    source = tmp_path / f"source-{size}-{seed}"
    source.write_bytes(data)
    copy = tmp_path / f"copy-{size}-{seed}"
    assert file_checksum(source) == xxhash.xxh3_64(data).hexdigest()
    assert file_checksum(source, copy_to=copy) == xxhash.xxh3_64(data).hexdigest()
    assert copy.read_bytes() == data
