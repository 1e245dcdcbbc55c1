"""Dask executor: part tasks on a ``distributed`` cluster, and the choice of executor.

Any Dask deployment works by its scheduler address (dask-jobqueue on
HTCondor or Slurm, dask-gateway, the Kubernetes operator); ``"local"`` starts
a ``LocalCluster`` of single-threaded worker processes for this request. The
part tasks are submitted with keys that name the request and the part, are
retried when a worker dies or a task fails, and return only metadata: the
workers write the parts into the staging directory and read and write the
column cache themselves, so both must be locations every worker sees.
Other stages of a request (the friend exchange) submit their tasks through
:class:`Tasks`, with the same key naming and retries.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import threading
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from columnhub import __version__
from columnhub.errors import ClusterLostError, SpecError, WorkersDiedError

_log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pyarrow as pa

    from columnhub.cache import ColumnCache
    from columnhub.execute.part import PartMeta
    from columnhub.plan import Part, Plan

__all__ = [
    "SCHEDULER_ENV",
    "Early",
    "Executor",
    "RunParts",
    "Tasks",
    "close_cluster",
    "connect",
    "early",
    "executor_for",
    "local_cluster",
    "run_parts",
]

#: the scheduler address used when ``deliver`` is given none (Dask's own name)
SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
#: how many times a failed part task is retried (a worker's death counts as well)
RETRIES_ENV = "COLUMNHUB_TASK_RETRIES"
_RETRIES_DEFAULT = 3

#: ``run(plan, parts, staging, cache, schema, *, exchanged=None, fresh=None)``: each
#: part's metadata as it finishes (``exchanged``/``fresh``: the friend exchange's store
#: and, per chunk, the addresses it stored; see :func:`columnhub.execute.part.run_part`)
RunParts = Callable[..., Iterator["PartMeta"]]


class Tasks:
    """One request's tasks on a Dask cluster, submitted like its part tasks.

    Keys name the request (``columnhub-<request hash>-<name>-<run>``), tasks
    are retried ``$COLUMNHUB_TASK_RETRIES`` times (a worker's death counts as
    well), and results stay on the workers until gathered: arguments that
    are futures make a task wait for them, and travel worker to worker.

    Args:
        client: a ``distributed.Client``.
        plan: the request's plan (its hash names the keys).
    """

    def __init__(self, client: Any, plan: Plan) -> None:
        self.client = client
        self.prefix = f"columnhub-{plan.request.hash[:16]}"
        self.run = secrets.token_hex(4)  # keys of a new delivery never meet an older one's
        self.retries = _retries()
        self._workers: list[str] | None = None

    def submit(self, fn: Callable[..., Any], *args: Any, key: str, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the cluster as task ``key``; its future."""
        return self.client.submit(
            fn, *args, key=f"{self.prefix}-{key}-{self.run}", pure=False,
            retries=self.retries, **kwargs,
        )

    def spread(self, number: int) -> dict[str, Any]:
        """``submit`` options that place task ``number`` of a stage on the workers in turn.

        The scheduler puts a task where its inputs are; tasks whose inputs all
        sit on one worker would all run there. This hint (any worker may still
        run the task, e.g. when its own dies) spreads a stage over the cluster.
        A worker whose every thread runs someone else's task when the request
        starts gets no hint: a task sent there would wait for that task (the
        scheduler's work stealing does not reliably move it), while the
        others can run it now.
        """
        if self._workers is None:
            self._workers = _free_workers(self.client)
        if len(self._workers) < 2:
            return {}
        return {"workers": [self._workers[number % len(self._workers)]], "allow_other_workers": True}

    def gather(self, futures: Sequence[Any]) -> list[Any]:
        """The results of ``futures`` (a task's error is raised as itself)."""
        return list(self.client.gather(list(futures)))

    def release(self, futures: Collection[Any]) -> None:
        """Cancel ``futures`` that still run and drop the results held on workers."""
        if futures:
            self.client.cancel(list(futures))


def _free_workers(client: Any) -> list[str]:
    """The workers with a thread not taken by a task other than columnhub's (sorted)."""
    threads = client.nthreads()
    taken = client.processing()  # worker -> the keys it runs or holds queued
    return sorted(
        worker for worker, n in threads.items()
        if sum(not str(k).startswith("columnhub-") for k in taken.get(worker, ())) < n
    )


class Executor:
    """Where a request's tasks run: call it to run part tasks (a :data:`RunParts`).

    Attributes:
        client: the ``distributed.Client``, or ``None`` for this process's thread pool.
    """

    def __init__(
        self, run: RunParts, client: Any = None, *, ready: Callable[[], str] | None = None
    ) -> None:
        self._run = run
        self.client = client
        # the scheduler's columnhub version, asked while the request was planned
        self._ready = ready

    def __call__(self, *args: Any, **kwargs: Any) -> Iterator[PartMeta]:
        """Run part tasks (see :data:`RunParts`)."""
        return self._run(*args, **kwargs)

    def tasks(self, plan: Plan) -> Tasks | None:
        """A :class:`Tasks` for ``plan`` on the cluster, or ``None`` on the thread pool."""
        return None if self.client is None else Tasks(self.client, plan)

    def check_shared(
        self, staging: Path, cache: ColumnCache | None, inputs: Sequence[str] = ()
    ) -> None:
        """Raise :class:`SpecError` unless the scheduler and every worker can run the request.

        They must run this columnhub version (:meth:`_check_scheduler`, and
        each worker's answer below), and every worker must see these paths
        as this process does.

        On a cluster, tasks read the inputs, write the parts into ``staging``
        and pass the exchange's columns through the column cache: a worker
        on a node where one of them is another directory (not on the shared
        file system, or mounted elsewhere) would fail with a bare
        ``FileNotFoundError``, report an input as removed while it was
        read, or read a friend again where the exchange's columns should
        be. A probe file is written to ``staging`` and to a local cache
        that is not read-only, and each connected worker looks for
        them and for the local files of ``inputs`` (one per dataset is
        enough: a file system is mounted whole), with the sizes this
        process sees. Workers that join later are not checked; nothing to
        check on the thread pool.

        The probe runs outside the task queue (``Client.run``, on each worker's
        event loop): a fresh worker still busy with its warm-up (its imports,
        about half a second) answers at once instead of after it, so the
        request's first tasks are submitted, and queued behind the warm-up,
        that much sooner. A worker that left the cluster meanwhile is not
        waited for (a task restricted to it would wait forever).
        """
        if self.client is None:
            return
        self._check_scheduler()
        workers = sorted(self.client.nthreads())
        if not workers:  # an adaptive cluster with none yet: its workers are not known
            warnings.warn(
                f"no Dask worker has joined the cluster at {self._address()} yet: the "
                "request's tasks wait for the first one (an adaptive or batch-queue cluster "
                "starts them on demand); interrupt to stop",
                RuntimeWarning, stacklevel=2,
            )
            return
        token = secrets.token_hex(8)
        places = {"the output's staging directory": Path(staging)}
        if cache is not None and not cache.read_only and "://" not in cache.location:
            places["the column cache"] = Path(cache.root)
        probes: dict[str, str] = {}
        try:
            for what, directory in places.items():
                probe = directory / f".columnhub-probe-{token}"
                try:  # a cache's root may not exist yet (its first entry makes it)
                    directory.mkdir(parents=True, exist_ok=True)
                    probe.write_text(token, encoding="utf-8")
                except OSError:  # not writable here: the request reports that itself
                    continue
                probes[what] = str(probe)
            sizes = {}
            for path in inputs:
                with contextlib.suppress(OSError):  # a file gone here is reported by the request
                    sizes[path] = os.stat(path).st_size
            if not probes and not sizes:
                return
            answers = self.client.run(
                _probe, probes, token, sizes, workers=workers, on_error="return"
            )
        finally:
            for probe in probes.values():
                with contextlib.suppress(OSError):
                    os.unlink(probe)
        present = None
        for worker in workers:
            answer = answers.get(worker)
            if isinstance(answer, BaseException) or answer is None:
                if present is None:
                    present = set(self.client.nthreads())
                if worker not in present:
                    continue  # it left the cluster: it runs none of this request's tasks
                if _cannot_import_columnhub(answer):
                    msg = (
                        f"Dask worker {self._name(worker)} cannot import columnhub ({answer}): "
                        f"install columnhub {__version__} (the version here) in the workers' "
                        "environment, or run without --scheduler"
                    )
                else:
                    msg = (
                        f"Dask worker {self._name(worker)} could not be asked whether it sees "
                        f"the input files, the output directory and the column cache ({answer!r}); "
                        "check the worker's log, or run without --scheduler"
                    )
                raise SpecError(msg)
            version, missing = answer
            if version != __version__:
                msg = (
                    f"Dask worker {self._name(worker)} runs columnhub {version}, this process "
                    f"{__version__}: the workers must run the same version (its tasks, cache "
                    "addresses and output format); install columnhub "
                    f"{__version__} there, or run without --scheduler"
                )
                raise SpecError(msg)
            if missing:
                # a probe's place with its path; an input file is named with its own
                what = " and ".join(f"{w} ({places[w]})" if w in places else w for w in missing)
                msg = (
                    f"Dask worker {self._name(worker)} does not see {what} as this process does: on a "
                    "cluster the input files, the output directory and the column cache must "
                    "be on a file system every worker mounts at the same path (or given as "
                    "URLs, root:// or s3://, that every worker reaches); choose such paths, "
                    "or run without --scheduler"
                )
                raise SpecError(msg)

    def _address(self) -> str:
        """The scheduler's address, as the client knows it."""
        return _scheduler_address(self.client)

    def _name(self, worker: str) -> str:
        """``'name' (address)`` of a worker, when the scheduler gives it a name of its own."""
        with contextlib.suppress(Exception):
            name = self.client.scheduler_info()["workers"][worker]["name"]
            if str(name) != worker:
                return f"{name!r} ({worker})"
        return worker

    def _check_scheduler(self) -> None:
        """Raise :class:`SpecError` unless the scheduler loads columnhub, at this version.

        The scheduler unpickles every task it is given (the functions and
        their arguments: the plan, the cache), so it needs columnhub as much
        as the workers do; without it, distributed's own error came as a
        traceback from the first task.
        """
        address = self._address()
        try:
            version = self._ready() if self._ready is not None else _ask_scheduler(self.client)
        except ImportError as err:
            msg = (
                f"the Dask scheduler at {address} cannot import columnhub ({err}): it unpickles "
                f"the request's tasks, so it needs columnhub {__version__} (the version here) "
                "installed as the workers do; install it in the scheduler's environment, or "
                "run without --scheduler"
            )
            raise SpecError(msg) from err
        if version != __version__:
            msg = (
                f"the Dask scheduler at {address} runs columnhub {version}, this process "
                f"{__version__}: install columnhub {__version__} in the scheduler's and the "
                "workers' environment, or run without --scheduler"
            )
            raise SpecError(msg)


def _ready() -> str:
    """On the scheduler: import what unpickling a request's tasks needs; columnhub's version.

    Asked while the client still plans (:class:`Early`), a fresh scheduler
    does these imports (awkward, pydantic, columnhub: a few tenths of a
    second, on its event loop) before the request's first tasks reach it.
    """
    import columnhub
    import columnhub.cache
    import columnhub.execute.part
    import columnhub.join.exchange
    import columnhub.join.provider
    import columnhub.plan

    return columnhub.__version__


def _ask_scheduler(client: Any) -> str:
    """:func:`_ready` run on ``client``'s scheduler (its ``ImportError`` raised here)."""
    return str(client.run_on_scheduler(_ready))


def _cannot_import_columnhub(answer: object) -> bool:
    """Whether a worker's failed answer says that columnhub cannot be imported there."""
    text = str(answer)
    failed = isinstance(answer, ImportError) or "ImportError" in text or "ModuleNotFoundError" in text
    return failed and "columnhub" in text


def _version() -> str:
    """On a worker: its columnhub version."""
    return __version__


def _probe(
    probes: Mapping[str, str], token: str, sizes: Mapping[str, int]
) -> tuple[str, list[str]]:
    """On a worker: its columnhub version, and what it does not see (:func:`_unseen`)."""
    return __version__, _unseen(probes, token, sizes)


def _unseen(probes: Mapping[str, str], token: str, sizes: Mapping[str, int]) -> list[str]:
    """Task: what this worker does not see as the client does.

    ``probes``: what -> a probe file that must hold ``token``; ``sizes``:
    input file -> its size. The answer names each (``the input file PATH``).
    """
    missing = []
    for what, path in probes.items():
        try:
            with open(path, encoding="utf-8") as f:
                seen = f.read() == token
        except OSError:
            seen = False
        if not seen:
            missing.append(what)
    for path, size in sizes.items():
        try:
            seen = os.stat(path).st_size == size
        except OSError:
            seen = False
        if not seen:
            missing.append(f"the input file {path}")
    return missing


@contextlib.contextmanager
def executor_for(scheduler: Any, *, workers: int) -> Iterator[Executor]:
    """The part-task runner for ``scheduler``, open for the ``with`` block.

    Args:
        scheduler: ``None`` (``$DASK_SCHEDULER_ADDRESS`` when set, else a
            thread pool here), ``"local"`` (a ``LocalCluster`` of ``workers``
            single-threaded processes, closed at the end), a scheduler
            address (``tcp://host:8786``), or a ``distributed.Client``
            (left open).
        workers: threads of the local pool, or processes of ``"local"``.
    """
    if scheduler is None:
        scheduler = os.environ.get(SCHEDULER_ENV) or None
    if scheduler is None:
        from columnhub.execute.local import run_parts as local

        yield Executor(functools.partial(local, workers=workers))
        return
    ready = scheduler.scheduler_version if isinstance(scheduler, Early) else None
    with _client(scheduler, workers=workers) as client, _watch_paused(client):
        try:
            yield Executor(functools.partial(run_parts, client), client, ready=ready)
        except Exception as err:
            failed = _lost_connection(client, err) or _workers_died(client, err)
            if failed is None:
                raise
            raise failed from err


#: seconds between two looks at the workers' state while a request runs on a cluster
_WATCH_S = 10.0


@contextlib.contextmanager
def _watch_paused(client: Any) -> Iterator[None]:
    """Warn (once a worker) while a request runs when the scheduler says a worker is paused.

    distributed pauses a worker whose memory passes its pause threshold (80%
    of its limit by default): it runs no task until memory is freed, and a
    request whose tasks wait there waited without a word.
    """
    stop = threading.Event()
    said: set[str] = set()

    def watch() -> None:
        while not stop.wait(_WATCH_S):
            with contextlib.suppress(Exception):  # only a hint: the request goes on regardless
                for address, info in client.scheduler_info()["workers"].items():
                    if info.get("status") != "paused" or address in said:
                        continue
                    said.add(address)
                    memory = (info.get("metrics") or {}).get("memory")
                    limit = info.get("memory_limit")
                    where = ""
                    if memory and limit:
                        where = f" (its memory: {memory / 1e6:,.0f} MB of a {limit / 1e6:,.0f} MB limit)"
                    warnings.warn(
                        f"Dask worker {address} is paused{where}: distributed runs no task "
                        "there until its memory is freed, and the request waits for it; give "
                        "the workers more memory, or lower output.target_part_bytes and "
                        "chunk_size",
                        RuntimeWarning, stacklevel=1,
                    )

    thread = threading.Thread(target=watch, name="columnhub-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def _scheduler_address(client: Any) -> str:
    """The address of ``client``'s scheduler, as the client knows it (``?``: unknown)."""
    return str(getattr(getattr(client, "scheduler", None), "address", None) or "?")


def _workers_died(client: Any, err: BaseException) -> WorkersDiedError | None:
    """The user's error for distributed's ``KilledWorker`` (a task whose workers all died)."""
    distributed = _distributed()
    if not isinstance(err, distributed.scheduler.KilledWorker):
        return None
    key = str(getattr(err, "task", "") or "")
    words = key.split("-")[2:-1] if key.startswith("columnhub-") else []
    task = " ".join(words) or key or "a task"
    limits: set[Any] = set()
    with contextlib.suppress(Exception):
        limits = {w.get("memory_limit") for w in client.scheduler_info()["workers"].values()}
    limit = ""
    if len(limits) == 1 and (only := next(iter(limits))):
        limit = f" (their memory limit: {int(only) / 1e6:,.0f} MB)"
    tries = getattr(err, "allowed_failures", None)
    after = f" (distributed gave up after {tries + 1})" if isinstance(tries, int) else ""
    msg = (
        f"the Dask workers running task {task!r} died one after another while running "
        f"it{after}: most often a worker out of "
        f"memory{limit}; give the workers more memory, or lower output.target_part_bytes "
        "and chunk_size, and see the workers' logs (\"exceeded ... memory budget\")"
    )
    return WorkersDiedError(msg)


class _ConnectionNoise(logging.Filter):
    """Drops distributed's client tracebacks of a lost scheduler connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        import asyncio

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, OSError | asyncio.CancelledError):  # CommClosedError is an OSError
            return False
        return not str(record.msg).startswith("Failed to reconnect to scheduler")


def quiet_lost_connections() -> None:
    """In a command: no traceback from distributed's client when the scheduler goes away.

    Its reconnection attempts log the failed connection with a traceback;
    the command says what happened itself (:class:`ClusterLostError`).
    """
    client_log = logging.getLogger("distributed.client")
    if not any(isinstance(f, _ConnectionNoise) for f in client_log.filters):
        client_log.addFilter(_ConnectionNoise())


def _lost_connection(client: Any, err: BaseException) -> ClusterLostError | None:
    """The user's error for ``err`` when it says that the scheduler went away, else ``None``."""
    distributed = _distributed()
    cancelled = isinstance(err, distributed.client.FutureCancelledError) and (
        "scheduler-connection-lost" in str(err)
    )
    closed = isinstance(err, distributed.comm.CommClosedError | OSError) and (
        getattr(client, "status", "running") != "running"
    )
    if not (cancelled or closed):
        return None
    address = _scheduler_address(client)
    msg = (
        f"lost the connection to the Dask scheduler at {address} mid-request ({type(err).__name__}): "
        "nothing was published; once the scheduler is back, run the request again (what the "
        "workers stored in the column cache is reused)"
    )
    return ClusterLostError(msg)


@contextlib.contextmanager
def _client(scheduler: Any, *, workers: int) -> Iterator[Any]:
    if isinstance(scheduler, Early):  # connected in the background (closed by its owner)
        yield scheduler.client()
        return
    distributed = _distributed()
    if isinstance(scheduler, distributed.Client):
        yield scheduler
        return
    if not isinstance(scheduler, str) or not scheduler:
        msg = (
            f"scheduler must be 'local', a Dask scheduler address (tcp://host:8786) or a "
            f"distributed.Client, got {scheduler!r}"
        )
        raise SpecError(msg)
    if scheduler == "local":
        cluster = local_cluster(workers)
        client = None
        try:
            client = distributed.Client(cluster)
            yield client
        finally:
            close_cluster(cluster, client)
        return
    with connect(scheduler) as client:
        yield client


class Early:
    """A connection to a running cluster made in the background while the request is planned.

    Connecting (and importing ``distributed``) takes the client a few tenths of
    a second, and a fresh worker's first tasks import columnhub, awkward and
    uproot (about half a second): both happen here while this process plans
    the request. Once connected, one *warm-up* task per worker
    (:func:`warm`) does those imports, so the request's first tasks find the
    workers ready. :meth:`client` gives the connection (its error, if any, is
    raised there, as :func:`connect` raises it); :meth:`close` closes it.
    """

    def __init__(self, scheduler: str, *, key: str, joins: bool) -> None:
        self._scheduler = scheduler
        self._key = key
        self._joins = joins
        self._client: Any = None
        self._error: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._version: str | None = None
        self._version_error: BaseException | None = None
        self._asked = threading.Event()
        self._thread = threading.Thread(target=self._connect, name="columnhub-connect", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        try:
            client = connect(self._scheduler)
        except BaseException as err:  # noqa: BLE001 - raised by client(), in the caller's thread
            self._error = err
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self._client = client
        if closed:  # the request failed (or ended) before the connection was made
            self._asked.set()
            client.close()
            return
        # the scheduler's imports (and whether it can load columnhub at all) while planning
        threading.Thread(
            target=self._ask, args=(client,), name="columnhub-ask-scheduler", daemon=True
        ).start()
        with contextlib.suppress(Exception):  # a warm-up is only a hint
            run = secrets.token_hex(4)
            distributed = _distributed()
            # asked out of band first: a worker that cannot unpickle a task (no columnhub
            # there) closes itself when given one; it gets none, and the request's check
            # of the workers (Executor.check_shared) names it
            answers = client.run(_version, on_error="return")
            ready = sorted(w for w, v in answers.items() if v == __version__)
            for n, worker in enumerate(ready):
                # fire and forget: nothing waits for it, and it runs even so
                distributed.fire_and_forget(
                    client.submit(
                        warm, self._joins, key=f"{self._key}-warm-{n:05d}-{run}", pure=False,
                        workers=[worker], allow_other_workers=False,
                    )
                )

    def _ask(self, client: Any) -> None:
        try:
            self._version = _ask_scheduler(client)
        except BaseException as err:  # noqa: BLE001 - raised by scheduler_version()
            self._version_error = err
        finally:
            self._asked.set()

    def scheduler_version(self) -> str:
        """columnhub's version on the scheduler (asked once connected; waits for the answer)."""
        client = self.client()
        if not self._asked.wait(timeout=_ask_timeout()):
            return _ask_scheduler(client)  # raises what the scheduler says, or times out itself
        if self._version_error is not None:
            raise self._version_error
        assert self._version is not None
        return self._version

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the connection (made, or failed)."""
        self._thread.join(timeout)

    def client(self) -> Any:
        """The ``distributed.Client`` (waits for the connection; its error is raised here)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._client

    def close(self) -> None:
        """Close the connection; one still being made is closed once made, without waiting.

        A request that fails before it needs the cluster (a mistake in it, a
        missing file) is reported at once, even while the scheduler is still
        being waited for.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            client.close()


def early(scheduler: Any, *, key: str, joins: bool = False) -> Early | None:
    """Start connecting to ``scheduler`` now when it names a running cluster (:class:`Early`).

    ``None`` for the thread pool, ``"local"`` and a ``distributed.Client``
    (nothing to connect to, or already connected). ``key`` starts the
    warm-up tasks' keys (``columnhub-<request hash>``); ``joins``: the
    warm-up also runs the key index code once (a request with a keyed join).
    """
    if scheduler is None:
        scheduler = os.environ.get(SCHEDULER_ENV) or None
    if not isinstance(scheduler, str) or not scheduler or scheduler == "local":
        return None
    return Early(scheduler, key=key, joins=joins)


def warm(joins: bool = False) -> None:
    """Task: import what a request's tasks need on this worker (``joins``: and build an index).

    numba is not loaded here: a worker takes the compiled kernels only once
    something else has loaded it (see :func:`columnhub._kernels.numba_loaded`).
    """
    import awkward  # noqa: F401
    import uproot  # noqa: F401

    import columnhub.execute.part
    import columnhub.join.exchange
    import columnhub.join.match
    import columnhub.join.provider  # noqa: F401

    if joins:
        _warm_joins()


def _warm_joins() -> None:
    """Build and match a tiny key index with NanoAOD's key types (the code paths' first run)."""
    import numpy as np

    from columnhub.join.index import KeyIndex
    from columnhub.join.match import match

    n = 64
    keys = {
        "run": np.ones(n, dtype=np.uint32),
        "luminosityBlock": np.arange(n, dtype=np.uint32) // 8,
        "event": np.arange(n, dtype=np.uint64)[::-1].copy(),
    }
    other = {**keys, "event": keys["event"] + np.uint64(n)}
    index = KeyIndex.from_files([keys, other], file_names=["a", "b"])
    match({k: v[::2].copy() for k, v in other.items()}, index)


def local_cluster(workers: int, *, tune_allocator: bool = True) -> Any:
    """A ``LocalCluster`` of ``workers`` single-threaded worker processes.

    Its dashboard takes a free port: never a clash over 8787 (a warning, an
    error under ``-W error``) with another cluster on the machine.

    Its workers start with glibc's ``mmap`` threshold fixed at 32 MiB
    (``MALLOC_MMAP_THRESHOLD_``, through distributed's
    ``nanny.pre-spawn-environ``), unless the environment or the Dask
    configuration sets one, or ``tune_allocator`` is false (distributed's
    defaults alone, as a benchmark compares). distributed starts every worker with
    ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed memory goes back to the
    system; setting it also freezes glibc's ``mmap`` threshold at 128 KiB, so
    each buffer a part task allocates (a basket, a column, a mask) is a fresh
    ``mmap`` whose pages fault in again chunk after chunk. With the threshold
    at 32 MiB those come from the heap; the small trim threshold still hands
    freed memory back. Measured: a 4M-event delivery with a join on 2 workers,
    4.97 s -> 3.91 s, half the system time (``docs/scaleout.md``).
    """
    import dask

    from columnhub._malloc import MMAP_ENV, MMAP_THRESHOLD

    key = "distributed.nanny.pre-spawn-environ"
    given = MMAP_ENV in os.environ or MMAP_ENV in (dask.config.get(key, default=None) or {})
    given = given or not tune_allocator
    setting = {f"{key}.{MMAP_ENV}": str(MMAP_THRESHOLD)}
    # a nanny reads the variables when it is made, inside the constructor
    with contextlib.nullcontext() if given else dask.config.set(setting):
        return _distributed().LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        )


def _stop_heartbeat(dask_worker: Any) -> None:
    """On a worker (``Client.run``): stop its periodic heartbeat to the scheduler."""
    callback = getattr(dask_worker, "periodic_callbacks", {}).get("heartbeat")
    if callback is not None:
        callback.stop()


def close_cluster(cluster: Any, client: Any = None) -> None:
    """Close ``client`` (if given) and ``cluster`` (a ``LocalCluster``) quietly.

    ``LocalCluster.close`` retires the workers and then stops the scheduler; a
    worker's heartbeat still in flight then fails on the closed connection and
    the worker logs a ``CommClosedError`` traceback into the service's log,
    which reads like a crash though nothing was lost. The workers' heartbeats
    are stopped first (through ``client``, or a short-lived one), so nothing
    talks to the scheduler while it goes; the closing goes ahead whatever that
    step did.
    """
    try:
        if client is None:
            client = _distributed().Client(cluster, timeout=10)
        client.run(_stop_heartbeat)
    except Exception as err:  # noqa: BLE001 - best effort: the close below is what counts
        _log.debug("workers' heartbeats not stopped before closing: %s", err)
    finally:
        try:
            if client is not None:
                client.close()
        finally:
            cluster.close()


def _report_versions_without_importing(distributed: Any) -> None:
    """Make a client report the versions of numpy, pandas and lz4 without importing them.

    On connecting, a ``distributed.Client`` sends the scheduler the versions of
    its packages, and finds those of the optional ones (numpy, pandas, lz4) by
    importing them: pandas alone is 0.17 s of a columnhub client's start,
    which never uses it. A package not imported yet has its version read from
    its installed metadata instead: the same text, and ``None`` when it is not
    installed, as before. Installed once per process; anything unexpected in
    ``distributed.versions`` leaves it as it is.
    """
    versions = distributed.versions
    if getattr(versions.get_versions, "_columnhub", False):
        return
    try:
        required = versions.required_packages
        optional = versions.optional_packages
        system, package_info = versions.get_system_info, versions.get_package_info
    except AttributeError:  # another distributed: its own report
        return

    def get_versions(packages: Any = None) -> dict[str, Any]:
        import importlib.metadata
        import itertools
        import sys

        loaded = [p for p in optional if p[0] in sys.modules]
        info = package_info(itertools.chain(required, loaded, packages or []))
        for name, _ in optional:
            if name not in sys.modules:
                try:
                    info[name] = importlib.metadata.version(name)
                except importlib.metadata.PackageNotFoundError:
                    info[name] = None
        return {"host": system(), "packages": info}

    get_versions._columnhub = True  # type: ignore[attr-defined]
    versions.get_versions = get_versions


def connect(scheduler: str) -> Any:
    """A ``distributed.Client`` of the scheduler at address ``scheduler``.

    A host name that does not resolve fails at once; a scheduler that
    refuses or does not answer is waited for (it may be starting, as under
    dask-jobqueue) up to ``$COLUMNHUB_SCHEDULER_TIMEOUT``.

    Raises:
        SpecError: the address's host does not resolve, or no scheduler
            answers there within ``$COLUMNHUB_SCHEDULER_TIMEOUT`` (default
            30s; the message names the address and the fixes).
    """
    from dask.utils import parse_timedelta

    distributed = _distributed()
    _report_versions_without_importing(distributed)
    _check_host(scheduler)
    timeout = _connect_timeout()
    made: dict[str, Any] = {}
    lock = threading.Lock()

    def make() -> None:
        try:
            client = distributed.Client(scheduler, timeout=timeout)
        except BaseException as err:  # noqa: BLE001 - raised below, in the caller's thread
            with lock:
                made.setdefault("error", err)
            return
        with lock:
            if "error" not in made:
                made["client"] = client
                return
        client.close()  # too late: the caller has given up on it

    # Dask's timeout covers the TCP connection, not the handshake after it: a
    # server that accepts and never answers (a dashboard's port given for the
    # scheduler's) would keep Client() waiting for ever
    thread = threading.Thread(target=make, name="columnhub-dask-client", daemon=True)
    thread.start()
    thread.join(parse_timedelta(timeout) + _HANDSHAKE_GRACE_S)
    with lock:
        if "client" in made:
            return made["client"]
        err: BaseException = made.setdefault(
            "error", TimeoutError(f"no Dask handshake within {timeout}")
        )
    if not isinstance(err, OSError | TimeoutError | ValueError):
        raise err
    msg = (
        f"cannot connect to the Dask scheduler at {scheduler!r} ({err}){_diagnosis(scheduler)}"
        f"; check the address (--scheduler, or ${SCHEDULER_ENV}) and that the scheduler is "
        "running, or use --scheduler local"
    )
    raise SpecError(msg) from err


#: seconds past ``$COLUMNHUB_SCHEDULER_TIMEOUT`` that connecting may take (the handshake)
_HANDSHAKE_GRACE_S = 5.0


def _check_host(scheduler: str) -> None:
    """Raise :class:`SpecError` at once if a TCP/TLS ``scheduler``'s host does not resolve.

    Dask would retry it until its connect timeout (30 s by default), and a
    typo in a host name is not fixed by waiting. Other schemes, and an
    address Dask cannot parse, are left to Dask (which names the problem).
    """
    import socket

    address = _host_port(scheduler)
    if address is None:
        return
    host, port = address
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        msg = (
            f"cannot connect to the Dask scheduler at {scheduler!r}: its host {host!r} does not "
            f"resolve ({err}); check the address (--scheduler, or ${SCHEDULER_ENV}), or use "
            "--scheduler local"
        )
        raise SpecError(msg) from err


def _host_port(scheduler: str) -> tuple[str, int] | None:
    """The host and port of a ``tcp://`` or ``tls://`` address; ``None`` for others (Dask's to judge)."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(scheduler)
        if scheme not in ("tcp", "tls"):
            return None
        host, port = parse_host_port(location)
        return str(host), int(port)
    except (ValueError, TypeError):
        return None


def _diagnosis(scheduler: str) -> str:
    """What one plain TCP connection to a TCP/TLS ``scheduler`` finds, for the error message.

    Dask's own message after its retries only says it timed out: whether
    nothing listens there, nothing answers, or something that is not a
    scheduler does (a dashboard's port, 8787, for the scheduler's, 8786)
    tells the user what to fix.
    """
    import socket

    address = _host_port(scheduler)
    if address is None:
        return ""
    host, port = address
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
    except ConnectionRefusedError:
        return f": nothing listens at {host}:{port}"
    except TimeoutError:
        return f": nothing answers at {host}:{port} (a firewall, or a host that is down?)"
    except OSError:
        return ""
    hint = " (8787 is a dashboard's port; a scheduler's is 8786 by default)" if port == 8787 else ""
    return f": something listens at {host}:{port} but does not answer as a Dask scheduler{hint}"


def run_parts(
    client: Any,
    plan: Plan,
    parts: Sequence[Part],
    staging: Path,
    cache: ColumnCache | None,
    schema: pa.Schema | None,
    *,
    exchanged: ColumnCache | None = None,
    fresh: Mapping[int, Collection[str]] | None = None,
) -> Iterator[PartMeta]:
    """Submit every part task to ``client``'s cluster; each one's metadata as it finishes.

    A task whose worker dies is run again elsewhere, and a failed one is
    retried ``$COLUMNHUB_TASK_RETRIES`` times (default 3); a retried task
    replaces its own part. A user error in a task reaches the caller as the
    same :class:`~columnhub.errors.ColumnhubError`; the other tasks are then
    cancelled.
    """
    from columnhub.execute.part import run_part

    distributed = _distributed()
    if not parts:
        return
    run = secrets.token_hex(4)  # keys of a new delivery never meet an older one's
    futures = [
        client.submit(
            run_part,
            plan,
            part,
            str(Path(staging).resolve()),
            cache,
            schema=schema,
            exchanged=exchanged,
            fresh=fresh,
            key=f"columnhub-{plan.request.hash[:16]}-part-{part.index:05d}-{run}",
            pure=False,
            retries=_retries(),
        )
        for part in parts
    ]
    try:
        for future in distributed.as_completed(futures):
            yield future.result()
    finally:
        client.cancel([f for f in futures if not f.done()])


def _retries() -> int:
    raw = os.environ.get(RETRIES_ENV)
    if raw is None:
        return _RETRIES_DEFAULT
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        msg = f"${RETRIES_ENV} must be a whole number of retries (0 or more), got {raw!r}"
        raise SpecError(msg)
    return value


def _ask_timeout() -> float:
    """Seconds to wait for the scheduler's answer asked in the background (then ask again)."""
    import dask

    return float(dask.utils.parse_timedelta(_connect_timeout())) + 30.0


def _connect_timeout() -> str:
    return os.environ.get("COLUMNHUB_SCHEDULER_TIMEOUT", "30s")


def _distributed() -> Any:
    from columnhub._extras import require

    return require("distributed", what="the Dask executor (scheduler)")
