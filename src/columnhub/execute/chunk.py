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
from columnhub.errors import ColumnhubError, ExpressionError
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


def run_chunk(plan: Plan, chunk: Chunk) -> ChunkResult:
    """Compute, select and convert the output columns of ``chunk``."""
    t0 = time.perf_counter()
    file = plan.dataset.files[chunk.file_index]
    spec = plan.request.dataset
    values: dict[str, Any] = sources.read(
        file, spec, plan.source_columns, start=chunk.start, stop=chunk.stop
    )
    for name, column in plan.columns.items():
        if column.kind == "define":
            assert column.expression is not None
            values[name] = column.expression.evaluate(values)
    outputs = {name: values[name] for name in plan.outputs}
    if plan.where is not None:
        mask = selection_mask(plan.where.evaluate(values), text=plan.where.text)
        outputs = {name: array[mask] for name, array in outputs.items()}
    table = to_arrow_table(outputs, rows=chunk.entries if plan.where is None else None)
    return ChunkResult(
        chunk=chunk,
        table=table,
        rows_in=chunk.entries,
        seconds=time.perf_counter() - t0,
    )


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
