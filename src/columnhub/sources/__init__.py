"""Sources: bytes and arrays at the bottom layer.

One module per format (:mod:`.root`, :mod:`.parquet`); this module dispatches
on :attr:`FileInfo.format`. Sources read only the columns asked for, only in
the entry range asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import awkward as ak

from columnhub.datasets import FileInfo
from columnhub.spec import DatasetSpec

__all__ = ["check_readable", "column_types", "describe", "read"]


def describe(path: str, fmt: str, spec: DatasetSpec) -> tuple[FileInfo, dict[str, str]]:
    """Metadata of one file: its :class:`FileInfo` and its columns with types."""
    if fmt == "parquet":
        from columnhub.sources import parquet

        return parquet.describe(path, spec)
    from columnhub.sources import root

    return root.describe(path, spec)


def column_types(file: FileInfo, spec: DatasetSpec, names: Sequence[str]) -> dict[str, str]:
    """The stored type of each of ``names`` in ``file`` (metadata only).

    Numpy/Arrow spelling for plain numbers (``uint32``, ``float64``, ``bool``),
    the format's own for anything else (``int32_t[]``, ``list<element: int64>``).
    """
    if file.format == "parquet":
        from columnhub.sources import parquet

        return parquet.column_types(file, names)
    from columnhub.sources import root

    return root.column_types(file, spec, names)


def check_readable(file: FileInfo, spec: DatasetSpec, names: Sequence[str]) -> None:
    """Raise :class:`~columnhub.errors.UnreadableBranchError` for a branch uproot cannot read.

    Metadata only (the branches' types), so a request fails while planning
    rather than in the middle of delivering.
    """
    if file.format == "root":
        from columnhub.sources import root

        root.check_readable(file, spec, names)


def read(
    file: FileInfo,
    spec: DatasetSpec,
    columns: Sequence[str],
    *,
    start: int,
    stop: int,
    **options: Any,
) -> dict[str, ak.Array]:
    """Columns ``columns`` of entries ``[start, stop)`` of ``file``."""
    if file.format == "parquet":
        from columnhub.sources import parquet

        return parquet.read(file, columns, start=start, stop=stop)
    from columnhub.sources import root

    return root.read(file, spec, columns, start=start, stop=stop)
