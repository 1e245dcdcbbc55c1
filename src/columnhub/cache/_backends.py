"""Storage backends of the column cache (private): local directory or fsspec.

Both offer the same few operations on paths below a root: read a whole file,
write one atomically, remove, mark as used, list. The store above them owns
the layout and the logic; these only do I/O.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import mmap
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "MMAP_MIN_BYTES",
    "FileInfo",
    "FsspecBackend",
    "LocalBackend",
    "is_network_fs",
    "temp_name",
]

#: Entries at least this large are memory-mapped on local filesystems.
MMAP_MIN_BYTES = 1 << 20
_MAP_FLAGS = getattr(mmap, "MAP_SHARED", 0) | getattr(mmap, "MAP_POPULATE", 0)

# Filesystems where a file replaced or removed by another client can make a
# mapped page fault (SIGBUS / ESTALE): read those with plain reads instead.
_NETWORK_FS = (
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "afs",
    "beegfs", "glusterfs", "9p", "fuse",
)  # fmt: skip


@functools.lru_cache(maxsize=64)
def is_network_fs(path: str) -> bool:
    """Whether ``path`` lies on a network or FUSE filesystem (per /proc/self/mounts).

    ``False`` where the mount table cannot be read (non-Linux).
    """
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    real = os.path.realpath(path)
    best, fstype = "", ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, fields[2]
    return fstype.startswith(_NETWORK_FS)


@dataclass(frozen=True)
class FileInfo:
    """One listed file: full path, base name, size in bytes, modification time."""

    path: str
    name: str
    size: int
    mtime: float


def temp_name(name: str) -> str:
    """A unique hidden temporary name next to ``name`` (same directory)."""
    return f".{name}.{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}.tmp"


class LocalBackend:
    """A cache directory on a local (or NFS-style mounted) filesystem."""

    is_local = True

    def __init__(self, root: str) -> None:
        self.root = root
        self.use_mmap = hasattr(mmap, "MAP_SHARED") and not is_network_fs(root)

    def join(self, *parts: str) -> str:
        """A path below the root."""
        return os.path.join(self.root, *parts)

    def read_bytes(self, path: str) -> bytes | None:
        """The whole (small) file as bytes, or ``None`` if absent: a blob, without numpy."""
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read(self, path: str) -> np.ndarray[Any, np.dtype[np.uint8]] | None:
        """The whole file as one read-only byte array, or ``None`` if absent.

        Entries of at least :data:`MMAP_MIN_BYTES` on a local filesystem are
        memory-mapped (no copy out of the page cache); smaller ones, and all
        on network filesystems, are read with one ``readinto``.

        Raises:
            OSError: the file exists but cannot be read completely.
        """
        import numpy as np

        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size >= MMAP_MIN_BYTES and self.use_mmap:
                try:
                    m = mmap.mmap(f.fileno(), size, flags=_MAP_FLAGS, prot=mmap.PROT_READ)
                except (OSError, ValueError):  # e.g. vm.max_map_count reached
                    pass
                else:
                    return np.frombuffer(m, dtype=np.uint8)
            buf = np.empty(size, dtype=np.uint8)
            view = buf.data
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        out = buf[:got] if got != size else buf
        out.flags.writeable = False
        return out

    def write_atomic(
        self, path: str, chunks: Sequence[memoryview | bytes], *, durable: bool = True
    ) -> None:
        """Write ``chunks`` to a temp file beside ``path`` and rename it over ``path``.

        Readers see either the old file, no file, or the complete new one. With
        ``durable`` the file is fsynced before the rename (it survives a power
        loss whole); without it the rename may reach the disk before the data,
        so after a crash the file can be short or hold zeros: only for files
        whose readers verify them (cache entries carry their size and checksum).
        """
        directory, name = os.path.split(path)
        for attempt in range(3):
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, temp_name(name))
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:  # a concurrent clear() removed the directory
                if attempt == 2:
                    raise
                continue
            try:
                with open(fd, "wb") as f:
                    f.writelines(chunks)
                    if durable:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                self.remove(tmp)
                raise
            return

    def remove(self, path: str) -> bool:
        """Remove a file; ``False`` if it was not there (or cannot be removed)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError:
            return False
        return True

    def rename(self, src: str, dst: str) -> bool:
        """Atomically rename; ``False`` if ``src`` is gone (someone else took it)."""
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return False
        return True

    def touch(self, path: str) -> None:
        """Set the file's modification time to now (best effort)."""
        with contextlib.suppress(OSError):
            os.utime(path)

    def set_mtime(self, path: str, when: float) -> None:
        """Set the file's modification (and access) time to ``when``."""
        os.utime(path, (when, when))

    def exists(self, path: str) -> bool:
        """Whether a file is at ``path``."""
        return os.path.isfile(path)

    def list_files(self, directory: str, *, depth: int) -> Iterator[FileInfo]:
        """Files ``depth`` levels below ``directory`` (1: its files; 2: its dirs' files)."""
        try:
            it = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return
        with it:
            for entry in it:
                try:
                    if depth > 1:
                        if entry.is_dir(follow_symlinks=False):
                            yield from self.list_files(entry.path, depth=depth - 1)
                    elif entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        yield FileInfo(entry.path, entry.name, st.st_size, st.st_mtime)
                except FileNotFoundError:  # removed while listing
                    continue

    def remove_tree(self, directory: str) -> None:
        """Remove a directory and everything under it (best effort)."""
        shutil.rmtree(directory, ignore_errors=True)


def _info_mtime(info: dict[str, Any]) -> float:
    for field in ("mtime", "LastModified", "last_modified", "modified", "updated", "created"):
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, _dt.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=_dt.UTC)
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return _dt.datetime.fromisoformat(value).timestamp()
            except ValueError:
                continue
    return 0.0


class FsspecBackend:
    """A cache below any fsspec URL (object stores, ``memory://``, ...).

    Atomicity: the entry is written under a temporary name and moved into
    place; object stores make each object appear whole. Object stores cannot
    change a file's time, so :meth:`touch` writes an empty *used* marker, whose
    path the store chooses.
    """

    is_local = False

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def join(self, *parts: str) -> str:
        """A path below the root."""
        return "/".join([self.root, *parts])

    def read(self, path: str) -> bytes | None:
        """The whole file, or ``None`` if absent."""
        try:
            data: bytes = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return data

    read_bytes = read

    def write_atomic(
        self, path: str, chunks: Sequence[memoryview | bytes], *, durable: bool = True
    ) -> None:
        """Write under a temporary name, then move into place (``durable``: the store's own)."""
        del durable  # an object store makes an object durable when the write returns
        directory, _, name = path.rpartition("/")
        tmp = f"{directory}/{temp_name(name)}"
        data = b"".join(chunks)
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        except BaseException:
            self.remove(tmp)
            raise

    def remove(self, path: str) -> bool:
        """Remove a file; ``False`` if it was not there (or cannot be removed)."""
        try:
            self.fs.rm_file(path)
        except (FileNotFoundError, OSError):
            return False
        return True

    def rename(self, src: str, dst: str) -> bool:
        """Move ``src`` to ``dst``; ``False`` if ``src`` is gone (best effort on stores)."""
        try:
            self.fs.mv(src, dst)
        except FileNotFoundError:
            return False
        return True

    def touch(self, path: str) -> None:
        """Write an empty marker file at ``path`` (best effort)."""
        with contextlib.suppress(OSError):
            self.fs.pipe_file(path, b"")

    def set_mtime(self, path: str, when: float) -> None:
        """Object stores cannot set times; kept for interface symmetry (no-op)."""
        del path, when

    def exists(self, path: str) -> bool:
        """Whether a file is at ``path``."""
        return bool(self.fs.isfile(path))

    def list_files(self, directory: str, *, depth: int) -> Iterator[FileInfo]:
        """Files ``depth`` levels below ``directory``."""
        try:
            found = self.fs.find(directory, maxdepth=depth, detail=True)
        except FileNotFoundError:
            return
        prefix = directory.rstrip("/") + "/"
        for path, info in found.items():
            if info.get("type") != "file":
                continue
            if not path.startswith(prefix) or path.count("/") - prefix.count("/") != depth - 1:
                continue
            name = path.rpartition("/")[2]
            yield FileInfo(path, name, int(info.get("size") or 0), _info_mtime(info))

    def remove_tree(self, directory: str) -> None:
        """Remove a directory and everything under it (best effort)."""
        with contextlib.suppress(OSError):
            self.fs.rm(directory, recursive=True)


def now() -> float:
    """Wall-clock time (seconds since the epoch) used for recency."""
    return time.time()
