"""Gathering columns by joined row indices, and the whole in-memory join.

:func:`gather` copies flat numeric columns and lists of numbers (the columns of
NanoAOD and PHYSLITE; option-typed numbers too, as Parquet fields are) with the
vectorised, parallel kernels of :mod:`columnhub._kernels` into packed arrays,
ready for Arrow; any other layout (records, nested lists, options) is wrapped in an
awkward ``IndexedOptionArray`` (rows ``-1`` become ``None``) or
``IndexedArray`` without copying.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import awkward as ak
import numpy as np
import numpy.typing as npt

from columnhub._kernels import gather_flat, gather_lists, minmax
from columnhub.errors import ColumnNotFoundError, JoinError, closest
from columnhub.join.index import KeyIndex
from columnhub.join.match import Match, match, match_indexes, match_unique_keys, unmatched_rows
from columnhub.join.validate import check_how, check_unique, needs_unique
from columnhub.keys import KeyPacking, integer_keys

__all__ = ["compact", "gather", "join_arrays"]


def gather(array: Any, rows: npt.ArrayLike, *, optional: bool = True) -> ak.Array:
    """Rows of ``array`` (flat, jagged or record) selected by ``rows``.

    Args:
        array: an awkward array or anything ``ak.to_layout`` accepts (numpy).
        rows: ``int64`` row numbers; ``-1`` means "no row".
        optional: give an option type (``?T``), ``-1`` rows becoming ``None``.
            With ``optional=False`` the type stays ``T`` and ``-1`` is an
            error. Choose by join type, not by data, so every chunk of a
            request has the same type.

    Returns:
        An ``ak.Array`` of ``len(rows)`` rows: a packed copy for numbers and
        lists of numbers, else a view over ``array``'s content.

    Raises:
        IndexError: a row is out of range, or ``-1`` with ``optional=False``.

    >>> gather(ak.Array([[1, 2], [], [3]]), [2, -1, 0]).tolist()
    [[3], None, [1, 2]]
    """
    layout = ak.to_layout(array, allow_record=False)
    idx = np.asarray(rows, dtype=np.int64)
    if idx.ndim != 1:
        msg = f"gather rows must be 1-dimensional, got shape {idx.shape}"
        raise IndexError(msg)
    if idx.size:
        lo, hi = minmax(idx)
        if hi >= len(layout) or lo < -1 or (lo < 0 and not optional):
            bad = hi if hi >= len(layout) else lo
            allowed = f"-1..{len(layout) - 1}" if optional else f"0..{len(layout) - 1}"
            msg = f"gather row {bad} out of range for {len(layout)} rows (allowed {allowed})"
            raise IndexError(msg)
    return _gather_checked(layout, idx, optional=optional)


def compact(array: ak.Array) -> ak.Array:
    """``array`` packed when it is an index view over a larger array.

    A :func:`gather` of an option-typed column (Parquet's nullable fields)
    indexes the whole array read; packed, it holds only its own rows, which
    is what a cache entry or a piece held in memory should hold.
    """
    layout = array.layout
    if (
        isinstance(layout, ak.contents.IndexedArray | ak.contents.IndexedOptionArray)
        and len(layout.content) > len(layout)  # not gather's one-row placeholder
    ):
        return ak.to_packed(array)
    return array


def _gather_checked(layout: ak.contents.Content, idx: np.ndarray, *, optional: bool) -> ak.Array:
    """:func:`gather` for ``int64`` rows known to be in range (``-1`` only if ``optional``)."""
    fast = _gather_packed(layout, idx, optional=optional)
    if fast is not None:
        return ak.Array(fast)
    index = ak.index.Index64(idx)
    if (
        optional
        and len(layout) == 0
        and idx.size
        and not isinstance(layout, ak.contents.EmptyArray)
    ):
        # every row is None: point at a one-row placeholder of the same type, since
        # ak.to_arrow fails on an IndexedOptionArray over an empty list content
        layout = layout.form.length_one_array(highlevel=False)
    if optional:
        out = ak.contents.IndexedOptionArray.simplified(index, layout)
    else:
        out = ak.contents.IndexedArray.simplified(index, layout)
    return ak.Array(out)


def _leaf(layout: ak.contents.Content) -> tuple[np.ndarray, np.ndarray | None] | None:
    """``(values, valid)`` of a numeric column, ``valid`` ``None`` unless option-typed
    with missing values (a Parquet field is option-typed even with none); else ``None``."""
    if isinstance(layout, ak.contents.NumpyArray):
        return (layout.data, None) if _plain(layout.data) else None
    if not (
        isinstance(
            layout,
            ak.contents.BitMaskedArray | ak.contents.ByteMaskedArray | ak.contents.UnmaskedArray,
        )
        and isinstance(layout.content, ak.contents.NumpyArray)
        and _plain(layout.content.data)
    ):
        return None
    n = len(layout)
    values = layout.content.data[:n]
    if isinstance(layout, ak.contents.UnmaskedArray):
        return values, None
    valid = np.asarray(layout.mask_as_bool(valid_when=True), dtype=np.bool_)[:n]
    return values, None if valid.all() else valid


def _rebuild_leaf(
    layout: ak.contents.Content, values: np.ndarray, valid: np.ndarray | None, *, option: bool
) -> ak.contents.Content:
    """A packed leaf like ``layout`` (same parameters, option-typed if it was or ``option``)."""
    numpy = layout if isinstance(layout, ak.contents.NumpyArray) else layout.content
    out: ak.contents.Content = ak.contents.NumpyArray(values, parameters=numpy.parameters)
    if isinstance(layout, ak.contents.NumpyArray) and not option:
        return out
    parameters = None if isinstance(layout, ak.contents.NumpyArray) else layout.parameters
    if valid is None:
        return ak.contents.UnmaskedArray(out, parameters=parameters)
    return ak.contents.ByteMaskedArray(
        ak.index.Index8(valid.view(np.int8)), out, valid_when=True, parameters=parameters
    )


def _gather_packed(
    layout: ak.contents.Content, rows: np.ndarray, *, optional: bool
) -> ak.contents.Content | None:
    """Copy the rows of a flat numeric or list-of-numeric column (vectorised, parallel).

    Numbers may be option-typed (Parquet fields are): values and validity are
    copied apart. Returns ``None`` for other layouts (records, nested lists,
    options of lists), which :func:`gather` then wraps in an index without
    copying.
    """
    flat = _leaf(layout)
    if flat is not None:
        data, mask = flat
        values, row_valid, missing = gather_flat(np.asarray(data), rows)
        valid: np.ndarray | None = row_valid if missing else None
        if mask is not None:
            valid, _, _ = gather_flat(mask, rows)  # False where the row is -1 too
        return _rebuild_leaf(layout, values, valid, option=optional)
    if not isinstance(layout, ak.contents.ListOffsetArray | ak.contents.ListArray):
        return None
    item = _leaf(layout.content)
    if item is None:
        return None
    data, mask = item
    starts = np.asarray(layout.starts.data)
    stops = np.asarray(layout.stops.data)
    offsets, values, valid, missing = gather_lists(starts, stops, np.asarray(data), rows)
    item_valid = None if mask is None else gather_lists(starts, stops, mask, rows)[1]
    out = ak.contents.ListOffsetArray(
        ak.index.Index64(offsets),
        _rebuild_leaf(layout.content, values, item_valid, option=False),
        parameters=layout.parameters,
    )
    if not optional:
        return out
    if not missing:
        return ak.contents.UnmaskedArray(out)
    return ak.contents.ByteMaskedArray(ak.index.Index8(valid.view(np.int8)), out, valid_when=True)


def _plain(data: Any) -> bool:
    """A 1-d numpy array of native byte order: what the compiled kernels take."""
    return isinstance(data, np.ndarray) and data.ndim == 1 and data.dtype.isnative


def _as_array(values: Any) -> ak.Array:
    return values if isinstance(values, ak.Array) else ak.Array(ak.to_layout(values))


def _require(columns: Mapping[str, Any], names: Sequence[str], side: str) -> None:
    for name in names:
        if name not in columns:
            near = closest(name, columns)
            hint = f"; closest: {', '.join(near)}" if near else ""
            msg = f"key column {name!r} is not among the {side} columns{hint}"
            raise ColumnNotFoundError(msg)


def _check_lengths(columns: Mapping[str, Any], n: int, side: str) -> None:
    wrong = {name: len(values) for name, values in columns.items() if len(values) != n}
    if wrong:
        shown = ", ".join(f"{name!r}: {length}" for name, length in wrong.items())
        msg = (
            f"{side} columns must all have the {n} rows of its key columns, but {shown}; "
            "give every column of one side for the same events"
        )
        raise JoinError(msg)


def _key_dtype(a: np.dtype[Any], b: np.dtype[Any]) -> np.dtype[Any]:
    dt = np.result_type(a, b)
    return dt if dt.kind in "ui" else np.dtype(np.uint64)


def join_arrays(
    primary: Mapping[str, Any],
    friend: Mapping[str, Any],
    *,
    on: Sequence[str] | str,
    friend_on: Sequence[str] | str | None = None,
    how: str = "left",
    validate: str = "one_to_one",
    name: str = "friend",
    prefix: str | None = None,
    friend_index: KeyIndex | None = None,
) -> dict[str, ak.Array]:
    """Join two in-memory tables of columns (flat or jagged) on an event key.

    Output rows: for ``left`` and ``inner`` in primary order (a primary row
    repeated per friend match for ``one_to_many``); ``right`` is the inner
    rows followed by the friend rows with no primary partner, ``outer`` the
    left rows followed by those friend rows (in friend order) -- the order a
    chunked execution produces.

    Output columns: every primary column (key columns included), then every
    friend column except its key columns, named ``prefix + name``; for
    ``left``/``right``/``outer`` a boolean ``"<name>_matched"`` (both sides
    present). Missing values are ``None``: friend columns are option types
    for ``left``/``outer``, primary non-key columns for ``right``/``outer``;
    key columns are never ``None`` (unmatched friend rows carry the friend's
    keys).

    Args:
        primary: primary columns (name -> numpy or awkward array).
        friend: friend columns.
        on: primary key columns, in key order.
        friend_on: friend key columns (default: ``on``).
        how: ``inner``, ``left``, ``right`` or ``outer``.
        validate: ``one_to_one``, ``many_to_one`` or ``one_to_many``.
        name: the friend's name (for the ``<name>_matched`` column).
        prefix: prepended to friend column names (needed on name clashes).
        friend_index: a prebuilt key index of ``friend`` (its rows must be
            ``friend``'s rows), e.g. from the cache.

    Returns:
        Output columns by name, all of one length.

    Raises:
        ColumnNotFoundError: a key column is missing.
        DuplicateKeyError: ``validate`` is violated.
        KeyTypeError: a key column is not a non-negative integer column.
        JoinError: name clashes, unknown ``how``/``validate``.
    """
    check_how(how, validate)
    on_ = [on] if isinstance(on, str) else list(on)
    fon = (
        on_
        if friend_on is None
        else ([friend_on] if isinstance(friend_on, str) else list(friend_on))
    )
    if len(fon) != len(on_):
        msg = f"on={on_} and friend_on={fon} need the same number of key columns"
        raise JoinError(msg)
    _require(primary, on_, "primary")
    _require(friend, fon, "friend")
    pkeys = integer_keys({k: primary[k] for k in on_})
    fkeys = integer_keys({k: friend[k] for k in fon})
    _check_lengths(primary, len(next(iter(pkeys.values()))), "primary")
    _check_lengths(friend, len(next(iter(fkeys.values()))), "friend")

    pre = prefix or ""
    friend_cols = [c for c in friend if c not in fon]
    matched_name = f"{name}_matched"
    out_names = {pre + c: c for c in friend_cols}
    clash = sorted(set(out_names) & (set(primary) | {matched_name}))
    if clash:
        msg = (
            f"friend {name!r} columns {clash} clash with primary columns; give the friend "
            "a prefix (e.g. prefix='" + name + "_')"
        )
        raise JoinError(msg)

    need_primary_index = needs_unique("primary", validate) or how in ("right", "outer")
    pindex: KeyIndex | None = None
    fast: Match | None = None
    if friend_index is None:
        packing = KeyPacking.fit(pkeys, fkeys, names=on_)
        if validate == "one_to_one" and how in ("left", "inner"):
            fast = match_unique_keys(pkeys, fkeys, packing, how=how)
    if fast is not None:
        m = fast
    elif friend_index is None:
        findex = KeyIndex.build(fkeys, packing=packing)
        check_unique(findex, side="friend", validate=validate)
        if need_primary_index:
            pindex = KeyIndex.build(pkeys, packing=packing)
            check_unique(pindex, side="primary", validate=validate)
            m = match_indexes(pindex, findex, how="left" if how in ("left", "outer") else "inner")
        else:
            m = match(pkeys, findex, how=how, validate=validate)
    else:
        findex = friend_index
        nfriend = len(next(iter(fkeys.values())))
        if len(findex) != nfriend:
            msg = f"friend_index has {len(findex)} rows but the friend has {nfriend}"
            raise JoinError(msg)
        m = match(pkeys, findex, how=how, validate=validate)
        if how in ("right", "outer"):
            pindex = KeyIndex.build(pkeys)

    prow, frow = m.primary_rows, m.friend_rows
    identity = m.primary_identity
    extra = np.zeros(0, dtype=np.int64)
    if how in ("right", "outer"):
        assert pindex is not None
        extra = unmatched_rows(fkeys, pindex)
        if extra.size:
            prow = np.concatenate([prow, np.full(len(extra), -1, dtype=np.int64)])
            frow = np.concatenate([frow, extra])
            identity = False

    out: dict[str, ak.Array] = {}
    primary_optional = how in ("right", "outer")
    for col, values in primary.items():
        if col in on_ and extra.size:
            fcol = fon[on_.index(col)]
            pv = np.asarray(_as_array(values).to_numpy())
            fv = np.asarray(_as_array(friend[fcol]).to_numpy())
            dt = _key_dtype(pv.dtype, fv.dtype)
            keyvals = np.empty(len(prow), dtype=dt)
            n_main = len(m)
            keyvals[:n_main] = pv[prow[:n_main]]
            keyvals[n_main:] = fv[extra]
            out[col] = ak.Array(keyvals)
        elif identity and not primary_optional:
            out[col] = _as_array(values)
        else:
            keep_plain = col in on_ or not primary_optional
            out[col] = gather(values, prow, optional=not keep_plain)
    friend_optional = how in ("left", "outer")
    for out_name, col in out_names.items():
        # the match made these rows: in range, -1 only where a friend is optional
        layout = ak.to_layout(friend[col], allow_record=False)
        out[out_name] = _gather_checked(layout, frow, optional=friend_optional)
    if how != "inner":
        matched = frow >= 0 if identity else (prow >= 0) & (frow >= 0)
        out[matched_name] = ak.Array(matched)
    return out
