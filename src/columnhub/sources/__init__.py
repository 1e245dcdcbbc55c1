"""Sources: bytes and arrays at the bottom layer.

One module per format (:mod:`.root`, :mod:`.parquet`); this module dispatches
on :attr:`FileInfo.format`. Sources read only the columns asked for, only in
the entry range asked for, and every read is checked to have read the file
that was planned (:mod:`._identity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from columnhub.datasets import FileInfo
from columnhub.spec import DatasetSpec

if TYPE_CHECKING:  # loaded when a column is read: planning from cached metadata needs neither
    import awkward as ak

    from columnhub.cache import ColumnCache

__all__ = ["branch_facts", "check_readable", "column_types", "describe", "read"]


def describe(
    path: str, fmt: str, spec: DatasetSpec, *, cache: ColumnCache | None = None
) -> tuple[FileInfo, dict[str, str]]:
    """Metadata of one file: its :class:`FileInfo` and its columns with types.

    With a ``cache``, a file described before (the same stamp: device,
    inode, size, modification time, ROOT UUID or Parquet footer digest; a
    URL's size, ETag / Last-Modified and UUID) is not opened again: its
    metadata comes from the cache (:mod:`._metadata`).
    """
    if cache is not None:
        from columnhub.sources import _metadata

        return _metadata.describe(path, fmt, spec, cache, lambda: describe(path, fmt, spec))
    if fmt == "parquet":
        from columnhub.sources import parquet

        return parquet.describe(path, spec)
    from columnhub.sources import root

    return root.describe(path, spec)


def column_types(
    file: FileInfo,
    spec: DatasetSpec,
    names: Sequence[str],
    *,
    cache: ColumnCache | None = None,
) -> dict[str, str]:
    """The stored type of each of ``names`` in ``file`` (metadata only).

    Numpy/Arrow spelling for plain numbers (``uint32``, ``float64``, ``bool``),
    the format's own for anything else (``int32_t[]``, ``list<element: int64>``).
    With a ``cache``, a ROOT file's answers are kept with its metadata
    (:func:`branch_facts`).
    """
    if cache is not None and file.format == "root":
        facts = branch_facts(file, spec, names, cache=cache)
        if all(facts.get(n, {}).get("type") is not None for n in names):
            return {n: str(facts[n]["type"]) for n in names}
    if file.format == "parquet":
        from columnhub.sources import parquet

        return parquet.column_types(file, names)
    from columnhub.sources import root

    return root.column_types(file, spec, names)


def check_readable(
    file: FileInfo,
    spec: DatasetSpec,
    names: Sequence[str],
    *,
    cache: ColumnCache | None = None,
) -> None:
    """Raise :class:`~columnhub.errors.UnreadableBranchError` for a branch uproot cannot read.

    Metadata only (the branches' types), so a request fails while planning
    rather than in the middle of delivering. With a ``cache``, the answers
    are kept with the file's metadata (:func:`branch_facts`).
    """
    if cache is not None and file.format == "root":
        from columnhub.errors import UnreadableBranchError
        from columnhub.sources._metadata import unreadable_message

        facts = branch_facts(file, spec, names, cache=cache)
        for name in names:
            if name not in facts:  # the file names the problem
                check_readable(file, spec, [name])
            elif facts[name]["unreadable"] is not None:
                found = facts[name]["unreadable"]
                raise UnreadableBranchError(unreadable_message(spec, name, file.path, found))
        return
    if file.format == "root":
        from columnhub.sources import root

        root.check_readable(file, spec, names)


def branch_facts(
    file: FileInfo,
    spec: DatasetSpec,
    names: Sequence[str],
    *,
    cache: ColumnCache | None = None,
) -> dict[str, dict[str, Any]]:
    """What planning asks of the branches ``names`` of a ROOT file (metadata only).

    Per branch: ``type`` (as :func:`column_types` spells it; ``None`` for a
    branch uproot cannot read), ``unreadable``
    (``None``, or what uproot says of a branch it cannot read), ``list`` (a
    list per event), ``zbytes`` / ``bytes`` (compressed / uncompressed size,
    ``None`` when unknown). With a ``cache``, kept with the file's metadata,
    so a file planned before is not opened (nor uproot imported) to answer.
    A branch whose metadata cannot be read is left out.
    """

    def compute(missing: list[str]) -> dict[str, dict[str, Any]]:
        from columnhub.sources import root

        return root.branch_facts(file, spec, missing)

    if cache is None:
        return compute(list(names))
    from columnhub.sources import _metadata

    return _metadata.branch_facts(file, spec, names, cache, compute)


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
