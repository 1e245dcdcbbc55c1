"""ROOT source: TTree (and RNTuple where uproot reads it) through uproot.

Local files, ``root://`` (XRootD, through fsspec-xrootd) and ``https://``.
uproot is imported by the functions that open or read a file, not with the
module: a request served from the cache (its plan from cached file metadata,
its columns from cached chunks) uses :func:`read_executor` and never imports it.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import awkward as ak

from columnhub._extras import missing_dependency
from columnhub.datasets import FileInfo, is_url
from columnhub.errors import (
    ColumnhubError,
    ColumnNotFoundError,
    CorruptFileError,
    DatasetFileNotFoundError,
    SourceTimeoutError,
    TreeNotFoundError,
    UnreadableBranchError,
    closest,
)
from columnhub.sources._errors import classify
from columnhub.sources._metadata import unreadable_message
from columnhub.sources._timeout import call_with_timeout
from columnhub.spec import DatasetSpec

__all__ = [
    "branch_facts",
    "check_readable",
    "column_types",
    "describe",
    "forget_files",
    "is_list",
    "open_tree",
    "read",
    "read_executor",
]

_TREE_CLASSES = ("TTree", "ROOT::Experimental::RNTuple", "ROOT::RNTuple")
#: open trees kept per process: at most this many files, and at most
#: ``COLUMNHUB_OPEN_BYTES`` (default 256 MiB) of their estimated memory
#: together (the newest is always kept); files are opened without uproot's
#: per-file array cache (100 MB each by default), so memory does not grow
#: with the number of files a request reads
_OPEN_FILES = 16
_OPEN_BYTES = int(os.environ.get("COLUMNHUB_OPEN_BYTES", str(256 << 20)))
#: an open tree's memory, estimated as this many times its metadata's
#: uncompressed size in the file (measured: 6.2 MB for the 367 kB of a
#: 654-branch NanoAOD tree, ~17x)
_TREE_MEMORY_FACTOR = 16
_open: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
_open_lock = threading.Lock()
#: what describe() found per local file, by (path, tree, device, inode, size,
#: mtime), reused while the header's ROOT UUID matches too: a
#: NanoAOD file takes 0.2-0.3 s to describe, every request of a dataset
#: describes every file, and the answer only changes with the file
_DESCRIBED = 1024
_described: OrderedDict[Any, tuple[FileInfo, dict[str, str]]] = OrderedDict()
_described_lock = threading.Lock()
#: one column list per distinct schema (the files of a dataset share one:
#: ~1,500 names of NanoAOD are kept once, not once per file)
_SCHEMAS = 64
_schemas: OrderedDict[tuple[tuple[str, str], ...], dict[str, str]] = OrderedDict()
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _forget_after_fork() -> None:
    """A forked child starts without the parent's pool threads and open files.

    The child inherits the pool object but not its threads (work submitted
    to it would never run), and open files share their read offsets with
    the parent.
    """
    global _pool, _pool_lock, _open_lock, _open, _described_lock
    _inherited.append((_pool, _open))  # kept, never used: closing them could block
    _pool = None
    _pool_lock = threading.Lock()
    _open_lock = threading.Lock()
    _open = OrderedDict()
    _described_lock = threading.Lock()  # the descriptions themselves are plain data: kept


_inherited: list[Any] = []


os.register_at_fork(after_in_child=_forget_after_fork)


def forget_files() -> None:
    """Forget every open tree and file description of this process.

    The next request opens and describes its files again, as a new process
    would (benchmarks use it to time a first request).
    """
    with _open_lock:
        _open.clear()
    with _described_lock:
        _described.clear()
        _schemas.clear()


def read_executor() -> ThreadPoolExecutor | None:
    """The process's thread pool for basket decompression and interpretation.

    uproot decompresses and interprets baskets serially by default; handing it
    a pool lets one chunk task use every core (zlib/zstd/lz4 release the GIL).
    Its size is the process's one concurrency setting
    (:func:`columnhub._concurrency.threads`: ``$COLUMNHUB_THREADS``, a Dask
    worker's threads, else the CPU count; ``1`` reads serially). Created on
    first use, once per process.
    """
    global _pool
    from columnhub._concurrency import threads as _threads

    threads = _threads()
    if threads <= 1:
        return None
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="columnhub-read")
        return _pool


def _cached_tree(file: FileInfo, spec: DatasetSpec) -> Any:
    """The tree of ``file``, opened once per process while recently used.

    Opening a NanoAOD tree reads the metadata of its ~1,500 branches (about
    0.1-0.3 s); the plan's look at the file and every chunk task of the file
    share one open tree (uproot reads concurrently from one file). Keyed by
    the file's identity, so a rewritten file is opened again.
    """
    key = (file.path, file.identity, spec.tree)
    with _open_lock:
        held = _open.pop(key, None)
        if held is not None:
            _open[key] = held
            return held[0]
    tree = open_tree(file.path, spec)
    _remember(key, tree)
    return tree


def _tree_bytes(tree: Any) -> int:
    """An estimate of the memory an open tree holds (its metadata: ~6 MB for NanoAOD)."""
    try:
        size = int(tree.file.root_directory.key(tree.object_path).data_uncompressed_bytes)
    except Exception:  # noqa: BLE001 - RNTuple, or no key: count a typical NanoAOD tree
        size = 1 << 20
    return size * _TREE_MEMORY_FACTOR


def _remember(key: Any, tree: Any) -> None:
    size = _tree_bytes(tree)
    with _open_lock:
        _open[key] = (tree, size)
        total = sum(n for _, n in _open.values())
        while len(_open) > 1 and (len(_open) > _OPEN_FILES or total > _OPEN_BYTES):
            _, (_, n) = _open.popitem(last=False)  # closed when the last chunk using it is done
            total -= n


def forget_file(path: str) -> None:
    """Forget the open tree and the description of ``path`` (it changed on disk)."""
    with _open_lock:
        for key in [k for k in _open if k[0] == path]:
            del _open[key]
    with _described_lock:
        for key in [k for k in _described if k[0] == path]:
            del _described[key]


def open_tree(path: str, spec: DatasetSpec) -> Any:
    """The tree ``spec.tree`` of the ROOT file ``path``, with clear errors."""
    if is_url(path):
        return call_with_timeout(
            lambda: _open_tree(path, spec), seconds=spec.timeout,
            what=f"dataset {spec.name!r}: storage for {path}", url=path,
        )
    return _open_tree(path, spec)


def _open_tree(path: str, spec: DatasetSpec) -> Any:
    import uproot

    # whole seconds: the XRootD client (through fsspec-xrootd) accepts only an int
    options: dict[str, Any] = {"timeout": max(1, math.ceil(spec.timeout))} if is_url(path) else {}
    try:
        # no per-file array and object caches: each entry range is read once per
        # chunk, and the default 100 MB per open file made memory grow with the
        # number of files
        file = uproot.open(path, array_cache=None, object_cache=None, **options)
    except FileNotFoundError as err:
        msg = f"dataset {spec.name!r}: file {path!r} does not exist ({err})"
        raise DatasetFileNotFoundError(msg) from err
    except ColumnhubError:
        raise
    except ImportError as err:  # fsspec-xrootd / aiohttp for root:// and http(s)://
        found = missing_dependency(err, what=f"dataset {spec.name!r}: reading {path}")
        if found is None:
            raise
        raise found from err
    except Exception as err:
        if not is_url(path) and isinstance(err, TimeoutError):
            msg = (
                f"dataset {spec.name!r}: storage for {path} timed out ({err}); check that "
                "the file system answers, or raise the dataset's 'timeout'"
            )
            raise SourceTimeoutError(msg) from err
        raise classify(
            err, dataset=spec.name, path=path, doing="opening it as a ROOT file",
            timeout=spec.timeout, remote=is_url(path),
        ) from err
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
    """File identity, entry count, basket boundaries and columns of one ROOT file.

    A local file already described in this process, with the same size,
    modification time and inode, and the same ROOT UUID in its header (a
    read of a few hundred bytes), is not described again.
    """
    from columnhub.sources._identity import header_uuid

    key = None
    if not is_url(path):
        try:
            stat = os.stat(path)
        except OSError:
            pass  # opening it names the problem
        else:
            key = (
                os.path.abspath(path),
                spec.tree,
                stat.st_dev,
                stat.st_ino,  # a file replaced by a rename is another inode
                stat.st_size,
                stat.st_mtime_ns,
            )
            with _described_lock:
                known = _described.get(key)
                if known is not None:
                    _described.move_to_end(key)
            if known is not None and header_uuid(path) == dict(known[0].identity).get("uuid"):
                info, columns = known
                return info, dict(columns)
    info, columns = _describe(path, spec)
    if key is not None and dict(info.identity).get("mtime_ns") == key[-1]:
        schema = tuple(columns.items())
        with _described_lock:
            shared = _schemas.setdefault(schema, dict(columns))
            _schemas.move_to_end(schema)
            while len(_schemas) > _SCHEMAS:
                _schemas.popitem(last=False)
            _described[key] = (info, shared)
            while len(_described) > _DESCRIBED:
                _described.popitem(last=False)
    return info, columns


def _check_of(path: str, identity: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    """What a finished read compares (:attr:`FileInfo.check`) for a file of ``identity``."""
    from columnhub.errors import InputChangedError
    from columnhub.sources._identity import local_stamp, remote_stamp

    if is_url(path):
        # the header is re-read after every read: servers need not send an
        # ETag or Last-Modified, and a same-size rewrite changes only the UUID
        remote = remote_stamp(path, timeout=spec.timeout)
        return {**remote, "uuid": identity["uuid"]} if remote else {}
    stamp: dict[str, Any] = dict(local_stamp(path))
    if stamp["size"] != identity["size"] or stamp["mtime_ns"] != identity["mtime_ns"]:
        msg = (
            f"dataset {spec.name!r}: input file {path!r} changed while its metadata was "
            "read; re-run the request once the file is complete"
        )
        raise InputChangedError(msg)
    return {**stamp, "uuid": identity["uuid"]}


def _describe(path: str, spec: DatasetSpec) -> tuple[FileInfo, dict[str, str]]:
    import uproot

    tree = open_tree(path, spec)
    try:
        entries = int(tree.num_entries)
        if isinstance(tree, uproot.TTree):
            boundaries = tuple(int(b) for b in tree.common_entry_offsets())
            # names only: a type string per branch costs ~0.1 s on full NanoAOD
            columns = {b.name: "" for b in tree.itervalues(recursive=True)}
        else:  # RNTuple
            boundaries = (0, entries)
            columns = {name: str(tree[name].typename) for name in tree.keys()}  # noqa: SIM118
    except ColumnhubError:
        raise
    except Exception as err:
        raise classify(
            err, dataset=spec.name, path=path, doing="reading its tree's metadata",
            timeout=spec.timeout, remote=is_url(path),
        ) from err
    identity: dict[str, Any] = {"uuid": str(tree.file.uuid)}
    if is_url(path):
        identity["size"] = int(getattr(tree.file.source, "num_bytes", 0) or 0)
    else:
        stat = os.stat(path)
        identity["size"] = stat.st_size
        identity["mtime_ns"] = stat.st_mtime_ns
    check = _check_of(path, identity, spec)
    if boundaries[-1] != entries:
        boundaries = (0, entries)
    info = FileInfo(
        path=path,
        format="root",
        entries=entries,
        identity=tuple(sorted(identity.items())),
        boundaries=boundaries,
        check=tuple(sorted(check.items())),
    )
    _remember((info.path, info.identity, spec.tree), tree)
    return info, columns


def column_types(file: FileInfo, spec: DatasetSpec, names: Sequence[str]) -> dict[str, str]:
    """The stored type of each branch in ``names`` (metadata only).

    A numpy name for one number per entry (``uint32``, ``float32``, ``bool``),
    else the branch's C++ type (``int32_t[]``).
    """
    import uproot

    tree = _cached_tree(file, spec)
    out: dict[str, str] = {}
    for name in names:
        field = tree[name]
        interpretation = getattr(field, "interpretation", None)
        to_dtype = getattr(interpretation, "to_dtype", None)
        plain = isinstance(interpretation, uproot.AsDtype) and to_dtype is not None
        if plain and to_dtype.shape == ():
            out[name] = to_dtype.name
        else:  # jagged, strings, objects; RNTuple fields: std::uint32_t -> uint32
            text = str(field.typename)
            text = _CXX_NUMBERS.get(text, text)
            out[name] = text.removeprefix("std::").removesuffix("_t") if "::" in text else text
    return out


_CXX_NUMBERS = {"float": "float32", "double": "float64", "bool": "bool"}


def check_readable(file: FileInfo, spec: DatasetSpec, names: Sequence[str]) -> None:
    """Raise :class:`UnreadableBranchError` for the first of ``names`` uproot cannot interpret."""
    import uproot

    tree = _cached_tree(file, spec)
    if not isinstance(tree, uproot.TTree):
        return
    unknown = uproot.interpretation.identify.UnknownInterpretation
    for name in names:
        branch = tree[name]
        found = _unreadable(branch, unknown)
        if found is not None:
            raise UnreadableBranchError(unreadable_message(spec, name, file.path, found))


def _unreadable(branch: Any, unknown: Any) -> dict[str, Any] | None:
    """What uproot says of a branch it cannot read as an array; ``None`` when it can."""
    interpretation = branch.interpretation
    if not isinstance(interpretation, unknown):
        return None
    return {
        "typename": str(branch.typename),
        "leaves": [str(leaf.classname) for leaf in branch.member("fLeaves")],
        "reason": str(interpretation.reason),
    }


def is_list(file: FileInfo, spec: DatasetSpec, name: str) -> bool:
    """True when branch ``name`` holds a list per event (its awkward form; metadata only).

    A branch whose type cannot be read counts as no list.
    """
    tree = _cached_tree(file, spec)
    try:
        form = tree[name].interpretation.awkward_form(tree.file)
    except Exception:  # noqa: BLE001 - an unreadable type counts as no list
        return False
    options = ak.forms.IndexedOptionForm | ak.forms.ByteMaskedForm | ak.forms.UnmaskedForm
    while isinstance(form, options):
        form = form.content
    return isinstance(form, ak.forms.ListOffsetForm | ak.forms.ListForm)


def branch_facts(
    file: FileInfo, spec: DatasetSpec, names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """What planning asks of each of ``names`` (see ``_metadata.branch_facts``), from the tree.

    A name whose readability cannot be read, or the type of a readable one,
    is left out (asked again, the file names the problem); an unreadable
    branch has no ``type``.
    """
    import uproot

    tree = _cached_tree(file, spec)
    unknown = uproot.interpretation.identify.UnknownInterpretation
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            unreadable = _unreadable(tree[name], unknown) if isinstance(tree, uproot.TTree) else None
        except Exception:  # noqa: BLE001, S112 - left to the caller, which names it
            continue
        try:
            kind: str | None = column_types(file, spec, [name])[name]
        except Exception:  # noqa: BLE001 - left to the caller, which names it
            if unreadable is None:
                continue
            kind = None  # what is stored is that uproot cannot read it
        sizes: list[int | None] = []
        for attribute in ("compressed_bytes", "uncompressed_bytes"):
            try:
                sizes.append(int(getattr(tree[name], attribute)))
            except Exception:  # noqa: BLE001 - unknown: the plan guesses
                sizes.append(None)
        out[name] = {
            "type": kind,
            "unreadable": unreadable,
            "list": is_list(file, spec, name),
            "zbytes": sizes[0],
            "bytes": sizes[1],
        }
    return out


def read(
    file: FileInfo, spec: DatasetSpec, columns: Sequence[str], *, start: int, stop: int
) -> dict[str, ak.Array]:
    """Columns ``columns`` of entries ``[start, stop)`` of one ROOT file."""
    import uproot

    if not columns:
        return {}
    tree = _cached_tree(file, spec)
    wanted = set(columns)
    plain = not any(ch in name for name in wanted for ch in "*?[]")

    def load() -> dict[str, ak.Array]:
        if isinstance(tree, uproot.TTree):
            pool = read_executor()
            out = tree.arrays(
                filter_name=sorted(wanted) if plain else (lambda name: name in wanted),
                entry_start=start,
                entry_stop=stop,
                how=dict,
                **({"decompression_executor": pool, "interpretation_executor": pool} if pool else {}),
            )
        else:
            out = tree.arrays(list(columns), entry_start=start, entry_stop=stop, how=dict)
        return {name: out[name] for name in columns}

    try:
        if is_url(file.path):
            return call_with_timeout(
                load, seconds=spec.timeout * 4,
                what=f"dataset {spec.name!r}: storage for {file.path}", url=file.path,
            )
        return load()
    except ColumnhubError:
        raise
    except uproot.KeyInFileError as err:  # the file lacks a branch its dataset's first file has
        msg = (
            f"dataset {spec.name!r}: file {file.path} has no branch {err.key!r} (tree "
            f"{spec.tree!r}); every file of a dataset needs every requested branch: leave the "
            "file out of the dataset or the branch out of the request"
        )
        raise ColumnNotFoundError(msg) from err
    except Exception as err:
        raise classify(
            err, dataset=spec.name, path=file.path,
            doing=f"reading {sorted(wanted)} of entries {start}-{stop}",
            timeout=spec.timeout, remote=is_url(file.path),
        ) from err
