"""Datasets: resolving a dataset's files, their identity, entry counts and columns.

This is the only place that turns the ``files`` of a :class:`~columnhub.spec.DatasetSpec`
(paths, globs, URLs, columnhub output directories) into concrete files. It
reads metadata only (file headers, tree metadata, Parquet footers), never
column data.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from columnhub.errors import ColumnNotFoundError, DatasetError, DatasetFileNotFoundError, closest

if TYPE_CHECKING:  # numpy and the pydantic models load when used: see columnhub/_fastpath.py
    import numpy as np

    from columnhub.cache import ColumnCache
    from columnhub.spec import DatasetSpec

__all__ = ["FileInfo", "ResolvedDataset", "is_url", "resolve"]

Format = Literal["root", "parquet"]
_PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")


@dataclass(frozen=True)
class FileInfo:
    """One file of a dataset, as seen when the request was planned.

    Attributes:
        path: local absolute path or URL.
        format: ``root`` or ``parquet``.
        entries: number of events.
        identity: what makes this file *this* file (ROOT UUID, size, mtime or
            ETag); part of every cache key, so a rewritten file never serves stale
            columns.
        boundaries: entry offsets where baskets / row groups of all columns
            start together (chunks are aligned to them), from 0 to ``entries``.
        check: what a finished read compares with the file as it is then, to
            prove it read *this* file (``columnhub.sources._identity``): the
            size, mtime, inode and device of a local file with its ROOT UUID
            or Parquet footer digest, or a URL's size, ETag / Last-Modified
            and ROOT UUID. Not part of cache keys (copies of one file share
            their cached columns); empty: nothing to check.
    """

    path: str
    format: Format
    entries: int
    identity: tuple[tuple[str, Any], ...]
    boundaries: tuple[int, ...] = field(repr=False)
    check: tuple[tuple[str, Any], ...] = field(default=(), repr=False)

    @property
    def identity_dict(self) -> dict[str, Any]:
        return dict(self.identity)


@dataclass(frozen=True)
class ResolvedDataset:
    """A dataset whose files are known.

    Attributes:
        spec: the dataset as requested.
        files: its files in a stable order.
        columns: column name -> type string (Parquet; empty for ROOT, where
            a type per branch is costly), from the first file.
        absent: column of the first file -> the later files that lack it.
    """

    spec: DatasetSpec
    files: tuple[FileInfo, ...]
    columns: dict[str, str] = field(repr=False)
    absent: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    @property
    def entries(self) -> int:
        return sum(f.entries for f in self.files)

    @property
    def offsets(self) -> np.ndarray:
        """Global entry number where each file starts (length ``len(files) + 1``)."""
        import numpy as np

        return np.concatenate([[0], np.cumsum([f.entries for f in self.files])]).astype(np.int64)

    @property
    def identity(self) -> list[dict[str, Any]]:
        """The identity of every file (for cache keys of dataset-wide objects)."""
        return [{"path": f.path, **f.identity_dict} for f in self.files]

    def require(self, names: Sequence[str], *, what: str = "column") -> None:
        """Raise :class:`ColumnNotFoundError` for the first name the dataset lacks.

        A column that some files of the dataset lack is an error too, naming them.
        """
        for name in names:
            self.require_everywhere(name, what=what)
            if name not in self.columns:
                hint = closest(name, self.columns)
                msg = (
                    f"{what} {name!r} is not in dataset {self.spec.name!r} "
                    f"(tree {self.spec.tree!r} of {self.files[0].path})"
                )
                msg += f"; closest names: {', '.join(hint)}" if hint else ""
                raise ColumnNotFoundError(msg)

    def require_everywhere(self, name: str, *, what: str = "column") -> None:
        """Raise :class:`ColumnNotFoundError` if some files have ``name`` and others lack it."""
        lacking = self.absent.get(name)
        if not lacking:
            return
        having = [f.path for f in self.files if f.path not in set(lacking)]
        shown = _some(lacking, 5)
        has = _some(having, 3)
        msg = (
            f"{what} {name!r} is missing from {len(lacking)} of the {len(self.files)} files of "
            f"dataset {self.spec.name!r}: {shown} (tree {self.spec.tree!r}); it is in {has}. "
            "Leave those files out of the dataset, or the column out of the request"
        )
        raise ColumnNotFoundError(msg)


def _some(paths: Sequence[str], n: int) -> str:
    """The first ``n`` of ``paths``, and how many more there are."""
    more = f" and {len(paths) - n} more" if len(paths) > n else ""
    return ", ".join(paths[:n]) + more


def is_url(path: str) -> bool:
    """True for ``scheme://...`` paths other than ``file://``."""
    return "://" in path and not path.startswith("file://")


def resolve(spec: DatasetSpec, *, cache: ColumnCache | None = None) -> ResolvedDataset:
    """Find a dataset's files and read their metadata (in parallel, metadata only).

    With a ``cache``, the metadata of files seen before comes from it
    (``columnhub.sources.describe``).
    """
    paths = _expand(spec)
    from columnhub._concurrency import in_context, threads
    from columnhub.sources import describe

    workers = min(threads(), len(paths))
    if workers <= 1:
        described = [describe(p, fmt, spec, cache=cache) for p, fmt in paths]
    else:
        with ThreadPoolExecutor(workers) as pool:
            described = list(
                pool.map(in_context(lambda pf: describe(pf[0], pf[1], spec, cache=cache)), paths)
            )
    files = tuple(info for info, _ in described)
    first = described[0][1]
    absent: dict[str, list[str]] = {}
    for info, columns in described[1:]:
        if columns is first or columns.keys() == first.keys():
            continue  # the usual case: one schema for every file
        for name in first.keys() - columns.keys():
            absent.setdefault(name, []).append(info.path)
    return ResolvedDataset(
        spec=spec,
        files=files,
        columns=first,
        absent={name: tuple(paths) for name, paths in absent.items()},
    )


def _expand(spec: DatasetSpec) -> list[tuple[str, Format]]:
    out: list[tuple[str, Format]] = []
    for entry in spec.files:
        if is_url(entry):
            out.append((entry, _format_of(entry)))
            continue
        try:
            out.extend(_expand_local(entry, spec))
        except PermissionError as err:
            where = _denied(Path(os.path.expanduser(err.filename or entry)))
            msg = (
                f"dataset {spec.name!r}: permission denied reading {str(where)!r} while listing "
                f"{entry!r}; make it readable by this user (uid {os.getuid()}) or remove it "
                "from the dataset's files"
            )
            raise DatasetError(msg) from err
    seen: set[str] = set()
    unique = [(p, f) for p, f in out if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]
    return unique


def _expand_local(entry: str, spec: DatasetSpec) -> list[tuple[str, Format]]:
    """The files of one local entry: a directory, a glob or a file."""
    out: list[tuple[str, Format]] = []
    local = entry.removeprefix("file://")
    path = Path(local).expanduser()
    if path.is_dir():
        out.extend(_directory(path, spec))
    elif glob.has_magic(local):
        found = sorted(glob.glob(os.path.expanduser(local)))
        if not found:
            _check_readable(Path(os.path.expanduser(local)).parent)  # glob hides EACCES
            msg = f"dataset {spec.name!r}: no file matches the pattern {entry!r}"
            raise DatasetFileNotFoundError(msg)
        out.extend((str(Path(f).resolve()), _format_of(f)) for f in found)
    elif path.is_file():
        out.append((str(path.resolve()), _format_of(local)))
    else:
        raise DatasetFileNotFoundError(_missing_message(spec, path))
    return out


def _denied(path: Path) -> Path:
    """The first directory on the way to ``path`` this user may not enter or list, else ``path``."""
    for parent in reversed(path.parents):
        if not os.access(parent, os.X_OK):
            return parent
        if not os.access(parent, os.R_OK) and glob.has_magic(path.name):
            return parent
    return path


def _check_readable(directory: Path) -> None:
    """Raise :class:`PermissionError` for the first non-magic directory this user cannot list."""
    for parent in [directory, *directory.parents]:
        if glob.has_magic(str(parent)) or not parent.is_dir():
            continue
        if not os.access(parent, os.R_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(parent))
        return


def _directory(path: Path, spec: DatasetSpec) -> list[tuple[str, Format]]:
    manifest = path / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        if not data.get("complete", False):
            msg = (
                f"dataset {spec.name!r}: {path} holds an incomplete columnhub result "
                "(manifest says complete: false); deliver it again before using it"
            )
            raise DatasetFileNotFoundError(msg)
        return [(str((path / f).resolve()), _format_of(f)) for f in data["files"]]
    found = sorted(
        p for p in path.iterdir() if p.suffix in (".root", *_PARQUET_SUFFIXES) and p.is_file()
    )
    if not found:
        msg = f"dataset {spec.name!r}: directory {path} holds no .root or .parquet files"
        raise DatasetFileNotFoundError(msg)
    return [(str(p.resolve()), _format_of(p.name)) for p in found]


def _format_of(path: str) -> Format:
    name = path.split("?", 1)[0].lower()
    return "parquet" if name.endswith(_PARQUET_SUFFIXES) else "root"


def _missing_message(spec: DatasetSpec, path: Path) -> str:
    msg = f"dataset {spec.name!r}: file {str(path)!r} does not exist"
    parent = path.parent
    if parent.is_dir():
        near = closest(path.name, [p.name for p in parent.iterdir()], n=3)
        if near:
            msg += f"; files with similar names in {parent}: {', '.join(near)}"
    else:
        msg += f" (directory {str(parent)!r} does not exist either)"
    return msg
