"""NanoAOD collections: which columns form one, and keeping a collection whole.

NanoAOD names a collection by the text before the first ``_`` of its
branches (``Jet_pt``, ``Jet_eta`` -> ``Jet``) and stores its size per event in
a counter branch ``n<collection>`` (``nJet``). coffea's ``NanoAODSchema``
builds ``events.Jet`` from the counter's offsets and *every* ``Jet_*`` list,
so each list of a collection must have exactly the counter's length in every
event: a longer or shorter one would be zipped with other jets' values.

This module says which collection a name belongs to, checks lists against
their counter, and widens a joined friend list to the primary collection:
an event without a partner gets ``nJet`` missing values (the jets exist,
their new values do not), never a missing list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import awkward as ak
import numpy as np

__all__ = [
    "collection_of",
    "counter_of",
    "describe_row",
    "fill_to_counts",
    "first_mismatch",
    "is_list",
]

_COLLECTION = re.compile(r"([A-Za-z][A-Za-z0-9]*)_\w+")


def collection_of(name: str) -> str | None:
    """The NanoAOD collection a column name belongs to, or ``None``.

    >>> collection_of("Jet_btagDeepFlavB"), collection_of("JetPFCands_pt")
    ('Jet', 'JetPFCands')
    >>> collection_of("nJet"), collection_of("AnalysisJetsAuxDyn.pt")
    (None, None)
    """
    found = _COLLECTION.fullmatch(name)
    return found.group(1) if found else None


def counter_of(collection: str) -> str:
    """The name of a collection's counter column (``Jet`` -> ``nJet``)."""
    return f"n{collection}"


def is_list(array: Any) -> bool:
    """True for a column holding one list per row (``var * T``, option or not)."""
    layout = ak.to_layout(array)
    while isinstance(layout, ak.contents.Content) and (layout.is_option or layout.is_indexed):
        layout = layout.content
    return isinstance(layout, ak.contents.ListOffsetArray | ak.contents.ListArray)


def _counts(array: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the list length (0 where missing) and whether the row is present."""
    layout = ak.to_layout(array, allow_record=False)
    if isinstance(layout, ak.contents.ListOffsetArray):  # what files give: no missing rows
        lengths = np.diff(np.asarray(layout.offsets.data)).astype(np.int64, copy=False)
        return lengths, np.ones(len(lengths), dtype=bool)
    arr = array if isinstance(array, ak.Array) else ak.Array(array)
    present = ~np.asarray(ak.to_numpy(ak.is_none(arr, axis=0)), dtype=bool)
    lengths = np.asarray(ak.to_numpy(ak.fill_none(ak.num(arr, axis=1), 0)), dtype=np.int64)
    return lengths, present


def _counter_values(counter: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(counter, np.ndarray | ak.Array):
        layout = ak.to_layout(counter, allow_record=False)
        if isinstance(layout, ak.contents.NumpyArray) and layout.data.ndim == 1:
            values = np.asarray(layout.data).astype(np.int64, copy=False)
            return values, np.ones(len(values), dtype=bool)
    arr = counter if isinstance(counter, ak.Array) else ak.Array(counter)
    present = ~np.asarray(ak.to_numpy(ak.is_none(arr, axis=0)), dtype=bool)
    values = np.asarray(ak.to_numpy(ak.fill_none(arr, 0)), dtype=np.int64)
    return values, present


def first_mismatch(array: Any, counter: Any) -> tuple[int, int, int] | None:
    """The first row where a list's length differs from the counter.

    Rows where either is missing are not compared.

    Returns:
        ``(row, list length, counter value)``, or ``None`` when all agree.

    >>> first_mismatch(ak.Array([[1.0], [2.0, 3.0], None]), [1, 1, 4])
    (1, 2, 1)
    """
    lengths, present = _counts(array)
    counts, counted = _counter_values(counter)
    bad = np.flatnonzero(present & counted & (lengths != counts))
    if not bad.size:
        return None
    i = int(bad[0])
    return i, int(lengths[i]), int(counts[i])


def fill_to_counts(array: Any, counter: Any) -> ak.Array:
    """A joined list column as a whole member of its primary collection.

    Rows whose list is present are kept; a missing row (no partner) becomes a
    list of ``counter`` missing values. The result is ``var * ?T`` (the
    counter's lengths in every row), whatever rows are missing, so every
    chunk of a request has one type. Lengths must already agree
    (:func:`first_mismatch`).

    >>> fill_to_counts(ak.Array([[1.0], None, [2.0, 3.0]]), [1, 2, 2]).tolist()
    [[1.0], [None, None], [2.0, 3.0]]
    """
    arr = array if isinstance(array, ak.Array) else ak.Array(array)
    _, present = _counts(arr)
    counts, counted = _counter_values(counter)
    counts = np.where(counted, counts, 0)
    content = ak.to_layout(ak.flatten(arr[present], axis=1))
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    index = np.full(int(offsets[-1]), -1, dtype=np.int64)
    filled = np.repeat(present, counts)
    index[filled] = np.arange(int(filled.sum()), dtype=np.int64)
    if len(content) != int(filled.sum()):
        msg = (
            f"list lengths disagree with the counter "
            f"({len(content)} values, {int(filled.sum())} slots)"
        )
        raise ValueError(msg)
    inner: ak.contents.Content
    if isinstance(content, ak.contents.NumpyArray) and content.data.ndim == 1:
        # a plain buffer whose missing slots hold NaN (floats) or 0: readers that
        # ignore Arrow's validity (coffea's Parquet mapping) see NaN, not garbage
        data = np.asarray(content.data)
        values = np.full(len(index), np.nan if data.dtype.kind == "f" else 0, dtype=data.dtype)
        values[filled] = data
        buffer = ak.contents.NumpyArray(values, parameters=content.parameters)
        mask = ak.index.Index8(filled.view(np.int8))
        inner = ak.contents.ByteMaskedArray(mask, buffer, valid_when=True)
    else:
        if len(content) == 0 and not isinstance(content, ak.contents.EmptyArray):
            content = content.form.length_one_array(highlevel=False)  # a typed placeholder
        inner = ak.contents.IndexedOptionArray.simplified(ak.index.Index64(index), content)
    out = ak.contents.ListOffsetArray(ak.index.Index64(offsets), inner)
    return ak.Array(out)


def describe_row(keys: Mapping[str, Any], row: int) -> str:
    """The event of ``row`` by its key values.

    >>> describe_row({"run": [1, 1], "event": [7, 9]}, 1)
    'run=1, event=9'
    """
    values = {k: np.asarray(ak.to_numpy(ak.Array(v)))[row] for k, v in keys.items()}
    return ", ".join(f"{k}={int(v)}" for k, v in values.items())
