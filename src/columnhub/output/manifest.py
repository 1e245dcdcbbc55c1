"""The manifest: the description of a delivered result (``manifest.json``).

A result is published by one atomic rename of its manifest; see
:func:`columnhub.delivery._publish` for the whole protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from columnhub.errors import OutputError

__all__ = ["MANIFEST", "fsync_path", "read_manifest", "write_manifest"]

MANIFEST = "manifest.json"


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk (``fsync`` of a read-only open)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically: a temp file, flushed to disk, then one rename.

    On any failure (a full disk) the temp file is removed and the manifest
    that was there before is unchanged.
    """
    path = directory / MANIFEST
    # unique per writer, not only per process (two threads of a service)
    tmp = directory / f".{MANIFEST}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename on disk too (not every file system can)
        fsync_path(directory)
    return path


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest in ``directory``, or ``None`` if there is none.

    Raises:
        OutputError: ``manifest.json`` is there but is not a columnhub manifest.
    """
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        msg = (
            f"{path} is not a columnhub manifest ({err}); it was edited or written by "
            "something else. Remove the directory's contents or choose another directory"
        )
        raise OutputError(msg) from err
    if not isinstance(data, dict):
        msg = f"{path} is not a columnhub manifest (a JSON {type(data).__name__}, not an object)"
        raise OutputError(msg)
    return data
