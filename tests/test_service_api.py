"""The service's HTTP API: in process (httpx.ASGITransport) and end to end (``columnhub serve``).

Every result is checked against an independent reference: a direct uproot
read of the same selection, and the file bytes on the shared filesystem.
Auth is a real static token file (sha256 hashes); the database is the real
SQLite one; runners deliver with the real ``columnhub.deliver``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import anyio.from_thread
import awkward as ak
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uproot
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from columnhub.cache import ColumnCache
from columnhub.errors import SpecError
from columnhub.service.app import create_app
from columnhub.service.config import ServiceConfig, load_config

pytestmark = pytest.mark.service

ENTRY_POINT = Path(sys.executable).parent / "columnhub"
KEYS = ["run", "luminosityBlock", "event"]
TOKENS = {"alice": "tok-alice", "bob": "tok-bob", "root": "tok-root", "reader": "tok-reader"}
SCOPES = {
    "alice": ["read", "submit"],
    "bob": ["read", "submit"],
    "root": ["read", "submit", "admin"],
    "reader": ["read"],
}
FINAL = ("complete", "failed", "cancelled")


# ---------------------------------------------------------------------------
# helpers


class InProcess:
    """The app in this process through ``httpx.ASGITransport``, with its lifespan (runners) run.

    A blocking portal (an event loop in a thread) lets plain test code call it
    as ``client.get(...)``, also from several threads at once.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._stack = contextlib.ExitStack()
        self._portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal())
        self._stack.enter_context(
            self._portal.wrap_async_context_manager(app.router.lifespan_context(app))
        )
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://columnhub.test"
        )

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self._portal.call(lambda: self._client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def head(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("HEAD", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._portal.call(self._client.aclose)
        self._stack.close()  # the lifespan's end stops the runners


def write_token_file(path: Path) -> Path:
    """A static token file: sha256 hashes of the tokens, never the tokens."""
    tokens = {
        hashlib.sha256(tok.encode()).hexdigest(): {"user": user, "scopes": SCOPES[user]}
        for user, tok in TOKENS.items()
    }
    path.write_text(yaml.safe_dump({"tokens": tokens}))
    return path


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[user]}"}


def make_config(tmp: Path, shared_data: Path, **overrides: Any) -> ServiceConfig:
    settings_ = {
        "state_dir": tmp / "state",
        "data_roots": [shared_data],
        "token_file": write_token_file(tmp / "tokens.yaml"),
        "workers": 2,
    }
    settings_.update(overrides)
    return load_config(**settings_)


def tt_spec(shared_data: Path, **changes: Any) -> dict[str, Any]:
    """A selection over the ttbar sample, several chunks and parts."""
    spec: dict[str, Any] = {
        "dataset": {"files": [str(shared_data / "nano_tt_v12.root")]},
        "columns": ["Jet_pt", "nJet", "MET_pt"],
        "where": "nJet >= 4",
        "chunk_size": 50,
        "output": {"target_part_bytes": 1},  # a part per chunk: several files
    }
    spec.update(changes)
    return spec


def reference(path: Path, columns: list[str], mask_of: Any) -> ak.Array:
    """The selection read directly with uproot (the independent reference)."""
    with uproot.open(path) as f:
        events = f["Events"].arrays([*KEYS, *columns])
    return events[mask_of(events)]


def table_of(data: list[bytes]) -> pa.Table:
    return pa.concat_tables([pq.read_table(pa.BufferReader(b)) for b in data])


def assert_same_rows(table: pa.Table, expected: ak.Array, columns: list[str]) -> None:
    got = ak.from_arrow(table)
    assert len(got) == len(expected)
    assert len(expected) > 0  # the selection keeps events, so a wrong one would show
    for name in [*KEYS, *columns]:
        assert ak.to_list(got[name]) == ak.to_list(expected[name]), name


def wait(client: Any, request_id: str, user: str, *, deadline_s: float = 180) -> dict[str, Any]:
    """Poll the status until final (the deadline only stops a hung test; it asserts no time)."""
    end = time.monotonic() + deadline_s
    while True:
        r = client.get(f"/api/v1/requests/{request_id}", headers=auth(user))
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        if body["status"] in FINAL:
            return body
        if time.monotonic() > end:
            pytest.fail(f"request {request_id} never finished: {body}")
        time.sleep(0.05)


def wait_until(predicate: Any, what: str, *, deadline_s: float = 60) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.05)


def submit(client: Any, spec: dict[str, Any], user: str) -> str:
    r = client.post("/api/v1/requests", json=spec, headers=auth(user))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ENTRY_POINT), *args],
        check=False, capture_output=True, text=True, timeout=300, env=env,
    )


# ---------------------------------------------------------------------------
# one delivered request shared by the read-only tests


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[InProcess]:
    config = make_config(tmp_path_factory.mktemp("service"), shared_data)
    with InProcess(create_app(config)) as client:
        yield client


@pytest.fixture(scope="module")
def delivered(service: InProcess, shared_data: Path) -> dict[str, Any]:
    """alice's request over the ttbar sample, complete: its id and manifest."""
    request_id = submit(service, tt_spec(shared_data), "alice")
    status = wait(service, request_id, "alice")
    assert status["status"] == "complete", status
    r = service.get(f"/api/v1/requests/{request_id}/manifest", headers=auth("alice"))
    assert r.status_code == 200, r.text
    return {"id": request_id, "manifest": r.json(), "status": status}


def test_delivered_files_equal_a_direct_uproot_read(
    service: InProcess, delivered: dict[str, Any], shared_data: Path
) -> None:
    manifest = delivered["manifest"]
    assert manifest["complete"] is True
    assert len(manifest["files"]) > 1  # several parts: each must be served
    folder = Path(manifest["path"])
    assert folder.is_dir()  # the shared-filesystem path of the manifest
    downloaded = []
    for name in manifest["files"]:
        r = service.get(f"/api/v1/requests/{delivered['id']}/files/{name}", headers=auth("alice"))
        assert r.status_code == 200
        assert r.content == (folder / name).read_bytes()
        downloaded.append(r.content)
    expected = reference(
        shared_data / "nano_tt_v12.root", ["Jet_pt", "nJet", "MET_pt"], lambda e: e.nJet >= 4
    )
    assert_same_rows(table_of(downloaded), expected, ["Jet_pt", "nJet", "MET_pt"])
    assert manifest["events"] == len(expected)
    progress = delivered["status"]["progress"]
    assert progress["parts_done"] == progress["parts_total"] == len(manifest["files"])


def test_ranged_gets_are_the_files_bytes(service: InProcess, delivered: dict[str, Any]) -> None:
    manifest = delivered["manifest"]
    name = manifest["files"][0]
    data = (Path(manifest["path"]) / name).read_bytes()
    size = len(data)
    url = f"/api/v1/requests/{delivered['id']}/files/{name}"
    cases = [  # (Range header, the slice it means)
        ("bytes=0-99", 0, 100),
        ("bytes=-100", size - 100, size),  # a suffix
        (f"bytes={size - 10}-", size - 10, size),  # open-ended
        (f"bytes=5-{size + 100}", 5, size),  # an end past the file is clipped
    ]
    for header, start, stop in cases:
        r = service.get(url, headers={**auth("alice"), "Range": header})
        assert r.status_code == 206, header
        assert r.content == data[start:stop], header
        assert r.headers["content-range"] == f"bytes {start}-{stop - 1}/{size}"
    for header in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}"):
        r = service.get(url, headers={**auth("alice"), "Range": header})
        assert r.status_code == 416, header
        assert r.headers["content-range"] == f"bytes */{size}"
    head = service.head(url, headers=auth("alice"))
    assert head.status_code == 200
    assert int(head.headers["content-length"]) == size
    assert head.headers["accept-ranges"] == "bytes"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(0, 5000), length=st.integers(1, 5000))
def test_any_satisfiable_range_is_the_slice(
    service: InProcess, delivered: dict[str, Any], start: int, length: int
) -> None:
    manifest = delivered["manifest"]
    name = manifest["files"][-1]
    data = (Path(manifest["path"]) / name).read_bytes()
    end = start + length - 1
    r = service.get(
        f"/api/v1/requests/{delivered['id']}/files/{name}",
        headers={**auth("alice"), "Range": f"bytes={start}-{end}"},
    )
    if start >= len(data):
        assert r.status_code == 416
    else:
        assert r.status_code == 206
        assert r.content == data[start : end + 1]


def test_only_the_results_own_files_are_served(
    service: InProcess, delivered: dict[str, Any]
) -> None:
    base = f"/api/v1/requests/{delivered['id']}/files"
    for name in ("manifest.json", ".staging-1", "part-99999.parquet", "%2E%2E"):
        r = service.get(f"{base}/{name}", headers=auth("alice"))
        assert r.status_code == 404, name
        assert r.json()["error"]["type"] == "RequestNotFoundError"
    for name in ("..%2F..%2Fcolumnhub.db", "..%2F..%2F..%2Fcolumnhub.db", "%2Fetc%2Fpasswd"):
        r = service.get(f"{base}/{name}", headers=auth("alice"))
        assert r.status_code == 404, name  # no route, or no such file of the result
    r = service.get(f"{base}/x/{delivered['manifest']['files'][0]}", headers=auth("alice"))
    assert r.status_code == 404  # a single-sample request has no sample "x"


def test_another_users_request_is_not_found(
    service: InProcess, delivered: dict[str, Any]
) -> None:
    rid = delivered["id"]
    name = delivered["manifest"]["files"][0]
    for method, path in [
        ("GET", f"/api/v1/requests/{rid}"),
        ("GET", f"/api/v1/requests/{rid}/manifest"),
        ("GET", f"/api/v1/requests/{rid}/files/{name}"),
        ("DELETE", f"/api/v1/requests/{rid}"),
    ]:
        r = service.request(method, path, headers=auth("bob"))
        assert r.status_code == 404, (method, path)
        assert r.json()["error"]["type"] == "RequestNotFoundError"
    assert rid not in [q["id"] for q in service.get("/api/v1/requests", headers=auth("bob")).json()["requests"]]
    # still alice's, complete (bob's DELETE did nothing); the admin sees it
    r = service.get(f"/api/v1/requests/{rid}", headers=auth("root"))
    assert r.status_code == 200
    assert r.json()["owner"] == "alice"
    assert r.json()["status"] == "complete"


def test_list_is_the_callers_own_and_all_is_admin_only(
    service: InProcess, delivered: dict[str, Any], shared_data: Path
) -> None:
    r = service.post(
        "/api/v1/requests", json=tt_spec(shared_data, columns=["MET_pt"]),
        params={"title": "MET only"}, headers=auth("bob"),
    )
    assert r.status_code == 202
    bobs = r.json()["id"]
    assert wait(service, bobs, "bob")["title"] == "MET only"
    alice = service.get("/api/v1/requests", headers=auth("alice")).json()
    assert {q["owner"] for q in alice["requests"]} == {"alice"}
    assert delivered["id"] in [q["id"] for q in alice["requests"]]
    assert alice["total"] == len(alice["requests"])
    r = service.get("/api/v1/requests?all=true", headers=auth("alice"))
    assert r.status_code == 403
    assert "admin" in r.json()["error"]["message"]
    everyone = service.get("/api/v1/requests?all=true&per_page=1", headers=auth("root")).json()
    assert everyone["total"] >= 2
    assert len(everyone["requests"]) == 1
    ids = set()
    for page in range(1, everyone["total"] + 1):
        body = service.get(f"/api/v1/requests?all=true&per_page=1&page={page}", headers=auth("root")).json()
        ids |= {q["id"] for q in body["requests"]}
    assert {delivered["id"], bobs} <= ids
    complete = service.get("/api/v1/requests?state=complete", headers=auth("bob")).json()
    assert [q["id"] for q in complete["requests"]] == [bobs]


def test_bad_input_is_4xx_never_5xx(service: InProcess, shared_data: Path) -> None:
    cases: list[tuple[Any, int, str]] = [
        (b"{not json", 400, "SpecError"),
        (b"", 400, "SpecError"),
        (b"[1, 2]", 400, "SpecError"),
        (json.dumps(str(shared_data / "spec.yaml")).encode(), 400, "SpecError"),  # not a path!
        (json.dumps({"dataset": {"files": ["/etc/passwd"]}, "columns": ["x"]}).encode(), 403,
         "PermissionDeniedError"),
        (json.dumps(tt_spec(shared_data, where="nJet >=")).encode(), 400, "SpecError"),
        (json.dumps(tt_spec(shared_data, colums=["x"])).encode(), 400, "SpecError"),
    ]
    for body, status, kind in cases:
        r = service.post(
            "/api/v1/requests", content=body, headers={**auth("alice"), "Content-Type": "application/json"}
        )
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["type"] == kind
    huge = {**tt_spec(shared_data), "define": {f"x{i}": "MET_pt * 2" for i in range(100_000)}}
    r = service.post("/api/v1/requests", json=huge, headers=auth("alice"))
    assert r.status_code == 400
    assert "bytes accepted" in r.json()["error"]["message"]
    for query in ("per_page=0", "page=x", "state=done"):
        r = service.get(f"/api/v1/requests?{query}", headers=auth("alice"))
        assert r.status_code == 400, query
    r = service.post(
        "/api/v1/requests", json=tt_spec(shared_data), params={"title": "x" * 501},
        headers=auth("alice"),
    )
    assert r.status_code == 400
    assert "title" in r.json()["error"]["message"]
    r = service.get("/api/v1/requests")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert service.get("/api/v1/requests", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = service.post("/api/v1/requests", json=tt_spec(shared_data), headers=auth("reader"))
    assert r.status_code == 403  # read scope only
    assert service.get("/api/v1/requests/0123abc", headers=auth("alice")).status_code == 404


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["dataset", "columns", "where", "define", "files", "samples", "x"]),
        inner, max_size=4,
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_json)
def test_any_json_body_is_answered_without_a_server_error(service: InProcess, body: Any) -> None:
    r = service.post("/api/v1/requests", json=body, headers=auth("alice"))
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"type", "message"}


def test_a_yaml_body_is_the_same_request_as_its_json(service: InProcess, shared_data: Path) -> None:
    spec = tt_spec(shared_data, columns=["nJet", "MET_pt"])
    as_json = submit(service, spec, "root")
    r = service.post(
        "/api/v1/requests", content=yaml.safe_dump(spec).encode(),
        headers={**auth("root"), "Content-Type": "application/yaml"},
    )
    assert r.status_code == 202, r.text
    db = service.app.state.db
    jobs = [db.get(rid).samples[""] for rid in (as_json, r.json()["id"])]
    assert jobs[0].request_hash == jobs[1].request_hash
    for rid in (as_json, r.json()["id"]):
        assert wait(service, rid, "root")["status"] == "complete"


def test_a_spec_error_has_the_clis_message(
    service: InProcess, shared_data: Path, tmp_path: Path
) -> None:
    bad = tt_spec(shared_data, where="nJet >= (4")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    cli = run_cli("deliver", str(tmp_path / "bad.json"), "-o", str(tmp_path / "out"))
    assert cli.returncode == 2
    message = cli.stderr.strip().removeprefix("columnhub: error: ")
    r = service.post("/api/v1/requests", json=bad, headers=auth("alice"))
    assert r.status_code == 400
    assert r.json()["error"] == {"type": "SpecError", "message": message}


def test_a_missing_column_fails_the_request_with_the_clis_message(
    service: InProcess, shared_data: Path, tmp_path: Path
) -> None:
    bad = tt_spec(shared_data, columns=["Jet_ptt"])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    cli = run_cli("deliver", str(tmp_path / "bad.json"), "-o", str(tmp_path / "out"))
    assert cli.returncode == 2
    message = cli.stderr.strip().removeprefix("columnhub: error: ")
    assert "Jet_pt" in message  # the closest names
    rid = submit(service, bad, "alice")
    status = wait(service, rid, "alice")
    assert status["status"] == "failed"
    assert status["error"] == {"type": "ColumnNotFoundError", "message": message}
    r = service.get(f"/api/v1/requests/{rid}/manifest", headers=auth("alice"))
    assert r.status_code == 409
    assert "failed" in r.json()["error"]["message"]


def test_cache_stats_are_the_column_caches(service: InProcess, delivered: dict[str, Any]) -> None:
    r = service.get("/api/v1/cache/stats", headers=auth("reader"))
    assert r.status_code == 200
    body = r.json()
    direct = ColumnCache(service.app.state.config.cache, read_only=True).stats().to_dict()
    assert body["entries"] == direct["entries"] > 0
    assert body["bytes"] == direct["bytes"]
    assert body["location"] == direct["location"]
    assert service.get("/api/v1/cache/stats").status_code == 401


def test_health_readiness_and_openapi(service: InProcess) -> None:
    assert service.get("/healthz").json() == {"status": "ok"}
    r = service.get("/readyz")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"
    schema = service.get("/openapi.json").json()
    for path in (
        "/api/v1/requests", "/api/v1/requests/{request_id}", "/api/v1/requests/{request_id}/manifest",
        "/api/v1/requests/{request_id}/files/{name}", "/api/v1/cache/stats",
    ):
        assert path in schema["paths"], path
    assert service.get("/docs").status_code == 200


# ---------------------------------------------------------------------------
# single flight, cancellation, limits: each on its own service


@pytest.fixture
def slow_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each part task sleeps first, so a request stays running while the test acts."""
    monkeypatch.setenv("COLUMNHUB_TEST_PART_SLEEP", "0.4")


def test_identical_work_from_two_users_at_once_runs_once(
    tmp_path: Path, shared_data: Path, slow_parts: None
) -> None:
    config = make_config(tmp_path, shared_data)
    spec = tt_spec(shared_data, columns=["Jet_pt", "nJet"])
    with InProcess(create_app(config)) as client:
        ids: dict[str, str] = {}
        barrier = threading.Barrier(2)

        def go(user: str) -> None:
            barrier.wait()
            ids[user] = submit(client, spec, user)

        threads = [threading.Thread(target=go, args=(u,)) for u in ("alice", "bob")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = {user: wait(client, rid, user) for user, rid in ids.items()}
        assert {d["status"] for d in done.values()} == {"complete"}
        jobs = {d["samples"][""]["job"] for d in done.values()}
        assert len(jobs) == 1  # one job for both
        db = client.app.state.db
        assert len(db.jobs()) == 1
        manifests = [
            client.get(f"/api/v1/requests/{rid}/manifest", headers=auth(user)).json()
            for user, rid in ids.items()
        ]
        assert manifests[0] == manifests[1]
        # computed once: every column chunk a miss, none a hit
        assert manifests[0]["cache"]["hits"] == 0
        assert manifests[0]["cache"]["misses"] > 0


def _staging_left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".staging-*")) if folder.is_dir() else []


def test_cancel_stops_the_work_and_leaves_nothing_complete(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNHUB_TEST_PART_SLEEP", "1.0")
    config = make_config(tmp_path, shared_data, workers=1)
    spec = tt_spec(shared_data, chunk_size=20)  # 10 parts, one at a time: 10 s or more
    with InProcess(create_app(config)) as client:
        rid = submit(client, spec, "alice")
        job = client.get(f"/api/v1/requests/{rid}", headers=auth("alice")).json()["samples"][""]["job"]
        folder = config.result_directory(job)
        wait_until(lambda: bool(_staging_left(folder)), "the delivery started writing parts")

        def parts_done() -> int:
            r = client.get(f"/api/v1/requests/{rid}", headers=auth("alice"))
            return int(r.json()["progress"]["parts_done"])

        wait_until(lambda: parts_done() >= 1, "a part was delivered")
        r = client.delete(f"/api/v1/requests/{rid}", headers=auth("alice"))
        assert r.status_code == 200
        assert r.json()["status"] == "cancelled"
        db = client.app.state.db
        wait_until(lambda: db.job(job).state == "cancelled", "the job is cancelled")
        wait_until(lambda: not _staging_left(folder), "the staging is removed")
        status = wait(client, rid, "alice")
        assert status["status"] == "cancelled"
        assert status["progress"]["parts_done"] < status["progress"]["parts_total"]
        manifest = folder / "manifest.json"
        assert not manifest.exists() or json.loads(manifest.read_text())["complete"] is False
        assert not list(folder.glob("part-*"))
        r = client.get(f"/api/v1/requests/{rid}/manifest", headers=auth("alice"))
        assert r.status_code == 409
        assert "cancelled" in r.json()["error"]["message"]
        r = client.get(f"/api/v1/requests/{rid}/files/part-00000.parquet", headers=auth("alice"))
        assert r.status_code == 409


def test_per_user_limits_refuse_with_429_and_403(
    tmp_path: Path, shared_data: Path, slow_parts: None
) -> None:
    config = make_config(tmp_path, shared_data, max_active_requests_per_user=1)
    with InProcess(create_app(config)) as client:
        first = submit(client, tt_spec(shared_data, columns=["MET_pt"]), "alice")
        r = client.post("/api/v1/requests", json=tt_spec(shared_data), headers=auth("alice"))
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "QuotaExceededError"
        assert "max_active_requests_per_user = 1" in r.json()["error"]["message"]
        # another user is not limited by alice's requests
        other = submit(client, tt_spec(shared_data, columns=["nJet"]), "bob")
        assert wait(client, first, "alice")["status"] == "complete"
        wait(client, other, "bob")
        submit(client, tt_spec(shared_data, columns=["Jet_pt"]), "alice")  # room again
    config = make_config(tmp_path, shared_data, max_stored_bytes_per_user=1)
    with InProcess(create_app(config)) as client:  # same database: alice holds results
        r = client.post("/api/v1/requests", json=tt_spec(shared_data), headers=auth("alice"))
        assert r.status_code == 403
        assert r.json()["error"]["type"] == "QuotaExceededError"
        assert "max_stored_bytes_per_user" in r.json()["error"]["message"]
        assert client.app.state.db.stored_bytes("alice") > 1


def test_a_limit_holds_for_submissions_at_once(
    tmp_path: Path, shared_data: Path, slow_parts: None
) -> None:
    config = make_config(tmp_path, shared_data, max_active_requests_per_user=2)
    with InProcess(create_app(config)) as client:
        barrier = threading.Barrier(6)
        answers: list[int] = []

        def go(i: int) -> None:
            spec = tt_spec(shared_data, columns=["MET_pt"], chunk_size=40 + i)  # 6 distinct works
            barrier.wait()
            answers.append(client.post("/api/v1/requests", json=spec, headers=auth("alice")).status_code)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(answers) == [202, 202, 429, 429, 429, 429]
        assert client.app.state.db.active_requests("alice") <= 2


def test_several_samples(service: InProcess, shared_data: Path) -> None:
    spec = {
        "samples": {
            "dy": [str(shared_data / "nano_dy.root")],
            "dimuon": [str(shared_data / "nano_dimuon.root")],
        },
        "columns": ["Muon_pt", "nMuon"],
        "where": "nMuon >= 2",
    }
    r = service.post("/api/v1/requests", json=spec, headers=auth("bob"))
    assert r.status_code == 202
    assert r.json()["samples"] == ["dy", "dimuon"]
    rid = r.json()["id"]
    assert wait(service, rid, "bob")["status"] == "complete"
    manifests = service.get(f"/api/v1/requests/{rid}/manifest", headers=auth("bob")).json()["samples"]
    assert list(manifests) == ["dy", "dimuon"]
    for sample, name in (("dy", "nano_dy.root"), ("dimuon", "nano_dimuon.root")):
        m = manifests[sample]
        data = [
            service.get(f"/api/v1/requests/{rid}/files/{sample}/{f}", headers=auth("bob")).content
            for f in m["files"]
        ]
        assert data == [(Path(m["path"]) / f).read_bytes() for f in m["files"]]
        expected = reference(shared_data / name, ["Muon_pt", "nMuon"], lambda e: e.nMuon >= 2)
        assert_same_rows(table_of(data), expected, ["Muon_pt", "nMuon"])
    r = service.get(f"/api/v1/requests/{rid}/files/{manifests['dy']['files'][0]}", headers=auth("bob"))
    assert r.status_code == 400  # which sample? the message says
    assert "several samples" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------
# configuration


def test_config_file_with_flags_overriding(tmp_path: Path, shared_data: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "service.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "port": 9000,
                "state_dir": "state",  # relative to the file's folder
                "data_roots": [str(shared_data), "more"],
                "max_stored_bytes_per_user": "2G",
                "scheduler": "local",
            }
        )
    )
    config = load_config(path, port=9100, scheduler=None, workers=3)
    assert config.port == 9100  # the flag wins
    assert config.scheduler == "local"  # a flag not given (None) leaves the file's
    assert config.workers == 3
    assert config.state_dir == tmp_path / "conf" / "state"
    assert config.data_roots == [shared_data, tmp_path / "conf" / "more"]
    assert config.max_stored_bytes_per_user == 2 * 1024**3
    assert config.database == f"sqlite:///{tmp_path / 'conf' / 'state' / 'columnhub.db'}"
    assert config.cache == str(tmp_path / "conf" / "state" / "cache")
    path.write_text("prot: 9000\n")
    with pytest.raises(SpecError, match=r"prot: unknown setting; did you mean port"):
        load_config(path)
    with pytest.raises(SpecError, match="not loopback and no authentication"):
        load_config(host="0.0.0.0")
    assert load_config(host="0.0.0.0", insecure_no_auth=True).host == "0.0.0.0"
    with pytest.raises(SpecError, match="oidc_issuer and oidc_audience go together"):
        load_config(oidc_issuer="https://issuer.example")


def test_serve_refuses_a_bad_config_as_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("workers: 0\n")
    done = run_cli("serve", "--config", str(tmp_path / "c.yaml"))
    assert done.returncode == 2
    assert "workers" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_result_ttl_flag_is_read_as_a_duration(tmp_path: Path) -> None:
    done = run_cli("serve", "--result-ttl", "soon", "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 2
    assert "result_ttl: 'soon' is not a duration" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_with_a_database_that_is_down_says_so(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://columnhub:s3cret@127.0.0.1:{port}/columnhub"
    done = run_cli("serve", "--database", url, "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 2
    assert f"127.0.0.1:{port}" in done.stderr
    assert "columnhub: error: cannot open the service database" in done.stderr
    assert "s3cret" not in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------
# end to end: `columnhub serve` on a loopback port with a LocalCluster


_LISTENING = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")


def dask_workers(pid: int) -> list[int]:
    """The Dask worker processes a process started (its children running ``spawn_main``)."""
    children = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    out = []
    for child in children:
        with contextlib.suppress(OSError):  # gone since
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(int(child))
    return out


@contextlib.contextmanager
def serving(
    tmp: Path, *args: str, env: dict[str, str] | None = None, log_name: str = "serve.log"
) -> Iterator[dict[str, Any]]:
    """``columnhub serve --port 0 ARGS`` as a process; its URL read from its log; killed at the end."""
    log_path = tmp / log_name
    log = log_path.open("w")
    full_env = {**os.environ, "COLUMNHUB_CACHE": str(tmp / "unused-default-cache"), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, str(ENTRY_POINT), "serve", "--port", "0", *args],
        stdout=log, stderr=subprocess.STDOUT, env=full_env,
    )
    url = None
    end = time.monotonic() + 180
    try:
        while url is None:
            text = log_path.read_text()
            found = _LISTENING.search(text)
            if found:
                url = found.group(1)
            elif proc.poll() is not None or time.monotonic() > end:
                pytest.fail(f"columnhub serve did not start:\n{text}")
            else:
                time.sleep(0.1)
        yield {"url": url, "proc": proc, "log": log_path}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("serve")
    tokens = write_token_file(tmp / "tokens.yaml")
    with serving(
        tmp, "--scheduler", "local", "--workers", "2", "--data-root", str(shared_data),
        "--state-dir", str(tmp / "state"), "--token-file", str(tokens),
    ) as info:
        yield info


@pytest.mark.distributed
def test_serve_end_to_end_with_a_local_cluster(served: dict[str, Any], shared_data: Path) -> None:
    spec = {
        "samples": {
            "tt": {"files": [str(shared_data / "nano_tt_v12.root")]},
            "dy": [str(shared_data / "nano_dy.root")],
        },
        "columns": ["Jet_pt", "nJet"],
        "where": "nJet >= 2",
        "chunk_size": 50,
        "output": {"target_part_bytes": 1},
    }
    with httpx.Client(base_url=served["url"], timeout=60) as client:
        assert client.get("/readyz").json()["status"] == "ready"
        rid = submit(client, spec, "alice")
        status = wait(client, rid, "alice")
        assert status["status"] == "complete", status
        manifests = client.get(f"/api/v1/requests/{rid}/manifest", headers=auth("alice")).json()
        for sample, name in (("tt", "nano_tt_v12.root"), ("dy", "nano_dy.root")):
            m = manifests["samples"][sample]
            data = [
                client.get(f"/api/v1/requests/{rid}/files/{sample}/{f}", headers=auth("alice")).content
                for f in m["files"]
            ]
            assert data == [(Path(m["path"]) / f).read_bytes() for f in m["files"]]
            expected = reference(shared_data / name, ["Jet_pt", "nJet"], lambda e: e.nJet >= 2)
            assert_same_rows(table_of(data), expected, ["Jet_pt", "nJet"])
    # the service started a LocalCluster: its worker processes are the service's children
    assert "LocalCluster at tcp://127.0.0.1:" in served["log"].read_text()
    assert len(dask_workers(served["proc"].pid)) == 2  # --workers 2


@pytest.mark.distributed
def test_pyarrow_reads_a_part_lazily_over_http_ranges(
    served: dict[str, Any], shared_data: Path
) -> None:
    from fsspec.implementations.http import HTTPFileSystem

    with httpx.Client(base_url=served["url"], timeout=60) as client:
        rid = submit(client, tt_spec(shared_data, chunk_size=200, output={}), "bob")
        assert wait(client, rid, "bob")["status"] == "complete"
        m = client.get(f"/api/v1/requests/{rid}/manifest", headers=auth("bob")).json()
    name = m["files"][0]
    fs = HTTPFileSystem(client_kwargs={"headers": auth("bob")}, block_size=512)
    url = f"{served['url']}/api/v1/requests/{rid}/files/{name}"
    with fs.open(url, "rb") as f:
        parquet = pq.ParquetFile(f)
        assert parquet.metadata.num_rows == m["events"]
        table = parquet.read()
    assert table.equals(pq.read_table(Path(m["path"]) / name))
    expected = reference(
        shared_data / "nano_tt_v12.root", ["Jet_pt", "nJet", "MET_pt"], lambda e: e.nJet >= 4
    )
    assert_same_rows(table, expected, ["Jet_pt", "nJet", "MET_pt"])


@pytest.mark.distributed
def test_serve_stops_cleanly_on_sigterm(served: dict[str, Any]) -> None:
    proc = served["proc"]
    workers = dask_workers(proc.pid)
    assert workers  # the LocalCluster's
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    wait_until(lambda: not any(Path(f"/proc/{w}").exists() for w in workers), "workers gone")
    text = served["log"].read_text()
    assert "Finished server process" in text
    assert "Traceback" not in text


def test_ctrl_c_hands_a_running_request_back_and_a_restart_completes_it(
    tmp_path: Path, shared_data: Path
) -> None:
    from columnhub.service.db import Database

    tokens = write_token_file(tmp_path / "tokens.yaml")
    state = tmp_path / "state"
    args = ("--data-root", str(shared_data), "--state-dir", str(state), "--token-file", str(tokens))
    spec = tt_spec(shared_data, chunk_size=20)  # 10 parts
    with serving(tmp_path, *args, "--workers", "1", env={"COLUMNHUB_TEST_PART_SLEEP": "0.5"}) as first:
        with httpx.Client(base_url=first["url"], timeout=60) as client:
            rid = submit(client, spec, "alice")

            def parts_done() -> int:
                r = client.get(f"/api/v1/requests/{rid}", headers=auth("alice"))
                return int(r.json()["progress"]["parts_done"])

            wait_until(lambda: parts_done() >= 1, "a part was delivered")
        first["proc"].send_signal(signal.SIGINT)
        assert first["proc"].wait(timeout=120) == 130
        log = first["log"].read_text()
        assert "Finished server process" in log
        assert "Traceback" not in log
    db = Database(f"sqlite:///{state / 'columnhub.db'}")
    try:
        view = db.get(rid)
        assert view.status == "queued"  # handed back, not left running nor marked complete
        job = view.samples[""]
        assert not (Path(job.output_dir) / "manifest.json").exists() or not json.loads(
            (Path(job.output_dir) / "manifest.json").read_text()
        )["complete"]
    finally:
        db.close()
    with (
        serving(tmp_path, *args, log_name="serve2.log") as second,
        httpx.Client(base_url=second["url"], timeout=60) as client,
    ):
        assert wait(client, rid, "alice")["status"] == "complete"
        m = client.get(f"/api/v1/requests/{rid}/manifest", headers=auth("alice")).json()
        data = [
            client.get(f"/api/v1/requests/{rid}/files/{f}", headers=auth("alice")).content
            for f in m["files"]
        ]
    assert m["path"] == job.output_dir
    assert sorted(p.name for p in Path(m["path"]).glob("part-*")) == sorted(m["files"])
    expected = reference(
        shared_data / "nano_tt_v12.root", ["Jet_pt", "nJet", "MET_pt"], lambda e: e.nJet >= 4
    )
    assert_same_rows(table_of(data), expected, ["Jet_pt", "nJet", "MET_pt"])


def test_an_api_only_replica_queues_and_another_runs_the_work(
    tmp_path: Path, shared_data: Path
) -> None:
    config = make_config(tmp_path, shared_data)
    with InProcess(create_app(config, runner=False)) as api:
        rid = submit(api, tt_spec(shared_data, columns=["MET_pt", "nJet"]), "alice")
        assert api.get(f"/api/v1/requests/{rid}", headers=auth("alice")).json()["status"] == "queued"
        assert api.app.state.services.runner is None  # nothing runs here
        with InProcess(create_app(config)) as worker:  # a replica on the same database
            assert wait(worker, rid, "alice")["status"] == "complete"
        assert wait(api, rid, "alice")["status"] == "complete"
        m = api.get(f"/api/v1/requests/{rid}/manifest", headers=auth("alice")).json()
    columns = ["MET_pt", "nJet"]
    expected = reference(shared_data / "nano_tt_v12.root", columns, lambda e: e.nJet >= 4)
    data = [(Path(m["path"]) / f).read_bytes() for f in m["files"]]
    assert_same_rows(table_of(data), expected, columns)


def test_columnhub_help_does_not_import_the_service(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(ENTRY_POINT), "serve", "--help"],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0
    assert "--scheduler" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert not {m for m in imported if m.split(".")[0] in ("fastapi", "uvicorn", "sqlalchemy", "dask")}


def test_a_limit_holds_across_two_replicas_on_one_postgresql(
    tmp_path: Path, shared_data: Path, postgres_url: str
) -> None:
    """Two API replicas on one real PostgreSQL, one user's submissions at the same instant.

    Each replica's own lock orders only its own submissions: the limit must
    be checked where both meet, in the database. The test holds a lock on
    the ``requests`` table that lets reads through but makes inserts wait,
    so both replicas' submissions are in flight together (each has read
    the user's count, or waits for the other's transaction) before any
    commits: checked outside the database, both would pass the limit of 1.
    """
    import sqlalchemy as sa

    limit, per_replica = 1, 3
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        replicas.append(
            make_config(
                tmp_path / name, shared_data, database=postgres_url,
                max_active_requests_per_user=limit,
            )
        )
    with (
        InProcess(create_app(replicas[0], runner=False)) as one,
        InProcess(create_app(replicas[1], runner=False)) as two,
    ):
        engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
        answers: list[tuple[int, str]] = []

        def go(client: InProcess, i: int) -> None:
            spec = tt_spec(shared_data, columns=["MET_pt"], chunk_size=40 + i)  # distinct works
            r = client.post("/api/v1/requests", json=spec, headers=auth("alice"))
            answers.append((r.status_code, r.json().get("error", {}).get("type", "")))

        threads = [
            threading.Thread(target=go, args=(client, i + per_replica * k))
            for k, client in enumerate((one, two))
            for i in range(per_replica)
        ]
        try:
            with engine.connect() as blocker, engine.connect() as watcher:
                blocker.exec_driver_sql("BEGIN")
                blocker.exec_driver_sql("LOCK TABLE requests IN SHARE ROW EXCLUSIVE MODE")
                for t in threads:
                    t.start()

                def waiting() -> int:  # one submission per replica is in the database at a time
                    n = watcher.exec_driver_sql(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()"
                    ).scalar_one()
                    watcher.rollback()  # pg_stat_activity is one snapshot per transaction
                    return int(n)

                wait_until(lambda: waiting() >= 2, "both replicas' submissions waiting")
                blocker.exec_driver_sql("COMMIT")
                for t in threads:
                    t.join()
        finally:
            engine.dispose()
        accepted = [a for a in answers if a[0] == 202]
        refused = [a for a in answers if a[0] != 202]
        assert len(answers) == 2 * per_replica
        assert len(accepted) == limit, answers
        assert refused == [(429, "QuotaExceededError")] * (2 * per_replica - limit)
        listed = one.get("/api/v1/requests", headers=auth("alice")).json()
        assert listed["total"] == limit
        assert one.app.state.db.active_requests("alice") == limit


# ---------------------------------------------------------------------------
# complete work shared, never copied; a changed input runs again


def _files_of(client: InProcess, request_id: str, user: str) -> tuple[dict[str, Any], list[bytes]]:
    """The manifest (with ``path``) and every file's bytes, through the files route."""
    m = client.get(f"/api/v1/requests/{request_id}/manifest", headers=auth(user))
    assert m.status_code == 200, m.text
    manifest = m.json()
    data = []
    for name in manifest["files"]:
        r = client.get(f"/api/v1/requests/{request_id}/files/{name}", headers=auth(user))
        assert r.status_code == 200, r.text
        data.append(r.content)
    return manifest, data


def test_identical_work_after_completion_shares_the_result_folder(
    tmp_path: Path, shared_data: Path
) -> None:
    columns = ["Jet_pt", "nJet", "MET_pt"]
    config = make_config(tmp_path, shared_data)
    with InProcess(create_app(config)) as client:
        first = submit(client, tt_spec(shared_data), "alice")
        done = wait(client, first, "alice")
        assert done["status"] == "complete", done
        r = client.post("/api/v1/requests", json=tt_spec(shared_data), headers=auth("bob"))
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "complete"  # answered at submit: nothing queued
        second = r.json()["id"]
        status = client.get(f"/api/v1/requests/{second}", headers=auth("bob")).json()
        assert status["samples"][""]["job"] == done["samples"][""]["job"]
        m1, data1 = _files_of(client, first, "alice")
        m2, data2 = _files_of(client, second, "bob")
        assert m2["path"] == m1["path"]  # the same folder: nothing copied
        assert sorted(p.name for p in config.results_dir.iterdir()) == [Path(m1["path"]).name]
        assert data2 == data1
        # the first owner cancelling their (complete) request leaves the shared result served
        assert client.delete(f"/api/v1/requests/{first}", headers=auth("alice")).status_code == 200
        _m, data3 = _files_of(client, second, "bob")
        assert data3 == data1
        # the rule for quotas: a shared result counts in full for each user holding it
        assert client.app.state.db.stored_bytes("bob") == sum(p["bytes"] for p in m1["parts"])
        assert client.app.state.db.stored_bytes("alice") == 0  # cancelled: not held
    expected = reference(shared_data / "nano_tt_v12.root", columns, lambda e: e.nJet >= 4)
    assert_same_rows(table_of(data2), expected, columns)


@pytest.mark.parametrize("how", ["in_place", "replaced"])
def test_a_rewritten_input_runs_the_work_again(
    tmp_path: Path, shared_data: Path, how: str
) -> None:
    """Between two identical submissions an input file is rewritten: never the old result."""
    data = tmp_path / "data"
    data.mkdir()
    path = data / "events.root"
    shutil.copyfile(shared_data / "nano_dy.root", path)
    columns = ["nMuon", "MET_pt"]
    spec = {
        "dataset": {"files": [str(path)]},
        "columns": columns,
        "where": "nMuon >= 1",
        "chunk_size": 200,
    }
    config = make_config(tmp_path, data)
    with InProcess(create_app(config)) as client:
        first = submit(client, spec, "alice")
        assert wait(client, first, "alice")["status"] == "complete"
        _m1, data1 = _files_of(client, first, "alice")
        if how == "in_place":  # same inode, new bytes
            shutil.copyfile(shared_data / "nano_dimuon.root", path)
        else:  # a new file moved over the old name
            shutil.copyfile(shared_data / "nano_dimuon.root", data / "new.root")
            os.replace(data / "new.root", path)
        second = submit(client, spec, "alice")
        done = wait(client, second, "alice")
        assert done["status"] == "complete", done
        first_job = client.get(f"/api/v1/requests/{first}", headers=auth("alice")).json()
        assert done["samples"][""]["job"] != first_job["samples"][""]["job"]
        _m2, data2 = _files_of(client, second, "alice")
    assert_same_rows(
        table_of(data1), reference(shared_data / "nano_dy.root", columns, lambda e: e.nMuon >= 1),
        columns,
    )
    assert_same_rows(
        table_of(data2),
        reference(shared_data / "nano_dimuon.root", columns, lambda e: e.nMuon >= 1),
        columns,
    )


# ---------------------------------------------------------------------------
# result retention


def _backdate(db_url: str, *, requests: list[str], jobs: list[str], days: float) -> None:
    """Move requests' submission and jobs' end ``days`` into the past (the real database)."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    past = time.time() - days * 86400
    when = sa.func.datetime(past, "unixepoch")
    try:
        with engine.begin() as conn:
            for rid in requests:
                conn.execute(sa.text("UPDATE requests SET created_at = :t WHERE id = :i"),
                             {"t": conn.scalar(sa.select(when)), "i": rid})
            for jid in jobs:
                conn.execute(sa.text("UPDATE jobs SET finished_at = :t WHERE id = :i"),
                             {"t": conn.scalar(sa.select(when)), "i": jid})
    finally:
        engine.dispose()


def test_expired_results_are_removed_and_an_identical_request_runs_again(
    tmp_path: Path, shared_data: Path
) -> None:
    config = make_config(tmp_path, shared_data)
    old_spec = tt_spec(shared_data, columns=["MET_pt", "nJet"])
    kept_spec = tt_spec(shared_data, columns=["nJet"])
    with InProcess(create_app(config)) as client:
        old = submit(client, old_spec, "alice")
        kept = submit(client, kept_spec, "alice")
        bad = submit(client, tt_spec(shared_data, columns=["No_such_column"]), "alice")
        jobs = {rid: wait(client, rid, "alice")["samples"][""]["job"] for rid in (old, kept, bad)}
        assert wait(client, bad, "alice")["status"] == "failed"
        again = submit(client, kept_spec, "bob")  # shares kept's job: a live reference
        assert client.get(f"/api/v1/requests/{again}", headers=auth("bob")).json()[
            "samples"][""]["job"] == jobs[kept]
        folders = {rid: config.result_directory(jobs[rid]) for rid in jobs}
        assert all(folders[rid].is_dir() for rid in (old, kept))  # bad failed before writing
        _backdate(config.database, requests=[old, kept, bad], jobs=list(jobs.values()), days=2)
        # only an admin sweeps; a ttl longer than their age keeps everything
        r = client.post("/api/v1/admin/sweep?ttl=7d", headers=auth("alice"))
        assert r.status_code == 403
        r = client.post("/api/v1/admin/sweep?ttl=3d", headers=auth("root"))
        assert r.status_code == 200
        assert r.json()["expired"] == []
        r = client.post("/api/v1/admin/sweep?ttl=1d", headers=auth("root"))
        assert r.status_code == 200, r.text
        assert sorted(r.json()["expired"]) == sorted([jobs[old], jobs[bad]])
        assert not folders[old].exists()
        assert not folders[bad].exists()
        assert folders[kept].is_dir()
        kept_bytes = sum(p.stat().st_size for p in folders[kept].glob("part-*"))
        assert client.app.state.db.stored_bytes("alice") == kept_bytes  # removed: not counted
        # the expired request says so; its files are never served, never a 404
        status = client.get(f"/api/v1/requests/{old}", headers=auth("alice")).json()
        assert status["status"] == "failed"
        assert status["error"]["type"] == "ResultExpiredError"
        for url in (f"/api/v1/requests/{old}/manifest",
                    f"/api/v1/requests/{old}/files/part-00000.parquet"):
            r = client.get(url, headers=auth("alice"))
            assert r.status_code == 409
            assert "ResultExpiredError" in r.json()["error"]["message"]
        failed = client.get(f"/api/v1/requests/{bad}", headers=auth("alice")).json()
        assert failed["status"] == "failed"
        assert failed["error"]["type"] != "ResultExpiredError"
        # the kept result is still served to both of its users
        _m, kept_data = _files_of(client, kept, "alice")
        assert _files_of(client, again, "bob")[1] == kept_data
        # an identical request runs the work again, into a new folder
        new = submit(client, old_spec, "alice")
        done = wait(client, new, "alice")
        assert done["status"] == "complete"
        assert done["samples"][""]["job"] != jobs[old]
        _m, new_data = _files_of(client, new, "alice")
    expected = reference(shared_data / "nano_tt_v12.root", ["MET_pt", "nJet"], lambda e: e.nJet >= 4)
    assert_same_rows(table_of(new_data), expected, ["MET_pt", "nJet"])
    expected = reference(shared_data / "nano_tt_v12.root", ["nJet"], lambda e: e.nJet >= 4)
    assert_same_rows(table_of(kept_data), expected, ["nJet"])


def test_result_ttl_sweeps_by_itself(tmp_path: Path, shared_data: Path) -> None:
    config = make_config(tmp_path, shared_data, result_ttl="1s")
    assert config.result_ttl == 1.0
    with InProcess(create_app(config)) as client:
        rid = submit(client, tt_spec(shared_data, columns=["MET_pt"]), "alice")
        job = wait(client, rid, "alice")["samples"][""]["job"]

        def expired() -> bool:
            body = client.get(f"/api/v1/requests/{rid}", headers=auth("alice")).json()
            return bool(body["error"]) and body["error"]["type"] == "ResultExpiredError"

        # the sweep takes the job out of service first, then removes its folder
        wait_until(expired, "the request's result swept after result_ttl")
        wait_until(
            lambda: not config.result_directory(job).exists(), "the swept result's folder removed"
        )
        assert expired()  # and it stays expired: nothing lists the removed folder as complete


@pytest.mark.parametrize(("text", "seconds"), [("7d", 604800.0), ("12h", 43200.0), ("90", 90.0)])
def test_result_ttl_reads_durations(tmp_path: Path, text: str, seconds: float) -> None:
    assert load_config(state_dir=tmp_path, result_ttl=text).result_ttl == seconds
    assert load_config(state_dir=tmp_path).result_ttl is None


def test_a_bad_result_ttl_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="7d"):
        load_config(state_dir=tmp_path, result_ttl="a week")
