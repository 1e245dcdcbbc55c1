"""Join validation: duplicate keys (``validate``) and aligned-friend key checks."""

from __future__ import annotations

from typing import Literal

import numpy as np

from columnhub._kernels import first_difference
from columnhub.errors import DuplicateKeyError, JoinError, KeyMismatchError
from columnhub.join.index import IndexFacts, KeyIndex
from columnhub.keys import KeyColumns, format_key, integer_keys

__all__ = [
    "HOWS",
    "VALIDATES",
    "Side",
    "check_aligned",
    "check_how",
    "check_unique",
    "duplicate_error",
    "needs_unique",
]

#: The join types.
HOWS = ("inner", "left", "right", "outer")
#: The ``validate`` settings (``many_to_many`` is deliberately not offered).
VALIDATES = ("one_to_one", "many_to_one", "one_to_many")

Side = Literal["primary", "friend"]


def check_how(how: str, validate: str) -> None:
    """Raise :class:`JoinError` unless ``how`` and ``validate`` are known values."""
    if how not in HOWS:
        msg = f"unknown join how={how!r}; allowed: {', '.join(HOWS)}"
        raise JoinError(msg)
    if validate not in VALIDATES:
        msg = (
            f"unknown join validate={validate!r}; allowed: {', '.join(VALIDATES)} "
            "(many-to-many joins are not supported: they multiply events)"
        )
        raise JoinError(msg)


def needs_unique(side: Side, validate: str) -> bool:
    """Whether ``validate`` requires the keys of ``side`` to be unique.

    >>> needs_unique("friend", "many_to_one"), needs_unique("primary", "many_to_one")
    (True, False)
    """
    if side == "friend":
        return validate in ("one_to_one", "many_to_one")
    return validate in ("one_to_one", "one_to_many")


_FIX = {
    ("friend", "one_to_one"): "use validate='one_to_many' if one primary event may match "
    "several friend rows, or remove the duplicated events from the friend dataset",
    ("friend", "many_to_one"): "use validate='one_to_many' only if the primary keys are "
    "unique, or remove the duplicated events from the friend dataset",
    ("primary", "one_to_one"): "use validate='many_to_one' if several primary events may "
    "share a friend row, or remove the duplicated events from the primary dataset",
    ("primary", "one_to_many"): "remove the duplicated events from the primary dataset",
}


def duplicate_error(
    index: KeyIndex | IndexFacts,
    *,
    side: Side,
    validate: str,
    dataset: str | None = None,
    limit: int = 5,
) -> DuplicateKeyError:
    """The error for duplicated keys in ``index`` (does not raise it)."""
    dups = index.duplicates(limit=limit)
    total = index.duplicated_key_count()
    what = f"{side} dataset" + (f" {dataset!r}" if dataset else "")
    lines = "\n".join(f"  {d.describe()}" for d in dups)
    more = f"\n  ... and {total - len(dups)} more" if total > len(dups) else ""
    fix = _FIX.get((side, validate), "remove the duplicated events")
    msg = (
        f"{what} has {total} duplicated event key(s), but validate={validate!r} requires "
        f"unique {side} keys. First duplicates:\n{lines}{more}\nFix: {fix}."
    )
    return DuplicateKeyError(msg)


def check_unique(
    index: KeyIndex | IndexFacts, *, side: Side, validate: str, dataset: str | None = None
) -> None:
    """Raise :class:`DuplicateKeyError` if ``validate`` needs ``side`` unique and it is not.

    Args:
        index: the key index of that side's whole dataset, or its facts.
        side: ``"primary"`` or ``"friend"``.
        validate: the join's ``validate`` setting.
        dataset: the dataset name, for the message.
    """
    if needs_unique(side, validate) and not index.is_unique:
        raise duplicate_error(index, side=side, validate=validate, dataset=dataset)


def check_aligned(
    primary: KeyColumns,
    friend: KeyColumns,
    *,
    primary_file: str = "primary",
    primary_start: int = 0,
    friend_file: str = "friend",
    friend_start: int = 0,
) -> None:
    """Check that an aligned friend chunk has exactly the primary chunk's keys, row by row.

    Args:
        primary: the primary chunk's key columns (key order).
        friend: the friend chunk's key columns (same order; names may differ).
        primary_file: the primary file, for the message.
        primary_start: the entry of the chunk's first row in ``primary_file``.
        friend_file: the friend file, for the message.
        friend_start: the entry of the chunk's first row in ``friend_file``.

    Raises:
        KeyMismatchError: lengths differ, or the first row whose keys differ
            (with file, entry and both keys).
    """
    p = integer_keys(primary)
    f = integer_keys(friend)
    if len(p) != len(f):
        msg = f"aligned join: primary key {list(p)} and friend key {list(f)} differ in length"
        raise KeyMismatchError(msg)
    np_ = len(next(iter(p.values())))
    nf = len(next(iter(f.values())))
    if np_ != nf:
        msg = (
            f"aligned join: {primary_file} entries {primary_start}..{primary_start + np_} "
            f"({np_} rows) face {nf} rows of {friend_file} from entry {friend_start}; an "
            "aligned friend must have the same entries. Use match: keyed if the layouts "
            "differ."
        )
        raise KeyMismatchError(msg)
    i = first_difference(list(zip(p.values(), f.values(), strict=True)))
    if i >= 0:
        bad = np.zeros(np_, dtype=bool)
        for a, b in zip(p.values(), f.values(), strict=True):
            bad |= a.astype(np.uint64) != b.astype(np.uint64)
        pk = format_key(list(p), [int(c[i]) for c in p.values()])
        fk = format_key(list(f), [int(c[i]) for c in f.values()])
        msg = (
            f"aligned join: keys differ at {primary_file} entry {primary_start + i} {pk} vs "
            f"{friend_file} entry {friend_start + i} {fk} ({int(bad.sum())} of {np_} rows "
            "differ in this chunk). The friend is not in the primary's order; use "
            "match: keyed."
        )
        raise KeyMismatchError(msg)
