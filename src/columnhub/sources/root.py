"""ROOT source: TTree (and RNTuple where uproot reads it) through uproot.

Local files, ``root://`` (XRootD, through fsspec-xrootd) and ``https://``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import awkward as ak
import uproot

from columnhub.datasets import FileInfo, is_url
from columnhub.errors import (
    ColumnhubError,
    CorruptFileError,
    DatasetFileNotFoundError,
    TreeNotFoundError,
    closest,
)
from columnhub.sources._timeout import call_with_timeout
from columnhub.spec import DatasetSpec

__all__ = ["describe", "open_tree", "read"]

_TREE_CLASSES = ("TTree", "ROOT::Experimental::RNTuple", "ROOT::RNTuple")


def open_tree(path: str, spec: DatasetSpec) -> Any:
    """The tree ``spec.tree`` of the ROOT file ``path``, with clear errors."""
    if is_url(path):
        return call_with_timeout(
            lambda: _open_tree(path, spec), seconds=spec.timeout, what=f"storage for {path}"
        )
    return _open_tree(path, spec)


def _open_tree(path: str, spec: DatasetSpec) -> Any:
    options: dict[str, Any] = {"timeout": spec.timeout} if is_url(path) else {}
    try:
        file = uproot.open(path, **options)
    except FileNotFoundError as err:
        msg = f"dataset {spec.name!r}: file {path!r} does not exist ({err})"
        raise DatasetFileNotFoundError(msg) from err
    except ColumnhubError:
        raise
    except Exception as err:
        msg = (
            f"dataset {spec.name!r}: {path!r} cannot be read as a ROOT file "
            f"({type(err).__name__}: {err}); it may be truncated, corrupt or not ROOT at all"
        )
        raise CorruptFileError(msg) from err
    try:
        return file[spec.tree]
    except uproot.KeyInFileError as err:
        trees = [
            k for k, cls in file.classnames(cycle=False).items() if cls in _TREE_CLASSES
        ] or list(file.keys(cycle=False))
        hint = closest(spec.tree, trees)
        msg = (
            f"dataset {spec.name!r}: file {path!r} has no tree {spec.tree!r}; "
            f"it has: {', '.join(trees) or 'nothing'}"
        )
        if hint and hint[0] != spec.tree:
            msg += f" (did you mean {hint[0]!r}? set dataset.tree)"
        raise TreeNotFoundError(msg) from err
    except Exception as err:
        msg = f"dataset {spec.name!r}: the tree {spec.tree!r} of {path!r} is damaged ({err})"
        raise CorruptFileError(msg) from err


def describe(path: str, spec: DatasetSpec) -> tuple[FileInfo, dict[str, str]]:
    """File identity, entry count, basket boundaries and columns of one ROOT file."""
    tree = open_tree(path, spec)
    try:
        entries = int(tree.num_entries)
        if isinstance(tree, uproot.TTree):
            boundaries = tuple(int(b) for b in tree.common_entry_offsets())
            columns = {b.name: b.typename for b in tree.itervalues(recursive=True)}
        else:  # RNTuple
            boundaries = (0, entries)
            columns = {name: str(tree[name].typename) for name in tree.keys()}
    except ColumnhubError:
        raise
    except Exception as err:
        msg = f"dataset {spec.name!r}: the metadata of {path!r} cannot be read ({err})"
        raise CorruptFileError(msg) from err
    identity: dict[str, Any] = {"uuid": str(tree.file.uuid)}
    if is_url(path):
        identity["size"] = int(getattr(tree.file.source, "num_bytes", 0) or 0)
    else:
        stat = os.stat(path)
        identity["size"] = stat.st_size
        identity["mtime_ns"] = stat.st_mtime_ns
    if boundaries[-1] != entries:
        boundaries = (0, entries)
    info = FileInfo(
        path=path,
        format="root",
        entries=entries,
        identity=tuple(sorted(identity.items())),
        boundaries=boundaries,
    )
    return info, columns


def read(
    file: FileInfo, spec: DatasetSpec, columns: Sequence[str], *, start: int, stop: int
) -> dict[str, ak.Array]:
    """Columns ``columns`` of entries ``[start, stop)`` of one ROOT file."""
    if not columns:
        return {}
    tree = open_tree(file.path, spec)
    wanted = set(columns)

    def load() -> dict[str, ak.Array]:
        if isinstance(tree, uproot.TTree):
            out = tree.arrays(
                filter_name=lambda name: name in wanted,
                entry_start=start,
                entry_stop=stop,
                how=dict,
            )
        else:
            out = tree.arrays(list(columns), entry_start=start, entry_stop=stop, how=dict)
        return {name: out[name] for name in columns}

    try:
        if is_url(file.path):
            return call_with_timeout(
                load, seconds=spec.timeout * 4, what=f"storage for {file.path}"
            )
        return load()
    except ColumnhubError:
        raise
    except Exception as err:
        msg = (
            f"dataset {spec.name!r}: reading {sorted(wanted)} of entries {start}-{stop} "
            f"of {file.path!r} failed ({type(err).__name__}: {err}); "
            "the file may be truncated or corrupt"
        )
        raise CorruptFileError(msg) from err
