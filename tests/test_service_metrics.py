"""The service's Prometheus metrics (``GET /metrics``) and the dashboard's overview JSON.

In process (the app's lifespan runs the real runner, database and delivery);
every figure is checked against an independent reference: the events against a
direct uproot read, the parts and bytes against the files on disk, the
request counts against the requests made here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uproot
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

import httpx
from anyio.from_thread import start_blocking_portal
from prometheus_client.parser import text_string_to_metric_families

from columnhub.service.app import create_app
from columnhub.service.config import ServiceConfig

pytestmark = pytest.mark.service


class _PortalTransport(httpx.BaseTransport):
    """httpx's ASGITransport driven from sync code through an event loop in a thread."""

    def __init__(self, app: Any, portal: Any) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()

        async def send() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            resp = await self.inner.handle_async_request(request)
            return resp.status_code, resp.headers.raw, await resp.aread()

        status, headers, body = self.portal.call(send)
        return httpx.Response(status, headers=headers, content=body, request=request)


@contextlib.contextmanager
def TestClient(app: Any) -> Iterator[httpx.Client]:
    """The app in process (httpx.ASGITransport) with its lifespan run (runners started)."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(app.router.lifespan_context(app)),
        httpx.Client(
            transport=_PortalTransport(app, portal), base_url="http://service.test"
        ) as client,
    ):
        yield client


COLUMNS = ["MET_pt", "Muon_pt"]


def _spec(data: Path, *, where: str) -> dict[str, Any]:
    return {
        "dataset": {"name": "dy", "files": [str(data / "nano_dy.root")]},
        "columns": COLUMNS,
        "where": where,
    }


def _selected(data: Path, threshold: int) -> int:
    """Independent reference: events of nano_dy.root with ``nMuon >= threshold`` (uproot)."""
    with uproot.open(data / "nano_dy.root") as f:
        n = f["Events"]["nMuon"].array(library="np")
    return int(np.count_nonzero(n >= threshold))


def _scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed by prometheus_client's own parser: (sample name, labels) -> value."""
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(m: dict[Any, float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def _wait(client: httpx.Client, rid: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/api/v1/requests/{rid}").json()
        if status["status"] in ("complete", "failed", "cancelled"):
            return status
        assert time.monotonic() < deadline, f"request {rid} still {status['status']}: {status}"
        time.sleep(0.05)


@pytest.fixture
def config(tmp_path: Path, shared_data: Path) -> ServiceConfig:
    return ServiceConfig(
        state_dir=tmp_path / "state",
        cache=str(tmp_path / "cache"),
        data_roots=[shared_data],
    )


def test_metrics_counters_move_by_the_request(config: ServiceConfig, shared_data: Path) -> None:
    app = create_app(config)
    with TestClient(app) as client:
        before = _scrape(client)
        assert _value(before, "columnhub_requests", state="complete") == 0
        assert _value(before, "columnhub_events_delivered_total") == 0

        resp = client.post("/api/v1/requests", json=_spec(shared_data, where="nMuon >= 2"))
        assert resp.status_code == 202, resp.text
        first = _wait(client, resp.json()["id"])
        assert first["status"] == "complete", first
        manifest = client.get(f"/api/v1/requests/{first['id']}/manifest").json()
        files = [Path(manifest["path"]) / name for name in manifest["files"]]
        after = _scrape(client)

        # independent references: uproot for the events, the files on disk for parts/bytes
        assert _value(after, "columnhub_events_delivered_total") == _selected(shared_data, 2)
        assert (
            _value(after, "columnhub_parts_done_total")
            == len(files)
            == len(list(Path(manifest["path"]).glob("part-*")))
        )
        assert _value(after, "columnhub_bytes_written_total") == sum(
            f.stat().st_size for f in files
        )
        assert _value(after, "columnhub_requests", state="complete") == 1
        assert _value(after, "columnhub_requests", state="queued") == 0
        assert _value(after, "columnhub_jobs", state="complete") == 1
        misses = _value(after, "columnhub_cache_misses_total")
        assert misses > 0  # a cold cache computed every column chunk
        assert _value(after, "columnhub_cache_hits_total") == 0
        assert _value(after, "columnhub_cache_hit_ratio") == 0
        # the HTTP histogram counted exactly one submission, by route template (not by id)
        assert (
            _value(
                after,
                "columnhub_http_request_duration_seconds_count",
                method="POST",
                route="/api/v1/requests",
                status="202",
            )
            == 1
        )
        statuses = [k for k in after if k[0] == "columnhub_http_request_duration_seconds_count"]
        assert all(first["id"] not in dict(labels)["route"] for _, labels in statuses)
        assert _value(after, "columnhub_request_duration_seconds_count") == 1

        # the same request again: it shares the complete job (and its folder), so no
        # job, part, event or cache lookup is added: only a request
        again = _wait(
            client,
            client.post("/api/v1/requests", json=_spec(shared_data, where="nMuon >= 2")).json()[
                "id"
            ],
        )
        assert again["status"] == "complete"
        m2 = _scrape(client)
        assert again["samples"][""]["job"] == first["samples"][""]["job"]
        assert _value(m2, "columnhub_requests", state="complete") == 2
        assert _value(m2, "columnhub_jobs", state="complete") == 1
        assert _value(m2, "columnhub_events_delivered_total") == _selected(shared_data, 2)
        assert _value(m2, "columnhub_cache_misses_total") == misses
        assert _value(m2, "columnhub_cache_hits_total") == 0
        assert _value(m2, "columnhub_cache_hit_ratio") == 0
        assert _value(m2, "columnhub_results_reused_total") == 0

        # the overview shows the same figures, and the caller's requests newest first
        ov = client.get("/api/v1/overview").json()
        listed = client.get("/api/v1/requests").json()
        assert [r["id"] for r in ov["requests"]] == [again["id"], first["id"]]
        assert {r["id"]: r["status"] for r in ov["requests"]} == {
            r["id"]: r["status"] for r in listed["requests"]
        }
        assert ov["counts"]["complete"] == 2
        assert ov["throughput"]["events_delivered"] == _selected(shared_data, 2)
        assert ov["cache"]["hits"] == 0
        assert ov["cache"]["misses"] == misses
        assert ov["workers"] == {"scheduler": None, "mode": "threads", "workers": [], "error": None}


def test_two_apps_in_one_process_keep_their_own_metrics(tmp_path: Path, shared_data: Path) -> None:
    a = create_app(
        ServiceConfig(
            state_dir=tmp_path / "a", cache=str(tmp_path / "ca"), data_roots=[shared_data]
        )
    )
    b = create_app(
        ServiceConfig(
            state_dir=tmp_path / "b", cache=str(tmp_path / "cb"), data_roots=[shared_data]
        )
    )
    with TestClient(a) as ca, TestClient(b) as cb:
        rid = ca.post("/api/v1/requests", json=_spec(shared_data, where="nMuon >= 1")).json()["id"]
        assert _wait(ca, rid)["status"] == "complete"
        ma, mb = _scrape(ca), _scrape(cb)
    assert _value(ma, "columnhub_events_delivered_total") == _selected(shared_data, 1)
    assert _value(mb, "columnhub_events_delivered_total") == 0
    assert _value(mb, "columnhub_requests", state="complete") == 0
    assert (
        _value(
            ma,
            "columnhub_http_request_duration_seconds_count",
            method="POST",
            route="/api/v1/requests",
            status="202",
        )
        == 1
    )
    assert (
        _value(
            mb,
            "columnhub_http_request_duration_seconds_count",
            method="POST",
            route="/api/v1/requests",
            status="202",
        )
        == 0
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_inference_server_down_is_reported(tmp_path: Path, shared_data: Path) -> None:
    pytest.importorskip("tritonclient.http")
    port = _closed_port()  # nothing listens there: a real connection refused
    registry = tmp_path / "models"
    registry.mkdir()
    (registry / "tagger.onnx").write_bytes(b"only hashed by the card; the probe never loads it")
    (registry / "tagger.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "tagger",
                "version": "3",
                "file": "tagger.onnx",
                "granularity": "event",
                "inputs": ["MET_pt"],
                "outputs": [{"name": "score"}],
                "remote": {
                    "servers": [f"127.0.0.1:{port}"],
                    "model_name": "tagger",
                    "model_version": "3",
                    "timeout_s": 1.0,
                },
            }
        )
    )
    config = ServiceConfig(
        state_dir=tmp_path / "s",
        cache=str(tmp_path / "c"),
        models=str(registry),
        data_roots=[shared_data],
    )
    with TestClient(create_app(config)) as client:
        m = _scrape(client)
        ov = client.get("/api/v1/overview").json()
    assert (
        _value(
            m,
            "columnhub_inference_server_up",
            model="tagger",
            version="3",
            server=f"127.0.0.1:{port}",
            protocol="http",
        )
        == 0
    )
    assert (
        "columnhub_inference_server_up",
        (
            ("model", "tagger"),
            ("protocol", "http"),
            ("server", f"127.0.0.1:{port}"),
            ("version", "3"),
        ),
    ) in m
    [server] = ov["inference"]["servers"]
    assert server["server"] == f"127.0.0.1:{port}"
    assert server["up"] is False
    assert server["error"]


# ---------------------------------------------------------------------------
# property: the figures are the sums over the complete jobs, read incrementally

_job = st.fixed_dictionaries(
    {
        "end": st.sampled_from(["complete", "failed", "queued"]),
        "manifest": st.booleans(),  # False: the result was removed; the progress counts
        "events": st.integers(0, 10**9),
        "parts": st.lists(st.integers(0, 10**8), max_size=5),
        "hits": st.integers(0, 10**4),
        "misses": st.integers(0, 10**4),
        "rows": st.dictionaries(
            st.sampled_from(["tagger@1", "btag@2"]), st.integers(0, 10**6), max_size=2
        ),
    }
)


def test_figures_are_sums_over_the_complete_jobs(tmp_path: Path) -> None:
    from fastapi import FastAPI

    from columnhub.output.manifest import write_manifest
    from columnhub.service.db import Database
    from columnhub.service.metrics import ServiceMetrics

    config = ServiceConfig(state_dir=tmp_path / "state", cache=str(tmp_path / "cache"))
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    app = FastAPI()
    app.state.db, app.state.config = db, config
    metrics = ServiceMetrics(app)
    truth = {"events": 0, "parts": 0, "bytes": 0, "hits": 0, "misses": 0, "complete": 0}
    rows: dict[str, int] = {}
    counter = iter(range(10**6))

    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
    @given(jobs=st.lists(_job, min_size=1, max_size=4))
    def check(jobs: list[dict[str, Any]]) -> None:
        for j in jobs:
            n = next(counter)
            db.submit("alice", {"n": n}, None, {"": (f"hash-{n}", {"n": n})})
            if j["end"] == "queued":
                continue
            job = db.claim("w", 30.0, results=config.results_dir)
            assert job is not None
            if j["end"] == "failed":
                db.fail(job.id, "w", "SpecError", "bad")
                continue
            parts = [{"name": f"part-{i:05d}", "bytes": b} for i, b in enumerate(j["parts"])]
            progress = {
                "events": j["events"],
                "parts_done": len(parts),
                "bytes": sum(j["parts"]),
                "cache_hits": j["hits"],
                "cache_misses": j["misses"],
            }
            if j["manifest"]:
                directory = config.result_directory(job.id)
                directory.mkdir(parents=True)
                write_manifest(
                    directory,
                    {
                        "complete": True,
                        "events": j["events"],
                        "parts": parts,
                        "cache": {"hits": j["hits"], "misses": j["misses"]},
                        "inference": {m: {"rows": r, "seconds": 0.5} for m, r in j["rows"].items()},
                    },
                )
                for m, r in j["rows"].items():
                    rows[m] = rows.get(m, 0) + r
                progress = {"events": -1}  # the manifest, not the progress, is the truth
            assert db.finish(job.id, "w", 0, progress=progress)
            truth["events"] += j["events"]
            truth["parts"] += len(parts)
            truth["bytes"] += sum(j["parts"])
            truth["hits"] += j["hits"]
            truth["misses"] += j["misses"]
            truth["complete"] += 1
        s = metrics.snapshot()
        got = {
            "events": s.events_delivered,
            "parts": s.parts_done,
            "bytes": s.bytes_written,
            "hits": s.cache_hits,
            "misses": s.cache_misses,
            "complete": s.jobs["complete"],
        }
        assert got == truth
        assert {m: v["rows"] for m, v in s.inference.items()} == rows
        scraped = {
            (x.name, tuple(sorted(x.labels.items()))): x.value
            for family in text_string_to_metric_families(metrics.exposition()[0].decode())
            for x in family.samples
        }
        assert scraped[("columnhub_events_delivered_total", ())] == truth["events"]
        assert scraped[("columnhub_request_duration_seconds_count", ())] == truth["complete"]

    try:
        check()
    finally:
        db.close()


@pytest.mark.distributed
# the scheduler's HTTP server falls back to another port when another process on this
# shared machine holds Dask's default 8787 (LocalCluster(dashboard_address=None) still
# serves HTTP there first), and says so with a UserWarning
@pytest.mark.filterwarnings("ignore:Port 8787 is already in use:UserWarning")
def test_overview_lists_the_local_clusters_workers(tmp_path: Path, shared_data: Path) -> None:
    pytest.importorskip("distributed")
    config = ServiceConfig(
        state_dir=tmp_path / "state",
        cache=str(tmp_path / "cache"),
        data_roots=[shared_data],
        scheduler="local",
        workers=2,
    )
    app = create_app(config)
    with TestClient(app) as client:
        cluster = app.state.services.cluster
        addresses = sorted(w.worker_address for w in cluster.workers.values())
        scheduler = cluster.scheduler_address
        ov = client.get("/api/v1/overview").json()
        rid = client.post("/api/v1/requests", json=_spec(shared_data, where="nMuon >= 1"))
        done = _wait(client, rid.json()["id"])
    workers = ov["workers"]
    assert workers["error"] is None
    assert workers["mode"] == "dask"
    assert workers["scheduler"] == scheduler
    assert len(workers["workers"]) == 2
    assert sorted(w["address"] for w in workers["workers"]) == addresses
    assert all(w["nthreads"] == 1 for w in workers["workers"])
    assert done["status"] == "complete"


TRITON_PYTHON = Path(__file__).resolve().parents[1] / ".venv-triton" / "bin" / "python"
TRITON_SERVER = Path(__file__).resolve().parent / "triton_server.py"


@contextlib.contextmanager
def _triton(workdir: Path, model: str) -> Iterator[str]:
    """A real Triton server (``tests/triton_server.py``, pytriton) on loopback; its HTTP address."""
    if not TRITON_PYTHON.exists():
        pytest.skip(f"no Triton venv at {TRITON_PYTHON}: run scripts/setup-triton-venv.sh")
    http, grpc, metrics = _closed_port(), _closed_port(), _closed_port()
    ready = workdir / "ready"
    log = workdir / "triton.log"
    shm = Path("/dev/shm")  # the Python backend's shared memory outlives a killed server
    shm_before = {p.name for pat in ("psm_*", "pytrtion*") for p in shm.glob(pat)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(TRITON_PYTHON),
                str(TRITON_SERVER),
                *("--http-port", str(http), "--grpc-port", str(grpc)),
                *("--metrics-port", str(metrics), "--ready-file", str(ready)),
                *("--workspace", str(workdir / "pytriton"), "--model", model),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert proc.poll() is None, f"triton exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"triton not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield f"127.0.0.1:{http}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for name in {p.name for pat in ("psm_*", "pytrtion*") for p in shm.glob(pat)} - shm_before:
            (shm / name).unlink(missing_ok=True)


@pytest.mark.triton
def test_inference_rows_and_server_health_with_a_real_triton(
    tmp_path: Path, shared_data: Path
) -> None:
    pytest.importorskip("tritonclient.http")
    from columnhub.inference.testing import make_mlp_onnx

    registry = tmp_path / "models"
    registry.mkdir()
    make_mlp_onnx(registry / "evt.onnx", n_features=3, hidden=(8,), seed=5)
    with _triton(tmp_path, f"evt_mlp:3={registry / 'evt.onnx'}") as server:
        dead = f"127.0.0.1:{_closed_port()}"
        cards = {
            "evt.yaml": ("evt_mlp", "3", [server]),  # served
            "ghost.yaml": ("ghost", "1", [server, dead]),  # not on the server; server down
        }
        for card, (name, version, servers) in cards.items():
            (registry / card).write_text(
                yaml.safe_dump(
                    {
                        "name": name,
                        "version": version,
                        "file": "evt.onnx",
                        "inputs": ["MET_pt", "MET_phi", "nJet"],
                        "outputs": [{"name": f"{name}_score"}],
                        "remote": {
                            "servers": servers,
                            "model_name": name,
                            "model_version": version,
                            "timeout_s": 5.0,
                        },
                    }
                )
            )
        config = ServiceConfig(
            state_dir=tmp_path / "state",
            cache=str(tmp_path / "cache"),
            models=str(registry),
            data_roots=[shared_data],
        )
        spec = {
            "dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
            "columns": ["MET_pt", "evt_mlp_score"],
            "models": [{"model": "evt_mlp", "version": 3, "backend": "remote"}],
            "chunk_size": 50,
        }
        with TestClient(create_app(config)) as client:
            resp = client.post("/api/v1/requests", json=spec)
            assert resp.status_code == 202, resp.text
            done = _wait(client, resp.json()["id"])
            assert done["status"] == "complete", done
            m = _scrape(client)
            ov = client.get("/api/v1/overview").json()
    with uproot.open(shared_data / "nano_tt_v12.root") as f:
        events = f["Events"].num_entries  # one row per event (granularity event)
    assert _value(m, "columnhub_inference_rows_total", model="evt_mlp@3") == events
    assert _value(m, "columnhub_inference_seconds_total", model="evt_mlp@3") > 0
    assert _value(m, "columnhub_inference_rows_per_second", model="evt_mlp@3") > 0
    up = {
        (dict(labels)["model"], dict(labels)["server"]): v
        for (name, labels), v in m.items()
        if name == "columnhub_inference_server_up"
    }
    assert up == {("evt_mlp", server): 1.0, ("ghost", server): 0.0, ("ghost", dead): 0.0}
    health = {(s["model"], s["server"]): s["up"] for s in ov["inference"]["servers"]}
    assert health == {(k[0], k[1]): v == 1.0 for k, v in up.items()}
    assert ov["inference"]["models"]["evt_mlp@3"]["rows"] == events
