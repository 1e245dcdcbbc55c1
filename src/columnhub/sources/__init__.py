"""Sources: bytes and arrays at the bottom layer.

One module per format (:mod:`.root`, :mod:`.parquet`); this module dispatches
on :attr:`FileInfo.format`. Sources read only the columns asked for, only in
the entry range asked for, and every read is checked to have read the file
that was planned (:mod:`._identity`).
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
    verify: bool = True,
    **options: Any,
) -> dict[str, ak.Array]:
    """Columns ``columns`` of entries ``[start, stop)`` of ``file``.

    With ``verify`` (the default) the file is checked once the read is done:
    a file replaced or rewritten since it was planned raises
    :class:`~columnhub.errors.InputChangedError` instead of returning its
    data. A caller reading several ranges of one file may pass
    ``verify=False`` and call ``_identity.verify_unchanged`` once after the
    last read, before using any of them.
    """
    from columnhub.errors import ColumnhubError
    from columnhub.sources._identity import verify_unchanged

    try:
        if file.format == "parquet":
            from columnhub.sources import parquet

            out = parquet.read(file, columns, start=start, stop=stop)
        else:
            from columnhub.sources import root

            out = root.read(file, spec, columns, start=start, stop=stop)
    except ColumnhubError as err:  # a file rewritten under an open tree reads as corrupt
        if verify:
            verify_unchanged(file, spec, cause=err)
        raise
    if verify:
        verify_unchanged(file, spec)
    return out
