"""The object-store emulation of the ServiceX front door: S3 reads of a request's result parts.

The ``servicex`` client downloads results with aioboto3 from the object
store its transformation status names. columnhub has no object store: the
service answers those S3 calls itself, path-style under ``/s3`` on its own
port (bucket = request id, key = a result part's name):

- ``HEAD /s3/{bucket}/{key}`` and ``GET /s3/{bucket}/{key}`` (HTTP Range: 206, 416);
- ``GET /s3/{bucket}?list-type=2`` (ListObjectsV2, ``prefix``, ``max-keys``,
  ``continuation-token``, ``start-after``, ``encoding-type=url``), as S3 writes it;
- ``HEAD /s3/{bucket}`` (HeadBucket).

Only the parts of a *complete* result are objects (a listing of a request
still running is empty; its parts are not there yet). With auth on, every
call must be signed (SigV4 headers, as aioboto3 signs; or the query-string
signature of a presigned URL) with the credentials of that transformation
(:meth:`~columnhub.service._servicex_keys.ServiceKeys.s3_credentials`);
botocore's own signer computes the expected signature. Errors are S3's XML
(``NoSuchKey``, ``NoSuchBucket``, ``AccessDenied``, ``SignatureDoesNotMatch``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode
from xml.sax.saxutils import escape

from columnhub._extras import require
from columnhub.errors import ColumnhubError, RequestNotFoundError, ServiceError

require("fastapi", what="the columnhub service")
from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import FileResponse, Response
from fastapi.routing import APIRoute

__all__ = ["PREFIX", "S3Error", "object_key", "router"]

#: where the object store is, on the service's own port
PREFIX = "/s3"
#: how far a signed request's date may be from the service's clock (S3's own limit)
MAX_SKEW_S = 15 * 60
_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
_V4 = "AWS4-HMAC-SHA256"
_CODES = {400: "InvalidArgument", 403: "AccessDenied", 404: "NoSuchKey", 405: "MethodNotAllowed"}


class S3Error(ServiceError):
    """An S3 call refused: answered as S3's XML error with ``.code`` and ``.status``."""

    def __init__(self, message: str, *, code: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(frozen=True)
class _Object:
    key: str
    path: Path
    size: int
    etag: str
    modified: dt.datetime


# ---------------------------------------------------------------------------
# errors as S3 writes them


def _xml_error(err: ColumnhubError, method: str, resource: str) -> Response:
    from columnhub.service.app import error_status

    if isinstance(err, S3Error):
        status, code = err.status, err.code
    else:
        status = error_status(err)
        status = 400 if status in (409, 429) else status  # never a retry for a permanent answer
        code = _CODES.get(status, "InternalError" if status >= 500 else "InvalidRequest")
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(str(err))}</Message>"
        f"<Resource>{escape(resource)}</Resource></Error>"
    )
    if method == "HEAD":  # S3 answers HEAD errors with the status alone
        return Response(status_code=status)
    return Response(body, status_code=status, media_type="application/xml")


class _S3Route(APIRoute):
    """Routes whose errors are S3's XML errors (aioboto3 reads the code and message)."""

    def get_route_handler(self) -> Callable[[HttpRequest], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: HttpRequest) -> Response:
            try:
                return await handler(request)
            except ColumnhubError as err:
                return _xml_error(err, request.method, request.url.path)

        return route


router = APIRouter(prefix=PREFIX, route_class=_S3Route, include_in_schema=False)


# ---------------------------------------------------------------------------
# signatures


def _authorize(request: HttpRequest, bucket: str) -> None:
    """Check the request's S3 signature against ``bucket``'s credentials (auth on only).

    Raises:
        S3Error: unsigned, signed with another key, a wrong signature, an old
            date or an expired presigned URL.
    """
    if not request.app.state.authenticator.enabled:
        return
    from columnhub.service._servicex_keys import service_keys

    require("botocore", what="S3 signature checks of the ServiceX front door")
    keys = service_keys(request.app)
    query = parse_qsl(request.scope.get("query_string", b"").decode(), keep_blank_values=True)
    params = dict(query)
    header = request.headers.get("authorization", "")
    if header.startswith(_V4 + " "):
        access, check = _v4_header(request, header)
    elif "AWSAccessKeyId" in params and "Signature" in params:
        access, check = _v2_query(request, query)
    elif "X-Amz-Signature" in params:
        access, check = _v4_query(request, query)
    else:
        msg = (
            f"the S3 request to bucket {bucket!r} is not signed; sign it (AWS SigV4) with the "
            "minio-access-key and minio-secret-key of the transformation's status"
        )
        raise S3Error(msg, code="AccessDenied", status=403)
    if access != bucket:
        msg = (
            f"the access key {access!r} is not the key of bucket {bucket!r}; each "
            "transformation's status hands out the key that reads its own results"
        )
        raise S3Error(msg, code="InvalidAccessKeyId", status=403)
    _, secret = keys.s3_credentials(bucket)
    if not check(secret):
        msg = (
            f"the S3 signature of {request.method} {request.url.path} does not match; sign with "
            "the minio-secret-key of this transformation's status"
        )
        raise S3Error(msg, code="SignatureDoesNotMatch", status=403)


def _url(request: HttpRequest, query: list[tuple[str, str]] | None = None) -> str:
    """The URL as the client signed it: raw (percent-encoded) path, the query as sent."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    host = request.headers.get("host", "")
    text = request.scope.get("query_string", b"").decode() if query is None else urlencode(query)
    return f"{request.url.scheme}://{host}{raw.decode()}" + (f"?{text}" if text else "")


def _v4_header(request: HttpRequest, header: str) -> tuple[str, Callable[[str], bool]]:
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    fields = dict(
        part.strip().split("=", 1) for part in header[len(_V4) :].split(",") if "=" in part
    )
    try:
        access, date, region, service, _ = fields["Credential"].split("/")
        signed = fields["SignedHeaders"].split(";")
        signature = fields["Signature"]
        stamp = request.headers["x-amz-date"]
    except (KeyError, ValueError) as err:
        msg = f"malformed AWS SigV4 Authorization header ({err}); sign with botocore/aioboto3"
        raise S3Error(msg, code="AuthorizationHeaderMalformed", status=400) from err
    _check_date(stamp, date)

    def check(secret: str) -> bool:
        headers = {name: request.headers.get(name, "") for name in signed}
        aws = AWSRequest(method=request.method, url=_url(request), headers=headers)
        aws.context["timestamp"] = stamp
        signer = S3SigV4Auth(Credentials(access, secret), service, region)
        expected = signer.signature(signer.string_to_sign(aws, signer.canonical_request(aws)), aws)
        return hmac.compare_digest(expected, signature)

    return access, check


def _v4_query(
    request: HttpRequest, query: list[tuple[str, str]]
) -> tuple[str, Callable[[str], bool]]:
    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    params = dict(query)
    try:
        access, date, region, service, _ = params["X-Amz-Credential"].split("/")
        stamp = params["X-Amz-Date"]
        expires = int(params["X-Amz-Expires"])
        signed = params["X-Amz-SignedHeaders"].split(";")
        signature = params["X-Amz-Signature"]
        start = dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    except (KeyError, ValueError) as err:
        msg = f"malformed presigned URL ({err}); presign it with botocore/aioboto3"
        raise S3Error(msg, code="AuthorizationQueryParametersError", status=400) from err
    if stamp[:8] != date:
        msg = f"the presigned URL's date {stamp} is not its credential's date {date}"
        raise S3Error(msg, code="AccessDenied", status=403)
    if time.time() > start.timestamp() + expires:
        msg = "the presigned URL expired; ask the servicex client for a new one"
        raise S3Error(msg, code="AccessDenied", status=403)

    def check(secret: str) -> bool:
        rest = [(k, v) for k, v in query if k != "X-Amz-Signature"]
        headers = {name: request.headers.get(name, "") for name in signed}
        aws = AWSRequest(method=request.method, url=_url(request, rest), headers=headers)
        aws.context["timestamp"] = stamp
        signer = S3SigV4QueryAuth(Credentials(access, secret), service, region, expires=expires)
        canonical = signer.canonical_request(aws)
        expected = signer.signature(signer.string_to_sign(aws, canonical), aws)
        return hmac.compare_digest(expected, signature)

    return access, check


def _v2_query(
    request: HttpRequest, query: list[tuple[str, str]]
) -> tuple[str, Callable[[str], bool]]:
    """A presigned URL as boto3's ``generate_presigned_url`` makes it (query-string auth)."""
    from urllib.parse import urlsplit

    from botocore.auth import HmacV1QueryAuth
    from botocore.awsrequest import HTTPHeaders
    from botocore.credentials import Credentials

    params = dict(query)
    try:
        expires = int(params["Expires"])
    except (KeyError, ValueError) as err:
        msg = f"the presigned URL has no valid Expires ({err}); presign it with boto3"
        raise S3Error(msg, code="AuthorizationQueryParametersError", status=400) from err
    if time.time() > expires:
        msg = "the presigned URL expired; ask the servicex client for a new one"
        raise S3Error(msg, code="AccessDenied", status=403)
    rest = [(k, v) for k, v in query if k not in ("AWSAccessKeyId", "Signature", "Expires")]

    def check(secret: str) -> bool:
        signer = HmacV1QueryAuth(Credentials(params["AWSAccessKeyId"], secret))
        signer._get_date = lambda: str(expires)  # the URL's date: the Expires it carries
        split = urlsplit(_url(request, rest))
        # botocore signs the bucket's path ("auth path"), without the endpoint's /s3
        path = split.path.removeprefix(PREFIX)
        expected = signer.get_signature(request.method, split, HTTPHeaders(), auth_path=path)
        return hmac.compare_digest(expected, params["Signature"])

    return params["AWSAccessKeyId"], check


def _check_date(stamp: str, date: str) -> None:
    try:
        when = dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    except ValueError as err:
        msg = f"x-amz-date {stamp!r} is not a date like 20261130T085440Z"
        raise S3Error(msg, code="AccessDenied", status=403) from err
    if stamp[:8] != date or abs(time.time() - when.timestamp()) > MAX_SKEW_S:
        msg = (
            f"the S3 request's date {stamp} is more than {MAX_SKEW_S // 60} minutes from the "
            "service's clock (or not the credential's date); check the client's clock"
        )
        raise S3Error(msg, code="RequestTimeTooSkewed", status=403)


# ---------------------------------------------------------------------------
# the objects of a bucket


def _objects(request: HttpRequest, bucket: str) -> list[_Object] | None:
    """The parts of request ``bucket``'s complete result; ``None`` while it is not complete.

    Raises:
        S3Error: no such request (``NoSuchBucket``).
    """
    from columnhub.service.app import _complete_samples

    app = request.app
    try:
        view = app.state.db.get(bucket)
    except RequestNotFoundError as err:
        msg = f"no bucket {bucket!r}: no transformation has that request id"
        raise S3Error(msg, code="NoSuchBucket", status=404) from err
    if view.status != "complete":
        return None
    manifests = _complete_samples(app.state.config, view)
    out = []
    for sample, manifest in manifests.items():
        folder = Path(manifest["path"])
        for part in manifest.get("parts", []):
            key = object_key(sample, part["name"])
            path = folder / part["name"]
            stat = path.stat()
            out.append(
                _Object(
                    key=key,
                    path=path,
                    size=int(stat.st_size),
                    etag=f'"{part.get("xxh3") or int(stat.st_mtime_ns)}"',
                    modified=dt.datetime.fromtimestamp(stat.st_mtime, tz=dt.UTC),
                )
            )
    return out


def object_key(sample: str, name: str) -> str:
    """The object key of a result part: its name, after its sample's (``Events_part-00000.parquet``).

    Flat (no ``/``): the servicex client saves each object under its key in one folder.
    """
    return f"{sample}_{name}" if sample else name


def _http_date(when: dt.datetime) -> str:
    return when.strftime("%a, %d %b %Y %H:%M:%S GMT")


# ---------------------------------------------------------------------------
# routes


@router.api_route("/{bucket}", methods=["HEAD"])
def head_bucket(request: HttpRequest, bucket: str) -> Response:
    """HeadBucket: 200 when the transformation exists."""
    _authorize(request, bucket)
    _objects(request, bucket)
    return Response(status_code=200)


@router.get("/{bucket}")
def list_objects(request: HttpRequest, bucket: str) -> Response:
    """ListObjectsV2 (also answers a V1 listing the same way, without tokens)."""
    _authorize(request, bucket)
    params = dict(parse_qsl(request.scope.get("query_string", b"").decode()))
    prefix = params.get("prefix", "")
    try:
        max_keys = int(params.get("max-keys", "1000"))
    except ValueError as err:
        msg = f"max-keys {params['max-keys']!r} is not a whole number"
        raise S3Error(msg, code="InvalidArgument", status=400) from err
    max_keys = max(0, min(max_keys, 1000))
    after = params.get("start-after", "")
    token = params.get("continuation-token")
    if token:
        try:
            after = max(after, base64.urlsafe_b64decode(token.encode()).decode())
        except (binascii.Error, UnicodeDecodeError) as err:
            msg = f"continuation-token {token!r} is not one this service gave"
            raise S3Error(msg, code="InvalidArgument", status=400) from err
    objects = sorted(_objects(request, bucket) or [], key=lambda o: o.key)
    chosen = [o for o in objects if o.key.startswith(prefix) and o.key > after]
    page, truncated = chosen[:max_keys], len(chosen) > max_keys
    url = params.get("encoding-type") == "url"

    def name(key: str) -> str:
        return escape(quote(key, safe="/") if url else key)

    contents = "".join(
        f"<Contents><Key>{name(o.key)}</Key>"
        f"<LastModified>{o.modified.strftime('%Y-%m-%dT%H:%M:%S.000Z')}</LastModified>"
        f"<ETag>{escape(o.etag)}</ETag><Size>{o.size}</Size>"
        "<StorageClass>STANDARD</StorageClass></Contents>"
        for o in page
    )
    extra = ""
    if token:
        extra += f"<ContinuationToken>{escape(token)}</ContinuationToken>"
    if truncated:
        following = base64.urlsafe_b64encode(page[-1].key.encode()).decode()
        extra += f"<NextContinuationToken>{following}</NextContinuationToken>"
    if url:
        extra += "<EncodingType>url</EncodingType>"
    if "start-after" in params:
        extra += f"<StartAfter>{name(params['start-after'])}</StartAfter>"
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<ListBucketResult xmlns="{_XMLNS}"><Name>{escape(bucket)}</Name>'
        f"<Prefix>{name(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount>"
        f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{'true' if truncated else 'false'}"
        f"</IsTruncated>{extra}{contents}</ListBucketResult>"
    )
    return Response(body, media_type="application/xml")


@router.api_route("/{bucket}/{key:path}", methods=["GET", "HEAD"])
def get_object(request: HttpRequest, bucket: str, key: str) -> Response:
    """GetObject / HeadObject of a result part (HTTP Range: 206, 416)."""
    _authorize(request, bucket)
    objects = _objects(request, bucket)
    found = {o.key: o for o in objects or []}.get(unquote(key))
    if found is None:
        why = (
            "the transformation is not complete yet"
            if objects is None
            else f"its objects are: {', '.join(sorted(o.key for o in objects or [])) or 'none'}"
        )
        msg = f"bucket {bucket!r} has no object {key!r} ({why})"
        raise S3Error(msg, code="NoSuchKey", status=404)
    return FileResponse(
        found.path,
        media_type="application/octet-stream",
        headers={"etag": found.etag, "last-modified": _http_date(found.modified)},
    )
