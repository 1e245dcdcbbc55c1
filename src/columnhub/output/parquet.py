"""Parquet writer: parts sized by bytes, written atomically (temp file + rename).

Encoding runs in background threads, so the stream of chunk results never
waits for it, and two parts are encoded at once when the output spans several
(the encoder releases the GIL). Which table goes to which part depends only on
the sequence of tables, never on timing: the same rows give the same bytes.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Collection
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from columnhub.errors import OutputError

__all__ = [
    "PartInfo",
    "PartWriter",
    "file_checksum",
    "float_leaves",
    "part_path",
    "publish_part",
    "table_bytes",
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


def table_bytes(table: pa.Table) -> int:
    """The size of ``table``'s values in bytes, whatever its buffer layout.

    A sum over rows (values and offsets; validity bitmaps left out), so the
    offsets of slices and the split into chunks change nothing: the same rows
    always give the same number, which later parts are cut by.
    """
    return sum(_bits(chunk) for column in table.columns for chunk in column.chunks) // 8


def _bits(array: pa.Array) -> int:
    kind = array.type
    n = len(array)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return n * (64 if pa.types.is_large_list(kind) else 32) + _bits(array.flatten())
    if pa.types.is_fixed_size_list(kind):
        return _bits(array.flatten())
    if pa.types.is_struct(kind):
        return sum(_bits(array.field(i)) for i in range(kind.num_fields))
    if pa.types.is_string(kind) or pa.types.is_binary(kind):
        return n * 32 + 8 * int(pc.sum(pc.binary_length(array)).as_py() or 0)
    if pa.types.is_large_string(kind) or pa.types.is_large_binary(kind):
        return n * 64 + 8 * int(pc.sum(pc.binary_length(array)).as_py() or 0)
    try:
        return n * int(kind.bit_width)
    except ValueError:  # maps, unions, ...: Arrow's own count, which honours slices
        return 8 * int(array.nbytes)


_END = object()  # the end of the tables, for a part or for the writer


class _Part:
    """One part being written: its hidden temporary file and its ParquetWriter."""

    def __init__(self, directory: Path, number: int, schema: pa.Schema, options: dict[str, Any]):
        self.number = number
        self.tmp = part_path(directory, number, "parquet")
        self.rows = 0
        self._sink = pa.OSFile(str(self.tmp), "wb")  # native file: writes without the GIL
        try:
            self._writer = pq.ParquetWriter(self._sink, schema, **options)
        except BaseException:
            self._sink.close()
            self.tmp.unlink(missing_ok=True)
            raise

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)
        self.rows += table.num_rows

    def tell(self) -> int:
        return int(self._sink.tell())

    def finish(self) -> PartInfo:
        self._writer.close()
        self._sink.close()
        return publish_part(self.tmp, self.rows)

    def discard(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001, S110  (the file is deleted anyway)
            pass
        finally:
            self._sink.close()
            self.tmp.unlink(missing_ok=True)


class PartWriter:
    """Writes tables in order into ``part-NNNNN.parquet`` files of about ``target_bytes``.

    Each part is written under a hidden temporary name and renamed when
    complete, so a reader never sees a half-written part.

    :meth:`write` only checks a table's types and queues it; a background
    thread encodes. The first part is written table by table and cut at its
    real size, as a single-threaded writer would; it also measures how many
    file bytes a byte of Arrow values takes. Each later part is cut once that
    ratio says it reached ``target_bytes`` (the ratio taken from the parts
    finished before, in a fixed way), and is encoded in a thread of its own,
    at most ``parallel`` parts at once. At most ``queued`` tables wait to be
    encoded: :meth:`write` blocks while they do, so memory stays bounded.

    An error while encoding is raised by the next :meth:`write` or by
    :meth:`close`; :meth:`abort` deletes every unfinished part. Neither leaves
    a thread running.
    """

    def __init__(
        self,
        directory: Path,
        *,
        target_bytes: int,
        compression: str = "zstd",
        parallel: int = 2,
        queued: int = 2,
    ) -> None:
        self.directory = directory
        self.target_bytes = target_bytes
        self.compression = None if compression == "none" else compression
        self.parallel = max(1, parallel)
        self.schema: pa.Schema | None = None
        self.parts: list[PartInfo] = []
        self._options: dict[str, Any] = {}
        self._empty_bytes = 0  # the size of a part without rows: its fixed cost
        self._accepted = 0
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._room = threading.Semaphore(max(1, queued))  # tables queued and not yet encoding
        self._stop = threading.Event()  # an error, or abort(): drop what is left
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._open: dict[int, _Part] = {}  # being written
        self._done: dict[int, tuple[PartInfo, int]] = {}  # finished: info, table_bytes

    # -- the driver's side --------------------------------------------------

    def write(self, table: pa.Table) -> None:
        """Queue ``table`` to be appended; a new part starts once the current one is big enough."""
        self._raise_error()
        if self.schema is None:
            self.schema = table.schema
        if table.num_rows == 0 and self._accepted:
            return
        try:
            table = table.cast(self.schema)
        except pa.ArrowException as err:  # invalid or unsupported cast
            msg = (
                f"a chunk's columns have types {table.schema} that differ from the first "
                f"chunk's {self.schema}; this is a bug in a column provider ({err})"
            )
            raise OutputError(msg) from err
        if self._thread is None:
            self._start()
        self._room.acquire()  # an encoding error releases it too
        self._raise_error()
        self._inbox.put(table)
        self._accepted += 1

    def close(self) -> list[PartInfo]:
        """Finish the last part; returns every part written."""
        if self._thread is not None:
            self._inbox.put(_END)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            self.abort()
            raise self._error
        self._raise_error()  # aborted before
        if self.schema is not None and not self._accepted and not self._done:
            self._options = writer_options(self.schema, self.compression)
            self._finish(self._open_part(0))  # an empty result still has its columns
        self.parts = self._finished()
        return self.parts

    def abort(self) -> None:
        """Stop, deleting every unfinished part (finished ones stay, listed in :attr:`parts`)."""
        self._stop.set()
        if self._thread is not None:
            self._inbox.put(_END)
            self._thread.join()
            self._thread = None
        while True:  # tables nobody will encode
            try:
                self._inbox.get_nowait()
            except queue.Empty:
                break
        with self._lock:
            unfinished = list(self._open.values())
            self._open.clear()
        for part in unfinished:
            part.discard()
        self.parts = self._finished()

    def _start(self) -> None:
        assert self.schema is not None
        self._options = writer_options(self.schema, self.compression)
        sink = pa.BufferOutputStream()
        pq.ParquetWriter(sink, self.schema, **self._options).close()
        self._empty_bytes = sink.getvalue().size
        self._thread = threading.Thread(
            target=self._dispatch, name="columnhub-parquet-writer", daemon=True
        )
        self._thread.start()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stop.is_set():
            msg = "this part writer was aborted; it writes nothing more"
            raise OutputError(msg)

    def _finished(self) -> list[PartInfo]:
        with self._lock:
            return [self._done[n][0] for n in sorted(self._done)]

    # -- the background side ------------------------------------------------

    def _dispatch(self) -> None:
        """Deal the queued tables out to parts, in order (the writer thread)."""
        first: _Part | None = None  # part 0, written here and cut at its real size
        first_bytes = 0
        cut_first = False
        current: tuple[int, threading.Thread, queue.SimpleQueue[Any]] | None = None
        current_bytes = 0
        ratio = 1.0
        number = 1  # of the next later part
        active: deque[tuple[int, threading.Thread]] = deque()
        try:
            while (table := self._inbox.get()) is not _END:
                if self._stop.is_set():
                    self._room.release()
                    continue
                size = table_bytes(table)
                if not cut_first:
                    self._room.release()
                    if first is None:
                        first = self._open_part(0)
                    first.write(table)
                    del table
                    first_bytes += size
                    if first.tell() >= self.target_bytes:
                        self._finish(first, first_bytes)
                        first, cut_first = None, True
                    continue
                if current is None:
                    # parts up to number - parallel are finished before this one
                    # starts, so the ratio comes from the same parts in every run
                    while active and active[0][0] <= number - self.parallel:
                        active.popleft()[1].join()
                    if self._stop.is_set():  # that part failed
                        self._room.release()
                        continue
                    ratio = self._ratio(max(0, number - self.parallel))
                    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
                    thread = threading.Thread(
                        target=self._encode,
                        args=(number, inbox),
                        name=f"columnhub-parquet-part-{number}",
                        daemon=True,
                    )
                    thread.start()
                    active.append((number, thread))
                    current, current_bytes = (number, thread, inbox), 0
                    number += 1
                current[2].put(table)
                del table
                current_bytes += size
                if self._empty_bytes + ratio * current_bytes >= self.target_bytes:
                    self._close_part(current, current_bytes)
                    current = None
            if first is not None and not self._stop.is_set():
                self._finish(first, first_bytes)
                first = None
        except BaseException as err:  # noqa: BLE001  (raised in the driver)
            self._fail(err)
        finally:
            if current is not None:
                self._close_part(current, current_bytes)
            if first is not None:
                self._discard(first)
            for _, thread in active:
                thread.join()

    @staticmethod
    def _close_part(part: tuple[int, threading.Thread, queue.SimpleQueue[Any]], size: int) -> None:
        """No more tables for ``part``; its Arrow values came to ``size`` bytes."""
        part[2].put((_END, size))

    def _encode(self, number: int, inbox: queue.SimpleQueue[Any]) -> None:
        """Write the tables of one later part (a part thread)."""
        part: _Part | None = None
        end: tuple[object, int] | None = None
        try:
            while not isinstance(item := inbox.get(), tuple):
                self._room.release()
                if self._stop.is_set():
                    continue
                if part is None:
                    part = self._open_part(number)
                part.write(item)
                del item
            end = item
            if part is not None and not self._stop.is_set():
                self._finish(part, end[1])
                part = None
        except BaseException as err:  # noqa: BLE001  (raised in the driver)
            self._fail(err)
            while end is None:  # the rest of this part's tables: free their room
                if isinstance(item := inbox.get(), tuple):
                    end = item
                else:
                    self._room.release()
        finally:
            if part is not None:
                self._discard(part)

    def _ratio(self, upto: int) -> float:
        """File bytes per byte of Arrow values, beyond a part's fixed cost, in parts 0..upto."""
        with self._lock:
            done = [self._done[n] for n in range(upto + 1)]
        written = sum(info.bytes - self._empty_bytes for info, _ in done)
        values = sum(size for _, size in done)
        return max(written, 1) / max(values, 1)

    def _open_part(self, number: int) -> _Part:
        assert self.schema is not None
        part = _Part(self.directory, number, self.schema, self._options)
        with self._lock:
            self._open[number] = part
        return part

    def _finish(self, part: _Part, size: int = 0) -> None:
        info = part.finish()
        with self._lock:
            self._open.pop(part.number, None)
            self._done[part.number] = (info, size)

    def _discard(self, part: _Part) -> None:
        with self._lock:
            mine = self._open.pop(part.number, None) is not None
        if mine:  # abort() may have discarded it already
            part.discard()

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = err
        self._stop.set()
        self._room.release()  # a write() waiting for room wakes up and raises
