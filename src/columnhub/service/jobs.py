"""The runner: claims queued jobs and delivers them with ``columnhub.deliver``.

A :class:`Runner` takes a job from the database (:meth:`Database.claim
<columnhub.service.db.Database.claim>`), runs exactly the delivery a
notebook runs into ``<state_dir>/results/<job id>``, and records the end:
complete (with the bytes stored) or failed (with the error's type and
message). While it runs, the progress callback and a heartbeat thread write
the progress into the database and extend the lease; when the heartbeat says
the job was cancelled or its lease was taken by another runner, the
delivery is stopped at the next part (its staging directory is removed by
``deliver``) and a cancelled job's output directory is removed.

A runner that dies (SIGKILL, a lost machine) leaves its job running with a
lease that expires; any runner then claims it again and delivers into the
same output directory, where ``deliver`` cleans up what the dead one left
(its staging directory goes; nothing published twice). :meth:`Runner.start`
runs ``config.runners`` threads that wake at once when this process queues
work (``Database.wakeup``) and poll the database otherwise (other replicas'
submissions).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from columnhub.errors import ColumnhubError, ServiceError
from columnhub.service.db import Database, JobRow, empty_progress

if TYPE_CHECKING:
    from columnhub.execute.part import PartMeta

__all__ = ["JobStopped", "Runner", "RunnerConfig", "reusable_result", "sweep_results"]

log = logging.getLogger(__name__)

#: how often an idle runner looks at the database for other replicas' work (seconds)
POLL_S: Final = 0.5
#: the longest pause between two heartbeats of a running job (seconds)
MAX_BEAT_S: Final = 2.0
#: the shortest pause between two progress writes from the progress callback
_MIN_WRITE_S: Final = 0.2


class RunnerConfig(Protocol):
    """What a :class:`Runner` reads of the service configuration (``ServiceConfig``)."""

    state_dir: Path
    cache: str | None
    scheduler: str | None
    workers: int | None
    runners: int
    lease_s: float


class JobStopped(BaseException):
    """Raised to stop a delivery: cancelled, lease lost, or shutdown.

    By the progress callback, and by a wait on storage (``abandon_waits``). A
    ``BaseException``, like ``KeyboardInterrupt``: a stop, not an error, so the
    ``except Exception`` that turns a storage failure into a named error (or a
    missing stamp into none) lets it through, and cleanup on ``BaseException``
    runs.
    """

    def __init__(self, job_id: str, reason: str) -> None:
        self.job_id = job_id
        self.reason = reason
        super().__init__(f"job {job_id} stopped: {reason}")


class Runner:
    """Delivers the queued jobs of a :class:`~columnhub.service.db.Database`.

    Args:
        db: the database (shared with the app of this process: its submits wake us).
        config: the service configuration (:class:`RunnerConfig`).
        worker_id: this runner's name in ``jobs.claimed_by`` (default
            ``host:pid:random``); each claim adds ``/<random>`` so two claims
            of one job are never confused.
    """

    def __init__(self, db: Database, config: RunnerConfig, *, worker_id: str | None = None) -> None:
        self.db = db
        self.config = config
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.lease_s = float(config.lease_s)
        if self.lease_s <= 0:
            msg = f"lease_s must be a positive number of seconds, got {config.lease_s!r}"
            raise ServiceError(msg)
        self.results = Path(config.state_dir).expanduser() / "results"
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        # the Dask client (and with ``scheduler: local`` its LocalCluster) of all jobs: made
        # without ``with`` (whose context variable must be reset by the thread that set it),
        # so stop() closes them from whichever thread stops the runner
        self._client: Any = None
        self._cluster: Any = None
        self._client_lock = threading.Lock()

    # -- threads ------------------------------------------------------------------

    def start(self) -> None:
        """Start ``config.runners`` runner threads (each delivers one job at a time)."""
        if self._threads:
            return
        # the delivery's modules imported once here, not by several runner threads at once
        import columnhub.execute.part
        import columnhub.plan  # noqa: F401

        self._stopping.clear()
        for i in range(max(1, int(self.config.runners))):
            thread = threading.Thread(target=self._loop, name=f"columnhub-runner-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the threads; a job still running is stopped and handed back to the queue."""
        self._stopping.set()
        self.db.wakeup.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []
        with self._client_lock:
            client, cluster = self._client, self._cluster
            self._client = self._cluster = None
        if cluster is not None:
            from columnhub.execute.dask import close_cluster

            close_cluster(cluster, client)
        elif client is not None:
            client.close()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            seen = self.db.wakeup.generation  # before looking: a later submit is never missed
            try:
                ran = self.run_once()
            except Exception:  # the database is away: keep the thread, try again
                log.exception("columnhub runner %s: claiming a job failed", self.worker_id)
                ran = False
                self._stopping.wait(POLL_S)
            if not ran and not self._stopping.is_set():
                self.db.wakeup.wait(seen, POLL_S)

    # -- one job --------------------------------------------------------------------

    def run_once(self) -> bool:
        """Claim one job and deliver it; ``False`` when nothing was queued."""
        claim = f"{self.worker_id}/{secrets.token_hex(4)}"
        job = self.db.claim(claim, self.lease_s, results=self.results)
        if job is None:
            return False
        self._run(job, claim)
        return True

    def _run(self, job: JobRow, claim: str) -> None:
        from columnhub.delivery import deliver
        from columnhub.sources._timeout import abandon_waits
        from columnhub.spec import Request

        output = Path(job.output_dir) if job.output_dir else self.results / job.id
        tracker = _Tracker(self.db, job.id, claim, self.lease_s, self._stopping)
        beat = threading.Thread(target=tracker.beat_loop, name=f"columnhub-beat-{job.id[:8]}")
        beat.start()
        log.info("columnhub runner %s: job %s (attempt %d)", claim, job.id, job.attempts)
        try:
            self._check_inputs(job)
            # a wait on storage ends as soon as the job is cancelled or the service stops
            with abandon_waits(tracker.check):
                result = deliver(
                    Request.from_dict(job.spec),
                    output=output,
                    cache=self._cache(),
                    scheduler=self._scheduler(),
                    workers=self.config.workers,
                    progress=tracker,
                )
        except JobStopped as stopped:
            self._stopped(job, claim, output, stopped.reason)
            return
        except ColumnhubError as err:
            self.db.fail(job.id, claim, type(err).__name__, str(err))
            return
        except Exception as err:
            log.exception("columnhub runner %s: job %s failed", claim, job.id)
            message = f"internal error of the service ({type(err).__name__}: {err}); report it"
            self.db.fail(job.id, claim, type(err).__name__, message)
            return
        finally:
            tracker.done.set()
            beat.join()
        stored = sum(int(p["bytes"]) for p in result.manifest.get("parts", []))
        if not self.db.finish(job.id, claim, stored, progress=tracker.final(result.manifest)):
            self._stopped(job, claim, output, tracker.why())

    def _check_inputs(self, job: JobRow) -> None:
        """The data-access check of submission, again now (a link made since then is caught)."""
        roots = getattr(self.config, "data_roots", None)
        if roots is None:  # a bare RunnerConfig (tests of the queue alone)
            return
        from columnhub.service.access import check_inputs
        from columnhub.spec import Request

        check_inputs(
            Request.model_validate(job.spec),
            data_roots=roots,
            url_prefixes=getattr(self.config, "url_prefixes", ()),
            registry=getattr(self.config, "models", None),
        )

    def _stopped(self, job: JobRow, claim: str, output: Path, reason: str) -> None:
        """A delivery stopped: clean up after a cancellation, hand back on shutdown."""
        log.info("columnhub runner %s: job %s stopped (%s)", claim, job.id, reason)
        if reason == "cancelled":
            shutil.rmtree(output, ignore_errors=True)  # nothing left that looks like a result
        elif reason == "shutdown":
            self.db.release(job.id, claim)

    def _cache(self) -> str:
        if self.config.cache is not None:
            return str(self.config.cache)
        return str(Path(self.config.state_dir).expanduser() / "cache")

    def _scheduler(self) -> Any:
        """``None`` (threads here), else one Dask client shared by every job of this runner.

        The same client ``deliver`` makes for one request (a ``LocalCluster`` of
        ``workers`` processes, or a connection with its timeout), kept open for
        all jobs. It is a plain ``distributed.Client``, never entered with
        ``with``: its context manager sets a context variable that only the
        thread which set it may reset, and :meth:`stop` runs in another thread.
        """
        scheduler = self.config.scheduler
        if scheduler is None:
            return None
        with self._client_lock:
            if self._client is None:
                self._client, self._cluster = _open_client(scheduler, self.config.workers)
            return self._client


def _open_client(scheduler: str, workers: int | None) -> tuple[Any, Any]:
    """``(client, cluster or None)`` for ``scheduler`` (``"local"`` or an address).

    A plain client, never entered with ``with``: :meth:`Runner.stop` closes it
    from whichever thread stops the runner.
    """
    from columnhub.execute.dask import _distributed, connect, local_cluster

    if scheduler != "local":
        return connect(scheduler), None
    if workers is None:
        from columnhub._concurrency import threads

        workers = threads()
    cluster = local_cluster(workers)
    try:
        return _distributed().Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise


def sweep_results(db: Database, results: Path, ttl_s: float) -> list[str]:
    """Remove the results no live request references that finished over ``ttl_s`` ago.

    The jobs are taken out of service in the database first
    (:meth:`Database.expire <columnhub.service.db.Database.expire>`: a
    complete one is then failed as ``ResultExpiredError``, so nothing lists
    a removed file as complete), then their folders are removed. Only
    folders directly inside ``results`` are removed (a job's default
    ``results/<job id>``).

    Returns:
        The ids of the jobs taken out.
    """
    before = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(seconds=float(ttl_s))
    gone = db.expire(before)
    root = Path(results).resolve()
    for job in gone:
        if not job.output_dir:
            continue
        folder = Path(job.output_dir).resolve()
        if folder.parent != root:  # never anything outside the service's results
            log.warning("columnhub: not removing %s (job %s): not in %s", folder, job.id, root)
            continue
        shutil.rmtree(folder, ignore_errors=True)
    if gone:
        log.info("columnhub: %d expired results removed", len(gone))
    return [job.id for job in gone]


def reusable_result(job: JobRow, *, cache: str | None) -> bool:
    """Whether the complete ``job``'s result answers its work again now, as it is.

    The check of ``deliver``'s whole-result fast path (:mod:`columnhub._fastpath`),
    with plain file-system calls only (no uproot): what the delivery of the
    job's spec recorded in the cache under its source key must name the
    result the job's folder holds (the same result key), every input must
    still resolve to the same files with the same quick identity (device,
    inode, size, modification time, ROOT UUID or Parquet footer), and every
    part the folder's complete manifest lists must be there with its size and
    modification time. Anything uncertain (no record, a remote file, a model,
    another replica's working directory) is ``False``: the work runs again.

    Args:
        job: a complete job.
        cache: the service's column cache (``ServiceConfig.cache``).
    """
    if job.state != "complete" or not job.output_dir or cache is None:
        return False
    from columnhub import _fastpath
    from columnhub.cache import ColumnCache
    from columnhub.delivery import _intact
    from columnhub.errors import ColumnhubError
    from columnhub.output.manifest import read_manifest
    from columnhub.spec import Request

    try:
        # the source key the runner's deliver(Request.from_dict(job.spec)) recorded under
        key = _fastpath.source_key(Request.from_dict(job.spec), chunk_size=None)
        known = _fastpath.lookup(ColumnCache(cache, read_only=True), key)
        if known is None:
            return False
        directory = Path(job.output_dir)
        manifest = read_manifest(directory)
    except (ColumnhubError, OSError, ValueError):
        return False
    return (
        manifest is not None
        and manifest.get("result_key") == known.result_key
        and _intact(directory, manifest)
        and _fastpath.unchanged(known)
    )


class _Tracker:
    """The progress callback of one delivery, and its heartbeat.

    ``deliver`` calls it with ``(events done, events total)`` after each part,
    and ``on_part(meta, parts)`` just before; each call writes the progress
    (at most every 0.2 s) and raises :class:`JobStopped` once a heartbeat
    found the job cancelled or no longer ours. ``beat_loop`` (a thread)
    heartbeats between parts, so a long part never loses the lease.
    """

    def __init__(
        self, db: Database, job_id: str, claim: str, lease_s: float, stopping: threading.Event
    ) -> None:
        self.db = db
        self.job_id = job_id
        self.claim = claim
        self.lease_s = lease_s
        self.stopping = stopping
        self.values: dict[str, Any] = empty_progress()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.done = threading.Event()
        self.reason: str | None = None
        self.t0 = time.monotonic()
        self.written = 0.0
        self.parts_seen = False

    def on_part(self, meta: PartMeta, parts: int) -> None:
        with self.lock:
            self.parts_seen = True
            self.values["parts_done"] += 1
            self.values["parts_total"] = parts
            self.values["bytes"] += meta.bytes
            self.values["cache_hits"] += meta.hits
            self.values["cache_misses"] += meta.misses

    def __call__(self, done: int, total: int) -> None:
        with self.lock:
            self.values["events"] = done
            self.values["events_total"] = total
            elapsed = time.monotonic() - self.t0
            self.values["rate_events_per_s"] = round(done / elapsed, 1) if elapsed > 0 else 0.0
        if time.monotonic() - self.written >= _MIN_WRITE_S or done >= total:
            self.beat()
        self.check()

    def check(self) -> None:
        """Raise :class:`JobStopped` once the job is cancelled, lost, or the runner stops."""
        if self.stopping.is_set() and self.reason is None:
            self.reason = "shutdown"
            self.stop.set()
        if self.stop.is_set():
            raise JobStopped(self.job_id, self.why())

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.values)

    def beat(self) -> None:
        """Write the progress and extend the lease; on ``False`` mark the delivery to stop."""
        self.written = time.monotonic()
        if not self.db.heartbeat(self.job_id, self.claim, self.snapshot(), self.lease_s):
            if self.reason is None:
                self.reason = (
                    "cancelled" if self.db.job(self.job_id).state == "cancelled" else "lost"
                )
            self.stop.set()

    def beat_loop(self) -> None:
        interval = max(0.05, min(self.lease_s / 3, MAX_BEAT_S))
        while not self.done.wait(interval):
            try:
                self.beat()
            except Exception:  # the database is away for a moment: the lease has slack
                log.exception("columnhub: heartbeat of job %s failed", self.job_id)

    def why(self) -> str:
        """Why the delivery stops: ``cancelled``, ``lost`` (lease taken) or ``shutdown``."""
        if self.reason is None:
            with contextlib.suppress(Exception):
                state = self.db.job(self.job_id).state
                self.reason = "cancelled" if state == "cancelled" else "lost"
        return self.reason or "lost"

    def final(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """The progress of a finished delivery (a reused result reported no parts: its manifest)."""
        values = self.snapshot()
        parts = manifest.get("parts", [])
        if not self.parts_seen:
            cache = manifest.get("cache", {})
            values.update(
                parts_total=len(parts),
                bytes=sum(int(p["bytes"]) for p in parts),
                events=int(manifest.get("events", 0)),
                events_total=int(manifest.get("events", 0)),
                cache_hits=int(cache.get("hits", 0)),
                cache_misses=int(cache.get("misses", 0)),
            )
        values["parts_done"] = values["parts_total"] = max(values["parts_total"], len(parts))
        return values
