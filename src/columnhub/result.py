"""The result of a delivery: its files, its manifest, and readers for them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from columnhub.errors import OutputError
from columnhub.output.manifest import read_manifest

if TYPE_CHECKING:  # the readers load them: a result found in the cache is returned without
    import awkward as ak
    import pyarrow as pa

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
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._check()
        if self.manifest.get("format", "parquet") != "parquet":
            msg = "to_arrow() reads Parquet results; this result is ROOT (open it with uproot)"
            raise OutputError(msg)
        tables = [pq.read_table(f) for f in self.files]
        return pa.concat_tables(tables) if tables else pa.table({})

    def to_awkward(self) -> ak.Array:
        """All rows as one awkward record array (fields = columns)."""
        import awkward as ak

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

    def to_nanoevents(self, *, schema: Any = None, mode: str = "eager") -> Any:
        """The result as coffea NanoEvents (``events.Jet.pt``, ``events.Muon``...).

        Every delivered NanoAOD collection carries its counter (``nJet``), so
        coffea's ``NanoAODSchema`` builds it; friend columns of a collection
        (``Jet_btagNew``) are fields of it (``events.Jet.btagNew``).

        Args:
            schema: a coffea schema class; default ``NanoAODSchema``
                (``PHYSLITESchema`` for PHYSLITE-like columns, see docs/nanoevents.md).
            mode: ``eager`` (every column in memory, one array over all parts)
                or ``dask`` (a lazy dask-awkward array, one partition per part).

        Raises:
            ModuleNotFoundError: coffea is not installed (``pip install 'columnhub[coffea]'``).
            OutputError: an incomplete or ROOT result, or an unknown ``mode``.
        """
        try:
            from coffea.nanoevents import NanoAODSchema, NanoEventsFactory
        except ModuleNotFoundError as err:
            msg = "to_nanoevents() needs coffea: pip install 'columnhub[coffea]'"
            raise ModuleNotFoundError(msg) from err
        if mode not in ("eager", "dask"):
            msg = f"to_nanoevents(mode={mode!r}): mode must be 'eager' or 'dask'"
            raise OutputError(msg)
        self._check()
        if self.manifest.get("format", "parquet") != "parquet":
            msg = (
                "to_nanoevents() reads Parquet results; this result is ROOT: open its files "
                "with coffea's NanoEventsFactory.from_root"
            )
            raise OutputError(msg)
        schema = NanoAODSchema if schema is None else schema
        files = [str(f) for f in self.files]
        import awkward as ak
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        if mode == "dask":
            import dask_awkward as dak

            opener = _NanoEventsPart(schema)
            empty = opener(files[0], stop=0)
            meta = ak.Array(
                empty.layout.to_typetracer(forget_length=True),
                behavior=empty.behavior,
                attrs=empty.attrs,
            )
            rows = [int(p["rows"]) for p in self.manifest["parts"]]
            divisions = tuple(int(x) for x in np.concatenate([[0], np.cumsum(rows)]))
            return dak.from_map(
                opener, files, label="columnhub-nanoevents", meta=meta, divisions=divisions
            )
        if len(files) == 1:
            source: Any = Path(files[0])
        else:  # one file over all parts: cross-references index the whole result
            sink = pa.BufferOutputStream()
            pq.write_table(self.to_arrow(), sink)
            source = pa.BufferReader(sink.getvalue())
        factory = NanoEventsFactory.from_parquet(source, schemaclass=schema, mode="eager")
        return factory.events()

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


class _NanoEventsPart:
    """Opens one Parquet part as eager NanoEvents (a dask-awkward partition)."""

    def __init__(self, schema: Any) -> None:
        self.schema = schema

    def __call__(self, path: str, *, stop: int | None = None) -> Any:
        from coffea.nanoevents import NanoEventsFactory

        factory = NanoEventsFactory.from_parquet(
            Path(path), schemaclass=self.schema, mode="eager", entry_stop=stop
        )
        return factory.events()
