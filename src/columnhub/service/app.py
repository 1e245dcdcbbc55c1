"""The HTTP API: :func:`create_app` builds the FastAPI application of one service replica.

Routes (see ``docs/service.md``): ``/api/v1/requests`` (submit, list),
``/api/v1/requests/{id}`` (status, cancel), ``.../manifest``, ``.../files/...``
(with HTTP Range), ``/api/v1/cache/stats``, ``/healthz``, ``/readyz`` and the
OpenAPI page ``/docs``.

This module is the one place where errors become HTTP statuses: a
:class:`~columnhub.errors.ServiceError` answers its ``.status``, every other
:class:`~columnhub.errors.ColumnhubError` (a spec, expression, column, dataset,
join or model error: the user's input) answers 400 with the same message the
CLI prints. The body is ``{"error": {"type": ..., "message": ...}}``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from columnhub._extras import require
from columnhub.errors import (
    ColumnhubError,
    PermissionDeniedError,
    QuotaExceededError,
    ServiceError,
    SpecError,
)

# FastAPI reads the routes' annotations at run time: these names must be importable here.
# This module is only imported to serve (never by ``import columnhub`` or ``--help``).
require("fastapi", what="the columnhub service")
from fastapi import Depends, FastAPI, Query
from fastapi import Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException

from columnhub.service.auth import Authenticator, Principal, challenge_headers, principal
from columnhub.service.servicex import router as servicex_router

if TYPE_CHECKING:
    from columnhub.service.config import ServiceConfig
    from columnhub.spec import Request

__all__ = ["API", "MAX_SPEC_BYTES", "create_app", "error_status"]

#: the prefix of every versioned route
API = "/api/v1"
#: the largest request body accepted for a spec (a spec is a few KiB)
MAX_SPEC_BYTES = 1 << 20
#: request states a list may be filtered by
STATES = ("queued", "running", "complete", "failed", "cancelled")

_log = logging.getLogger("columnhub.service")

_MEDIA_TYPES = {".parquet": "application/vnd.apache.parquet", ".root": "application/octet-stream"}


def error_status(err: ColumnhubError) -> int:
    """The HTTP status of an error: a :class:`ServiceError`'s ``.status``, else 400.

    >>> from columnhub.errors import RequestNotFoundError, SpecError
    >>> error_status(RequestNotFoundError("no")), error_status(SpecError("bad"))
    (404, 400)
    """
    if isinstance(err, ServiceError):
        return int(err.status)
    return 400


def _error(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": kind, "message": message}}, status_code=status, headers=headers
    )


def _status_error(cls: type[ServiceError], status: int, msg: str) -> ServiceError:
    """An error of ``cls`` answered with ``status`` instead of the class's own."""
    err = cls(msg)
    err.status = status
    return err


def create_app(config: ServiceConfig, *, runner: bool = True) -> FastAPI:
    """The FastAPI application of one service replica.

    The database is opened (and migrated) here; the runners that deliver
    queued work, and with ``scheduler: local`` the Dask ``LocalCluster`` they
    use, start with the application's lifespan and stop with it (uvicorn
    runs it; in-process tests enter ``app.router.lifespan_context(app)``).

    Args:
        config: the service settings.
        runner: start runners in this process (``False``: an API-only replica
            whose work other replicas on the same database run).
    """
    from columnhub import __version__
    from columnhub.service.db import Database

    config.state_dir.mkdir(parents=True, exist_ok=True)
    config.results_dir.mkdir(parents=True, exist_ok=True)
    db = Database(config.database)  # an unusable URL or server: a ServiceError naming it
    authenticator = Authenticator.from_config(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services: _Services = app.state.services
        if runner:
            await run_in_threadpool(services.start)
        try:
            yield
        finally:
            await run_in_threadpool(services.stop)

    app = FastAPI(
        title="columnhub",
        version=__version__,
        summary="Select, join, compute, cache and deliver columns of HEP event data.",
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.db = db
    app.state.authenticator = authenticator
    app.state.services = _Services(config, db)

    # -- errors: the one place they become statuses ----------------------------------

    @app.exception_handler(ColumnhubError)
    async def _columnhub_error(request: HttpRequest, err: ColumnhubError) -> JSONResponse:
        # 401/403 of auth carry their RFC 6750 challenge (WWW-Authenticate)
        headers = challenge_headers(err) or None
        return _error(error_status(err), type(err).__name__, str(err), headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: HttpRequest, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
            for e in err.errors()
        )
        return _error(400, "SpecError", f"invalid parameter: {problems}")

    @app.exception_handler(HTTPException)
    async def _http_error(request: HttpRequest, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, "HTTPError", str(err.detail))

    reader = Depends(principal("read"))
    submitter = Depends(principal("submit"))
    administrator = Depends(principal("admin"))

    # -- health --------------------------------------------------------------------

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(request: HttpRequest) -> JSONResponse:
        """Readiness: the database answers (and the service's ``LocalCluster`` runs)."""
        problems = request.app.state.services.problems()
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    # -- requests ------------------------------------------------------------------

    @app.post(f"{API}/requests", status_code=202, tags=["requests"])
    async def submit(
        request: HttpRequest,
        title: str | None = Query(None, max_length=500),
        user: Principal = submitter,
    ) -> dict[str, Any]:
        """Submit a spec (JSON, or YAML with a YAML content type): one dataset or ``samples:``.

        Answers 202 with the request's id at once; the work is queued (or
        attached to identical work already queued or running).
        """
        body = await _read_body(request)
        kind = request.headers.get("content-type", "")
        services: _Services = request.app.state.services
        lock = services.user_lock(user.user)
        return await run_in_threadpool(_submit, config, db, user, body, kind, title, lock)

    @app.get(f"{API}/requests", tags=["requests"])
    def list_requests(
        page: int = Query(1, ge=1),
        per_page: int = Query(50, ge=1, le=1000),
        state: str | None = None,
        all: bool = False,
        user: Principal = reader,
    ) -> dict[str, Any]:
        """The caller's requests, newest first (``all=true``: everyone's, admin only)."""
        if state is not None and state not in STATES:
            msg = f"state {state!r} is not a request state; use one of {', '.join(STATES)}"
            raise SpecError(msg)
        if all and "admin" not in user.scopes:
            msg = (
                f"user {user.user!r} may not list every user's requests (all=true needs the "
                "'admin' scope); leave out all=true to list your own"
            )
            raise PermissionDeniedError(msg)
        views, total = db.list(None if all else user.user, page=page, per_page=per_page, state=state)
        return {
            "requests": [v.to_json() for v in views],
            "page": page,
            "per_page": per_page,
            "total": total,
        }

    @app.get(f"{API}/requests/{{request_id}}", tags=["requests"])
    def status(request_id: str, user: Principal = reader) -> dict[str, Any]:
        """A request's status with progress (parts, events, bytes, rate, cache hits, errors)."""
        return dict(db.get(request_id, owner=_owner(user)).to_json())

    @app.delete(f"{API}/requests/{{request_id}}", tags=["requests"])
    def cancel(request_id: str, user: Principal = submitter) -> dict[str, Any]:
        """Cancel a request: its work stops (unless another request shares it), staging is removed."""
        return dict(db.cancel(request_id, _owner(user)).to_json())

    @app.get(f"{API}/requests/{{request_id}}/manifest", tags=["results"])
    def manifest(request_id: str, user: Principal = reader) -> dict[str, Any]:
        """The result's manifest plus ``path`` (its folder on the shared filesystem).

        Several samples: ``{"samples": {name: manifest}}``. 409 until complete; once
        every sample has ended and some failed, the delivered samples are served and
        a failed one reads ``{"complete": false, "error": {"type", "message"}}``.
        """
        done = _complete_samples(config, db.get(request_id, owner=_owner(user)))
        if list(done) == [""]:
            return done[""]
        return {"samples": done}

    single_path = f"{API}/requests/{{request_id}}/files/{{name}}"
    sample_path = f"{API}/requests/{{request_id}}/files/{{sample}}/{{name}}"

    @app.get(single_path, tags=["results"])
    def file(request_id: str, name: str, user: Principal = reader) -> FileResponse:
        """A result file of a single-sample request (HTTP Range: 206, 416)."""
        done = _complete_samples(config, db.get(request_id, owner=_owner(user)), only="")
        if list(done) != [""]:
            msg = (
                f"request {request_id} has several samples ({', '.join(done)}); "
                f"ask for {API}/requests/{request_id}/files/<sample>/{name}"
            )
            raise SpecError(msg)
        return _file_response(done[""], name)

    @app.get(sample_path, tags=["results"])
    def sample_file(
        request_id: str, sample: str, name: str, user: Principal = reader
    ) -> FileResponse:
        """A result file of one sample of a multi-sample request (HTTP Range: 206, 416)."""
        done = _complete_samples(config, db.get(request_id, owner=_owner(user)), only=sample)
        if sample not in done:
            from columnhub.errors import RequestNotFoundError

            names = ", ".join(s for s in done if s) or "none: it is a single-sample request"
            msg = (
                f"request {request_id} has no sample {sample!r} (samples: {names})"
            )
            raise RequestNotFoundError(msg)
        return _file_response(done[sample], name)

    # HEAD (size, Accept-Ranges) for remote readers; one OpenAPI entry per path is enough
    app.add_api_route(single_path, file, methods=["HEAD"], include_in_schema=False)
    app.add_api_route(sample_path, sample_file, methods=["HEAD"], include_in_schema=False)

    # -- cache ---------------------------------------------------------------------

    @app.get(f"{API}/cache/stats", tags=["cache"])
    def cache_stats(user: Principal = reader) -> dict[str, Any]:
        """What the service's column cache holds, and its hits and misses."""
        from columnhub.cache import ColumnCache

        stats = ColumnCache(config.cache, read_only=True).stats()
        return dict(stats.to_dict())

    # -- retention -----------------------------------------------------------------

    @app.post(f"{API}/admin/sweep", tags=["admin"])
    def sweep(ttl: str | None = None, user: Principal = administrator) -> dict[str, Any]:
        """Remove now the results no live request references, finished over ``ttl`` ago.

        ``ttl`` (e.g. ``7d``, ``12h``, ``0s``) defaults to the service's
        ``result_ttl``. A complete request whose result goes reads failed
        (``ResultExpiredError``); submitting it again runs the work again.
        """
        from columnhub.service.config import parse_duration
        from columnhub.service.jobs import sweep_results

        if ttl is None and config.result_ttl is None:
            msg = (
                "no ttl given and the service has no result_ttl; ask for "
                f"POST {API}/admin/sweep?ttl=7d (any duration: s, m, h, d, w), or set "
                "result_ttl in the service's configuration"
            )
            raise SpecError(msg)
        try:
            seconds = config.result_ttl if ttl is None else parse_duration(ttl)
        except ValueError as err:
            msg = f"ttl: {err}"
            raise SpecError(msg) from err
        if seconds is None or seconds < 0:
            msg = f"ttl must be a duration of 0 or more, got {ttl!r}"
            raise SpecError(msg)
        expired = sweep_results(db, config.results_dir, seconds)
        return {"expired": expired, "ttl_s": seconds}

    def _owner(user: Principal) -> str | None:
        """Whose requests ``user`` may see: their own, or everyone's for an admin."""
        return None if "admin" in user.scopes else user.user

    # -- metrics and dashboard (service/metrics.py, service/dashboard/) ----------------
    from columnhub.service import dashboard, metrics

    metrics.install(app)  # GET /metrics and the HTTP latency histogram
    dashboard.install(app)  # GET /, its static files, GET /api/v1/overview

    app.include_router(servicex_router)  # the ServiceX front door (docs/servicex.md)
    return app


# ---------------------------------------------------------------------------
# submit


def _submit(
    config: ServiceConfig,
    db: Any,
    user: Principal,
    body: bytes,
    content_type: str,
    title: str | None,
    lock: threading.Lock,
) -> dict[str, Any]:
    """Validate a submitted spec, check limits and data access, queue it (single flight)."""
    data = _parse_json_or_yaml(body, content_type)
    samples = _job_specs(config, data)
    jobs = {name: (req.hash, req.model_dump(mode="json")) for name, req in samples.items()}
    reuse = _reusable(config, db, jobs)  # complete work, inputs unchanged: shared, not run again
    with lock:  # one user's submissions one at a time in this replica
        _check_limits(config, db, user.user)
        # the active-requests limit again inside the submit's transaction, serialised by
        # the database: exact across replicas (the check above answers most refusals early)
        view = db.submit(  # wakes this replica's runners
            user.user,
            data,
            title,
            jobs,
            max_active=config.max_active_requests_per_user,
            reuse=reuse,
        )
    out = view.to_json()
    return {"id": out["id"], "status": out["status"], "samples": list(samples)}


def _reusable(
    config: ServiceConfig, db: Any, jobs: dict[str, tuple[str, dict[str, Any]]]
) -> dict[str, str]:
    """Sample -> the complete job whose result answers it as it is (``jobs.reusable_result``)."""
    from columnhub.service.jobs import reusable_result

    out = {}
    for name, (request_hash, _spec) in jobs.items():
        done = db.latest_complete(request_hash)
        if done is not None and reusable_result(done, cache=config.cache):
            out[name] = done.id
    return out


async def _read_body(request: HttpRequest) -> bytes:
    """The request body, refused once it passes :data:`MAX_SPEC_BYTES` (never all read first)."""
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_SPEC_BYTES:
            msg = (
                f"the spec is more than the {MAX_SPEC_BYTES} bytes accepted; a spec names "
                "files and columns (list many files with a glob pattern or a folder)"
            )
            raise SpecError(msg)
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json_or_yaml(body: bytes, content_type: str) -> Any:
    from columnhub.spec import _parse_json, _parse_yaml

    try:
        text = body.decode()
    except UnicodeDecodeError as err:
        msg = f"the spec is not UTF-8 text ({err}); send it as JSON (or YAML)"
        raise SpecError(msg) from err
    if not text.strip():
        msg = "the request body is empty; send the spec as JSON (or YAML with a YAML content type)"
        raise SpecError(msg)
    return _parse_yaml(text) if "yaml" in content_type else _parse_json(text)


def _job_specs(config: ServiceConfig, data: Any) -> dict[str, Request]:
    """Each sample's request as the service runs it: ``{"": request}`` for a single one.

    Inputs are checked against the data roots and URL prefixes (a request
    naming a registry or an output directory is refused there); the model
    registry is the service's own.
    """
    from columnhub.service.access import check_inputs
    from columnhub.spec import Samples, load_request

    if not isinstance(data, dict):  # a string would be read as a path on the server
        msg = (
            f"the spec must be a JSON object (the same mapping as a YAML spec), got a "
            f"{type(data).__name__}"
        )
        raise SpecError(msg)
    spec = load_request(data)
    check_inputs(spec, data_roots=config.data_roots, url_prefixes=config.url_prefixes)
    requests = spec.requests() if isinstance(spec, Samples) else {"": spec}
    if config.models is None:
        return requests
    return {name: req.replace(registry=config.models) for name, req in requests.items()}


def _check_limits(config: ServiceConfig, db: Any, user: str) -> None:
    """Refuse a new request beyond the user's limits (429 requests at once, 403 stored bytes)."""
    active = int(db.active_requests(user))
    limit = config.max_active_requests_per_user
    if active >= limit:
        msg = (
            f"user {user!r} already has {active} requests queued or running, the most allowed "
            f"at once (max_active_requests_per_user = {limit}); wait for one to finish, or "
            f"cancel one (DELETE {API}/requests/ID), then submit again"
        )
        raise QuotaExceededError(msg)
    cap = config.max_stored_bytes_per_user
    if cap is not None:
        stored = int(db.stored_bytes(user))
        if stored >= cap:
            msg = (
                f"user {user!r} holds {stored} bytes of results, at or over the limit of {cap} "
                f"bytes (max_stored_bytes_per_user); cancel (DELETE {API}/requests/ID) requests "
                "whose results you no longer need, or ask the operators for a larger limit"
            )
            raise _status_error(QuotaExceededError, 403, msg)


# ---------------------------------------------------------------------------
# results


def _complete_samples(
    config: ServiceConfig, view: Any, *, only: str | None = None
) -> dict[str, dict[str, Any]]:
    """Each sample's manifest plus ``path``; 409 unless the request is complete.

    Args:
        config: the service settings.
        view: the request (a :class:`~columnhub.service.db.RequestView`).
        only: read only this sample's manifest (a file download); the others
            are named with an empty mapping. ``None``: every sample's.
    """
    status = view.status
    # several samples, all ended, some failed: the delivered ones are served (as the
    # embedded deliver returns them in SampleError.results); a failed one reads
    # {"complete": false, "error": ...} in the manifest and answers 409 for its files
    partial = (
        status == "failed"
        and any(view.samples)
        and all(j.state in ("complete", "failed", "cancelled") for j in view.samples.values())
    )
    if status != "complete" and not partial:
        error = view.error
        why = f" ({error['type']}: {error['message']})" if error else ""
        msg = (
            f"request {view.id} is {status}{why}; its result can be read once its status is "
            f"complete (GET {API}/requests/{view.id})"
        )
        raise _status_error(ServiceError, 409, msg)
    from columnhub.output.manifest import read_manifest

    out: dict[str, dict[str, Any]] = {}
    for name, job in view.samples.items():
        if only is not None and name != only:
            out[name] = {}
            continue
        if job.state != "complete":
            error = {"type": job.error_type, "message": job.error_message}
            if only is not None:
                msg = (
                    f"sample {name!r} of request {view.id} is {job.state} "
                    f"({error['type']}: {error['message']}); it has no result to read"
                )
                raise _status_error(ServiceError, 409, msg)
            out[name] = {"complete": False, "error": error}
            continue
        directory = Path(job.output_dir) if job.output_dir else config.result_directory(job.id)
        manifest = read_manifest(directory)
        if manifest is None or not manifest.get("complete"):  # never serve a partial result
            msg = (
                f"request {view.id}: the result of sample {name or '(single)'} is not in "
                f"{directory} any more (removed from the shared filesystem); submit it again"
            )
            raise _status_error(ServiceError, 410, msg)
        out[name] = {**manifest, "path": os.fspath(directory)}
    return out


def _file_response(manifest: dict[str, Any], name: str) -> FileResponse:
    from columnhub.errors import RequestNotFoundError

    if name not in manifest["files"]:  # only the result's own files: no path escapes
        listed = ", ".join(manifest["files"]) or "none (the selection kept no events)"
        msg = f"the result has no file {name!r}; its files are: {listed}"
        raise RequestNotFoundError(msg)
    path = Path(manifest["path"]) / name
    return FileResponse(
        path,
        media_type=_MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
        filename=name,
        content_disposition_type="attachment",
    )


# ---------------------------------------------------------------------------
# runners and the LocalCluster


class _Services:
    """The runners of this replica and, with ``scheduler: local``, the cluster they use."""

    def __init__(self, config: ServiceConfig, db: Any) -> None:
        self.config = config
        self.db = db
        self.runner: Any = None
        self.cluster: Any = None
        self._lock = threading.Lock()
        self._user_locks: dict[str, threading.Lock] = {}
        self._sweeping = threading.Event()
        self._sweeper: threading.Thread | None = None

    def user_lock(self, user: str) -> threading.Lock:
        """The lock that orders ``user``'s submissions in this replica (limits checked inside)."""
        with self._lock:
            return self._user_locks.setdefault(user, threading.Lock())

    def start(self) -> None:
        """Start the ``LocalCluster`` (if asked) and the runners."""
        from columnhub.service.jobs import Runner

        config = self.config
        if config.scheduler == "local":
            require("distributed", what="scheduler: local")
            from columnhub.execute.dask import local_cluster

            self.cluster = local_cluster(config.workers or 2)
            config = config.model_copy(update={"scheduler": self.cluster.scheduler_address})
            _log.info("LocalCluster at %s", self.cluster.scheduler_address)
        self.runner = Runner(self.db, config)
        self.runner.start()
        if config.result_ttl is not None:
            self._sweeping.clear()
            self._sweeper = threading.Thread(
                target=self._sweep_loop,
                args=(config.result_ttl,),
                name="columnhub-sweep",
                daemon=True,
            )
            self._sweeper.start()

    def _sweep_loop(self, ttl_s: float) -> None:
        """Remove expired results now and then (every replica may: the database takes turns)."""
        from columnhub.service.jobs import sweep_results

        interval = min(max(ttl_s / 4, 0.2), 600.0)
        while not self._sweeping.wait(interval):
            try:
                sweep_results(self.db, self.config.results_dir, ttl_s)
            except Exception:  # noqa: BLE001 - the database is away a moment: the next round tries again
                _log.exception("columnhub: sweeping expired results failed")

    def problems(self) -> list[str]:
        """Why this replica is not ready (empty: ready)."""
        out = []
        try:
            self.db.counts()
        except Exception as err:  # noqa: BLE001 - any database failure means not ready
            out.append(f"database: {type(err).__name__}: {err}")
        status = getattr(getattr(self.cluster, "status", None), "value", "running")
        if self.cluster is not None and status != "running":
            out.append(f"LocalCluster: {status}")
        return out

    def stop(self) -> None:
        """Stop the result sweep and the runners, then close the cluster."""
        self._sweeping.set()
        if self._sweeper is not None:
            self._sweeper.join()
            self._sweeper = None
        try:
            if self.runner is not None:
                self.runner.stop()
        finally:
            if self.cluster is not None:
                from columnhub.execute.dask import close_cluster

                close_cluster(self.cluster)
                self.cluster = None
