"""Parquet writer: one output part, written atomically (temp file + rename).

A part task (:func:`columnhub.execute.part.run_part`) writes its own part
with a plain ``pyarrow.parquet.ParquetWriter``, one row group per chunk. Parts
are encoded in parallel because part tasks run in parallel; which rows go
into which part comes from the plan, so the same request always gives the
same bytes, whatever the executor and number of workers.
"""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from columnhub._checksum import file_checksum
from columnhub.errors import OutputError
from columnhub.output.manifest import fsync_path

__all__ = [
    "ParquetPart",
    "PartInfo",
    "conform",
    "file_checksum",
    "float_leaves",
    "part_path",
    "publish_part",
    "writer_options",
]


@dataclass(frozen=True)
class PartInfo:
    """One finished part file, with its size and content checksum (xxh3-64, hex)."""

    name: str
    rows: int
    bytes: int
    xxh3: str
    mtime_ns: int


def part_path(directory: Path, number: int, suffix: str) -> Path:
    """The hidden temporary path a part is written under (``.part-NNNNN.<suffix>.tmp-...``).

    Unique to this writer (process id and a random token): a retried task
    on another worker never writes into the file of an attempt still running.
    """
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    return directory / f".part-{number:05d}.{suffix}.tmp-{token}"


def publish_part(tmp: Path, rows: int, *, xxh3: str | None = None) -> PartInfo:
    """Rename a finished part from its temporary name to its final one (atomic).

    A retried task replaces its own part (same number), never another's.
    ``xxh3``: the file's checksum if the writer computed it while writing
    (else the file is read back to compute it).
    """
    final = tmp.parent / tmp.name[1:].rsplit(".tmp-", 1)[0]
    # on disk here, in the part task, while other parts are still being written:
    # publishing the result then finds nothing left to flush (one fsync per part
    # at the end, one after another, took ~30 ms for 45 MB)
    fsync_path(tmp)
    os.replace(tmp, final)
    stat = final.stat()
    digest = xxh3 if xxh3 is not None else file_checksum(final)
    return PartInfo(final.name, rows, stat.st_size, digest, stat.st_mtime_ns)


class _HashingFile(io.RawIOBase):
    """A file written once, front to back, that hashes (xxh3-64) every byte it writes.

    The part's checksum comes out of the write itself: the part is not read
    back to compute it.
    """

    def __init__(self, path: Path) -> None:
        import xxhash

        super().__init__()
        self._file = open(path, "xb")  # noqa: SIM115 - closed by close()
        self._digest = xxhash.xxh3_64()
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._digest.update(view)
        self._file.write(view)
        self._size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes first
            self._file.close()

    def hexdigest(self) -> str:
        """The checksum of every byte written so far."""
        return str(self._digest.hexdigest())


def writer_options(schema: pa.Schema, compression: str | None) -> dict[str, Any]:
    """The ``pq.ParquetWriter`` options every part is written with.

    Dictionary encoding pays for top-level integer columns of up to 32 bits
    (run, lumi, counts: few values), not for floats, where it is tried and
    abandoned at a cost. Top-level 64-bit integers (event numbers, ids: unique,
    nearly sorted) are written DELTA_BINARY_PACKED instead: a dictionary there
    is built and abandoned (6x the CPU), deltas encode them faster and smaller.
    Every float32/float64 leaf (flat, or the ``.list.element`` of a jagged
    column, at any depth) is written BYTE_STREAM_SPLIT: its bytes regrouped by
    position before compression, which encodes faster and compresses physics
    floats much better than PLAIN. Both are standard Parquet encodings
    (pyarrow, awkward, polars, DuckDB and Spark read them).
    """
    integers = [f.name for f in schema if pa.types.is_integer(f.type)]
    wide = [f.name for f in schema if f.type in (pa.int64(), pa.uint64())]
    encodings = {path: "BYTE_STREAM_SPLIT" for path in float_leaves(schema, integers)}
    encodings.update(dict.fromkeys(wide, "DELTA_BINARY_PACKED"))
    return {
        "compression": compression,
        "use_dictionary": [n for n in integers if n not in wide],
        "column_encoding": encodings or None,
        "write_statistics": True,
    }


def float_leaves(schema: pa.Schema, exclude: Collection[str] = ()) -> list[str]:
    """The Parquet paths (``Jet_pt.list.element``) of ``schema``'s FLOAT/DOUBLE leaves.

    Taken from the Parquet schema pyarrow itself derives (an empty file
    written to memory), so nested names are exactly the writer's.
    """
    sink = pa.BufferOutputStream()
    pq.ParquetWriter(sink, schema).close()
    parquet_schema = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    columns = (parquet_schema.column(i) for i in range(len(parquet_schema)))
    return [
        c.path for c in columns if c.physical_type in ("FLOAT", "DOUBLE") and c.path not in exclude
    ]


class ParquetPart:
    """One ``part-NNNNN.parquet`` being written with a plain ``pq.ParquetWriter``.

    Every table becomes row groups of the part, in order. The file is written
    under a hidden temporary name and renamed when complete (:meth:`close`),
    so a reader never sees a half-written part; :meth:`abort` deletes it.

    Args:
        directory: where the part goes (a staging directory).
        number: the part's number (its name).
        schema: the part's columns; every table is cast to it.
        compression: a Parquet codec, or ``"none"``.
    """

    def __init__(
        self, directory: Path, number: int, *, schema: pa.Schema, compression: str = "zstd"
    ) -> None:
        self.schema = schema
        self.rows = 0
        self._tmp = part_path(directory, number, "parquet")
        options = writer_options(schema, None if compression == "none" else compression)
        self._sink = _HashingFile(self._tmp)
        try:
            self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self._sink, schema, **options)
        except BaseException:
            self._sink.close()
            self._tmp.unlink(missing_ok=True)
            raise

    def write(self, table: pa.Table) -> None:
        """Append ``table``'s rows (cast to the part's schema)."""
        if self._writer is None:
            msg = "this part is closed or aborted; it takes no more rows"
            raise OutputError(msg)
        if table.num_rows == 0:
            return
        self._writer.write_table(conform(table, self.schema))
        self.rows += table.num_rows

    def close(self) -> PartInfo:
        """Finish the part (an empty one still holds its columns) and publish it."""
        assert self._writer is not None
        writer, self._writer = self._writer, None
        try:
            writer.close()
            self._sink.close()
        except BaseException:
            self._sink.close()
            self._tmp.unlink(missing_ok=True)
            raise
        return publish_part(self._tmp, self.rows, xxh3=self._sink.hexdigest())

    def abort(self) -> None:
        """Stop and delete the unfinished part."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            finally:
                self._sink.close()
                self._tmp.unlink(missing_ok=True)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` cast to ``schema`` (a right/outer tail's null-typed columns, nullability)."""
    if table.schema == schema:
        return table
    try:
        return table.cast(schema)
    except (pa.ArrowException, ValueError) as err:
        msg = (
            f"a chunk's columns have types {table.schema} that differ from the first "
            f"chunk's {schema}; this is a bug in a column provider ({err})"
        )
        raise OutputError(msg) from err
