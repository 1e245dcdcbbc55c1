"""Event-key normalisation, packing and the key kernels, checked against Python integers.

The kernels (packing, sorting, matching, gathering) run in both of their
implementations, numpy (what a delivery runs) and compiled (numba), each
against a brute-force reference.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import awkward as ak
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from columnhub import _kernels
from columnhub.errors import DuplicateKeyError, JoinError, KeyTypeError
from columnhub.join import KeyIndex, match, sort_words
from columnhub.join.index import searchable
from columnhub.keys import KeyPacking, normalize_key_column, normalize_keys

U64MAX = 2**64 - 1

# values near 0, near 2**32, near 2**63 and near 2**64 - 1
_values = st.one_of(
    st.integers(0, 20),
    st.integers(2**32 - 5, 2**32 + 5),
    st.integers(2**63 - 3, 2**63 + 3),
    st.integers(U64MAX - 20, U64MAX),
    st.integers(0, U64MAX),
)


@st.composite
def key_tables(draw: st.DrawFn) -> list[list[int]]:
    """Rows of keys (Python ints), 1-4 columns."""
    ncol = draw(st.integers(1, 4))
    col_values = [draw(st.lists(_values, min_size=1, max_size=4)) for _ in range(ncol)]
    n = draw(st.integers(0, 30))
    return [[draw(st.sampled_from(vals)) for vals in col_values] for _ in range(n)] or [
        [v[0] for v in col_values]
    ]


def _columns(rows: list[list[int]]) -> dict[str, np.ndarray]:
    ncol = len(rows[0])
    return {f"k{i}": np.array([r[i] for r in rows], dtype=np.uint64) for i in range(ncol)}


def _words_tuple(words: np.ndarray) -> tuple[int, ...] | int:
    return tuple(int(w) for w in words) if words.ndim else int(words)


@settings(deadline=None, max_examples=200)
@given(key_tables())
def test_pack_roundtrip_order_and_no_collisions(rows: list[list[int]]) -> None:
    cols = _columns(rows)
    packing = KeyPacking.fit(cols)
    words, fits = packing.pack(cols)
    assert fits is None
    # exact round trip
    back = packing.unpack(words)
    for name, col in cols.items():
        assert back[name].tolist() == col.tolist()
    # as few words as possible: total bits rounded up to 64
    span_bits = sum((max(c.tolist()) - min(c.tolist())).bit_length() for c in cols.values())
    assert packing.nwords == max(1, -(-span_bits // 64))
    # packed words equal iff keys equal, and sort like the key tuples
    packed = [_words_tuple(w) for w in words]
    keys = [tuple(r) for r in rows]
    for a in range(len(keys)):
        for b in range(len(keys)):
            assert (packed[a] == packed[b]) == (keys[a] == keys[b])
            assert (packed[a] < packed[b]) == (keys[a] < keys[b])


@settings(deadline=None, max_examples=100)
@given(key_tables())
def test_sort_words_matches_python_sort(rows: list[list[int]]) -> None:
    cols = _columns(rows)
    packing = KeyPacking.fit(cols)
    words, _ = packing.pack(cols)
    for stable in (False, True):
        order, sorted_words = sort_words(words, stable=stable)
        assert sorted(order.tolist()) == list(range(len(rows)))
        assert np.array_equal(words[order], sorted_words)
        as_keys = [tuple(rows[i]) for i in order.tolist()]
        assert as_keys == sorted(tuple(r) for r in rows)
        if stable:
            expected = sorted(range(len(rows)), key=lambda i: (tuple(rows[i]), i))
            assert order.tolist() == expected
        s = searchable(sorted_words)
        assert len(s) == len(rows)


def test_wide_keys_use_several_words_losslessly() -> None:
    cols = {
        "a": np.array([0, U64MAX, 5, U64MAX], dtype=np.uint64),
        "b": np.array([U64MAX, 0, 5, U64MAX - 1], dtype=np.uint64),
        "c": np.array([1, 2, 3, 2**40], dtype=np.uint64),
    }
    packing = KeyPacking.fit(cols)
    assert packing.widths == (64, 64, 40)
    assert packing.nwords == 3
    words, _ = packing.pack(cols)
    assert words.shape == (4, 3)
    assert {k: v.tolist() for k, v in packing.unpack(words).items()} == {
        k: v.tolist() for k, v in cols.items()
    }


def test_cms_like_keys_fit_one_word() -> None:
    cols = {
        "run": np.array([315252, 325175], dtype=np.uint32),
        "luminosityBlock": np.array([1, 3000], dtype=np.uint32),
        "event": np.array([1, 2**34], dtype=np.uint64),
    }
    packing = KeyPacking.fit(cols)
    assert packing.nwords == 1
    words, _ = packing.pack(cols)
    assert words.shape == (2,)


def test_fit_over_both_sides_and_out_of_range_mask() -> None:
    a = {"run": np.array([10, 12], dtype=np.uint32), "event": np.array([5, 6], dtype=np.int64)}
    b = {"run": np.array([11, 14], dtype=np.uint64), "event": np.array([4, 9], dtype=np.uint64)}
    both = KeyPacking.fit(a, b)
    assert both.offsets == (10, 4)
    assert both.widths == ((14 - 10).bit_length(), (9 - 4).bit_length())
    only_a = KeyPacking.fit(a)
    words, fits = only_a.pack(b)
    assert fits is not None
    assert fits.tolist() == [False, False]  # event 4 < 5 and run 14 > 12
    c = {"run": np.array([11, 10], dtype=np.uint64), "event": np.array([6, 5], dtype=np.uint64)}
    words, fits = only_a.pack(c)
    assert fits is None
    assert only_a.unpack(words)["run"].tolist() == [11, 10]


def test_packing_dict_roundtrip() -> None:
    p = KeyPacking(("run", "event"), (3, 2**63), (4, 63))
    assert KeyPacking.from_dict(p.to_dict()) == p


def test_float_key_column_is_rejected_with_value_and_fix() -> None:
    with pytest.raises(KeyTypeError, match=r"'event'.*float64.*entry 1 is 2\.5.*astype"):
        normalize_key_column("event", np.array([1.0, 2.5]))
    with pytest.raises(KeyTypeError, match=r"'event'.*float32"):
        normalize_keys({"run": np.array([1]), "event": np.array([3.0], dtype=np.float32)})


def test_negative_signed_key_is_rejected_with_entry() -> None:
    with pytest.raises(KeyTypeError, match=r"'run'.*negative value -7 at entry 2"):
        normalize_key_column("run", np.array([1, 2, -7, 3], dtype=np.int32))
    # non-negative signed values are fine and exact
    big = np.array([2**63 - 1, 0], dtype=np.int64)
    assert normalize_key_column("event", big).tolist() == [2**63 - 1, 0]


def test_other_bad_key_columns() -> None:
    with pytest.raises(KeyTypeError, match=r"'flag'.*bool"):
        normalize_key_column("flag", np.array([True, False]))
    with pytest.raises(KeyTypeError, match=r"'Jet_idx'.*jagged"):
        normalize_key_column("Jet_idx", ak.Array([[1, 2], []]))
    with pytest.raises(KeyTypeError, match=r"'event'.*missing"):
        normalize_key_column("event", ak.Array([1, None, 3]))
    with pytest.raises(KeyTypeError, match="shape"):
        normalize_key_column("event", np.zeros((2, 2), dtype=np.uint64))
    # awkward flat integers are fine
    assert normalize_key_column("event", ak.Array(np.array([4, 5], np.uint32))).tolist() == [4, 5]


def test_length_mismatch_raises() -> None:
    with pytest.raises(JoinError, match=r"different lengths.*'run': 2.*'event': 3"):
        normalize_keys({"run": np.array([1, 2]), "event": np.array([1, 2, 3])})
    with pytest.raises(JoinError, match="at least one column"):
        normalize_keys({})
    with pytest.raises(JoinError, match="same number of key columns"):
        KeyPacking.fit({"a": np.array([1])}, {"a": np.array([1]), "b": np.array([2])})


# ---------------------------------------------------------------------------
# the numpy kernels (what a delivery runs: numba is never loaded there) and the
# compiled ones (once numba is loaded), each against a brute-force reference


@contextmanager
def kernels(*, compiled: bool, parallel_from: int = 2) -> Iterator[None]:
    """Take the numpy (or the compiled) kernels, with tiny blocks and row ranges.

    Blocks of 3 rows and the kernel pool's row ranges from 2 rows on make
    every block and range boundary of the small hypothesis inputs a real one.
    """
    saved = (_kernels.numba_loaded, _kernels.BLOCK_ROWS, _kernels.PARALLEL_MIN_ROWS)
    _kernels.numba_loaded = lambda: compiled  # type: ignore[assignment]
    _kernels.BLOCK_ROWS, _kernels.PARALLEL_MIN_ROWS = 3, parallel_from
    try:
        yield
    finally:
        _kernels.numba_loaded, _kernels.BLOCK_ROWS, _kernels.PARALLEL_MIN_ROWS = saved  # type: ignore[assignment]


MODES = (False, True)  # numpy, then compiled

#: CMS-like keys: run (uint32), luminosityBlock (uint32), event (uint64), the
#: event number also near 2**63 and near 2**64 - 1
_runs = st.sampled_from([1, 2, 316000, 362760, 2**32 - 1])
_lumis = st.one_of(st.integers(0, 5), st.integers(2**32 - 3, 2**32 - 1))
_events = st.one_of(
    st.integers(0, 40),
    st.integers(2**63 - 4, 2**63 + 4),
    st.integers(U64MAX - 4, U64MAX),
)


def _cms(rows: list[tuple[int, int, int]]) -> dict[str, np.ndarray]:
    return {
        "run": np.array([r for r, _, _ in rows], dtype=np.uint32),
        "luminosityBlock": np.array([lb for _, lb, _ in rows], dtype=np.uint32),
        "event": np.array([e for _, _, e in rows], dtype=np.uint64),
    }


def _packed(packing: KeyPacking, row: tuple[int, ...]) -> int:
    """The packed key of one row as a Python integer (the reference)."""
    value = 0
    for v, off, w in zip(row, packing.offsets, packing.widths, strict=True):
        value = (value << w) | (v - off)
    return value


@settings(deadline=None, max_examples=150)
@given(rows=st.lists(st.tuples(_runs, _lumis, _events), min_size=1, max_size=25))
def test_run_lumi_event_packing_numpy_and_compiled_agree_with_python(
    rows: list[tuple[int, int, int]],
) -> None:
    """pack, compose (with and without row numbers) and unpack: both kernels, exact ints."""
    cols = _cms(rows)
    packing = KeyPacking.fit(cols)
    expected = [_packed(packing, r) for r in rows]
    rowbits = max(1, (len(rows) - 1).bit_length())
    for compiled in MODES:
        with kernels(compiled=compiled):
            words, fits = packing.pack(cols)
            assert fits is None
            if packing.nwords == 1:
                assert words.tolist() == expected
                alone, ascending = packing.compose(cols, 0)
                assert alone.tolist() == expected
                assert ascending == (expected == sorted(expected))
                if packing.total_bits + rowbits <= 64:
                    comp, ascending = packing.compose(cols, rowbits)
                    with_rows = [(k << rowbits) | i for i, k in enumerate(expected)]
                    assert comp.tolist() == with_rows
                    assert ascending == (with_rows == sorted(with_rows))
            else:  # most significant word first
                total = 64 * packing.nwords
                assert [
                    sum(int(w) << (total - 64 * (j + 1)) for j, w in enumerate(ws)) for ws in words
                ] == expected
            back = packing.unpack(words)
            for name, col in cols.items():
                assert back[name].tolist() == col.tolist()


@pytest.mark.parametrize("descent_at", [1, 3, 5, 6, 9, None])
def test_compose_sees_a_descent_at_any_row_and_block_boundary(descent_at: int | None) -> None:
    """Keys in order but for one step down, on a block boundary (3, 6, 9) or inside a block."""
    events = list(range(100, 112))
    if descent_at is not None:
        events[descent_at:] = [e - 50 for e in events[descent_at:]]
    cols = _cms([(1, 1, e) for e in events])
    packing = KeyPacking.fit(cols)
    for compiled in MODES:
        for parallel_from in (2, 1 << 30):  # row ranges of the kernel pool, then one range
            with kernels(compiled=compiled, parallel_from=parallel_from):
                for rowbits in (0, 4):
                    _, ascending = packing.compose(cols, rowbits)
                    assert ascending == (descent_at is None)


@settings(deadline=None, max_examples=150)
@given(
    fitted=st.lists(st.tuples(_runs, _lumis, _events), min_size=1, max_size=15),
    queries=st.lists(st.tuples(_runs, _lumis, _events), max_size=15),
)
def test_keys_outside_the_packing_are_masked_by_both_kernels(
    fitted: list[tuple[int, int, int]], queries: list[tuple[int, int, int]]
) -> None:
    """Query keys outside a fitted packing: ``fits`` false, in-range keys packed exactly."""
    packing = KeyPacking.fit(_cms(fitted))
    q = _cms(queries) if queries else {k: v[:0] for k, v in _cms(fitted).items()}
    inside = [
        all(
            off <= v < off + (1 << w)
            for v, off, w in zip(r, packing.offsets, packing.widths, strict=True)
        )
        for r in queries
    ]
    for compiled in MODES:
        with kernels(compiled=compiled):
            words, fits = packing.pack(q)
            got_fits = [True] * len(queries) if fits is None else fits.tolist()
            assert got_fits == inside
            if packing.nwords == 1:
                for w, ok, r in zip(words.tolist(), inside, queries, strict=True):
                    if ok:
                        assert w == _packed(packing, r)


@settings(deadline=None, max_examples=150)
@given(
    words=st.lists(
        st.one_of(
            st.integers(0, 30), st.integers(2**63 - 3, 2**63 + 3), st.integers(U64MAX - 3, U64MAX)
        ),
        max_size=40,
    ),
)
def test_sort_words_numpy_and_compiled_with_duplicates_and_wide_words(words: list[int]) -> None:
    """One-word keys, narrow (sorted with the row number) and wide (arg-sorted), repeats too."""
    for scale_down in (True, False):  # narrow keys (row number fits beside them), then wide
        values = [w % 64 for w in words] if scale_down else words
        arr = np.array(values, dtype=np.uint64)
        for compiled in MODES:
            with kernels(compiled=compiled):
                for stable in (False, True):
                    order, sorted_words = sort_words(arr.copy(), stable=stable)
                    assert sorted_words.tolist() == sorted(values)
                    assert sorted(order.tolist()) == list(range(len(values)))
                    assert [values[i] for i in order.tolist()] == sorted(values)
                    if stable or scale_down:  # composites sort equal keys by row
                        assert order.tolist() == sorted(
                            range(len(values)), key=lambda i: (values[i], i)
                        )


@settings(deadline=None, max_examples=150)
@given(
    friend=st.lists(st.tuples(_runs, _lumis, _events), max_size=20),
    primary=st.lists(st.tuples(_runs, _lumis, _events), min_size=1, max_size=20),
    validate=st.sampled_from(["one_to_one", "many_to_one"]),
)
def test_index_and_match_numpy_and_compiled_equal_dict_join(
    friend: list[tuple[int, int, int]],
    primary: list[tuple[int, int, int]],
    validate: str,
) -> None:
    """A friend index built and a primary chunk matched with either kernel set, against a dict.

    Duplicated keys on either side give the same DuplicateKeyError with both.
    """
    friend_cols = _cms(friend) if friend else {k: v[:0] for k, v in _cms(primary).items()}
    answers = []
    for compiled in MODES:
        with kernels(compiled=compiled):
            index = KeyIndex.build(friend_cols)
            assert index.is_unique == (len(set(friend)) == len(friend))
            answer: object
            try:
                left = match(_cms(primary), index, how="left", validate=validate)
                inner = match(_cms(primary), index, how="inner", validate=validate)
            except DuplicateKeyError as err:
                answer = ("error", str(err).split("First duplicates")[0])
            else:
                answer = (
                    left.friend_rows.tolist(),
                    inner.primary_rows.tolist(),
                    inner.friend_rows.tolist(),
                )
            answers.append(answer)
    assert answers[0] == answers[1]
    friend_dup = len(set(friend)) < len(friend)
    primary_dup = len(set(primary)) < len(primary)
    if friend_dup or (validate == "one_to_one" and primary_dup):
        assert answers[0][0] == "error"
        return
    where = {key: i for i, key in enumerate(friend)}
    assert answers[0] == (
        [where.get(k, -1) for k in primary],
        [i for i, k in enumerate(primary) if k in where],
        [where[k] for k in primary if k in where],
    )


@settings(deadline=None, max_examples=100)
@given(
    keys=st.lists(st.integers(0, 60), max_size=40, unique=True),
    queries=st.lists(st.integers(0, 70), max_size=40),
    big=st.booleans(),
)
def test_merge_kernels_numpy_and_compiled_equal_brute_force(
    keys: list[int], queries: list[int], big: bool
) -> None:
    base = 2**63 - 30 if big else 0  # keys around 2**63 too
    s = np.array(sorted(keys), dtype=np.uint64) + np.uint64(base)
    q = np.array(sorted(queries), dtype=np.uint64) + np.uint64(base)
    rows = np.arange(len(s), dtype=np.int64)[::-1].copy()
    query_rows = np.arange(len(q), dtype=np.int64)[::-1].copy()
    position = {int(k): i for i, k in enumerate(s)}
    for compiled in MODES:
        with kernels(compiled=compiled):
            lo, found = _kernels.merge_sorted(s, q)
            assert lo.tolist() == [sum(1 for k in s.tolist() if k < v) for v in q.tolist()]
            assert found.tolist() == [int(v) in position for v in q]
            if len(q):
                friend = _kernels.merge_unique(s, rows, q, query_rows)
                want = [int(rows[position[int(v)]]) if int(v) in position else -1 for v in q]
                assert friend.tolist() == want[::-1]


@settings(deadline=None, max_examples=120)
@given(
    lengths=st.lists(st.integers(0, 7), max_size=30),
    rows=st.lists(st.integers(-1, 29), max_size=40),
    dtype=st.sampled_from(["float32", "float64", "int16", "uint64", "bool"]),
    index_type=st.sampled_from(["int32", "uint32", "int64"]),
)
def test_gather_kernels_numpy_and_compiled_equal_python_lists(
    lengths: list[int], rows: list[int], dtype: str, index_type: str
) -> None:
    """Flat and list gathers (rows -1 give nothing), also from an empty source."""
    rng = np.random.default_rng(len(lengths) * 41 + len(rows))
    content = (rng.random(sum(lengths) + 2) * 90).astype(dtype)
    offsets = np.concatenate([[1], 1 + np.cumsum(lengths)]).astype(index_type)  # lists start at 1
    starts, stops = offsets[:-1], offsets[1:]
    rows = [r for r in rows if r < len(lengths)]
    idx = np.array(rows, dtype=np.int64)
    lists = [content[int(a) : int(b)].tolist() for a, b in zip(starts, stops, strict=True)]
    flat = (rng.random(len(lengths)) * 90).astype(dtype)
    for compiled in MODES:
        with kernels(compiled=compiled):
            values, valid, missing = _kernels.gather_flat(flat, idx)
            assert valid.tolist() == [r >= 0 for r in rows]
            assert missing == rows.count(-1)
            assert [v for v, ok in zip(values.tolist(), valid, strict=True) if ok] == [
                flat[r].item() for r in rows if r >= 0
            ]
            new_offsets, items, valid, missing = _kernels.gather_lists(starts, stops, content, idx)
            assert valid.tolist() == [r >= 0 for r in rows]
            assert missing == rows.count(-1)
            got = [items[a:b].tolist() for a, b in itertools.pairwise(new_offsets.tolist())]
            assert got == [lists[r] if r >= 0 else [] for r in rows]
    # nothing to take from: every row is -1
    none = np.full(3, -1, dtype=np.int64)
    for compiled in MODES:
        with kernels(compiled=compiled):
            values, valid, missing = _kernels.gather_flat(np.zeros(0, dtype=dtype), none)
            assert (values.tolist(), valid.tolist(), missing) == (
                [0, 0, 0] if dtype != "bool" else [False] * 3,
                [False] * 3,
                3,
            )
            new_offsets, items, valid, missing = _kernels.gather_lists(
                starts[:0], stops[:0], content[:0], none
            )
            assert (new_offsets.tolist(), len(items), missing) == ([0, 0, 0, 0], 0, 3)


@settings(deadline=None, max_examples=100)
@given(
    values=st.lists(st.integers(2**62, 2**63 - 1), max_size=20),
    flip=st.integers(0, 19),
    signed=st.booleans(),
)
def test_first_difference_numpy_and_compiled_exact_above_2_53(
    values: list[int], flip: int, signed: bool
) -> None:
    """Keys differing by 1 above 2**53 (where a float comparison sees none), int64 vs uint64."""
    a = np.array(values, dtype=np.int64 if signed else np.uint64)
    b = np.array(values, dtype=np.uint64)
    if flip < len(values):
        b[flip] += np.uint64(1)
    want = flip if flip < len(values) else -1
    for compiled in MODES:
        with kernels(compiled=compiled):
            assert _kernels.first_difference([(a, b)]) == want
            assert _kernels.first_difference([(b, b), (a, b)]) == want


@settings(deadline=None, max_examples=100)
@given(values=st.lists(st.integers(0, U64MAX), min_size=1, max_size=30), rowbits=st.integers(1, 8))
def test_minmax_and_split_composites_equal_python(values: list[int], rowbits: int) -> None:
    arr = np.array(values, dtype=np.uint64)
    keys = [v >> rowbits for v in values]
    for compiled in MODES:
        with kernels(compiled=compiled):
            assert _kernels.minmax(arr) == (min(values), max(values))
            rows, got = _kernels.split_composites(arr.copy(), rowbits)
            assert got.tolist() == keys
            assert rows.tolist() == [v & ((1 << rowbits) - 1) for v in values]


@settings(deadline=None, max_examples=100)
@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    picks=st.lists(st.integers(-1, 30), max_size=20),
    per_row=st.booleans(),
)
def test_locate_equals_brute_force(sizes: list[int], picks: list[int], per_row: bool) -> None:
    """``(file, entry)`` of index rows, one file or several (empty ones too), -1 rows."""
    n = sum(sizes)
    where = [(f, e) for f, size in enumerate(sizes) for e in range(size)]
    keys = {"event": np.arange(n, dtype=np.uint64)[::-1].copy()}
    if per_row:
        index = KeyIndex.build(keys, file=[f for f, _ in where], entry=[e for _, e in where])
    else:
        index = KeyIndex.from_files(
            [{"event": keys["event"][:0]}]
            if not n
            else [
                {"event": keys["event"][sum(sizes[:f]) : sum(sizes[: f + 1])]}
                for f in range(len(sizes))
            ]
        )
    rows = np.array([r for r in picks if r < n], dtype=np.int64)
    before = rows.copy()
    file, entry = index.locate(rows)
    want = (
        [where[r] if r >= 0 else (-1, -1) for r in rows.tolist()] if n else [(-1, -1) for _ in rows]
    )
    assert list(zip(file.tolist(), entry.tolist(), strict=True)) == want
    assert file.dtype == np.int32
    assert entry.dtype == np.int64
    entry[:] = 99  # the answer is no view of the rows asked for
    assert rows.tolist() == before.tolist()
