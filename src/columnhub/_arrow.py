"""numpy arrays to Arrow arrays and back, without pyarrow importing pandas.

``pa.array(numpy_array)``, ``Array.to_numpy()`` and ``np.asarray(arrow_array)``
each import pandas the first time they run in a process (pyarrow looks for
pandas objects and pandas' missing-value markers): 0.14 s, a tenth of a cold
2M-event keyed join, spent on the critical path of whichever thread gets
there first while the others wait on the import lock. Numbers and booleans
need none of it: their Arrow buffers are numpy's bytes (booleans packed to
bits), so these hand the buffers over directly (numbers without a copy).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["arrow_of", "numpy_of"]


def arrow_of(values: np.ndarray, mask: np.ndarray | None = None) -> Any:
    """The numpy array ``values`` (numbers or booleans) as an Arrow array.

    Args:
        values: a one-dimensional array of integers, floats or booleans.
        mask: ``True`` where the result is null (``pa.array``'s ``mask``).
    """
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    if values.dtype == np.bool_:
        kind = pa.bool_()
        data = pa.py_buffer(np.packbits(values, bitorder="little"))
    else:
        kind = pa.from_numpy_dtype(values.dtype)
        data = pa.py_buffer(values)
    validity = None
    nulls = 0
    if mask is not None:
        nulls = int(np.count_nonzero(mask))
        if nulls:
            valid = ~np.asarray(mask, dtype=bool)
            validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(kind, len(values), [validity, data], null_count=nulls)


def numpy_of(array: Any) -> np.ndarray:
    """The values of the Arrow array ``array`` (numbers or booleans) as numpy.

    A null's slot holds whatever its buffer holds (``Array.to_numpy`` would
    refuse or make floats NaN): the caller masks them. Numbers are a view of
    the Arrow buffer (read-only); other types go to ``to_numpy``.
    """
    import pyarrow as pa

    kind = array.type
    n = len(array)
    data = array.buffers()[1]
    if pa.types.is_boolean(kind):
        if data is None:
            return np.zeros(n, dtype=bool)
        bits = np.frombuffer(data, dtype=np.uint8)
        unpacked = np.unpackbits(bits, count=array.offset + n, bitorder="little")
        return unpacked[array.offset :].view(np.bool_)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        dtype = np.dtype(kind.to_pandas_dtype())
        if data is None:
            return np.zeros(n, dtype=dtype)
        return np.frombuffer(data, dtype=dtype, count=array.offset + n)[array.offset :]
    return np.asarray(array.to_numpy(zero_copy_only=False))
