"""The manifest: the description of a delivered result (``manifest.json``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST", "read_manifest", "write_manifest"]

MANIFEST = "manifest.json"


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (temp file + rename)."""
    path = directory / MANIFEST
    tmp = directory / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest in ``directory``, or ``None`` if there is none."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data
