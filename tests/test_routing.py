"""The friend exchange's routing, chunk by chunk, against a brute-force placement.

On a Dask cluster the routing's work runs as one locate task per primary
chunk (:func:`~columnhub.join.exchange.locate_rows`) and one small task that
combines them (:func:`~columnhub.join.exchange.combine_routes`). Pure
functions, tested here without a cluster (a cluster's threads would disturb
hypothesis's check of the global random state).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from columnhub.join.exchange import blocks, combine_routes, locate_rows
from columnhub.join.index import KeyIndex


@settings(deadline=None)  # the first example loads the key kernels
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    target=st.integers(1, 25),
    chunks=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_routing_chunk_by_chunk_matches_a_brute_force_placement(
    sizes: list[int], target: int, chunks: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    total = sum(sizes)
    # the friend's files, with row-group boundaries every few entries
    bounds = []
    for size in sizes:
        inner = sorted(set(rng.integers(1, size, size=3).tolist())) if size >= 2 else []
        bounds.append([0, *inner, size])
    layout = blocks(bounds, target)
    index = KeyIndex.from_files(
        [{"event": np.arange(size, dtype=np.uint64) + sum(sizes[:i])} for i, size in enumerate(sizes)]
    )
    per_chunk = [
        np.where(rng.random(n) < 0.8, rng.integers(0, max(total, 1), size=n), -1).astype(np.int64)
        if total else np.full(n, -1, dtype=np.int64)
        for n in rng.integers(0, 30, size=chunks)
    ]
    routing = combine_routes([locate_rows(index, r, layout) for r in per_chunk], layout)
    # brute force: the file and entry of each dataset row, and the block that holds it
    starts = np.concatenate([[0], np.cumsum(sizes)])
    got: dict[tuple[int, int], tuple[int, int, int]] = {}
    for block, (lo, hi), targets in zip(routing.blocks, routing.ranges, routing.targets, strict=True):
        assert block.start <= lo < hi <= block.stop
        for c, positions, entries in targets:
            for p, e in zip(positions.tolist(), entries.tolist(), strict=True):
                assert (c, p) not in got  # each chunk row routed once
                got[(c, p)] = (block.file, lo + e, hi)
    want = {}
    for c, rows in enumerate(per_chunk):
        for p, r in enumerate(rows.tolist()):
            if r < 0:
                continue
            file = int(np.searchsorted(starts, r, side="right") - 1)
            want[(c, p)] = (file, r - int(starts[file]))
    assert {k: v[:2] for k, v in got.items()} == want
    for file, entry, _ in got.values():  # the block holding it is the layout's
        [b] = [b for b in layout if b.file == file and b.start <= entry < b.stop]
        assert b in routing.blocks
