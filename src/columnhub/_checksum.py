"""Checksums of files (private; light: xxhash only).

A delivered part's checksum, the digest of a Parquet file's footer that is
part of its identity, and a local file's stamp (size, modification time,
inode, device). Kept apart from the Parquet writer and the sources
so that a whole-result cache hit checks its files without importing pyarrow.
"""

from __future__ import annotations

import os
import struct
from contextlib import nullcontext
from pathlib import Path

__all__ = ["file_checksum", "footer_hash", "local_stamp"]


def file_checksum(path: Path, *, copy_to: Path | None = None) -> str:
    """The xxh3-64 digest of a file's bytes (hex), read in 16 MiB blocks.

    With ``copy_to``, the bytes are also written there: a copy and its
    verification in one pass.
    """
    import xxhash

    digest = xxhash.xxh3_64()
    with open(path, "rb") as f, open(copy_to, "wb") if copy_to else nullcontext() as out:
        while block := f.read(16 * 1024 * 1024):
            digest.update(block)
            if out is not None:
                out.write(block)
    return digest.hexdigest()


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
