"""The part task: a run of consecutive chunks computed, selected and written as one part.

:func:`run_part` reads, computes and selects each chunk of its part
(:func:`~columnhub.execute.chunk.run_chunk`) and writes the rows itself, with
a plain ``pyarrow.parquet.ParquetWriter`` (or the ROOT writer), into the
staging directory under a name fixed by the part's number. It returns only
metadata (:class:`PartMeta`): no row travels back to the caller. A pure
function of ``(plan, part, schema)``: picklable, idempotent and retryable (a
retried task replaces its own part, never another's), so it runs unchanged
in a thread pool or on Dask workers, and the bytes of a part never depend on
the executor or the number of workers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from columnhub.cache import ColumnCache, ColumnLookup
from columnhub.execute.chunk import ChunkResult, run_chunk, run_tail
from columnhub.plan import Chunk, Part, Plan

__all__ = [
    "PartMeta",
    "chunk_record",
    "column_types",
    "explode",
    "root_counters",
    "run_part",
]

#: test hook: seconds each part task sleeps before it starts (tests kill a
#: worker while its task runs); never set it outside tests
_SLEEP_ENV = "COLUMNHUB_TEST_PART_SLEEP"
#: set (in a test's Dask worker only): every part task ends its process, as an OOM kill would
_EXIT_ENV = "COLUMNHUB_TEST_PART_EXIT"


@dataclass(frozen=True)
class PartMeta:
    """What one part task did: everything the manifest needs, and no rows.

    Attributes:
        index: the part's number in the plan.
        name: the part's file name in the staging directory.
        rows: rows written (objects when the request's ``output.explode`` is set).
        bytes: the file's size.
        xxh3: the file's xxh3-64 checksum (hex).
        mtime_ns: the file's modification time.
        schema: the Arrow schema of the rows (before a writer's conversion;
            what other parts are cast to).
        columns: column name -> awkward type string, as written.
        hits: column-chunk cache hits.
        misses: column-chunk cache misses.
        events_in: events read.
        chunks: one record per chunk (the manifest's ``chunks``).
        inference: the inference metrics of its models (or ``None``).
        seconds: wall time of the task.
        events: selected events written (``rows``, unless exploded).
    """

    index: int
    name: str
    rows: int
    bytes: int
    xxh3: str
    mtime_ns: int
    schema: pa.Schema
    columns: dict[str, str]
    hits: int = 0
    misses: int = 0
    events_in: int = 0
    chunks: list[dict[str, Any]] = field(default_factory=list)
    inference: Any = None
    seconds: float = 0.0
    events: int = 0


def run_part(
    plan: Plan,
    part: Part,
    staging: str | os.PathLike[str],
    cache: ColumnCache | None = None,
    *,
    schema: pa.Schema | None = None,
    exchanged: ColumnLookup | None = None,
    fresh: Mapping[int, Collection[str]] | None = None,
) -> PartMeta:
    """Compute, select and write part ``part`` of ``plan`` into ``staging``.

    While a chunk's rows are encoded, the next chunk is read and computed on
    one more thread.

    Args:
        plan: the request's plan.
        part: one of ``plan.parts``.
        staging: the directory the part file goes to (every worker sees it).
        cache: the column cache, or ``None``.
        schema: the columns every row is cast to (the first part's: a
            right/outer tail's missing primary columns have no type of
            their own); ``None``: the first chunk's.
        exchanged: where the friend exchange stored columns that are not in
            the column cache (no cache, or a read-only one), else ``None``.
        fresh: per chunk index, the cache addresses the exchange stored for
            this request (counted as misses, not hits).

    Returns:
        The part's metadata; its file is ``staging/<name>``.
    """
    t0 = time.perf_counter()
    delay = os.environ.get(_SLEEP_ENV)
    if delay:
        time.sleep(float(delay))
    if os.environ.get(_EXIT_ENV):  # a test's worker that dies inside every part task
        os._exit(70)
    directory = Path(staging)
    writer: Any = None
    records: list[dict[str, Any]] = []
    hits = misses = events_in = events = 0
    inference: Any = None
    try:
        for result in _results(plan, part, cache, exchanged, fresh or {}):
            table = result.table
            events += table.num_rows
            if plan.request.output.explode:
                table = explode(plan, result)
            if schema is None:
                schema = table.schema
            if writer is None:
                writer = _writer(plan, directory, part.index, schema)
            writer.write(table)
            records.append(chunk_record(plan, result))
            hits += result.hits
            misses += result.misses
            events_in += result.rows_in
            metrics = result.details.get("inference")
            if metrics is not None:
                if inference is None:
                    inference = metrics
                else:
                    inference.merge(metrics)
        assert writer is not None  # a part has a chunk or is the tail
        assert schema is not None
        info = _close(writer)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    written = writer.schema if writer.schema is not None else schema
    return PartMeta(
        index=part.index,
        name=info.name,
        rows=info.rows,
        bytes=info.bytes,
        xxh3=info.xxh3,
        mtime_ns=info.mtime_ns,
        schema=schema,
        columns=column_types(written),
        hits=hits,
        misses=misses,
        events_in=events_in,
        chunks=records,
        inference=inference,
        seconds=time.perf_counter() - t0,
        events=events,
    )


def explode(plan: Plan, result: ChunkResult) -> pa.Table:
    """The selected rows of one chunk as one row per object (``output.explode``).

    Every column the request names must be a list, with the same number of
    objects as the first one in every event (a missing list counts as
    none); the lists are flattened. Columns the request does not name (event
    keys, counters added for the collections) are left out.

    Raises:
        SpecError: a requested column holds one value per event.
        JoinError: two columns have different numbers of objects in an event.
    """
    import pyarrow.compute as pc

    from columnhub.errors import JoinError, SpecError

    table = result.table
    names = list(plan.request.columns)
    flat = [n for n in names if not _is_list_type(table.schema.field(n).type)]
    if flat:
        msg = (
            f"output.explode writes one row per object, but column(s) {', '.join(flat)} hold "
            "one value per event; with explode every delivered column is a list of one "
            f"collection (Jet_pt, Jet_eta): drop {', '.join(flat)} from columns, or turn "
            "explode off"
        )
        raise SpecError(msg)
    counts = {n: pc.fill_null(pc.list_value_length(table[n]), 0) for n in names}
    first = names[0]
    for name in names[1:]:
        differ = pc.not_equal(counts[name], counts[first])
        if pc.any(differ).as_py():
            i = pc.index(differ, True).as_py()
            c = result.chunk
            where = (
                f"file {plan.dataset.files[c.file_index].path!r}, entries [{c.start}, {c.stop})"
                if "tail" not in result.details
                else "the friend rows without partner"
            )
            msg = (
                f"output.explode: columns {first!r} and {name!r} have "
                f"{counts[first][i].as_py()} and {counts[name][i].as_py()} objects in selected "
                f"event {i} of {where}; explode only lists of one collection (the same number "
                "of objects in every event), or deliver them without explode"
            )
            raise JoinError(msg)
    fields, arrays = [], []
    for name in names:
        kind = table.schema.field(name).type
        arrays.append(pc.list_flatten(table[name]))
        fields.append(pa.field(name, kind.value_type, nullable=kind.value_field.nullable))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _is_list_type(kind: pa.DataType) -> bool:
    return bool(pa.types.is_list(kind) or pa.types.is_large_list(kind))


def _results(
    plan: Plan,
    part: Part,
    cache: ColumnCache | None,
    exchanged: ColumnLookup | None,
    fresh: Mapping[int, Collection[str]],
) -> Iterator[ChunkResult]:
    """The part's chunk results in order, the next one computed while this one is written."""
    if part.tail:
        tail = run_tail(plan, cache=cache)
        assert tail is not None  # a tail part exists only for a right/outer friend
        yield tail
        return

    from columnhub._concurrency import in_context

    @in_context
    def one(chunk: Chunk) -> ChunkResult:
        return run_chunk(
            plan, chunk, cache=cache, exchanged=exchanged, fresh=fresh.get(chunk.index, ())
        )

    chunks = [plan.chunks[i] for i in part.chunks]
    if len(chunks) == 1:
        yield one(chunks[0])
        return
    with ThreadPoolExecutor(1, thread_name_prefix="columnhub-part") as pool:
        ahead: Future[ChunkResult] = pool.submit(one, chunks[0])
        try:
            for chunk in chunks[1:]:
                current = ahead.result()
                ahead = pool.submit(one, chunk)
                yield current
            yield ahead.result()
        finally:
            ahead.cancel()


def _writer(plan: Plan, directory: Path, number: int, schema: pa.Schema) -> Any:
    output = plan.request.output
    if output.format == "root":
        from columnhub.output.root import RootPartWriter

        return RootPartWriter(
            directory,
            target_bytes=None,
            number=number,
            counters=root_counters(plan, schema),
            schema=schema,
        )
    from columnhub.output.parquet import ParquetPart

    return ParquetPart(directory, number, schema=schema, compression=output.compression)


def _close(writer: Any) -> Any:
    from columnhub.output.parquet import ParquetPart

    if isinstance(writer, ParquetPart):
        return writer.close()
    parts = writer.close()
    assert len(parts) == 1
    return parts[0]


def root_counters(plan: Plan, schema: pa.Schema) -> dict[str, list[str]]:
    """Counter branch -> the jagged columns it counts, from the plan (the same in every part).

    A jagged column of a delivered NanoAOD collection shares the collection's
    counter (the plan checks their lengths agree in every event), except the
    lists of a file without counters whose lengths need not agree (only the
    list the counter is computed from shares it). Any other jagged column
    is grouped by its name as the writer alone groups it: the lists of one
    collection (``good_pt``, ``good_eta``) share ``n`` + the collection
    (``ngood``; the writer refuses an event where their lengths differ), a
    list of no collection gets ``n`` + its name.
    """
    from columnhub.join.collection import collection_of

    by_column: dict[str, str] = {}
    for counter, members in plan.collections.items():
        counted = plan.columns[counter].source.get("counts")
        for name in members:
            kind = plan.columns[name].kind
            if counted is not None and name != counted and kind in ("source", "friend"):
                by_column[name] = "n" + name  # lengths need not agree: a counter of its own
                continue
            by_column[name] = counter
    counters: dict[str, list[str]] = {}
    for f in schema:
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            own = "n" + (collection_of(f.name) or f.name)
            counters.setdefault(by_column.get(f.name, own), []).append(f.name)
    return counters


def column_types(schema: pa.Schema | None) -> dict[str, str]:
    """Column name -> awkward type string (``var * float32``, ``?float32``)."""
    if schema is None:
        return {}
    import awkward as ak

    form = ak.from_arrow_schema(schema)
    return {name: str(form.content(name).type) for name in form.fields}


def chunk_record(plan: Plan, result: ChunkResult) -> dict[str, Any]:
    """The manifest's record of one chunk (or of a right/outer tail)."""
    c = result.chunk
    if "tail" in result.details:
        return {
            "tail_of_friend": result.details["tail"],
            "friend_rows_without_partner": result.details["friend_rows"],
            "rows_out": result.table.num_rows,
            "seconds": round(result.seconds, 6),
        }
    return {
        "file": plan.dataset.files[c.file_index].path,
        "entry_start": c.start,
        "entry_stop": c.stop,
        "rows_in": result.rows_in,
        "rows_out": result.table.num_rows,
        "cache_hits": result.hits,
        "cache_misses": result.misses,
        "read": result.details.get("read", []),
        "friend_entries_read": result.details.get("friend_entries_read", 0),
        "friend_bytes": result.details.get("friend_bytes", {}),
        "seconds": round(result.seconds, 6),
    }
