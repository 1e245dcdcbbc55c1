"""``deliver``: run a request embedded in this process and write its result.

The service runs exactly this code for each request it accepts.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import awkward as ak
import pyarrow as pa

from columnhub.cache import ColumnCache, default_location, entry_key
from columnhub.errors import ColumnhubError, OutputError, SpecError
from columnhub.execute.chunk import ChunkResult, run_chunk, run_tail
from columnhub.execute.local import run_ordered
from columnhub.output.manifest import read_manifest, write_manifest
from columnhub.output.parquet import PartWriter, file_checksum
from columnhub.plan import Plan, make_plan
from columnhub.result import Result
from columnhub.spec import Request, load_request

__all__ = ["arrays", "default_output_directory", "deliver"]

Progress = Callable[[int, int], None]


def default_output_directory(request: Request) -> Path:
    """Where a result goes when no directory is given: ``<cache>/results/<hash>``.

    A cache on a URL (a shared object store) keeps results in the local default.
    """
    root = default_location()
    if "://" in root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "columnhub")
    return Path(root) / "results" / request.hash


def deliver(
    request: Request | dict[str, Any] | str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    cache: ColumnCache | str | os.PathLike[str] | bool | None = None,
    progress: bool | Progress | None = None,
) -> Result:
    """Deliver the columns of ``request`` and return the :class:`Result`.

    Args:
        request: a :class:`Request`, a dictionary, or the path of a YAML/JSON spec.
        output: the output directory (default: ``request.output.directory``, else
            a per-request folder in the columnhub cache).
        workers: chunk tasks run at once (default: the number of CPUs, at most 8).
        chunk_size: events per chunk (default: ``request.chunk_size``).
        cache: the column cache: ``None``/``True`` for the default one
            (``$COLUMNHUB_CACHE`` or ``~/.cache/columnhub``), a path or fsspec
            URL, a :class:`~columnhub.cache.ColumnCache`, or ``False`` for none.
        progress: ``True`` for a progress bar, a ``callable(done, total)``, or
            ``None`` for a bar only when stderr is a terminal.

    Returns:
        The result; ``result.complete`` is always true when this returns.

    Raises:
        ColumnhubError: for anything wrong with the request or its inputs; the
            output directory then holds no result that looks complete.
    """
    t0 = time.perf_counter()
    req = _load(request, chunk_size=chunk_size)
    if output is not None:
        req = req.replace(output={**req.output.model_dump(), "directory": os.fspath(output)})
    workers = _workers(workers)
    directory = Path(req.output.directory) if req.output.directory else None
    directory = directory or default_output_directory(req)
    plan = make_plan(req)  # user errors surface here, before anything is written
    t_plan = time.perf_counter() - t0
    store = _open_cache(cache)
    previous = _prepare_directory(directory)
    identity = _result_key(plan)
    reused = _reuse(identity, directory, previous, store)
    if reused is not None:
        total = time.perf_counter() - t0
        reused["timing"] = {
            "plan_s": round(t_plan, 6),
            "run_s": 0.0,
            "total_s": round(total, 6),
            "events_per_s": round(reused.get("events_read", 0) / total, 1) if total else 0.0,
        }
        write_manifest(directory, reused)
        return Result(directory, reused)
    staging = directory / f".staging-{os.getpid()}-{time.time_ns()}"
    staging.mkdir(parents=True)
    try:
        manifest = _execute(plan, staging, workers=workers, progress=progress, cache=store)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if previous is None:
            write_manifest(directory, _failed_manifest(req, err))
        raise
    _publish(staging, directory, previous, manifest["files"])
    total = time.perf_counter() - t0
    manifest["timing"].update(plan_s=round(t_plan, 6), total_s=round(total, 6))
    manifest["timing"]["events_per_s"] = round(manifest["events_read"] / total, 1) if total else 0.0
    manifest["result_key"] = identity
    write_manifest(directory, manifest)
    if store is not None and not store.read_only:
        store.put_bytes(identity, json.dumps({"directory": str(directory.resolve())}).encode())
    return Result(directory, manifest)


def arrays(
    request: Request | dict[str, Any] | str | os.PathLike[str],
    *,
    workers: int | None = None,
    chunk_size: int | None = None,
    cache: ColumnCache | str | os.PathLike[str] | bool | None = False,
) -> ak.Array:
    """The columns of ``request`` as one in-memory awkward array, no files written.

    For a quick look in a notebook (the counterpart of uproot's
    ``TTree.arrays``): the same plan, chunk tasks and cache as :func:`deliver`,
    but the selected rows are concatenated in memory instead of written.

    Args:
        request: a :class:`Request`, a dictionary, or a YAML/JSON spec path.
        workers: chunk tasks run at once (default: the number of CPUs, at most 8).
        chunk_size: events per chunk (default: ``request.chunk_size``).
        cache: the column cache, as for :func:`deliver`; off by default.

    Returns:
        A record array, one field per output column.
    """
    plan = make_plan(_load(request, chunk_size=chunk_size))
    results = _chunk_results(plan, workers=_workers(workers), cache=_open_cache(cache))
    tables = [r.table for r in results]
    # one schema, as the writer does (a right/outer tail has null-typed columns)
    tables = [t.cast(tables[0].schema) for t in tables]
    if not tables:
        return ak.Array([])
    # one contiguous table first: awkward concatenates chunked columns slowly
    return ak.from_arrow(pa.concat_tables(tables).combine_chunks(), generate_bitmasks=False)


def _load(request: Any, *, chunk_size: int | None) -> Request:
    req = load_request(request)
    return req if chunk_size is None else req.replace(chunk_size=chunk_size)


def _workers(workers: int | None) -> int:
    if workers is None:
        return min(8, os.cpu_count() or 1)
    if workers < 1:
        msg = f"workers must be at least 1, got {workers}"
        raise SpecError(msg)
    return workers


def _chunk_results(
    plan: Plan, *, workers: int, cache: ColumnCache | None, index_report: Any = None
) -> Iterator[ChunkResult]:
    """Every chunk's result in order, then the right/outer tail if there is one."""
    if plan.friends:
        from columnhub.join.provider import prepare

        # key indexes built once; duplicates reported before work
        prepare(plan, cache=cache, report=index_report)
    yield from run_ordered(lambda c: run_chunk(plan, c, cache=cache), plan.chunks, workers=workers)
    tail = run_tail(plan, cache=cache)
    if tail is not None:
        yield tail


def _open_cache(cache: Any) -> ColumnCache | None:
    if cache is False:
        return None
    if cache is None or cache is True:
        return ColumnCache()
    if isinstance(cache, ColumnCache):
        return cache
    return ColumnCache(os.fspath(cache))


def _result_key(plan: Plan) -> str:
    """The address of a whole result: the request and the identity of every input."""
    return entry_key(
        kind="result",
        request=plan.request.hash,
        outputs=list(plan.outputs),  # what is delivered (counters included), not only asked
        inputs=plan.dataset.identity,
        friends=[f.fingerprint for f in plan.friends],
        models=sorted({c.model.card.identity for c in plan.columns.values() if c.model}),
        version=_version(),
    )


def _intact(directory: Path, manifest: dict[str, Any]) -> bool:
    """True when every part a complete manifest lists is there, untouched since written.

    A cheap check (size and modification time); copies verify the checksum too.
    """
    if not manifest.get("complete"):
        return False
    for part in manifest.get("parts", []):
        path = directory / part["name"]
        if not path.is_file():
            return False
        stat = path.stat()
        if stat.st_size != part["bytes"] or stat.st_mtime_ns != part.get("mtime_ns"):
            return False
    return True


def _reuse(
    identity: str, directory: Path, previous: dict[str, Any] | None, store: ColumnCache | None
) -> dict[str, Any] | None:
    """A full hit: the same request on unchanged inputs was delivered before.

    The result already in ``directory`` is kept as it is; one delivered
    elsewhere (found through the cache) has its parts copied, byte for byte.
    Returns the new manifest, or ``None`` when the result must be computed.
    """
    if store is None:
        return None
    source: tuple[Path, dict[str, Any]] | None = None
    if previous is not None and previous.get("result_key") == identity and _intact(directory, previous):
        source = (directory, previous)
    else:
        blob = store.get_bytes(identity)
        if blob is not None:
            where = Path(json.loads(blob)["directory"])
            manifest = read_manifest(where) if where.is_dir() else None
            if manifest is not None and manifest.get("result_key") == identity and _intact(where, manifest):
                source = (where, manifest)
    if source is None:
        return None
    where, manifest = source
    if where != directory:
        staging = directory / f".staging-{os.getpid()}-{time.time_ns()}"
        staging.mkdir(parents=True)
        parts = []
        for part in manifest["parts"]:  # copied and verified in one pass
            copy = staging / part["name"]
            if file_checksum(where / part["name"], copy_to=copy) != part["xxh3"]:
                shutil.rmtree(staging, ignore_errors=True)
                return None
            parts.append({**part, "mtime_ns": copy.stat().st_mtime_ns})
        _publish(staging, directory, previous, manifest["files"])
        manifest = {**manifest, "parts": parts}
    entries = manifest["cache"]["hits"] + manifest["cache"]["misses"]
    reused = dict(manifest)
    reused["cache"] = {"hits": entries, "misses": 0, "reused_result": str(where)}
    reused["chunks"] = [  # nothing was read or computed this time
        {**c, "read": [], "friend_entries_read": 0, "cache_misses": 0,
         "cache_hits": c.get("cache_hits", 0) + c.get("cache_misses", 0)}
        if "read" in c else c
        for c in manifest["chunks"]
    ]
    reused["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return reused


def _execute(
    plan: Plan, staging: Path, *, workers: int, progress: Any, cache: ColumnCache | None
) -> dict[str, Any]:
    req = plan.request
    if req.output.format == "root":
        from columnhub.output.root import RootPartWriter

        writer: Any = RootPartWriter(staging, target_bytes=req.output.target_part_bytes)
    else:
        writer = PartWriter(
            staging, target_bytes=req.output.target_part_bytes, compression=req.output.compression
        )
    report = _progress(progress, total=plan.dataset.entries)
    index_report = _index_progress(progress)
    chunks: list[dict[str, Any]] = []
    hits = misses = events = 0
    inference: Any = None
    t_run = time.perf_counter()
    done = 0
    try:
        for result in _chunk_results(
            plan, workers=workers, cache=cache, index_report=index_report
        ):
            writer.write(result.table)
            chunks.append(_chunk_record(plan, result))
            hits += result.hits
            misses += result.misses
            if result.details.get("inference") is not None:
                if inference is None:
                    inference = result.details["inference"]
                else:
                    inference.merge(result.details["inference"])
            events += result.table.num_rows
            done += result.rows_in
            if report is not None:
                report(done, plan.dataset.entries)
        parts = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        for bar in (report, index_report):
            if bar is not None and hasattr(bar, "close"):
                bar.close()
    schema = writer.schema
    return {
        "columnhub": _version(),
        "request_hash": req.hash,
        "request": req.to_dict(),
        "complete": True,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "format": req.output.format,
        "events": events,
        "events_read": plan.dataset.entries,
        "files": [p.name for p in parts],
        "parts": [
            {"name": p.name, "rows": p.rows, "bytes": p.bytes, "xxh3": p.xxh3, "mtime_ns": p.mtime_ns}
            for p in parts
        ],
        "columns": _column_types(schema),
        "keys": list(req.dataset.keys) if req.output.include_keys else [],
        "cache": {"hits": hits, "misses": misses, "location": cache.location if cache else None},
        "inputs": plan.dataset.identity,
        "friends": {f.spec.name: f.dataset.identity for f in plan.friends},
        "chunks": chunks,
        "inference": inference.snapshot() if inference is not None else {},
        "models": {
            f"{m.card.name}@{m.card.version}": m.card.identity
            for m in {id(c.model): c.model for c in plan.columns.values() if c.model}.values()
        },
        "timing": {"run_s": round(time.perf_counter() - t_run, 6)},
    }


def _column_types(schema: pa.Schema | None) -> dict[str, str]:
    """Column name -> awkward type string (``var * float32``, ``?float32``)."""
    if schema is None:
        return {}
    form = ak.from_arrow_schema(schema)
    return {name: str(form.content(name).type) for name in form.fields}


def _chunk_record(plan: Plan, result: ChunkResult) -> dict[str, Any]:
    c = result.chunk
    if "tail" in result.details:
        return {
            "tail_of_friend": result.details["tail"],
            "friend_rows_without_partner": result.details["friend_rows"],
            "rows_out": result.table.num_rows,
            "seconds": round(result.seconds, 6),
        }
    return {
        "file": plan.dataset.files[c.file_index].path,
        "entry_start": c.start,
        "entry_stop": c.stop,
        "rows_in": result.rows_in,
        "rows_out": result.table.num_rows,
        "cache_hits": result.hits,
        "cache_misses": result.misses,
        "read": result.details.get("read", []),
        "friend_entries_read": result.details.get("friend_entries_read", 0),
        "seconds": round(result.seconds, 6),
    }


def _prepare_directory(directory: Path) -> dict[str, Any] | None:
    """Check the output directory; returns the manifest of a result already there."""
    if directory.exists() and not directory.is_dir():
        msg = f"output {directory} exists and is not a directory; choose another path"
        raise OutputError(msg)
    if not directory.exists():
        try:
            directory.mkdir(parents=True)
        except OSError as err:
            msg = f"cannot create the output directory {directory} ({err.strerror})"
            raise OutputError(msg) from err
        return None
    previous = read_manifest(directory)
    if previous is None:
        others = [p.name for p in directory.iterdir() if not p.name.startswith(".staging-")]
        if others:
            msg = (
                f"output directory {directory} is not empty and holds no columnhub result "
                f"(it has {', '.join(sorted(others)[:5])}); choose an empty or new directory"
            )
            raise OutputError(msg)
    return previous


def _publish(staging: Path, directory: Path, previous: dict[str, Any] | None, files: list[str]) -> None:
    """Move the new parts in place of the previous result's."""
    if previous is not None:
        (directory / "manifest.json").unlink(missing_ok=True)
        for name in previous.get("files", []):
            (directory / name).unlink(missing_ok=True)
    for name in files:
        os.replace(staging / name, directory / name)
    shutil.rmtree(staging, ignore_errors=True)


def _failed_manifest(req: Request, err: BaseException) -> dict[str, Any]:
    reason = str(err) if isinstance(err, ColumnhubError) else f"{type(err).__name__}: {err}"
    return {
        "columnhub": _version(),
        "request_hash": req.hash,
        "request": req.to_dict(),
        "complete": False,
        "error": reason,
        "events": 0,
        "files": [],
        "columns": {},
        "cache": {"hits": 0, "misses": 0},
        "chunks": [],
        "timing": {},
    }


def _tqdm(progress: Any) -> Any:
    """tqdm when bars are on (``progress=True``, or a terminal by default), else ``None``."""
    if callable(progress) or progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return None
    return tqdm


def _progress(progress: Any, *, total: int) -> Any:
    if callable(progress):
        return progress
    tqdm = _tqdm(progress)
    if tqdm is None:
        return None
    bar = tqdm(total=total, unit="ev", unit_scale=True, desc="columnhub", leave=False)

    def report(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    report.close = bar.close  # type: ignore[attr-defined]
    return report


def _index_progress(progress: Any) -> Any:
    """A bar per key index being built (reading every file's keys), when bars are on."""
    tqdm = _tqdm(progress)
    if tqdm is None:
        return None
    bars: dict[str, Any] = {}

    def report(dataset: str, done: int, total: int) -> None:
        bar = bars.get(dataset)
        if bar is None:
            bar = bars[dataset] = tqdm(
                total=total, unit="file", desc=f"key index of {dataset!r}", leave=False
            )
        bar.update(done - bar.n)
        bar.refresh()  # one update per file read: show each

    def close() -> None:
        for bar in bars.values():
            bar.close()

    report.close = close  # type: ignore[attr-defined]
    return report


def _version() -> str:
    from columnhub import __version__

    return __version__
