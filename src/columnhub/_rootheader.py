"""A local ROOT file's identity from its header bytes, without uproot (private).

The first bytes of every ROOT file are a fixed record (``TFile::WriteHeader``)::

    "root"  fVersion  fBEGIN  fEND  fSeekFree  fNbytesFree  nfree  fNbytesName
    fUnits  fCompress  fSeekInfo  fNbytesInfo  fUUID (version u16 + 16 bytes)

big-endian, with ``fEND``, ``fSeekFree`` and ``fSeekInfo`` 8 bytes wide when
``fVersion >= 1000000`` (files over 2 GB). The UUID read here is the one
uproot reports as ``file.uuid`` (tested on every sample file), so a cache
hit can be recognised without importing uproot.
"""

from __future__ import annotations

import os
import struct
import uuid

__all__ = ["HEADER_BYTES", "parse_uuid", "read_uuid"]

_SMALL = struct.Struct(">4siiiiiiiBiiiH16s")
_BIG = struct.Struct(">4siiqqiiiBiqiH16s")
_BIG_VERSION = 1_000_000
#: bytes to read from the start of a file for :func:`parse_uuid` (70)
HEADER_BYTES = _BIG.size


def read_uuid(path: str | os.PathLike[str]) -> str | None:
    """The UUID in the header of the local ROOT file ``path``, as uproot spells it.

    Returns:
        The UUID (``str(uuid.UUID)``), or ``None`` when the file cannot be read
        or does not start like a ROOT file (the caller then takes the path
        that opens it with uproot and names the problem).
    """
    try:
        with open(path, "rb") as f:
            return parse_uuid(f.read(HEADER_BYTES))
    except OSError:
        return None


def parse_uuid(head: bytes) -> str | None:
    """The UUID in the first :data:`HEADER_BYTES` bytes of a ROOT file, or ``None``."""
    if len(head) < _SMALL.size or head[:4] != b"root":
        return None
    version = struct.unpack_from(">i", head, 4)[0]
    layout = _BIG if version >= _BIG_VERSION else _SMALL
    if len(head) < layout.size:
        return None
    return str(uuid.UUID(bytes=layout.unpack_from(head)[-1]))
