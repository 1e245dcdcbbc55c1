"""Parquet source (pyarrow), e.g. a columnhub result used as a friend dataset."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

import awkward as ak
import numpy as np
import pyarrow.parquet as pq
import xxhash

from columnhub.datasets import FileInfo, is_url, local_stamp, remote_stamp
from columnhub.errors import CorruptFileError, DatasetFileNotFoundError
from columnhub.spec import DatasetSpec

__all__ = ["current_check", "describe", "footer_hash", "read"]


def _open(path: str) -> pq.ParquetFile:
    if is_url(path):
        import fsspec

        return pq.ParquetFile(fsspec.open(path, "rb").open())
    return pq.ParquetFile(path)


def footer_hash(path: str) -> str | None:
    """The xxh3-64 digest of a local Parquet file's footer (its metadata), or ``None``.

    The footer holds every row group's offsets, sizes and column statistics,
    so a file rewritten with other values almost surely has another footer,
    even with the same size and modification time. Two small reads.
    """
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            if size < 12:
                return None
            handle.seek(size - 8)
            length, magic = struct.unpack("<I4s", handle.read(8))
            if magic != b"PAR1" or length > size - 12:
                return None
            handle.seek(size - 8 - length)
            return xxhash.xxh3_64_hexdigest(handle.read(length))
    except OSError:
        return None


def current_check(file: FileInfo, spec: DatasetSpec) -> dict[str, object]:
    """The fields of ``file.check`` as the file is now (empty when it is gone)."""
    if is_url(file.path):
        return remote_stamp(file.path, timeout=spec.timeout)
    try:
        now: dict[str, object] = dict(local_stamp(file.path))
    except OSError:
        return {}
    now["footer"] = footer_hash(file.path)
    return now


def describe(path: str, spec: DatasetSpec) -> tuple[FileInfo, dict[str, str]]:
    """Identity, rows, row-group boundaries and columns of one Parquet file."""
    try:
        meta = _open(path)
    except FileNotFoundError as err:
        msg = f"dataset {spec.name!r}: file {path!r} does not exist"
        raise DatasetFileNotFoundError(msg) from err
    except Exception as err:
        msg = f"dataset {spec.name!r}: {path!r} is not a readable Parquet file ({err})"
        raise CorruptFileError(msg) from err
    md = meta.metadata
    sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    boundaries = tuple(int(b) for b in np.concatenate([[0], np.cumsum(sizes)]))
    identity: dict[str, Any] = {"rows": md.num_rows, "created_by": md.created_by}
    check: dict[str, Any] = {}
    if is_url(path):
        check = remote_stamp(path, timeout=spec.timeout)
    else:
        stamp = local_stamp(path)
        identity["size"] = stamp["size"]
        identity["mtime_ns"] = stamp["mtime_ns"]
        identity["footer"] = footer_hash(path)  # a rewrite keeping size and mtime
        check = {**stamp, "footer": identity["footer"]}
    columns = {f.name: str(f.type) for f in meta.schema_arrow}
    info = FileInfo(
        path=path,
        format="parquet",
        entries=md.num_rows,
        identity=tuple(sorted(identity.items())),
        boundaries=boundaries if len(boundaries) > 1 else (0, md.num_rows),
        check=tuple(sorted(check.items())),
    )
    return info, columns


def read(
    file: FileInfo, columns: Sequence[str], *, start: int, stop: int
) -> dict[str, ak.Array]:
    """Columns of rows ``[start, stop)``, reading only the row groups that hold them."""
    if not columns:
        return {}
    try:
        meta = _open(file.path)
        bounds = np.asarray(file.boundaries)
        first = int(np.searchsorted(bounds, start, side="right") - 1)
        last = int(np.searchsorted(bounds, stop, side="left"))
        groups = list(range(first, max(last, first + 1)))
        table = meta.read_row_groups(groups, columns=list(columns))
        offset = start - int(bounds[first])
        table = table.slice(offset, stop - start)
    except Exception as err:
        msg = f"reading rows {start}-{stop} of {file.path!r} failed ({err})"
        raise CorruptFileError(msg) from err
    return {name: ak.from_arrow(table.column(name)) for name in columns}
