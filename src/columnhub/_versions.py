"""Code versions that are part of every cache key (private; no imports, loads at once).

Kept out of :mod:`columnhub.plan` so that a whole-result cache hit can name
them without importing numpy (see :mod:`columnhub._fastpath`).
"""

from __future__ import annotations

__all__ = ["PROVIDER_VERSIONS"]

#: Bumped whenever a provider's output for the same inputs could change; part
#: of every cache key, so old cache entries are never served by newer code.
#: define/where 2: three-valued (Kleene) logic over missing values (issue 9.1);
#: friend 2: friend columns keep their names and fill primary collections.
PROVIDER_VERSIONS = {"source": 1, "define": 2, "where": 2, "friend": 2, "model": 1}
