"""A lossless reader and writer of Thrift's compact protocol, for Parquet footers.

Parquet keeps a file's metadata (schema, row groups, the byte offset of every
column chunk) in one Thrift struct at the end of the file. To append row
groups that were encoded separately, their offsets must be moved and their
footers merged; that is all this module is for.

Decoding keeps every field (known to Parquet's IDL or not) with its type and
the form it was written in, so :func:`encode` of :func:`decode` gives back the
exact bytes, whatever version of the format wrote them. Callers check this
(:func:`decode` with ``verify=True``) before relying on a footer.

Specification: https://github.com/apache/thrift/blob/master/doc/specs/thrift-compact-protocol.md
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Field", "Struct", "ThriftError", "decode", "encode"]

STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)
_U64 = (1 << 64) - 1


class ThriftError(ValueError):
    """Bytes that are not a compact-protocol struct this module can round-trip."""


@dataclass
class Field:
    """One field of a struct: its id, compact type, value and header form."""

    id: int
    type: int
    value: Any = None
    long_header: bool = False


@dataclass
class Struct:
    """A struct as read: its fields in the order they were written."""

    fields: list[Field] = field(default_factory=list)

    def get(self, fid: int) -> Field | None:
        """The field with id ``fid``, or ``None``."""
        return next((f for f in self.fields if f.id == fid), None)


@dataclass
class Container:
    """A list or set (``kind`` LIST or SET) of ``elem_type`` values."""

    kind: int
    elem_type: int
    values: list[Any]
    long_size: bool = False


@dataclass
class Map:
    """A map: ``(key, value)`` pairs of the given compact types."""

    key_type: int
    value_type: int
    items: list[tuple[Any, Any]]


class _Reader:
    def __init__(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self.buf = view if view.format == "B" else view.cast("B")
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            msg = "compact protocol data ends inside a value"
            raise ThriftError(msg)
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7
            if shift > 70:
                msg = "a varint longer than 10 bytes"
                raise ThriftError(msg)

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            msg = "compact protocol data ends inside a value"
            raise ThriftError(msg)
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def value(self, ctype: int) -> Any:
        if ctype == BYTE:
            return self.byte()
        if ctype in (I16, I32, I64):
            return self.zigzag()
        if ctype == DOUBLE:
            return self.raw(8)
        if ctype == BINARY:
            return self.raw(self.varint())
        if ctype in (LIST, SET):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            long_size = size == 15
            if long_size:
                size = self.varint()
            # booleans in containers are one byte each (1 true, 2 false): kept raw
            values = [
                self.byte() if elem in (TRUE, FALSE) else self.value(elem) for _ in range(size)
            ]
            return Container(ctype, elem, values, long_size)
        if ctype == MAP:
            size = self.varint()
            if size == 0:
                return Map(0, 0, [])
            kinds = self.byte()
            kt, vt = kinds >> 4, kinds & 0x0F
            items = [(self._elem(kt), self._elem(vt)) for _ in range(size)]
            return Map(kt, vt, items)
        if ctype == STRUCT:
            return self.struct()
        msg = f"unknown compact type {ctype}"
        raise ThriftError(msg)

    def _elem(self, ctype: int) -> Any:
        return self.byte() if ctype in (TRUE, FALSE) else self.value(ctype)

    def struct(self) -> Struct:
        out = Struct()
        last = 0
        while True:
            head = self.byte()
            if head == STOP:
                return out
            delta, ctype = head >> 4, head & 0x0F
            long_header = delta == 0
            fid = self.zigzag() if long_header else last + delta
            value = None if ctype in (TRUE, FALSE) else self.value(ctype)
            out.fields.append(Field(fid, ctype, value, long_header))
            last = fid


class _Writer:
    def __init__(self) -> None:
        self.out = bytearray()

    def varint(self, n: int) -> None:
        n &= _U64
        while n >= 0x80:
            self.out.append((n & 0x7F) | 0x80)
            n >>= 7
        self.out.append(n)

    def zigzag(self, n: int) -> None:
        self.varint((n << 1) ^ (n >> 63))

    def value(self, ctype: int, value: Any) -> None:
        if ctype == BYTE:
            self.out.append(value)
        elif ctype in (I16, I32, I64):
            self.zigzag(value)
        elif ctype == DOUBLE:
            self.out += value
        elif ctype == BINARY:
            self.varint(len(value))
            self.out += value
        elif ctype in (LIST, SET):
            n = len(value.values)
            if value.long_size or n >= 15:
                self.out.append(0xF0 | value.elem_type)
                self.varint(n)
            else:
                self.out.append((n << 4) | value.elem_type)
            for v in value.values:
                self._elem(value.elem_type, v)
        elif ctype == MAP:
            self.varint(len(value.items))
            if value.items:
                self.out.append((value.key_type << 4) | value.value_type)
                for k, v in value.items:
                    self._elem(value.key_type, k)
                    self._elem(value.value_type, v)
        elif ctype == STRUCT:
            self.struct(value)
        else:
            msg = f"unknown compact type {ctype}"
            raise ThriftError(msg)

    def _elem(self, ctype: int, value: Any) -> None:
        if ctype in (TRUE, FALSE):
            self.out.append(value)
        else:
            self.value(ctype, value)

    def struct(self, struct: Struct) -> None:
        last = 0
        for f in struct.fields:
            delta = f.id - last
            if f.long_header or not 0 < delta <= 15:
                self.out.append(f.type)
                self.zigzag(f.id)
            else:
                self.out.append((delta << 4) | f.type)
            if f.type not in (TRUE, FALSE):
                self.value(f.type, f.value)
            last = f.id
        self.out.append(STOP)


def decode(data: bytes | memoryview, *, verify: bool = False) -> Struct:
    """The struct encoded in ``data`` (all of it).

    Args:
        data: one compact-protocol struct, nothing after it.
        verify: check that :func:`encode` gives ``data`` back byte for byte.

    Raises:
        ThriftError: malformed data, trailing bytes, or (``verify``) a form
            this module would not write back identically.
    """
    reader = _Reader(data)
    out = reader.struct()
    if reader.pos != len(reader.buf):
        msg = f"{len(reader.buf) - reader.pos} bytes after the struct"
        raise ThriftError(msg)
    if verify and encode(out) != bytes(data):
        msg = "the struct does not round-trip byte for byte"
        raise ThriftError(msg)
    return out


def encode(struct: Struct) -> bytes:
    """The compact-protocol bytes of ``struct``."""
    writer = _Writer()
    writer.struct(struct)
    return bytes(writer.out)
