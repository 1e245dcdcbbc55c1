"""The on-disk format of one cache entry (private; the store owns its use).

One entry is one file::

    offset 0   fixed prefix, 32 bytes, little-endian
               magic    8s   b"CHCACHE\\0"
               version  u16  FORMAT_VERSION
               kind     u16  1 = awkward array, 2 = opaque bytes
               hlen     u32  length of the JSON header (incl. space padding)
               plen     u64  length of the payload
               checksum u64  xxh3_64 of prefix[0:24] + header + payload
    offset 32  JSON header, space-padded so the payload starts 64-aligned:
               awkward: {"key": <the entry's key>, "form": <form dict>, "length": n,
                         "buffers": [[name, dtype, offset, nbytes], ...]}
               bytes:   {"key": <the entry's key>}
    offset 32+hlen  payload: the raw buffers, each at a 64-aligned offset
               (relative to the payload start), zero-padded between.

Reading is one read into an aligned NumPy byte array, one checksum pass and
``np.frombuffer`` views handed to ``ak.from_buffers``: no copy, no parsing of
the data. Any inconsistency raises :class:`CorruptEntry`, and so does an
entry whose stored key (covered by the checksum) is not the key it is read
under: a valid entry file copied over another key's file is never served.
Version 1 entries (without the key) read as corrupt, i.e. as misses.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import xxhash

if TYPE_CHECKING:  # loaded for arrays only: a blob is read without numpy or awkward
    import awkward as ak
    import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "KIND_ARRAY",
    "KIND_BYTES",
    "PREFIX_SIZE",
    "CorruptEntry",
    "Decoded",
    "decode",
    "encode_array",
    "encode_bytes",
]

MAGIC: Final = b"CHCACHE\x00"
FORMAT_VERSION: Final = 2  # 2: the header holds the entry's key
KIND_ARRAY: Final = 1
KIND_BYTES: Final = 2
_PREFIX = struct.Struct("<8sHHIQQ")
PREFIX_SIZE: Final = _PREFIX.size  # 32
_ALIGN: Final = 64
_ZEROS: Final = bytes(_ALIGN)


class CorruptEntry(Exception):
    """An entry's bytes do not form a valid entry (the reason is the message)."""


@dataclass(frozen=True)
class Decoded:
    """A verified entry: its kind and its value."""

    kind: int
    value: ak.Array | bytes


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def _assemble(
    kind: int, header: dict[str, Any], payload: list[memoryview], plen: int
) -> list[memoryview]:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * _pad(PREFIX_SIZE + len(text))
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, kind, len(text), plen, 0)[: PREFIX_SIZE - 8]
    h = xxhash.xxh3_64()
    h.update(head)
    h.update(text)
    for part in payload:
        h.update(part)
    prefix = head + struct.pack("<Q", h.intdigest())
    return [memoryview(prefix), memoryview(text), *payload]


def encode_array(array: ak.Array, *, key: str) -> list[memoryview]:
    """The chunks of the entry file holding ``array`` under ``key`` (write them in order)."""
    import awkward as ak
    import numpy as np

    form, length, container = ak.to_buffers(array, byteorder="<")
    buffers: list[list[Any]] = []
    payload: list[memoryview] = []
    offset = 0
    for name, raw in container.items():
        arr = np.ascontiguousarray(raw)
        view = arr.reshape(-1).view(np.uint8).data
        buffers.append([name, arr.dtype.str, offset, arr.nbytes])
        payload.append(view)
        offset += arr.nbytes
        pad = _pad(offset)
        if pad:
            payload.append(memoryview(_ZEROS[:pad]))
            offset += pad
    header = {"key": key, "form": form.to_dict(), "length": int(length), "buffers": buffers}
    return _assemble(KIND_ARRAY, header, payload, offset)


def encode_bytes(
    data: bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview], *, key: str
) -> list[memoryview]:
    """The chunks of the entry file holding the opaque ``data`` under ``key``.

    ``data`` may be a sequence of pieces, stored as their concatenation
    without joining them first.
    """
    pieces = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
    views = [memoryview(p).cast("B") for p in pieces]
    return _assemble(KIND_BYTES, {"key": key}, views, sum(v.nbytes for v in views))


def decode(buf: np.ndarray[Any, np.dtype[np.uint8]] | bytes, *, key: str) -> Decoded:
    """Verify and decode a whole entry file held in ``buf`` (views, no copy).

    Args:
        buf: the entry file's bytes.
        key: the key it is read under; the entry must hold that key.

    Raises:
        CorruptEntry: wrong magic/version/kind, sizes that do not add up, a
            checksum mismatch, an entry of another key, or a header that does
            not describe the payload.
    """
    mv = memoryview(buf).cast("B") if isinstance(buf, bytes) else buf.data
    size = int(mv.nbytes)
    if size < PREFIX_SIZE:
        msg = f"truncated: {size} bytes, shorter than the {PREFIX_SIZE}-byte prefix"
        raise CorruptEntry(msg)
    magic, version, kind, hlen, plen, checksum = _PREFIX.unpack(mv[:PREFIX_SIZE])
    if magic != MAGIC:
        msg = f"bad magic {magic!r}"
        raise CorruptEntry(msg)
    if version != FORMAT_VERSION:
        msg = f"format version {version}, this columnhub reads {FORMAT_VERSION}"
        raise CorruptEntry(msg)
    if PREFIX_SIZE + hlen + plen != size:
        msg = f"size {size} != {PREFIX_SIZE} + header {hlen} + payload {plen} (truncated?)"
        raise CorruptEntry(msg)
    h = xxhash.xxh3_64()
    h.update(mv[: PREFIX_SIZE - 8])
    h.update(mv[PREFIX_SIZE:])
    if h.intdigest() != checksum:
        msg = "checksum mismatch"
        raise CorruptEntry(msg)
    start = PREFIX_SIZE + hlen
    if kind not in (KIND_ARRAY, KIND_BYTES):
        msg = f"unknown entry kind {kind}"
        raise CorruptEntry(msg)
    try:
        header = json.loads(bytes(mv[PREFIX_SIZE:start]))
        stored = header.get("key") if isinstance(header, dict) else None
    except ValueError as err:
        msg = f"header does not decode: {type(err).__name__}: {err}"
        raise CorruptEntry(msg) from err
    if stored != key:
        msg = f"the entry holds key {stored!r}, not {key!r} (a file copied over another's?)"
        raise CorruptEntry(msg)
    if kind == KIND_BYTES:
        return Decoded(KIND_BYTES, bytes(mv[start:]))
    import awkward as ak  # an array entry (a blob needs neither)
    import numpy as np

    try:
        container: dict[str, np.ndarray[Any, Any]] = {}
        for name, dtype, offset, nbytes in header["buffers"]:
            if offset < 0 or nbytes < 0 or offset + nbytes > plen:
                msg = f"buffer {name!r} [{offset}, {offset + nbytes}) outside the payload"
                raise CorruptEntry(msg)
            dt = np.dtype(dtype)
            container[name] = np.frombuffer(
                buf, dtype=dt, count=nbytes // dt.itemsize, offset=start + offset
            )
        form = ak.forms.from_dict(header["form"])
        array = ak.from_buffers(form, header["length"], container, byteorder="<")
    except CorruptEntry:
        raise
    except Exception as err:  # a checksummed header that still does not decode
        msg = f"header does not decode: {type(err).__name__}: {err}"
        raise CorruptEntry(msg) from err
    return Decoded(KIND_ARRAY, array)
