"""Parquet source (pyarrow), e.g. a columnhub result used as a friend dataset."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import awkward as ak
import numpy as np
import pyarrow.parquet as pq

from columnhub._extras import missing_dependency
from columnhub.datasets import FileInfo, is_url
from columnhub.errors import ColumnhubError, CorruptFileError, DatasetFileNotFoundError
from columnhub.sources._errors import classify
from columnhub.spec import DatasetSpec

__all__ = ["column_types", "describe", "read", "read_table"]


def _open(path: str) -> pq.ParquetFile:
    if is_url(path):
        import fsspec

        try:
            handle = fsspec.open(path, "rb").open()
        except ImportError as err:  # fsspec-xrootd / aiohttp for root:// and http(s)://
            found = missing_dependency(err, what=f"reading {path}")
            if found is None:
                raise
            raise found from err
        return pq.ParquetFile(handle)
    return pq.ParquetFile(path)


def describe(path: str, spec: DatasetSpec) -> tuple[FileInfo, dict[str, str]]:
    """Identity, rows, row-group boundaries and columns of one Parquet file."""
    try:
        meta = _open(path)
    except ColumnhubError:
        raise
    except Exception as err:
        found = None
        if is_url(path):  # fsspec reports a refused connection as a missing file
            found = classify(
                err, dataset=spec.name, path=path, doing="reading its Parquet footer",
                timeout=spec.timeout, remote=True, fmt="Parquet",
            )
            if isinstance(found, CorruptFileError) and isinstance(err, FileNotFoundError):
                found = None
        if found is not None:
            raise found from err
        if isinstance(err, FileNotFoundError):
            msg = f"dataset {spec.name!r}: file {path!r} does not exist"
            raise DatasetFileNotFoundError(msg) from err
        msg = f"dataset {spec.name!r}: {path!r} is not a readable Parquet file ({err})"
        raise CorruptFileError(msg) from err
    md = meta.metadata
    sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    boundaries = tuple(int(b) for b in np.concatenate([[0], np.cumsum(sizes)]))
    from columnhub.sources._identity import footer_hash, remote_stamp

    identity: dict[str, Any] = {"rows": md.num_rows, "created_by": md.created_by}
    if not is_url(path):
        stat = os.stat(path)
        identity["size"] = stat.st_size
        identity["mtime_ns"] = stat.st_mtime_ns
        identity["footer"] = footer_hash(path)  # a rewrite keeping size and mtime
        check: dict[str, Any] = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "inode": stat.st_ino,
            "device": stat.st_dev,
            "footer": identity["footer"],
        }
    else:
        check = remote_stamp(path, timeout=spec.timeout)
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


def column_types(file: FileInfo, names: Sequence[str]) -> dict[str, str]:
    """Arrow type names of ``names`` (``uint32``, ``double``, ``list<element: int64>``)."""
    schema = _open(file.path).schema_arrow
    return {name: str(schema.field(name).type) for name in names}


def read_table(file: FileInfo, columns: Sequence[str], *, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of ``file`` with ``columns``, as one Arrow table.

    Reads only the row groups that hold them. Row groups that a new
    ``columnhub deliver`` process read ahead while it imported
    (:mod:`columnhub._readahead`) are taken from memory when they are of the
    file the plan saw.
    """
    from columnhub import _readahead

    bounds = np.asarray(file.boundaries)
    first = int(np.searchsorted(bounds, start, side="right") - 1)
    last = int(np.searchsorted(bounds, stop, side="left"))
    groups = list(range(first, max(last, first + 1)))
    held = _readahead.take(file.path, groups, columns, file.check)
    if all(t is None for t in held):
        table = _open(file.path).read_row_groups(groups, columns=list(columns))
    else:
        import pyarrow as pa

        handle = None
        for k, (group, t) in enumerate(zip(groups, held, strict=True)):
            if t is None:
                handle = handle or _open(file.path)
                held[k] = handle.read_row_group(group, columns=list(columns))
        table = held[0] if len(held) == 1 else pa.concat_tables(held)
    return table.slice(start - int(bounds[first]), stop - start)


def read(
    file: FileInfo, columns: Sequence[str], *, start: int, stop: int
) -> dict[str, ak.Array]:
    """Columns of rows ``[start, stop)``, reading only the row groups that hold them."""
    if not columns:
        return {}
    try:
        table = read_table(file, columns, start=start, stop=stop)
    except ColumnhubError:
        raise
    except Exception as err:
        msg = f"reading rows {start}-{stop} of {file.path!r} failed ({err})"
        raise CorruptFileError(msg) from err
    return {name: ak.from_arrow(table.column(name)) for name in columns}
