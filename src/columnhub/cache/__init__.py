"""The column cache: content-addressed, verified, shareable column chunks.

See ``docs/cache.md``. :func:`entry_key` makes keys, :class:`ColumnCache`
stores and serves entries.
"""

from __future__ import annotations

from columnhub.cache.addressing import canonical_json, entry_key, is_valid_key
from columnhub.cache.store import (
    CacheStats,
    ColumnCache,
    ColumnLookup,
    GCReport,
    default_location,
)

__all__ = [
    "CacheStats",
    "ColumnCache",
    "ColumnLookup",
    "GCReport",
    "canonical_json",
    "default_location",
    "entry_key",
    "is_valid_key",
]
