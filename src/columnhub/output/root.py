"""ROOT writer: the result as TTree ``Events`` in part files sized by bytes (uproot).

ROOT TTrees cannot hold missing values; a column with ``None`` (e.g. from a
left join) must be delivered as Parquet, and the error says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import awkward as ak
import pyarrow as pa
import uproot

from columnhub.errors import OutputError
from columnhub.output.parquet import PartInfo, part_path, publish_part

__all__ = ["RootPartWriter"]


class RootPartWriter:
    """Writes tables in order into ``part-NNNNN.root`` files (tree ``Events``)."""

    def __init__(self, directory: Path, *, target_bytes: int, tree: str = "Events") -> None:
        self.directory = directory
        self.target_bytes = target_bytes
        self.tree_name = tree
        self.schema: pa.Schema | None = None
        self.parts: list[PartInfo] = []
        self._file: Any = None
        self._tmp: Path | None = None
        self._rows = 0

    def _branches(self, table: pa.Table) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in table.column_names:
            array = ak.from_arrow(table.column(name))
            if table.column(name).null_count:
                msg = (
                    f"column {name!r} holds missing values, which a ROOT TTree cannot store; "
                    "deliver it with output.format: parquet, or fill the missing values "
                    "in a define"
                )
                raise OutputError(msg)
            out[name.replace(".", "_")] = ak.without_parameters(ak.drop_none(array))
        return out

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (one basket per call); roll over to a new part by size."""
        if self.schema is None:
            self.schema = table.schema
        if table.num_rows == 0 and (self._file is not None or self.parts):
            return
        branches = self._branches(table)
        if self._file is None:
            self._tmp = part_path(self.directory, len(self.parts), "root")
            self._file = uproot.recreate(self._tmp)
            self._file[self.tree_name] = branches
        else:
            self._file[self.tree_name].extend(branches)
        self._rows += table.num_rows
        if self._tmp is not None and self._tmp.stat().st_size >= self.target_bytes:
            self._finish()

    def _finish(self) -> None:
        if self._file is None:
            return
        self._file.close()
        assert self._tmp is not None
        self.parts.append(publish_part(self._tmp, self._rows))
        self._file = None
        self._rows = 0

    def close(self) -> list[PartInfo]:
        """Finish the last part; returns every part written."""
        self._finish()
        return self.parts

    def abort(self) -> None:
        """Drop the part being written."""
        if self._file is not None:
            self._file.close()
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
            self._file = None
