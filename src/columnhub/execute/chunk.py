"""The chunk task: every requested column for one chunk, selected, as an Arrow table.

:func:`run_chunk` is a pure function of ``(plan, chunk)``: no global state, so
it is picklable, idempotent and retryable, and runs unchanged in a thread
pool or on Dask workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import awkward as ak
import numpy as np
import pyarrow as pa

from columnhub import sources
from columnhub.cache import ColumnCache
from columnhub.errors import CacheError, ColumnhubError, ExpressionError
from columnhub.plan import Chunk, Plan

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


def run_chunk(plan: Plan, chunk: Chunk, *, cache: ColumnCache | None = None) -> ChunkResult:
    """Compute, select and convert the output columns of ``chunk``.

    With a ``cache``, every column (raw branches, definitions, the selection
    mask) is first looked up by its address; only what is missing is read or
    computed, then stored for the next request.
    """
    t0 = time.perf_counter()
    work = _ChunkWork(plan, chunk, cache)
    work.resolve([*plan.outputs, *([WHERE] if plan.where is not None else [])])
    work.compute()
    outputs = {name: work.values[name] for name in plan.outputs}
    if plan.where is not None:
        mask = work.values[WHERE]
        outputs = {name: array[mask] for name, array in outputs.items()}
    table = to_arrow_table(outputs, rows=chunk.entries if plan.where is None else None)
    return ChunkResult(
        chunk=chunk,
        table=table,
        rows_in=chunk.entries,
        hits=work.hits,
        misses=work.misses,
        seconds=time.perf_counter() - t0,
        details={"read": sorted(work.to_read), "cache_errors": work.cache_errors},
    )


WHERE = "\0where"  # the selection mask's name among the columns of a chunk


class _ChunkWork:
    """The columns of one chunk: looked up in the cache, else read or computed."""

    def __init__(self, plan: Plan, chunk: Chunk, cache: ColumnCache | None) -> None:
        self.plan = plan
        self.chunk = chunk
        self.cache = cache
        self.values: dict[str, Any] = {}
        self.to_read: list[str] = []
        self.to_compute: list[str] = []
        self.hits = self.misses = self.cache_errors = 0
        file = plan.dataset.files[chunk.file_index]
        self._address = {
            "file": file.identity_dict,
            "tree": plan.request.dataset.tree,
            "entry_start": chunk.start,
            "entry_stop": chunk.stop,
        }

    def key(self, name: str) -> str:
        from columnhub.cache import entry_key

        column = self.plan.where_fingerprint if name == WHERE else self.plan.columns[name].fingerprint
        return entry_key(**self._address, column=column)

    def resolve(self, names: list[str]) -> None:
        """Find, depth first, what must be read and computed (dependencies first)."""
        for name in names:
            if name in self.values or name in self.to_read or name in self.to_compute:
                continue
            if self.cache is not None:
                found = self.cache.get(self.key(name))
                if found is not None:
                    self.hits += 1
                    self.values[name] = found
                    continue
                self.misses += 1
            if name == WHERE:
                assert self.plan.where is not None
                self.resolve(sorted(self.plan.where.names))
                self.to_compute.append(name)
                continue
            column = self.plan.columns[name]
            if column.kind == "source":
                self.to_read.append(name)
            else:
                self.resolve(list(column.deps))
                self.to_compute.append(name)

    def compute(self) -> None:
        plan, chunk = self.plan, self.chunk
        if self.to_read:
            file = plan.dataset.files[chunk.file_index]
            read = sources.read(
                file, plan.request.dataset, self.to_read, start=chunk.start, stop=chunk.stop
            )
            for name in self.to_read:
                self._store(name, read[name])
        for name in self.to_compute:
            if name == WHERE:
                assert plan.where is not None
                result = plan.where.evaluate(self.values)
                self._store(name, selection_mask(result, text=plan.where.text))
            else:
                column = plan.columns[name]
                assert column.expression is not None
                self._store(name, column.expression.evaluate(self.values))

    def _store(self, name: str, value: Any) -> None:
        self.values[name] = value
        if self.cache is None:
            return
        try:
            self.cache.put(self.key(name), ak.Array(value) if not isinstance(value, ak.Array) else value)
        except CacheError:
            self.cache_errors += 1  # a full or unwritable cache never fails a request


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
    """Awkward columns as a plain-typed Arrow table (readable by every Parquet reader)."""
    arrays = []
    for name, value in columns.items():
        array = value if isinstance(value, ak.Array) else ak.Array(value)
        try:
            arrays.append(
                ak.to_arrow(array, extensionarray=False, list_to32=True, string_to32=True)
            )
        except Exception as err:
            msg = f"column {name!r} of type {array.type} cannot be written ({err})"
            raise ColumnhubError(msg) from err
    table = pa.Table.from_arrays(arrays, names=list(columns))
    if rows is not None and table.num_rows != rows:
        msg = f"columns have {table.num_rows} rows, expected {rows}"
        raise ColumnhubError(msg)
    return table
