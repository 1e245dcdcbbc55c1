"""Sources: bytes and arrays at the bottom layer.

One module per format (:mod:`.root`, :mod:`.parquet`); this module dispatches
on :attr:`FileInfo.format`. Sources read only the columns asked for, only in
the entry range asked for, and every read is verified to have read the file
that was planned (:func:`verify_unchanged`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import awkward as ak

from columnhub.datasets import FileInfo, is_url
from columnhub.errors import ColumnhubError, InputChangedError
from columnhub.spec import DatasetSpec

__all__ = ["describe", "read", "verify_unchanged"]


def describe(path: str, fmt: str, spec: DatasetSpec) -> tuple[FileInfo, dict[str, str]]:
    """Metadata of one file: its :class:`FileInfo` and its columns with types."""
    if fmt == "parquet":
        from columnhub.sources import parquet

        return parquet.describe(path, spec)
    from columnhub.sources import root

    return root.describe(path, spec)


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

    With ``verify`` (the default), the file is checked once the read is done
    (:func:`verify_unchanged`): a file replaced or rewritten since it was
    planned raises :class:`InputChangedError` instead of returning its data.
    A caller reading several ranges of one file may pass ``verify=False`` and
    call :func:`verify_unchanged` once after the last read, before using them.
    """
    try:
        if file.format == "parquet":
            from columnhub.sources import parquet

            out = parquet.read(file, columns, start=start, stop=stop)
        else:
            from columnhub.sources import root

            out = root.read(file, spec, columns, start=start, stop=stop)
    except ColumnhubError as err:  # a file rewritten under an open tree often reads as corrupt
        if verify:
            verify_unchanged(file, spec, cause=err)
        raise
    if verify:
        verify_unchanged(file, spec)
    return out


def verify_unchanged(
    file: FileInfo, spec: DatasetSpec, *, cause: BaseException | None = None
) -> None:
    """Check that ``file`` is still the file that was planned (cheap: a stat and a header read).

    Compares :attr:`FileInfo.check` (size, modification time, inode, device
    and ROOT UUID of a local file; size, ETag, Last-Modified of a URL) with
    the file as it is now.

    Raises:
        InputChangedError: the file was replaced, rewritten or removed; what
            was read from it must not be used (nor cached).
    """
    want = dict(file.check)
    if not want:
        return
    if file.format == "parquet":
        from columnhub.sources import parquet

        now = parquet.current_check(file, spec)
    else:
        from columnhub.sources import root

        now = root.current_check(file, spec)
    if is_url(file.path) and not now:
        return  # storage did not answer the stat; the data came from a read that did
    changed = [f"{k} {want[k]!r} -> {now.get(k)!r}" for k in sorted(want) if now.get(k) != want[k]]
    if not changed:
        return
    from columnhub.sources import root

    root.forget_file(file.path)
    what = "was removed" if not now else f"was replaced or rewritten ({'; '.join(changed)})"
    msg = (
        f"dataset {spec.name!r}: input file {file.path!r} changed while this request read it: "
        f"it {what}. Nothing read from it was used or cached; re-run the request, which "
        "then reads the file as it is now (or restore the original file)"
    )
    raise InputChangedError(msg) from cause
