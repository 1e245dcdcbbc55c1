"""Checksums of files (private; light: xxhash only).

A delivered part's checksum, the digest of a Parquet file's footer that is
part of its identity, and a local file's stamp (size, modification time,
inode, device). Kept apart from the Parquet writer and the sources
so that a whole-result cache hit checks its files without importing pyarrow.
"""

from __future__ import annotations

import os
import struct
import sys
from contextlib import nullcontext
from pathlib import Path

__all__ = ["file_checksum", "footer_hash", "local_stamp"]


#: bytes read (and written) at a time by :func:`file_checksum`
_BLOCK = 1024 * 1024

#: ``ioctl`` request FICLONE (``linux/fs.h``): make a file share another's data blocks
_FICLONE = 0x40049409


def file_checksum(path: Path, *, copy_to: Path | None = None) -> str:
    """The xxh3-64 digest of a file's bytes (hex), read in 16 MiB blocks.

    With ``copy_to``, the bytes are also written there: a copy and its
    verification in one pass. Where the file system can share data blocks
    between files (XFS, btrfs: a reflink), the copy is a clone made at once,
    whatever its size, and the digest is the clone's own bytes, read back.
    """
    if copy_to is not None and _cloned(path, copy_to):
        return file_checksum(copy_to)
    import xxhash

    digest = xxhash.xxh3_64()
    # one buffer, filled again and again: a fresh 16 MiB block per read would be
    # a fresh mapping whose pages fault in each time (a third of a copy's time)
    buffer = memoryview(bytearray(_BLOCK))
    with open(path, "rb", buffering=0) as f, open(copy_to, "wb", buffering=0) if copy_to else nullcontext() as out:
        while n := f.readinto(buffer):
            block = buffer[:n]
            digest.update(block)
            if out is not None:
                while block:
                    block = block[out.write(block):]
    return digest.hexdigest()



def _cloned(source: Path, target: Path) -> bool:
    """Make ``target`` a reflink of ``source``; False where the file system cannot.

    A clone shares the source's blocks until either file is written
    (copy-on-write), so it costs no data copy. Other file systems (ext4,
    tmpfs, most network file systems), two different file systems and other
    platforms answer with an error, and the caller copies instead (``target``
    is left empty).
    """
    if sys.platform != "linux":
        return False
    import fcntl

    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
        except OSError:
            return False
    return True


def footer_hash(path: str) -> str | None:
    """The xxh3-64 digest of a local Parquet file's footer (its metadata), or ``None``.

    The footer holds every row group's offsets, sizes and column statistics,
    so a file rewritten with other values almost surely has another footer,
    even with the same size and modification time. Two small reads; ``None``
    when the file cannot be read or is not Parquet.
    """
    import xxhash

    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size < 12:
                return None
            handle.seek(size - 8)
            length, magic = struct.unpack("<I4s", handle.read(8))
            if magic != b"PAR1" or length > size - 12:
                return None
            handle.seek(size - 8 - length)
            return str(xxhash.xxh3_64_hexdigest(handle.read(length)))
    except OSError:
        return None


def local_stamp(path: str) -> dict[str, int]:
    """Size, modification time, inode and device of a local file (one ``stat``).

    Raises:
        OSError: the file cannot be stat'ed (gone, no permission).
    """
    stat = os.stat(path)
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "inode": stat.st_ino,
        "device": stat.st_dev,
    }
