"""Cache addressing: how a column chunk's key is made from what determines it.

A key is the hex BLAKE2b-128 digest of a canonical JSON text of keyword
*parts*. The same parts always give the same key, in any process, on any
machine and with any Python version; any change of any part gives another key.

Parts the chunked executor passes for one column of one chunk (names are a
convention; every part is hashed, so whatever the executor passes is safe as
long as it passes it consistently):

* ``file``: the input file's identity, as the dataset layer's
  ``file_identity()`` returns it (ROOT file UUID + size + mtime, or an ETag);
  never just the path, so a rewritten file never serves stale columns.
* ``tree``: the tree name, e.g. ``"Events"``.
* ``entry_start`` / ``entry_stop``: the chunk's entry range (``stop``
  exclusive).
* ``column``: the column's canonical definition: a branch name, or the
  normalised expression / model card (name, version, inputs) that computes
  it; not the user's alias.
* ``provider``: the code version of whatever produced the column (e.g.
  ``"uproot-5.3.1"``, ``"expr-2"``, ``"onnx:btag@3"``).

Friend-dataset key indexes use ``kind="key-index"`` with the file identities
of the dataset and the key column names.

Canonical JSON: keys sorted, no whitespace, ASCII only; ``True``/``False``,
``None``, ``int`` (any size), ``str``, lists/tuples (tuples become lists) and
dicts with ``str`` keys are written as JSON. Floats are written as the tag
object ``{"$float": float.hex(x)}`` so ``1.0`` and ``1`` (and ``0.1`` printed
two ways) can never be confused; ``bytes`` as ``{"$bytes": hex}``. NumPy
scalars count as the Python scalar they hold. Anything else is refused
(:class:`~columnhub.errors.CacheError`) rather than stringified by accident.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Mapping
from typing import Any

from columnhub.errors import CacheError

__all__ = ["KEY_PATTERN", "KEY_SCHEMA", "canonical_json", "entry_key", "is_valid_key"]

#: Prefixed to every canonical text before hashing; bump to invalidate all keys.
KEY_SCHEMA = "columnhub-cache-key/1"

#: What the store accepts as a key: lower-case hex, 16 to 128 digits.
KEY_PATTERN = re.compile(r"[0-9a-f]{16,128}")


def _canonical(value: Any, where: str) -> Any:
    """``value`` as plain JSON data with floats and bytes tagged."""
    if value is None or isinstance(value, bool | str):
        return value
    np = sys.modules.get("numpy")  # not imported: no value is a numpy scalar
    if np is not None and not hasattr(np, "floating"):  # still being imported by another thread
        np = None
    if np is not None and isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int) or (np is not None and isinstance(value, np.integer)):
        return int(value)
    if isinstance(value, float) or (np is not None and isinstance(value, np.floating)):
        x = float(value)
        return {"$float": "nan" if math.isnan(x) else x.hex()}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, list | tuple):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                msg = (
                    f"cache key part {where} has a non-string dict key {k!r} "
                    f"({type(k).__name__}); use str keys"
                )
                raise CacheError(msg)
            out[k] = _canonical(v, f"{where}[{k!r}]")
        return out
    msg = (
        f"cache key part {where} has type {type(value).__name__} ({value!r:.80}); allowed: "
        "None, bool, int, float, str, bytes, list, tuple, dict with str keys "
        "(convert it, e.g. str(path) or a dict of its fields)"
    )
    raise CacheError(msg)


def canonical_json(parts: Mapping[str, Any]) -> str:
    """The canonical JSON text of ``parts`` that :func:`entry_key` hashes.

    >>> canonical_json({"b": 1.0, "a": (1, "x")})
    '{"a":[1,"x"],"b":{"$float":"0x1.0000000000000p+0"}}'
    """
    data = _canonical(dict(parts), "")
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_key(**parts: Any) -> str:
    """The cache key (32 hex digits) of an entry described by ``parts``.

    Args:
        **parts: what determines the entry, e.g. ``file``, ``tree``,
            ``entry_start``, ``entry_stop``, ``column``, ``provider`` (see the
            module docstring). Values: JSON-like data; floats and bytes are
            tagged, other types are refused.

    Returns:
        The lower-case hex BLAKE2b-128 digest of :data:`KEY_SCHEMA` and the
        canonical JSON of ``parts``.

    Raises:
        CacheError: no parts, or a part of a type that has no canonical form.

    >>> entry_key(tree="Events", entry_start=0, entry_stop=10) == entry_key(
    ...     entry_stop=10, tree="Events", entry_start=0)
    True
    >>> len(entry_key(column="Jet_pt"))
    32
    """
    if not parts:
        msg = "entry_key() needs at least one part, e.g. entry_key(file=..., column=...)"
        raise CacheError(msg)
    text = KEY_SCHEMA + "\n" + canonical_json(parts)
    return hashlib.blake2b(text.encode("ascii"), digest_size=16).hexdigest()


def is_valid_key(key: object) -> bool:
    """Whether ``key`` is a string the store accepts as a key (16-128 hex digits)."""
    return isinstance(key, str) and KEY_PATTERN.fullmatch(key) is not None
