"""Event selection of columns (numpy, or compiled for lists of numbers) against ``array[mask]``."""

from __future__ import annotations

import awkward as ak
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from columnhub import _kernels
from columnhub.execute._select import select


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=60),
    seed=st.integers(0, 2**32 - 1),
    skip=st.integers(0, 3),
    dtype=st.sampled_from(["float32", "float64", "int32", "bool"]),
)
def test_select_matches_awkward(lengths: list[int], seed: int, skip: int, dtype: str) -> None:
    rng = np.random.default_rng(seed)
    content = (rng.random(sum(lengths)) * 50).astype(dtype)
    jagged = ak.unflatten(content, np.asarray(lengths))[skip:]  # offsets not starting at 0
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    singles = ak.contents.ListOffsetArray(  # lists of one-item lists
        ak.index.Index64(np.arange(len(content) + 1)), ak.contents.NumpyArray(content)
    )
    nested = ak.Array(ak.contents.ListOffsetArray(ak.index.Index64(offsets), singles))[skip:]
    flat = (rng.random(len(lengths)) * 50).astype(dtype)[skip:]
    mask = rng.random(len(jagged)) < 0.6
    loaded = _kernels.numba_loaded
    try:
        for path in (False, True):  # numpy, then the compiled kernel (numba loaded)
            _kernels.numba_loaded = lambda path=path: path  # type: ignore[misc]
            for column in (jagged, nested, flat):
                got = select(column, mask)
                expected = ak.Array(column)[mask]
                assert got.tolist() == expected.tolist()
                assert got.type == expected.type
    finally:
        _kernels.numba_loaded = loaded  # type: ignore[misc]
