"""Persistence and the queue: the service's requests and jobs in a SQL database.

Three tables (SQLAlchemy 2 ORM; the schema is made by the Alembic migrations
shipped in ``service/migrations/``, run by :meth:`Database.upgrade`):

- ``jobs``: the work, one per request hash while queued or running (single
  flight: a partial unique index enforces it, so two replicas can never
  queue the same work twice), with its lease, attempts, progress and error;
- ``requests``: a user's submission (owner, title, the spec as submitted);
- ``request_jobs``: which job delivers each sample of a request.

SQLite is the default (WAL, a busy timeout, ``BEGIN IMMEDIATE`` for every
write so two writers never deadlock on a lock upgrade); PostgreSQL (driver
psycopg 3, ``postgresql+psycopg://``) for several replicas, where a runner
claims a job with ``SELECT ... FOR UPDATE SKIP LOCKED``. A request's state is
derived from its jobs (:func:`request_state`).

Times are stored as naive UTC and compared with this process's clock: the
replicas of one database should run NTP, and leases should be much longer
than their clock skew.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from columnhub.errors import RequestNotFoundError, ServiceError

__all__ = [
    "JOB_STATES",
    "LIVE_STATES",
    "MAX_ATTEMPTS",
    "REQUEST_STATES",
    "Database",
    "Job",
    "JobRow",
    "RequestJob",
    "RequestRecord",
    "RequestView",
    "Wakeup",
    "empty_progress",
    "request_state",
]

#: the states of a job (and of a request, derived from its jobs)
JOB_STATES: Final = ("queued", "running", "complete", "failed", "cancelled")
REQUEST_STATES: Final = JOB_STATES
#: states in which a job is still to deliver: one job per request hash among them
LIVE_STATES: Final = ("queued", "running")
#: claims of one job (a runner that died holding it counts) before it is failed
MAX_ATTEMPTS: Final = 5
#: the progress keys, each a number summed over a request's jobs
PROGRESS_KEYS: Final = (
    "parts_done",
    "parts_total",
    "events",
    "events_total",
    "bytes",
    "rate_events_per_s",
    "cache_hits",
    "cache_misses",
)
_SQLITE_BUSY_MS: Final = 30_000
_SUBMIT_RETRIES: Final = 5


def empty_progress() -> dict[str, float | int]:
    """The progress of a job nothing has been done for: every key 0."""
    return dict.fromkeys(PROGRESS_KEYS, 0)


def _now() -> dt.datetime:
    """Now, in UTC, naive (what every column stores)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.replace(tzinfo=dt.UTC).isoformat()


# ---------------------------------------------------------------------------
# the tables


class Base(DeclarativeBase):
    """The declarative base of the service's tables."""


class Job(Base):
    """The work: one single-sample request to deliver (table ``jobs``)."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    request_hash: Mapped[str] = mapped_column(sa.String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    state: Mapped[str] = mapped_column(sa.String(16))
    output_dir: Mapped[str | None] = mapped_column(sa.Text)
    claimed_by: Mapped[str | None] = mapped_column(sa.String(255))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    progress: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    error_type: Mapped[str | None] = mapped_column(sa.String(255))
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    stored_bytes: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime)

    __table_args__ = (
        sa.Index(
            "uq_jobs_live_request_hash",
            "request_hash",
            unique=True,
            sqlite_where=sa.text("state IN ('queued', 'running')"),
            postgresql_where=sa.text("state IN ('queued', 'running')"),
        ),
        sa.Index("ix_jobs_state_created_at", "state", "created_at"),
        sa.Index("ix_jobs_request_hash", "request_hash"),
    )


class RequestRecord(Base):
    """A user's submission (table ``requests``)."""

    __tablename__ = "requests"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(sa.String(255))
    title: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime)
    cancelled: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime)
    spec: Mapped[dict[str, Any]] = mapped_column(sa.JSON)

    __table_args__ = (sa.Index("ix_requests_owner_created_at", "owner", "created_at"),)


class RequestJob(Base):
    """Which job delivers each sample of a request (table ``request_jobs``)."""

    __tablename__ = "request_jobs"

    request_id: Mapped[str] = mapped_column(
        sa.String(32), sa.ForeignKey("requests.id", ondelete="CASCADE"), primary_key=True
    )
    sample: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.String(32), sa.ForeignKey("jobs.id"))

    __table_args__ = (sa.Index("ix_request_jobs_job_id", "job_id"),)


# ---------------------------------------------------------------------------
# plain views of rows (no session attached)


@dataclasses.dataclass(frozen=True)
class JobRow:
    """A job as read from the database (a plain value: no session attached).

    Attributes are the ``jobs`` columns; ``progress`` holds every key of
    :data:`PROGRESS_KEYS`.
    """

    id: str
    request_hash: str
    spec: dict[str, Any]
    state: str
    output_dir: str | None
    claimed_by: str | None
    lease_expires_at: dt.datetime | None
    attempts: int
    progress: dict[str, Any]
    error_type: str | None
    error_message: str | None
    stored_bytes: int
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @classmethod
    def of(cls, job: Job) -> JobRow:
        """The view of an ORM row."""
        return cls(
            **{
                f.name: getattr(job, f.name)
                for f in dataclasses.fields(cls)
                if f.name != "progress"
            },
            progress={**empty_progress(), **(job.progress or {})},
        )

    @property
    def error(self) -> dict[str, str] | None:
        """``{"type", "message"}`` of a failed job, else ``None``."""
        if self.error_type is None:
            return None
        return {"type": self.error_type, "message": self.error_message or ""}


def request_state(cancelled: bool, job_states: Iterable[str]) -> str:
    """A request's state from its jobs' states.

    Cancelled if the user cancelled it (or a job of it was cancelled); else
    failed if any job failed; else complete when every job is; queued when
    every job is; otherwise running (one runs, or some are done and some wait).
    """
    states = list(job_states)
    if cancelled or "cancelled" in states:
        return "cancelled"
    if "failed" in states:
        return "failed"
    if states and all(s == "complete" for s in states):
        return "complete"
    if all(s == "queued" for s in states):
        return "queued"
    return "running"


@dataclasses.dataclass(frozen=True)
class RequestView:
    """A request with its jobs, as the status API shows it.

    Attributes:
        id: the request id.
        owner: who submitted it.
        title: the title given at submission, or ``None``.
        created_at: when it was submitted (naive UTC).
        cancelled: whether its owner cancelled it.
        cancelled_at: when (naive UTC), or ``None``.
        spec: the spec as submitted.
        samples: sample name (``""`` for a single-sample request) -> its job.
    """

    id: str
    owner: str
    title: str | None
    created_at: dt.datetime
    cancelled: bool
    cancelled_at: dt.datetime | None
    spec: dict[str, Any]
    samples: dict[str, JobRow]

    @property
    def status(self) -> str:
        """The derived state (:func:`request_state`)."""
        return request_state(self.cancelled, (j.state for j in self.samples.values()))

    @property
    def finished_at(self) -> dt.datetime | None:
        """When it reached a final state (naive UTC), else ``None``."""
        status = self.status
        if status == "cancelled" and self.cancelled_at is not None:
            return self.cancelled_at
        if status in ("complete", "failed", "cancelled"):
            ends = [j.finished_at for j in self.samples.values() if j.finished_at is not None]
            return max(ends) if ends else None
        return None

    @property
    def progress(self) -> dict[str, Any]:
        """Every progress number summed over the jobs."""
        total = empty_progress()
        for job in self.samples.values():
            for key in PROGRESS_KEYS:
                total[key] += job.progress.get(key, 0) or 0
        total["rate_events_per_s"] = round(float(total["rate_events_per_s"]), 1)
        return total

    @property
    def error(self) -> dict[str, str] | None:
        """The first failed sample's ``{"type", "message"}`` (the sample named), else ``None``."""
        for name, job in self.samples.items():
            if job.state == "failed" and job.error is not None:
                error = dict(job.error)
                if name:
                    error["message"] = f"sample {name!r}: {error['message']}"
                return error
        return None

    def to_json(self) -> dict[str, Any]:
        """The status JSON of ``GET /api/v1/requests/{id}`` (docs/service-contract.md)."""
        return {
            "id": self.id,
            "status": self.status,
            "owner": self.owner,
            "title": self.title,
            "created_at": _iso(self.created_at),
            "finished_at": _iso(self.finished_at),
            "progress": self.progress,
            "samples": {
                name: {
                    "job": job.id,
                    "status": "cancelled" if self.cancelled else job.state,
                    "progress": job.progress,
                    "error": job.error,
                }
                for name, job in self.samples.items()
            },
            "error": self.error,
        }


# ---------------------------------------------------------------------------
# the database


class Wakeup:
    """Work was queued in this process: a counter that runners wait to see change.

    Unlike an ``Event`` that each waiter clears, no wake-up is ever lost: a
    runner reads :attr:`generation` *before* it looks for work, and
    :meth:`wait` returns at once if anything was queued since.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._generation = 0

    @property
    def generation(self) -> int:
        """How many times work was queued."""
        with self._changed:
            return self._generation

    def set(self) -> None:
        """Work was queued: wake every waiting runner."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def wait(self, seen: int, timeout: float) -> bool:
        """Wait until work is queued after generation ``seen``; ``False`` on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._generation != seen, timeout)


class Database:
    """The service's database: requests, jobs and the queue.

    Args:
        url: a SQLAlchemy URL: ``sqlite:///path/columnhub.db`` (the default of
            the service), ``sqlite://`` (in memory, one process), or
            ``postgresql+psycopg://user@host:port/db`` (``postgresql://`` is
            read as psycopg 3 too).
        upgrade: run the migrations to the newest schema now (default).

    Attributes:
        engine: the SQLAlchemy engine.
        url: the URL, as SQLAlchemy reads it.
        wakeup: a :class:`Wakeup` set by :meth:`submit`; the runners of this
            process wait on it.
    """

    def __init__(self, url: str, *, upgrade: bool = True) -> None:
        self.url = _parse_url(url)
        self.engine = _engine(self.url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(
            self.engine.execution_options(columnhub_begin="IMMEDIATE"), expire_on_commit=False
        )
        self.wakeup = Wakeup()
        if upgrade:
            try:
                self.upgrade()
            except (OperationalError, OSError) as err:
                where = self.url.render_as_string(hide_password=True)
                reason = getattr(err, "orig", None) or err
                msg = (
                    f"cannot open the service database {where} ({reason}); check the URL "
                    "(--database or `database:` in the config file), that the server is "
                    "running and reachable, and that the directory is writable"
                )
                raise ServiceError(msg) from err

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    # -- schema ---------------------------------------------------------------

    def upgrade(self) -> None:
        """Run the Alembic migrations to ``head`` (nothing to do when already there).

        Several replicas starting at once on PostgreSQL take turns (an
        advisory lock); on SQLite the write lock does the same.
        """
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
        writing = self.engine.execution_options(columnhub_begin="IMMEDIATE")
        with writing.connect() as conn, conn.begin():
            if self.url.get_backend_name() == "postgresql":
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7411902233)")
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def revision(self) -> str | None:
        """The schema revision the database is at (``None``: no schema yet)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    # -- sessions ---------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        """A write transaction (SQLite: ``BEGIN IMMEDIATE``), committed on success."""
        with self._write() as session, session.begin():
            yield session

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    # -- requests ---------------------------------------------------------------

    def submit(
        self,
        owner: str,
        spec: Mapping[str, Any],
        title: str | None,
        samples: Mapping[str, tuple[str, Mapping[str, Any]]],
    ) -> RequestView:
        """Record a request and queue its work, attaching to identical work already queued.

        Args:
            owner: the submitting user.
            spec: the spec as submitted (kept for the user to see).
            title: a title, or ``None``.
            samples: sample name (``""`` for a single-sample request) ->
                ``(request hash, job spec)``: the hash of the single-sample
                request (``Request.hash``) and its ``model_dump(mode="json")``.

        Returns:
            The new request. A sample whose hash has a queued or running job
            shares that job (single flight); any other gets a new queued job.
        """
        if not samples:
            msg = "a request needs at least one sample; the spec named no dataset"
            raise ServiceError(msg)
        for attempt in range(_SUBMIT_RETRIES):
            try:
                request_id = self._submit(owner, dict(spec), title, samples)
            except IntegrityError:  # another replica queued the same work at this instant
                if attempt == _SUBMIT_RETRIES - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
                continue
            break
        self.wakeup.set()
        return self.get(request_id)

    def _submit(
        self,
        owner: str,
        spec: dict[str, Any],
        title: str | None,
        samples: Mapping[str, tuple[str, Mapping[str, Any]]],
    ) -> str:
        now = _now()
        request_id = uuid.uuid4().hex
        with self._writing() as session:
            session.add(
                RequestRecord(
                    id=request_id,
                    owner=owner,
                    title=title,
                    created_at=now,
                    cancelled=False,
                    spec=spec,
                )
            )
            for sample, (request_hash, job_spec) in samples.items():
                job = session.scalars(
                    sa.select(Job)
                    .where(Job.request_hash == request_hash, Job.state.in_(LIVE_STATES))
                    .with_for_update()
                ).first()
                if job is None:
                    job = Job(
                        id=uuid.uuid4().hex,
                        request_hash=request_hash,
                        spec=dict(job_spec),
                        state="queued",
                        attempts=0,
                        progress=empty_progress(),
                        stored_bytes=0,
                        created_at=now,
                    )
                    session.add(job)
                    session.flush()  # the unique index speaks now, inside the retry loop
                session.add(RequestJob(request_id=request_id, sample=sample, job_id=job.id))
        return request_id

    def get(self, request_id: str, owner: str | None = None) -> RequestView:
        """The request ``request_id``; ``owner=None`` sees every user's (admin).

        Raises:
            RequestNotFoundError: no such request, or it is another user's.
        """
        with self._reading() as session:
            record = session.get(RequestRecord, request_id)
            if record is None or (owner is not None and record.owner != owner):
                msg = (
                    f"no request {request_id!r}"
                    + (f" of user {owner!r}" if owner is not None else "")
                    + "; check the id (`columnhub status` lists your requests)"
                )
                raise RequestNotFoundError(msg)
            return self._views(session, [record])[0]

    def list(
        self,
        owner: str | None,
        *,
        page: int = 1,
        per_page: int = 50,
        state: str | None = None,
    ) -> tuple[builtins.list[RequestView], int]:
        """A page of ``owner``'s requests (``None``: everyone's), newest first, and the total.

        Args:
            owner: whose requests; ``None`` for all (admin).
            page: the page, from 1.
            per_page: requests per page (1 to 1000).
            state: only requests in this derived state.

        Returns:
            ``(requests of the page, number of requests matching)``.
        """
        if page < 1:
            msg = f"page must be 1 or more, got {page}"
            raise ServiceError(msg)
        if not 1 <= per_page <= 1000:
            msg = f"per_page must be between 1 and 1000, got {per_page}"
            raise ServiceError(msg)
        if state is not None and state not in REQUEST_STATES:
            msg = f"state {state!r} is not a request state; use one of {', '.join(REQUEST_STATES)}"
            raise ServiceError(msg)
        with self._reading() as session:
            states = self._states(owner).subquery()
            wanted = sa.true() if state is None else states.c.state == state
            total = session.scalar(sa.select(sa.func.count()).select_from(states).where(wanted))
            chosen = session.scalars(
                sa.select(states.c.id)
                .where(wanted)
                .order_by(states.c.created_at.desc(), states.c.id.desc())
                .limit(per_page)
                .offset((page - 1) * per_page)
            ).all()
            records = session.scalars(
                sa.select(RequestRecord).where(RequestRecord.id.in_(chosen))
            ).all()
            by_id = {r.id: r for r in records}
            views = self._views(session, [by_id[i] for i in chosen if i in by_id])
        return views, int(total or 0)

    @staticmethod
    def _states(owner: str | None) -> sa.Select[tuple[str, dt.datetime, str]]:
        """``(id, created_at, state)`` of ``owner``'s requests (``None``: all), state derived in SQL.

        The same rules as :func:`request_state`, aggregated by the database
        (one row per request, whatever the number of jobs).
        """

        def any_(state: str) -> sa.ColumnElement[bool]:
            return sa.func.max(sa.case((Job.state == state, 1), else_=0)) == 1

        def all_(state: str) -> sa.ColumnElement[bool]:
            return sa.func.min(sa.case((Job.state == state, 1), else_=0)) == 1

        derived = sa.case(
            (sa.or_(RequestRecord.cancelled == sa.true(), any_("cancelled")), "cancelled"),
            (any_("failed"), "failed"),
            (all_("complete"), "complete"),
            (all_("queued"), "queued"),
            else_="running",
        )
        query = (
            sa.select(
                RequestRecord.id.label("id"),
                RequestRecord.created_at.label("created_at"),
                derived.label("state"),
            )
            .join(RequestJob, RequestJob.request_id == RequestRecord.id)
            .join(Job, Job.id == RequestJob.job_id)
            .group_by(RequestRecord.id, RequestRecord.created_at, RequestRecord.cancelled)
        )
        if owner is not None:
            query = query.where(RequestRecord.owner == owner)
        return query

    def _views(
        self, session: Session, records: builtins.list[RequestRecord]
    ) -> builtins.list[RequestView]:
        if not records:
            return []
        rows = session.execute(
            sa.select(RequestJob.request_id, RequestJob.sample, Job)
            .join(Job, Job.id == RequestJob.job_id)
            .where(RequestJob.request_id.in_([r.id for r in records]))
            .order_by(RequestJob.request_id, RequestJob.sample)
        ).all()
        samples: dict[str, dict[str, JobRow]] = {}
        for rid, sample, job in rows:
            samples.setdefault(rid, {})[sample] = JobRow.of(job)
        return [
            RequestView(
                id=r.id,
                owner=r.owner,
                title=r.title,
                created_at=r.created_at,
                cancelled=bool(r.cancelled),
                cancelled_at=r.cancelled_at,
                spec=r.spec,
                samples=_in_spec_order(r.spec, samples.get(r.id, {})),
            )
            for r in records
        ]

    def cancel(self, request_id: str, owner: str | None) -> RequestView:
        """Cancel a request; each of its jobs no other live request uses is cancelled too.

        A running job's runner sees the cancellation at its next heartbeat,
        stops the delivery and removes what it wrote. A job shared with
        another user's request keeps running for them. Cancelling twice is
        allowed (nothing changes).

        Raises:
            RequestNotFoundError: no such request, or it is another user's.
        """
        now = _now()
        with self._writing() as session:
            record = session.get(RequestRecord, request_id, with_for_update=True)
            if record is None or (owner is not None and record.owner != owner):
                msg = (
                    f"no request {request_id!r}"
                    + (f" of user {owner!r}" if owner is not None else "")
                    + " to cancel; check the id (`columnhub status` lists your requests)"
                )
                raise RequestNotFoundError(msg)
            if not record.cancelled:
                record.cancelled = True
                record.cancelled_at = now
                session.flush()
                job_ids = session.scalars(
                    sa.select(RequestJob.job_id).where(RequestJob.request_id == request_id)
                ).all()
                jobs = session.scalars(
                    sa.select(Job)
                    .where(Job.id.in_(job_ids), Job.state.in_(LIVE_STATES))
                    .order_by(Job.id)
                    .with_for_update()
                ).all()
                for job in jobs:
                    others = session.scalar(
                        sa.select(sa.func.count())
                        .select_from(RequestJob)
                        .join(RequestRecord, RequestRecord.id == RequestJob.request_id)
                        .where(RequestJob.job_id == job.id, RequestRecord.cancelled.is_(False))
                    )
                    if not others:
                        job.state = "cancelled"
                        job.finished_at = now
                        job.lease_expires_at = None
        return self.get(request_id, owner)

    # -- the queue ---------------------------------------------------------------

    def claim(
        self,
        worker_id: str,
        lease_s: float,
        *,
        results: str | Path | None = None,
    ) -> JobRow | None:
        """Take the oldest queued job (or a running one whose lease expired) for ``worker_id``.

        PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` (replicas never wait
        for each other's claims); SQLite: one ``BEGIN IMMEDIATE`` transaction.
        A job whose lease expired :data:`MAX_ATTEMPTS` times is failed instead
        (a runner keeps dying on it).

        Args:
            worker_id: who claims it; heartbeats and the end must name the same.
            lease_s: seconds the claim holds without a heartbeat.
            results: the directory of results (``<state_dir>/results``); a job
                claimed for the first time gets ``results/<job id>`` as its
                output directory (a resumed one keeps its own).

        Returns:
            The claimed job, or ``None`` when there is nothing to do.
        """
        for _ in range(MAX_ATTEMPTS + 1):
            now = _now()
            with self._writing() as session:
                job = session.scalars(
                    sa.select(Job)
                    .where(
                        sa.or_(
                            Job.state == "queued",
                            sa.and_(Job.state == "running", Job.lease_expires_at < now),
                        )
                    )
                    .order_by(Job.created_at, Job.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).first()
                if job is None:
                    return None
                if job.state == "running" and job.attempts >= MAX_ATTEMPTS:
                    job.state = "failed"
                    job.error_type = "JobLostError"
                    job.error_message = (
                        f"the runner delivering this request stopped {job.attempts} times "
                        f"without finishing (last: {job.claimed_by}); it is not tried again. "
                        "Look at the service's logs, then submit the request again"
                    )
                    job.finished_at = now
                    job.lease_expires_at = None
                    continue
                job.state = "running"
                job.claimed_by = worker_id
                job.lease_expires_at = now + dt.timedelta(seconds=lease_s)
                job.attempts = (job.attempts or 0) + 1
                job.started_at = job.started_at or now
                if job.output_dir is None and results is not None:
                    job.output_dir = str(Path(results) / job.id)
                session.flush()
                return JobRow.of(job)
        return None

    def heartbeat(
        self, job_id: str, worker_id: str, progress: Mapping[str, Any], lease_s: float
    ) -> bool:
        """Store ``progress`` and extend the lease; ``False``: cancelled or lease lost, stop.

        One ``UPDATE`` guarded by ``claimed_by`` and the state, so a runner
        whose lease another runner took can never write again.
        """
        now = _now()
        with self._writing() as session:
            result = session.execute(
                sa.update(Job)
                .where(Job.id == job_id, Job.claimed_by == worker_id, Job.state == "running")
                .values(
                    progress={**empty_progress(), **progress},
                    lease_expires_at=now + dt.timedelta(seconds=lease_s),
                )
                .execution_options(synchronize_session=False)
            )
            return _rowcount(result) == 1

    def finish(
        self,
        job_id: str,
        worker_id: str,
        stored_bytes: int,
        *,
        progress: Mapping[str, Any] | None = None,
    ) -> bool:
        """Mark the job complete; ``False`` when it is no longer ``worker_id``'s (nothing changed)."""
        values: dict[str, Any] = {
            "state": "complete",
            "stored_bytes": int(stored_bytes),
            "finished_at": _now(),
            "lease_expires_at": None,
        }
        if progress is not None:
            values["progress"] = {**empty_progress(), **progress}
        return self._end(job_id, worker_id, values)

    def fail(self, job_id: str, worker_id: str, error_type: str, message: str) -> bool:
        """Mark the job failed with its error; ``False`` when it is no longer ``worker_id``'s."""
        return self._end(
            job_id,
            worker_id,
            {
                "state": "failed",
                "error_type": error_type,
                "error_message": message,
                "finished_at": _now(),
                "lease_expires_at": None,
            },
        )

    def release(self, job_id: str, worker_id: str) -> bool:
        """Hand a running job back to the queue (its runner shuts down); ``False``: not ours."""
        return self._end(
            job_id, worker_id, {"state": "queued", "claimed_by": None, "lease_expires_at": None}
        )

    def _end(self, job_id: str, worker_id: str, values: dict[str, Any]) -> bool:
        with self._writing() as session:
            result = session.execute(
                sa.update(Job)
                .where(Job.id == job_id, Job.claimed_by == worker_id, Job.state == "running")
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            return _rowcount(result) == 1

    def job(self, job_id: str) -> JobRow:
        """The job ``job_id`` (for runners and tests).

        Raises:
            RequestNotFoundError: no such job.
        """
        with self._reading() as session:
            job = session.get(Job, job_id)
            if job is None:
                msg = f"no job {job_id!r}; check the id (a request's status names its jobs)"
                raise RequestNotFoundError(msg)
            return JobRow.of(job)

    def jobs(self, *, state: str | None = None) -> builtins.list[JobRow]:
        """Every job (in ``state``), oldest first."""
        with self._reading() as session:
            query = sa.select(Job).order_by(Job.created_at, Job.id)
            if state is not None:
                query = query.where(Job.state == state)
            return [JobRow.of(j) for j in session.scalars(query)]

    # -- quotas and metrics ---------------------------------------------------------

    def active_requests(self, owner: str) -> int:
        """How many of ``owner``'s requests are queued or running."""
        with self._reading() as session:
            states = self._states(owner).subquery()
            live = sa.select(sa.func.count()).where(states.c.state.in_(LIVE_STATES))
            return int(session.scalar(live.select_from(states)) or 0)

    def stored_bytes(self, owner: str) -> int:
        """Bytes of the results of ``owner``'s requests that are not cancelled.

        A job shared by several of the owner's requests counts once; one
        shared with other users counts for each of them.
        """
        with self._reading() as session:
            jobs = (
                sa.select(Job.id, Job.stored_bytes)
                .join(RequestJob, RequestJob.job_id == Job.id)
                .join(RequestRecord, RequestRecord.id == RequestJob.request_id)
                .where(RequestRecord.owner == owner, RequestRecord.cancelled.is_(False))
                .distinct()
                .subquery()
            )
            total = session.scalar(sa.select(sa.func.coalesce(sa.func.sum(jobs.c.stored_bytes), 0)))
            return int(total or 0)

    def counts(self) -> dict[str, int]:
        """Requests by derived state (every state present, 0 when none)."""
        with self._reading() as session:
            counts = dict.fromkeys(REQUEST_STATES, 0)
            states = self._states(None).subquery()
            query = sa.select(states.c.state, sa.func.count()).group_by(states.c.state)
            for state, n in session.execute(query):
                counts[state] = int(n)
            return counts

    def job_counts(self) -> dict[str, int]:
        """Jobs by state (every state present, 0 when none)."""
        with self._reading() as session:
            counts = dict.fromkeys(JOB_STATES, 0)
            for s, n in session.execute(sa.select(Job.state, sa.func.count()).group_by(Job.state)):
                counts[s] = int(n)
            return counts


def _in_spec_order(spec: Mapping[str, Any], samples: dict[str, JobRow]) -> dict[str, JobRow]:
    """The samples in the order the spec names them (as ``deliver`` returns them)."""
    named = spec.get("samples") if isinstance(spec, Mapping) else None
    if isinstance(named, Mapping):
        order = [n for n in named if n in samples]
        return {n: samples[n] for n in [*order, *sorted(set(samples) - set(order))]}
    return dict(sorted(samples.items()))


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


def _parse_url(url: str) -> sa.URL:
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        msg = (
            f"database URL {url!r} is not a URL SQLAlchemy reads; use sqlite:///PATH "
            "or postgresql+psycopg://USER@HOST:PORT/DB"
        )
        raise ServiceError(msg) from err
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        msg = (
            f"database URL {url!r}: {backend!r} is not supported; use sqlite:///PATH "
            "(one replica) or postgresql+psycopg://USER@HOST:PORT/DB (several)"
        )
        raise ServiceError(msg)
    if backend == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3 (the service extra)
    return parsed


def _engine(url: sa.URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    memory = url.database in (None, "", ":memory:")
    if not memory:
        directory = Path(url.database or "").expanduser().parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            msg = (
                f"cannot create {directory} for the service database {url} ({err.strerror}); "
                "choose a writable state_dir or another --database"
            )
            raise ServiceError(msg) from err
    engine = sa.create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": _SQLITE_BUSY_MS / 1000},
        **({"poolclass": StaticPool} if memory else {}),
    )

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # the driver's own BEGINs off: ours below
        cursor = dbapi_conn.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        # writes take the write lock at BEGIN: a deferred transaction that later
        # writes can fail with SQLITE_BUSY at once (no busy wait) when two upgrade
        mode = conn.get_execution_options().get("columnhub_begin", "")
        conn.exec_driver_sql(f"BEGIN {mode}".strip())

    return engine
