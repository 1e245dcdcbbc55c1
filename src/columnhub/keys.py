"""Event keys: validation, normalisation and lossless packing.

An event key is a tuple of integer columns (CMS: ``run``, ``luminosityBlock``,
``event``). This module owns turning such columns into unsigned 64-bit words
that can be sorted, compared and looked up:

* :func:`normalize_keys` checks every key column (integers only, no negative
  values, no missing values, equal lengths) and converts it to ``uint64``
  without ever truncating a value.
* :class:`KeyPacking` packs a multi-column key into as few ``uint64`` words as
  possible. Each column is stored as ``value - offset`` in ``width`` bits, the
  first column in the most significant bits, so the packed words sort like the
  key tuples. When the widths sum to at most 64 bits (the usual CMS case) a key
  is one ``uint64`` (the fast path); otherwise it spans several words (the
  lossless fallback). Packing is a bijection on the fitted range: two
  different keys never share packed words.

>>> import numpy as np
>>> keys = normalize_keys({"run": np.array([1, 1, 2]), "event": np.array([7, 9, 7])})
>>> packing = KeyPacking.fit(keys)
>>> packing.widths, packing.nwords
((1, 2), 1)
>>> words, fits = packing.pack(keys)
>>> words.tolist(), fits
([0, 2, 4], None)
>>> {k: v.tolist() for k, v in packing.unpack(words).items()}
{'run': [1, 1, 2], 'event': [7, 9, 7]}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from columnhub._kernels import compose_keys, minmax, or_shifted
from columnhub.errors import JoinError, KeyTypeError

__all__ = [
    "KeyColumns",
    "KeyPacking",
    "check_key_type",
    "format_key",
    "integer_keys",
    "normalize_key_column",
    "normalize_keys",
]

#: Key columns, in key order: column name -> 1-d integer array (numpy or awkward).
KeyColumns = Mapping[str, Any]

U64 = np.dtype(np.uint64)


def _to_numpy(name: str, values: Any) -> np.ndarray:
    """A 1-d numpy view of ``values`` (numpy, awkward, list), or a KeyTypeError."""
    if isinstance(values, np.ndarray):
        arr = values
    else:
        try:
            import awkward as ak
        except ModuleNotFoundError:  # pragma: no cover - awkward is a dependency
            ak = None
        if ak is not None and isinstance(values, ak.Array):
            if values.ndim != 1:
                msg = (
                    f"event-key column {name!r} is jagged (type {values.type}); a key column "
                    "must hold one integer per event. Use a per-event branch such as 'event'."
                )
                raise KeyTypeError(msg)
            try:
                arr = ak.to_numpy(values, allow_missing=False)
            except ValueError as err:
                msg = (
                    f"event-key column {name!r} has missing (None) values; every event needs "
                    "a complete key. Drop those events or fill the key before joining."
                )
                raise KeyTypeError(msg) from err
        else:
            arr = np.asarray(values)
    if arr.ndim != 1:
        msg = (
            f"event-key column {name!r} has shape {arr.shape}; a key column must be "
            "1-dimensional (one integer per event)."
        )
        raise KeyTypeError(msg)
    if isinstance(arr, np.ma.MaskedArray) and np.ma.is_masked(arr):
        first = int(np.flatnonzero(np.ma.getmaskarray(arr))[0])
        msg = (
            f"event-key column {name!r} has a missing value at entry {first}; every event "
            "needs a complete key. Drop those events or fill the key before joining."
        )
        raise KeyTypeError(msg)
    return np.asarray(arr)


def normalize_key_column(name: str, values: Any, *, offset: int = 0) -> np.ndarray:
    """One key column as a ``uint64`` array, never truncated.

    Args:
        name: the column's name (for error messages).
        values: a 1-d array of unsigned or non-negative signed integers.
        offset: the entry number of ``values[0]`` (for error messages).

    Returns:
        The values as a 1-d ``uint64`` array (no copy when already ``uint64``).

    Raises:
        KeyTypeError: the column is float, boolean, jagged, has missing values
            or negative values.

    >>> normalize_key_column("event", np.array([3, 4], dtype=np.int32)).dtype
    dtype('uint64')
    """
    arr = _to_numpy(name, values)
    kind = arr.dtype.kind
    if kind == "u":
        return arr.astype(U64, copy=False)
    if kind == "i":
        if arr.size:
            low = int(arr[int(np.argmin(arr))])
            if low < 0:  # name the first negative value
                first = int(np.flatnonzero(arr < 0)[0])
                low = int(arr[first])
                msg = (
                    f"event-key column {name!r} has a negative value {low} at entry "
                    f"{first + offset}; "
                    "event keys must be non-negative integers. Check that the right branch "
                    "is used as key (or cast it to an unsigned type if negative values are "
                    "an artefact of a signed read)."
                )
                raise KeyTypeError(msg)
        return arr.astype(U64)
    if kind == "f":
        bad = ""
        if arr.size:
            frac = np.flatnonzero(~np.isfinite(arr) | (arr != np.trunc(arr)))
            if frac.size:
                bad = f"; entry {int(frac[0]) + offset} is {float(arr[frac[0]])!r}"
            else:
                bad = f"; e.g. entry {offset} is {float(arr[0])!r}"
        msg = (
            f"event-key column {name!r} has floating-point type {arr.dtype}{bad}. Floats "
            "cannot be event keys (they lose precision above 2**53). Use the integer "
            "branch (e.g. 'event' as uint64), or cast exactly with "
            "array.astype('uint64') if the values are known to be whole numbers."
        )
        raise KeyTypeError(msg)
    msg = (
        f"event-key column {name!r} has type {arr.dtype}; allowed are integer types "
        "(uint8..uint64, int8..int64 with non-negative values). Use an integer branch "
        "such as 'run', 'luminosityBlock' or 'event'."
    )
    raise KeyTypeError(msg)


def normalize_keys(keys: KeyColumns) -> dict[str, np.ndarray]:
    """Every key column as ``uint64``, checked to have one common length.

    Args:
        keys: key columns in key order (name -> 1-d integer array).

    Returns:
        A new dict, same names and order, of ``uint64`` arrays.

    Raises:
        KeyTypeError: a column is not a valid key column (see
            :func:`normalize_key_column`).
        JoinError: no key columns, or the columns have different lengths.
    """
    if not keys:
        msg = "an event key needs at least one column, e.g. ['run', 'luminosityBlock', 'event']"
        raise JoinError(msg)
    out = {str(name): normalize_key_column(str(name), values) for name, values in keys.items()}
    lengths = {name: len(arr) for name, arr in out.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name!r}: {n}" for name, n in lengths.items())
        msg = (
            f"event-key columns have different lengths ({shown}); all key columns must "
            "come from the same tree and entry range."
        )
        raise JoinError(msg)
    return out


def integer_keys(keys: KeyColumns, *, offset: int = 0) -> dict[str, np.ndarray]:
    """Key columns checked like :func:`normalize_keys`, unsigned ones left in their own type.

    Packing reads ``uint32`` run and lumi columns as they are; a ``uint64``
    copy of them would cost a pass over memory for nothing. Signed columns
    are converted (and checked for negative values) by
    :func:`normalize_key_column`. ``offset`` is the entry number of the first
    value, for messages.
    """
    if not keys:
        return normalize_keys(keys)  # raises the message for "no key columns"
    out: dict[str, np.ndarray] = {}
    for name, values in keys.items():
        arr = _to_numpy(str(name), values)
        out[str(name)] = (
            arr if arr.dtype.kind == "u" else normalize_key_column(str(name), arr, offset=offset)
        )
    if len({len(a) for a in out.values()}) > 1:
        normalize_keys(out)  # raises the message for different lengths
    return out


_INTEGER_TYPE = re.compile(r"^u?int(8|16|32|64)$")


def check_key_type(name: str, type_name: str, *, where: str) -> None:
    """Raise :class:`KeyTypeError` when a stored column type cannot hold an event key.

    Used while planning, from the branch or Parquet type alone (no data read),
    so a dataset with float, boolean or jagged key columns fails before any
    work starts, whether or not it is joined.

    Args:
        name: the key column.
        type_name: its type, numpy/Arrow style (``uint32``, ``float64``, ``bool``,
            ``list<item: int64>``) or ROOT style (``int32_t[]``).
        where: the dataset and file, for the message.

    >>> check_key_type("event", "uint64", where="dataset 'dy'")
    >>> check_key_type("event", "double", where="dataset 'dy'")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    columnhub.errors.KeyTypeError: event-key column 'event' of dataset 'dy' has type double ...
    """
    if _INTEGER_TYPE.match(type_name):
        return
    text = type_name.lower()
    if "[" in text or "vector" in text or "list" in text or "var" in text:
        why = "is jagged (a list per event); a key column holds one integer per event"
    elif text.startswith("bool"):
        why = "is boolean; it cannot tell events apart"
    elif "float" in text or "double" in text or "half" in text:
        why = "is floating point; floats lose precision above 2**53 and cannot be keys"
    else:
        why = "is not an integer type"
    msg = (
        f"event-key column {name!r} of {where} has type {type_name} ({why}); allowed are "
        "integer types (uint8..uint64, or int8..int64 with non-negative values). Set "
        "dataset.keys to the integer key branches, e.g. [run, luminosityBlock, event] "
        "(ATLAS: [EventInfoAuxDyn.runNumber, EventInfoAuxDyn.eventNumber])."
    )
    raise KeyTypeError(msg)


def format_key(names: Sequence[str], values: Sequence[int]) -> str:
    """A key tuple for messages: ``(run=1, luminosityBlock=2, event=3)``."""
    return "(" + ", ".join(f"{n}={int(v)}" for n, v in zip(names, values, strict=True)) + ")"


def _word_count(bits: int) -> int:
    return max(1, -(-bits // 64))


@dataclass(frozen=True)
class KeyPacking:
    """How key columns are packed into ``uint64`` words.

    Column ``i`` is stored as ``value - offsets[i]`` in ``widths[i]`` bits; the
    first column takes the most significant bits. Build one with
    :meth:`fit` over every side that will be compared, or reuse the packing of
    a :class:`~columnhub.join.KeyIndex`: a key outside the fitted range cannot
    be packed (:meth:`pack` reports it) and therefore has no partner in that
    index.

    Attributes:
        names: key column names, in key order.
        offsets: per column, the smallest value (subtracted before packing).
        widths: per column, the number of bits (0 when the column is constant).
    """

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    widths: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.offsets) == len(self.widths)) or not self.names:
            msg = f"inconsistent key packing {self!r}"
            raise JoinError(msg)
        for w, o in zip(self.widths, self.offsets, strict=True):
            if not 0 <= w <= 64 or not 0 <= o < 2**64:
                msg = f"inconsistent key packing {self!r}"
                raise JoinError(msg)

    @classmethod
    def fit(cls, *key_sets: KeyColumns, names: Sequence[str] | None = None) -> KeyPacking:
        """The narrowest packing holding every key of every given side.

        Args:
            *key_sets: one or more sets of key columns (same number of columns,
                in the same key order; names may differ between sides).
            names: the key names to record; default the first set's names.

        Returns:
            A packing whose ranges cover the min..max over all sides.

        Raises:
            KeyTypeError: a key column is invalid.
            JoinError: no key sets, or sides with different numbers of columns.
        """
        if not key_sets:
            msg = "KeyPacking.fit needs at least one set of key columns"
            raise JoinError(msg)
        normalized = [integer_keys(ks) for ks in key_sets]
        ncol = len(normalized[0])
        for ks in normalized[1:]:
            if len(ks) != ncol:
                msg = (
                    f"the two sides have different event keys: {list(normalized[0])} vs "
                    f"{list(ks)}; both sides need the same number of key columns, in the "
                    "same order."
                )
                raise JoinError(msg)
        key_names = tuple(names) if names is not None else tuple(normalized[0])
        if len(key_names) != ncol:
            msg = f"{len(key_names)} key names {list(key_names)} given for {ncol} key columns"
            raise JoinError(msg)
        offsets: list[int] = []
        widths: list[int] = []
        for i in range(ncol):
            cols = [list(ks.values())[i] for ks in normalized]
            nonempty = [c for c in cols if c.size]
            if not nonempty:
                offsets.append(0)
                widths.append(0)
                continue
            bounds = [minmax(c) for c in nonempty]
            lo = min(b[0] for b in bounds)
            hi = max(b[1] for b in bounds)
            offsets.append(lo)
            widths.append((hi - lo).bit_length())
        return cls(key_names, tuple(offsets), tuple(widths))

    @property
    def total_bits(self) -> int:
        """Bits of one packed key (the sum of the widths)."""
        return sum(self.widths)

    @property
    def nwords(self) -> int:
        """Number of ``uint64`` words of one packed key (1 on the fast path)."""
        return _word_count(self.total_bits)

    def _positions(self) -> list[int]:
        """Bit position of each column's least significant bit in the key integer.

        The key integer occupies the low :attr:`total_bits` bits of the
        ``64 * nwords``-bit integer the words spell (most significant first).
        """
        total = self.total_bits
        pos: list[int] = []
        used = 0
        for w in self.widths:
            used += w
            pos.append(total - used)
        return pos

    def pack(self, keys: KeyColumns) -> tuple[np.ndarray, np.ndarray | None]:
        """Pack key columns (in key order) into words.

        Args:
            keys: key columns, same number and order as :attr:`names`.

        Returns:
            ``(words, fits)``: ``words`` is ``uint64`` of shape ``(n,)`` when
            :attr:`nwords` is 1, else ``(n, nwords)`` (most significant word
            first); ``fits`` is ``None`` when every key lies in the packing's
            range, else a boolean mask, ``False`` for keys outside it (their
            words are meaningless and must not be compared).

        Raises:
            KeyTypeError: a key column is invalid.
            JoinError: wrong number of key columns or different lengths.
        """
        if self.nwords == 1:
            # the usual case: every key in range, packed in one pass (no uint64 copies)
            own = integer_keys(keys)
            self._check_count(list(own.values()), keys)
            if all(
                self._inside(c, off, w)
                for c, off, w in zip(own.values(), self.offsets, self.widths, strict=True)
            ):
                return self.compose(own, 0)[0], None
        cols = list(normalize_keys(keys).values())
        self._check_count(cols, keys)
        n = len(cols[0])
        nw = self.nwords
        words = np.zeros((n, nw) if nw > 1 else n, dtype=U64)
        fits: np.ndarray | None = None
        total = nw * 64
        for col, off, w, p in zip(cols, self.offsets, self.widths, self._positions(), strict=True):
            lo, hi = minmax(col) if n else (off, off)
            if lo < off or hi - off >= 1 << w:
                # some keys lie outside the packing's range: mask them
                bad = col < np.uint64(off)
                val = col - np.uint64(off)  # wraps for `bad` rows, zeroed below
                if w < 64:
                    bad |= val >= np.uint64(1 << w)
                fits = ~bad if fits is None else (fits & ~bad)
                val[bad] = 0
            elif w == 0:
                continue
            elif nw == 1:
                or_shifted(words, col, off, p)
                continue
            else:
                val = np.subtract(col, np.uint64(off)) if off else col.copy()
            if w == 0:
                continue
            if nw == 1:
                if p:
                    np.left_shift(val, np.uint64(p), out=val)
                np.bitwise_or(words, val, out=words)
                continue
            # the column occupies bits [p, p + w) of a total-bit integer; split it
            for j in range(nw):  # word j (0 = most significant) covers [lo, lo + 64)
                lo = total - 64 * (j + 1)
                if p + w <= lo or p >= lo + 64:
                    continue
                shift = p - lo
                part = val << np.uint64(shift) if shift >= 0 else val >> np.uint64(-shift)
                words[:, j] |= part
        return words, fits

    def compose(
        self, keys: KeyColumns, rowbits: int, *, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, bool]:
        """One ``uint64`` per row: the packed key above, the row number in the low ``rowbits``.

        ``rowbits=0`` gives the packed keys alone (what :meth:`pack` gives for
        one-word keys, in one pass).

        One pass over the key columns, in their own integer types. Sorting
        these composites sorts rows by key, and equal keys by row. Only for
        keys inside the packing's range (the keys it was fitted on) when
        :attr:`total_bits` + ``rowbits`` <= 64.

        Args:
            keys: key columns, in key order.
            rowbits: bits for the row number (0: the packed keys alone).
            out: a ``uint64`` array of one row per key to write into.

        Returns:
            ``(composites, ascending)``: ``ascending`` tells whether the rows
            already come in key order.

        Raises:
            JoinError: the composite does not fit in 64 bits.
        """
        cols = list(integer_keys(keys).values())
        if len(cols) != len(self.names) or self.total_bits + rowbits > 64:
            msg = f"cannot compose {len(cols)} key columns with {rowbits} row bits under {self!r}"
            raise JoinError(msg)
        n = len(cols[0])
        if n and 0 < rowbits < 64 and n - 1 >> rowbits:
            msg = f"{n} rows do not fit in {rowbits} row bits"
            raise JoinError(msg)
        if out is None:
            out = np.empty(n, dtype=U64)
        elif out.shape != (n,) or out.dtype != U64:
            msg = f"compose: out must be a uint64 array of {n} rows, not {out.dtype} {out.shape}"
            raise JoinError(msg)
        columns = [
            (col, off, p)
            for col, off, w, p in zip(
                cols, self.offsets, self.widths, self._positions(), strict=True
            )
            if w
        ]
        return out, compose_keys(columns, rowbits, out)

    def _check_count(self, cols: Sequence[np.ndarray], keys: KeyColumns) -> None:
        if len(cols) != len(self.names):
            msg = (
                f"{len(cols)} key columns {list(keys)} given; this key has {len(self.names)}: "
                f"{list(self.names)}"
            )
            raise JoinError(msg)

    @staticmethod
    def _inside(column: np.ndarray, offset: int, width: int) -> bool:
        """Whether every value of ``column`` lies in ``offset .. offset + 2**width - 1``."""
        if not len(column):
            return True
        lo, hi = minmax(column)
        return lo >= offset and hi - offset < 1 << width

    def unpack(self, words: npt.ArrayLike) -> dict[str, np.ndarray]:
        """The key columns (``uint64``) of packed words; inverse of :meth:`pack`."""
        w = np.asarray(words, dtype=U64)
        nw = self.nwords
        if nw == 1:
            w = w.reshape(-1, 1)
        total = nw * 64
        out: dict[str, np.ndarray] = {}
        for name, off, width, p in zip(
            self.names, self.offsets, self.widths, self._positions(), strict=True
        ):
            val = np.zeros(len(w), dtype=U64)
            for j in range(nw):
                lo = total - 64 * (j + 1)
                if width == 0 or p + width <= lo or p >= lo + 64:
                    continue
                shift = p - lo
                part = w[:, j] >> np.uint64(shift) if shift >= 0 else w[:, j] << np.uint64(-shift)
                val |= part
            if width < 64:
                val &= np.uint64((1 << width) - 1)
            out[name] = val + np.uint64(off) if off else val
        return out

    def to_dict(self) -> dict[str, list[Any]]:
        """A JSON-able form (for storage next to a key index)."""
        return {
            "names": list(self.names),
            "offsets": list(self.offsets),
            "widths": list(self.widths),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[Any]]) -> KeyPacking:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(str(n) for n in data["names"]),
            tuple(int(o) for o in data["offsets"]),
            tuple(int(w) for w in data["widths"]),
        )
