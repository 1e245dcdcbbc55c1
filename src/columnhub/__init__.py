"""columnhub: select, join, compute, cache and deliver columns of HEP event data."""

from __future__ import annotations

from columnhub.errors import ColumnhubError

__version__ = "0.1.0"

__all__ = ["ColumnhubError", "__version__"]
