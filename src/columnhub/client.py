"""The Python client of the columnhub service: :class:`Client`.

A :class:`Client` talks to ``columnhub serve`` over HTTP (httpx) and gives
back what :func:`columnhub.deliver` gives embedded: a
:class:`~columnhub.Result` (or ``{sample: Result}``) whose files lie in a
local directory, downloaded in parallel and verified against the manifest.

Errors come back as the same classes the service raised: the ``type`` of the
HTTP error body names the class in :mod:`columnhub.errors` (a bad spec is a
:class:`~columnhub.errors.SpecError` here too). A service that cannot be
reached, or that answers with a server error, is a
:class:`~columnhub.errors.ServiceUnavailableError` naming its URL. Connection
errors and 502/503/504 answers are retried with a short backoff; a submission
is never retried once it may have reached the service (it could be
submitted twice).

Where the client finds its settings, first found wins, each on its own:

1. the ``url`` and ``token`` arguments;
2. ``$COLUMNHUB_URL`` and ``$COLUMNHUB_TOKEN``;
3. ``url:`` and ``token:`` in ``$XDG_CONFIG_HOME/columnhub/config.yaml``
   (default ``~/.config/columnhub/config.yaml``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

from columnhub import errors as _errors
from columnhub._extras import require
from columnhub.errors import (
    AuthError,
    ColumnhubError,
    OutputError,
    PermissionDeniedError,
    QuotaExceededError,
    RequestNotFoundError,
    SampleError,
    ServiceError,
    ServiceUnavailableError,
    SpecError,
)
from columnhub.output.manifest import MANIFEST, read_manifest, write_manifest
from columnhub.result import Result

if TYPE_CHECKING:
    import httpx

    from columnhub.spec import Request, Samples

__all__ = ["Client", "ClientSettings", "client_settings", "config_path"]

#: ``callable(done, total)``: events (or parts, while the event count is unknown)
Progress = Callable[[int, int], None]

#: request states after which nothing changes any more
TERMINAL = frozenset({"complete", "failed", "cancelled"})
#: answers of a proxy or a service that is starting or overloaded: worth another try
_RETRY_STATUS = frozenset({502, 503, 504})
#: the HTTP status of an error body without a known ``type``
_BY_STATUS: dict[int, type[ServiceError]] = {
    401: AuthError,
    403: PermissionDeniedError,
    404: RequestNotFoundError,
    429: QuotaExceededError,
}
_API = "/api/v1"
_MANIFEST_WRITE = threading.Lock()
_BLOCK = 1 << 20  # download block size


def _httpx() -> ModuleType:
    return require("httpx", what="columnhub.Client")


# ---------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class ClientSettings:
    """Where the service is and how to sign in (see :func:`client_settings`).

    Attributes:
        url: the service's base URL (``http://host:port``, maybe with a path prefix).
        token: the bearer token, or ``None`` (a service without auth).
        url_from: where the URL came from (``argument``, ``$COLUMNHUB_URL`` or the file).
        token_from: where the token came from, or ``None``.
    """

    url: str
    token: str | None
    url_from: str
    token_from: str | None


def config_path() -> Path:
    """The client's config file: ``$XDG_CONFIG_HOME/columnhub/config.yaml``.

    ``XDG_CONFIG_HOME`` defaults to ``~/.config`` (also when it is set to a
    relative path, as the XDG specification says).
    """
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "columnhub" / "config.yaml"


def _read_config(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    from columnhub import _yaml

    try:
        data = _yaml.load(path.read_text())
    except (OSError, _yaml.YAMLError) as err:
        msg = f"the columnhub client config {path} cannot be read ({err}); fix or remove it"
        raise SpecError(msg) from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        msg = (
            f"the columnhub client config {path} must be a mapping with 'url' and 'token', "
            f"got a {type(data).__name__}"
        )
        raise SpecError(msg)
    unknown = sorted(str(k) for k in set(data) - {"url", "token"})
    if unknown:
        msg = (
            f"the columnhub client config {path} has unknown keys {unknown}; "
            "only 'url' and 'token' are allowed"
        )
        raise SpecError(msg)
    for key, value in data.items():
        if value is not None and not isinstance(value, str):
            msg = f"{key!r} in {path} must be text, got {value!r}"
            raise SpecError(msg)
    return {k: v for k, v in data.items() if v}


def client_settings(url: str | None = None, token: str | None = None) -> ClientSettings:
    """The URL and token to use: the arguments, else the environment, else the config file.

    Each of the two is looked up on its own (a URL from ``$COLUMNHUB_URL``
    goes with a token from the config file).

    Raises:
        SpecError: no URL anywhere, a URL that is not ``http(s)://``, or a
            config file that is not ``{url, token}``.
    """
    path = config_path()
    found_url, url_from = url, "argument"
    if not found_url and os.environ.get("COLUMNHUB_URL"):
        found_url, url_from = os.environ["COLUMNHUB_URL"], "$COLUMNHUB_URL"
    found_token, token_from = token, "argument" if token else None
    if not found_token and os.environ.get("COLUMNHUB_TOKEN"):
        found_token, token_from = os.environ["COLUMNHUB_TOKEN"], "$COLUMNHUB_TOKEN"
    if not found_url or not found_token:
        config = _read_config(path)
        if not found_url and config.get("url"):
            found_url, url_from = config["url"], str(path)
        if not found_token and config.get("token"):
            found_token, token_from = config["token"], str(path)
    if not found_url:
        msg = (
            "no columnhub service URL: pass url= (CLI: --url), set $COLUMNHUB_URL, "
            f"or write 'url: http://host:port' into {path}"
        )
        raise SpecError(msg)
    found_url = found_url.strip()
    scheme = found_url.split("://", 1)[0].lower() if "://" in found_url else ""
    if scheme not in ("http", "https"):
        msg = (
            f"service URL {found_url!r} (from {url_from}) is not an http:// or https:// URL; "
            "give it as http://host:port"
        )
        raise SpecError(msg)
    return ClientSettings(found_url.rstrip("/"), found_token or None, url_from, token_from)


# ---------------------------------------------------------------------------
# an async transport (httpx.ASGITransport) driven from this synchronous client


class _AsyncTransportThread:
    """Runs an ``httpx.AsyncBaseTransport`` on an event loop in a thread of its own.

    ``Client(url, transport=httpx.ASGITransport(app))`` then calls an ASGI
    app in this process, as the service is tested; bodies are read whole.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self._transport = transport
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="columnhub-client-transport", daemon=True
        )
        self._thread.start()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        hx = _httpx()

        async def call() -> tuple[int, list[tuple[bytes, bytes]], bytes, dict[str, Any]]:
            response = await self._transport.handle_async_request(request)
            try:
                body = b"".join([part async for part in response.aiter_raw()])
            finally:
                await response.aclose()
            return response.status_code, response.headers.raw, body, dict(response.extensions)

        status, headers, body, extensions = asyncio.run_coroutine_threadsafe(
            call(), self._loop
        ).result()
        return hx.Response(  # type: ignore[no-any-return]
            status, headers=headers, content=body, extensions=extensions, request=request
        )

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._transport.aclose(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _sync_transport(transport: Any) -> Any:
    """``transport`` as an ``httpx.BaseTransport`` (an async one runs in a thread)."""
    module = _httpx()
    if transport is None or isinstance(transport, module.BaseTransport):
        return transport
    if isinstance(transport, module.AsyncBaseTransport):
        inner = _AsyncTransportThread(transport)

        class _Sync(module.BaseTransport):  # type: ignore[misc,name-defined]
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                return inner.handle_request(request)

            def close(self) -> None:
                inner.close()

        return _Sync()
    msg = (
        f"transport={transport!r} is not an httpx transport; give an httpx.BaseTransport "
        "or httpx.AsyncBaseTransport (httpx.ASGITransport(app) for an app in this process)"
    )
    raise SpecError(msg)


# ---------------------------------------------------------------------------
# the client


class Client:
    """A connection to a columnhub service.

    >>> client = Client("http://127.0.0.1:8000", token="s3cret")  # doctest: +SKIP
    >>> result = client.deliver("request.yaml", output="out")  # doctest: +SKIP

    Args:
        url: the service's base URL; default ``$COLUMNHUB_URL``, else ``url:``
            in the config file (:func:`config_path`).
        token: the bearer token; default ``$COLUMNHUB_TOKEN``, else ``token:``
            in the config file; none for a service without auth.
        timeout: seconds to wait for the service at each call (connect, each
            read); a download may take longer in total, never silent longer.
        retries: further tries of a call after a connection error or a
            502/503/504 answer (backoff 0.1 s, 0.2 s, 0.4 s, ... up to 2 s).
        patience: seconds :meth:`wait` keeps asking a service that cannot be
            reached (restarting, or a replica replaced) before it gives up.
        transport: an httpx transport to use instead of the network, e.g.
            ``httpx.ASGITransport(app)`` to call a service app in this
            process, or ``httpx.MockTransport``.

    Raises:
        SpecError: no URL is configured, or it is not ``http(s)://``.
        MissingDependencyError: httpx is not installed
            (``pip install 'columnhub[service]'``).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        patience: float = 120.0,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        hx = _httpx()
        settings = client_settings(url, token)
        if retries < 0:
            msg = f"retries={retries}: give 0 or more"
            raise SpecError(msg)
        if not timeout or timeout <= 0:
            msg = f"timeout={timeout}: give a number of seconds > 0"
            raise SpecError(msg)
        from columnhub import __version__

        self.url = settings.url
        self.settings = settings
        self.retries = retries
        self.patience = patience
        headers = {"User-Agent": f"columnhub/{__version__}", "Accept": "application/json"}
        if settings.token:
            headers["Authorization"] = f"Bearer {settings.token}"
        self._http = hx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            transport=_sync_transport(transport),
            follow_redirects=False,
        )

    # -- lifetime ------------------------------------------------------------------

    def close(self) -> None:
        """Close the connections (also done by ``with Client(...) as client:``)."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:  # never the token
        signed = "with a token" if self.settings.token else "without a token"
        return f"<columnhub.Client {self.url} {signed}>"

    # -- requests ------------------------------------------------------------------

    def submit(
        self,
        spec: Request | Samples | dict[str, Any] | str | os.PathLike[str],
        *,
        title: str | None = None,
    ) -> str:
        """Submit a request; returns its id at once (the work runs on the service).

        Args:
            spec: a :class:`~columnhub.Request`, :class:`~columnhub.Samples`, a
                dictionary or the path of a YAML/JSON spec, as for
                :func:`columnhub.deliver`. It is validated here first. Relative
                paths are made absolute (a spec file's relative to its folder,
                others to this process's working directory): the service reads
                the files where this machine sees them, on a shared file system.
                ``output.directory`` is not sent: the service chooses where its
                results go, and :meth:`deliver` downloads them there.
            title: a title shown in status listings and the dashboard.

        Raises:
            SpecError: the spec is invalid (here, or on the service).
            PermissionDeniedError: a file is outside the service's data roots,
                or the token lacks the ``submit`` scope.
            QuotaExceededError: too many requests at once, or too many bytes stored.
        """
        _, body = _spec_body(spec)
        params = {"title": title} if title is not None else None
        # a submission that may have reached the service is never sent again
        answer = self._call("POST", "/requests", json=body, params=params, idempotent=False)
        return str(answer["id"])

    def status(self, request_id: str) -> dict[str, Any]:
        """The status of a request: ``status``, ``progress``, ``samples``, ``error``, ...

        Raises:
            RequestNotFoundError: no such request for this user.
        """
        return dict(self._call("GET", f"/requests/{_quote(request_id)}"))

    def requests(
        self, *, state: str | None = None, all_users: bool = False
    ) -> list[dict[str, Any]]:
        """This user's requests, newest first (every page).

        Args:
            state: only requests in this state (``queued``, ``running``,
                ``complete``, ``failed``, ``cancelled``).
            all_users: every user's requests (needs the ``admin`` scope).
        """
        if state is not None and state not in TERMINAL | {"queued", "running"}:
            msg = (
                f"state={state!r} is not a request state; give one of queued, running, "
                "complete, failed, cancelled"
            )
            raise SpecError(msg)
        found: list[dict[str, Any]] = []
        page = 1
        while True:
            params: dict[str, Any] = {"page": page, "per_page": 100}
            if state is not None:
                params["state"] = state
            if all_users:
                params["all"] = "true"
            answer = self._call("GET", "/requests", params=params)
            batch = list(answer.get("requests", []))
            found += batch
            if not batch or len(found) >= int(answer.get("total", 0)):
                return found
            page += 1

    def wait(
        self,
        request_id: str,
        *,
        progress: bool | Progress | None = None,
        poll: float = 0.5,
    ) -> dict[str, Any]:
        """Wait until a request is complete; returns its final status.

        Args:
            request_id: the id :meth:`submit` returned.
            progress: ``True`` for a progress bar (``tqdm.auto``: a widget in
                Jupyter), ``None`` for a bar only when stderr is a terminal,
                ``False`` for none, or a ``callable(done, total)`` called as
                events (parts while the event count is not known yet) are done.
            poll: seconds between two status calls (the first ones come sooner:
                20 ms, 40 ms, ... up to ``poll``).

        Raises:
            ServiceUnavailableError: the service could not be reached for
                longer than ``patience`` seconds.
            ColumnhubError: the request failed: the error the service reported,
                as its own class (a :class:`~columnhub.errors.SampleError`
                naming each failed sample for several samples).
            ServiceError: the request was cancelled.
        """
        final = self._wait(request_id, progress=progress, poll=poll)
        _raise_for(final)
        return final

    def cancel(self, request_id: str) -> dict[str, Any]:
        """Cancel a request: its work stops unless another request shares it.

        Returns:
            The status, ``cancelled``.
        """
        return dict(self._call("DELETE", f"/requests/{_quote(request_id)}"))

    def manifest(self, request_id: str) -> dict[str, Any]:
        """The manifest of a complete request (with ``path``, the result on the service's disk).

        Several samples: ``{"samples": {name: manifest}}``.
        """
        return dict(self._call("GET", f"/requests/{_quote(request_id)}/manifest"))

    # -- results -------------------------------------------------------------------

    def fetch(
        self,
        request_id: str,
        directory: str | os.PathLike[str],
        *,
        parallel: int = 4,
        progress: bool | Progress | None = None,
    ) -> Result | dict[str, Result]:
        """Download a complete request's result into ``directory``; the local :class:`Result`.

        Files are downloaded ``parallel`` at a time, each to a partial file
        renamed once the whole file's size and xxh3 checksum match the
        manifest; the manifest is written last, so the directory holds a
        result only when every file is there. A file already there with the
        manifest's size and checksum is not downloaded again, and a transfer
        that was cut off resumes with an HTTP range (an interrupted fetch resumes).
        Several samples go to ``directory/<sample>/``, as
        :func:`columnhub.deliver` writes them.

        Args:
            request_id: the request.
            directory: the local directory (made if missing).
            parallel: downloads at once.
            progress: a bar of bytes (as for :meth:`wait`), or ``callable(done, total)``.

        Raises:
            ServiceError: the request is not complete, or a downloaded file does
                not match its manifest (nothing wrong is kept; fetch again).
            OutputError: ``directory`` holds something that is not a columnhub result.
        """
        if parallel < 1:
            msg = f"parallel={parallel}: give 1 or more downloads at once"
            raise SpecError(msg)
        answer = self.manifest(request_id)
        where = Path(directory)
        base = f"/requests/{_quote(request_id)}/files"
        if _is_multi(answer):
            samples = answer["samples"]
            if not isinstance(samples, Mapping):
                raise _bad_answer(self.url, "a manifest's 'samples' is not a mapping")
            folders = {
                _safe_name(name, what="sample"): (where / name, manifest, f"{base}/{_quote(name)}")
                for name, manifest in samples.items()
            }
        else:
            folders = {"": (where, answer, base)}
        self._download_all(request_id, folders, parallel=parallel, progress=progress)
        if _is_multi(answer):
            return {name: Result.open(folder) for name, (folder, _, _) in folders.items()}
        return Result.open(where)

    def open(self, request_id: str) -> Result | dict[str, Result]:
        """A complete request's result where the service keeps it (a shared file system).

        Nothing is downloaded: the :class:`Result` reads the service's own
        folder (``path`` in the manifest), which this machine must see, e.g.
        a facility's shared file system. Use :meth:`fetch` otherwise.

        Raises:
            ServiceError: the request is not complete, or its folder is not
                visible here (or holds another result than the service's manifest).
        """
        answer = self.manifest(request_id)
        if _is_multi(answer):
            return {
                _safe_name(name, what="sample"): _shared_result(request_id, manifest)
                for name, manifest in answer["samples"].items()
            }
        return _shared_result(request_id, answer)

    def urls(self, request_id: str, *, sample: str | None = None) -> list[str]:
        """The HTTP URLs of a complete request's files, to read remotely (nothing downloaded).

        Readers that speak fsspec open them lazily with HTTP range requests;
        pass :attr:`storage_options` for the token::

            urls = client.urls(request_id)
            events = ak.from_parquet(urls, storage_options=client.storage_options)

        (fsspec's HTTP file system needs ``aiohttp``: ``pip install 'columnhub[http]'``.)

        Args:
            request_id: the request.
            sample: the sample, for a request of several samples (required then).

        Raises:
            ServiceError: the request is not complete.
            RequestNotFoundError: no such sample in the request.
        """
        answer = self.manifest(request_id)
        base = f"{self.url}{_API}/requests/{_quote(request_id)}/files"
        if _is_multi(answer):
            samples = answer["samples"]
            if sample is None or sample not in samples:
                msg = (
                    f"request {request_id} has the samples {', '.join(samples)}; "
                    f"give one of them as sample= (got {sample!r})"
                )
                raise RequestNotFoundError(msg)
            manifest, base = samples[sample], f"{base}/{_quote(sample)}"
        else:
            if sample is not None:
                msg = f"request {request_id} has one sample; leave out sample={sample!r}"
                raise RequestNotFoundError(msg)
            manifest = answer
        local = _local_manifest(self.url, request_id, manifest)
        return [f"{base}/{_quote(name)}" for name in local["files"]]

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options that send this client's token (for :meth:`urls`)."""
        token = self.settings.token
        return {"headers": {"Authorization": f"Bearer {token}"}} if token else {}

    def deliver(
        self,
        spec: Request | Samples | dict[str, Any] | str | os.PathLike[str],
        *,
        output: str | os.PathLike[str] | None = None,
        progress: bool | Progress | None = None,
        title: str | None = None,
        parallel: int = 4,
        poll: float = 0.5,
    ) -> Result | dict[str, Result]:
        """Deliver a request through the service: submit, wait, fetch; as :func:`columnhub.deliver`.

        Args:
            spec: the request (see :meth:`submit`).
            output: the local directory (several samples: ``output/<sample>/``);
                default the spec's ``output.directory``, else
                ``<cache>/fetched/<request hash>`` in the local columnhub cache
                folder (``$COLUMNHUB_CACHE`` or ``~/.cache/columnhub``).
            progress: as for :meth:`wait`.
            title: as for :meth:`submit`.
            parallel: downloads at once.
            poll: seconds between two status calls.

        Returns:
            The :class:`Result`, or ``{sample: Result}`` for several samples;
            each opens with :meth:`Result.open` from its directory.

        Raises:
            ColumnhubError: the error the service reported, as its own class.
            SampleError: some samples failed (``.errors``); the others are
                downloaded (``.results``).
        """
        loaded, body = _spec_body(spec)
        directory = Path(output) if output is not None else _default_output(loaded)
        request_id = self._call(
            "POST",
            "/requests",
            json=body,
            params={"title": title} if title is not None else None,
            idempotent=False,
        )["id"]
        final = self._wait(str(request_id), progress=progress, poll=poll)
        bar = False if progress is False or callable(progress) else progress  # bytes: a bar only
        samples = final.get("samples") or {}
        multi = any(name != "" for name in samples)
        if not multi or final.get("status") == "cancelled":
            _raise_for(final)
            return self.fetch(str(request_id), directory, parallel=parallel, progress=bar)
        failed = {
            name: _sample_error(name, info)
            for name, info in samples.items()
            if info.get("status") != "complete"
        }
        if not failed:
            return self.fetch(str(request_id), directory, parallel=parallel, progress=bar)
        results: dict[str, Result] = {}
        if len(failed) < len(samples):  # the samples that were delivered still are
            try:
                answer = self.manifest(str(request_id))
            except ServiceError:  # the service gives no partial manifest: the errors stand
                answer = {}
            done = {
                n: m
                for n, m in (answer.get("samples") or {}).items()
                if n not in failed and isinstance(m, Mapping) and m.get("complete")
            }
            base = f"/requests/{_quote(str(request_id))}/files"
            folders = {
                _safe_name(n, what="sample"): (directory / n, m, f"{base}/{_quote(n)}")
                for n, m in done.items()
            }
            self._download_all(str(request_id), folders, parallel=parallel, progress=bar)
            results = {n: Result.open(directory / n) for n in folders}
        msg = (
            f"{len(failed)} of {len(samples)} samples of request {request_id} failed: "
            + "; ".join(f"{name}: {err}" for name, err in failed.items())
        )
        raise SampleError(msg, errors=dict(failed), results=results)

    # -- internals -----------------------------------------------------------------

    def _wait(
        self, request_id: str, *, progress: bool | Progress | None, poll: float
    ) -> dict[str, Any]:
        if poll <= 0:
            msg = f"poll={poll}: give the seconds between two status calls (> 0)"
            raise SpecError(msg)
        report = _Reporter(progress)
        down_since: float | None = None
        polls = 0
        try:
            while True:
                try:
                    state = self.status(request_id)
                except ServiceUnavailableError:
                    # a restart (or a replica going away): the request is resumed there,
                    # so keep asking, for a while
                    now = time.monotonic()
                    down_since = now if down_since is None else down_since
                    if now - down_since > self.patience:
                        raise
                    time.sleep(max(poll, 1.0))
                    continue
                down_since = None
                report(state)
                if _finished(state):
                    return state
                # soon at first (a known result is answered in milliseconds), then every `poll`
                time.sleep(min(poll, 0.02 * 2**polls))
                polls += 1
        finally:
            report.close()

    def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        idempotent: bool = True,
    ) -> dict[str, Any]:
        response = self._send(method, _API + path, json=json, params=params, idempotent=idempotent)
        try:
            data = response.json()
        except ValueError as err:
            msg = f"{method} {path}: the answer is not JSON ({response.text[:200]!r})"
            raise _bad_answer(self.url, msg) from err
        if not isinstance(data, dict):
            raise _bad_answer(self.url, f"{method} {path}: the answer is not a JSON object")
        return data

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        """One call, retried on connection errors and 502/503/504 answers; errors mapped."""
        hx = _httpx()
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, json=json, params=params)
            except hx.TransportError as err:
                # a submission is sent again only if it surely never arrived
                unsent = isinstance(err, hx.ConnectError | hx.ConnectTimeout)
                if last or not (idempotent or unsent):
                    raise self._unavailable(method, path, err, sent=not unsent) from err
                _backoff(attempt)
                continue
            if (
                response.status_code in _RETRY_STATUS
                and not last
                and (idempotent or response.status_code == 503)
            ):
                _backoff(attempt, response.headers.get("Retry-After"))
                continue
            if response.is_error:
                raise self._error(response)
            if response.is_redirect:  # never followed: the token would go along
                raise self._redirected(method, path, response.headers.get("Location"))
            return response  # type: ignore[no-any-return]
        raise AssertionError  # pragma: no cover (the loop returns or raises)

    def _unavailable(
        self, method: str, path: str, err: Exception, *, sent: bool
    ) -> ServiceUnavailableError:
        tries = self.retries + 1
        msg = (
            f"the columnhub service at {self.url} cannot be reached "
            f"({method} {path}: {type(err).__name__}: {err or 'no answer'}"
            + (f", {tries} tries" if tries > 1 else "")
            + "); check the URL (--url, $COLUMNHUB_URL) and that the service is running"
        )
        if method == "POST" and sent:
            msg += (
                "; the submission may have reached the service: look for it with "
                "`columnhub status` before submitting again"
            )
        return ServiceUnavailableError(msg)

    def _redirected(self, method: str, path: str, location: str | None) -> ServiceError:
        msg = (
            f"the columnhub service at {self.url} redirects {method} {path} to "
            f"{location or 'another address'}; give the service's own address as its URL "
            "(--url, $COLUMNHUB_URL), e.g. https:// instead of http://"
        )
        return ServiceError(msg)

    def _error(self, response: httpx.Response) -> ColumnhubError:
        return _error_from_response(response, url=self.url, signed=bool(self.settings.token))

    def _download_all(
        self,
        request_id: str,
        folders: dict[str, tuple[Path, Any, str]],
        *,
        parallel: int,
        progress: bool | Progress | None,
    ) -> None:
        """Download every missing file of every folder, then write each folder's manifest."""
        todo: list[tuple[Path, dict[str, Any], str]] = []
        manifests: dict[Path, dict[str, Any]] = {}
        for folder, manifest, base in folders.values():
            local = _local_manifest(self.url, request_id, manifest)
            needed = _prepare_folder(folder, local)
            manifests[folder] = local
            todo += [
                (folder / part["name"], part, f"{base}/{_quote(part['name'])}") for part in needed
            ]
        total = sum(  # what is still to come: partial files resume
            max(0, int(part["bytes"]) - _size(_partial_name(dest, str(part["xxh3"]))))
            for dest, part, _ in todo
        )
        report = _ByteReporter(progress, total=total)
        try:
            if todo:
                with ThreadPoolExecutor(
                    min(parallel, len(todo)), thread_name_prefix="columnhub-fetch"
                ) as pool:
                    futures: list[Future[None]] = [
                        pool.submit(self._download, request_id, dest, part, _API + path, report)
                        for dest, part, path in todo
                    ]
                    wait(futures, return_when=FIRST_EXCEPTION)
                    for future in futures:  # after the first failure, start no other
                        future.cancel()
                    for future in futures:
                        if not future.cancelled():
                            future.result()  # the first failure, raised as it is
        finally:
            report.close()
        for folder, local in manifests.items():  # last: a folder with a manifest is whole
            with _MANIFEST_WRITE:  # its temp name is per process: one thread at a time
                write_manifest(folder, local)

    def _download(
        self,
        request_id: str,
        dest: Path,
        part: dict[str, Any],
        path: str,
        report: _ByteReporter,
    ) -> None:
        """One file: into its partial file, verified whole, renamed into place.

        The partial file (``.<name>.<xxh3>.partial``, locked while written) is
        kept when a download is cut off, and the next try (a retry after a
        lost connection, or the next ``fetch``) asks only for the rest with an
        HTTP range. The whole file is verified against the manifest at the end:
        a mismatch is an error at once, and nothing of the file is kept.
        """
        hx = _httpx()
        expected_size, expected_hash = int(part["bytes"]), str(part["xxh3"])
        partial = _partial_name(dest, expected_hash)
        with _locked(partial) as out:
            if _is_complete(dest, expected_size, expected_hash):
                return  # another fetch into this folder brought it meanwhile
            for attempt in range(self.retries + 1):
                try:
                    size, digest = self._download_once(out, path, expected_size, report)
                except hx.TransportError as err:
                    if attempt == self.retries:
                        unavailable = self._unavailable("GET", path, err, sent=True)
                        raise unavailable from err
                    _backoff(attempt)
                    continue
                except _Retry as again:
                    if attempt == self.retries:
                        msg = (
                            f"the columnhub service at {self.url} answered {again.status} to "
                            f"GET {path} {self.retries + 1} times; try again later"
                        )
                        raise ServiceUnavailableError(msg) from again
                    _backoff(attempt, again.retry_after)
                    continue
                break
            if size != expected_size or digest != expected_hash:
                partial.unlink(missing_ok=True)
                msg = (
                    f"the download of {dest.name} (request {request_id}) does not match its "
                    f"manifest: expected {expected_size} bytes with xxh3 {expected_hash}, got "
                    f"{size} bytes with xxh3 {digest}; it was not kept. Fetch again; if it "
                    "happens again the result on the service is damaged: submit the request "
                    "again"
                )
                raise ServiceError(msg)
            os.replace(partial, dest)

    def _download_once(
        self, out: Any, path: str, expected_size: int, report: _ByteReporter
    ) -> tuple[int, str]:
        """GET ``path`` (the rest of it, after what ``out`` holds); the size and xxh3 of it all."""
        import xxhash

        digest = xxhash.xxh3_64()
        out.seek(0)
        have = 0
        while block := out.read(_BLOCK):  # what an earlier try brought
            digest.update(block)
            have += len(block)
        if have > expected_size:  # not the beginning of this file: start again
            out.seek(0)
            out.truncate()
            digest, have = xxhash.xxh3_64(), 0
        if have == expected_size:
            return have, digest.hexdigest()
        headers = {"Range": f"bytes={have}-"} if have else None
        with self._http.stream("GET", path, headers=headers) as response:
            if response.status_code in _RETRY_STATUS:
                response.read()
                raise _Retry(response.status_code, response.headers.get("Retry-After"))
            if response.status_code == 416:  # the range is wrong: the whole file next time
                response.read()
                out.seek(0)
                out.truncate()
                raise _Retry(416, None)
            if response.is_error:
                response.read()
                raise self._error(response)
            if response.is_redirect:
                redirected = self._redirected("GET", path, response.headers.get("Location"))
                raise redirected
            if have and not (
                response.status_code == 206
                and response.headers.get("Content-Range", "").startswith(f"bytes {have}-")
            ):  # the whole file came instead of the rest
                out.seek(0)
                out.truncate()
                digest, have = xxhash.xxh3_64(), 0
            out.seek(have)
            try:
                for block in response.iter_bytes():  # as it comes: a cut keeps it
                    out.write(block)
                    digest.update(block)
                    have += len(block)
                    report.add(len(block))
            finally:  # what came is kept for the next try
                out.flush()
                os.fsync(out.fileno())
        return have, digest.hexdigest()


class _Retry(Exception):  # a signal inside the client, never raised to users
    """A download answered 502/503/504: try again after a backoff."""

    def __init__(self, status: int, retry_after: str | None) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


def _partial_name(dest: Path, xxh3: str) -> Path:
    """Where ``dest`` is downloaded before it is verified (one per file content)."""
    return dest.with_name(f".{dest.name}.{xxh3}.partial")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[Any]:
    """``path`` opened for reading and writing, locked against other fetches into the folder.

    Waits while another process holds it; if that one renamed it into place
    meanwhile, a new partial file is opened (never the finished file).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): fetches into one folder must not overlap
        fcntl = None  # type: ignore[assignment]

    while True:
        out = open(path, "a+b")  # noqa: SIM115 (closed below)
        try:
            if fcntl is not None:
                fcntl.flock(out.fileno(), fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(out.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            out.close()
            raise
        out.close()  # renamed by the other fetch: open the name again
    try:
        yield out
    finally:
        with contextlib.suppress(OSError):  # nothing came: no empty partial file left
            if os.fstat(out.fileno()).st_size == 0 and (
                os.stat(path).st_ino == os.fstat(out.fileno()).st_ino
            ):
                path.unlink()
        out.close()  # the lock goes with it


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _is_complete(path: Path, size: int, xxh3: str) -> bool:
    """True when ``path`` has this size and checksum."""
    from columnhub._checksum import file_checksum

    try:
        return path.stat().st_size == size and file_checksum(path) == xxh3
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------
# helpers: specs


def _spec_body(
    spec: Request | Samples | dict[str, Any] | str | os.PathLike[str],
) -> tuple[Request | Samples, dict[str, Any]]:
    """The validated request and the JSON body to submit (absolute paths, no output directory)."""
    from columnhub.spec import Request, Samples, load_request, rebase_paths

    if isinstance(spec, dict):  # relative paths: to this process's working directory
        spec = rebase_paths(spec, os.getcwd())
    try:
        loaded = load_request(spec)
    except UnicodeDecodeError as err:  # a ROOT file given for its spec, say
        msg = f"request file {str(spec)!r} is not text ({err}); give a YAML or JSON spec"
        raise SpecError(msg) from err
    if isinstance(loaded, Request):
        body = _without_directory(rebase_paths(loaded.to_dict(), os.getcwd()))
    elif isinstance(loaded, Samples):
        body = {
            "samples": {
                name: _without_directory(rebase_paths(req.to_dict(), os.getcwd()))
                for name, req in loaded.requests().items()
            }
        }
    else:  # pragma: no cover (load_request returns one of the two)
        msg = f"cannot submit a {type(loaded).__name__}"
        raise SpecError(msg)
    return loaded, body


def _without_directory(data: dict[str, Any]) -> dict[str, Any]:
    output = data.get("output")
    if isinstance(output, dict) and "directory" in output:
        output = {k: v for k, v in output.items() if k != "directory"}
        data = (
            {**data, "output": output}
            if output
            else {k: v for k, v in data.items() if k != "output"}
        )
    return data


def _default_output(loaded: Request | Samples) -> Path:
    """Where :meth:`Client.deliver` puts a result when no ``output`` is given."""
    from columnhub.spec import Request

    if isinstance(loaded, Request):
        if loaded.output.directory:
            return Path(loaded.output.directory)
        key = loaded.hash
    else:
        blob = json.dumps({n: r.hash for n, r in loaded.requests().items()}, sort_keys=True)
        key = hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()
    root = os.environ.get("COLUMNHUB_CACHE", "")
    if not root or "://" in root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg if xdg else os.path.join(Path.home(), ".cache"), "columnhub")
    return Path(root) / "fetched" / key


# ---------------------------------------------------------------------------
# helpers: answers and errors


def _quote(value: str) -> str:
    """One path segment (an id or a name can never reach another route)."""
    return quote(str(value), safe="")


def _bad_answer(url: str, what: str) -> ServiceUnavailableError:
    msg = (
        f"the columnhub service at {url} answered what no columnhub service sends ({what}); "
        "check that the URL is the service's"
    )
    return ServiceUnavailableError(msg)


def _error_class(name: Any) -> type[ColumnhubError] | None:
    if not isinstance(name, str) or name not in _errors.__all__:
        return None
    cls = getattr(_errors, name)
    return cls if isinstance(cls, type) and issubclass(cls, ColumnhubError) else None


def _make_error(cls: type[ColumnhubError], message: str) -> ColumnhubError:
    if issubclass(cls, SampleError):
        return cls(message, errors={}, results={})
    try:
        return cls(message)
    except TypeError:  # a class that needs more than a message: its nearest plain base
        for base in cls.__mro__[1:]:
            if isinstance(base, type) and issubclass(base, ColumnhubError):
                with contextlib.suppress(TypeError):
                    return base(message)
        return ColumnhubError(message)


def _error_from_response(response: httpx.Response, *, url: str, signed: bool) -> ColumnhubError:
    """The exception of an HTTP error answer: the class its body names, else by status."""
    code = response.status_code
    info: Any = None
    with contextlib.suppress(ValueError):
        body = response.json()
        info = body.get("error") if isinstance(body, dict) else None
        if info is None and isinstance(body, dict) and "detail" in body:
            info = {"type": None, "message": body["detail"]}  # FastAPI's own answers
    name = info.get("type") if isinstance(info, dict) else None
    message = info.get("message") if isinstance(info, dict) else None
    if not isinstance(message, str):
        message = json.dumps(message) if message is not None else (response.text[:500] or "")
    cls = _error_class(name)
    if cls is None and code >= 500:  # a crash or a proxy: say who answered
        cls = ServiceUnavailableError
        message = (
            f"the columnhub service at {url} answered {code} "
            f"{response.reason_phrase}: {message or 'no message'}"
        )
    elif cls is None:
        cls = SpecError if code == 422 else _BY_STATUS.get(code, ServiceError)
    if not message:
        message = f"the columnhub service at {url} answered {code} {response.reason_phrase}"
    if cls is AuthError and not signed:
        message += (
            " (no token was given: pass token= or --token, set $COLUMNHUB_TOKEN, "
            f"or write 'token: ...' into {config_path()})"
        )
    return _make_error(cls, message)


def _finished(state: dict[str, Any]) -> bool:
    """True when nothing of the request will change any more (every sample ended)."""
    if state.get("status") == "cancelled":
        return True
    samples = state.get("samples") or {}
    if samples:
        return all(isinstance(s, Mapping) and s.get("status") in TERMINAL for s in samples.values())
    return state.get("status") in TERMINAL


def _sample_error(name: str, info: Mapping[str, Any]) -> ColumnhubError:
    status = info.get("status")
    error = info.get("error")
    if isinstance(error, Mapping) and error.get("message"):
        cls = _error_class(error.get("type")) or ServiceError
        return _make_error(cls, str(error["message"]))
    label = f"sample {name!r}" if name else "the request"
    return ServiceError(f"{label} ended {status} without a recorded error")


def _raise_for(state: dict[str, Any]) -> None:
    """Raise what a finished request's status reports, unless it is complete."""
    status = state.get("status")
    rid = state.get("id", "?")
    if status == "complete":
        return
    if status == "cancelled":
        msg = f"request {rid} was cancelled; submit it again to get its result"
        raise ServiceError(msg)
    samples = state.get("samples") or {}
    if any(name != "" for name in samples):
        failed = {
            name: _sample_error(name, info)
            for name, info in samples.items()
            if info.get("status") != "complete"
        }
        msg = f"{len(failed)} of {len(samples)} samples of request {rid} failed: " + "; ".join(
            f"{name}: {err}" for name, err in failed.items()
        )
        raise SampleError(msg, errors=dict(failed), results={})
    error = state.get("error")
    if isinstance(error, Mapping) and error.get("message"):
        cls = _error_class(error.get("type")) or ServiceError
        raise _make_error(cls, str(error["message"]))
    if samples:
        name, first = next(iter(samples.items()))
        raise _sample_error(name, first)
    msg = f"request {rid} ended {status} without a recorded error"
    raise ServiceError(msg)


# ---------------------------------------------------------------------------
# helpers: local results


def _is_multi(answer: Mapping[str, Any]) -> bool:
    return "samples" in answer and "files" not in answer


def _safe_name(name: Any, *, what: str) -> str:
    """A name the service gave, checked to stay inside the local directory."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
    ):
        msg = f"the service named a {what} {name!r}, which is not a plain file name"
        raise ServiceError(msg)
    return name


def _local_manifest(url: str, request_id: str, manifest: Any) -> dict[str, Any]:
    """The manifest to write locally (the service's, without its ``path``), checked."""
    if not isinstance(manifest, Mapping):
        raise _bad_answer(url, f"the manifest of request {request_id} is not an object")
    if not manifest.get("complete"):
        msg = (
            f"request {request_id} has no complete result to fetch "
            f"({manifest.get('error') or 'the service marks it incomplete'}); "
            "wait for it (`columnhub status`) or submit it again"
        )
        raise ServiceError(msg)
    parts = manifest.get("parts")
    if not isinstance(parts, list) or [p.get("name") for p in parts] != manifest.get("files"):
        raise _bad_answer(url, f"the manifest of request {request_id} lists no parts")
    for part in parts:
        _safe_name(part.get("name"), what="file")
        if not isinstance(part.get("bytes"), int) or not isinstance(part.get("xxh3"), str):
            raise _bad_answer(url, f"part {part.get('name')!r} has no size and checksum")
    return {k: v for k, v in manifest.items() if k != "path"}


def _shared_result(request_id: str, manifest: Mapping[str, Any]) -> Result:
    """The result in the service's folder, if this machine sees that very result there."""
    path = Path(str(manifest.get("path", "")))
    expected = {k: v for k, v in manifest.items() if k != "path"}
    try:
        found = read_manifest(path) if manifest.get("path") and path.is_dir() else None
    except (OSError, OutputError):
        found = None
    if found != expected or not expected.get("complete"):
        msg = (
            f"the result of request {request_id} is not readable here: the service keeps it in "
            f"{str(path)!r}, which this machine does not see (or not as the service does); "
            "download it with fetch (`columnhub fetch ID -o DIR`)"
        )
        raise ServiceError(msg)
    return Result(path, expected)


def _prepare_folder(folder: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Make ``folder`` ready for ``manifest``'s files; the parts still to download.

    A different result already there stops looking complete first (its
    manifest is removed) and loses the files the new one does not list; a file
    with the manifest's size and checksum stays.
    """
    from columnhub._checksum import file_checksum

    if folder.exists() and not folder.is_dir():
        msg = f"{folder} is a file, not a directory; choose another output directory"
        raise OutputError(msg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        previous = read_manifest(folder)
    except OSError as err:
        msg = f"cannot make the output directory {folder}: {err}"
        raise OutputError(msg) from err
    if previous is None and any(
        p.name != MANIFEST and not p.name.startswith(".") and p.name not in manifest["files"]
        for p in folder.iterdir()
    ):
        msg = (
            f"{folder} holds files that are not a columnhub result; fetch into an empty "
            "directory (or one holding an earlier result)"
        )
        raise OutputError(msg)
    if previous is not None and previous != manifest:
        (folder / MANIFEST).unlink(missing_ok=True)  # now the folder holds no complete result
        keep = set(manifest["files"])
        for name in previous.get("files", []):
            if isinstance(name, str) and name not in keep and "/" not in name:
                (folder / name).unlink(missing_ok=True)
    needed = []
    for part in manifest["parts"]:
        path = folder / part["name"]
        try:
            same = path.stat().st_size == part["bytes"] and file_checksum(path) == part["xxh3"]
        except FileNotFoundError:
            same = False
        if not same:
            needed.append(part)
    if needed:  # a file of it was removed or damaged: not complete until it is back
        (folder / MANIFEST).unlink(missing_ok=True)
    return needed


def _backoff(attempt: int, retry_after: str | None = None) -> None:
    delay = min(2.0, 0.1 * 2**attempt) * (0.5 + random.random() / 2)
    if retry_after is not None:
        with contextlib.suppress(ValueError):
            delay = min(10.0, max(delay, float(retry_after)))
    time.sleep(delay)


# ---------------------------------------------------------------------------
# helpers: progress


def _tqdm(progress: Any) -> Any:
    """``tqdm.auto.tqdm`` when a bar is wanted (``True``, or ``None`` on a terminal)."""
    import sys

    if callable(progress) or progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm


class _Reporter:
    """Progress of a request from its status: events, else parts."""

    def __init__(self, progress: bool | Progress | None) -> None:
        self._call = progress if callable(progress) else None
        self._tqdm = _tqdm(progress)
        self._bar: Any = None
        self._last: tuple[int, int] | None = None

    def __call__(self, state: Mapping[str, Any]) -> None:
        p = state.get("progress") or {}
        events_total = int(p.get("events_total") or 0)
        if events_total > 0:
            done, total, unit = int(p.get("events") or 0), events_total, "ev"
        else:
            done, total, unit = (
                int(p.get("parts_done") or 0),
                int(p.get("parts_total") or 0),
                "part",
            )
        if total <= 0 or (done, total) == self._last:
            return
        self._last = (done, total)
        if self._call is not None:
            self._call(done, total)
        elif self._tqdm is not None:
            if self._bar is None or self._bar.unit != unit:
                if self._bar is not None:
                    self._bar.close()
                self._bar = self._tqdm(
                    total=total,
                    unit=unit,
                    unit_scale=True,
                    desc=f"columnhub {str(state.get('id', ''))[:8]}",
                    leave=False,
                )
            self._bar.total = total
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _ByteReporter:
    """Progress of downloads in bytes (thread-safe)."""

    def __init__(self, progress: bool | Progress | None, *, total: int) -> None:
        self._lock = threading.Lock()
        self._call = progress if callable(progress) else None
        tqdm = _tqdm(progress) if total else None
        self._bar = (
            tqdm(total=total, unit="B", unit_scale=True, desc="download", leave=False)
            if tqdm is not None
            else None
        )
        self.done = 0
        self.total = total

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            if self._call is not None:
                self._call(self.done, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
