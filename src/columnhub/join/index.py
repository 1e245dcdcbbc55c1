"""The key index of a dataset: packed event keys -> (file, entry).

A :class:`KeyIndex` is built once per dataset (from all its key columns, in
file order) and stored in the column cache (:meth:`KeyIndex.to_bytes`). It
keeps the packed keys sorted, with the dataset row of each, so that a chunk of
keys is looked up by sorting the chunk and one linear merge with these keys;
uniqueness is known at build time and the first duplicate keys (with their
files and entries) are available for error messages.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from columnhub import _kernels
from columnhub._kernels import (
    argsort_runs,
    compose_keys,
    kernel_pool_size,
    merge_runs,
    minmax,
    split_composites,
)
from columnhub.errors import JoinError
from columnhub.keys import KeyColumns, KeyPacking, format_key, integer_keys, normalize_keys

__all__ = ["Duplicate", "IndexFacts", "KeyIndex", "sort_words"]

_FORMAT = "columnhub-keyindex-3"
#: formats read: 1 kept file and entry per row, 2 may keep file_starts instead (both
#: ``.npz`` archives), 3 is 2's arrays as raw aligned bytes (:meth:`KeyIndex.to_chunks`)
_FORMATS = ("columnhub-keyindex-1", "columnhub-keyindex-2", _FORMAT)
_MAGIC = b"CHKEYIX\0"
_ALIGN = 64


def _read_raw(view: memoryview) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header and the arrays (views) of a format-3 index blob."""
    start = len(_MAGIC) + 4
    hlen = int.from_bytes(view[len(_MAGIC) : start], "little")
    meta: dict[str, Any] = json.loads(bytes(view[start : start + hlen]))
    base = start + hlen
    size = view.nbytes - base
    arrays = {}
    for name, descr, shape, offset, nbytes in meta["arrays"]:
        dt = np.lib.format.descr_to_dtype(_tuples(descr))
        count = int(np.prod(shape, dtype=np.int64))
        if offset < 0 or offset + nbytes > size or nbytes != count * dt.itemsize:
            msg = f"array {name!r} [{offset}, {offset + nbytes}) does not fit the payload"
            raise ValueError(msg)
        flat = np.frombuffer(view, dtype=dt, count=count, offset=base + offset)
        arrays[name] = flat.reshape(shape)
    return meta, arrays


def _tuples(descr: Any) -> Any:
    """A dtype description read back from JSON: its field lists as the tuples numpy wants."""
    if isinstance(descr, str):
        return descr
    out = []
    for name, sub, *shape in descr:  # (name, dtype) or (name, dtype, shape)
        out.append((name, _tuples(sub), *(tuple(s) for s in shape)))
    return out


def sort_words(
    words: np.ndarray, *, stable: bool = False, overwrite: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Sort packed keys: ``(order, sorted_words)`` with ``words[order] == sorted_words``.

    Single-word keys narrow enough to share a ``uint64`` with the row number are
    sorted as one composite value (a plain, vectorised ``np.sort``, stable by
    construction). Other single-word keys are arg-sorted by numpy (once
    numba is loaded: in a piece per core and the pieces merged; ``stable``:
    one stable ``np.argsort``). Keys already in order are not sorted.
    Multi-word keys: ``np.lexsort`` (stable).

    Args:
        words: ``uint64`` packed keys, shape ``(n,)`` or ``(n, nwords)``.
        stable: equal keys keep their row order.
        overwrite: ``words`` may be overwritten (single-word keys are then
            sorted in its memory: one array fewer for a large index).

    Returns:
        ``order`` (``int64`` rows) and the sorted words.
    """
    n = len(words)
    if words.ndim == 1:
        rowbits = max(1, (n - 1).bit_length()) if n else 1
        top = minmax(words)[1].bit_length() if n else 0
        if top + rowbits <= 64:
            writable = overwrite and words.dtype == np.uint64 and words.flags.writeable
            comp = words if writable and words.flags.c_contiguous else np.empty(n, dtype=np.uint64)
            if not compose_keys([(words, 0, 0)], rowbits, comp):  # not already in order
                comp.sort()
            return split_composites(comp, rowbits)
        if stable:
            order = np.argsort(words, kind="stable").astype(np.int64, copy=False)
            return order, words[order]
        copy = np.empty(n, dtype=np.uint64)
        if compose_keys([(words, 0, 0)], 0, copy):  # already in order
            return np.arange(n, dtype=np.int64), copy
        if not _kernels.numba_loaded():  # numpy's vectorised (SIMD) arg-sort
            order = np.argsort(words)
            return order, np.take(words, order, out=copy)
        # too wide to carry the row: arg-sort a piece per core, then merge the pieces
        [(keys, rows, bounds)] = argsort_runs((words, kernel_pool_size()))
        if len(bounds) > 2:
            keys, rows = merge_runs(keys, rows, bounds)
        return rows.view(np.int64), keys
    if words.shape[1] == 0 or n == 0:
        return np.arange(n, dtype=np.int64), words
    order = np.lexsort(words.T[::-1]).astype(np.int64, copy=False)
    return order, words[order]


def searchable(sorted_words: np.ndarray) -> np.ndarray:
    """A 1-d view of sorted words that ``np.searchsorted`` and ``==`` compare as keys."""
    if sorted_words.ndim == 1:
        return sorted_words
    nw = sorted_words.shape[1]
    big = np.ascontiguousarray(sorted_words.astype(">u8"))
    return big.view(np.dtype((np.void, 8 * nw))).reshape(len(sorted_words))


def _equal_neighbours(s: np.ndarray) -> np.ndarray:
    """``s[1:] == s[:-1]`` for a searchable (1-d) array."""
    return np.asarray(s[1:] == s[:-1], dtype=bool)


@dataclass(frozen=True)
class Duplicate:
    """One duplicated key of an index, for error messages.

    Attributes:
        key: the original key values, by column name.
        count: how many rows carry this key.
        locations: up to a few ``(file, entry)`` pairs (file name when known,
            else file number).
    """

    key: dict[str, int]
    count: int
    locations: tuple[tuple[str | int, int], ...]

    def describe(self) -> str:
        """``(run=1, ...) x3 at file.root entry 5, file.root entry 9, ...``."""
        where = ", ".join(f"{f} entry {e}" for f, e in self.locations)
        more = " ..." if self.count > len(self.locations) else ""
        return (
            f"{format_key(list(self.key), list(self.key.values()))} x{self.count} at {where}{more}"
        )


@dataclass(frozen=True)
class IndexFacts:
    """What validating a join needs of a :class:`KeyIndex`, without its arrays.

    Stored in the column cache next to the index (JSON, a few hundred bytes),
    so a request that reads no friend row checks ``validate`` without loading
    the index. :func:`~columnhub.join.validate.check_unique` takes either.

    Attributes:
        rows: rows of the index.
        is_unique: whether every key occurs once.
        duplicated_keys: how many distinct keys occur more than once.
        first_duplicates: the first of them (by the row of their first
            occurrence), as :meth:`KeyIndex.duplicates` gives them.
    """

    rows: int
    is_unique: bool
    duplicated_keys: int = 0
    first_duplicates: tuple[Duplicate, ...] = ()

    #: how many duplicates the facts keep (what an error message shows)
    KEPT = 5

    @classmethod
    def of(cls, index: KeyIndex) -> IndexFacts:
        """The facts of ``index``."""
        return cls(
            rows=len(index),
            is_unique=index.is_unique,
            duplicated_keys=index.duplicated_key_count(),
            first_duplicates=tuple(index.duplicates(limit=cls.KEPT)),
        )

    def duplicates(self, *, limit: int = 5) -> list[Duplicate]:
        """The first duplicated keys, as :meth:`KeyIndex.duplicates` (at most :attr:`KEPT`)."""
        return list(self.first_duplicates[:limit])

    def duplicated_key_count(self) -> int:
        """How many distinct keys occur more than once."""
        return self.duplicated_keys

    def to_bytes(self) -> bytes:
        """JSON bytes for the column cache."""
        return json.dumps(
            {
                "format": _FACTS_FORMAT,
                "rows": self.rows,
                "is_unique": self.is_unique,
                "duplicated_keys": self.duplicated_keys,
                "first_duplicates": [
                    {"key": d.key, "count": d.count, "locations": [list(x) for x in d.locations]}
                    for d in self.first_duplicates
                ],
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> IndexFacts:
        """Inverse of :meth:`to_bytes`.

        Raises:
            JoinError: ``data`` is not serialised index facts.
        """
        try:
            meta = json.loads(data.decode())
            if meta.get("format") != _FACTS_FORMAT:
                msg = f"unsupported key index facts format {meta.get('format')!r}"
                raise JoinError(msg)
            return cls(
                rows=int(meta["rows"]),
                is_unique=bool(meta["is_unique"]),
                duplicated_keys=int(meta["duplicated_keys"]),
                first_duplicates=tuple(
                    Duplicate(
                        key={str(k): int(v) for k, v in d["key"].items()},
                        count=int(d["count"]),
                        locations=tuple((f, int(e)) for f, e in d["locations"]),
                    )
                    for d in meta["first_duplicates"]
                ),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            msg = f"not serialised columnhub key index facts ({len(data)} bytes): {err}"
            raise JoinError(msg) from err


_FACTS_FORMAT = "columnhub-keyindex-facts-1"


class KeyIndex:
    """Sorted packed keys of one dataset, with the file and entry of every row.

    Build with :meth:`build` (rows in dataset order: file by file, entry by
    entry). A *row* of the index is the dataset row number, ``0..len-1``;
    :meth:`locate` turns rows into ``(file, entry)``.

    Where each row lies is kept as ``file_starts`` (the first row of every
    file) when the rows are the files' entries in order, as for a dataset
    read file by file; only an index built with explicit ``file`` and
    ``entry`` per row keeps those arrays (12 bytes a row more).

    Attributes:
        packing: how keys are packed (keys outside its range are not in the
            index by construction).
        file_starts: ``int64`` first row of each file, then the row count;
            ``None`` when ``file``/``entry`` were given per row.
        file_names: optional names of the files (for messages), by file number.
        is_unique: whether every key occurs once.
    """

    def __init__(
        self,
        *,
        packing: KeyPacking,
        order: np.ndarray,
        sorted_words: np.ndarray,
        is_unique: bool,
        file: np.ndarray | None = None,
        entry: np.ndarray | None = None,
        file_starts: np.ndarray | None = None,
        file_names: Sequence[str] = (),
    ) -> None:
        if (file is None) != (entry is None) or (file is None) == (file_starts is None):
            msg = "a key index needs either file and entry per row, or file_starts"
            raise JoinError(msg)
        self.packing = packing
        self.order = order
        self.sorted_words = sorted_words
        self._file = file
        self._entry = entry
        self.file_starts = file_starts
        self.is_unique = bool(is_unique)
        self.file_names = tuple(file_names)
        self._search: np.ndarray | None = None

    @property
    def file(self) -> np.ndarray:
        """``int32`` file number per row."""
        if self._file is not None:
            return self._file
        assert self.file_starts is not None
        sizes = np.diff(self.file_starts)
        return np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)

    @property
    def entry(self) -> np.ndarray:
        """``int64`` entry within its file, per row."""
        if self._entry is not None:
            return self._entry
        assert self.file_starts is not None
        n = int(self.file_starts[-1])
        return np.arange(n, dtype=np.int64) - np.repeat(
            self.file_starts[:-1], np.diff(self.file_starts)
        )

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        keys: KeyColumns,
        *,
        file: npt.ArrayLike | None = None,
        entry: npt.ArrayLike | None = None,
        file_names: Sequence[str] = (),
        packing: KeyPacking | None = None,
    ) -> KeyIndex:
        """Index the key columns of a dataset.

        Args:
            keys: key columns in key order, one row per event of the dataset.
            file: file number per row (default: all in file 0).
            entry: entry within its file per row (default: the row number).
            file_names: names of the files by number, used in messages.
            packing: the packing to use (default: fitted to these keys). Give
                one fitted over both sides when several indexes must share
                packed words; keys outside it raise :class:`JoinError`.

        Returns:
            The index.

        Raises:
            KeyTypeError: a key column is invalid.
            JoinError: lengths differ, or a key lies outside ``packing``.
        """
        if packing is None:
            packing = KeyPacking.fit(keys)
            if packing.nwords == 1:  # the usual case: fitted on these keys, packed in one pass
                words, _ = packing.compose(keys, 0)
                return cls._from_words(
                    words, packing, file=file, entry=entry, file_names=file_names
                )
        norm = normalize_keys(keys)
        words, fits = packing.pack(norm)
        if fits is not None:
            bad = int(np.flatnonzero(~fits)[0])
            vals = [int(c[bad]) for c in norm.values()]
            msg = (
                f"key {format_key(list(norm), vals)} at row {bad} lies outside the given key "
                f"packing {packing}; fit the packing over every side (KeyPacking.fit)."
            )
            raise JoinError(msg)
        del norm
        return cls._from_words(words, packing, file=file, entry=entry, file_names=file_names)

    @classmethod
    def _from_words(
        cls,
        words: np.ndarray,
        packing: KeyPacking,
        *,
        file: npt.ArrayLike | None,
        entry: npt.ArrayLike | None,
        file_names: Sequence[str],
        file_starts: np.ndarray | None = None,
    ) -> KeyIndex:
        """The index of keys already packed with ``packing`` (``words`` is sorted in place)."""
        n = len(words)
        where: dict[str, np.ndarray | None] = {"file_starts": None, "file": None, "entry": None}
        if file is None and entry is None:  # rows are entries, file by file
            starts = np.array([0, n]) if file_starts is None else np.asarray(file_starts)
            where["file_starts"] = starts.astype(np.int64, copy=False)
        else:
            file_arr = (
                np.zeros(n, dtype=np.int32)
                if file is None
                else np.asarray(file).astype(np.int32, copy=False)
            )
            entry_arr = (
                np.arange(n, dtype=np.int64)
                if entry is None
                else np.asarray(entry).astype(np.int64, copy=False)
            )
            if len(file_arr) != n or len(entry_arr) != n:
                msg = (
                    f"key index: {n} keys but {len(file_arr)} file numbers and "
                    f"{len(entry_arr)} entries; give one file number and entry per key row."
                )
                raise JoinError(msg)
            where["file"], where["entry"] = file_arr, entry_arr
        order, sorted_words = sort_words(words, overwrite=True)
        s = searchable(sorted_words)
        unique = not bool(_equal_neighbours(s).any())
        if not unique and words.ndim == 1:
            # duplicates keep their row order (argsort is not stable by default);
            # ``words`` may have been sorted in place: rebuild it from the sort
            original = np.empty_like(sorted_words)
            original[order] = sorted_words
            order, sorted_words = sort_words(original, stable=True)
        index = cls(
            packing=packing,
            order=order,
            sorted_words=sorted_words,
            is_unique=unique,
            file_names=file_names,
            **where,
        )
        if sorted_words.ndim == 1:
            index._search = sorted_words
        return index

    @classmethod
    def from_files(cls, parts: Sequence[KeyColumns], *, file_names: Sequence[str] = ()) -> KeyIndex:
        """Index a dataset given the key columns of each file, in file order."""
        if not parts:
            msg = "KeyIndex.from_files needs the key columns of at least one file"
            raise JoinError(msg)
        # Memory-lean for large datasets: validate and summarise each file (min, max),
        # fit the packing on the summaries, then pack file by file; the key columns
        # are never widened to uint64 all at once.
        names: list[str] = []
        summaries: list[dict[str, np.ndarray]] = []
        lengths: list[int] = []
        for part in parts:
            cols = integer_keys(part)  # checked, in their own integer types
            if not names:
                names = list(cols)
            elif len(cols) != len(names):
                msg = f"files have different key columns: {names} vs {list(cols)}"
                raise JoinError(msg)
            n = len(next(iter(cols.values())))
            lengths.append(n)
            summaries.append(
                {
                    k: np.array(minmax(c), dtype=np.uint64) if n else np.zeros(0, np.uint64)
                    for k, c in cols.items()
                }
            )
        packing = KeyPacking.fit(*summaries, names=names)
        if packing.nwords == 1:  # pack file by file into one array
            words = np.empty(sum(lengths), dtype=np.uint64)
            start = 0
            for part, n in zip(parts, lengths, strict=True):
                packing.compose(part, 0, out=words[start : start + n])  # fitted on all: fits
                start += n
        else:
            words_parts = [packing.pack(normalize_keys(part))[0] for part in parts]
            words = np.concatenate(words_parts) if len(words_parts) > 1 else words_parts[0]
            del words_parts
        file_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls._from_words(
            words,
            packing,
            file=None,
            entry=None,
            file_names=file_names,
            file_starts=file_starts,
        )

    # ------------------------------------------------------------ properties
    @property
    def nbytes(self) -> int:
        """Bytes of the arrays the index holds."""
        arrays = [self.order, self.sorted_words, self._file, self._entry, self.file_starts]
        return sum(a.nbytes for a in arrays if a is not None)

    def __len__(self) -> int:
        return len(self.order)

    def __repr__(self) -> str:
        return (
            f"KeyIndex({len(self)} rows, keys={list(self.packing.names)}, "
            f"{self.packing.nwords} word(s), unique={self.is_unique})"
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Key column names, in key order."""
        return self.packing.names

    @property
    def search_keys(self) -> np.ndarray:
        """Sorted keys as a 1-d array ``np.searchsorted`` can search."""
        if self._search is None:
            self._search = searchable(self.sorted_words)
        return self._search

    def file_label(self, file: int) -> str | int:
        """The name of file number ``file`` when known, else the number."""
        return self.file_names[file] if 0 <= file < len(self.file_names) else int(file)

    def locate(self, rows: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """``(file, entry)`` of dataset rows (``-1`` rows give ``(-1, -1)``)."""
        r = np.asarray(rows, dtype=np.int64)
        if len(self) == 0:
            return np.full(len(r), -1, dtype=np.int32), np.full(len(r), -1, dtype=np.int64)
        missing = bool(r.size) and int(r.min()) < 0
        ok = r >= 0 if missing else None
        safe = np.where(ok, r, 0) if ok is not None else r
        if self.file_starts is not None and len(self.file_starts) == 2:
            # one file: the row is the entry (a copy: never a view of ``rows``)
            file = np.zeros(len(r), dtype=np.int32)
            entry = np.array(safe, dtype=np.int64)
        elif self.file_starts is not None:
            at = np.searchsorted(self.file_starts, safe, side="right") - 1
            entry = safe - self.file_starts[at]
            file = at.astype(np.int32)
        else:
            file, entry = self.file[safe].astype(np.int32), self.entry[safe]
        if ok is not None:
            file[~ok] = -1
            entry[~ok] = -1
        return file, entry

    def key_columns(self, rows: npt.ArrayLike | None = None) -> dict[str, np.ndarray]:
        """The original key columns (``uint64``) of some rows (default: all, in row order)."""
        inv = np.empty(len(self.order), dtype=np.int64)
        inv[self.order] = np.arange(len(self.order), dtype=np.int64)
        pos = inv if rows is None else inv[np.asarray(rows, dtype=np.int64)]
        return self.packing.unpack(self.sorted_words[pos])

    # ------------------------------------------------------------ duplicates
    def duplicates(self, *, limit: int = 5, per_key: int = 3) -> list[Duplicate]:
        """The first duplicated keys (by the row of their first occurrence).

        Args:
            limit: at most this many keys.
            per_key: at most this many locations per key.

        Returns:
            Empty when the index is unique.
        """
        if self.is_unique or len(self) < 2:
            return []
        eq = _equal_neighbours(self.search_keys)
        # sorted positions starting a run of equal keys
        starts = np.flatnonzero(eq & ~np.concatenate(([False], eq[:-1])))
        # run ends: next position where eq is False
        # a run starting at s ends (inclusive) at the first e >= s with eq[e] False
        not_eq = np.append(np.flatnonzero(~eq), len(self) - 1)
        ends = not_eq[np.searchsorted(not_eq, starts)]
        # order within a run of equal keys is the row order (stable sorts)
        first_rows = self.order[starts]
        pick = np.argsort(first_rows, kind="stable")[:limit]
        out: list[Duplicate] = []
        for g in pick:
            lo, hi = int(starts[g]), int(ends[g]) + 1
            rows = self.order[lo : min(hi, lo + per_key)]
            files, entries = self.locate(rows)
            key = self.packing.unpack(self.sorted_words[lo : lo + 1])
            out.append(
                Duplicate(
                    key={k: int(v[0]) for k, v in key.items()},
                    count=hi - lo,
                    locations=tuple(
                        (self.file_label(int(f)), int(e))
                        for f, e in zip(files, entries, strict=True)
                    ),
                )
            )
        return out

    def duplicated_key_count(self) -> int:
        """How many distinct keys occur more than once."""
        if self.is_unique or len(self) < 2:
            return 0
        eq = _equal_neighbours(self.search_keys)
        return int((eq & ~np.concatenate(([False], eq[:-1]))).sum())

    # --------------------------------------------------------- serialisation
    def to_chunks(self) -> list[memoryview]:
        """The index as the pieces of one blob, in order (:meth:`to_bytes` joins them).

        The layout (``columnhub-keyindex-3``): the 8-byte magic
        ``b"CHKEYIX\\0"``, the JSON header's length (``<u4``), the JSON header
        (the packing, uniqueness, file names, and each array's name, dtype,
        offset and size), padded so the arrays start 64-byte aligned; then the
        arrays' raw little-endian bytes, each at a 64-aligned offset. The
        arrays are handed over as views: nothing is copied to store the index
        (:meth:`ColumnCache.put_bytes <columnhub.cache.ColumnCache.put_bytes>`
        writes the pieces), and :meth:`from_bytes` reads them back as views.
        """
        where = (
            {"file_starts": self.file_starts}
            if self.file_starts is not None
            else {"row_file": self.file, "row_entry": self.entry}
        )
        arrays = {"order": self.order, "sorted_words": self.sorted_words, **where}
        payload: list[memoryview] = []
        described = []
        offset = 0
        for name, array in arrays.items():
            data = np.ascontiguousarray(array)
            if data.dtype.byteorder == ">":
                data = data.astype(data.dtype.newbyteorder("<"))
            # as .npy files describe it: structured key words keep their fields
            descr = np.lib.format.dtype_to_descr(data.dtype)
            described.append([name, descr, list(data.shape), offset, int(data.nbytes)])
            payload.append(data.reshape(-1).view(np.uint8).data)
            offset += data.nbytes
            if offset % _ALIGN:
                payload.append(memoryview(bytes(_ALIGN - offset % _ALIGN)))
                offset += _ALIGN - offset % _ALIGN
        meta = {
            "format": _FORMAT,
            "packing": self.packing.to_dict(),
            "is_unique": self.is_unique,
            "file_names": list(self.file_names),
            "arrays": described,
        }
        text = json.dumps(meta, separators=(",", ":")).encode()
        text += b" " * ((-(len(_MAGIC) + 4 + len(text))) % _ALIGN)
        head = _MAGIC + len(text).to_bytes(4, "little") + text
        return [memoryview(head), *payload]

    def to_bytes(self) -> bytes:
        """The index as bytes for the column cache (no pickle; see :meth:`to_chunks`)."""
        return b"".join(self.to_chunks())

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> KeyIndex:
        """Inverse of :meth:`to_bytes`; also reads the ``.npz`` archives of formats 1 and 2.

        The arrays are views of ``data`` (read-only when ``data`` is ``bytes``).

        Raises:
            JoinError: ``data`` is not a serialised key index.
        """
        view = memoryview(data).cast("B")
        try:
            if bytes(view[: len(_MAGIC)]) == _MAGIC:
                meta, arrays = _read_raw(view)
            else:
                with np.load(io.BytesIO(view), allow_pickle=False) as npz:
                    meta = json.loads(npz["meta"].tobytes().decode())
                    names = ("order", "sorted_words", "row_file", "row_entry", "file_starts")
                    arrays = {k: npz[k] for k in names if k in npz.files}
        except (OSError, ValueError, KeyError, TypeError) as err:
            msg = f"not a serialised columnhub key index ({view.nbytes} bytes): {err}"
            raise JoinError(msg) from err
        if meta.get("format") not in _FORMATS:
            msg = f"unsupported key index format {meta.get('format')!r}; expected {_FORMAT!r}"
            raise JoinError(msg)
        try:
            index = cls(
                packing=KeyPacking.from_dict(meta["packing"]),
                order=arrays["order"],
                sorted_words=arrays["sorted_words"],
                file=arrays.get("row_file"),
                entry=arrays.get("row_entry"),
                file_starts=arrays.get("file_starts"),
                is_unique=bool(meta["is_unique"]),
                file_names=meta["file_names"],
            )
        except KeyError as err:
            msg = f"a serialised key index lacks {err}"
            raise JoinError(msg) from err
        return index

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_search"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
