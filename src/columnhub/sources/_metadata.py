"""What planning needs from each input file, kept in the column cache (private).

Planning a request reads every input file's metadata: its entry count, its
basket (row-group) boundaries, its columns, and for a few branches of the
first file their type, whether uproot can read them, whether they hold a
list per event and their size. For a ROOT file that means importing uproot
(~0.3 s in a new process) and opening the tree (0.1-0.3 s for NanoAOD), even
when every column chunk the request needs is already in the cache.

So the answers are stored in the column cache, under a key made of the
file's *stamp*: for a local file its device, inode, size, modification time
and the ROOT UUID read from its header without uproot (or the xxh3 of a
Parquet footer), as :func:`columnhub._fastpath.quick_identity` reads it; for
a ROOT file on remote storage what storage says of it (size, ETag,
Last-Modified) and the UUID read with one ranged request. A file already
seen is then planned with a ``stat`` and a 70-byte read. A changed file has
another stamp, so it is never planned from what was stored for the file it
replaced: it is described again from the file itself.

Everything here is best effort: an entry that is missing, damaged or does
not agree with the file's stamp is a miss, and the caller reads the file.
The module imports neither uproot nor pyarrow nor numpy.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from columnhub.datasets import FileInfo, is_url
from columnhub.errors import CacheError

if TYPE_CHECKING:
    from columnhub.cache import ColumnCache
    from columnhub.spec import DatasetSpec

__all__ = [
    "branch_facts",
    "describe",
    "stamp_of",
    "unreadable_message",
]

#: the layout of the stored entries; bump when it changes
_LAYOUT = 1
#: identity fields a stamp need not hold: read from inside the Parquet footer,
#: whose digest the stamp holds
_FROM_FOOTER = frozenset({"rows", "created_by"})
#: column lists parsed in this process, by their entry's key (the files of a
#: dataset share one: ~1,500 NanoAOD names are kept once, not once per file)
_SCHEMAS = 64
_schemas: OrderedDict[str, dict[str, str]] = OrderedDict()
_schemas_lock = threading.Lock()

Described = tuple[FileInfo, dict[str, str]]


def current_stamp(path: str, fmt: str, spec: DatasetSpec) -> dict[str, Any] | None:
    """What makes ``path`` *this* file now, read without uproot; ``None``: not cacheable.

    A local file: device, inode, size, modification time and the ROOT UUID
    or Parquet footer digest. A ROOT file on remote storage: size, ETag /
    Last-Modified / mtime as storage reports them (one metadata request) and
    the header's UUID (one ranged read of 70 bytes). A remote Parquet file,
    a failed metadata request, or a file that is not what its format says
    has none.

    Raises:
        SourceTimeoutError: remote storage did not answer within the dataset's timeout.
        SourceConnectionError: remote storage refused the connection.
    """
    if is_url(path):
        if fmt != "root":
            return None
        from columnhub.sources._identity import remote_header_uuid, remote_stamp

        # storage that does not answer fails the request here, as opening the file would
        # (a second wait of the dataset's timeout would only delay the same error)
        where = f"dataset {spec.name!r}: storage for {path}"
        stamp = remote_stamp(path, timeout=spec.timeout, what=where)
        if "size" not in stamp:
            return None
        uuid = remote_header_uuid(path, timeout=spec.timeout)
        if uuid is None:
            return None
        return {**stamp, "uuid": uuid}
    from columnhub._fastpath import quick_identity

    return quick_identity(path, fmt)


def stamp_of(info: FileInfo) -> dict[str, Any] | None:
    """The stamp :func:`current_stamp` read when ``info`` was planned (no I/O)."""
    check = dict(info.check)
    if not check:
        return None
    if is_url(info.path):
        return check
    try:
        out: dict[str, Any] = {
            "dev": check["device"],
            "ino": check["inode"],
            "size": check["size"],
            "mtime_ns": check["mtime_ns"],
        }
    except KeyError:
        return None
    tag = "uuid" if info.format == "root" else "footer"
    if tag not in check:
        return None
    out[tag] = check[tag]
    return out


def _check_from(path: str, fmt: str, stamp: dict[str, Any]) -> dict[str, Any]:
    """The :attr:`FileInfo.check` of a file of ``stamp`` (what the sources compute)."""
    if is_url(path):
        return dict(stamp)
    tag = "uuid" if fmt == "root" else "footer"
    return {
        "size": stamp["size"],
        "mtime_ns": stamp["mtime_ns"],
        "inode": stamp["ino"],
        "device": stamp["dev"],
        tag: stamp[tag],
    }


def _agrees(identity: dict[str, Any], stamp: dict[str, Any]) -> bool:
    """True when the stamp holds the identity (every field of it the stamp can tell)."""
    if "size" not in identity:
        return False
    return all(
        stamp[k] == v if k in stamp else k in _FROM_FOOTER for k, v in identity.items()
    )


def _key(path: str, fmt: str, spec: DatasetSpec, stamp: dict[str, Any], kind: str) -> str:
    from columnhub import __version__
    from columnhub._versions import PROVIDER_VERSIONS
    from columnhub.cache import entry_key

    where = path if is_url(path) else os.path.abspath(path)
    return entry_key(
        kind=kind,
        layout=_LAYOUT,
        path=where,
        format=fmt,
        tree=spec.tree,
        stamp=stamp,
        version=__version__,
        source=PROVIDER_VERSIONS["source"],
    )


def _get(cache: ColumnCache, key: str) -> Any:
    """The JSON stored under ``key``, or ``None`` (missing, damaged, not JSON)."""
    try:
        blob = cache.get_bytes(key)
    except CacheError:
        return None
    if blob is None:
        return None
    try:
        return json.loads(blob)
    except ValueError:
        return None


def _put(cache: ColumnCache, key: str, data: Any) -> None:
    """Store ``data`` as JSON under ``key`` (best effort: a failed write is no error)."""
    if cache.read_only:
        return
    with contextlib.suppress(CacheError):
        cache.put_bytes(key, json.dumps(data, separators=(",", ":")).encode())


def _schema_key(columns: dict[str, str]) -> str:
    from columnhub.cache import entry_key

    return entry_key(kind="file-columns", layout=_LAYOUT, columns=list(columns.items()))


def _columns(cache: ColumnCache, key: str) -> dict[str, str] | None:
    with _schemas_lock:
        known = _schemas.get(key)
        if known is not None:
            _schemas.move_to_end(key)
            return known
    data = _get(cache, key)
    if not isinstance(data, list):
        return None
    try:
        columns = {str(name): str(kind) for name, kind in data}
    except (TypeError, ValueError):
        return None
    if _schema_key(columns) != key:  # never another schema's list under this key
        return None
    with _schemas_lock:
        columns = _schemas.setdefault(key, columns)
        while len(_schemas) > _SCHEMAS:
            _schemas.popitem(last=False)
    return columns


def describe(
    path: str,
    fmt: str,
    spec: DatasetSpec,
    cache: ColumnCache,
    read: Callable[[], Described],
) -> Described:
    """``read()`` (the file's metadata), or what it gave for this same file before.

    The file's stamp is read first (a ``stat`` and a small read); with an
    entry stored under it, the file is not opened. Otherwise ``read()``
    describes it and, when its identity agrees with the stamp (the file did
    not change in between), what it found is stored for the next request.
    """
    stamp = current_stamp(path, fmt, spec)
    if stamp is None:
        return read()
    key = _key(path, fmt, spec, stamp, "file-metadata")
    found = _found(path, fmt, cache, key, stamp)
    if found is not None:
        return found
    info, columns = read()
    if dict(info.check) == _check_from(path, fmt, stamp) and _agrees(info.identity_dict, stamp):
        schema = _schema_key(columns)
        if _get(cache, schema) is None:  # one list per schema, shared by the files of a dataset
            _put(cache, schema, list(columns.items()))
        entry = {
            "layout": _LAYOUT,
            "entries": info.entries,
            "boundaries": list(info.boundaries),
            "identity": info.identity_dict,
            "columns": schema,
        }
        _put(cache, key, entry)
    return info, columns


def _found(
    path: str, fmt: str, cache: ColumnCache, key: str, stamp: dict[str, Any]
) -> Described | None:
    data = _get(cache, key)
    if not isinstance(data, dict) or data.get("layout") != _LAYOUT:
        return None
    try:
        identity = dict(data["identity"])
        entries = int(data["entries"])
        boundaries = tuple(int(b) for b in data["boundaries"])
        columns = _columns(cache, str(data["columns"]))
    except (KeyError, TypeError, ValueError):
        return None
    if columns is None or not _agrees(identity, stamp):
        return None
    if not boundaries or boundaries[0] != 0 or boundaries[-1] != entries:
        return None
    info = FileInfo(
        path=path,
        format="parquet" if fmt == "parquet" else "root",
        entries=entries,
        identity=tuple(sorted(identity.items())),
        boundaries=boundaries,
        check=tuple(sorted(_check_from(path, fmt, stamp).items())),
    )
    return info, dict(columns)


def branch_facts(
    file: FileInfo,
    spec: DatasetSpec,
    names: Sequence[str],
    cache: ColumnCache,
    compute: Callable[[list[str]], dict[str, dict[str, Any]]],
) -> dict[str, dict[str, Any]]:
    """What planning asks of the branches ``names`` of ``file``, stored with its metadata.

    Per branch: ``type`` (as ``sources.column_types`` spells it; ``None`` when uproot
    cannot read it), ``unreadable`` (``None``, or what uproot says of a branch it cannot
    read), ``list`` (one list per event) and ``zbytes`` / ``bytes`` (its
    compressed / uncompressed size; ``None`` when unknown). Branches not
    stored yet are computed with ``compute(missing)`` (which opens the file)
    and added to the stored entry. A branch ``compute`` leaves out (its
    metadata cannot be read) is left out of the answer too: the caller
    asks the file, which names the problem.
    """
    stamp = stamp_of(file)
    if stamp is None:
        return compute(list(names))
    key = _key(file.path, file.format, spec, stamp, "file-metadata")
    data = _get(cache, key)
    stored = data.get("branches") if isinstance(data, dict) else None
    facts: dict[str, dict[str, Any]] = dict(stored) if isinstance(stored, dict) else {}
    missing = [n for n in dict.fromkeys(names) if not isinstance(facts.get(n), dict)]
    if missing:
        computed = compute(missing)
        facts.update(computed)
        if computed and isinstance(data, dict) and data.get("layout") == _LAYOUT:
            _put(cache, key, {**data, "branches": facts})
    return {n: facts[n] for n in names if n in facts}


def unreadable_message(
    spec: DatasetSpec, name: str, path: str, unreadable: dict[str, Any]
) -> str:
    """The :class:`~columnhub.errors.UnreadableBranchError` message for a branch uproot cannot read."""
    leaves = ", ".join(unreadable.get("leaves", ())) or "none"
    return (
        f"dataset {spec.name!r}: branch {name!r} of {path} has a type uproot cannot "
        f"read as an array (type {unreadable.get('typename')!r}, leaf class {leaves}: "
        f"{unreadable.get('reason')}); leave it out "
        "of the request (and out of define/where), or convert it to a plain numeric branch"
    )
