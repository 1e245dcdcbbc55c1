"""ROOT writer: the result as TTree ``Events`` in part files sized by bytes (uproot).

What the TTree holds (the layout NanoAOD files have, so that ROOT, uproot and
coffea's ``NanoAODSchema`` read it as they read NanoAOD):

- every delivered column is one branch, under its delivered name unchanged
  (dots included, as PHYSLITE's ``EventInfoAuxDyn.runNumber``), with its
  type: every integer width, ``float32``/``float64``, ``bool``, strings,
  fixed-size arrays (``3 * float32``) and jagged lists of numbers or bools;
- branches come in the delivered columns' order; a jagged column's counter
  branch (``int32``, as NanoAOD's) comes just before the first column it counts;
- the jagged columns of one collection (``Jet_pt``, ``Jet_eta``: the name up to
  the first ``_``) share one counter, ``nJet``, when their lists have the same
  lengths; for a NanoAOD collection that is the ``nJet`` the plan delivers
  (checked against every list before the writer sees it). A jagged column
  whose lengths differ from its collection's (lists of a file without
  counters: ``Jet_late`` beside ``Jet_pt``) gets a counter of its own, ``n`` +
  its name (``nJet_late``), never forced into ``nJet``. Which columns share a
  counter comes from the plan (its NanoAOD collections,
  :attr:`columnhub.plan.Plan.collections`), so every part of a result has the
  same branches; a writer used alone decides it on the first rows written.
  An event where they disagree is an error.
- a delivered integer column that has a counter's name (``nJet``) and equals
  the lists' lengths on the first rows is that counter, written as ``int32``
  (the manifest says so); one that differs stays a branch of its own and the
  lists take the other counter name. A counter never silently replaces a
  column: a later event where they disagree, or a non-integer column under a
  counter's name, is an error.

What a TTree cannot hold is refused with one :class:`OutputError` that names
every such column, the reason and the fix (deliver as Parquet): missing values
(at the top or inside lists), lists of lists, lists of fixed-size arrays or of
strings, records, and types ROOT has no leaf for (``float16``, bytes, dates).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import uproot

from columnhub.errors import OutputError
from columnhub.output.parquet import PartInfo, part_path, publish_part

__all__ = ["RootPartWriter", "collection_of", "unwritable_columns"]

_PARQUET_FIX = "deliver them with output.format: parquet, or leave them out of columns"
_BAD_NAME_CHARS = frozenset("/[]:; \t\n")  # would break a leaf title ``name[n]/F`` or a path


def collection_of(name: str) -> str:
    """The NanoAOD collection a column belongs to: its name up to the first ``_``.

    >>> collection_of("Jet_pt"), collection_of("MET"), collection_of("_x")
    ('Jet', 'MET', '_x')
    """
    head, sep, _ = name.partition("_")
    return head if sep and head else name


def _leaf_problem(t: pa.DataType) -> str | None:
    """Why a number leaf cannot be a ROOT leaf (None when it can)."""
    if pa.types.is_boolean(t) or pa.types.is_integer(t):
        return None
    if pa.types.is_float32(t) or pa.types.is_float64(t):
        return None
    if pa.types.is_float16(t):
        return "ROOT has no float16 leaf (cast it to float32 in a define)"
    return f"ROOT has no leaf for {t}"


def _type_problem(t: pa.DataType) -> str | None:
    """Why a column of Arrow type ``t`` cannot be a TTree branch (None when it can)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return None
    if pa.types.is_fixed_size_list(t):
        inner = t.value_type
        if pa.types.is_fixed_size_list(inner):
            return _type_problem(inner)
        return _leaf_problem(inner)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = t.value_type
        if pa.types.is_list(inner) or pa.types.is_large_list(inner):
            return "lists of lists (doubly jagged) need split objects, which uproot cannot write"
        if pa.types.is_fixed_size_list(inner):
            return "uproot writes lists of fixed-size arrays wrongly, so they are not written"
        if pa.types.is_string(inner) or pa.types.is_large_string(inner):
            return "uproot cannot write lists of strings to a TTree"
        if pa.types.is_struct(inner):
            return "lists of records are written as separate branches, which would rename them"
        return _leaf_problem(inner)
    if pa.types.is_struct(t):
        return "records are written as one branch per field, which would rename them"
    return _leaf_problem(t)


def _missing_inside(array: pa.Array | pa.ChunkedArray) -> bool:
    """Whether the lists or fixed-size arrays of ``array`` hold missing items."""
    chunks = array.chunks if isinstance(array, pa.ChunkedArray) else [array]
    for chunk in chunks:
        t = chunk.type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            values = chunk.flatten()
            if values.null_count or _missing_inside(values):
                return True
    return False


def unwritable_columns(table: pa.Table) -> dict[str, str]:
    """Column name -> why a ROOT TTree cannot hold it, for each such column of ``table``."""
    problems: dict[str, str] = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        if not name or _BAD_NAME_CHARS & set(name):
            problems[name] = (
                "ROOT branch names cannot be empty or hold '/', '[', ']', ':', ';' or spaces "
                "(rename it in a define)"
            )
        elif (reason := _type_problem(column.type)) is not None:
            problems[name] = f"{_type_name(table.schema.field(name))}: {reason}"
        elif column.null_count:
            problems[name] = (
                f"{column.null_count} rows are missing (None), which a TTree cannot store "
                "(select only rows that have a value with where, e.g. a friend's "
                "<friend>_matched, or use how: inner)"
            )
        elif _missing_inside(column):
            problems[name] = (
                "its lists hold missing items (None), which a TTree cannot store "
                "(select only rows that have values with where, or use how: inner)"
            )
    return problems


def _type_name(field: pa.Field) -> str:
    """The awkward type of a column (``var * var * float64``), as the manifest writes it."""
    try:
        return str(ak.from_arrow_schema(pa.schema([field])).content(0).type)
    except (TypeError, ValueError, NotImplementedError):  # a type awkward has no name for
        return str(field.type)


def _strict(t: pa.DataType) -> pa.DataType:
    """``t`` with every list item marked non-nullable (awkward then adds no option type)."""
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        item = pa.field(t.value_field.name, _strict(t.value_type), nullable=False)
        if pa.types.is_fixed_size_list(t):
            return pa.list_(item, t.list_size)
        return pa.large_list(item) if pa.types.is_large_list(t) else pa.list_(item)
    return t


def _is_jagged(t: pa.DataType) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t))


def _lengths(column: pa.ChunkedArray) -> npt.NDArray[np.int64]:
    return np.asarray(pc.list_value_length(column).to_numpy(zero_copy_only=False), np.int64)


@dataclass(frozen=True)
class _Layout:
    """Which counter each jagged column uses, decided once for the whole output."""

    counters: dict[str, list[str]]  # counter branch -> the jagged columns it counts, in order

    def counter_of(self) -> Callable[[str], str]:
        by_column = {c: n for n, cols in self.counters.items() for c in cols}
        return lambda column: by_column[column]


def _plan_layout(table: pa.Table) -> _Layout:
    """Group ``table``'s jagged columns by collection, splitting off disagreeing lengths."""
    names = set(table.column_names)
    counters: dict[str, list[str]] = {}
    lengths: dict[str, npt.NDArray[np.int64]] = {}
    for name in table.column_names:
        column = table.column(name)
        if not _is_jagged(column.type):
            continue
        own = _lengths(column)
        shared = "n" + collection_of(name)
        for counter in (shared, "n" + name):
            if counter in names and counter not in counters:
                given = table.column(counter)
                if not pa.types.is_integer(given.type):  # refused, naming it, by _check
                    counters[counter] = [name]
                    lengths[counter] = own
                    break
                lengths[counter] = np.asarray(given.to_numpy(zero_copy_only=False), np.int64)
                counters[counter] = []
            if counter not in counters:
                counters[counter], lengths[counter] = [name], own
                break
            if np.array_equal(lengths[counter], own):
                counters[counter].append(name)
                break
        else:  # both names taken by counters of other lengths: _check names the clash
            counters[shared].append(name)
    return _Layout({k: v for k, v in counters.items() if v})


class RootPartWriter:
    """Writes tables in order into ``part-NNNNN.root`` files (TTree ``Events``).

    Attributes:
        schema: the columns as written (delivered columns that are counters
            become ``int32``); ``None`` until the first table.
        parts: the finished parts.
    """

    def __init__(
        self,
        directory: Path,
        *,
        target_bytes: int | None,
        tree: str = "Events",
        number: int = 0,
        counters: dict[str, list[str]] | None = None,
        schema: pa.Schema | None = None,
    ) -> None:
        """A writer of parts ``number``, ``number + 1``...

        Args:
            directory: where the parts go.
            target_bytes: a new part starts once one reaches this size
                (``None``: everything goes into part ``number``).
            tree: the TTree's name.
            number: the number of the first part.
            counters: counter branch -> the jagged columns it counts (from
                the plan); ``None`` decides it on the first rows.
            schema: the columns every table is cast to (``None``: the first
                table's).
        """
        self.directory = directory
        self.target_bytes = target_bytes
        self.number = number
        self._given = _Layout({k: list(v) for k, v in counters.items()}) if counters else None
        self.tree_name = tree
        self.schema: pa.Schema | None = None
        self.parts: list[PartInfo] = []
        self._first: pa.Schema | None = schema
        self._layout: _Layout | None = None
        self._file: Any = None
        self._tmp: Path | None = None
        self._rows = 0
        self._written = 0  # rows written to every part so far (for messages)

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (one basket per call); roll over to a new part by size."""
        if self._first is None:
            self._first = table.schema
            self.schema = table.schema
        table = self._conform(table)
        if table.num_rows == 0:
            return  # no rows, no basket; close() writes the branches of an empty result
        if self._layout is None:
            self._layout = self._given or _plan_layout(table)
            self.schema = self._written_schema(table.schema)
        self._check(table)
        self._append(table)

    def _conform(self, table: pa.Table) -> pa.Table:
        assert self._first is not None
        try:
            table = table.cast(self._first)
        except (pa.ArrowException, ValueError) as err:
            msg = (
                f"a chunk's columns have types {table.schema} that differ from the first "
                f"chunk's {self._first}; this is a bug in a column provider ({err})"
            )
            raise OutputError(msg) from err
        problems = unwritable_columns(table)
        if problems:
            raise OutputError(_refusal(problems))
        return table

    def _written_schema(self, schema: pa.Schema) -> pa.Schema:
        """The columns as the TTree holds them: never missing, counters ``int32``."""
        assert self._layout is not None
        fields = []
        for field in schema:
            t = _strict(field.type)
            if field.name in self._layout.counters and pa.types.is_integer(t):
                t = pa.int32()
            fields.append(pa.field(field.name, t, nullable=False))
        return pa.schema(fields, metadata=schema.metadata)

    def _check(self, table: pa.Table) -> None:
        """Refuse a counter a delivered column contradicts, or members whose lengths differ."""
        assert self._layout is not None
        for counter, members in self._layout.counters.items():
            first = _lengths(table.column(members[0]))
            if counter in table.column_names:
                given = table.column(counter)
                if not pa.types.is_integer(given.type):
                    msg = (
                        f"column {counter!r} ({given.type}) has the name of the counter branch "
                        f"of {', '.join(map(repr, members))} in the ROOT TTree, and a counter is "
                        f"an integer; rename {counter!r} (a define), or deliver with "
                        "output.format: parquet"
                    )
                    raise OutputError(msg)
                values = np.asarray(given.to_numpy(zero_copy_only=False))
                if not np.array_equal(values, first):
                    row = int(np.flatnonzero(values != first)[0])
                    msg = (
                        f"column {counter!r} has the name of the counter branch of "
                        f"{', '.join(map(repr, members))} in the ROOT TTree, but in row "
                        f"{self._written + row} it is {values[row]} while {members[0]!r} "
                        f"holds {first[row]} items; it would be overwritten. Rename "
                        f"{counter!r} (a define), or deliver with output.format: parquet"
                    )
                    raise OutputError(msg)
            for other in members[1:]:
                lengths = _lengths(table.column(other))
                if not np.array_equal(lengths, first):
                    row = int(np.flatnonzero(lengths != first)[0])
                    msg = (
                        f"columns {members[0]!r} and {other!r} share the counter branch "
                        f"{counter!r} in the ROOT TTree (NanoAOD's layout: one counter per "
                        f"collection), decided on the first rows, but in row "
                        f"{self._written + row} they hold {first[row]} and {lengths[row]} "
                        f"items; name {other!r} so that it does not start with "
                        f"{collection_of(other) + '_'!r}, or deliver with output.format: parquet"
                    )
                    raise OutputError(msg)

    def _branches(self, table: pa.Table) -> dict[str, Any]:
        assert self._layout is not None
        counted = {c for cols in self._layout.counters.values() for c in cols}
        out: dict[str, Any] = {}
        for name, column in zip(table.column_names, table.columns, strict=True):
            if name in self._layout.counters and name not in counted:
                out[name] = np.asarray(column.to_numpy(zero_copy_only=False), np.int32)
            else:
                out[name] = ak.from_arrow(column.cast(_strict(column.type)).combine_chunks())
        return out

    def _append(self, table: pa.Table) -> None:
        assert self._layout is not None
        branches = self._branches(table)
        try:
            if self._file is None:
                self._tmp = part_path(self.directory, self.number + len(self.parts), "root")
                self._file = uproot.recreate(self._tmp)
                self._file.mktree(self.tree_name, branches, counter_name=self._layout.counter_of())
            else:
                self._file[self.tree_name].extend(branches)
        except (ValueError, TypeError) as err:  # checked above: a case this writer missed
            msg = f"uproot {uproot.__version__} cannot write these columns as a TTree: {err}"
            raise OutputError(msg) from err
        self._rows += table.num_rows
        self._written += table.num_rows
        if (
            self.target_bytes is not None
            and self._tmp is not None
            and self._tmp.stat().st_size >= self.target_bytes
        ):
            self._finish()

    def _finish(self) -> None:
        if self._file is None:
            return
        self._file.close()
        assert self._tmp is not None
        self.parts.append(publish_part(self._tmp, self._rows))
        self._file = None
        self._rows = 0

    def close(self) -> list[PartInfo]:
        """Finish the last part; returns every part written."""
        if self._first is not None and not self.parts and self._file is None:
            empty = self._first.empty_table()  # an empty result still has its branches
            if self._layout is None:
                self._layout = self._given or _plan_layout(empty)
                self.schema = self._written_schema(empty.schema)
            self._append(empty)
        self._finish()
        return self.parts

    def abort(self) -> None:
        """Drop the part being written."""
        if self._file is not None:
            self._file.close()
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
            self._file = None


def _refusal(problems: dict[str, str]) -> str:
    lines = "\n".join(f"  - {name!r}: {why}" for name, why in problems.items())
    return (
        f"output.format root (a TTree) cannot hold {len(problems)} delivered "
        f"column{'s' if len(problems) > 1 else ''}:\n{lines}\n{_PARQUET_FIX}"
    )
