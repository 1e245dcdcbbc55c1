"""Model inputs as one 2-D float32 matrix, outputs back in the inputs' shape, batch sizes.

Per-event models take one row per event: each input is a flat array of
``n_events`` numbers and they are stacked as ``(n_events, n_features)``.
Per-object models (e.g. per jet) take one row per object: each input is a
jagged array with the same list lengths, the lists are flattened and stacked as
``(n_objects, n_features)``, and outputs are re-jagged with exactly the inputs'
offsets. Empty events and empty chunks give empty lists and empty arrays.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import awkward as ak
import numpy as np

from columnhub.errors import ModelInputError

__all__ = [
    "Layout",
    "batch_rows",
    "batch_slices",
    "flatten_inputs",
    "restore_output",
]


@dataclass(frozen=True)
class Layout:
    """How model rows map back to events.

    Attributes:
        n_events: number of events in the chunk.
        offsets: for per-object models, int64 offsets (length ``n_events + 1``,
            starting at 0) of each event's objects in the row axis; ``None`` for
            per-event models.
    """

    n_events: int
    offsets: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        """Number of model rows (events or objects)."""
        return self.n_events if self.offsets is None else int(self.offsets[-1])


def _type_name(value: Any) -> str:
    if isinstance(value, ak.Array):
        return str(value.type)
    if isinstance(value, np.ndarray):
        return f"numpy {value.dtype} array of shape {value.shape}"
    return type(value).__name__


def _numbers(name: str, data: Any, source: Any) -> np.ndarray:
    array = np.asarray(data)
    if array.dtype.kind not in "biuf":
        msg = (
            f"model input {name!r} has type {_type_name(source)}; model inputs must be numbers "
            "(bool, int or float)"
        )
        raise ModelInputError(msg)
    return array


def _event_input(name: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            msg = (
                f"model input {name!r} is a {_type_name(value)}; a per-event model needs one "
                "number per event (a 1-D array)"
            )
            raise ModelInputError(msg)
        return _numbers(name, value, value)
    layout = ak.to_layout(value)
    if isinstance(layout, ak.contents.NumpyArray) and layout.data.ndim == 1:
        return _numbers(name, layout.data, value)
    if isinstance(layout, ak.contents.EmptyArray):
        return np.zeros(0, dtype=np.float32)
    msg = (
        f"model input {name!r} has type {_type_name(value)}; a per-event model needs one "
        "number per event (no lists, no missing values)"
    )
    raise ModelInputError(msg)


def _object_input(name: str, value: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(value, np.ndarray):
        msg = (
            f"model input {name!r} is a {_type_name(value)}; a per-object model needs a jagged "
            "awkward array (one list of numbers per event)"
        )
        raise ModelInputError(msg)
    layout = ak.to_layout(value)
    if (
        isinstance(
            layout, (ak.contents.ListOffsetArray | ak.contents.ListArray, ak.contents.RegularArray)
        )
    ) and (
        not isinstance(layout, ak.contents.ListOffsetArray)
        or not isinstance(layout.content, ak.contents.NumpyArray)
    ):
        layout = ak.to_layout(ak.to_packed(value))
    if isinstance(layout, ak.contents.RegularArray):
        layout = layout.to_ListOffsetArray64(True)
    if isinstance(layout, ak.contents.ListOffsetArray) and isinstance(
        layout.content, ak.contents.EmptyArray
    ):  # lists that are all empty, e.g. ak.Array([[], []])
        offsets = np.asarray(layout.offsets.data, dtype=np.int64)
        return np.zeros(0, dtype=np.float32), offsets - offsets[0]
    if (
        isinstance(layout, ak.contents.ListOffsetArray)
        and isinstance(layout.content, ak.contents.NumpyArray)
        and layout.content.data.ndim == 1
    ):
        offsets = np.asarray(layout.offsets.data, dtype=np.int64)
        start, stop = int(offsets[0]), int(offsets[-1])
        flat = _numbers(name, layout.content.data[start:stop], value)
        return flat, offsets - start if start else offsets
    msg = (
        f"model input {name!r} has type {_type_name(value)}; a per-object model needs one list "
        "of numbers per event (var * number, no missing values, no deeper nesting)"
    )
    raise ModelInputError(msg)


def flatten_inputs(
    names: Sequence[str],
    inputs: Sequence[Any],
    *,
    granularity: str,
) -> tuple[np.ndarray, Layout]:
    """Stack a chunk's model inputs into one C-contiguous float32 matrix.

    Args:
        names: the inputs' names (the card's input expressions), for messages.
        inputs: one array per name: 1-D numbers per event (``event``), or jagged
            lists of numbers with equal list lengths (``object``).
        granularity: ``event`` or ``object``.

    Returns:
        ``(matrix, layout)``: a ``(n_rows, len(names))`` float32 matrix and the
        layout that :func:`restore_output` needs.

    Raises:
        ModelInputError: wrong number of inputs, non-numeric or wrongly nested
            input, or lengths / list lengths that disagree; the message names
            the input.
    """
    if len(inputs) != len(names):
        msg = (
            f"the model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)} arrays; "
            "pass one array per input, in the card's order"
        )
        raise ModelInputError(msg)
    if granularity == "event":
        columns = [_event_input(n, v) for n, v in zip(names, inputs, strict=True)]
        n_events = len(columns[0])
        for n, c in zip(names, columns, strict=True):
            if len(c) != n_events:
                msg = (
                    f"model input {n!r} has {len(c)} events, but {names[0]!r} has {n_events}; "
                    "all inputs must come from the same events"
                )
                raise ModelInputError(msg)
        layout = Layout(n_events=n_events)
    elif granularity == "object":
        pairs = [_object_input(n, v) for n, v in zip(names, inputs, strict=True)]
        offsets0 = pairs[0][1]
        for n, (_, off) in zip(names, pairs, strict=True):
            if len(off) != len(offsets0):
                msg = (
                    f"model input {n!r} has {len(off) - 1} events, but {names[0]!r} has "
                    f"{len(offsets0) - 1}; all inputs must come from the same events"
                )
                raise ModelInputError(msg)
            if off is not offsets0 and not np.array_equal(off, offsets0):
                bad = int(np.flatnonzero(np.diff(off) != np.diff(offsets0))[0])
                msg = (
                    f"model input {n!r} has {int(off[bad + 1] - off[bad])} objects in event {bad}, "
                    f"but {names[0]!r} has {int(offsets0[bad + 1] - offsets0[bad])}; per-object "
                    "inputs must be columns of the same collection"
                )
                raise ModelInputError(msg)
        columns = [p[0] for p in pairs]
        layout = Layout(n_events=len(offsets0) - 1, offsets=offsets0)
    else:
        msg = f"granularity must be 'event' or 'object', got {granularity!r}"
        raise ModelInputError(msg)
    matrix = np.empty((layout.n_rows, len(columns)), dtype=np.float32)
    for i, c in enumerate(columns):
        matrix[:, i] = c
    return matrix, layout


def restore_output(values: np.ndarray, layout: Layout, *, dtype: str) -> ak.Array:
    """One output column in the inputs' shape.

    Args:
        values: one value per model row.
        layout: from :func:`flatten_inputs`.
        dtype: the output type (numpy name).

    Returns:
        Per-event models: a flat array of ``n_events``; per-object models: a
        jagged array with exactly the inputs' offsets.
    """
    data = np.ascontiguousarray(values, dtype=np.dtype(dtype))
    if len(data) != layout.n_rows:
        msg = f"the model returned {len(data)} rows for {layout.n_rows} input rows"
        raise ModelInputError(msg)
    content = ak.contents.NumpyArray(data)
    if layout.offsets is None:
        return ak.Array(content)
    return ak.Array(ak.contents.ListOffsetArray(ak.index.Index64(layout.offsets), content))


def batch_rows(
    *,
    n_features: int,
    max_rows: int,
    max_bytes: int,
    itemsize: int = 4,
) -> int:
    """The rows per request: at most ``max_rows``, and within ``max_bytes`` of input.

    >>> batch_rows(n_features=5, max_rows=1000, max_bytes=4000)
    200
    """
    by_bytes = max(1, max_bytes // max(1, n_features * itemsize))
    return max(1, min(max_rows, by_bytes))


def batch_slices(n_rows: int, size: int) -> Iterator[slice]:
    """Consecutive row slices of at most ``size`` rows (the last one shorter, never padded).

    >>> [(s.start, s.stop) for s in batch_slices(5, 2)]
    [(0, 2), (2, 4), (4, 5)]
    """
    for start in range(0, n_rows, size):
        yield slice(start, min(start + size, n_rows))
