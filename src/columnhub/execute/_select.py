"""Fast event selection of columns: a boolean mask applied with plain numpy.

``array[mask]`` on a jagged awkward array returns a ``ListArray`` (starts and
stops into the old content) that every writer must then compact, a slow
generic path. For the layouts sources produce (numpy arrays and lists of
numbers, possibly nested) compacting directly is several times faster: with
numpy (the mask repeated by the list lengths), or, once this process has
loaded numba anyway (a join did), lists of numbers with a compiled two-pass
kernel (:func:`columnhub._kernels.select_lists`); anything else falls back to
awkward. Both give the same arrays; a plain delivery never pays numba's
0.6 s load (and 0.4 s exit) for a selection.
"""

from __future__ import annotations

from typing import Any

import awkward as ak
import numpy as np

from columnhub import _kernels

__all__ = ["select"]


def select(array: Any, mask: np.ndarray) -> ak.Array:
    """The rows of ``array`` where ``mask`` is true, as a compact array."""
    layout = ak.to_layout(array, allow_record=False)
    out = _select(layout, mask)
    if out is None:
        return ak.Array(array)[mask]
    return ak.Array(out)


def _select(layout: Any, mask: np.ndarray) -> Any:
    if isinstance(layout, ak.contents.NumpyArray) and layout.data.ndim == 1:
        return ak.contents.NumpyArray(np.asarray(layout.data)[mask], parameters=layout.parameters)
    if (
        isinstance(layout, ak.contents.ListOffsetArray)
        and isinstance(layout.content, ak.contents.NumpyArray)
        and isinstance(layout.content.data, np.ndarray)
        and layout.content.data.ndim == 1
        and layout.content.data.dtype.isnative
        and _kernels.numba_loaded()
    ):
        new_offsets, values = _kernels.select_lists(
            np.asarray(layout.offsets.data), np.asarray(layout.content.data), mask
        )
        content = ak.contents.NumpyArray(values, parameters=layout.content.parameters)
        return ak.contents.ListOffsetArray(
            ak.index.Index64(new_offsets), content, parameters=layout.parameters
        )
    if isinstance(layout, ak.contents.ListOffsetArray):
        offsets = np.asarray(layout.offsets.data)
        start, stop = int(offsets[0]), int(offsets[-1])
        counts = np.diff(offsets)
        inner_mask = np.repeat(mask, counts)
        content = (
            layout.content[start:stop] if (start or stop != len(layout.content)) else layout.content
        )
        inner = _select(content, inner_mask)
        if inner is None:
            return None
        kept = counts[mask]
        new_offsets = np.empty(len(kept) + 1, dtype=np.int64)
        new_offsets[0] = 0
        np.cumsum(kept, out=new_offsets[1:])
        return ak.contents.ListOffsetArray(
            ak.index.Index64(new_offsets), inner, parameters=layout.parameters
        )
    return None
