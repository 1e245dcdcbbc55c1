"""Whole-result cache hits recognised before planning (private).

A plan opens every input file with uproot (entry counts, branches, types),
which costs a new process ~0.5 s of imports (uproot, awkward, numba) before
the result key can be computed. A request delivered before, on inputs that
have not changed, needs none of that. After each delivery (or reuse) with a
cache, :func:`remember` stores under a *source key* (what the request was
given as: the spec file's bytes and folder, a dictionary, or a request's
hash; the chunk-size override; the code versions) the result key it
computed, the files each dataset's ``files`` entries resolved to, and each
file's *quick identity*: device, inode, size, modification time, plus the
ROOT UUID read from the file header (:mod:`columnhub._rootheader`) or a
digest of the Parquet footer. :func:`lookup` + :func:`unchanged` find it
again with plain file-system calls: the entries are resolved again (globs,
directories) and every file must still be the one recorded. The caller then
reuses the result exactly as a full delivery would (checksums verified).

Anything uncertain is a miss and the full path runs: remote files, models
(a registry may change), several samples, a source that cannot be hashed, a
file whose quick identity disagrees with the one the plan saw, a blob that
does not parse. The quick identity holds everything the plan's file
identity holds (ROOT: UUID, size, mtime; Parquet: size, mtime, and rows and
writer inside the footer), so a hit is never a result the full path would
not have reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from columnhub._versions import PROVIDER_VERSIONS
from columnhub.cache.addressing import entry_key
from columnhub.errors import ColumnhubError

if TYPE_CHECKING:
    from columnhub.cache import ColumnCache
    from columnhub.plan import Plan

__all__ = ["Known", "lookup", "quick_identity", "remember", "source_key", "unchanged"]

#: the layout of the blob :func:`remember` writes; bump when it changes
_BLOB_VERSION = 1


@dataclass(frozen=True)
class Known:
    """What a previous delivery of the same source recorded.

    Attributes:
        result_key: the whole result's address (``delivery._result_key``).
        request_hash: the request's hash (names the default output directory).
        directory: the request's own ``output.directory`` (``None``: the default).
        datasets: per dataset (primary first, then friends): its name, its
            ``files`` entries and ``[path, format, quick identity]`` of each file.
    """

    result_key: str
    request_hash: str
    directory: str | None
    datasets: tuple[dict[str, Any], ...]

    def inputs(self) -> list[tuple[str, list[str], list[str]]]:
        """``(name, entries, paths)`` of each dataset, for the output-directory check."""
        return [(d["name"], list(d["entries"]), [f[0] for f in d["files"]]) for d in self.datasets]


def source_key(request: Any, *, chunk_size: int | None) -> str | None:
    """The address of what :func:`remember` stored for ``request``; ``None``: no fast path.

    A spec file counts by its bytes and its folder (relative paths in it are
    relative to the folder); a dictionary by its JSON text (key order kept:
    what the request is made from, not its canonical form, whose sorted file
    list and left-out output directory are not the same delivery) and the
    working directory; a :class:`~columnhub.spec.Request` likewise by all of
    its fields. Anything else (several samples) has none.
    """
    from columnhub import __version__

    if isinstance(request, str | os.PathLike):
        path = Path(request)
        try:
            data = path.read_bytes()
            base = str(path.resolve().parent)
        except OSError:
            return None  # the full path names the problem
        source: Any = {"file": hashlib.sha256(data).hexdigest(), "base": base}
    else:
        # not imported: it cannot be a Request; another thread still importing it (a
        # partially initialised module without ``Request`` yet): not one either, since
        # no instance exists before its class
        spec_class = getattr(sys.modules.get("columnhub.spec"), "Request", None)
        if spec_class is not None and isinstance(request, spec_class):
            request = request.model_dump(mode="json", by_alias=True)
        elif not isinstance(request, dict) or not _plain(request):
            return None
        try:
            text = json.dumps(request, ensure_ascii=True, separators=(",", ":"))
            cwd = os.getcwd()  # relative paths in it are relative to the working directory
        except (TypeError, ValueError, OSError):
            return None
        source = {"data": hashlib.sha256(text.encode()).hexdigest(), "cwd": cwd}
    try:
        return entry_key(
            kind="result-by-source",
            layout=_BLOB_VERSION,
            source=source,
            chunk_size=chunk_size,
            version=__version__,
            providers=PROVIDER_VERSIONS,
        )
    except (ColumnhubError, TypeError, ValueError):  # not plain data: no fast path
        return None


def _plain(value: Any) -> bool:
    """True for JSON data whose every mapping key is text (``{1: x}`` would read as ``{"1": x}``)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float)


def quick_identity(path: str, fmt: str) -> dict[str, Any] | None:
    """What makes a local file *this* file, read without uproot or pyarrow.

    Device, inode, size and modification time, plus the ROOT UUID from the
    header or an xxh3 digest of the Parquet footer (which holds the row count
    and writer). ``None`` when the file cannot be read or is not what its
    format says.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return None
    out: dict[str, Any] = {
        "dev": stat.st_dev,
        "ino": stat.st_ino,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    if fmt == "root":
        from columnhub._rootheader import read_uuid

        uuid = read_uuid(path)
        if uuid is None:
            return None
        out["uuid"] = uuid
        return out
    if fmt == "parquet":
        from columnhub._checksum import footer_hash

        footer = footer_hash(path)
        if footer is None:
            return None
        out["footer"] = footer
        return out
    return None


def remember(
    store: ColumnCache | None,
    key: str | None,
    plan: Plan,
    result_key: str,
    *,
    directory: str | None,
) -> bool:
    """Record ``result_key`` under the source key ``key`` (best effort; never raises).

    Nothing is recorded for a request with models or remote files, or when a
    file's quick identity does not agree with the identity the plan saw (the
    file changed while it was delivered).

    Returns:
        Whether it was recorded.
    """
    if store is None or store.read_only or key is None:
        return False
    if plan.request.models or any(c.model is not None for c in plan.columns.values()):
        return False
    datasets = []
    for dataset in [plan.dataset, *(f.dataset for f in plan.friends)]:
        files = []
        for info in dataset.files:
            if "://" in info.path:
                return False
            quick = quick_identity(info.path, info.format)
            if quick is None or not _agrees(quick, info.identity_dict):
                return False
            files.append([info.path, info.format, quick])
        datasets.append(
            {"name": dataset.spec.name, "entries": list(dataset.spec.files), "files": files}
        )
    blob = {
        "layout": _BLOB_VERSION,
        "result_key": result_key,
        "request_hash": plan.request.hash,
        "directory": directory,
        "datasets": datasets,
    }
    with contextlib.suppress(ColumnhubError, OSError):
        store.put_bytes(key, json.dumps(blob).encode())
        return True
    return False


def _agrees(quick: dict[str, Any], planned: dict[str, Any]) -> bool:
    """True when every field both identities have is equal (and the plan's has its size)."""
    shared = quick.keys() & planned.keys()
    return "size" in shared and all(quick[k] == planned[k] for k in shared)


def lookup(store: ColumnCache | None, key: str | None) -> Known | None:
    """What :func:`remember` stored under ``key``, or ``None``."""
    if store is None or key is None:
        return None
    try:
        blob = store.get_bytes(key)
    except ColumnhubError:
        return None
    if blob is None:
        return None
    try:
        data = json.loads(blob)
        if data["layout"] != _BLOB_VERSION:
            return None
        return Known(
            result_key=str(data["result_key"]),
            request_hash=str(data["request_hash"]),
            directory=data["directory"],
            datasets=tuple(data["datasets"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


def unchanged(known: Known) -> bool:
    """True when every dataset's entries resolve to the same files, each still the same file.

    A file added to (or gone from) a glob or a directory, a rewritten file,
    or anything that cannot be checked is a change.
    """
    from columnhub.datasets import _expand

    for dataset in known.datasets:
        try:
            found = _expand(_Entries(dataset["name"], tuple(dataset["entries"])))  # type: ignore[arg-type]
        except (ColumnhubError, OSError, ValueError):  # e.g. a damaged manifest.json
            return False
        recorded = dataset["files"]
        if [[p, f] for p, f in found] != [[p, f] for p, f, _ in recorded]:
            return False
        for path, fmt, quick in recorded:
            if "://" in path or quick_identity(path, fmt) != quick:
                return False
    return True


@dataclass(frozen=True)
class _Entries:
    """The two fields of a dataset spec that resolving its files reads."""

    name: str
    files: tuple[str, ...]
