"""The result of a delivery: its files, its manifest, and readers for them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import awkward as ak
import pyarrow as pa
import pyarrow.parquet as pq

from columnhub.errors import OutputError
from columnhub.output.manifest import read_manifest

__all__ = ["Result"]


@dataclass(frozen=True)
class Result:
    """A delivered result: Parquet parts plus ``manifest.json`` in a directory.

    The same object comes back from :func:`columnhub.deliver` (embedded) and,
    later, from the service client.
    """

    directory: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> Result:
        """The result stored in ``directory``."""
        path = Path(directory)
        manifest = read_manifest(path)
        if manifest is None:
            msg = f"{path} holds no columnhub result (no manifest.json)"
            raise OutputError(msg)
        return cls(path, manifest)

    @property
    def files(self) -> list[Path]:
        """The output part files, in order."""
        return [self.directory / name for name in self.manifest["files"]]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def events(self) -> int:
        return int(self.manifest["events"])

    @property
    def columns(self) -> dict[str, str]:
        return dict(self.manifest["columns"])

    def to_arrow(self) -> pa.Table:
        """All rows as one Arrow table."""
        self._check()
        if self.manifest.get("format", "parquet") != "parquet":
            msg = "to_arrow() reads Parquet results; this result is ROOT (open it with uproot)"
            raise OutputError(msg)
        tables = [pq.read_table(f) for f in self.files]
        return pa.concat_tables(tables) if tables else pa.table({})

    def to_awkward(self) -> ak.Array:
        """All rows as one awkward record array (fields = columns)."""
        if self.manifest.get("format", "parquet") == "root":
            import uproot

            self._check()
            # the delivered columns, in order (not the counter branches nJet the TTree adds)
            columns = list(self.manifest["columns"])
            arrays = []
            for f in self.files:
                with uproot.open(f) as file:
                    arrays.append(file["Events"].arrays(columns, library="ak"))
            return ak.concatenate(arrays) if arrays else ak.Array([])
        return ak.from_arrow(self.to_arrow())

    def to_pandas(self) -> Any:
        """All rows as a pandas DataFrame (jagged columns hold lists)."""
        return self.to_arrow().to_pandas()

    def to_dask(self) -> Any:
        """A lazy dask-awkward array over the parts (one partition per part)."""
        from columnhub._extras import require

        dak = require("dask_awkward", what="Result.to_dask()")
        self._check()
        return dak.from_parquet([str(f) for f in self.files])  # type: ignore[attr-defined]

    def _check(self) -> None:
        if not self.complete:
            msg = (
                f"the result in {self.directory} is incomplete "
                f"({self.manifest.get('error', 'no error recorded')}); deliver it again"
            )
            raise OutputError(msg)

    def __repr__(self) -> str:
        return (
            f"<Result {self.directory} events={self.manifest.get('events')} "
            f"files={len(self.manifest.get('files', []))} complete={self.complete}>"
        )
