"""The compact-protocol codec round-trips real Parquet footers and rejects garbage cleanly."""

from __future__ import annotations

import contextlib
import io
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from columnhub.output import _thrift


def footer(table: pa.Table, **options: object) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **options)  # type: ignore[arg-type]
    data = buf.getvalue()
    n = struct.unpack("<i", data[-8:-4])[0]
    return data[-8 - n : -8]


COLUMNS = {
    "u64": lambda rng, n: pa.array(rng.integers(0, 2**63, n, dtype=np.uint64)),
    "f32": lambda rng, n: pa.array(rng.normal(size=n).astype(np.float32)),
    "f64_nulls": lambda rng, n: pa.array(
        [None if x < 0 else float(x) for x in rng.normal(size=n)], pa.float64()
    ),
    "text": lambda rng, n: pa.array([f"s{int(x)}" for x in rng.integers(0, 50, n)]),
    "jagged": lambda rng, n: pa.array(
        [list(rng.normal(size=k)) for k in rng.integers(0, 4, n)], pa.list_(pa.float32())
    ),
    "nested": lambda rng, n: pa.array(
        [[[int(k)]] * int(k) for k in rng.integers(0, 3, n)], pa.list_(pa.list_(pa.int32()))
    ),
    "record": lambda rng, n: pa.array(
        [{"a": float(x), "b": bool(x > 0)} for x in rng.normal(size=n)],
        pa.struct([("a", pa.float64()), ("b", pa.bool_())]),
    ),
    "flag": lambda rng, n: pa.array(rng.random(n) < 0.5),
}


@settings(max_examples=40, deadline=None)
@given(
    names=st.lists(st.sampled_from(sorted(COLUMNS)), min_size=1, max_size=5, unique=True),
    rows=st.integers(0, 300),
    row_group=st.integers(1, 100),
    seed=st.integers(0, 2**32 - 1),
    statistics=st.booleans(),
    page_index=st.booleans(),
    compression=st.sampled_from(["zstd", "snappy", "none"]),
)
def test_parquet_footers_round_trip_byte_for_byte(
    names: list[str],
    rows: int,
    row_group: int,
    seed: int,
    statistics: bool,
    page_index: bool,
    compression: str,
) -> None:
    rng = np.random.default_rng(seed)
    table = pa.table({name: COLUMNS[name](rng, rows) for name in names})
    raw = footer(
        table,
        row_group_size=row_group,
        write_statistics=statistics,
        write_page_index=page_index,
        compression=compression,
    )
    decoded = _thrift.decode(raw, verify=True)
    assert _thrift.encode(decoded) == raw
    num_rows = decoded.get(3)
    assert num_rows is not None
    assert num_rows.value == rows


def test_changed_values_are_written_back() -> None:
    table = pa.table({"x": pa.array(np.arange(10, dtype=np.int64))})
    decoded = _thrift.decode(footer(table))
    field = decoded.get(3)  # FileMetaData.num_rows
    assert field is not None
    field.value = 2**40 + 7  # a longer varint
    again = _thrift.decode(_thrift.encode(decoded), verify=True)
    changed = again.get(3)
    assert changed is not None
    assert changed.value == 2**40 + 7


@given(st.binary(max_size=200))
def test_garbage_raises_only_thrift_errors(data: bytes) -> None:
    with contextlib.suppress(_thrift.ThriftError):
        _thrift.decode(data, verify=True)


def test_truncated_footer_is_an_error() -> None:
    raw = footer(pa.table({"x": [1, 2, 3]}))
    with pytest.raises(_thrift.ThriftError, match="ends inside"):
        _thrift.decode(raw[:-5])
    with pytest.raises(_thrift.ThriftError, match="after the struct"):
        _thrift.decode(raw + b"\x00")
