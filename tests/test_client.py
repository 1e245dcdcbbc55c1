"""The service client (``columnhub.Client``) and the CLI ``submit/status/fetch/cancel``.

Against the real service: its FastAPI app in this process (``httpx.ASGITransport``)
with its real database, auth and runners, and ``columnhub serve`` in a
subprocess on a loopback port. Results are checked against
``columnhub.deliver`` embedded on the same spec and a direct uproot read;
error classes against the ``type`` the service put in its HTTP error body.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import awkward as ak
import httpx
import numpy as np
import pytest
import uproot
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import columnhub
from columnhub import errors
from columnhub.client import Client, _error_from_response, client_settings

pytestmark = pytest.mark.service

ENTRY_POINT = Path(sys.executable).parent / "columnhub"
SRC = Path(__file__).resolve().parents[1] / "src"
TOKENS = {
    "alice-token": {"user": "alice", "scopes": ["read", "submit"]},
    "bob-token": {"user": "bob", "scopes": ["read", "submit"]},
    "reader-token": {"user": "carol", "scopes": ["read"]},
}
KEYS = ["run", "luminosityBlock", "event"]


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture
def data(shared_data: Path, tmp_path: Path) -> Path:
    """The service's data root: copies of the shared NanoAOD samples."""
    root = tmp_path / "data"
    root.mkdir()
    for name in ("nano_tt_v12.root", "nano_dy.root", "nano_dimuon.root"):
        shutil.copy(shared_data / name, root / name)
    return root


def token_file(path: Path) -> Path:
    tokens = {hashlib.sha256(t.encode()).hexdigest(): v for t, v in TOKENS.items()}
    path.write_text(yaml.safe_dump({"tokens": tokens}))
    return path


class InProcess:
    """The service app in this process, with its runners; ``client(token)`` talks to it."""

    def __init__(self, tmp: Path, data: Path, *, runners: bool = True, **settings: Any) -> None:
        from columnhub.service.app import create_app
        from columnhub.service.config import ServiceConfig

        self.config = ServiceConfig(
            state_dir=tmp / "state", data_roots=[data], cache=str(tmp / "state-cache"), **settings
        )
        self.app = create_app(self.config)
        self.runners = runners
        if runners:
            self.app.state.services.start()  # what the lifespan does under uvicorn
        self.clients: list[Client] = []

    def client(self, token: str | None = None, **options: Any) -> Client:
        c = Client(
            "http://columnhub.test", token=token, transport=httpx.ASGITransport(self.app),
            **options,
        )
        self.clients.append(c)
        return c

    def raw(self, token: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(self.app), base_url="http://columnhub.test",
            headers=headers,
        )

    def close(self) -> None:
        for c in self.clients:
            c.close()
        if self.runners:
            self.app.state.services.stop()


@pytest.fixture
def service(tmp_path: Path, data: Path) -> Iterator[InProcess]:
    """The service without auth (every caller is ``anonymous``)."""
    svc = InProcess(tmp_path, data)
    yield svc
    svc.close()


@pytest.fixture
def secured(tmp_path: Path, data: Path) -> Iterator[InProcess]:
    """The service with a static token file (alice, bob: read+submit; carol: read)."""
    svc = InProcess(tmp_path, data, token_file=token_file(tmp_path / "tokens.yaml"))
    yield svc
    svc.close()


@pytest.fixture(autouse=True)
def _no_user_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No URL or token from the environment or the user's real config file."""
    monkeypatch.delenv("COLUMNHUB_URL", raising=False)
    monkeypatch.delenv("COLUMNHUB_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("COLUMNHUB_CACHE", str(tmp_path / "local-cache"))


def spec_of(data: Path, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "dataset": {"files": [str(data / "nano_tt_v12.root")]},
        "columns": ["MET_pt", "Jet_pt", "Jet_eta", "ht"],
        "define": {"ht": "sum(Jet_pt[Jet_pt > 30])"},
        "where": "MET_pt > 30",
        "chunk_size": 40,
        "output": {"target_part_bytes": 1},  # a part per chunk: several files
    }
    spec.update(extra)
    return spec


def part_bytes(result: columnhub.Result) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in result.files}


def same_manifest(one: dict[str, Any], other: dict[str, Any]) -> None:
    """What describes the data is equal (timing and file times aside)."""
    for key in ("request_hash", "events", "events_read", "files", "columns", "keys", "complete"):
        assert one[key] == other[key], key
    strip = [{k: v for k, v in p.items() if k != "mtime_ns"} for p in one["parts"]]
    assert strip == [{k: v for k, v in p.items() if k != "mtime_ns"} for p in other["parts"]]


def uproot_reference(path: Path) -> dict[str, Any]:
    """The spec of :func:`spec_of`, computed from a direct uproot read with numpy."""
    with uproot.open(path) as f:
        a = f["Events"].arrays([*KEYS, "MET_pt", "Jet_pt", "Jet_eta"], library="ak")
    keep = np.asarray(a.MET_pt > 30)
    jets = a.Jet_pt[keep]
    return {
        "event": ak.to_list(a.event[keep]),
        "MET_pt": ak.to_list(a.MET_pt[keep]),
        "Jet_pt": ak.to_list(jets),
        "ht": [float(sum(x for x in row if x > 30)) for row in ak.to_list(jets)],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------
# in process: the same result as the embedded delivery


def test_deliver_equals_embedded_and_uproot(
    service: InProcess, data: Path, tmp_path: Path
) -> None:
    spec = spec_of(data)
    client = service.client()
    got = client.deliver(spec, output=tmp_path / "client", progress=False)
    assert isinstance(got, columnhub.Result)
    embedded = columnhub.deliver(spec, output=tmp_path / "embedded", cache=False, progress=False)
    assert len(got.files) > 1  # several parts, each downloaded
    assert part_bytes(got) == part_bytes(embedded)
    same_manifest(got.manifest, embedded.manifest)
    assert "path" not in got.manifest  # the service's folder is not this result's
    reopened = columnhub.Result.open(tmp_path / "client")
    assert reopened.manifest == got.manifest
    arrays = reopened.to_awkward()
    ref = uproot_reference(data / "nano_tt_v12.root")
    assert 0 < len(arrays) < 200  # the selection removed events
    assert ak.to_list(arrays.event) == ref["event"]
    assert ak.to_list(arrays.MET_pt) == ref["MET_pt"]
    assert ak.to_list(arrays.Jet_pt) == ref["Jet_pt"]
    assert np.allclose(ak.to_numpy(arrays.ht), ref["ht"])
    request_id = client.requests()[0]["id"]
    shared = client.open(request_id)  # the service's folder, read in place
    assert isinstance(shared, columnhub.Result)
    assert shared.directory == Path(client.manifest(request_id)["path"])
    assert part_bytes(shared) == part_bytes(embedded)


def test_open_refuses_a_folder_not_seen_here(tmp_path: Path) -> None:
    from columnhub.client import _shared_result

    manifest = {"complete": True, "files": [], "parts": [], "path": str(tmp_path / "elsewhere")}
    with pytest.raises(errors.ServiceError, match="fetch"):
        _shared_result("abc", manifest)
    (tmp_path / "elsewhere").mkdir()  # another result there: not the service's
    (tmp_path / "elsewhere" / "manifest.json").write_text(json.dumps({"complete": True}))
    with pytest.raises(errors.ServiceError, match="not readable here"):
        _shared_result("abc", manifest)


def test_multi_sample_deliver(service: InProcess, data: Path, tmp_path: Path) -> None:
    spec = {
        "samples": {"dy": [str(data / "nano_dy.root")], "dimuon": [str(data / "nano_dimuon.root")]},
        "columns": ["MET_pt", "Muon_pt"],
        "where": "nMuon >= 1",
    }
    client = service.client()
    got = client.deliver(spec, output=tmp_path / "client", progress=False)
    embedded = columnhub.deliver(spec, output=tmp_path / "embedded", cache=False, progress=False)
    assert isinstance(got, dict)
    request_id = client.requests()[0]["id"]
    urls = client.urls(request_id, sample="dimuon")
    assert [u.rsplit("/", 2)[-2:] for u in urls] == [
        ["dimuon", name] for name in got["dimuon"].manifest["files"]
    ]
    with pytest.raises(errors.RequestNotFoundError, match="dy, dimuon"):
        client.urls(request_id)
    assert isinstance(embedded, dict)
    assert list(got) == ["dy", "dimuon"]
    for name in ("dy", "dimuon"):
        assert got[name].directory == tmp_path / "client" / name
        assert part_bytes(got[name]) == part_bytes(embedded[name])
        same_manifest(got[name].manifest, embedded[name].manifest)
        with uproot.open(data / f"nano_{name}.root") as f:
            a = f["Events"].arrays(["event", "nMuon", "Muon_pt"], library="ak")
        keep = np.asarray(a.nMuon >= 1)
        opened = columnhub.Result.open(tmp_path / "client" / name).to_awkward()
        assert ak.to_list(opened.event) == ak.to_list(a.event[keep])
        assert ak.to_list(opened.Muon_pt) == ak.to_list(a.Muon_pt[keep])


def test_spec_file_paths_are_relative_to_the_file(
    service: InProcess, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec_file = data / "request.yaml"  # relative paths: to the spec's folder, as embedded
    spec_file.write_text(
        yaml.safe_dump({"dataset": {"files": ["nano_dy.root"]}, "columns": ["MET_pt"]})
    )
    monkeypatch.chdir(tmp_path)
    got = service.client().deliver(spec_file, output="out", progress=False)
    assert isinstance(got, columnhub.Result)
    with uproot.open(data / "nano_dy.root") as f:
        expected = f["Events"]["MET_pt"].array(library="np").tolist()
    assert ak.to_list(got.to_awkward().MET_pt) == expected
    assert got.directory == Path("out")


# ---------------------------------------------------------------------------
# fetch: resumable, verified


def test_fetch_resumes_only_what_is_missing_or_damaged(
    service: InProcess, data: Path, tmp_path: Path
) -> None:
    client = service.client()
    request_id = client.submit(spec_of(data))
    client.wait(request_id, progress=False)
    target = tmp_path / "fetched"
    first = client.fetch(request_id, target)
    assert isinstance(first, columnhub.Result)
    files = first.files
    assert len(files) >= 3
    reference = part_bytes(first)
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}

    files[1].unlink()  # a lost file
    damaged = bytearray(files[2].read_bytes())  # a flipped byte, same size
    damaged[len(damaged) // 2] ^= 0xFF
    files[2].write_bytes(bytes(damaged))
    touched = {files[1].name, files[2].name}
    counted: list[tuple[int, int]] = []
    again = client.fetch(request_id, target, progress=lambda done, total: counted.append((done, total)))
    assert isinstance(again, columnhub.Result)
    assert part_bytes(again) == reference
    after = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in again.files}
    for name, was in before.items():  # the others were not downloaded (nor rewritten) again
        assert (after[name] == was) == (name not in touched), name
    expected = sum(len(reference[n]) for n in touched)
    assert counted[-1] == (expected, expected)  # only those two files' bytes came

    counted.clear()
    client.fetch(request_id, target, progress=lambda done, total: counted.append((done, total)))
    assert counted == []  # everything there: nothing downloaded
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no temp files left


def test_fetch_replaces_another_result_without_mixing(
    service: InProcess, data: Path, tmp_path: Path
) -> None:
    client = service.client()
    target = tmp_path / "out"
    client.deliver(spec_of(data), output=target, progress=False)
    smaller = client.deliver(
        {"dataset": {"files": [str(data / "nano_dy.root")]}, "columns": ["MET_pt"]},
        output=target,
        progress=False,
    )
    assert isinstance(smaller, columnhub.Result)
    # the first result's other parts are gone: nothing of it can be read by a glob
    assert sorted(p.name for p in target.glob("part-*")) == smaller.manifest["files"]
    with uproot.open(data / "nano_dy.root") as f:
        expected = f["Events"]["event"].array(library="np").tolist()
    assert ak.to_list(columnhub.Result.open(target).to_awkward().event) == expected


def corrupt(path: Path, offset: int, *, truncate: bool = False) -> bytes:
    original = path.read_bytes()
    if truncate:
        path.write_bytes(original[:offset])
    else:
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        path.write_bytes(bytes(damaged))
    return original


@pytest.fixture
def completed(service: InProcess, data: Path) -> tuple[Client, str, Path]:
    """A client, a complete request, and its first file on the service's disk."""
    client = service.client()
    request_id = client.submit(spec_of(data))
    client.wait(request_id, progress=False)
    served = Path(client.manifest(request_id)["path"])
    return client, request_id, served / client.manifest(request_id)["files"][0]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(where=st.floats(0, 1, exclude_max=True), truncate=st.booleans())
def test_a_corrupted_download_is_an_error_never_a_file(
    completed: tuple[Client, str, Path], tmp_path_factory: pytest.TempPathFactory,
    where: float, truncate: bool,
) -> None:
    client, request_id, served = completed
    offset = int(where * served.stat().st_size)
    original = corrupt(served, offset, truncate=truncate)
    target = tmp_path_factory.mktemp("fetch")
    try:
        with pytest.raises(errors.ServiceError, match="does not match its manifest") as info:
            client.fetch(request_id, target)
    finally:
        served.write_bytes(original)
    assert served.name in str(info.value)
    assert not (target / served.name).exists()  # never a silent bad file
    assert not (target / "manifest.json").exists()  # the folder holds no result
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no temp file
    result = client.fetch(request_id, target)  # the file repaired: the fetch completes
    assert isinstance(result, columnhub.Result)
    assert (target / served.name).read_bytes() == original


# ---------------------------------------------------------------------------
# errors: the class the service named


def raw_error(svc: InProcess, method: str, path: str, token: str | None, **kw: Any) -> dict[str, Any]:
    """The error body of a call made without the client."""
    import asyncio

    async def call() -> httpx.Response:
        async with svc.raw(token) as raw:
            return await raw.request(method, path, **kw)

    response = asyncio.run(call())
    assert response.status_code >= 400
    return dict(response.json()["error"])


def test_errors_come_back_as_the_class_the_service_named(
    secured: InProcess, data: Path
) -> None:
    outside = {"dataset": {"files": ["/etc/hostname"]}, "columns": ["MET_pt"]}
    fine = spec_of(data)
    alice = secured.client("alice-token")
    alices = alice.submit(fine)
    cases = [  # (what the client does, the same call made raw)
        (lambda: secured.client().status(alices), ("GET", f"/api/v1/requests/{alices}", None, {})),
        (
            lambda: secured.client("wrong-token").requests(),
            ("GET", "/api/v1/requests", "wrong-token", {}),
        ),
        (
            lambda: secured.client("reader-token").submit(fine),
            ("POST", "/api/v1/requests", "reader-token", {"json": fine}),
        ),
        (
            lambda: alice.submit(outside),
            ("POST", "/api/v1/requests", "alice-token", {"json": outside}),
        ),
        (  # another user's request is not found
            lambda: secured.client("bob-token").status(alices),
            ("GET", f"/api/v1/requests/{alices}", "bob-token", {}),
        ),
        (
            lambda: secured.client("bob-token").cancel("0" * 32),
            ("DELETE", f"/api/v1/requests/{'0' * 32}", "bob-token", {}),
        ),
    ]
    seen = set()
    for act, (method, path, token, kw) in cases:
        body = raw_error(secured, method, path, token, **kw)
        expected = getattr(errors, body["type"])
        with pytest.raises(errors.ColumnhubError) as info:
            act()
        assert type(info.value) is expected, (path, body)
        assert body["message"] in str(info.value)
        seen.add(expected)
    assert seen == {
        errors.AuthError, errors.PermissionDeniedError, errors.RequestNotFoundError
    }


def test_a_limit_comes_back_as_quota_exceeded(data: Path, tmp_path: Path) -> None:
    svc = InProcess(tmp_path, data, runners=False, max_active_requests_per_user=1)
    try:  # no runner: the first request stays queued
        client = svc.client()
        client.submit(spec_of(data))
        second = spec_of(data, where="MET_pt > 1")
        body = raw_error(svc, "POST", "/api/v1/requests", None, json=second)
        with pytest.raises(errors.QuotaExceededError) as info:
            client.submit(second)
        assert body["type"] == "QuotaExceededError"
        assert str(info.value) == body["message"]
        assert len(client.requests()) == 1  # refused: not queued
    finally:
        svc.close()


def test_a_failed_request_raises_its_error(service: InProcess, data: Path) -> None:
    client = service.client()
    request_id = client.submit(spec_of(data, columns=["MET_pt", "Jet_ptt"]))
    with pytest.raises(errors.ColumnNotFoundError, match="Jet_ptt") as info:
        client.wait(request_id, progress=False)
    status = client.status(request_id)
    assert status["status"] == "failed"
    assert status["error"]["type"] == "ColumnNotFoundError"
    assert str(info.value) == status["error"]["message"]
    with pytest.raises(errors.ServiceError, match="failed"):
        client.fetch(request_id, Path(service.config.state_dir) / "nothing")


def test_a_failed_sample_raises_a_sample_error(
    service: InProcess, data: Path, tmp_path: Path
) -> None:
    spec = {
        "samples": {
            "dy": [str(data / "nano_dy.root")],
            "tt": {"dataset": [str(data / "nano_tt_v12.root")], "where": "nosuch > 1"},
        },
        "columns": ["MET_pt"],
    }
    with pytest.raises(errors.SampleError) as info:
        service.client().deliver(spec, output=tmp_path / "out", progress=False)
    assert set(info.value.errors) == {"tt"}
    assert isinstance(info.value.errors["tt"], errors.ColumnNotFoundError)
    # as embedded: the sample that was delivered still is, and equals a direct read
    assert set(info.value.results) == {"dy"}
    got = info.value.results["dy"].to_awkward()
    ref = uproot.open(data / "nano_dy.root")["Events"].arrays(["MET_pt"])
    assert got["MET_pt"].to_list() == ref["MET_pt"].to_list()
    assert not (tmp_path / "out" / "tt" / "manifest.json").exists()
    # the failed sample's files are refused by name, its manifest entry says why
    rid = service.client().requests()[0]["id"]
    manifest = service.client().manifest(rid)
    assert manifest["samples"]["tt"]["complete"] is False
    assert manifest["samples"]["tt"]["error"]["type"] == "ColumnNotFoundError"


@settings(deadline=None)
@given(
    name=st.sampled_from(sorted(n for n in errors.__all__ if n[0].isupper())),
    message=st.text(min_size=1, max_size=80),
    status=st.sampled_from([400, 401, 403, 404, 409, 429]),
)
def test_every_error_type_maps_back_to_its_class(name: str, message: str, status: int) -> None:
    response = httpx.Response(status, json={"error": {"type": name, "message": message}})
    err = _error_from_response(response, url="http://x", signed=True)
    expected = getattr(errors, name)
    assert type(err) is expected
    assert str(err) == message


def test_an_unknown_type_maps_by_status() -> None:
    for status, cls in [
        (401, errors.AuthError), (403, errors.PermissionDeniedError),
        (404, errors.RequestNotFoundError), (429, errors.QuotaExceededError),
        (409, errors.ServiceError), (500, errors.ServiceUnavailableError),
    ]:
        response = httpx.Response(status, json={"error": {"type": "os.system", "message": "m"}})
        assert type(_error_from_response(response, url="http://x", signed=True)) is cls


def test_an_unreachable_service_names_its_url() -> None:
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    client = Client(url, retries=1)
    with pytest.raises(errors.ServiceUnavailableError, match=f"127.0.0.1:{port}"):
        client.status("x")
    client.close()


class Flaky(http.server.ThreadingHTTPServer):
    """A proxy in front of a service that is restarting: answers ``codes`` first, then 200."""

    def __init__(self, codes: list[int]) -> None:
        self.codes = codes
        self.hits: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(handler) -> None:
                self.hits.append(handler.command)
                length = int(handler.headers.get("Content-Length") or 0)
                handler.rfile.read(length)
                code = self.codes.pop(0) if self.codes else 200
                body = json.dumps({"id": "abc", "status": "queued"} if code == 200 else {}).encode()
                handler.send_response(code)
                if 300 <= code < 400:
                    handler.send_header("Location", "https://elsewhere.example/api/v1/requests")
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(handler, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def test_retries_only_what_is_safe(data: Path) -> None:
    proxy = Flaky([502, 503, 504])
    try:
        with Client(proxy.url, retries=3) as client:
            assert client.status("abc")["status"] == "queued"  # a GET after 502, 503, 504
        assert proxy.hits == ["GET"] * 4
        proxy.hits.clear()
        proxy.codes = [504]
        with Client(proxy.url, retries=3) as client, pytest.raises(
            errors.ServiceUnavailableError, match="504"
        ):
            client.submit(spec_of(data))  # the service may have it: never sent twice
        assert proxy.hits == ["POST"]
        proxy.hits.clear()
        proxy.codes = [503]  # a 503 means it was not taken: sent again
        with Client(proxy.url, retries=3) as client:
            assert client.submit(spec_of(data)) == "abc"
        assert proxy.hits == ["POST", "POST"]
        proxy.hits.clear()
        proxy.codes = [503, 503]
        with Client(proxy.url, retries=1) as client, pytest.raises(
            errors.ServiceUnavailableError, match="503"
        ):
            client.status("abc")  # bounded
        assert proxy.hits == ["GET", "GET"]
        proxy.hits.clear()
        proxy.codes = [308]  # http:// redirected to https://: never followed with the token
        with Client(proxy.url, token="t") as client, pytest.raises(
            errors.ServiceError, match="redirects GET /api/v1/requests/abc to https://elsewhere"
        ):
            client.status("abc")
        assert proxy.hits == ["GET"]
    finally:
        proxy.stop()


# ---------------------------------------------------------------------------
# settings


def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "xdg-config" / "columnhub" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("url: http://from-file:1\ntoken: file-token\n")
    assert client_settings() == client_settings(None, None)
    s = client_settings()
    assert (s.url, s.token, s.url_from) == ("http://from-file:1", "file-token", str(config))
    monkeypatch.setenv("COLUMNHUB_TOKEN", "env-token")
    s = client_settings()
    assert (s.url, s.token, s.token_from) == ("http://from-file:1", "env-token", "$COLUMNHUB_TOKEN")
    monkeypatch.setenv("COLUMNHUB_URL", "http://from-env:2/")
    s = client_settings("http://arg:3", "arg-token")
    assert (s.url, s.token) == ("http://arg:3", "arg-token")
    assert client_settings().url == "http://from-env:2"
    config.write_text("url: http://x\ntokn: typo\n")
    monkeypatch.delenv("COLUMNHUB_TOKEN")
    with pytest.raises(errors.SpecError, match="tokn"):
        client_settings()
    with pytest.raises(errors.SpecError, match="ftp://x"):
        client_settings("ftp://x", "t")


def test_token_from_the_config_file(
    secured: InProcess, data: Path, tmp_path: Path
) -> None:
    config = tmp_path / "xdg-config" / "columnhub" / "config.yaml"
    config.parent.mkdir(parents=True)
    with pytest.raises(errors.AuthError, match="no token was given"):
        secured.client().requests()
    config.write_text(yaml.safe_dump({"token": "bob-token"}))
    bob = secured.client()  # the URL is given, the token comes from the file
    request_id = bob.submit(spec_of(data))
    assert [r["id"] for r in bob.requests()] == [request_id]
    assert bob.status(request_id)["owner"] == "bob"
    assert secured.client("alice-token").requests() == []


def test_wait_progress(
    service: InProcess, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = service.client()
    seen: list[tuple[int, int]] = []
    final = client.wait(client.submit(spec_of(data)), progress=lambda d, t: seen.append((d, t)))
    assert final["status"] == "complete"
    assert seen[-1] == (200, 200)  # the events read, of the file's 200
    assert all(d <= t for d, t in seen)
    capsys.readouterr()
    client.wait(client.submit(spec_of(data, where="MET_pt > 20")), progress=None)
    assert capsys.readouterr().err == ""  # not a terminal: quiet
    client.wait(client.submit(spec_of(data, where="MET_pt > 10")), progress=True)
    assert "ev" in capsys.readouterr().err  # asked for: a tqdm bar
    client.deliver(spec_of(data, where="MET_pt > 15"), output=tmp_path / "o", progress=True)
    assert "download" in capsys.readouterr().err  # and one of the bytes fetched


# ---------------------------------------------------------------------------
# end to end: `columnhub serve` and the CLI through the installed entry point


class Served:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], state: Path, env: dict[str, str]):
        self.url = url
        self.proc = proc
        self.state = state
        self.env = env

    def cli(self, *args: str, token: str | None = "alice-token", **kw: Any) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        env.pop("COLUMNHUB_TOKEN", None)
        if token is not None:
            env["COLUMNHUB_TOKEN"] = token
        return subprocess.run(
            [str(ENTRY_POINT), *args], env=env, capture_output=True, text=True,
            timeout=300, check=False, **kw,
        )


def serve_env(tmp: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "XDG_CONFIG_HOME": str(tmp / "xdg"),
        "COLUMNHUB_CACHE": str(tmp / "client-cache"),
    }
    env.pop("COLUMNHUB_URL", None)
    return env


def start_serve(tmp: Path, port: int, *args: str) -> subprocess.Popen[bytes]:
    """``columnhub serve`` on 127.0.0.1:``port`` (state in ``tmp/state``), once it is ready."""
    with open(tmp / "serve.log", "ab") as log:
        proc = subprocess.Popen(
            [
                str(ENTRY_POINT), "serve", "--port", str(port), "--state-dir", str(tmp / "state"),
                "--log-level", "warning", *args,
            ],
            env=serve_env(tmp), stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            pytest.fail(f"columnhub serve did not start:\n{(tmp / 'serve.log').read_text()}")
        time.sleep(0.2)


def stop_serve(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("served")
    data = tmp / "data"
    data.mkdir()
    for name in ("nano_tt_v12.root", "nano_dy.root"):
        shutil.copy(shared_data / name, data / name)
    port = free_port()
    tokens = token_file(tmp / "tokens.yaml")
    proc = start_serve(tmp, port, "--data-root", str(data), "--token-file", str(tokens))
    env = serve_env(tmp)
    env["COLUMNHUB_URL"] = f"http://127.0.0.1:{port}"
    try:
        yield Served(env["COLUMNHUB_URL"], proc, data, env)
    finally:
        stop_serve(proc)


@pytest.mark.slow
def test_wait_outlasts_a_service_restart(data: Path, tmp_path: Path) -> None:
    """The service is killed after a submission and comes back: wait ends with the result."""
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"lease_s": 1.0, "data_roots": [str(data)]}))
    proc = start_serve(tmp_path, port, "--config", str(config))
    client = Client(f"http://127.0.0.1:{port}", retries=1, patience=120)
    try:
        request_id = client.submit(spec_of(data, chunk_size=20))
        proc.kill()  # no clean-up: the job is left as it was
        proc.wait(10)
        waited: dict[str, Any] = {}

        def waiting() -> None:
            try:
                waited["status"] = client.wait(request_id, progress=False, poll=0.2)
            except Exception as err:  # noqa: BLE001 (checked below)
                waited["error"] = err

        thread = threading.Thread(target=waiting)
        thread.start()
        time.sleep(1.5)  # the client finds nobody there meanwhile
        assert thread.is_alive()
        proc = start_serve(tmp_path, port, "--config", str(config))
        thread.join(180)
        assert not thread.is_alive()
        assert waited.get("status", {}).get("status") == "complete", waited
        got = client.fetch(request_id, tmp_path / "out")
    finally:
        client.close()
        stop_serve(proc)
    embedded = columnhub.deliver(
        spec_of(data, chunk_size=20), output=tmp_path / "embedded", cache=False, progress=False
    )
    assert isinstance(got, columnhub.Result)
    assert part_bytes(got) == part_bytes(embedded)  # no part lost or written twice


def test_end_to_end_client_equals_embedded(served: Served, tmp_path: Path) -> None:
    spec = spec_of(served.state)
    with Client(served.url, token="alice-token") as client:
        got = client.deliver(spec, output=tmp_path / "client", progress=False)
    embedded = columnhub.deliver(spec, output=tmp_path / "embedded", cache=False, progress=False)
    assert isinstance(got, columnhub.Result)
    assert part_bytes(got) == part_bytes(embedded)
    same_manifest(got.manifest, embedded.manifest)
    ref = uproot_reference(served.state / "nano_tt_v12.root")
    assert ak.to_list(columnhub.Result.open(tmp_path / "client").to_awkward().event) == ref["event"]


def test_end_to_end_samples(served: Served, tmp_path: Path) -> None:
    spec = {
        "samples": {
            "tt": {"files": [str(served.state / "nano_tt_v12.root")]},
            "dy": [str(served.state / "nano_dy.root")],
        },
        "columns": ["MET_pt", "Jet_pt"],
        "where": "nJet >= 2",
    }
    with Client(served.url, token="bob-token") as client:
        got = client.deliver(spec, output=tmp_path / "client", progress=False, parallel=2)
    embedded = columnhub.deliver(spec, output=tmp_path / "embedded", cache=False, progress=False)
    assert isinstance(got, dict)
    assert isinstance(embedded, dict)
    assert list(got) == ["tt", "dy"]
    for name, file in [("tt", "nano_tt_v12.root"), ("dy", "nano_dy.root")]:
        assert part_bytes(got[name]) == part_bytes(embedded[name])
        same_manifest(got[name].manifest, embedded[name].manifest)
        with uproot.open(served.state / file) as f:
            a = f["Events"].arrays(["event", "nJet", "Jet_pt"], library="ak")
        keep = np.asarray(a.nJet >= 2)
        opened = columnhub.Result.open(tmp_path / "client" / name).to_awkward()
        assert ak.to_list(opened.event) == ak.to_list(a.event[keep])
        assert ak.to_list(opened.Jet_pt) == ak.to_list(a.Jet_pt[keep])


def test_cli_submit_wait_status_fetch(served: Served, tmp_path: Path) -> None:
    spec_file = served.state / "cli-request.yaml"
    spec_file.write_text(yaml.safe_dump(spec_of(Path("."))))  # files relative to the spec file
    out = tmp_path / "submitted"
    done = served.cli("submit", str(spec_file), "--wait", "--title", "cli test", "-o", str(out))
    assert done.returncode == 0, done.stderr
    request_id, where = done.stdout.splitlines()
    assert where.startswith(f"result: {out} (")
    embedded = columnhub.deliver(spec_file, output=tmp_path / "embedded", cache=False, progress=False)
    assert isinstance(embedded, columnhub.Result)
    assert part_bytes(columnhub.Result.open(out)) == part_bytes(embedded)

    listing = served.cli("status")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(request_id))
    assert row.split()[1] == "complete"
    assert row.endswith("cli test")
    one = served.cli("status", request_id, "--json")
    assert json.loads(one.stdout)["status"] == "complete"
    assert "bob" not in served.cli("status").stdout
    assert request_id not in served.cli("status", token="bob-token").stdout  # alice's only

    again = served.cli("submit", str(spec_file), "--wait", "--no-progress")
    assert again.returncode == 0, again.stderr
    second_id, where = again.stdout.splitlines()
    assert second_id != request_id
    path = where.removeprefix("result: ").split(" (")[0]  # the service's folder
    assert json.loads((Path(path) / "manifest.json").read_text())["request_hash"] == (
        embedded.manifest["request_hash"]
    )

    fetched = tmp_path / "fetched"
    got = served.cli("fetch", request_id, "-o", str(fetched))
    assert got.returncode == 0, got.stderr
    assert part_bytes(columnhub.Result.open(fetched)) == part_bytes(embedded)


def test_cli_cancel(served: Served) -> None:
    submitted = served.cli("submit", str(served.state / "nano_dy.root"))
    assert submitted.returncode == 2  # a ROOT file is not a spec: a user error, no traceback
    assert "Traceback" not in submitted.stderr
    spec_file = served.state / "cancel.yaml"
    spec_file.write_text(yaml.safe_dump(spec_of(Path("."), where="MET_pt > 5")))
    submitted = served.cli("submit", str(spec_file))
    assert submitted.returncode == 0, submitted.stderr
    request_id = submitted.stdout.strip()
    cancelled = served.cli("cancel", request_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"{request_id}: cancelled"
    assert json.loads(served.cli("status", request_id, "--json").stdout)["status"] == "cancelled"
    fetch = served.cli("fetch", request_id, "-o", str(served.state / "never"))
    assert fetch.returncode == 2
    assert "cancelled" in fetch.stderr
    assert "Traceback" not in fetch.stderr


def test_cli_errors_and_exit_codes(served: Served, tmp_path: Path) -> None:
    denied = served.cli("status", token="wrong")
    assert denied.returncode == 2
    assert denied.stderr.startswith("columnhub: error: ")
    assert "Traceback" not in denied.stderr
    missing = served.cli("status", "f" * 32)
    assert missing.returncode == 2
    assert "f" * 32 in missing.stderr
    down = served.cli("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1  # the service cannot be reached: not the user's mistake
    assert "cannot be reached" in down.stderr
    assert "Traceback" not in down.stderr
    config = Path(served.env["XDG_CONFIG_HOME"]) / "columnhub" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({"url": served.url, "token": "bob-token"}))
    env_less = dict(served.env)
    env_less.pop("COLUMNHUB_URL")
    from_file = subprocess.run(
        [str(ENTRY_POINT), "status"], env=env_less, capture_output=True, text=True,
        timeout=120, check=False,
    )
    config.unlink()
    assert from_file.returncode == 0, from_file.stderr  # url and token from the file


def test_cli_status_and_fetch_start_light(served: Served, tmp_path: Path) -> None:
    """``status``, ``cancel`` and ``fetch`` never load numpy, pydantic, pyarrow, uproot, numba."""
    with Client(served.url, token="alice-token") as client:
        request_id = client.submit(spec_of(served.state, where="MET_pt > 50"))
        client.wait(request_id, progress=False)
    env = dict(served.env, COLUMNHUB_TOKEN="alice-token")
    heavy = ("numpy", "pydantic", "pyarrow", "uproot", "numba", "awkward", "pandas", "fastapi")
    for args in (["status"], ["status", request_id], ["fetch", request_id, "-o", str(tmp_path)]):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", str(ENTRY_POINT), *args],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        imported = {
            line.rsplit("|", 1)[-1].strip().split(".")[0]
            for line in done.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert "httpx" in imported  # the check sees what a command loads
        assert not imported & set(heavy), (args, imported & set(heavy))
    assert columnhub.Result.open(tmp_path).events > 0


@contextlib.contextmanager
def _sigint_as_from_a_terminal() -> Iterator[None]:
    """Children started in the block take SIGINT's default action, as from a terminal.

    A suite started in the background (``nohup make test &``) ignores SIGINT,
    its children inherit that, and a Python started so keeps ignoring it. A
    handler here is not inherited (it becomes the default action in a new
    program); an ignored signal would be.
    """
    before = signal.getsignal(signal.SIGINT)
    if before is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def test_cli_interrupted_wait_says_the_request_goes_on(data: Path, tmp_path: Path) -> None:
    proxy = Flaky([])  # takes the submission and says "queued" for ever
    spec_file = tmp_path / "request.yaml"
    spec_file.write_text(yaml.safe_dump(spec_of(data)))
    env = serve_env(tmp_path)
    try:
        with _sigint_as_from_a_terminal():
            proc = subprocess.Popen(
                [str(ENTRY_POINT), "submit", str(spec_file), "--wait", "--url", proxy.url],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        deadline = time.monotonic() + 60
        while "GET" not in proxy.hits and time.monotonic() < deadline:  # waiting now
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proxy.stop()
    assert proc.returncode == 130
    assert out.strip() == "abc"
    assert "columnhub cancel abc" in err
    assert "Traceback" not in err


def test_deliver_places_the_result_as_embedded(
    service: InProcess, data: Path, tmp_path: Path
) -> None:
    client = service.client()
    spec = {"dataset": {"files": [str(data / "nano_dy.root")]}, "columns": ["MET_pt"]}
    default = client.deliver(spec, progress=False)  # no directory: the local cache folder
    assert isinstance(default, columnhub.Result)
    request = columnhub.Request.from_dict(spec)
    assert default.directory == tmp_path / "local-cache" / "fetched" / request.hash
    assert default.manifest["request_hash"] == request.hash
    mine = tmp_path / "mine"  # the spec's own output.directory: here, never sent
    placed = client.deliver({**spec, "output": {"directory": str(mine)}}, progress=False)
    assert isinstance(placed, columnhub.Result)
    assert placed.directory == mine
    assert part_bytes(placed) == part_bytes(default)


def test_config_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from columnhub.client import config_path

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert config_path() == tmp_path / "columnhub" / "config.yaml"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # ignored, as XDG says
    assert config_path() == Path.home() / ".config" / "columnhub" / "config.yaml"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert config_path() == Path.home() / ".config" / "columnhub" / "config.yaml"


def test_files_read_remotely_over_http_ranges(served: Served, tmp_path: Path) -> None:
    spec = spec_of(served.state, where="MET_pt > 25")
    with Client(served.url, token="alice-token") as client:
        request_id = client.submit(spec)
        client.wait(request_id, progress=False)
        urls = client.urls(request_id)
        remote = ak.from_parquet(urls, storage_options=client.storage_options)
        with pytest.raises(errors.RequestNotFoundError, match="one sample"):
            client.urls(request_id, sample="dy")
        with Client(served.url, token="bob-token") as bob, pytest.raises(
            errors.RequestNotFoundError
        ):
            bob.urls(request_id)
    embedded = columnhub.deliver(spec, output=tmp_path / "embedded", cache=False, progress=False)
    assert isinstance(embedded, columnhub.Result)
    assert len(urls) == len(embedded.files) > 1
    assert ak.to_list(remote) == ak.to_list(embedded.to_awkward())
    unsigned = httpx.get(urls[0])  # the files need the token too
    assert unsigned.status_code == 401


def test_an_interrupted_file_resumes_with_a_range(
    service: InProcess, data: Path, tmp_path: Path
) -> None:
    client = service.client()
    request_id = client.submit(spec_of(data))
    client.wait(request_id, progress=False)
    target = tmp_path / "out"
    first = client.fetch(request_id, target)
    assert isinstance(first, columnhub.Result)
    part = first.manifest["parts"][0]
    path = target / part["name"]
    whole = path.read_bytes()
    partial = target / f".{part['name']}.{part['xxh3']}.partial"

    for kept, damaged in [(len(whole) // 3, False), (1, False), (len(whole) // 2, True)]:
        path.unlink()
        prefix = bytearray(whole[:kept])  # what a cut-off download left
        if damaged:
            prefix[0] ^= 0xFF
        partial.write_bytes(bytes(prefix))
        counted: list[tuple[int, int]] = []
        if damaged:  # the whole file is verified, not just the part that came
            with pytest.raises(errors.ServiceError, match="does not match"):
                client.fetch(request_id, target)
            assert not partial.exists()  # the damaged start is not kept either
            assert not path.exists()
        client.fetch(request_id, target, progress=lambda d, t, c=counted: c.append((d, t)))
        assert path.read_bytes() == whole
        assert not partial.exists()
        rest = len(whole) - (0 if damaged else kept)
        assert counted[-1] == (rest, rest)  # only the rest came over the wire

    path.unlink()
    partial.write_bytes(whole + b"more")  # longer than the file: not its beginning
    client.fetch(request_id, target)
    assert path.read_bytes() == whole
    assert not [p for p in target.iterdir() if p.name.startswith(".")]


class CutOff(http.server.ThreadingHTTPServer):
    """Serves one result file, cutting the first transfer off halfway (a dropped connection)."""

    def __init__(self, body: bytes) -> None:
        import xxhash

        self.ranges: list[str | None] = []
        manifest = {
            "complete": True, "events": 1, "files": ["part-00000.parquet"],
            "parts": [{"name": "part-00000.parquet", "rows": 1, "bytes": len(body),
                       "xxh3": xxhash.xxh3_64_hexdigest(body)}],
            "path": "/elsewhere",
        }

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(handler) -> None:
                if handler.path.endswith("/manifest"):
                    payload = json.dumps(manifest).encode()
                    handler.send_response(200)
                    handler.send_header("Content-Type", "application/json")
                    handler.send_header("Content-Length", str(len(payload)))
                    handler.end_headers()
                    handler.wfile.write(payload)
                    return
                wanted = handler.headers.get("Range")
                self.ranges.append(wanted)
                if wanted is None:  # the whole file announced, half of it sent
                    handler.send_response(200)
                    handler.send_header("Content-Length", str(len(body)))
                    handler.end_headers()
                    handler.wfile.write(body[: len(body) // 2])
                    handler.close_connection = True
                    return
                start = int(wanted.removeprefix("bytes=").rstrip("-"))
                handler.send_response(206)
                handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                handler.send_header("Content-Length", str(len(body) - start))
                handler.end_headers()
                handler.wfile.write(body[start:])

            def log_message(handler, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()


def test_a_dropped_transfer_resumes_where_it_stopped(tmp_path: Path) -> None:
    body = os.urandom(300_000)
    server = CutOff(body)
    try:
        with Client(f"http://127.0.0.1:{server.server_address[1]}") as client:
            result = client.fetch("r1", tmp_path / "out")
    finally:
        server.shutdown()
        server.server_close()
    assert server.ranges == [None, f"bytes={len(body) // 2}-"]
    assert isinstance(result, columnhub.Result)
    assert (tmp_path / "out" / "part-00000.parquet").read_bytes() == body
    assert "path" not in json.loads((tmp_path / "out" / "manifest.json").read_text())


def test_fetches_into_one_folder_at_once(service: InProcess, data: Path, tmp_path: Path) -> None:
    client = service.client()
    request_id = client.submit(spec_of(data))
    client.wait(request_id, progress=False)
    reference = client.fetch(request_id, tmp_path / "reference")
    assert isinstance(reference, columnhub.Result)
    target = tmp_path / "shared"
    failures: list[BaseException] = []

    def fetch() -> None:
        try:
            client.fetch(request_id, target, parallel=2)
        except BaseException as err:  # noqa: BLE001 (checked below)
            failures.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == []
    assert part_bytes(columnhub.Result.open(target)) == part_bytes(reference)
    assert not [p for p in target.iterdir() if p.name.startswith(".")]


def test_without_httpx_the_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['httpx'] = None\n"  # as if httpx were not installed
        "import columnhub\n"
        "columnhub.Client('http://127.0.0.1:1')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert done.returncode == 1
    assert "MissingDependencyError" in done.stderr
    assert "pip install 'columnhub[service]'" in done.stderr


@pytest.mark.parametrize("word", ["on", "off", "yes", "no"])
def test_config_reads_yaml_1_2_words_as_text(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, word: str
) -> None:
    """A token or URL that YAML 1.1 would read as a boolean is the text it says (as in specs)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("COLUMNHUB_URL", raising=False)
    monkeypatch.delenv("COLUMNHUB_TOKEN", raising=False)
    config = tmp_path / "columnhub" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(f"url: http://127.0.0.1:1\ntoken: {word}\n")
    assert yaml.safe_load(config.read_text())["token"] in (True, False)  # what 1.1 makes of it
    settings_ = client_settings()
    assert settings_.token == word
    assert settings_.token_from is not None
