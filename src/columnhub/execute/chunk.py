"""The chunk task: every requested column for one chunk, selected, as an Arrow table.

:func:`run_chunk` is a pure function of ``(plan, chunk)``: no global state, so
it is picklable, idempotent and retryable, and runs unchanged in a thread
pool or on Dask workers.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import awkward as ak
import numpy as np
import pyarrow as pa

from columnhub import sources
from columnhub.cache import ColumnCache, ColumnLookup
from columnhub.errors import (
    CacheError,
    ColumnhubError,
    ExpressionError,
    JoinError,
    KeyTypeError,
    SpecError,
)
from columnhub.execute._select import select
from columnhub.join.collection import describe_row, fill_to_counts, first_mismatch, is_list
from columnhub.join.gather import gather
from columnhub.keys import integer_keys
from columnhub.plan import Chunk, ColumnDef, Plan

__all__ = ["ChunkResult", "run_chunk", "to_arrow_table"]


@dataclass(frozen=True)
class ChunkResult:
    """What one chunk task produced.

    Attributes:
        chunk: the chunk.
        table: the selected rows of the output columns.
        rows_in: events read.
        hits: column-chunk cache hits.
        misses: column-chunk cache misses.
        seconds: wall time of the task.
    """

    chunk: Chunk
    table: pa.Table
    rows_in: int
    hits: int = 0
    misses: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def run_chunk(
    plan: Plan,
    chunk: Chunk,
    *,
    cache: ColumnCache | None = None,
    exchanged: ColumnLookup | None = None,
    fresh: Collection[str] = (),
) -> ChunkResult:
    """Compute, select and convert the output columns of ``chunk``.

    With a ``cache``, every column (raw branches, definitions, the selection
    mask) is first looked up by its address; only what is missing is read or
    computed, then stored for the next request. ``exchanged`` is the
    request's temporary store of exchanged friend columns (and keys), looked
    up first, when there is no writable cache to hold them
    (:mod:`columnhub.join.exchange`). ``fresh`` holds the addresses that
    stage wrote for this request: found, they count as misses, not hits.
    """
    t0 = time.perf_counter()
    work = _ChunkWork(plan, chunk, cache, exchanged, fresh)
    needed = [*plan.outputs, *([WHERE] if plan.where is not None else [])]
    for friend in plan.friends:
        needed.extend(plan.request.dataset.keys)
        if friend.filters:
            needed.append(friend.spec.matched_name)
    work.resolve(needed)
    work.compute()
    work.check_collections()
    outputs = {name: work.values[name] for name in plan.outputs}
    mask = work.mask()
    if mask is not None:
        outputs = _select_all(outputs, mask)
    if any(f.has_tail for f in plan.friends):  # tail rows lack primary values
        outputs = {name: _optional(name, a, plan) for name, a in outputs.items()}
    table = to_arrow_table(outputs)
    return ChunkResult(
        chunk=chunk,
        table=table,
        rows_in=chunk.entries,
        hits=work.hits,
        misses=work.misses,
        seconds=time.perf_counter() - t0,
        details={
            "read": sorted(work.to_read),
            "friend_entries_read": work.friend_entries_read,
            "friend_bytes": work.friend_bytes,
            "cache_errors": work.cache_errors,
            "inference": work.metrics,
        },
    )


WHERE = "\0where"  # the selection mask's name among the columns of a chunk


class _ChunkWork:
    """The columns of one chunk: looked up in the cache, else read or computed."""

    def __init__(
        self,
        plan: Plan,
        chunk: Chunk,
        cache: ColumnCache | None,
        exchanged: ColumnLookup | None = None,
        fresh: Collection[str] = (),
    ) -> None:
        self.plan = plan
        self.chunk = chunk
        self.cache = cache
        self.exchanged = exchanged
        self.fresh = fresh
        #: friend name -> [bytes read from the friend, bytes of its columns joined]
        self.friend_bytes: dict[str, list[int]] = {}
        self.values: dict[str, Any] = {}
        self.to_read: list[str] = []
        self.to_join: dict[str, list[str]] = {f.spec.name: [] for f in plan.friends}
        self.to_compute: list[str] = []
        self._joining: set[str] = set()  # every name of to_join
        self.primary_space: set[str] = set()  # values with one row per primary event
        self.hits = self.misses = self.cache_errors = self.friend_entries_read = 0
        self.metrics: Any = None  # InferenceMetrics, when the chunk runs a model
        file = plan.dataset.files[chunk.file_index]
        self._address = {
            "file": file.identity_dict,
            "tree": plan.request.dataset.tree,
            "entry_start": chunk.start,
            "entry_stop": chunk.stop,
        }

    def key(self, name: str) -> str:
        from columnhub.cache import entry_key

        if name == WHERE:
            return entry_key(**self._address, column=self.plan.where_fingerprint, rows=self.plan.rows_tag)
        column = self.plan.columns[name]
        if column.kind in ("define", "model"):
            return entry_key(**self._address, column=column.fingerprint, rows=self.plan.rows_tag)
        return entry_key(**self._address, column=column.fingerprint)

    def _space(self, name: str) -> bool:
        """True when ``name`` has one row per primary event (before any expansion)."""
        column = self.plan.columns[name]
        if column.kind == "source":
            return True
        if column.kind == "friend":
            return not self.plan.friend(column.source["friend"]).expands
        return False

    def mask(self) -> np.ndarray | None:
        """The selection: ``where`` and, for inner/right friends, "has a partner"."""
        masks = []
        if self.plan.where is not None:
            masks.append(np.asarray(ak.to_numpy(self.values[WHERE]), dtype=bool))
        for friend in self.plan.friends:
            if friend.filters:
                masks.append(np.asarray(ak.to_numpy(self.values[friend.spec.matched_name]), dtype=bool))
        if not masks:
            return None
        return np.logical_and.reduce(masks) if len(masks) > 1 else masks[0]

    def resolve(self, names: list[str]) -> None:
        """Find, depth first, what must be read and computed (dependencies first).

        An explicit stack, not recursion: a chain of thousands of ``define`` s
        works like a short one. A name is looked up in the cache when first
        met; one that must be computed or joined is queued after its
        dependencies.
        """
        # shared by every call: a friend column reached first as a dependency
        # (of a define listed before it) must not be joined twice
        joining = self._joining
        stack: list[tuple[str, bool]] = [(n, False) for n in reversed(names)]
        while stack:
            name, deps_done = stack.pop()
            if deps_done:
                column = self.plan.columns[name] if name != WHERE else None
                if column is not None and column.kind == "friend":
                    self.to_join[column.source["friend"]].append(name)
                    joining.add(name)
                else:
                    self.to_compute.append(name)
                continue
            if name in self.values or name in self.to_read or name in self.to_compute:
                continue
            if name in joining:
                continue
            if self.exchanged is not None and name != WHERE:
                found = self.exchanged.get(self.key(name))
                if found is not None:
                    if self.cache is not None:  # computed for this request: not a hit
                        self.misses += 1
                    self.values[name] = found
                    if self._space(name):
                        self.primary_space.add(name)
                    continue
            if self.cache is not None:
                key = self.key(name)
                found = self.cache.get(key)
                if found is not None:
                    if key in self.fresh:  # computed for this request (the friend exchange)
                        self.misses += 1
                    else:
                        self.hits += 1
                    self.values[name] = found
                    if name != WHERE and self._space(name):
                        self.primary_space.add(name)
                    continue
                self.misses += 1
            if name == WHERE:
                assert self.plan.where is not None
                deps = sorted(self.plan.where.names)
            else:
                column = self.plan.columns[name]
                if column.kind == "source":
                    self.to_read.append(name)
                    continue
                deps = list(column.deps)
            stack.append((name, True))
            stack.extend((d, False) for d in reversed(deps))

    def compute(self) -> None:
        plan, chunk = self.plan, self.chunk
        if self.to_read:
            file = plan.dataset.files[chunk.file_index]
            read = sources.read(
                file, plan.request.dataset, self.to_read, start=chunk.start, stop=chunk.stop
            )
            self._check_keys(read, file.path)
            for name in self.to_read:
                self._store(name, read[name])
                self.primary_space.add(name)
        rows = self._join()
        if rows is not None:  # one-to-many: one output row per (event, partner) pair
            for name in self.primary_space:
                self.values[name] = gather(self.values[name], rows, optional=False)
        for name in self.to_compute:
            if name == WHERE:
                assert plan.where is not None
                result = plan.where.evaluate(self.values)
                self._store(name, selection_mask(result, text=plan.where.text))
            elif name in self.values:
                continue  # a model output computed together with a sibling output
            elif plan.columns[name].kind == "model":
                self._predict(plan.columns[name])
            else:
                column = plan.columns[name]
                assert column.expression is not None
                self._store(name, column.expression.evaluate(self.values))

    def _check_keys(self, read: dict[str, Any], path: str) -> None:
        """Key columns just read hold valid keys (no negative values, one integer per event).

        Checked whenever they are read, so a result is never delivered with
        keys that could not be joined later.
        """
        keys = {k: read[k] for k in self.plan.request.dataset.keys if k in read}
        if not keys:
            return
        try:
            integer_keys(keys, offset=self.chunk.start)
        except KeyTypeError as err:
            msg = f"dataset {self.plan.request.dataset.name!r}, file {path}: {err}"
            raise KeyTypeError(msg) from err

    def _predict(self, column: ColumnDef) -> None:
        """Run a model once for the chunk; store every output the request uses."""
        from columnhub.inference import InferenceMetrics, predict

        model = column.model
        assert model is not None
        if self.metrics is None:
            self.metrics = InferenceMetrics()
        inputs = [e.evaluate(self.values) for e in model.inputs]
        outputs = predict(model.card, inputs, backend=model.backend, metrics=self.metrics)
        for output, name in model.columns.items():
            if name in self.plan.columns and name not in self.values:
                self._store(name, outputs[output])

    def _join(self) -> np.ndarray | None:
        """Friend columns for this chunk; returns the row expansion of a one-to-many join."""
        from columnhub.join.provider import friend_chunk

        plan, rows = self.plan, None
        for friend in plan.friends:
            wanted = self.to_join[friend.spec.name]
            if not wanted and not friend.expands:
                continue
            keys = {k: self.values[k] for k in plan.request.dataset.keys}
            got = friend_chunk(
                plan,
                friend,
                keys,
                chunk_file=self.chunk.file_index,
                chunk_start=self.chunk.start,
                wanted=wanted,
                cache=self.cache,
            )
            self.friend_entries_read += got.entries_read
            counted = self.friend_bytes.setdefault(friend.spec.name, [0, 0])
            counted[0] += got.bytes_read
            for name in wanted:
                value = got.columns[name]
                if plan.columns[name].source.get("counter") is not None:
                    value = self._join_collection(name, value, got.match, friend)
                self._store(name, value)
                counted[1] += int(ak.Array(value).nbytes)
                if not friend.expands:
                    self.primary_space.add(name)
            if friend.expands and not got.match.primary_identity:
                rows = got.match.primary_rows
        return rows

    def _event(self, row: int, rows: np.ndarray | None = None) -> str:
        """The event of chunk row ``row`` (before selection) by its keys, else its entry."""
        keys = self.plan.request.dataset.keys
        if all(k in self.values for k in keys):
            at = int(rows[row]) if rows is not None else row
            return describe_row({k: self.values[k] for k in keys}, at)
        file = self.plan.dataset.files[self.chunk.file_index].path
        return f"entry {self.chunk.start + row} of {file}"

    def _join_collection(self, name: str, value: Any, match: Any, friend: Any) -> ak.Array:
        """A friend list joining a primary collection: lengths checked, missing rows filled."""
        column = self.plan.columns[name]
        counter = column.source["counter"]
        counts = self.values[counter]
        rows = None
        if friend.expands and not match.primary_identity:
            rows = match.primary_rows
            counts = ak.Array(counts)[rows]
        bad = first_mismatch(value, counts)
        if bad is not None:
            row, length, count = bad
            collection = name.split("_", 1)[0]
            msg = (
                f"friend {friend.spec.name!r}: column {name!r} joins the primary's collection "
                f"{collection!r}, but at event {self._event(row, rows)} it holds {length} "
                f"value(s) where the primary's {counter} is {count}; its objects are not the "
                f"primary's (another selection or order), so it cannot be part of "
                f"{collection!r}: give the friend a 'prefix' (e.g. prefix: "
                f"{friend.spec.name}_) to deliver its columns as a collection of their own"
            )
            raise JoinError(msg)
        if friend.spec.match == "aligned":
            return ak.Array(value)  # every event has its partner: the type stays plain
        return fill_to_counts(value, counts)

    def check_collections(self) -> None:
        """Every list of a delivered collection has its counter's length, in every event.

        coffea zips a collection's lists with the counter's offsets: a list of
        another length would silently pair values of different objects.
        """
        for counter, members in self.plan.collections.items():
            counts = self.values[counter]
            computed = "counts" in self.plan.columns[counter].source
            for name in members:
                column = self.plan.columns[name]
                value = self.values[name]
                if column.source.get("counter") is not None or not is_list(value):
                    continue  # friend lists of a primary collection were checked joining
                if computed and column.kind in ("source", "friend"):
                    # a file without counters (not NanoAOD): lists that share a
                    # name prefix need not share lengths, and the user cannot
                    # rename a file's branches; the computed counter counts the
                    # first list only (docs/nanoevents.md)
                    continue
                bad = first_mismatch(value, counts)
                if bad is None:
                    continue
                row, length, count = bad
                collection = counter[1:]
                where = (
                    f"at event {self._event(row)} it holds {length} value(s) where "
                    f"{counter} is {count}"
                )
                if column.kind == "friend":
                    friend = column.source["friend"]
                    msg = (
                        f"friend {friend!r}: column {name!r} is in collection {collection!r} "
                        f"(NanoAOD names a collection by the text before the first '_'), but "
                        f"{where}; give the friend a 'prefix' (e.g. prefix: {friend}_) or "
                        "deliver these columns from separate friends"
                    )
                    raise JoinError(msg)
                if column.kind == "source":  # a file's branch cannot be renamed: copy it
                    msg = (
                        f"source column {name!r} is in collection {collection!r} by its name "
                        f"(NanoAOD names a collection by the text before the first '_'), but "
                        f"{where}; coffea would pair its values with the wrong objects: "
                        f"deliver it under a name that does not start with {collection + '_'!r} "
                        f"(define: {{{name.replace('_', '', 1)}: {name}}}), in every output format"
                    )
                    raise SpecError(msg)
                msg = (
                    f"{column.kind} column {name!r} is in collection {collection!r} by its "
                    f"name (NanoAOD names a collection by the text before the first '_'), but "
                    f"{where}; coffea would pair its values with the wrong objects: choose "
                    f"another name, one that does not start with {collection + '_'!r}"
                )
                raise SpecError(msg)

    def _store(self, name: str, value: Any) -> None:
        self.values[name] = value
        if self.cache is None:
            return
        try:
            self.cache.put(self.key(name), ak.Array(value) if not isinstance(value, ak.Array) else value)
        except CacheError:
            self.cache_errors += 1  # a full or unwritable cache never fails a request


def run_tail(plan: Plan, *, cache: ColumnCache | None = None) -> ChunkResult | None:
    """The rows of a right/outer friend that have no primary partner, or ``None``.

    They carry their keys, the friend's columns and ``matched = false``;
    primary columns, and definitions computed from them, are missing (``None``),
    and the ``where`` sees them missing too: three-valued logic decides, as in
    SQL (``(~f.matched) | (x > 30)`` keeps them, ``x > 30`` drops them).
    """
    from columnhub.join.provider import tail_rows

    friend = next((f for f in plan.friends if f.has_tail), None)
    if friend is None:
        return None
    t0 = time.perf_counter()
    wanted = [
        n for n, c in plan.columns.items()
        if c.kind == "friend" and c.source["friend"] == friend.spec.name
    ]
    keys, columns = tail_rows(plan, friend, wanted=wanted, cache=cache)
    values: dict[str, Any] = {**keys, **columns}
    n = len(next(iter(keys.values())))
    for name, column in plan.columns.items():
        if column.kind == "define" and all(d in values for d in column.deps):
            assert column.expression is not None
            values[name] = column.expression.evaluate(values)
    mask = np.ones(n, dtype=bool)
    if plan.where is not None:
        mask &= _tail_selection(plan, values, n)
    for other in plan.friends:
        if other is not friend and other.filters:
            mask[:] = False
    table = pa.Table.from_arrays(
        [
            to_arrow_table({name: _optional(name, values[name][mask], plan)}).column(0)
            if name in values
            else pa.nulls(int(mask.sum()))
            for name in plan.outputs
        ],
        names=list(plan.outputs),
    )
    return ChunkResult(
        chunk=Chunk(index=len(plan.chunks), file_index=-1, start=0, stop=0),
        table=table,
        rows_in=0,
        seconds=time.perf_counter() - t0,
        details={"tail": friend.spec.name, "friend_rows": n},
    )


def _select_all(columns: dict[str, Any], mask: np.ndarray) -> dict[str, Any]:
    """Apply the selection to every column, columns in parallel on the read pool.

    The work is numpy copying, which releases the GIL: one chunk task uses
    every core for it, as it does for decompression.
    """
    from columnhub.sources.root import read_executor

    pool = read_executor()
    if pool is None or len(columns) < 2:
        return {name: select(array, mask) for name, array in columns.items()}
    names = list(columns)
    return dict(zip(names, pool.map(lambda n: select(columns[n], mask), names), strict=True))


def _tail_selection(plan: Plan, values: dict[str, Any], n: int) -> np.ndarray:
    """The ``where`` over ``n`` tail rows, with what they lack as missing values.

    The primary's columns (and models) are all-missing arrays; definitions are
    recomputed from them. A ``where`` that cannot be evaluated on missing
    columns of unknown type (a jagged primary column reduced with ``any``)
    selects none of the tail rows.
    """
    assert plan.where is not None
    index = ak.index.Index64(np.full(n, -1, dtype=np.int64))
    missing = ak.Array(ak.contents.IndexedOptionArray(index, ak.contents.EmptyArray()))
    scratch = dict(values)
    defines = []
    for name, column in plan.columns.items():
        if name in scratch:
            continue
        if column.kind == "define":
            defines.append(column)
        else:
            scratch[name] = missing
    try:
        while defines:  # dependencies first, whatever their order in the plan
            ready = [c for c in defines if all(d in scratch for d in c.deps)]
            if not ready:
                return np.zeros(n, dtype=bool)
            for column in ready:
                assert column.expression is not None
                scratch[column.name] = column.expression.evaluate(scratch)
            defines = [c for c in defines if c.name not in scratch]
        return selection_mask(plan.where.evaluate(scratch), text=plan.where.text)
    except ExpressionError:
        return np.zeros(n, dtype=bool)


def _optional(name: str, array: Any, plan: Plan) -> ak.Array:
    """``array`` with an option type, for the columns a right/outer tail row lacks.

    Keys and ``matched`` flags are never missing and keep their types.
    """
    layout = ak.to_layout(array)
    always = {*plan.request.dataset.keys, *(f.spec.matched_name for f in plan.friends)}
    if layout.is_option or name in always:
        return ak.Array(layout)
    return ak.Array(ak.contents.UnmaskedArray.simplified(layout))


def selection_mask(result: Any, *, text: str) -> np.ndarray:
    """A 1-D boolean numpy mask from a ``where`` result (missing values select nothing)."""
    array = ak.Array(result) if not isinstance(result, ak.Array) else result
    if array.ndim != 1:
        msg = (
            f"where must give one boolean per event, but {text!r} gives a list per event; "
            "reduce it with any(...) or all(...)"
        )
        raise ExpressionError(msg)
    array = ak.fill_none(array, False)
    kind = np.asarray(ak.to_numpy(array)).dtype
    if kind != np.bool_:
        msg = (
            f"where must be a boolean expression, but {text!r} gives {kind}; "
            "compare it with something, e.g. (MET_pt > 30)"
        )
        raise ExpressionError(msg)
    return np.asarray(ak.to_numpy(array))


def to_arrow_table(columns: dict[str, Any], *, rows: int | None = None) -> pa.Table:
    """Awkward columns as a plain-typed Arrow table (readable by every Parquet reader).

    A field is nullable exactly when its awkward type is an option type, so
    reading the result back gives the same types (``float32``, not ``?float32``).
    """
    arrays, fields = [], []
    for name, value in columns.items():
        array = value if isinstance(value, ak.Array) else ak.Array(value)
        try:
            converted = ak.to_arrow(array, extensionarray=False, list_to32=True, string_to32=True)
        except Exception as err:
            msg = f"column {name!r} of type {array.type} cannot be written ({err})"
            raise ColumnhubError(msg) from err
        arrays.append(converted)
        fields.append(pa.field(name, converted.type, nullable=ak.to_layout(array).is_option))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    if rows is not None and table.num_rows != rows:
        msg = f"columns have {table.num_rows} rows, expected {rows}"
        raise ColumnhubError(msg)
    return table
