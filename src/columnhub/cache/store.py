"""The column cache store: verified, atomic, shareable entries addressed by key.

An entry is one awkward array (one column of one chunk) or one opaque bytes
blob, stored under a key made by :func:`columnhub.cache.entry_key`. Layout
below the cache root::

    CACHEDIR.TAG              marks the directory as a cache (backup tools skip it)
    objects/ab/abcdef0123...  one file per entry, sharded by the key's first 2 digits
    used/ab/abcdef0123...     empty "last used" markers (fsspec stores only)
    stats/<host>-<pid>-<token>-<n>.json   hit/miss counter deltas, one writer each

Guarantees:

* Every read verifies the entry's checksum and that the entry holds the key
  it is read under (the key is stored in the entry, under the checksum); a
  corrupt, truncated or unreadable entry, or one of another key (a file
  copied over another's), is never served: it counts as a miss and as
  ``corrupt``, and is deleted (unless the cache is read-only), so the next
  ``put`` rewrites it.
* Writes go to a unique temporary file in the entry's directory and are
  renamed into place: readers never see a partial entry and concurrent
  writers of one key leave exactly one complete entry. Entries are not
  fsynced (a cold request writes hundreds of MB of them): after a crash or a
  power loss an entry renamed into place can be short, or hold zeros where
  its data never reached the disk. The prefix's payload length and the
  xxh3 checksum over the whole entry make such an entry corrupt, hence a
  miss that is recomputed, never wrong data.
* Recency (for :meth:`ColumnCache.gc`) is the last ``get`` or ``put``: the
  entry file's mtime on local disks, a ``used/`` marker on object stores.
* Hit/miss counters are kept in memory and written as small delta files (at
  most every few seconds, on :meth:`ColumnCache.close`, when the instance is
  dropped and at exit), each
  process writing only its own files; :meth:`ColumnCache.stats` sums them.

Read-only caches (``read_only=True``): ``get`` works and never modifies the
store; ``put``/``put_bytes`` are silent no-ops counted as ``skipped_puts`` so a
request against a read-only shared cache still succeeds; ``gc`` and ``clear``
raise :class:`~columnhub.errors.CacheError`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, Self

from columnhub.cache import _format
from columnhub.cache._backends import FileInfo, FsspecBackend, LocalBackend
from columnhub.cache.addressing import is_valid_key
from columnhub.errors import CacheError

if TYPE_CHECKING:  # awkward loads with the first array, fsspec with the first URL
    import awkward as ak

__all__ = ["CacheStats", "ColumnCache", "ColumnLookup", "GCReport", "default_location"]

#: Seconds between two writes of one instance's counter deltas.
STATS_FLUSH_INTERVAL = 5.0
#: Temporary files older than this (seconds) are debris of a crashed writer.
STALE_TEMP_AGE = 3600.0
#: On object stores, a key's ``used/`` marker is rewritten at most this often.
USED_MARK_INTERVAL = 600.0

_CACHEDIR_TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This directory is a columnhub column cache (see docs/cache.md).\n"
)
_COUNTERS = ("hits", "misses", "puts", "skipped_puts", "corrupt")
_LIVE: weakref.WeakSet[ColumnCache] = weakref.WeakSet()


class ColumnLookup(Protocol):
    """Anything a chunk task looks columns up in by address: a :class:`ColumnCache`, or
    the friend exchange's columns held in memory for one request."""

    def get(self, key: str) -> ak.Array | None:
        """The array stored under ``key``, or ``None``."""


def default_location() -> str:
    """The cache location used when none is given.

    ``$COLUMNHUB_CACHE`` if set, else ``$XDG_CACHE_HOME/columnhub``, else
    ``~/.cache/columnhub``.
    """
    env = os.environ.get("COLUMNHUB_CACHE")
    if env:
        return env
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = xdg if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "columnhub")


@dataclass(frozen=True)
class CacheStats:
    """What a cache holds and how well it served.

    Attributes:
        location: the cache root (path or URL).
        entries: number of entries stored.
        bytes: their total size in bytes (headers included).
        hits: ``get``/``get_bytes`` calls answered from the cache (all processes).
        misses: calls not answered (absent or corrupt entries).
        puts: entries written.
        skipped_puts: ``put`` calls ignored because the cache is read-only.
        corrupt: entries found corrupt, truncated or unreadable (and dropped).
    """

    location: str
    entries: int
    bytes: int
    hits: int
    misses: int
    puts: int
    skipped_puts: int
    corrupt: int

    @property
    def hit_ratio(self) -> float:
        """``hits / (hits + misses)``; 0.0 before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The fields and ``hit_ratio`` as a JSON-ready dict."""
        return {**asdict(self), "hit_ratio": self.hit_ratio}


@dataclass(frozen=True)
class GCReport:
    """What :meth:`ColumnCache.gc` did.

    Attributes:
        max_bytes: the cap asked for.
        removed_entries: entries deleted (least recently used first).
        removed_bytes: their total size.
        kept_entries: entries left.
        kept_bytes: their total size (at most ``max_bytes``).
        removed_temp_files: stale temporary files of crashed writers deleted.
    """

    max_bytes: int
    removed_entries: int
    removed_bytes: int
    kept_entries: int
    kept_bytes: int
    removed_temp_files: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class _Entry:
    key: str
    path: str
    size: int
    recency: float


def _flush_quietly(cache: ColumnCache) -> None:
    # never (re)create a cache directory that was removed meanwhile
    if isinstance(cache._backend, LocalBackend) and not os.path.isdir(cache._backend.root):
        return
    cache.flush_stats()


def _flush_all_at_exit() -> None:
    for cache in list(_LIVE):
        with contextlib.suppress(Exception):  # exit must not fail over statistics
            _flush_quietly(cache)


atexit.register(_flush_all_at_exit)


class ColumnCache:
    """A content-addressed store of column chunks and small blobs.

    Args:
        location: a directory path or any fsspec URL (``file://``, ``s3://``,
            ``memory://`` ...); ``None`` means :func:`default_location`.
        read_only: serve ``get`` only; see the module docstring.

    Raises:
        CacheError: the location is an existing non-directory, or its URL
            protocol is not known to fsspec.

    Example:
        >>> import awkward as ak
        >>> from columnhub.cache import ColumnCache, entry_key
        >>> cache = ColumnCache("memory://doctest-cache")
        >>> key = entry_key(file={"uuid": "u1"}, tree="Events", column="Jet_pt",
        ...                 entry_start=0, entry_stop=2, provider="uproot-5")
        >>> cache.get(key) is None
        True
        >>> cache.put(key, ak.Array([[1.5, 2.5], []]))
        >>> cache.get(key).to_list()
        [[1.5, 2.5], []]
    """

    def __init__(
        self, location: str | os.PathLike[str] | None = None, *, read_only: bool = False
    ) -> None:
        raw = default_location() if location is None else os.fspath(location)
        self._location = raw
        self._read_only = bool(read_only)
        self._backend: LocalBackend | FsspecBackend
        if "://" in raw:
            import fsspec

            try:
                fs, root = fsspec.core.url_to_fs(raw)
            except (ValueError, ImportError) as err:
                msg = (
                    f"cache location {raw!r} cannot be opened: {err}; use a directory path "
                    "or an fsspec URL whose protocol is installed (e.g. file://, memory://, s3://)"
                )
                raise CacheError(msg) from err
            if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
                self._backend = LocalBackend(os.path.abspath(root))
            else:
                self._backend = FsspecBackend(fs, root)
        else:
            self._backend = LocalBackend(os.path.abspath(os.path.expanduser(raw)))
        if isinstance(self._backend, LocalBackend):
            root_path = self._backend.root
            if os.path.exists(root_path) and not os.path.isdir(root_path):
                msg = (
                    f"cache location {root_path!r} exists and is not a directory; "
                    "pass a directory (it is created on first write) or remove the file"
                )
                raise CacheError(msg)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._token = secrets.token_hex(4)
        self._seq = 0
        self._last_flush = time.monotonic()
        self._root_ready = False
        self._marked: dict[str, float] = {}
        _LIVE.add(self)

    # -- identity, pickling, context management -------------------------------------------

    @property
    def location(self) -> str:
        """The location as given (or the default it resolved to)."""
        return self._location

    @property
    def root(self) -> str:
        """The cache root: an absolute path, or the fsspec path below the protocol."""
        return self._backend.root

    @property
    def read_only(self) -> bool:
        """Whether this instance never modifies the store."""
        return self._read_only

    def __repr__(self) -> str:
        mode = ", read_only=True" if self._read_only else ""
        return f"ColumnCache({self._location!r}{mode})"

    def __getstate__(self) -> dict[str, Any]:
        # a local directory travels as its absolute path: a worker process started
        # elsewhere (a Dask worker) opens the same directory
        plain_path = isinstance(self._backend, LocalBackend) and "://" not in self._location
        location = self._backend.root if plain_path else self._location
        return {"location": location, "read_only": self._read_only}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["location"], read_only=state["read_only"])  # type: ignore[misc]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # a dropped instance still reports its counts
            if any(self._counts.values()):
                _flush_quietly(self)

    def close(self) -> None:
        """Write this instance's pending hit/miss counts (it stays usable)."""
        self.flush_stats()

    # -- paths ------------------------------------------------------------------------------

    def _check_key(self, key: str) -> None:
        if not is_valid_key(key):
            msg = (
                f"cache key {key!r:.80} is not 16-128 lower-case hex digits; "
                "make keys with columnhub.cache.entry_key(...)"
            )
            raise CacheError(msg)

    def entry_path(self, key: str) -> str:
        """Where the entry of ``key`` lives (it may not exist)."""
        self._check_key(key)
        return self._backend.join("objects", key[:2], key)

    def _used_path(self, key: str) -> str:
        return self._backend.join("used", key[:2], key)

    # -- reading ----------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n
            due = time.monotonic() - self._last_flush >= STATS_FLUSH_INTERVAL
        if due and not self._read_only:
            self.flush_stats()

    def _drop(self, path: str) -> None:
        self._count("corrupt")
        if not self._read_only:
            self._backend.remove(path)

    def _read(self, key: str, kind: int) -> ak.Array | bytes | None:
        path = self.entry_path(key)
        try:  # a blob (a result's address) is read without numpy
            buf = (
                self._backend.read_bytes(path)
                if kind == _format.KIND_BYTES
                else self._backend.read(path)
            )
        except OSError:
            buf = b""  # unreadable: handled as corrupt below
        if buf is None:
            self._count("misses")
            return None
        try:
            entry = _format.decode(buf, key=key)
        except _format.CorruptEntry:
            self._drop(path)
            self._count("misses")
            return None
        if entry.kind != kind:
            want, have = ("array", "bytes") if kind == _format.KIND_ARRAY else ("bytes", "array")
            other = "get_bytes" if have == "bytes" else "get"
            msg = (
                f"cache entry {key} holds {have}, not {want}; read it with "
                f"ColumnCache.{other}(), or use distinct key parts for arrays and blobs"
            )
            raise CacheError(msg)
        self._count("hits")
        if not self._read_only:
            self._mark_used(key, path)
        return entry.value

    def _mark_used(self, key: str, path: str) -> None:
        if self._backend.is_local:
            self._backend.touch(path)
            return
        now = time.monotonic()
        if now - self._marked.get(key, -USED_MARK_INTERVAL) >= USED_MARK_INTERVAL:
            self._marked[key] = now
            self._backend.touch(self._used_path(key))

    def get(self, key: str) -> ak.Array | None:
        """The array stored under ``key``, or ``None`` (a miss).

        The entry is checksum-verified; a corrupt one is a miss and is deleted
        (unless read-only). A hit makes the entry most recently used.

        Raises:
            CacheError: ``key`` is malformed, or the entry holds bytes.
        """
        import awkward as ak

        value = self._read(key, _format.KIND_ARRAY)
        assert value is None or isinstance(value, ak.Array)
        return value

    def get_bytes(self, key: str) -> bytes | None:
        """The blob stored under ``key`` by :meth:`put_bytes`, or ``None`` (a miss).

        Raises:
            CacheError: ``key`` is malformed, or the entry holds an array.
        """
        value = self._read(key, _format.KIND_BYTES)
        assert value is None or isinstance(value, bytes)
        return value

    def contains(self, key: str) -> bool:
        """Whether an entry exists under ``key`` (not verified, not counted)."""
        return self._backend.exists(self.entry_path(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.contains(key)

    # -- writing ----------------------------------------------------------------------------

    def _write(self, key: str, chunks: list[memoryview]) -> None:
        path = self.entry_path(key)
        if self._read_only:
            self._count("skipped_puts")
            return
        self._ensure_root()
        try:
            # no fsync: a crash can leave an entry short or zeroed, which its
            # size and checksum turn into a miss (module docstring)
            self._backend.write_atomic(path, chunks, durable=False)
        except OSError as err:
            msg = (
                f"cannot write cache entry {path!r}: {err}; check the cache directory's "
                "permissions and free space, or open the cache with read_only=True"
            )
            raise CacheError(msg) from err
        if not self._backend.is_local:
            self._marked[key] = time.monotonic()
            self._backend.remove(self._used_path(key))  # recency = this put
        self._count("puts")

    def _ensure_root(self) -> None:
        if self._root_ready:
            return
        if isinstance(self._backend, LocalBackend):
            tag = self._backend.join("CACHEDIR.TAG")
            if not os.path.exists(tag):
                # on failure, the entry write just after reports the real problem
                with contextlib.suppress(OSError):
                    self._backend.write_atomic(tag, [_CACHEDIR_TAG])
        self._root_ready = True

    def put(self, key: str, array: ak.Array) -> None:
        """Store ``array`` under ``key`` (replacing any entry there).

        Raises:
            CacheError: ``key`` is malformed, ``array`` is not an awkward
                array, or the entry cannot be written.
        """
        import awkward as ak

        if not isinstance(array, ak.Array):
            msg = (
                f"ColumnCache.put() takes an awkward Array, got {type(array).__name__}; "
                "wrap it with ak.Array(...) or use put_bytes() for blobs"
            )
            raise CacheError(msg)
        self._check_key(key)
        if self._read_only:
            self._count("skipped_puts")
            return
        self._write(key, _format.encode_array(array, key=key))

    def put_bytes(
        self, key: str, data: bytes | bytearray | memoryview | Sequence[bytes | memoryview]
    ) -> None:
        """Store the opaque ``data`` under ``key`` (replacing any entry there).

        ``data`` may also be a list or tuple of bytes-like pieces: stored as
        their concatenation (what :meth:`get_bytes` returns), written piece by
        piece without joining them in memory first.

        Raises:
            CacheError: ``key`` is malformed, ``data`` is not bytes-like, or
                the entry cannot be written.
        """
        pieces = data if isinstance(data, list | tuple) else [data]
        if not pieces or not all(isinstance(p, bytes | bytearray | memoryview) for p in pieces):
            msg = f"ColumnCache.put_bytes() takes bytes, got {type(data).__name__}; encode it first"
            raise CacheError(msg)
        self._check_key(key)
        if self._read_only:
            self._count("skipped_puts")
            return
        self._write(key, _format.encode_bytes(pieces, key=key))

    def set_recency(self, key: str, when: float) -> None:
        """Mark the entry of ``key`` as last used at ``when`` (seconds since the epoch).

        For tools and tests that order entries for :meth:`gc` explicitly.

        Raises:
            CacheError: read-only cache, or no such entry.
        """
        self._require_writable("set_recency")
        path = self.entry_path(key)
        if not self._backend.exists(path):
            msg = f"no cache entry {key} to set the recency of; put() it first"
            raise CacheError(msg)
        if isinstance(self._backend, LocalBackend):
            self._backend.set_mtime(path, when)
        else:
            # object stores cannot set times: keep a marker holding the time
            self._backend.write_atomic(self._used_path(key), [repr(float(when)).encode()])
            self._marked.pop(key, None)  # the next get() marks it used again

    # -- statistics -------------------------------------------------------------------------

    def flush_stats(self) -> None:
        """Write this instance's unwritten counts as one delta file (no-op if none)."""
        if self._read_only:
            return
        with self._lock:
            delta = {k: v for k, v in self._counts.items() if v}
            self._last_flush = time.monotonic()
            if not delta:
                return
            self._counts = dict.fromkeys(_COUNTERS, 0)
            self._seq += 1
            name = f"{_host()}-{os.getpid()}-{self._token}-{self._seq}.json"
        try:
            self._backend.write_atomic(
                self._backend.join("stats", name), [json.dumps(delta).encode()]
            )
        except OSError:
            with self._lock:  # keep the counts for the next attempt
                for k, v in delta.items():
                    self._counts[k] += v

    def _stat_files(self) -> Iterator[FileInfo]:
        for info in self._backend.list_files(self._backend.join("stats"), depth=1):
            if not info.name.startswith(".") and info.name.endswith(".json"):
                yield info

    def _read_counts(self, infos: list[FileInfo]) -> dict[str, int]:
        total = dict.fromkeys(_COUNTERS, 0)
        for info in infos:
            try:
                raw = self._backend.read_bytes(info.path)
                data = json.loads(bytes(raw)) if raw is not None else {}
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                for k in _COUNTERS:
                    v = data.get(k, 0)
                    if isinstance(v, int):
                        total[k] += v
        return total

    def _entries(self) -> list[_Entry]:
        found: dict[str, _Entry] = {}
        for info in self._backend.list_files(self._backend.join("objects"), depth=2):
            if is_valid_key(info.name):
                found[info.name] = _Entry(info.name, info.path, info.size, info.mtime)
        if not self._backend.is_local:
            for info in self._backend.list_files(self._backend.join("used"), depth=2):
                entry = found.get(info.name)
                if entry is None:
                    continue
                when = info.mtime
                if info.size:  # set_recency() marker: the time is its content
                    raw = self._backend.read(info.path)
                    with contextlib.suppress(ValueError):
                        when = float(bytes(raw or b"").decode())
                found[info.name] = _Entry(entry.key, entry.path, entry.size, when)
        return list(found.values())

    def stats(self) -> CacheStats:
        """Entries and bytes stored, and hit/miss counts summed over all processes."""
        self.flush_stats()
        counts = self._read_counts(list(self._stat_files()))
        with self._lock:  # read-only instances cannot write theirs: add them here
            for k, v in self._counts.items():
                counts[k] += v
        entries = self._entries()
        return CacheStats(
            location=self._location,
            entries=len(entries),
            bytes=sum(e.size for e in entries),
            **counts,
        )

    def _fold_stats(self) -> None:
        """Sum all counter files into one, so their number stays small."""
        infos = list(self._stat_files())
        if len(infos) < 2:
            return
        claim = f".claim-{self._token}-"
        claimed: list[FileInfo] = []
        for info in infos:
            dst = info.path[: -len(info.name)] + claim + info.name
            if self._backend.rename(info.path, dst):  # only one folder wins each file
                claimed.append(FileInfo(dst, claim + info.name, info.size, info.mtime))
        total = self._read_counts(claimed)
        with self._lock:
            self._seq += 1
            name = f"{_host()}-{os.getpid()}-{self._token}-{self._seq}.json"
        self._backend.write_atomic(
            self._backend.join("stats", name),
            [json.dumps({k: v for k, v in total.items() if v}).encode()],
        )
        for info in claimed:
            self._backend.remove(info.path)

    # -- maintenance ------------------------------------------------------------------------

    def _require_writable(self, what: str) -> None:
        if self._read_only:
            msg = (
                f"ColumnCache.{what}() needs a writable cache, but {self._location!r} was "
                "opened read-only; open it with read_only=False (and write permission)"
            )
            raise CacheError(msg)

    def gc(self, *, max_bytes: int) -> GCReport:
        """Delete least-recently-used entries until the entries total at most ``max_bytes``.

        Also deletes temporary files older than an hour (crashed writers) and
        folds the hit/miss counter files into one.

        Raises:
            CacheError: read-only cache, or a negative ``max_bytes``.
        """
        self._require_writable("gc")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            msg = f"gc(max_bytes={max_bytes!r}): the cap must be an int >= 0 (bytes)"
            raise CacheError(msg)
        removed_temp = 0
        cutoff = time.time() - STALE_TEMP_AGE
        for top in ("objects", "stats"):
            depth = 2 if top == "objects" else 1
            for info in self._backend.list_files(self._backend.join(top), depth=depth):
                if info.name.startswith(".") and info.mtime < cutoff:
                    removed_temp += self._backend.remove(info.path)
        entries = sorted(self._entries(), key=lambda e: (e.recency, e.key))
        total = sum(e.size for e in entries)
        removed = removed_bytes = 0
        for entry in entries:
            if total <= max_bytes:
                break
            if self._backend.remove(entry.path):
                removed += 1
                removed_bytes += entry.size
            total -= entry.size
            if not self._backend.is_local:
                self._backend.remove(self._used_path(entry.key))
        self.flush_stats()
        self._fold_stats()
        return GCReport(
            max_bytes=max_bytes,
            removed_entries=removed,
            removed_bytes=removed_bytes,
            kept_entries=len(entries) - removed,
            kept_bytes=total,
            removed_temp_files=removed_temp,
        )

    def clear(self) -> int:
        """Delete every entry and the hit/miss counters; returns the number of entries deleted.

        Raises:
            CacheError: read-only cache.
        """
        self._require_writable("clear")
        removed = 0
        for entry in self._entries():
            removed += self._backend.remove(entry.path)
        for top in ("objects", "used", "stats"):
            self._backend.remove_tree(self._backend.join(top))
        with self._lock:
            self._counts = dict.fromkeys(_COUNTERS, 0)
        self._marked.clear()
        return removed


def _host() -> str:
    name = socket.gethostname() or "host"
    return "".join(c if c.isalnum() or c in "._" else "_" for c in name)[:64]
