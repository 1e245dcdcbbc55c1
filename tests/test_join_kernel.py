"""The join kernel against a brute-force dict join written here."""

from __future__ import annotations

import pickle
from collections import defaultdict
from typing import Any

import awkward as ak
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from columnhub.errors import DuplicateKeyError, JoinError, KeyMismatchError, KeyTypeError
from columnhub.join import (
    KeyIndex,
    check_aligned,
    check_unique,
    fetch_plan,
    gather,
    join_arrays,
    match,
    unmatched_rows,
)

HOWS = ("inner", "left", "right", "outer")
VALIDATES = ("one_to_one", "many_to_one", "one_to_many")
U64MAX = 2**64 - 1

# Key pools per mode: "small" (one word), "huge" (near 2**64 - 1), "wide"
# (several 64-bit-wide columns: the multi-word fallback).
_POOLS = {
    "small": [0, 1, 2, 3, 7],
    "huge": [U64MAX, U64MAX - 1, U64MAX - 2, 2**63],
    "wide": [0, 1, U64MAX, 2**63, 2**63 + 1],
}


@st.composite
def tables(draw: st.DrawFn) -> dict[str, Any]:
    mode = draw(st.sampled_from(sorted(_POOLS)))
    ncol = draw(st.integers(2, 3) if mode == "wide" else st.integers(1, 3))
    pool_vals = _POOLS[mode]
    pool = draw(
        st.lists(
            st.tuples(*[st.sampled_from(pool_vals) for _ in range(ncol)]),
            min_size=1,
            max_size=8,
            unique=True,
        )
    )
    pkeys = draw(st.lists(st.sampled_from(pool), max_size=12))
    fkeys = draw(st.lists(st.sampled_from(pool), max_size=12))
    plens = draw(st.lists(st.integers(0, 3), min_size=len(pkeys), max_size=len(pkeys)))
    flens = draw(st.lists(st.integers(0, 3), min_size=len(fkeys), max_size=len(fkeys)))
    signed = mode == "small" and draw(st.booleans())
    return {
        "ncol": ncol,
        "pkeys": pkeys,
        "fkeys": fkeys,
        "plens": plens,
        "flens": flens,
        "signed": signed,
    }


def _build(t: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str], list[str]]:
    on = [f"k{i}" for i in range(t["ncol"])]
    fon = [f"fk{i}" for i in range(t["ncol"])]
    kdt = np.int32 if t["signed"] else np.uint64
    primary: dict[str, Any] = {
        name: np.array([k[i] for k in t["pkeys"]], dtype=kdt) for i, name in enumerate(on)
    }
    friend: dict[str, Any] = {
        name: np.array([k[i] for k in t["fkeys"]], dtype=np.uint64) for i, name in enumerate(fon)
    }
    primary["x"] = np.arange(len(t["pkeys"]), dtype=np.float64) + 0.5
    primary["pj"] = ak.Array([[i * 10.0 + j for j in range(n)] for i, n in enumerate(t["plens"])])
    friend["y"] = -np.arange(len(t["fkeys"]), dtype=np.float64) - 0.25
    friend["fj"] = ak.Array([[-i * 10.0 - j for j in range(n)] for i, n in enumerate(t["flens"])])
    return primary, friend, on, fon


def _reference(t: dict[str, Any], how: str) -> list[tuple[Any, ...]]:
    """Brute force: output rows as (key, x, pj, y, fj, matched), in the documented order."""
    pk = [tuple(int(v) for v in k) for k in t["pkeys"]]
    fk = [tuple(int(v) for v in k) for k in t["fkeys"]]
    by_key: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for j, k in enumerate(fk):
        by_key[k].append(j)
    pairs: list[tuple[int | None, int | None]] = []
    for i, k in enumerate(pk):
        if by_key.get(k):
            pairs.extend((i, j) for j in by_key[k])
        elif how in ("left", "outer"):
            pairs.append((i, None))
    if how in ("right", "outer"):
        present = set(pk)
        pairs.extend((None, j) for j, k in enumerate(fk) if k not in present)
    rows = []
    for i, j in pairs:
        key = pk[i] if i is not None else fk[j]  # type: ignore[index]
        x = i + 0.5 if i is not None else None
        pj = [i * 10.0 + n for n in range(t["plens"][i])] if i is not None else None
        y = -j - 0.25 if j is not None else None
        fj = [-j * 10.0 - n for n in range(t["flens"][j])] if j is not None else None
        rows.append((key, x, pj, y, fj, i is not None and j is not None))
    return rows


def _violates(t: dict[str, Any], validate: str) -> bool:
    pk = [tuple(k) for k in t["pkeys"]]
    fk = [tuple(k) for k in t["fkeys"]]
    pdup = len(set(pk)) < len(pk)
    fdup = len(set(fk)) < len(fk)
    if validate == "one_to_one":
        return pdup or fdup
    if validate == "many_to_one":
        return fdup
    return pdup


def _rows_of(out: dict[str, ak.Array], on: list[str], how: str) -> list[tuple[Any, ...]]:
    n = len(out["x"])
    assert all(len(v) == n for v in out.values())
    keys = list(zip(*[out[c].tolist() for c in on], strict=True)) if n else []
    matched = out["friend_matched"].tolist() if how != "inner" else [True] * n
    return list(
        zip(
            keys,
            out["x"].tolist(),
            out["pj"].tolist(),
            out["y"].tolist(),
            out["fj"].tolist(),
            matched,
            strict=True,
        )
    )


@settings(deadline=None, max_examples=120)
@given(tables())
def test_join_arrays_equals_brute_force(t: dict[str, Any]) -> None:
    primary, friend, on, fon = _build(t)
    for how in HOWS:
        for validate in VALIDATES:
            if _violates(t, validate):
                with pytest.raises(DuplicateKeyError, match="duplicate"):
                    join_arrays(primary, friend, on=on, friend_on=fon, how=how, validate=validate)
                continue
            out = join_arrays(primary, friend, on=on, friend_on=fon, how=how, validate=validate)
            assert _rows_of(out, on, how) == _reference(t, how), (how, validate)
            # option types follow the join type, never the data
            assert ("?" in str(out["y"].type) or "option" in str(out["y"].type)) == (
                how in ("left", "outer")
            )
            assert ("?" in str(out["x"].type)) == (how in ("right", "outer"))
            for c in on:
                assert "?" not in str(out[c].type)


@settings(deadline=None, max_examples=80)
@given(tables(), st.integers(1, 5))
def test_chunked_kernel_equals_in_memory_join(t: dict[str, Any], chunk: int) -> None:
    """Drive the kernel as a chunked executor would, compare with the brute force."""
    primary, friend, on, fon = _build(t)
    pk = {c: primary[c] for c in on}
    fk = {c: friend[c] for c in fon}
    n = len(t["pkeys"])
    # friend in "files" of 4 entries, primary index for right/outer/primary checks
    nf = len(t["fkeys"])
    findex = KeyIndex.build(fk, file=np.arange(nf) // 4, entry=np.arange(nf) % 4)
    pindex = KeyIndex.build(pk)
    findex = KeyIndex.from_bytes(findex.to_bytes())
    pindex = pickle.loads(pickle.dumps(pindex))
    files = [{c: friend[c][s : s + 4] for c in ("y", "fj")} for s in range(0, nf, 4)]
    for how in HOWS:
        for validate in VALIDATES:
            try:
                check_unique(pindex, side="primary", validate=validate)
                check_unique(findex, side="friend", validate=validate)
            except DuplicateKeyError:
                assert _violates(t, validate)
                continue
            assert not _violates(t, validate)
            got: list[tuple[Any, ...]] = []
            for s in range(0, max(n, 1), chunk):
                sl = slice(s, min(s + chunk, n))
                m = match({c: v[sl] for c, v in pk.items()}, findex, how=how, validate=validate)
                plan = fetch_plan(findex, m.friend_rows, max_gap=1)
                assert plan.entries_read <= len(np.unique(m.friend_rows[m.friend_rows >= 0]))
                parts = {
                    c: ak.concatenate([files[f][c][a:b] for f, a, b in plan.ranges])
                    if plan.ranges
                    else friend[c][:0]
                    for c in ("y", "fj")
                }
                y = gather(parts["y"], plan.rows).tolist()
                fj = gather(parts["fj"], plan.rows).tolist()
                prow = m.primary_rows + s
                for r, pr in enumerate(prow.tolist()):
                    key = tuple(int(primary[c][pr]) for c in on)
                    got.append(
                        (
                            key,
                            pr + 0.5,
                            primary["pj"][pr].tolist(),
                            y[r],
                            fj[r],
                            bool(m.friend_rows[r] >= 0),
                        )
                    )
            if how in ("right", "outer"):
                for j in unmatched_rows(fk, pindex).tolist():
                    key = tuple(int(friend[c][j]) for c in fon)
                    got.append((key, None, None, friend["y"][j], friend["fj"][j].tolist(), False))
            assert got == _reference(t, how), (how, validate)


def _cms(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "run": np.full(n, 320000, dtype=np.uint32),
        "luminosityBlock": (np.arange(n) // 10 + 1).astype(np.uint32),
        "event": rng.choice(2**40, size=n, replace=False).astype(np.uint64),
    }


def test_large_shuffled_left_join_matches_dict_reference() -> None:
    n = 20_000
    keys = _cms(n, 1)
    rng = np.random.default_rng(2)
    perm = rng.permutation(n)[: n - 500]  # 500 primary events have no friend
    friend = {k: v[perm] for k, v in keys.items()}
    friend["y"] = perm.astype(np.float64) * 2
    counts = rng.poisson(3, len(perm))
    friend["jets"] = ak.unflatten(np.repeat(perm.astype(np.float64), counts), counts)
    primary = dict(keys)
    on = ["run", "luminosityBlock", "event"]
    out = join_arrays(primary, friend, on=on, how="left")
    ref = {int(e): i for i, e in enumerate(friend["event"])}
    y = out["y"].to_list()
    jets = out["jets"]
    for i, e in enumerate(primary["event"].tolist()):
        j = ref.get(e)
        assert y[i] == (None if j is None else 2.0 * perm[j])
        assert (jets[i] is None) if j is None else jets[i].tolist() == [float(perm[j])] * counts[j]
    assert out["friend_matched"].to_numpy().sum() == len(perm)


def test_duplicate_error_lists_keys_files_and_entries() -> None:
    keys = {
        "run": np.array([1, 1, 1, 2, 1], dtype=np.uint32),
        "event": np.array([5, 6, 5, 7, 6], dtype=np.uint64),
    }
    index = KeyIndex.build(
        keys, file=[0, 0, 1, 1, 1], entry=[0, 1, 0, 1, 2], file_names=["a.root", "b.root"]
    )
    assert not index.is_unique
    dups = index.duplicates()
    assert [d.key for d in dups] == [{"run": 1, "event": 5}, {"run": 1, "event": 6}]
    assert dups[0].locations == (("a.root", 0), ("b.root", 0))
    with pytest.raises(DuplicateKeyError) as info:
        check_unique(index, side="friend", validate="one_to_one", dataset="sys_up")
    text = str(info.value)
    assert "friend dataset 'sys_up' has 2 duplicated" in text
    assert "(run=1, event=5) x2 at a.root entry 0, b.root entry 0" in text
    assert "(run=1, event=6) x2 at a.root entry 1, b.root entry 2" in text
    assert "one_to_many" in text
    check_unique(index, side="friend", validate="one_to_many")  # allowed
    with pytest.raises(DuplicateKeyError, match=r"\(run=1, event=5\) at chunk rows 0 and 2"):
        match(keys, KeyIndex.build({"r": np.array([1]), "e": np.array([5])}), how="left")


def test_key_index_serialisation_roundtrip_and_locate() -> None:
    keys = _cms(1000, 3)
    index = KeyIndex.from_files(
        [
            {k: v[:400] for k, v in keys.items()},
            {k: v[:0] for k, v in keys.items()},  # an empty file
            {k: v[400:] for k, v in keys.items()},
        ],
        file_names=["f0.root", "empty.root", "f2.root"],
    )
    # the same rows with file and entry given per row
    file_of = np.repeat(np.array([0, 2], dtype=np.int32), [400, 600])
    entry_of = np.concatenate([np.arange(400), np.arange(600)])
    explicit = KeyIndex.build(keys, file=file_of, entry=entry_of)
    assert index.file_starts is not None
    assert explicit.file_starts is None
    assert index.file.tolist() == file_of.tolist()
    assert index.entry.tolist() == entry_of.tolist()
    rows = [0, 399, 400, 999, -1]
    for other in (
        KeyIndex.from_bytes(index.to_bytes()),
        pickle.loads(pickle.dumps(index)),
        KeyIndex.from_bytes(explicit.to_bytes()),
    ):
        assert other.packing == index.packing
        assert other.is_unique
        assert np.array_equal(other.sorted_words, index.sorted_words)
        q = {k: v[::-7] for k, v in keys.items()}
        assert np.array_equal(match(q, other).friend_rows, np.arange(1000)[::-7])
        file, entry = other.locate(rows)
        assert file.tolist() == [0, 0, 2, 2, -1]
        assert entry.tolist() == [0, 399, 0, 599, -1]
    assert KeyIndex.from_bytes(index.to_bytes()).file_names == index.file_names
    # blobs of the first two formats (.npz archives), as older caches hold: format 1
    # kept file and entry per row, format 2 may keep file_starts instead
    import io
    import json

    for version, where in (
        (1, {"row_file": explicit.file, "row_entry": explicit.entry}),
        (2, {"file_starts": index.file_starts}),
    ):
        meta = {
            "format": f"columnhub-keyindex-{version}",
            "packing": index.packing.to_dict(),
            "is_unique": True,
            "file_names": ["f0.root", "empty.root", "f2.root"],
        }
        old = io.BytesIO()
        np.savez(
            old,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            order=index.order,
            sorted_words=index.sorted_words,
            **where,
        )
        legacy = KeyIndex.from_bytes(old.getvalue())
        assert legacy.locate(rows)[0].tolist() == [0, 0, 2, 2, -1]
        assert legacy.locate(rows)[1].tolist() == [0, 399, 0, 599, -1]
        assert np.array_equal(legacy.sorted_words, index.sorted_words)
    # the raw format: one blob from its pieces, read back as views of it
    blob = index.to_bytes()
    assert blob == b"".join(bytes(c) for c in index.to_chunks())
    back = KeyIndex.from_bytes(blob)
    assert not back.order.flags.writeable  # views of the blob, not copies
    assert np.array_equal(back.order, index.order)
    with pytest.raises(JoinError, match="not a serialised"):
        KeyIndex.from_bytes(blob[: len(blob) - 64])  # truncated: an array past the end
    cols = index.key_columns([5, 450])
    assert cols["event"].tolist() == [int(keys["event"][5]), int(keys["event"][450])]
    with pytest.raises(JoinError, match="not a serialised"):
        KeyIndex.from_bytes(b"nonsense")


def test_primary_keys_outside_the_friend_range_do_not_match() -> None:
    friend = {"run": np.array([5, 6], dtype=np.uint32), "event": np.array([10, 11], np.uint64)}
    index = KeyIndex.build(friend)
    primary = {"run": np.array([6, 7, 4, 5]), "event": np.array([11, 10, 10, U64MAX], np.uint64)}
    m = match(primary, index, how="left")
    assert m.friend_rows.tolist() == [1, -1, -1, -1]
    assert unmatched_rows(friend, KeyIndex.build(primary)).tolist() == [0]


def test_gather_flat_jagged_records_and_zero_copy() -> None:
    jag = ak.Array([[1.0, 2.0], [], [3.0]])
    out = gather(jag, [2, -1, 0, 0])
    assert out.tolist() == [[3.0], None, [1.0, 2.0], [1.0, 2.0]]
    assert str(out.type) == "4 * option[var * float64]"
    # lists of numbers are copied into a packed column (compiled kernel) ...
    assert isinstance(out.layout.content, ak.contents.ListOffsetArray)
    assert out.layout.content.offsets.data.tolist() == [0, 1, 1, 3, 5]
    # ... a column with no missing row keeps its option type
    assert str(gather(jag, [1, 0]).type) == "2 * option[var * float64]"
    rec = ak.zip({"pt": jag, "eta": jag * 2})
    view = gather(rec, [-1, 1])
    assert view.tolist() == [None, []]
    assert view.layout.content is rec.layout  # anything else is a view, not a copy
    flat = np.array([1.5, 2.5])
    assert gather(flat, np.array([1, -1])).tolist() == [2.5, None]
    plain = gather(flat, [1, 0], optional=False)
    assert plain.tolist() == [2.5, 1.5]
    assert "?" not in str(plain.type)
    # gathering an option array again stays one level of option
    again = gather(out, [1, 0, -1])
    assert again.tolist() == [None, [3.0], None]
    with pytest.raises(IndexError, match="out of range"):
        gather(flat, [2])
    with pytest.raises(IndexError, match="out of range"):
        gather(flat, [-1], optional=False)


def test_join_arrays_names_prefix_and_key_errors() -> None:
    primary = {"event": np.array([1, 2], dtype=np.uint64), "pt": np.array([1.0, 2.0])}
    friend = {"event": np.array([2, 1], dtype=np.uint64), "pt": np.array([20.0, 10.0])}
    with pytest.raises(JoinError, match=r"\['pt'\] clash.*prefix"):
        join_arrays(primary, friend, on="event")
    out = join_arrays(primary, friend, on="event", prefix="up_", name="up")
    assert out["up_pt"].tolist() == [10.0, 20.0]
    assert out["up_matched"].tolist() == [True, True]
    with pytest.raises(KeyTypeError, match=r"'event'.*float"):
        join_arrays({"event": np.array([1.0])}, friend, on="event", prefix="f_")
    with pytest.raises(JoinError, match="unknown join how='cross'"):
        join_arrays(primary, friend, on="event", how="cross", prefix="f_")
    with pytest.raises(KeyError, match=r"'evnt'.*closest: event"):
        join_arrays(primary, friend, on="evnt", prefix="f_")
    short = {"event": friend["event"], "pt": np.array([20.0])}
    with pytest.raises(JoinError, match=r"friend columns must all have the 2 rows.*'pt': 1"):
        join_arrays(primary, short, on="event", prefix="f_")
    # a prebuilt friend index gives the same result
    index = KeyIndex.build({"event": friend["event"]})
    again = join_arrays(primary, friend, on="event", prefix="f_", friend_index=index)
    assert again["f_pt"].tolist() == [10.0, 20.0]


def test_check_aligned_names_file_entry_and_both_keys() -> None:
    p = {"run": np.array([1, 1, 1]), "event": np.array([4, 5, 6])}
    f = {"run": np.array([1, 1, 1]), "event": np.array([4, 6, 5])}
    check_aligned(p, p, primary_file="a.root", friend_file="b.root")
    with pytest.raises(
        KeyMismatchError,
        match=r"a.root entry 11 \(run=1, event=5\) vs b.root entry 21 \(run=1, event=6\)",
    ):
        check_aligned(
            p, f, primary_file="a.root", primary_start=10, friend_file="b.root", friend_start=20
        )
    with pytest.raises(KeyMismatchError, match="3 rows"):
        check_aligned(p, {k: v[:2] for k, v in f.items()})


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**20), st.booleans())
def test_sort_and_walk_unique_join_equals_dict_join(
    n_p: int, n_f: int, seed: int, dup: bool
) -> None:
    from columnhub.join.match import match_unique_words

    rng = np.random.default_rng(seed)
    pool = rng.choice(2**30, size=n_p + n_f, replace=False).astype(np.uint64)
    pw = rng.permutation(pool)[:n_p].copy()
    fw = rng.permutation(pool)[:n_f].copy()
    if dup and n_f > 1:
        fw[0] = fw[1]
    fast = match_unique_words(pw, fw, total_bits=30, how="left")
    if dup and n_f > 1:
        assert fast is None  # duplicates: the caller takes the general path
        return
    assert fast is not None
    where = {int(k): j for j, k in enumerate(fw)}
    assert fast.friend_rows.tolist() == [where.get(int(k), -1) for k in pw]
    inner = match_unique_words(pw, fw, total_bits=30, how="inner")
    assert inner is not None
    assert inner.primary_rows.tolist() == [i for i, k in enumerate(pw) if int(k) in where]
    # keys too wide to share a word with the row number: sorted apart, same answer
    wide = match_unique_words(pw, fw, total_bits=64, how="left")
    assert wide is not None
    assert wide.friend_rows.tolist() == fast.friend_rows.tolist()


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), max_size=60),
    rows=st.lists(st.integers(-1, 59), max_size=80),
    optional=st.booleans(),
    dtype=st.sampled_from(["float32", "float64", "int32", "uint64", "bool"]),
)
def test_gather_matches_python_lists(
    lengths: list[int], rows: list[int], optional: bool, dtype: str
) -> None:
    """The compiled gather (flat and jagged, sliced inputs too) against plain lists."""
    import columnhub._kernels as kernels

    rows = [r for r in rows if r < len(lengths)]
    if not optional:
        rows = [r for r in rows if r >= 0]
    rng = np.random.default_rng(len(lengths) + 7 * len(rows))
    content = (rng.random(sum(lengths)) * 100).astype(dtype)
    jag = ak.unflatten(content, np.asarray(lengths, dtype=np.int64))[1:]  # non-zero starts
    flat = (rng.random(len(lengths)) * 100).astype(dtype)[1:]
    rows = [r for r in rows if r < len(jag)]
    ref_jag = [jag.tolist()[r] if r >= 0 else None for r in rows]
    ref_flat = [flat.tolist()[r] if r >= 0 else None for r in rows]
    for threshold in (1 << 18, 1):  # serial, then split over the kernel pool
        old, kernels.PARALLEL_MIN_ROWS = kernels.PARALLEL_MIN_ROWS, threshold
        try:
            got_jag = gather(jag, np.asarray(rows, dtype=np.int64), optional=optional)
            got_flat = gather(flat, np.asarray(rows, dtype=np.int64), optional=optional)
        finally:
            kernels.PARALLEL_MIN_ROWS = old
        assert got_jag.tolist() == ref_jag
        assert got_flat.tolist() == ref_flat
        assert ("?" in str(got_flat.type)) == optional


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.integers(0, 50), max_size=80, unique=True),
    queries=st.lists(st.integers(0, 55), min_size=1, max_size=80),
)
def test_merge_sorted_matches_searchsorted(keys: list[int], queries: list[int]) -> None:
    import columnhub._kernels as kernels

    s = np.sort(np.asarray(keys, dtype=np.uint64))
    q = np.sort(np.asarray(queries, dtype=np.uint64))
    expected_lo = np.searchsorted(s, q)
    expected_found = np.isin(q, s)
    for threshold in (1 << 18, 1):  # serial, then split over the kernel pool
        old, kernels.PARALLEL_MIN_ROWS = kernels.PARALLEL_MIN_ROWS, threshold
        try:
            lo, found = kernels.merge_sorted(s, q)
        finally:
            kernels.PARALLEL_MIN_ROWS = old
        assert lo.tolist() == expected_lo.tolist()
        assert found.tolist() == expected_found.tolist()


@settings(max_examples=80, deadline=None)
@given(
    primary=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40)), max_size=60),
    friend=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40)), max_size=60),
    sort_primary=st.booleans(),
    sort_friend=st.booleans(),
    threads=st.integers(1, 4),
    run_dtype=st.sampled_from(["uint32", "uint64", "int32", "int64"]),
    wide=st.booleans(),
)
def test_unique_key_match_from_columns_equals_dict_join(
    primary: list[tuple[int, int]],
    friend: list[tuple[int, int]],
    sort_primary: bool,
    sort_friend: bool,
    threads: int,
    run_dtype: str,
    wide: bool,
) -> None:
    """Packing straight from the key columns, friend sorted in pieces merged while pairing.

    The kernel pool is told to cut work into ``threads`` pieces even for a few
    rows, so sorted runs, key-range pieces and their boundaries are all hit;
    repeated keys anywhere (also in different runs, also unmatched) give ``None``.
    ``wide`` pairs the keys as if they left no room for the row number in
    their word (keys and rows sorted apart, what wide real event numbers get).
    """
    import columnhub._kernels as kernels
    from columnhub.join.match import Match, match_unique_keys, pair_unique
    from columnhub.keys import KeyPacking

    if sort_primary:
        primary = sorted(primary)
    if sort_friend:
        friend = sorted(friend)

    def columns(rows: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        return {
            "run": np.array([r for r, _ in rows], dtype=run_dtype),
            "event": np.array([e for _, e in rows], dtype=np.uint64),
        }

    pk, fk = columns(primary), columns(friend)
    kernels.kernel_pool()
    old = kernels.PARALLEL_MIN_ROWS, kernels._pool_size
    kernels.PARALLEL_MIN_ROWS, kernels._pool_size = 2, threads
    try:
        packing = KeyPacking.fit(pk, fk, names=["run", "event"]) if primary or friend else None

        def unique_match(how: str) -> Match | None:
            if packing is None:
                return None
            if not wide:
                return match_unique_keys(pk, fk, packing, how=how)
            if not primary or not friend:
                return None
            pw, p_sorted = packing.compose(pk, 0)  # keys alone
            fw, f_sorted = packing.compose(fk, 0)
            return pair_unique(
                pw, fw, 0, how=how, primary_sorted=p_sorted, friend_sorted=f_sorted
            )

        got = {how: unique_match(how) for how in ("left", "inner")}
    finally:
        kernels.PARALLEL_MIN_ROWS, kernels._pool_size = old
    if not primary or not friend:
        assert got == {"left": None, "inner": None}
        return
    if len(set(primary)) < len(primary) or len(set(friend)) < len(friend):
        assert got == {"left": None, "inner": None}
        return
    where = {key: j for j, key in enumerate(friend)}
    left, inner = got["left"], got["inner"]
    assert left is not None
    assert inner is not None
    assert left.primary_identity
    assert left.friend_rows.tolist() == [where.get(key, -1) for key in primary]
    assert inner.primary_rows.tolist() == [i for i, key in enumerate(primary) if key in where]
    assert inner.friend_rows.tolist() == [where[key] for key in primary if key in where]


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.integers(0, 50), max_size=80, unique=True),
    queries=st.lists(st.integers(0, 55), max_size=80, unique=True),
    presorted=st.booleans(),
    wide=st.booleans(),
)
def test_sort_words_and_merge_unique_match_numpy(
    keys: list[int], queries: list[int], presorted: bool, wide: bool
) -> None:
    """Sorting packed keys (skipped for keys already in order) and the one-pass unique merge.

    ``wide`` keys leave no room for the row number in a word (from 5 rows
    on): they are arg-sorted in pieces and the pieces merged.
    """
    import columnhub._kernels as kernels
    from columnhub.join import sort_words

    scale = 2**62 // 56 if wide else 1
    words = np.asarray(sorted(keys) if presorted else keys, dtype=np.uint64) * np.uint64(scale)
    q = np.asarray(queries, dtype=np.uint64) * np.uint64(scale)
    rows = np.arange(len(q), dtype=np.int64)[::-1].copy()  # any row per query
    for threshold in (1 << 18, 1):  # serial, then split over the kernel pool
        old, kernels.PARALLEL_MIN_ROWS = kernels.PARALLEL_MIN_ROWS, threshold
        try:
            order, sorted_words = sort_words(words)
            q_order, q_sorted = sort_words(q)
            friend = kernels.merge_unique(sorted_words, order, q_sorted, rows[q_order])
        finally:
            kernels.PARALLEL_MIN_ROWS = old
        expected = np.argsort(words, kind="stable")
        assert order.tolist() == expected.tolist()
        assert sorted_words.tolist() == words[expected].tolist()
        where = {int(k): i for i, k in enumerate(words)}
        assert friend.tolist() == [where.get(int(v), -1) for v in q[::-1]]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 40),
    flips=st.lists(st.integers(0, 39), max_size=3),
    dtype=st.sampled_from(["uint32", "uint64", "int64"]),
    threshold=st.sampled_from([1 << 18, 2]),
)
def test_first_difference_matches_numpy(
    n: int, flips: list[int], dtype: str, threshold: int
) -> None:
    """The aligned-join key check against numpy, columns of different types side by side."""
    import columnhub._kernels as kernels

    rng = np.random.default_rng(n)
    run = rng.integers(0, 5, n).astype(dtype)
    event = rng.integers(0, 2**40, n).astype(np.uint64)
    other = event.copy()
    for i in flips:
        if i < n:
            other[i] += np.uint64(1)
    expected = np.flatnonzero(event != other)
    old, kernels.PARALLEL_MIN_ROWS = kernels.PARALLEL_MIN_ROWS, threshold
    try:
        got = kernels.first_difference([(run, run.astype(np.uint64)), (event, other)])
    finally:
        kernels.PARALLEL_MIN_ROWS = old
    assert got == (int(expected[0]) if expected.size else -1)
