"""The checksum of a delivered part file (private; light: xxhash only).

Kept apart from the Parquet writer so that a whole-result cache hit verifies
the parts it returns without importing pyarrow.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

__all__ = ["file_checksum"]


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
