"""Event-key normalisation and packing, checked against Python integers."""

from __future__ import annotations

import awkward as ak
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from columnhub.errors import JoinError, KeyTypeError
from columnhub.join import sort_words
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
