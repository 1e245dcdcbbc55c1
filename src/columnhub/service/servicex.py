"""The ServiceX-compatible front door: the routes the unmodified ``servicex`` client (3.3) calls.

Point the ``endpoint`` of a ``servicex.yaml`` at ``columnhub serve`` and
``servicex.deliver(spec)`` runs through columnhub (``docs/servicex.md``):

- ``GET /servicex``: version, codegens (``columnhub``, ``uproot-raw``,
  ``uproot``) and capabilities;
- ``POST /token/refresh``: a columnhub token (static or OIDC) in, a
  short-lived access token (a JWT this service signs) out; every route below
  takes either;
- ``POST /servicex/transformation`` -> ``{request_id}``: ONE columnhub
  request, submitted through the same database and queue as ``/api/v1`` (so
  single flight and the column cache apply: a transformation asked again is
  answered from columnhub's cache);
- ``GET /servicex/transformation[/{id}]``: the client's ``TransformStatus``;
  ``.../results?later_than=``: the result objects; cancel (``GET``/``POST``
  ``.../cancel``), ``DELETE``; ``/servicex/datasets`` (list, get, delete);
- the result parts as S3 objects under ``/s3`` (:mod:`columnhub.service.s3`).

Errors answer ``{"message": ...}`` (the client shows it) with a 4xx status;
a permanent refusal is never 429 or 5xx (the client retries those).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import json
import shlex
import subprocess
from collections.abc import Callable, Coroutine
from typing import Any

from columnhub._extras import require
from columnhub.errors import (
    ColumnhubError,
    DatasetError,
    PermissionDeniedError,
    ServiceError,
    SpecError,
)

require("fastapi", what="the columnhub service")
from fastapi import APIRouter, Depends
from fastapi import Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from columnhub.service import s3
from columnhub.service.auth import ANONYMOUS, Principal

__all__ = [
    "CAPABILITIES",
    "CODEGENS",
    "RESOLVER_TIMEOUT_S",
    "STATUS",
    "TITLE_LIMIT",
    "resolve_did",
    "router",
    "translate",
]

#: the longest transformation title accepted (the ``long_sample_titles_`` capability)
TITLE_LIMIT = 10240
#: what ``GET /servicex`` says the service can do
CAPABILITIES = (
    "poll_local_transformation_results",
    f"long_sample_titles_{TITLE_LIMIT}",
    "post_cancel_transform",
)
#: the codegens and what translates each
CODEGENS = {
    "columnhub": "columnhub (the selection is a columnhub request, JSON)",
    "uproot-raw": "columnhub (UprootRaw queries, translated)",
    "uproot": "columnhub (FuncADL_Uproot qastle, translated)",
}
#: columnhub request state -> ServiceX transformation status
STATUS = {
    "queued": "Submitted",
    "running": "Running",
    "complete": "Complete",
    "failed": "Fatal",
    "cancelled": "Canceled",
}
#: seconds a DID resolver command may run
RESOLVER_TIMEOUT_S = 300.0
_FORMATS = ("parquet", "root-file", "root-rntuple")
_KNOWN_FIELDS = frozenset(
    {"title", "did", "file-list", "selection", "codegen", "result-destination", "result-format"}
)


# ---------------------------------------------------------------------------
# errors: {"message"} as the servicex client reads it


class _ServiceXRoute(APIRoute):
    """Routes whose errors carry ``message`` (the client shows it), never a 429."""

    def get_route_handler(self) -> Callable[[HttpRequest], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: HttpRequest) -> Response:
            try:
                return await handler(request)
            except ColumnhubError as err:
                return _error(err)
            except RequestValidationError as err:
                return _error(SpecError(f"invalid parameter: {err.errors()}"))

        return route


def _error(err: ColumnhubError) -> JSONResponse:
    from columnhub.service.app import error_status
    from columnhub.service.auth import challenge_headers

    status = error_status(err)
    if status == 429:  # a limit: the client would retry for minutes without saying why
        status = 400
    kind = type(err).__name__
    return JSONResponse(
        {"message": str(err), "error": {"type": kind, "message": str(err)}},
        status_code=status,
        headers=challenge_headers(err) or None,
    )


router = APIRouter(route_class=_ServiceXRoute, tags=["servicex"])
router.include_router(s3.router)


# ---------------------------------------------------------------------------
# who is calling


def _caller(scope: str) -> Callable[[HttpRequest], Principal]:
    """A dependency: the caller by our access token, or by a columnhub token; must hold ``scope``."""

    def dependency(request: HttpRequest) -> Principal:
        authenticator = request.app.state.authenticator
        if not authenticator.enabled:
            return ANONYMOUS
        from columnhub.service._servicex_keys import service_keys

        header = request.headers.get("authorization") or ""
        scheme, _, token = header.strip().partition(" ")
        who = None
        if scheme.lower() == "bearer" and token.strip():
            who = service_keys(request.app).principal(token.strip())
        if who is None:
            who = authenticator.authenticate(header or None)
        who.require(scope)
        return who

    return dependency


_reader = Depends(_caller("read"))
_submitter = Depends(_caller("submit"))


def _owner(user: Principal) -> str | None:
    return None if user.admin else user.user


# ---------------------------------------------------------------------------
# info and tokens


@router.get("/servicex")
def info() -> dict[str, Any]:
    """What this front door offers: ``app-version``, ``code-gen-image``, ``capabilities``."""
    from columnhub import __version__

    return {
        "app-version": f"columnhub-{__version__}",
        "code-gen-image": dict(CODEGENS),
        "capabilities": list(CAPABILITIES),
    }


@router.post("/token/refresh")
def refresh(request: HttpRequest) -> dict[str, str]:
    """A columnhub token (static or OIDC) in ``Authorization: Bearer``; a short-lived JWT out.

    With auth off anyone gets a token (for the anonymous user).
    """
    from columnhub.service._servicex_keys import service_keys

    who = request.app.state.authenticator.authenticate(request.headers.get("authorization"))
    return {"access_token": service_keys(request.app).access_token(who)}


# ---------------------------------------------------------------------------
# transformations


@router.post("/servicex/transformation")
async def submit(request: HttpRequest, user: Principal = _submitter) -> dict[str, str]:
    """Submit a transformation: ONE columnhub request (single flight, cached columns)."""
    from columnhub.service.app import MAX_SPEC_BYTES

    body = await request.body()
    if len(body) > MAX_SPEC_BYTES:
        msg = f"the transformation request is {len(body)} bytes, more than {MAX_SPEC_BYTES}"
        raise SpecError(msg)
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        msg = f"the transformation request is not JSON ({err}); the servicex client sends JSON"
        raise SpecError(msg) from err
    return await run_in_threadpool(_submit, request.app, user, data)


def _submit(app: Any, user: Principal, data: Any) -> dict[str, str]:
    from columnhub.service.app import _check_limits, _job_specs

    config, db = app.state.config, app.state.db
    from columnhub.service.access import check_entry

    fields = _fields(data)
    files = fields["file-list"] or resolve_did(fields["did"], config.servicex_resolvers)
    try:
        for entry in files:  # before a translator reads any file's branch list
            check_entry(entry, data_roots=config.data_roots, url_prefixes=config.url_prefixes)
        spec = translate(
            fields["codegen"],
            fields["selection"],
            files=files,
            result_format=fields["result-format"],
        )
        jobs = _job_specs(config, spec)  # friends' inputs checked too
    except PermissionDeniedError as err:
        err.status = 400  # a file outside the roots: the client shows a 400's message as is
        raise
    _check_limits(config, db, user.user)
    samples = {name: (req.hash, req.model_dump(mode="json")) for name, req in jobs.items()}
    stored = {"servicex": {**fields, "files": files}, "request": spec}
    view = db.submit(user.user, stored, fields["title"], samples)
    return {"request_id": view.id}


def _fields(data: Any) -> dict[str, Any]:
    """The transformation request's fields, checked (a 400 names the bad one)."""
    if not isinstance(data, dict):
        msg = f"the transformation request must be a JSON object, got {type(data).__name__}"
        raise SpecError(msg)
    unknown = sorted(set(data) - _KNOWN_FIELDS)
    if unknown:
        msg = f"unknown transformation fields {unknown}; known: {sorted(_KNOWN_FIELDS)}"
        raise SpecError(msg)
    out: dict[str, Any] = {k: data.get(k) for k in sorted(_KNOWN_FIELDS)}
    for name in ("selection", "codegen"):
        if not isinstance(out[name], str) or not out[name]:
            msg = f"the transformation request needs '{name}' (text), got {out[name]!r}"
            raise SpecError(msg)
    title = out["title"]
    if title is not None and (not isinstance(title, str) or len(title) > TITLE_LIMIT):
        msg = f"title must be text of at most {TITLE_LIMIT} characters"
        raise SpecError(msg)
    if out["codegen"] not in CODEGENS:
        msg = f"codegen {out['codegen']!r} is not supported; use one of {', '.join(CODEGENS)}"
        raise SpecError(msg)
    destination = out["result-destination"] or "object-store"
    if destination != "object-store":
        msg = (
            f"result-destination {destination!r} is not supported; columnhub serves results "
            "as objects (object-store)"
        )
        raise SpecError(msg)
    out["result-destination"] = destination
    fmt = out["result-format"] or "root-file"
    if fmt not in _FORMATS:
        msg = f"result-format {fmt!r} is not a ServiceX format ({', '.join(_FORMATS)})"
        raise SpecError(msg)
    out["result-format"] = fmt
    files, did = out["file-list"], out["did"]
    if (files is None) == (did is None):
        msg = "give exactly one of 'did' and 'file-list' (a Dataset in the ServiceX spec)"
        raise SpecError(msg)
    if files is not None and (
        not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files)
    ):
        msg = f"file-list must be a non-empty list of paths or URLs, got {files!r}"
        raise SpecError(msg)
    if did is not None and not isinstance(did, str):
        msg = f"did must be text like rucio://scope:name, got {did!r}"
        raise SpecError(msg)
    return out


def translate(
    codegen: str, selection: str, *, files: list[str], result_format: str
) -> dict[str, Any]:
    """The columnhub spec of a transformation: its codegen's translator.

    ``columnhub``: :func:`columnhub.service._servicex_columnhub.translate`;
    ``uproot-raw`` and ``uproot``: ``columnhub.service.servicex_query.expand``
    (the files must have been checked against the data roots: it may read
    their branch lists).

    Raises:
        SpecError: the query cannot be served (the message names the construct).
    """
    if codegen == "columnhub":
        from columnhub.service import _servicex_columnhub

        return _servicex_columnhub.translate(
            codegen, selection, files=files, result_format=result_format
        )
    try:
        module = importlib.import_module("columnhub.service.servicex_query")
    except ModuleNotFoundError as err:
        if err.name != "columnhub.service.servicex_query":
            raise
        msg = (
            f"codegen {codegen!r} is not supported yet by this columnhub service; use the "
            "'columnhub' codegen (the query is a columnhub request as JSON)"
        )
        raise SpecError(msg) from None
    # expand: translate, reading the branch lists a pattern query needs (metadata only)
    spec: dict[str, Any] = module.expand(
        codegen, selection, files=files, result_format=result_format
    )
    return spec


def resolve_did(did: str, resolvers: dict[str, str]) -> list[str]:
    """The files of a DID (``rucio://scope:name``, ``cernopendata://1234``) by its resolver.

    ``resolvers`` maps a scheme to ``python:package.module:function`` (called
    with the DID, without ``?files=``; returns the files) or to a command (run
    with the DID as its last argument; prints one file per line). ``?files=N``
    keeps the first N files.

    Raises:
        SpecError: no resolver for the scheme, or it failed or found nothing.
    """
    scheme, sep, rest = did.partition("://")
    if not sep or not rest:
        msg = f"did {did!r} is not a DID like rucio://scope:name or cernopendata://1234"
        raise SpecError(msg)
    name, _, query = rest.partition("?")
    limit = None
    if query:
        key, _, value = query.partition("=")
        if key != "files" or not value.isdigit() or int(value) < 1:
            msg = f"did {did!r}: the only option is ?files=N (N >= 1), got ?{query}"
            raise SpecError(msg)
        limit = int(value)
    resolver = resolvers.get(scheme)
    if resolver is None:
        configured = ", ".join(f"{s}://" for s in sorted(resolvers)) or "none"
        msg = (
            f"dataset {did!r}: this columnhub service has no resolver for {scheme}:// DIDs "
            f"(configured: {configured}); give the files instead (a FileList Dataset), or ask "
            "the operators to map the scheme in servicex_resolvers"
        )
        raise DatasetError(msg)
    base = f"{scheme}://{name}"
    files = _run_resolver(resolver, base)
    if not files:
        msg = f"dataset {did!r}: the {scheme} resolver found no files"
        raise DatasetError(msg)
    return files[:limit] if limit is not None else files


def _run_resolver(resolver: str, did: str) -> list[str]:
    if resolver.startswith("python:"):
        target = resolver.removeprefix("python:")
        module_name, _, attr = target.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            msg = f"the resolver {resolver!r} cannot be loaded ({err}); fix servicex_resolvers"
            raise SpecError(msg) from err
        found = function(did)
        return [str(f) for f in found]
    try:
        done = subprocess.run(
            [*shlex.split(resolver), did],
            capture_output=True,
            text=True,
            timeout=RESOLVER_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        msg = f"the resolver {resolver!r} of {did!r} did not run ({err})"
        raise DatasetError(msg) from err
    if done.returncode != 0:
        msg = (
            f"the resolver {resolver!r} of {did!r} failed (exit {done.returncode}): "
            f"{done.stderr.strip()[-500:]}"
        )
        raise DatasetError(msg)
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


@router.get("/servicex/transformation")
def list_transformations(request: HttpRequest, user: Principal = _reader) -> dict[str, Any]:
    """The caller's transformations (every user's for an admin), newest first."""
    return {"requests": [_status(request, v) for v in _servicex_views(request, user)]}


@router.get("/servicex/transformation/{request_id}")
def status(request: HttpRequest, request_id: str, user: Principal = _reader) -> dict[str, Any]:
    """The transformation's ``TransformStatus``."""
    return _status(request, request.app.state.db.get(request_id, owner=_owner(user)))


@router.get("/servicex/transformation/{request_id}/results")
def results(
    request: HttpRequest, request_id: str, later_than: str | None = None, user: Principal = _reader
) -> dict[str, Any]:
    """The result objects, created after ``later_than`` (ISO time); none until complete."""
    view = request.app.state.db.get(request_id, owner=_owner(user))
    after = None
    if later_than:
        try:
            after = dt.datetime.fromisoformat(later_than)
        except ValueError as err:
            msg = f"later_than {later_than!r} is not an ISO time"
            raise SpecError(msg) from err
        if after.tzinfo is not None:
            after = after.astimezone(dt.UTC).replace(tzinfo=None)
    out = []
    for obj in _result_objects(request, view):
        if after is None or obj["created"] > after:
            out.append(
                {
                    "s3-object-name": obj["key"],
                    "file-path": obj["key"],
                    "transform_status": "success",
                    "created_at": obj["created"].isoformat(),
                    "total-bytes": obj["bytes"],
                    "total-events": obj["rows"],
                }
            )
    return {"results": out}


def _cancel(request: HttpRequest, request_id: str, user: Principal) -> dict[str, str]:
    db = request.app.state.db
    view = db.get(request_id, owner=_owner(user))
    if view.status in ("complete", "failed"):
        msg = (
            f"transformation {request_id} is not in progress (it is {STATUS[view.status]}); "
            "only a submitted or running transformation can be cancelled"
        )
        raise SpecError(msg)
    db.cancel(request_id, _owner(user))
    return {"message": f"Canceled transformation request {request_id}"}


@router.get("/servicex/transformation/{request_id}/cancel")
def cancel(request: HttpRequest, request_id: str, user: Principal = _submitter) -> dict[str, str]:
    """Cancel a transformation (its work stops unless another request shares it)."""
    return _cancel(request, request_id, user)


@router.post("/servicex/transformation/{request_id}/cancel")
def cancel_post(
    request: HttpRequest, request_id: str, user: Principal = _submitter
) -> dict[str, str]:
    """Cancel a transformation (the ``post_cancel_transform`` capability)."""
    return _cancel(request, request_id, user)


@router.delete("/servicex/transformation/{request_id}")
def delete(request: HttpRequest, request_id: str, user: Principal = _submitter) -> dict[str, str]:
    """Delete a transformation: it stops if running and its results are no longer served.

    The record stays (as ``Canceled``); the column cache keeps what was computed.
    """
    db = request.app.state.db
    db.get(request_id, owner=_owner(user))
    db.cancel(request_id, _owner(user))
    return {"message": f"Deleted transformation request {request_id}"}


# ---------------------------------------------------------------------------
# datasets: what the caller's transformations read


@router.get("/servicex/datasets")
def datasets(request: HttpRequest, user: Principal = _reader) -> dict[str, Any]:
    """The datasets (DIDs and file lists) of the caller's transformations."""
    finder = request.query_params.get("did-finder")
    found = _datasets(request, user)
    return {"datasets": [d for d in found.values() if finder is None or d["did_finder"] == finder]}


@router.get("/servicex/datasets/{dataset_id}")
def dataset(request: HttpRequest, dataset_id: int, user: Principal = _reader) -> dict[str, Any]:
    """One dataset of the caller's transformations."""
    return _dataset(request, dataset_id, user)


@router.delete("/servicex/datasets/{dataset_id}")
def delete_dataset(
    request: HttpRequest, dataset_id: int, user: Principal = _submitter
) -> dict[str, Any]:
    """Forget a dataset's lookup: columnhub resolves a DID at every submission, so it is stale."""
    _dataset(request, dataset_id, user)
    return {"dataset-id": dataset_id, "stale": True}


def _dataset(request: HttpRequest, dataset_id: int, user: Principal) -> dict[str, Any]:
    from columnhub.errors import RequestNotFoundError

    found = _datasets(request, user).get(dataset_id)
    if found is None:
        msg = f"no dataset {dataset_id} among your transformations (GET /servicex/datasets lists them)"
        raise RequestNotFoundError(msg)
    return found


def _datasets(request: HttpRequest, user: Principal) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for view in reversed(_servicex_views(request, user)):  # oldest first: newest wins
        fields = view.spec["servicex"]
        did_id = _did_id(fields)
        files = list(fields.get("files") or [])
        inputs = {}
        if view.status == "complete":
            for manifest in _manifests(request, view).values():
                inputs.update({i["path"]: i for i in manifest.get("inputs", [])})
        when = _iso(view.created_at)
        out[did_id] = {
            "id": did_id,
            "name": fields.get("did") or _file_list_name(files),
            "did_finder": (fields.get("did") or "user://").partition("://")[0] or "user",
            "n_files": len(files),
            "size": sum(int(i.get("size", 0)) for i in inputs.values()),
            "events": int(view.progress.get("events_total", 0) or 0),
            "last_used": when,
            "last_updated": when,
            "lookup_status": "complete",
            "is_stale": False,
            "files": [
                {
                    "id": n,
                    "adler32": None,
                    "file_size": int(inputs.get(f, {}).get("size", 0)),
                    "file_events": 0,
                    "paths": f,
                }
                for n, f in enumerate(files)
            ],
        }
    return out


# ---------------------------------------------------------------------------
# views -> TransformStatus


def _servicex_views(request: HttpRequest, user: Principal) -> list[Any]:
    """Every transformation (request submitted here) of the caller, newest first."""
    db = request.app.state.db
    out: list[Any] = []
    page = 1
    while True:
        views, total = db.list(_owner(user), page=page, per_page=1000)
        out.extend(v for v in views if isinstance(v.spec, dict) and "servicex" in v.spec)
        if page * 1000 >= total or not views:
            return out
        page += 1


def _fields_of(view: Any) -> dict[str, Any]:
    """The ServiceX fields of a request (an ``/api/v1`` request shows as a ``columnhub`` one)."""
    spec = view.spec if isinstance(view.spec, dict) else {}
    if "servicex" in spec:
        return dict(spec["servicex"])
    fmt = (spec.get("output") or {}).get("format", "parquet")
    return {
        "title": view.title,
        "did": None,
        "files": [],
        "selection": json.dumps(spec),
        "codegen": "columnhub",
        "result-destination": "object-store",
        "result-format": "root-file" if fmt == "root" else "parquet",
    }


def _did_id(fields: dict[str, Any]) -> int:
    identity = fields.get("did") or json.dumps(sorted(fields.get("files") or []))
    return int(hashlib.sha256(str(identity).encode()).hexdigest()[:12], 16)


def _file_list_name(files: list[str]) -> str:
    if not files:
        return "file list"
    more = f" and {len(files) - 1} more" if len(files) > 1 else ""
    return f"{files[0]}{more}"


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.replace(tzinfo=dt.UTC).isoformat()


def _manifests(request: HttpRequest, view: Any) -> dict[str, dict[str, Any]]:
    from columnhub.service.app import _complete_samples

    return _complete_samples(request.app.state.config, view)


def _result_objects(request: HttpRequest, view: Any) -> list[dict[str, Any]]:
    """Each result part as an object: key, bytes, rows, created (naive UTC); none until complete."""
    if view.status != "complete":
        return []
    try:
        manifests = _manifests(request, view)
    except ServiceError:  # the folder is gone (410): nothing to list
        return []
    out = []
    for sample, manifest in manifests.items():
        job = view.samples[sample]
        created = job.finished_at or view.created_at
        for part in manifest.get("parts", []):
            out.append(
                {
                    "key": s3.object_key(sample, part["name"]),
                    "bytes": int(part["bytes"]),
                    "rows": int(part.get("rows", 0)),
                    "created": created,
                }
            )
    return out


def _status(request: HttpRequest, view: Any) -> dict[str, Any]:
    """The ``TransformStatus`` of a request, as the servicex client reads it."""
    from columnhub import __version__
    from columnhub.service._servicex_keys import service_keys

    fields = _fields_of(view)
    state = view.status
    objects = _result_objects(request, view)
    progress = view.progress
    if state == "complete":
        files, completed, failed = len(objects), len(objects), 0
    else:
        files = int(progress.get("parts_total", 0) or 0)
        completed = 0  # parts are published together when the request completes
        failed = max(1, files) if state == "failed" else 0
    title = fields.get("title")
    error = view.error
    if error is not None:  # the client prints the title when a transformation fails
        title = f"{title or view.id} (failed: {error['type']}: {error['message']})"
    access, secret = service_keys(request.app).s3_credentials(view.id)
    config = request.app.state.config
    endpoint = config.servicex_s3_endpoint or f"{request.headers.get('host', '')}{s3.PREFIX}"
    secured = request.url.scheme == "https"
    scheme, sep, rest = endpoint.partition("://")
    if sep:  # a configured https://host/s3 (behind a TLS proxy) says whether it is secured
        endpoint, secured = rest, scheme == "https"
    return {
        "request_id": view.id,
        "did": fields.get("did") or _file_list_name(list(fields.get("files") or [])),
        "did_id": _did_id(fields),
        "title": title,
        "selection": fields["selection"],
        "tree-name": None,
        "image": CODEGENS.get(fields["codegen"], fields["codegen"]),
        "codegen": fields["codegen"],
        "result-destination": fields["result-destination"],
        "result-format": fields["result-format"],
        "generated-code-cm": f"columnhub-{view.id}",
        "status": STATUS[state],
        "app-version": f"columnhub-{__version__}",
        "files": files,
        "files-completed": completed,
        "files-failed": failed,
        "files-remaining": max(0, files - completed - failed),
        "submit-time": _iso(view.created_at),
        "finish-time": _iso(view.finished_at),
        "minio-endpoint": endpoint,
        "minio-secured": secured,
        "minio-access-key": access,
        "minio-secret-key": secret,
        "log-url": None,
    }
