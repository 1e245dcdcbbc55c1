"""Matching event keys: row indices of a join, before any column is touched.

Joins are done on *row indices* first (this module), columns are gathered
after (:mod:`columnhub.join.gather`). A primary chunk's keys are packed with
the friend index's packing, sorted (one vectorised sort, none when the chunk
already comes in key order), and merged into the index's sorted keys (one
compiled linear walk that writes each row's partner, or ``searchsorted`` when
the index is far larger than the chunk). Two in-memory tables with unique
keys are joined without an index: :func:`pair_unique`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from columnhub._kernels import (
    argsort_runs,
    compose_keys,
    kernel_pool_size,
    merge_sorted,
    merge_unique,
    pair_runs,
    sort_runs,
)
from columnhub.errors import DuplicateKeyError
from columnhub.join.index import KeyIndex, searchable, sort_words
from columnhub.join.validate import check_how, check_unique, needs_unique
from columnhub.keys import KeyColumns, KeyPacking, format_key, integer_keys

__all__ = [
    "FetchPlan",
    "Match",
    "fetch_plan",
    "match",
    "match_indexes",
    "match_unique_keys",
    "match_unique_words",
    "pair_unique",
    "unmatched_rows",
]


@dataclass(frozen=True)
class Match:
    """The row pairs of a join, in output order.

    Attributes:
        primary_rows: ``int64`` primary row per output row, ``-1`` for none.
        friend_rows: ``int64`` friend dataset row (index row) per output row,
            ``-1`` for none.
        primary_identity: ``primary_rows`` is exactly ``0..n-1`` (a left join
            on unique friend keys): primary columns need no gather.
    """

    primary_rows: np.ndarray
    friend_rows: np.ndarray
    primary_identity: bool = False

    def __len__(self) -> int:
        return len(self.friend_rows)

    @property
    def matched(self) -> np.ndarray:
        """Boolean per output row: both a primary and a friend row."""
        return (self.primary_rows >= 0) & (self.friend_rows >= 0)


def _pack_query(keys: KeyColumns, index: KeyIndex) -> tuple[np.ndarray, np.ndarray | None]:
    words, fits = index.packing.pack(keys)
    if fits is not None:
        words[~fits] = 0
    return words, fits


def _primary_dup_error(
    keys: dict[str, np.ndarray], q: np.ndarray, order: np.ndarray, validate: str
) -> DuplicateKeyError:
    eq = np.asarray(q[1:] == q[:-1], dtype=bool)
    pos = np.flatnonzero(eq)
    rows = np.minimum(order[pos], order[pos + 1])
    first = np.argsort(rows, kind="stable")[:5]
    lines = []
    for i in first:
        a, b = sorted((int(order[pos[i]]), int(order[pos[i] + 1])))
        vals = [int(c[a]) for c in keys.values()]
        lines.append(f"  {format_key(list(keys), vals)} at chunk rows {a} and {b}")
    msg = (
        f"the primary keys repeat ({len(pos)} repeated row(s) in this chunk), but "
        f"validate={validate!r} requires unique primary keys. First duplicates:\n"
        + "\n".join(lines)
        + "\nFix: use validate='many_to_one' if several primary events may share a friend "
        "row, or remove the duplicated events from the primary dataset."
    )
    return DuplicateKeyError(msg)


def _merge(
    q_order: np.ndarray,
    q_sorted: np.ndarray,
    fits: np.ndarray | None,
    index: KeyIndex,
    *,
    how: str,
) -> Match:
    """Join sorted query keys (rows ``q_order``) against ``index``."""
    n = len(q_order)
    s = index.search_keys
    m = len(s)
    q = searchable(q_sorted)
    one_word = q.ndim == 1 and q.dtype == np.uint64 and s.dtype == np.uint64
    linear = bool(n) and m <= 16 * n and one_word
    if linear and index.is_unique and fits is None:
        # the common case in one pass: walk both sorted sides, write each row's partner
        friend = merge_unique(s, index.order, q, q_order)
        if how == "left":
            return Match(np.arange(n, dtype=np.int64), friend, primary_identity=True)
        keep = np.flatnonzero(friend >= 0)
        return Match(keep, friend[keep])
    if linear:
        # both sides sorted and of similar size: one linear walk beats a binary
        # search per query (a few query keys against a huge index: the search)
        lo, found = merge_sorted(s, q)
        lo_c = np.minimum(lo, m - 1)
    elif m:
        lo = np.searchsorted(s, q, side="left")
        # a key above every index key gets lo == m; clamped, it compares unequal
        lo_c = np.minimum(lo, m - 1)
        found = np.asarray(s[lo_c] == q, dtype=bool)
    else:
        lo = np.searchsorted(s, q, side="left")
        lo_c = lo
        found = np.zeros(n, dtype=bool)
    if fits is not None:
        found &= fits[q_order]
    if index.is_unique:
        friend = np.empty(n, dtype=np.int64)
        if m:
            friend_sorted = index.order[lo_c]
            np.putmask(friend_sorted, ~found, -1)
            friend[q_order] = friend_sorted
        else:
            friend.fill(-1)
        if how == "left":
            return Match(np.arange(n, dtype=np.int64), friend, primary_identity=True)
        keep = np.flatnonzero(friend >= 0)
        return Match(keep, friend[keep])
    hi = np.searchsorted(s, q, side="right")
    counts = np.where(found, hi - lo, 0)
    cnt = np.empty(n, dtype=np.int64)
    cnt[q_order] = counts
    start = np.empty(n, dtype=np.int64)
    start[q_order] = lo
    out_cnt = np.maximum(cnt, 1) if how == "left" else cnt
    primary = np.repeat(np.arange(n, dtype=np.int64), out_cnt)
    total = len(primary)
    first_out = np.cumsum(out_cnt) - out_cnt
    within = np.arange(total, dtype=np.int64) - np.repeat(first_out, out_cnt)
    pos = np.repeat(start, out_cnt) + within
    has = np.repeat(cnt > 0, out_cnt)
    friend = np.where(has, index.order[np.where(has, pos, 0)] if m else -1, -1)
    identity = how == "left" and total == n
    return Match(primary, friend.astype(np.int64, copy=False), primary_identity=identity)


def match(
    keys: KeyColumns,
    index: KeyIndex,
    *,
    how: str = "left",
    validate: str = "one_to_one",
) -> Match:
    """Row pairs joining one primary chunk to a friend dataset's key index.

    Output rows follow the primary rows; for ``one_to_many`` a primary row
    repeats once per friend match (friend rows in dataset order).

    ``how`` here is per chunk: ``"left"`` (every primary row, friend ``-1``
    when unmatched) or ``"inner"`` (matched only). For a ``right`` join use
    ``"inner"`` per chunk, for ``outer`` ``"left"``, and emit
    :func:`unmatched_rows` of the friend once.

    Friend-side duplicates are checked here (from ``index``); primary
    duplicates are checked within the chunk. Duplicates *across* primary
    chunks need :func:`~columnhub.join.validate.check_unique` on the primary
    dataset's :class:`KeyIndex`, once per request.

    Args:
        keys: the primary chunk's key columns, in key order.
        index: the friend dataset's key index.
        how: ``"left"`` or ``"inner"`` (``"right"``/``"outer"`` are mapped
            as above for convenience).
        validate: ``one_to_one``, ``many_to_one`` or ``one_to_many``.

    Returns:
        A :class:`Match`.

    Raises:
        DuplicateKeyError: ``validate`` is violated.
        KeyTypeError: a key column is invalid.
        JoinError: unknown ``how``/``validate`` or wrong key columns.
    """
    check_how(how, validate)
    check_unique(index, side="friend", validate=validate)
    norm = integer_keys(keys)
    words, fits = _pack_query(norm, index)
    q_order, q_sorted = sort_words(words, overwrite=True)
    if needs_unique("primary", validate) and len(q_order) > 1:
        # keys outside the index's packing share dummy words: check those chunks
        # with a packing of their own
        if fits is None:
            c_order, q = q_order, searchable(q_sorted)
        else:
            own, _ = KeyPacking.fit(norm).pack(norm)
            c_order, c_sorted = sort_words(own, overwrite=True)
            q = searchable(c_sorted)
        if bool(np.asarray(q[1:] == q[:-1], dtype=bool).any()):
            raise _primary_dup_error(norm, q, c_order, validate)
    per_chunk = "left" if how in ("left", "outer") else "inner"
    return _merge(q_order, q_sorted, fits, index, how=per_chunk)


def match_indexes(primary: KeyIndex, friend: KeyIndex, *, how: str = "left") -> Match:
    """Row pairs of two indexes that share one packing (no re-sort of the primary).

    Validation is the caller's (:func:`~columnhub.join.validate.check_unique`).
    """
    if primary.packing != friend.packing:
        msg = "match_indexes needs two indexes with the same packing"
        raise ValueError(msg)
    return _merge(primary.order, primary.sorted_words, None, friend, how=how)


def _row_bits(n_p: int, n_f: int) -> int:
    return max(1, (max(n_p, n_f) - 1).bit_length())


def match_unique_words(
    primary_words: np.ndarray, friend_words: np.ndarray, *, total_bits: int, how: str = "left"
) -> Match | None:
    """Sort-and-walk join of two single-word key sets that should both be unique.

    Returns ``None`` when either side has duplicates (the caller then takes
    the general path, which also builds the error message); see
    :func:`pair_unique`.
    """
    n_p, n_f = len(primary_words), len(friend_words)
    if primary_words.ndim != 1 or friend_words.ndim != 1 or not n_p or not n_f:
        return None
    rb = _row_bits(n_p, n_f)
    if total_bits + rb > 64:
        rb = 0  # no room for the row number: keys and rows apart
    friend = np.empty(n_f, dtype=np.uint64)
    primary = np.empty(n_p, dtype=np.uint64)
    friend_sorted = compose_keys([(friend_words, 0, 0)], rb, friend)
    primary_sorted = compose_keys([(primary_words, 0, 0)], rb, primary)
    return pair_unique(
        primary, friend, rb, how=how, primary_sorted=primary_sorted, friend_sorted=friend_sorted
    )


def match_unique_keys(
    primary_keys: KeyColumns, friend_keys: KeyColumns, packing: KeyPacking, *, how: str = "left"
) -> Match | None:
    """:func:`match_unique_words` straight from key columns fitted by ``packing``.

    Packing (with the row number, when it fits) is one pass per side
    (:meth:`KeyPacking.compose`). ``None`` for keys of several words, or as
    for :func:`match_unique_words`.
    """
    n_p = len(next(iter(primary_keys.values())))
    n_f = len(next(iter(friend_keys.values())))
    if packing.nwords != 1 or not n_p or not n_f:
        return None
    rb = _row_bits(n_p, n_f)
    if packing.total_bits + rb > 64:
        rb = 0
    primary, primary_sorted = packing.compose(primary_keys, rb)
    friend, friend_sorted = packing.compose(friend_keys, rb)
    return pair_unique(
        primary, friend, rb, how=how, primary_sorted=primary_sorted, friend_sorted=friend_sorted
    )


def pair_unique(
    primary: np.ndarray,
    friend: np.ndarray,
    rowbits: int,
    *,
    how: str,
    primary_sorted: bool = False,
    friend_sorted: bool = False,
) -> Match | None:
    """The unique-key left or inner match of two sides of packed keys.

    With ``rowbits`` > 0 each side holds composites ``key << rowbits | row``
    and is sorted in place (``np.sort``); with 0 it holds the keys alone and
    is arg-sorted. The friend is sorted in one piece per core and the
    primary, unless already in order, as one piece, all at once;
    :func:`~columnhub._kernels.pair_runs` then merges the friend's pieces
    while walking the primary. ``None`` when a key repeats on either side.
    """
    whole_friend = np.array([0, len(friend)], dtype=np.int64)
    jobs = [] if friend_sorted else [(friend, kernel_pool_size())]
    if not primary_sorted:
        jobs.append((primary, 1))
    if rowbits:
        bounds = sort_runs(*jobs)  # in place
        friend_bounds = whole_friend if friend_sorted else bounds[0]
        partners = pair_runs((friend, friend, rowbits), friend_bounds, (primary, primary, rowbits))
    else:
        done = argsort_runs(*jobs)
        if friend_sorted:
            fkeys, friend_bounds = friend, whole_friend
            frows = np.arange(len(friend), dtype=np.uint64)
        else:
            fkeys, frows, friend_bounds = done.pop(0)
        if primary_sorted:
            pkeys, prows = primary, np.arange(len(primary), dtype=np.uint64)
        else:
            pkeys, prows, _ = done.pop(0)
        partners = pair_runs((fkeys, frows, 0), friend_bounds, (pkeys, prows, 0))
    if partners is None:  # a key repeats on one side
        return None
    if how == "left":
        return Match(np.arange(len(primary), dtype=np.int64), partners, primary_identity=True)
    keep = np.flatnonzero(partners >= 0)
    return Match(keep, partners[keep])


def unmatched_rows(keys: KeyColumns, primary_index: KeyIndex) -> np.ndarray:
    """Rows of ``keys`` (friend keys) whose key is nowhere in the primary dataset.

    For right and outer joins: these friend rows are emitted once (with their
    own keys and ``None`` for primary columns), after the primary chunks.

    Args:
        keys: friend key columns (all of the friend, or one friend chunk;
            rows are counted from 0 within ``keys``).
        primary_index: the primary dataset's key index.

    Returns:
        Sorted ``int64`` row numbers into ``keys``.
    """
    words, fits = _pack_query(integer_keys(keys), primary_index)
    q_order, q_sorted = sort_words(words, overwrite=True)
    s = primary_index.search_keys
    q = searchable(q_sorted)
    m = len(s)
    if not m:
        return np.arange(len(q_order), dtype=np.int64)
    lo = np.searchsorted(s, q, side="left")
    found = np.asarray(s[np.minimum(lo, m - 1)] == q, dtype=bool) & (lo < m)
    if fits is not None:
        found &= fits[q_order]
    return np.sort(q_order[~found])


@dataclass(frozen=True)
class FetchPlan:
    """Which friend entries to read, and where each output row finds its data.

    Read ``ranges`` in order (``(file, entry_start, entry_stop)``), concatenate
    the arrays read, then ``gather(concatenated, rows)``.

    Attributes:
        ranges: entry ranges to read, per file, in file then entry order.
        rows: ``int64`` position into the concatenated ranges per output row
            (``-1`` where the output row has no friend).
    """

    ranges: tuple[tuple[int, int, int], ...]
    rows: np.ndarray

    @property
    def entries_read(self) -> int:
        """Total number of entries the plan reads."""
        return sum(stop - start for _, start, stop in self.ranges)


def fetch_plan(index: KeyIndex, friend_rows: np.ndarray, *, max_gap: int = 1024) -> FetchPlan:
    """Group needed friend rows by file into entry ranges to read.

    Args:
        index: the friend's key index.
        friend_rows: friend rows per output row (``Match.friend_rows``), ``-1``
            for none.
        max_gap: two needed entries of one file at most this many entries
            apart are read in one range (fewer, larger reads).

    Returns:
        A :class:`FetchPlan`.
    """
    rows = np.asarray(friend_rows, dtype=np.int64)
    ok = rows >= 0
    needed = np.unique(rows[ok])
    if not needed.size:
        return FetchPlan((), np.full(len(rows), -1, dtype=np.int64))
    file, entry = index.locate(needed)
    by = np.lexsort((entry, file))
    needed, file, entry = needed[by], file[by], entry[by]
    new = np.ones(len(needed), dtype=bool)
    new[1:] = (file[1:] != file[:-1]) | (entry[1:] - entry[:-1] > max_gap)
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(needed)) - 1
    ranges = tuple(
        (int(file[a]), int(entry[a]), int(entry[b]) + 1) for a, b in zip(starts, ends, strict=True)
    )
    sizes = np.array([stop - start for _, start, stop in ranges], dtype=np.int64)
    base = np.cumsum(sizes) - sizes
    group = np.cumsum(new) - 1
    pos_needed = base[group] + (entry - entry[starts][group])
    # map each output row to the position of its needed row
    where = np.searchsorted(needed_sorted := np.sort(needed), rows[ok])
    pos_sorted = np.empty(len(needed), dtype=np.int64)
    pos_sorted[np.searchsorted(needed_sorted, needed)] = pos_needed
    out = np.full(len(rows), -1, dtype=np.int64)
    out[ok] = pos_sorted[where]
    return FetchPlan(ranges, out)
