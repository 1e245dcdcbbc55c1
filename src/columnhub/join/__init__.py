"""Event-key joins: key index, matching, validation and gathering (in memory).

The executor calls, per request: :meth:`KeyIndex.build` (once per dataset,
cached via :meth:`KeyIndex.to_bytes`), :func:`check_unique` on the primary
index when ``validate`` needs it, then per primary chunk :func:`match`,
:func:`fetch_plan` and :func:`gather`; for right/outer joins
:func:`unmatched_rows` once. :func:`join_arrays` does a whole join in memory.
A keyed friend scattered relative to the primary is exchanged first, once per
request (:mod:`columnhub.join.exchange`): each of its row groups read once.
"""

from __future__ import annotations

from columnhub.join.gather import gather, join_arrays
from columnhub.join.index import Duplicate, KeyIndex, sort_words
from columnhub.join.match import (
    FetchPlan,
    Match,
    fetch_plan,
    match,
    match_indexes,
    unmatched_rows,
)
from columnhub.join.validate import (
    HOWS,
    VALIDATES,
    check_aligned,
    check_how,
    check_unique,
    duplicate_error,
    needs_unique,
)

__all__ = [
    "HOWS",
    "VALIDATES",
    "Duplicate",
    "FetchPlan",
    "KeyIndex",
    "Match",
    "check_aligned",
    "check_how",
    "check_unique",
    "duplicate_error",
    "fetch_plan",
    "gather",
    "join_arrays",
    "match",
    "match_indexes",
    "needs_unique",
    "sort_words",
    "unmatched_rows",
]
