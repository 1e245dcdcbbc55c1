"""Parquet writer: parts sized by bytes, written atomically (temp file + rename)."""

from __future__ import annotations

import os
from collections.abc import Collection
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from columnhub.errors import OutputError

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


def file_checksum(path: Path, *, copy_to: Path | None = None) -> str:
    """The xxh3-64 digest of a file's bytes (hex), read in 16 MiB blocks.

    With ``copy_to``, the bytes are also written there: a copy and its
    verification in one pass.
    """
    import xxhash

    digest = xxhash.xxh3_64()
    with open(path, "rb") as f, open(copy_to, "wb") if copy_to else nullcontext() as out:
        while block := f.read(16 * 1024 * 1024):
            digest.update(block)
            if out is not None:
                out.write(block)
    return digest.hexdigest()


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


class PartWriter:
    """Writes tables in order into ``part-NNNNN.parquet`` files of about ``target_bytes``.

    Each part is written under a hidden temporary name and renamed when
    complete, so a reader never sees a half-written part.
    """

    def __init__(self, directory: Path, *, target_bytes: int, compression: str = "zstd") -> None:
        self.directory = directory
        self.target_bytes = target_bytes
        self.compression = None if compression == "none" else compression
        self.schema: pa.Schema | None = None
        self.parts: list[PartInfo] = []
        self._writer: pq.ParquetWriter | None = None
        self._sink: Any = None
        self._tmp: Path | None = None
        self._rows = 0

    def _open(self) -> None:
        assert self.schema is not None
        self._tmp = part_path(self.directory, len(self.parts), "parquet")
        self._sink = open(self._tmp, "wb")  # noqa: SIM115  (closed in _finish)
        self._writer = pq.ParquetWriter(
            self._sink, self.schema, **writer_options(self.schema, self.compression)
        )
        self._rows = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        assert self._tmp is not None
        self.parts.append(publish_part(self._tmp, self._rows))
        self._writer = None
        self._tmp = None

    def write(self, table: pa.Table) -> None:
        """Append ``table``; start a new part once the current one is big enough."""
        if self.schema is None:
            self.schema = table.schema
        if table.num_rows == 0 and (self._writer is not None or self.parts):
            return
        try:
            table = table.cast(self.schema)
        except pa.ArrowException as err:  # invalid or unsupported cast
            msg = (
                f"a chunk's columns have types {table.schema} that differ from the first "
                f"chunk's {self.schema}; this is a bug in a column provider ({err})"
            )
            raise OutputError(msg) from err
        if self._writer is None:
            self._open()
        assert self._writer is not None
        self._writer.write_table(table)
        self._rows += table.num_rows
        if self._sink.tell() >= self.target_bytes:
            self._finish()

    def close(self) -> list[PartInfo]:
        """Finish the last part; returns every part written."""
        if self._writer is None and not self.parts and self.schema is not None:
            self._open()  # an empty result still has its columns
        self._finish()
        return self.parts

    def abort(self) -> None:
        """Drop the part being written (finished parts stay, listed in :attr:`parts`)."""
        if self._writer is not None:
            try:
                self._writer.close()
                self._sink.close()
            finally:
                if self._tmp is not None:
                    self._tmp.unlink(missing_ok=True)
                self._writer = None
