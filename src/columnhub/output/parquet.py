"""Parquet writer: parts sized by bytes, written atomically (temp file + rename).

pyarrow encodes one file on one thread, and encoding Parquet costs more CPU
than reading the ROOT input. So every table (a chunk's rows) is encoded on
its own, in a pool of threads (pyarrow releases the GIL), into a complete
in-memory Parquet file; the writer then appends those files' row groups, in
order, to the part being written, moving their byte offsets and merging
their footers (:mod:`columnhub.output._thrift`, checked to round-trip every
footer byte for byte). A part is cut after the table that takes it to
``target_bytes``, by its real size, so the same rows always give the same
bytes, however many threads encode.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from columnhub._checksum import file_checksum
from columnhub.errors import OutputError
from columnhub.output import _thrift

__all__ = [
    "PartInfo",
    "PartWriter",
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
    """The hidden temporary path a part is written under (``.part-NNNNN.<suffix>.tmp-PID``)."""
    return directory / f".part-{number:05d}.{suffix}.tmp-{os.getpid()}"


def publish_part(tmp: Path, rows: int) -> PartInfo:
    """Rename a finished part from its temporary name to its final one (atomic)."""
    final = tmp.parent / tmp.name[1:].rsplit(".tmp-", 1)[0]
    os.replace(tmp, final)
    stat = final.stat()
    return PartInfo(final.name, rows, stat.st_size, file_checksum(final), stat.st_mtime_ns)


def writer_options(schema: pa.Schema, compression: str | None) -> dict[str, Any]:
    """The ``pq.ParquetWriter`` options every part is written with.

    Dictionary encoding pays for top-level integer columns (run, lumi: few
    values), not for floats, where it is tried and abandoned at a cost. Every
    float32/float64 leaf (flat, or the ``.list.element`` of a jagged column, at
    any depth) is written BYTE_STREAM_SPLIT: its bytes regrouped by position
    before compression, which encodes faster and compresses physics floats
    much better than PLAIN. It is a standard Parquet encoding (pyarrow,
    awkward, polars, DuckDB and Spark read it).
    """
    integers = [f.name for f in schema if pa.types.is_integer(f.type)]
    return {
        "compression": compression,
        "use_dictionary": integers,
        "column_encoding": {path: "BYTE_STREAM_SPLIT" for path in float_leaves(schema, integers)}
        or None,
        "write_statistics": True,
        "write_page_index": False,  # page indexes hold file offsets the stitching cannot move
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


_MAGIC = b"PAR1"
# FileMetaData, RowGroup, ColumnChunk and ColumnMetaData field ids (parquet.thrift)
_FMD_NUM_ROWS, _FMD_ROW_GROUPS, _FMD_ENCRYPTION = 3, 4, 8
_RG_COLUMNS, _RG_FILE_OFFSET, _RG_ORDINAL = 1, 5, 7
_CC_FILE_OFFSET, _CC_META = 2, 3
_CC_UNMOVABLE = {4: "an offset index", 6: "a column index", 8: "encryption", 9: "encryption"}
#: ColumnMetaData offsets: data, index and dictionary pages, bloom filter
_CMD_OFFSETS = (9, 10, 11, 14)


@dataclass
class _Encoded:
    """One table encoded as a complete Parquet file in memory."""

    buffer: pa.Buffer
    body: memoryview  # between the leading magic and the footer: the row groups
    meta: _thrift.Struct  # the FileMetaData
    rows: int


def _encode(table: pa.Table, schema: pa.Schema, options: dict[str, Any]) -> _Encoded:
    """Encode ``table`` alone (a pool thread): one row group per million rows."""
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, schema, **options) as writer:
        writer.write_table(table)
    buffer = sink.getvalue()
    data = memoryview(buffer).cast("B")
    n = struct.unpack("<i", data[-8:-4])[0]
    if data[:4] != _MAGIC or data[-4:] != _MAGIC or not 0 < n <= len(data) - 12:
        msg = "pyarrow wrote a Parquet file without the expected magic bytes"
        raise OutputError(msg)
    try:
        meta = _thrift.decode(data[-8 - n : -8], verify=True)
    except _thrift.ThriftError as err:
        msg = (
            f"cannot read back the footer pyarrow {pa.__version__} wrote ({err}); the part "
            "writer needs it to join row groups. Please report this with your pyarrow version"
        )
        raise OutputError(msg) from err
    if meta.get(_FMD_ENCRYPTION) is not None:
        msg = "encrypted Parquet footers cannot be joined"
        raise OutputError(msg)
    return _Encoded(buffer, data[4 : len(data) - 8 - n], meta, table.num_rows)


def _row_groups(meta: _thrift.Struct) -> list[_thrift.Struct]:
    groups = meta.get(_FMD_ROW_GROUPS)
    return [] if groups is None else list(groups.value.values)


def _move(group: _thrift.Struct, delta: int, ordinal: int) -> None:
    """Shift every file offset in one row group's metadata by ``delta`` bytes."""
    for f in group.fields:
        if f.id == _RG_FILE_OFFSET:
            f.value += delta
        elif f.id == _RG_ORDINAL:
            f.value = ordinal
    columns = group.get(_RG_COLUMNS)
    for chunk in [] if columns is None else columns.value.values:
        for f in chunk.fields:
            if f.id in _CC_UNMOVABLE:
                msg = f"a column chunk with {_CC_UNMOVABLE[f.id]} cannot be moved to another file"
                raise OutputError(msg)
            if f.id == _CC_FILE_OFFSET and f.value:  # deprecated; pyarrow writes 0
                f.value += delta
            elif f.id == _CC_META:
                for g in f.value.fields:
                    if g.id in _CMD_OFFSETS:
                        g.value += delta


class _Part:
    """One part being written: a hidden temporary file the row groups are appended to."""

    def __init__(self, directory: Path, number: int) -> None:
        self.number = number
        self.tmp = part_path(directory, number, "parquet")
        self.rows = 0
        self.size = len(_MAGIC)
        self._meta: _thrift.Struct | None = None
        self._schema_bytes = b""
        self._groups: list[_thrift.Struct] = []
        self._file = open(self.tmp, "wb")  # noqa: SIM115  (closed in finish/discard)
        try:
            self._file.write(_MAGIC)
        except BaseException:
            self.discard()
            raise

    def append(self, encoded: _Encoded) -> None:
        """Append one encoded table's row groups."""
        schema = encoded.meta.get(2)
        schema_bytes = _thrift.encode(_thrift.Struct([schema])) if schema else b""
        if self._meta is None:
            self._meta, self._schema_bytes = encoded.meta, schema_bytes
        elif schema_bytes != self._schema_bytes:
            msg = "tables with different Parquet schemas cannot share a part"
            raise OutputError(msg)
        delta = self.size - len(_MAGIC)
        for group in _row_groups(encoded.meta):
            _move(group, delta, len(self._groups))
            self._groups.append(group)
        self._file.write(encoded.body)
        self.size += len(encoded.body)
        self.rows += encoded.rows

    def finish(self) -> PartInfo:
        """Write the merged footer, close and publish the part."""
        assert self._meta is not None
        fields = []
        for f in self._meta.fields:
            if f.id == _FMD_NUM_ROWS:
                f = _thrift.Field(f.id, f.type, self.rows, f.long_header)
            elif f.id == _FMD_ROW_GROUPS:
                groups = _thrift.Container(_thrift.LIST, _thrift.STRUCT, self._groups)
                f = _thrift.Field(f.id, f.type, groups, f.long_header)
            fields.append(f)
        footer = _thrift.encode(_thrift.Struct(fields))
        self._file.write(footer + struct.pack("<i", len(footer)) + _MAGIC)
        self._file.close()
        return publish_part(self.tmp, self.rows)

    def discard(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


class PartWriter:
    """Writes tables in order into ``part-NNNNN.parquet`` files of about ``target_bytes``.

    Each part is written under a hidden temporary name and renamed when
    complete, so a reader never sees a half-written part. A part is cut after
    the table that takes it past ``target_bytes``.

    :meth:`write` hands each table to a pool of ``threads`` encoder threads
    and appends the encoded tables, in order, as they are ready; at most
    ``queued`` tables are being encoded or waiting (memory stays bounded):
    beyond that, :meth:`write` waits for the oldest. An encoding error is
    raised by :meth:`write` or :meth:`close`; :meth:`abort` deletes the
    unfinished part. Neither leaves a thread running.
    """

    def __init__(
        self,
        directory: Path,
        *,
        target_bytes: int,
        compression: str = "zstd",
        threads: int | None = None,
        queued: int | None = None,
    ) -> None:
        self.directory = directory
        self.target_bytes = target_bytes
        self.compression = None if compression == "none" else compression
        self.threads = threads or max(1, min(8, len(os.sched_getaffinity(0))))
        self.queued = max(1, queued or self.threads + 1)
        self.schema: pa.Schema | None = None
        self.parts: list[PartInfo] = []
        self._options: dict[str, Any] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future[_Encoded]] = deque()
        self._part: _Part | None = None
        self._accepted = 0
        self._aborted = False

    def write(self, table: pa.Table) -> None:
        """Queue ``table`` to be appended; a new part starts once the current one is big enough."""
        self._check_open()
        if self.schema is None:
            self.schema = table.schema
            self._options = writer_options(self.schema, self.compression)
        if table.num_rows == 0:
            return  # no rows, no row group; close() writes the columns of an empty result
        try:
            table = table.cast(self.schema)
        except pa.ArrowException as err:  # invalid or unsupported cast
            msg = (
                f"a chunk's columns have types {table.schema} that differ from the first "
                f"chunk's {self.schema}; this is a bug in a column provider ({err})"
            )
            raise OutputError(msg) from err
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="columnhub-parquet")
        self._pending.append(self._pool.submit(_encode, table, self.schema, self._options))
        self._accepted += 1
        # append what is ready, in order; wait for the oldest when too many are queued
        while self._pending and (len(self._pending) > self.queued or self._pending[0].done()):
            self._append(self._pending.popleft())

    def close(self) -> list[PartInfo]:
        """Finish the last part; returns every part written."""
        self._check_open()
        try:
            while self._pending:
                self._append(self._pending.popleft())
            if self.schema is not None and not self._accepted:
                # an empty result still has its columns
                self._accepted = 1
                self._append_encoded(_encode(self.schema.empty_table(), self.schema, self._options))
            if self._part is not None:
                part, self._part = self._part, None
                self.parts.append(part.finish())
        except BaseException:
            self.abort()
            raise
        self._shutdown()
        return self.parts

    def abort(self) -> None:
        """Stop, deleting the unfinished part (finished ones stay, listed in :attr:`parts`)."""
        self._aborted = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._shutdown()
        if self._part is not None:
            self._part.discard()
            self._part = None

    def _check_open(self) -> None:
        if self._aborted:
            msg = "this part writer was aborted; it writes nothing more"
            raise OutputError(msg)

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _append(self, future: Future[_Encoded]) -> None:
        try:
            encoded = future.result()
        except BaseException:
            self.abort()
            raise
        self._append_encoded(encoded)

    def _append_encoded(self, encoded: _Encoded) -> None:
        try:
            if self._part is None:
                self._part = _Part(self.directory, len(self.parts))
            self._part.append(encoded)
            if self._part.size >= self.target_bytes:
                part, self._part = self._part, None
                self.parts.append(part.finish())
        except BaseException:
            self.abort()
            raise
