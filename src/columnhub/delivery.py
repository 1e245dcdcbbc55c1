"""``deliver``: run a request embedded in this process and write its result.

The service runs exactly this code for each request it accepts.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import secrets
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from columnhub import _fastpath, _malloc, _readahead
from columnhub._checksum import file_checksum
from columnhub._versions import PROVIDER_VERSIONS
from columnhub.cache import ColumnCache, default_location, entry_key
from columnhub.datasets import is_url
from columnhub.errors import CacheError, ColumnhubError, OutputError, SampleError, SpecError
from columnhub.output.manifest import MANIFEST, fsync_path, read_manifest, write_manifest
from columnhub.result import Result

if TYPE_CHECKING:  # loaded when a request is planned: a whole-result hit needs none of them
    import awkward as ak

    from columnhub.execute.chunk import ChunkResult
    from columnhub.plan import Plan
    from columnhub.spec import Request, Samples

__all__ = ["arrays", "default_output_directory", "deliver"]

Progress = Callable[[int, int], None]
#: where part tasks run: ``None`` (``$DASK_SCHEDULER_ADDRESS``, else threads
#: here), ``"local"`` (a ``LocalCluster``), a scheduler address, or a
#: ``distributed.Client``
Scheduler = Any


def default_output_directory(request: Request) -> Path:
    """Where a result goes when no directory is given: ``<cache>/results/<hash>``.

    A cache on a URL (a shared object store) keeps results in the local default.
    """
    return _default_directory(request.hash)


def _default_directory(request_hash: str) -> Path:
    root = default_location()
    if "://" in root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "columnhub")
    return Path(root) / "results" / request_hash


@overload
def deliver(
    request: Request,
    *,
    output: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    cache: ColumnCache | str | os.PathLike[str] | bool | None = None,
    progress: bool | Progress | None = None,
    scheduler: Scheduler = None,
) -> Result: ...


@overload
def deliver(
    request: Samples,
    *,
    output: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    cache: ColumnCache | str | os.PathLike[str] | bool | None = None,
    progress: bool | Progress | None = None,
    scheduler: Scheduler = None,
) -> dict[str, Result]: ...


@overload
def deliver(
    request: dict[str, Any] | str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    cache: ColumnCache | str | os.PathLike[str] | bool | None = None,
    progress: bool | Progress | None = None,
    scheduler: Scheduler = None,
) -> Result | dict[str, Result]: ...


def deliver(
    request: Request | Samples | dict[str, Any] | str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    cache: ColumnCache | str | os.PathLike[str] | bool | None = None,
    progress: bool | Progress | None = None,
    scheduler: Scheduler = None,
) -> Result | dict[str, Result]:
    """Deliver the columns of ``request`` and return the :class:`Result`.

    Several samples (:class:`~columnhub.spec.Samples`, or a spec with
    ``samples:`` or a coffea fileset) give ``{sample: Result}`` in the order
    given, each delivered as its own single-sample request. All are planned
    before any is delivered; a sample that fails while delivering leaves its
    folder marked incomplete and the others are still delivered, then a
    :class:`~columnhub.errors.SampleError` names each failed sample.

    Args:
        request: a :class:`Request`, :class:`Samples`, a dictionary, or the path
            of a YAML/JSON spec.
        output: the output directory (default: ``request.output.directory``, else
            a per-request folder in the columnhub cache); with several samples,
            each goes to ``output/<sample>/``.
        workers: part tasks run at once (default: ``$COLUMNHUB_THREADS``, else
            the number of CPUs); with ``scheduler="local"``, the number of
            single-threaded worker processes.
        chunk_size: events per chunk (default: ``request.chunk_size``).
        cache: the column cache: ``None``/``True`` for the default one
            (``$COLUMNHUB_CACHE`` or ``~/.cache/columnhub``), a path or fsspec
            URL, a :class:`~columnhub.cache.ColumnCache`, or ``False`` for none.
        progress: ``True`` for a progress bar, a ``callable(done, total)``, or
            ``None`` for a bar only when stderr is a terminal; counts the
            events of each part as it finishes. A callable with an
            ``on_part(meta, parts)`` attribute also gets each part's
            :class:`~columnhub.execute.part.PartMeta` (and the number of parts) first.
        scheduler: where the part tasks run (:mod:`columnhub.execute.dask`):
            ``None`` for ``$DASK_SCHEDULER_ADDRESS`` when set, else a thread
            pool in this process; ``"local"`` for a Dask ``LocalCluster`` of
            ``workers`` single-threaded processes (closed at the end); a
            scheduler address (``"tcp://host:8786"``); or a
            ``distributed.Client``. Workers must see the output directory and
            the column cache (pass a location every worker sees).

    Returns:
        The result; ``result.complete`` is always true when this returns.

    Raises:
        ColumnhubError: for anything wrong with the request or its inputs; the
            output directory then holds no result that looks complete, or
            still the complete previous one.
        OutputError: the output directory is refused (not a columnhub result,
            an input of the request, or holding a part-named file its manifest
            does not list), is full, or is held by another delivery for longer
            than ``$COLUMNHUB_OUTPUT_LOCK_TIMEOUT`` seconds (default 600).
        SampleError: with several samples, when some failed (``.errors``: each
            one's error; ``.results``: the samples delivered).
    """
    t0 = time.perf_counter()
    _workers(workers)  # a bad value is refused even when the result is known
    fast = _deliver_known(request, output=output, chunk_size=chunk_size, cache=cache, t0=t0)
    if isinstance(fast, Result):
        return fast
    _malloc.apply_armed()  # the command line's: freed buffers kept for the next chunk
    if _on_threads(scheduler):
        _readahead.start(request, fast.store)  # the command line's: reads while it imports
    try:
        return _deliver_new(
            request, fast, output=output, workers=workers, chunk_size=chunk_size, cache=cache,
            progress=progress, scheduler=scheduler, t0=t0,
        )
    finally:
        _readahead.close()


def _deliver_new(
    request: Any,
    fast: _NotKnown,
    *,
    output: str | os.PathLike[str] | None,
    workers: int | None,
    chunk_size: int | None,
    cache: Any,
    progress: Any,
    scheduler: Scheduler,
    t0: float,
) -> Result | dict[str, Result]:
    """:func:`deliver` of a request whose result is not known before planning."""
    with contextlib.ExitStack() as stack:
        # a running cluster: connected first (up to _CONNECT_FIRST_S), so the workers'
        # warm-up (their imports) runs while this process reads and plans the request
        connecting = _connect_early(request, scheduler, key=fast.key)
        if connecting is not None:
            stack.callback(connecting.close)
            scheduler = connecting
            connecting.wait(_CONNECT_FIRST_S)
        from columnhub.spec import Samples

        req = _load(request, chunk_size=chunk_size)
        if isinstance(req, Samples):
            return _deliver_samples(
                req, output=output, workers=workers, cache=cache, progress=progress,
                scheduler=scheduler,
            )
        own_directory = req.output.directory
        if output is not None:
            req = req.replace(output={**req.output.model_dump(), "directory": os.fspath(output)})
        workers = _workers(workers)
        directory = Path(req.output.directory) if req.output.directory else None
        directory = directory or default_output_directory(req)
        return _deliver_planned(
            req, fast, directory, own_directory, t0=t0, workers=workers, progress=progress,
            cache=cache, scheduler=scheduler,
        )


#: seconds a request on a running cluster waits for the connection before it plans
#: (a scheduler slower to answer is connected to while planning)
_CONNECT_FIRST_S = 1.0


def _on_threads(scheduler: Scheduler) -> bool:
    """Whether the part tasks run on this process's threads (no Dask scheduler named)."""
    return scheduler is None and not os.environ.get("DASK_SCHEDULER_ADDRESS")


def _connect_early(request: Any, scheduler: Scheduler, *, key: str | None) -> Any:
    """:func:`columnhub.execute.dask.early` for ``request`` (``None``: nothing to connect to).

    Started before the request is even read, so connecting (and importing
    ``distributed``) overlaps reading and planning it. ``key``: the request's
    source key, which names the workers' warm-up tasks (a random one if none).
    The warm-up builds a key index too unless ``request`` is a parsed request
    without a keyed friend.
    """
    if _on_threads(scheduler):
        return None  # the thread pool: nothing of distributed imported
    if not isinstance(scheduler, str | None) or scheduler == "local":
        return None
    from columnhub.execute.dask import early

    friends = getattr(request, "friends", None)
    keyed = True if friends is None else any(f.match == "keyed" for f in friends)
    name = (key or secrets.token_hex(8))[:16]
    return early(scheduler, key=f"columnhub-{name}", joins=keyed)


def _deliver_planned(
    req: Request,
    fast: Any,
    directory: Path,
    own_directory: Any,
    *,
    t0: float,
    workers: int,
    progress: Any,
    cache: Any,
    scheduler: Scheduler,
) -> Result:
    """:func:`deliver` of one request from its plan on."""
    from columnhub.plan import make_plan

    # user errors surface here, before anything is written; with the cache opened by
    # _deliver_known, input files planned before are not opened (sources._metadata)
    plan = make_plan(req, cache=fast.store if fast.opened else None)
    t_plan = time.perf_counter() - t0
    _check_not_input(directory, plan)
    store = fast.store if fast.opened else _open_cache(cache)
    _make_directory(directory)
    with _locked(directory), _disk_full_is_output_error(directory):
        previous = _prepare_directory(directory)
        _pause_at("locked")
        identity = _result_key(plan)
        reused = _reuse(identity, directory, previous, store, t0=t0, t_plan=t_plan)
        if reused is not None:
            _fastpath.remember(store, fast.key, plan, identity, directory=own_directory)
            return Result(directory, reused)
        staging = _new_staging(directory)
        try:
            manifest = _execute(
                plan, staging, workers=workers, progress=progress, cache=store,
                scheduler=scheduler,
            )
            _pause_at("staged")
            total = time.perf_counter() - t0
            manifest["timing"].update(plan_s=round(t_plan, 6), total_s=round(total, 6))
            manifest["timing"]["events_per_s"] = (
                round(manifest["events_read"] / total, 1) if total else 0.0
            )
            manifest["result_key"] = identity
            _record(store, identity, directory, manifest)
            _fastpath.remember(store, fast.key, plan, identity, directory=own_directory)
            _readahead.remember(store, plan)
        except BaseException as err:  # Ctrl-C and SIGTERM (the CLI) too: no staging left
            shutil.rmtree(staging, ignore_errors=True)
            if previous is None or not previous.get("complete"):
                with contextlib.suppress(OSError):  # a full disk: the error below says so
                    write_manifest(directory, _failed_manifest(req, err))
            raise
        manifest = _publish(staging, directory, previous, manifest)  # cleans up after itself
    return Result(directory, manifest)


@overload
def arrays(
    request: Request,
    *,
    workers: int | None = None,
    chunk_size: int | None = None,
    cache: ColumnCache | str | os.PathLike[str] | bool | None = False,
) -> ak.Array: ...


@overload
def arrays(
    request: Samples,
    *,
    workers: int | None = None,
    chunk_size: int | None = None,
    cache: ColumnCache | str | os.PathLike[str] | bool | None = False,
) -> dict[str, ak.Array]: ...


@overload
def arrays(
    request: dict[str, Any] | str | os.PathLike[str],
    *,
    workers: int | None = None,
    chunk_size: int | None = None,
    cache: ColumnCache | str | os.PathLike[str] | bool | None = False,
) -> ak.Array | dict[str, ak.Array]: ...


def arrays(
    request: Request | Samples | dict[str, Any] | str | os.PathLike[str],
    *,
    workers: int | None = None,
    chunk_size: int | None = None,
    cache: ColumnCache | str | os.PathLike[str] | bool | None = False,
) -> ak.Array | dict[str, ak.Array]:
    """The columns of ``request`` as one in-memory awkward array, no files written.

    For a quick look in a notebook (the counterpart of uproot's
    ``TTree.arrays``): the same plan, chunk tasks and cache as :func:`deliver`,
    but the selected rows are concatenated in memory instead of written.

    Args:
        request: a :class:`Request`, :class:`Samples`, a dictionary, or a
            YAML/JSON spec path.
        workers: chunk tasks run at once (default: ``$COLUMNHUB_THREADS``, else the CPUs).
        chunk_size: events per chunk (default: ``request.chunk_size``).
        cache: the column cache, as for :func:`deliver`; off by default.

    Returns:
        A record array, one field per output column; for several samples
        ``{sample: array}`` in the order given.
    """
    import awkward as ak
    import pyarrow as pa

    from columnhub.plan import make_plan
    from columnhub.spec import Samples

    req = _load(request, chunk_size=chunk_size)
    if isinstance(req, Samples):
        store = _open_cache(cache)
        shared = store if store is not None else False
        return _each_sample(req.requests(), lambda r: arrays(r, workers=workers, cache=shared))
    plan = make_plan(req)
    results = _chunk_results(plan, workers=_workers(workers), cache=_open_cache(cache))
    if req.output.explode:  # one row per object, as the part writer writes them
        from columnhub.execute.part import explode

        tables = [explode(plan, r) for r in results]
    else:
        tables = [r.table for r in results]
    # one schema, as the writer does (a right/outer tail has null-typed columns)
    tables = [t.cast(tables[0].schema) for t in tables]
    if not tables:
        return ak.Array([])
    # one contiguous table first: awkward concatenates chunked columns slowly
    return ak.from_arrow(pa.concat_tables(tables).combine_chunks(), generate_bitmasks=False)


def _load(request: Any, *, chunk_size: int | None) -> Request | Samples:
    from columnhub.spec import Samples, load_request

    req = load_request(request)
    if chunk_size is None:
        return req
    if isinstance(req, Samples):
        changed = {name: r.replace(chunk_size=chunk_size) for name, r in req.samples.items()}
        return Samples(samples=changed)
    return req.replace(chunk_size=chunk_size)


def _deliver_samples(
    samples: Samples,
    *,
    output: str | os.PathLike[str] | None,
    workers: int | None,
    cache: Any,
    progress: Any,
    scheduler: Scheduler = None,
) -> dict[str, Result]:
    """Deliver each sample as its own request; ``{sample: Result}`` in order.

    Every sample is planned first, so a mistake any plan can show (a missing
    file or column, a bad friend) stops all of them before anything is
    written. A sample that fails while delivering (what only its data can
    show) leaves its own directory marked incomplete, as a single request
    does; the other samples are still delivered, then a :class:`SampleError`
    names each failed sample and holds the delivered results.
    """
    from columnhub.plan import make_plan

    requests = samples.requests()
    if output is not None:
        requests = {
            name: req.replace(
                output={**req.output.model_dump(), "directory": os.fspath(Path(output) / name)}
            )
            for name, req in requests.items()
        }
    _check_directories(requests)
    store = _open_cache(cache)
    shared = store if store is not None else False
    failed: dict[str, Exception] = {}
    for name, req in requests.items():
        try:
            make_plan(req)
        except ColumnhubError as err:
            failed[name] = err
    if failed:
        raise _sample_error(failed, {}, total=len(requests), planning=True) from next(
            iter(failed.values())
        )
    return _each_sample(
        requests,
        lambda r: deliver(
            r, workers=workers, cache=shared, progress=progress, scheduler=scheduler
        ),
    )


def _each_sample(requests: dict[str, Request], run: Callable[[Request], Any]) -> dict[str, Any]:
    """``run`` on every sample's request; user errors of some are raised after the others ran."""
    done: dict[str, Any] = {}
    failed: dict[str, Exception] = {}
    for name, req in requests.items():
        try:
            done[name] = run(req)
        except ColumnhubError as err:
            failed[name] = err
    if failed:
        raise _sample_error(failed, done, total=len(requests), planning=False) from next(
            iter(failed.values())
        )
    return done


def _sample_error(
    failed: dict[str, Exception], done: dict[str, Any], *, total: int, planning: bool
) -> SampleError:
    lines = [
        f"{len(failed)} of {total} sample(s) failed"
        + (" while planning; nothing was delivered" if planning else "")
        + (f" (delivered: {', '.join(done)})" if done else "")
        + ":"
    ]
    for name, err in failed.items():
        text = str(err).replace("\n", "\n    ")
        lines.append(f"  sample {name!r}: {text}")
    return SampleError("\n".join(lines), errors=failed, results=done)


def _check_directories(requests: dict[str, Request]) -> None:
    """Two samples never write into one directory (unless they are the same request)."""
    seen: dict[Path, tuple[str, str]] = {}
    for name, req in requests.items():
        directory = (
            Path(req.output.directory) if req.output.directory else default_output_directory(req)
        )
        key = directory.resolve()
        other = seen.setdefault(key, (name, req.hash))
        if other[1] != req.hash:
            msg = (
                f"samples {other[0]!r} and {name!r} would both write to {directory}; give "
                "each sample its own output.directory (or leave it to the default)"
            )
            raise SpecError(msg)


@dataclass(frozen=True)
class _NotKnown:
    """Why :func:`_deliver_known` answered nothing, and what the full path reuses of it.

    Attributes:
        key: the request's source key (``None``: no fast path for it), under
            which the full path records its result key.
        opened: whether ``store`` is the opened cache (else the full path opens it).
        store: the cache opened for the look-up.
    """

    key: str | None = None
    opened: bool = False
    store: ColumnCache | None = None


def _deliver_known(
    request: Any,
    *,
    output: str | os.PathLike[str] | None,
    chunk_size: int | None,
    cache: Any,
    t0: float,
) -> Result | _NotKnown:
    """A whole-result cache hit found before planning (no uproot, numba, awkward, pyarrow).

    The request's source key names what an earlier delivery of the same
    source recorded (:mod:`columnhub._fastpath`); when every input still is
    the file it was, the result is reused exactly as the full path reuses it
    (:func:`_reuse`: checksums verified, the output directory locked).
    Anything else answers a :class:`_NotKnown` and the full path runs.
    """
    if cache is False:
        return _NotKnown()
    key = _fastpath.source_key(request, chunk_size=chunk_size)
    if key is None:
        return _NotKnown()
    try:
        store = _open_cache(cache)
    except ColumnhubError:  # the full path reports it where it always has
        return _NotKnown(key)
    not_known = _NotKnown(key, opened=True, store=store)
    known = _fastpath.lookup(store, key)
    if known is None or not _fastpath.unchanged(known):
        return not_known
    if output is not None:
        directory = Path(output)
    elif known.directory:
        directory = Path(known.directory)
    else:
        directory = _default_directory(known.request_hash)
    try:
        _check_not_inputs(directory, known.inputs())
    except OutputError:  # the full path names it
        return not_known
    _make_directory(directory)
    with _locked(directory), _disk_full_is_output_error(directory):
        previous = _prepare_directory(directory)
        _pause_at("locked")
        t_plan = time.perf_counter() - t0
        reused = _reuse(known.result_key, directory, previous, store, t0=t0, t_plan=t_plan)
    if reused is None:
        return not_known
    return Result(directory, reused)


def _workers(workers: int | None) -> int:
    if workers is None:
        from columnhub._concurrency import threads

        return threads()
    if workers < 1:
        msg = f"workers must be at least 1, got {workers}"
        raise SpecError(msg)
    return workers


def _chunk_results(
    plan: Plan,
    *,
    workers: int,
    cache: ColumnCache | None,
    index_report: Any = None,
    staging: Path | None = None,
    exchange_report: dict[str, Any] | None = None,
) -> Iterator[ChunkResult]:
    """Every chunk's result in order, then the right/outer tail if there is one.

    ``exchange_report`` (friend name -> what the friend exchange did) is filled
    before the first chunk's result.
    """
    exchanged = None
    from columnhub.execute.chunk import run_chunk, run_tail
    from columnhub.execute.local import run_ordered

    prepared: dict[int, set[str]] = {}
    if plan.friends:
        from columnhub.join.exchange import exchange
        from columnhub.join.provider import prepare

        # key indexes built once; duplicates reported before work
        prepared = prepare(plan, cache=cache, report=index_report).fresh
        # scattered friends read once, into the cache in primary-chunk order
        exchanged = exchange(plan, cache=cache, staging=staging, workers=workers)
        if exchange_report is not None:
            exchange_report.update({n: r.to_dict() for n, r in exchanged.friends.items()})
    store = exchanged.lookup if exchanged is not None else None
    fresh = _merge_fresh(prepared, exchanged.fresh if exchanged is not None else {})
    try:
        yield from run_ordered(
            lambda c: run_chunk(
                plan, c, cache=cache, exchanged=store, fresh=fresh.get(c.index, ())
            ),
            plan.chunks,
            workers=workers,
        )
    finally:
        if exchanged is not None:
            exchanged.close()
    tail = run_tail(plan, cache=cache)
    if tail is not None:
        yield tail


def _merge_fresh(*stages: dict[int, set[str]]) -> dict[int, set[str]]:
    """Per chunk index, the cache addresses any stage stored for this request."""
    out: dict[int, set[str]] = {}
    for stage in stages:
        for index, keys in stage.items():
            out.setdefault(index, set()).update(keys)
    return out


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
        providers=PROVIDER_VERSIONS,  # a provider whose output changed never reuses old results
    )


def _intact(directory: Path, manifest: dict[str, Any], *, verify: bool = False) -> bool:
    """True when every part a complete manifest lists is there, untouched since written.

    A cheap check (size and modification time); with ``verify``, each part's
    xxh3 checksum too (a flipped bit with its mtime restored is caught). Copies
    verify the checksum as they copy.
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
    if verify:
        return all(
            file_checksum(directory / part["name"]) == part["xxh3"]
            for part in manifest.get("parts", [])
        )
    return True


def _reuse(
    identity: str,
    directory: Path,
    previous: dict[str, Any] | None,
    store: ColumnCache | None,
    *,
    t0: float,
    t_plan: float,
) -> dict[str, Any] | None:
    """A full hit: the same request on unchanged inputs was delivered before.

    The result already in ``directory`` is kept as it is once its parts'
    checksums are verified; one delivered elsewhere (found through the cache)
    has its parts copied, byte for byte, and verified as they are copied, then
    published as a new result is. Returns the published manifest (it reports
    what this run did: nothing read or computed), or ``None`` when the result
    must be computed.
    """
    if store is None:
        return None
    source: tuple[Path, dict[str, Any]] | None = None
    if (
        previous is not None
        and previous.get("result_key") == identity
        and _intact(directory, previous, verify=True)
    ):
        source = (directory, previous)
    else:
        blob = store.get_bytes(identity)
        here = directory.resolve()
        if blob is not None and Path(json.loads(blob)["directory"]) != here:
            where = Path(json.loads(blob)["directory"])
            manifest = read_manifest(where) if where.is_dir() else None
            if (
                manifest is not None
                and manifest.get("result_key") == identity
                and _intact(where, manifest)
            ):
                source = (where, manifest)
    if source is None:
        return None
    where, manifest = source
    copied: Path | None = None
    if where != directory:
        copied = _new_staging(directory)
        staging = copied

        def copy_part(part: dict[str, Any]) -> dict[str, Any] | None:
            """One part copied and verified in one pass, then flushed (None: it differs)."""
            copy = staging / part["name"]
            if file_checksum(where / part["name"], copy_to=copy) != part["xxh3"]:
                return None
            fsync_path(copy)  # here, beside the other copies: publishing finds it on disk
            _pause_at("copying")
            return {**part, "mtime_ns": copy.stat().st_mtime_ns}

        try:
            from concurrent.futures import ThreadPoolExecutor

            from columnhub._concurrency import threads

            with ThreadPoolExecutor(min(threads(), len(manifest["parts"]) or 1)) as pool:
                done = list(pool.map(copy_part, manifest["parts"]))
            if any(p is None for p in done):
                shutil.rmtree(copied, ignore_errors=True)
                return None
            parts = [p for p in done if p is not None]
            _pause_at("staged")
        except BaseException:
            shutil.rmtree(copied, ignore_errors=True)
            raise
        manifest = {**manifest, "parts": parts}
    reused = dict(manifest)
    entries = manifest["cache"]["hits"] + manifest["cache"]["misses"]
    # what this run did: every column chunk served (by the stored result), nothing read
    reused["cache"] = {
        "hits": entries,
        "misses": 0,
        "location": store.location,
        "reused_result": str(where),
    }
    reused["events_read"] = 0
    reused["chunks"] = [
        {**c, "read": [], "friend_entries_read": 0, "friend_bytes": {}, "cache_misses": 0,
         "seconds": 0.0, "cache_hits": c.get("cache_hits", 0) + c.get("cache_misses", 0)}
        if "read" in c else {**c, "seconds": 0.0}
        for c in manifest["chunks"]
    ]
    reused["inference"] = {}  # no model was run this time
    reused["friend_exchange"] = {  # no friend was read this time
        name: {"ran": False, "reason": "whole result reused", "bytes_read": 0, "bytes_stored": 0}
        for name in manifest.get("friend_exchange", {})
    }
    reused["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    total = time.perf_counter() - t0
    reused["timing"] = {
        "plan_s": round(t_plan, 6),
        "run_s": 0.0,
        "total_s": round(total, 6),
        "events_per_s": 0.0,
    }
    if copied is None:
        write_manifest(directory, reused)  # one atomic rename; the parts stay as they are
        return reused
    return _publish(copied, directory, previous, reused)


def _execute(
    plan: Plan,
    staging: Path,
    *,
    workers: int,
    progress: Any,
    cache: ColumnCache | None,
    scheduler: Scheduler = None,
) -> dict[str, Any]:
    """Run the plan's part tasks into ``staging``; the manifest from their metadata.

    Each part task writes its own part; only metadata comes back. Parts are
    merged into the manifest in part order. Every part has the first part's
    schema: a right/outer tail (whose primary columns have no type of their
    own), and any part whose types came out otherwise, is written (again)
    with it. Parts without rows are dropped, except one when the whole
    result is empty (it holds the columns), and the rest renumbered.
    """
    from columnhub.execute.dask import executor_for

    req = plan.request
    report = _progress(progress, total=plan.dataset.entries)
    index_report = _index_progress(progress)
    t_run = time.perf_counter()
    done = 0
    metas: dict[int, Any] = {}
    exchanged: Any = None
    prepared: Any = None
    index_errors: list[CacheError] = []
    try:
        with executor_for(scheduler, workers=workers) as run_parts:
            # on a cluster: every worker sees the inputs, staging and cache, before any task
            run_parts.check_shared(staging, cache, _first_local_files(plan))
            if plan.friends:
                from columnhub.join.exchange import exchange
                from columnhub.join.provider import prepare

                tasks = run_parts.tasks(plan)
                # key indexes built once (into the cache workers share; on the cluster's
                # workers when the part tasks run there); duplicates reported first
                prepared = prepare(plan, cache=cache, report=index_report, tasks=tasks)
                # scattered friends read once, into the cache in primary-chunk order
                # (on the cluster's workers when the part tasks run there)
                exchanged = exchange(
                    plan, cache=cache, staging=staging, workers=workers, tasks=tasks,
                    prepared=prepared,
                )
                prepared.wait()  # the primary's index, built meanwhile: checked before any part
            shared = {
                "exchanged": exchanged.lookup if exchanged is not None else None,
                "fresh": _merge_fresh(
                    prepared.fresh if prepared is not None else {},
                    exchanged.fresh if exchanged is not None else {},
                ),
            }
            main = [p for p in plan.parts if not p.tail]
            on_part = getattr(progress, "on_part", None)  # the service: each part's metadata
            for meta in run_parts(plan, main, staging, cache, None, **shared):
                metas[meta.index] = meta
                done += meta.events_in
                if on_part is not None:
                    on_part(meta, len(main))
                if report is not None:
                    report(done, plan.dataset.entries)
            first = metas[main[0].index].schema
            again = [p for p in main if metas[p.index].schema != first]
            again += [p for p in plan.parts if p.tail]
            if again:
                for meta in run_parts(plan, again, staging, cache, first, **shared):
                    metas[meta.index] = meta
            if plan.friends:
                from columnhub.join.provider import wait_stored

                # key indexes built here, written meanwhile: in the cache now
                index_errors = wait_stored()
    finally:
        if prepared is not None:
            prepared.release()  # after an error: nothing left running
        if exchanged is not None:
            exchanged.close()
        for bar in (report, index_report):
            if bar is not None and hasattr(bar, "close"):
                bar.close()
    ordered = [metas[p.index] for p in plan.parts]
    kept = [m for m in ordered if m.rows] or ordered[:1]
    kept_index = {m.index for m in kept}
    for meta in ordered:
        if meta.index not in kept_index:
            (staging / meta.name).unlink(missing_ok=True)
    parts = []
    for number, meta in enumerate(kept):  # numbered in order, without gaps
        name = re.sub(r"^part-\d+", f"part-{number:05d}", meta.name)
        if name != meta.name:
            os.replace(staging / meta.name, staging / name)
        stat = (staging / name).stat()
        parts.append(
            {"name": name, "rows": meta.rows, "bytes": meta.bytes, "xxh3": meta.xxh3,
             "mtime_ns": stat.st_mtime_ns}
        )
    inference: Any = None
    for meta in ordered:
        if meta.inference is not None:
            if inference is None:
                inference = meta.inference
            else:
                inference.merge(meta.inference)
    return {
        "columnhub": _version(),
        "request_hash": req.hash,
        "request": req.to_dict(),
        "complete": True,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "format": req.output.format,
        "events": sum(m.events for m in ordered),
        "events_read": plan.dataset.entries,
        "files": [p["name"] for p in parts],
        "parts": parts,
        "columns": ordered[0].columns,
        "keys": (
            list(req.dataset.keys) if req.output.include_keys and not req.output.explode else []
        ),
        "cache": {
            "hits": sum(m.hits for m in ordered),
            "misses": sum(m.misses for m in ordered),
            "location": cache.location if cache else None,
            **_index_write_failed(index_errors),
        },
        "inputs": plan.dataset.identity,
        "friends": {f.spec.name: f.dataset.identity for f in plan.friends},
        "friend_exchange": _friend_exchange(
            plan,
            {k: r.to_dict() for k, r in exchanged.friends.items()} if exchanged else {},
            [record for m in ordered for record in m.chunks],
        ),
        "chunks": [record for m in ordered for record in m.chunks],
        "inference": inference.snapshot() if inference is not None else {},
        "models": {
            f"{m.card.name}@{m.card.version}": m.card.identity
            for m in {id(c.model): c.model for c in plan.columns.values() if c.model}.values()
        },
        "timing": {
            "run_s": round(time.perf_counter() - t_run, 6),
            "parts_s": [round(m.seconds, 6) for m in ordered],
        },
    }


def _index_write_failed(errors: list[CacheError]) -> dict[str, Any]:
    """The manifest's ``cache`` fields (and a warning) when key indexes could not be stored.

    Like the result's record (:func:`_record`): the delivery is complete, the
    next request builds the indexes again instead of loading them.
    """
    if not errors:
        return {}
    msg = (
        f"the result is complete, but the cache could not store a key index ({errors[0]}); "
        "the next request with this friend builds it again"
    )
    warnings.warn(msg, RuntimeWarning, stacklevel=4)
    return {"partial": True, "error": str(errors[0])}


def _friend_exchange(
    plan: Plan, exchanged: dict[str, Any], chunks: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per keyed friend: whether the exchange ran, and friend bytes read vs stored.

    ``bytes_read``/``bytes_stored`` count the exchange and the chunk tasks
    together (arrays in memory: bytes decoded from the friend's files, and
    bytes of its columns joined in primary-chunk order).
    """
    out: dict[str, Any] = {}
    for friend in plan.friends:
        name = friend.spec.name
        entry = dict(exchanged.get(name, {"ran": False, "reason": "no keyed friend"}))
        read = sum(c.get("friend_bytes", {}).get(name, [0, 0])[0] for c in chunks)
        stored = sum(c.get("friend_bytes", {}).get(name, [0, 0])[1] for c in chunks)
        entry["bytes_read"] = entry.get("bytes_read", 0) + read
        entry["bytes_stored"] = entry.get("bytes_stored", 0) + stored
        entry["chunk_bytes_read"] = read
        out[name] = entry
    return out


#: the advisory lock file of an output directory (``fcntl.flock``), held for a whole delivery
_LOCK = ".columnhub.lock"
#: the publish journal: part names coming in and going out while a result is published
_JOURNAL = ".columnhub-publish.json"
#: how long a delivery waits for another one holding the output directory (seconds)
_LOCK_TIMEOUT_ENV = "COLUMNHUB_OUTPUT_LOCK_TIMEOUT"
_LOCK_TIMEOUT_DEFAULT = 600.0
_PART_NAME = re.compile(r"^part-\d{5,}(?:\.\d+)?\.(?:parquet|root)$")
_VARIANT = re.compile(r"^(part-\d+)(?:\.\d+)?\.")
_STAGING = re.compile(r"^\.staging-(\d+)-\d+$")
_MANIFEST_TMP = re.compile(
    rf"^\.(?:{re.escape(MANIFEST)}|{re.escape(_JOURNAL[1:])})\.tmp-(\d+)(?:-[0-9a-f]+)?$"
)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _pause_at(step: str) -> None:
    """Test-only hook: stop this process (SIGSTOP) at the named publish step.

    Set ``COLUMNHUB_TEST_PAUSE_AT`` to one of ``locked``, ``copying``,
    ``staged``, ``journal``, ``moving``, ``moved``, ``published``, ``cleaned``
    and the process stops itself there, so a test can look at the output
    directory and kill it (``SIGKILL``) at exactly that point. Never set it
    outside tests.
    """
    if os.environ.get("COLUMNHUB_TEST_PAUSE_AT") == step:
        os.kill(os.getpid(), signal.SIGSTOP)


def _make_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        msg = f"output {directory} exists and is not a directory; choose another path"
        raise OutputError(msg)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        msg = f"cannot create the output directory {directory} ({err.strerror})"
        raise OutputError(msg) from err


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the output directory's advisory lock (``.columnhub.lock``) for a delivery.

    A second delivery into the same directory waits for the first to finish,
    at most ``$COLUMNHUB_OUTPUT_LOCK_TIMEOUT`` seconds (default 600), then
    fails with an :class:`OutputError` naming the process that holds it. The
    kernel releases the lock when its holder dies, however it dies. The file
    is removed on release; a waiter that locked a removed file tries again.
    """
    import fcntl

    raw = os.environ.get(_LOCK_TIMEOUT_ENV)
    try:
        timeout = _LOCK_TIMEOUT_DEFAULT if raw is None else float(raw)
    except ValueError as err:
        msg = f"${_LOCK_TIMEOUT_ENV} must be a number of seconds, got {raw!r}"
        raise OutputError(msg) from err
    path = directory / _LOCK
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            msg = (
                f"cannot create the lock file {path} ({err.strerror}); "
                "check the directory's permissions"
            )
            raise OutputError(msg) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if time.monotonic() >= deadline:
                msg = (
                    f"output directory {directory} is in use by another delivery (process "
                    f"{holder}); waited {timeout:g} s for it to finish. Wait for it, deliver into "
                    f"another directory, or set ${_LOCK_TIMEOUT_ENV} to wait longer"
                )
                raise OutputError(msg) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
            continue
        except OSError as err:
            os.close(fd)
            msg = (
                f"cannot lock {path} ({err.strerror}): the file system does not support "
                "flock; deliver into a directory on a local or flock-capable file system"
            )
            raise OutputError(msg) from err
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed it on release: lock the new one
    try:
        with contextlib.suppress(OSError):  # who holds it, for the message (a full disk: no matter)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still locked: whoever opens it next sees a removed file
        os.close(fd)


@contextlib.contextmanager
def _disk_full_is_output_error(directory: Path) -> Iterator[None]:
    """A full output disk (or quota, or file size limit) becomes one clear :class:`OutputError`."""
    try:
        yield
    except OSError as err:
        if isinstance(err, ColumnhubError) or err.errno not in _DISK_FULL:
            raise
        what = "hit a file size limit" if err.errno == errno.EFBIG else "ran out of space"
        msg = (
            f"the output directory {directory} {what} ({err.strerror}) while the result was "
            "written; nothing was published and any previous result there is unchanged. "
            "Free some space or deliver into another directory"
        )
        raise OutputError(msg) from err


def _first_local_files(plan: Plan) -> list[str]:
    """The first local file of the primary and of each friend (what a worker must see too)."""
    from columnhub.datasets import is_url

    datasets = [plan.dataset, *(f.dataset for f in plan.friends)]
    firsts = [next((f.path for f in d.files if not is_url(f.path)), None) for d in datasets]
    return list(dict.fromkeys(p for p in firsts if p is not None))


def _new_staging(directory: Path) -> Path:
    """A fresh hidden directory the parts are written to: ``.staging-<pid>-<ns>``."""
    staging = directory / f".staging-{os.getpid()}-{time.time_ns()}"
    staging.mkdir()
    return staging


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _recover(directory: Path) -> None:
    """Finish or undo what a killed delivery left (called with the lock held).

    The publish journal lists the parts a publish was moving in and the ones
    it was replacing; the manifest says which of the two sets is the result.
    The other set goes. Staging directories and manifest temporaries of
    processes that are gone go too.
    """
    journal_path = directory / _JOURNAL
    if journal_path.is_file():
        try:
            journal = json.loads(journal_path.read_text())
        except ValueError:  # written by rename, so never torn: not ours
            msg = f"{journal_path} is not a columnhub publish journal; remove it and deliver again"
            raise OutputError(msg) from None
        manifest = read_manifest(directory)
        live = set(manifest.get("files", [])) if manifest else set()
        for name in [*journal.get("incoming", []), *journal.get("replaces", [])]:
            if name not in live and _PART_NAME.match(name):
                (directory / name).unlink(missing_ok=True)
        journal_path.unlink()
    for entry in directory.iterdir():
        match = _STAGING.match(entry.name) or _MANIFEST_TMP.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _prepare_directory(directory: Path) -> dict[str, Any] | None:
    """Check the (locked) output directory; returns the manifest of a result already there.

    What a killed delivery left is cleaned up first. A directory without a
    manifest must be empty; one with a manifest must hold no part-named file
    the manifest does not list (a user's file is never overwritten).
    """
    _recover(directory)
    previous = read_manifest(directory)
    ours = (".staging-", _LOCK, _JOURNAL, f".{MANIFEST}.tmp-")
    if previous is None:
        others = [p.name for p in directory.iterdir() if not p.name.startswith(ours)]
        if others:
            msg = (
                f"output directory {directory} is not empty and holds no columnhub result "
                f"(it has {', '.join(sorted(others)[:5])}); choose an empty or new directory"
            )
            raise OutputError(msg)
        return None
    listed = set(previous.get("files", []))
    strays = sorted(
        p.name for p in directory.iterdir() if _PART_NAME.match(p.name) and p.name not in listed
    )
    if strays:
        msg = (
            f"output directory {directory} holds {', '.join(strays[:5])}, named like a part but "
            "not part of the columnhub result there; it would be overwritten. Move it away or "
            "deliver into another directory"
        )
        raise OutputError(msg)
    return previous


def _check_not_input(directory: Path, plan: Plan) -> None:
    """Refuse an output directory that is, holds or lies inside an input dataset's files."""
    _check_not_inputs(
        directory,
        [
            (d.spec.name, list(d.spec.files), [f.path for f in d.files])
            for d in [plan.dataset, *(f.dataset for f in plan.friends)]
        ],
    )


def _check_not_inputs(directory: Path, datasets: list[tuple[str, list[str], list[str]]]) -> None:
    """:func:`_check_not_input` for ``(name, files entries, resolved paths)`` of each dataset."""
    out = directory.resolve()
    for name, entries, paths in datasets:
        for entry in entries:
            if is_url(entry):
                continue
            path = Path(entry.removeprefix("file://")).expanduser().resolve()
            inside = path.is_dir() and out.is_relative_to(path)
            if path == out or path.is_relative_to(out) or inside:
                where = "inside" if inside and path != out else "the directory of"
                msg = (
                    f"output directory {directory} is {where} the input dataset "
                    f"{name!r} ({entry}); delivering there would overwrite or mix "
                    "with its files. Choose another output directory"
                )
                raise OutputError(msg)
        for file in paths:
            if not is_url(file) and Path(file).resolve().is_relative_to(out):
                msg = (
                    f"output directory {directory} holds {file}, a file of the input "
                    f"dataset {name!r}; delivering there would overwrite it. "
                    "Choose another output directory"
                )
                raise OutputError(msg)


def _record(
    store: ColumnCache | None, identity: str, directory: Path, manifest: dict[str, Any]
) -> None:
    """Record where the whole result is, so the same request is reused next time.

    A cache that cannot take it (a full disk) costs only that reuse: a
    warning, and the manifest says caching was partial.
    """
    if store is None or store.read_only:
        return
    try:
        store.put_bytes(identity, json.dumps({"directory": str(directory.resolve())}).encode())
    except CacheError as err:
        manifest["cache"]["partial"] = True
        manifest["cache"]["error"] = str(err)
        msg = (
            f"the result in {directory} is complete, but the cache could not record it ({err}); "
            "the same request will be computed again instead of reused"
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _fresh_names(names: list[str], taken: set[str]) -> list[str]:
    """The names to publish parts under: ``part-NNNNN.ext``, else ``part-NNNNN.<k>.ext``.

    ``k`` is the first that gives names no file in the directory (``taken``)
    has: the previous result's parts keep their names until the new manifest
    is in place, so the new parts must not share one.
    """
    bases = [_VARIANT.sub(r"\1.", n) for n in names]  # a copied result may have variants
    k = 0
    while True:
        fresh = [b if k == 0 else _VARIANT.sub(rf"\1.{k}.", b) for b in bases]
        if not taken.intersection(fresh):
            return fresh
        k += 1


def _publish(
    staging: Path, directory: Path, previous: dict[str, Any] | None, manifest: dict[str, Any]
) -> dict[str, Any]:
    """Publish the parts in ``staging`` and ``manifest`` in place of the previous result.

    Crash-safe at every instant (the lock is held): the new parts get names
    no file in the directory has; a journal naming them and the parts they
    replace is written (atomically) first; the parts are moved in; one atomic
    rename of ``manifest.json`` switches from the previous result to the new
    one; then the previous parts and the journal go. A kill anywhere leaves
    the complete previous or the complete new result, and the journal tells
    the next delivery (:func:`_recover`) which files are left over.

    Returns:
        ``manifest`` with the names the parts were published under.
    """
    original = [p["name"] for p in manifest["parts"]]
    names = _fresh_names(original, {p.name for p in directory.iterdir()})
    renamed = dict(zip(original, names, strict=True))
    manifest = {
        **manifest,
        "files": [renamed[n] for n in manifest["files"]],
        "parts": [{**p, "name": renamed[p["name"]]} for p in manifest["parts"]],
    }
    old = [n for n in (previous or {}).get("files", []) if n not in renamed.values()]
    for name in original:  # on disk before anything points at it
        fsync_path(staging / name)
    journal = {"pid": os.getpid(), "incoming": names, "replaces": old}
    tmp = directory / f".{_JOURNAL}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(journal) + "\n")
        os.replace(tmp, directory / _JOURNAL)
        _pause_at("journal")
        for i, (src, dst) in enumerate(renamed.items()):
            os.replace(staging / src, directory / dst)
            if i == 0:
                _pause_at("moving")
        _pause_at("moved")
        write_manifest(directory, manifest)  # the switch: one atomic rename
    except BaseException:
        tmp.unlink(missing_ok=True)
        current = read_manifest(directory) if (directory / MANIFEST).is_file() else None
        if current is None or current.get("files") != manifest["files"]:
            # not switched: the previous result is still the one; take the new parts away
            for name in names:
                (directory / name).unlink(missing_ok=True)
            (directory / _JOURNAL).unlink(missing_ok=True)
        # else switched just before the interrupt: the journal lets the next delivery finish
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _pause_at("published")
    for name in old:
        (directory / name).unlink(missing_ok=True)
    _pause_at("cleaned")
    (directory / _JOURNAL).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


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
    """tqdm when bars are on (``progress=True``, or a terminal by default), else ``None``.

    ``tqdm.auto``: widgets in Jupyter, text bars in a terminal.
    """
    if callable(progress) or progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
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
