"""The service's persistence and queue: migrations, single flight, claims, resume, cancel, errors.

Real databases (SQLite files and a real PostgreSQL on loopback), real runner
processes killed with SIGKILL, real deliveries checked against a direct
uproot read.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import awkward as ak
import pyarrow.parquet as pq
import pytest
import uproot
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("sqlalchemy")
pytest.importorskip("alembic")

import sqlalchemy as sa

import columnhub
from columnhub.errors import RequestNotFoundError
from columnhub.service.db import Database, RequestView
from columnhub.service.jobs import Runner
from columnhub.spec import Request
from columnhub.synth import synthesize

pytestmark = pytest.mark.service

REPO = Path(__file__).resolve().parents[1]
KEYS = ["run", "luminosityBlock", "event"]
PART_SLEEP = "COLUMNHUB_TEST_PART_SLEEP"


@dataclass
class Config:
    """The fields of the service configuration a Runner reads (``ServiceConfig`` has them)."""

    state_dir: Path
    cache: str | None = None
    scheduler: str | None = None
    workers: int | None = 1
    runners: int = 1
    lease_s: float = 30.0


# -- data and helpers -------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> list[Path]:
    """1,200 NanoAOD-like events in 2 files, baskets of 100 events."""
    return synthesize(
        shared_data / "nano_tt_v12.root",
        events=1200,
        output=tmp_path_factory.mktemp("queue-data"),
        files=2,
        basket_events=100,
        branches=["Jet_pt", "Jet_eta", "MET_pt", "Muon_pt"],
    )


def request(
    files: list[Path], columns: list[str], where: str | None = None, **extra: Any
) -> Request:
    """A request with one part per chunk of 200 events (6 parts over the two files)."""
    return Request.from_dict(
        {
            "dataset": {"name": "synth", "files": [str(f) for f in files]},
            "columns": columns,
            **({"where": where} if where else {}),
            "chunk_size": 200,
            "output": {"target_part_bytes": 1},
            **extra,
        }
    )


def submit(db: Database, req: Request, owner: str = "alice") -> RequestView:
    """Submit one single-sample request as the app does."""
    return db.submit(owner, req.to_dict(), None, {"": (req.hash, req.model_dump(mode="json"))})


def reference(files: list[Path], columns: list[str], where: str | None) -> ak.Array:
    """What a delivery must hold: read straight with uproot, in file order."""
    names = [*KEYS, *columns]
    return ak.concatenate([uproot.open(f)["Events"].arrays(names, cut=where) for f in files])


def check_result(directory: Path, files: list[Path], columns: list[str], where: str | None) -> None:
    """A complete result: every part once (manifest = files on disk), rows = the uproot read."""
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["complete"]
    on_disk = sorted(p.name for p in directory.iterdir() if p.name.startswith("part-"))
    assert on_disk == sorted(manifest["files"])
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".staging")]
    table = pq.ParquetDataset([str(directory / n) for n in manifest["files"]]).read()
    got = ak.from_arrow(table)
    want = reference(files, columns, where)
    assert len(got) == len(want) == manifest["events"]
    for name in [*KEYS, *columns]:
        assert ak.to_list(got[name]) == ak.to_list(want[name]), name
    keys = list(zip(*(ak.to_list(got[k]) for k in KEYS), strict=True))
    assert len(set(keys)) == len(keys)  # no event twice


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database: a SQLite file, or a new database on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'columnhub.db'}"
    return str(request.getfixturevalue("postgres_url"))


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


RUNNER_PROCESS = """
import logging, sys, time
from dataclasses import dataclass
from pathlib import Path
from columnhub.service.db import Database
from columnhub.service.jobs import Runner

url, state_dir, lease_s, runners, log_path, mode = sys.argv[1:7]
logging.basicConfig(filename=log_path, level=logging.INFO, format="%(process)d %(message)s")

@dataclass
class Config:
    state_dir: Path
    cache: str | None = None
    scheduler: str | None = None
    workers: int | None = 1
    runners: int = 1
    lease_s: float = 30.0

db = Database(url)
runner = Runner(db, Config(Path(state_dir), runners=int(runners), lease_s=float(lease_s)))
print("ready", flush=True)
if mode == "drain":  # when the test says go, until no job is left to do (by any replica)
    while not Path(log_path + ".go").exists():
        time.sleep(0.01)
    runner.start()
    while True:
        counts = db.job_counts()
        if counts["queued"] + counts["running"] == 0:
            break
        time.sleep(0.1)
    runner.stop()
else:  # run jobs until killed
    while True:
        if not runner.run_once():
            time.sleep(0.05)
"""


def start_runner_process(
    url: str,
    state_dir: Path,
    log: Path,
    *,
    lease_s: float,
    runners: int,
    mode: str,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A replica: its own process, its own Database and Runner, on the same database.

    Its log lines go to ``log``, its stdout and stderr to ``log`` + ``.out``.
    """
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    args = [str(state_dir), str(lease_s), str(runners), str(log), mode]
    with open(f"{log}.out", "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", RUNNER_PROCESS, url, *args],
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def output_of(log: Path) -> str:
    """The last lines a runner process printed (for a failure's message)."""
    return Path(f"{log}.out").read_text(errors="replace")[-3000:]


def deliveries(*logs: Path) -> collections.Counter[str]:
    """How many times each job was started, from the runners' own log lines."""
    started: collections.Counter[str] = collections.Counter()
    for log in logs:
        if log.exists():
            started.update(re.findall(r"job ([0-9a-f]{32}) \(attempt", log.read_text()))
    return started


# -- migrations --------------------------------------------------------------------


def test_migrations_make_the_contract_tables_and_upgrading_again_changes_nothing(
    db_url: str,
) -> None:
    from alembic.script import ScriptDirectory

    import columnhub.service.db as dbmod

    script = ScriptDirectory(str(Path(dbmod.__file__).with_name("migrations")))
    db = Database(db_url, upgrade=False)
    assert db.revision() is None  # nothing made before the upgrade
    db.upgrade()
    assert db.revision() == script.get_current_head()
    inspector = sa.inspect(db.engine)
    columns = {
        t: {c["name"] for c in inspector.get_columns(t)} for t in inspector.get_table_names()
    }
    assert columns["jobs"] >= {
        "id",
        "request_hash",
        "spec",
        "state",
        "output_dir",
        "claimed_by",
        "lease_expires_at",
        "attempts",
        "progress",
        "error_type",
        "error_message",
        "stored_bytes",
        "created_at",
        "started_at",
        "finished_at",
    }
    assert columns["requests"] >= {"id", "owner", "title", "created_at", "cancelled", "spec"}
    assert columns["request_jobs"] >= {"request_id", "sample", "job_id"}
    if db.is_sqlite:  # readers never wait for the writer; writers wait for each other
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    view = db.submit("alice", {"x": 1}, "t", {"": ("h" * 32, {"x": 1})})
    db.upgrade()  # again: a no-op that keeps the data
    other = Database(db_url)  # another replica starting on the same database
    assert other.revision() == script.get_current_head()
    assert other.get(view.id).to_json() == view.to_json()
    other.close()
    db.close()


def test_migrations_ship_in_the_wheel(tmp_path: Path) -> None:
    """The wheel holds env.py and the versions, so ``Database.upgrade`` works installed."""
    import zipfile

    out = tmp_path / "dist"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0 and "hatchling" in built.stderr:
        pytest.skip("hatchling is not installed in this environment (pip wheel needs it)")
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = out.glob("columnhub-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    here = Path(__file__).resolve().parents[1] / "src"
    shipped = {
        p.relative_to(here).as_posix()
        for p in (here / "columnhub" / "service" / "migrations").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert shipped
    assert shipped <= names


# -- single flight ---------------------------------------------------------------


def test_single_flight_same_work_one_job_different_work_two(db_url: str, files: list[Path]) -> None:
    db = Database(db_url)
    met = request(files, ["MET_pt"])
    a = submit(db, met, "alice")
    b = submit(db, met, "bob")
    c = submit(db, request(files, ["Jet_pt"]), "alice")
    assert a.samples[""].id == b.samples[""].id
    assert c.samples[""].id != a.samples[""].id
    assert len(db.jobs()) == 2
    # each user sees only their own request
    assert {v.id for v in db.list("alice")[0]} == {a.id, c.id}
    with pytest.raises(RequestNotFoundError, match=a.id):
        db.get(a.id, "bob")
    db.close()


def test_single_flight_holds_for_submits_at_the_same_instant(db_url: str) -> None:
    """Eight threads submit the same work at once (each its own connection): one job."""
    db = Database(db_url)
    barrier = threading.Barrier(8)
    views: list[RequestView] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait()
            views.append(db.submit(f"user{i}", {"x": 1}, None, {"": ("f" * 32, {"x": 1})}))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({v.samples[""].id for v in views}) == 1
    assert len(db.jobs()) == 1
    db.close()


@settings(max_examples=25, deadline=None)
@given(
    submits=st.lists(
        st.tuples(
            st.sampled_from(["alice", "bob"]),
            st.lists(st.sampled_from("abcd"), min_size=1, max_size=3, unique=True),
        ),
        min_size=1,
        max_size=8,
    ),
    done=st.sets(st.sampled_from("abcd")),
)
def test_single_flight_property(submits: list[tuple[str, list[str]]], done: set[str]) -> None:
    """Against a brute-force model: one live job per hash; a completed hash gets a new job."""
    db = Database("sqlite://")
    live: dict[str, str] = {}  # hash -> its queued job
    made: list[str] = []
    for round_ in range(2):
        for owner, hashes in submits:
            samples = {f"s{h}": (h * 32, {"h": h}) for h in hashes}
            view = db.submit(owner, {"samples": list(samples)}, None, samples)
            assert list(view.samples) == sorted(samples)
            for h in hashes:
                job = view.samples[f"s{h}"]
                assert job.request_hash == h * 32
                assert job.state == "queued"
                if h in live:
                    assert job.id == live[h]
                else:
                    assert job.id not in made
                    live[h] = job.id
                    made.append(job.id)
        if round_ == 0:  # the jobs of ``done`` complete; the others go back to the queue
            claimed = []
            while (job := db.claim("w", 60)) is not None:
                claimed.append(job)
            assert sorted(j.id for j in claimed) == sorted(live.values())
            for job in claimed:
                h = job.request_hash[0]
                if h in done:
                    assert db.finish(job.id, "w", 0)
                    del live[h]
                else:
                    assert db.release(job.id, "w")
    assert sorted(j.id for j in db.jobs()) == sorted(made)
    assert sorted(j.id for j in db.jobs(state="queued")) == sorted(live.values())
    db.close()


# -- claims ------------------------------------------------------------------------


def test_a_lease_taken_by_another_runner_stops_the_first(db_url: str) -> None:
    db = Database(db_url)
    view = db.submit("alice", {"x": 1}, None, {"": ("a" * 32, {"x": 1})})
    first = db.claim("runner-1", 0.2)
    assert first is not None
    assert first.id == view.samples[""].id
    assert first.attempts == 1
    assert db.claim("runner-2", 30) is None  # held
    time.sleep(0.3)  # the lease runs out (runner-1 stopped heartbeating)
    second = db.claim("runner-2", 30)
    assert second is not None
    assert second.id == first.id
    assert second.attempts == 2
    assert not db.heartbeat(first.id, "runner-1", {"parts_done": 1}, 30)
    assert not db.finish(first.id, "runner-1", 10)
    assert not db.fail(first.id, "runner-1", "X", "late")
    assert db.heartbeat(first.id, "runner-2", {"parts_done": 2}, 30)
    assert db.finish(first.id, "runner-2", 10)
    job = db.job(first.id)
    assert (job.state, job.claimed_by, job.progress["parts_done"]) == ("complete", "runner-2", 2)
    db.close()


@pytest.mark.slow
def test_two_replicas_deliver_every_job_exactly_once(
    db_url: str, files: list[Path], tmp_path: Path
) -> None:
    """Two runner processes, two threads each, 8 queued jobs: each delivered once, correctly."""
    state = tmp_path / "state"
    db = Database(db_url)
    wanted: dict[str, tuple[list[str], str | None]] = {}
    column_sets = [["MET_pt"], ["Jet_pt"], ["Jet_eta"], ["Muon_pt"]]
    for i in range(8):
        columns = column_sets[i % 4]
        where = None if i < 4 else "MET_pt > 20"
        view = submit(db, request(files, columns, where))
        wanted[view.samples[""].id] = (columns, where)
    logs = [tmp_path / "replica-1.log", tmp_path / "replica-2.log"]
    procs = [
        start_runner_process(
            db_url, state, log, lease_s=30, runners=2, mode="drain", env={PART_SLEEP: "0.05"}
        )
        for log in logs
    ]
    try:
        wait_for(
            lambda: all(
                "ready" in output_of(log) or p.poll() is not None
                for p, log in zip(procs, logs, strict=True)
            ),
            "both replicas started",
        )
        for log in logs:  # both start claiming at the same moment
            Path(f"{log}.go").touch()
        for proc, log in zip(procs, logs, strict=True):
            assert proc.wait(timeout=300) == 0, output_of(log)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    started = deliveries(*logs)
    assert started == collections.Counter(dict.fromkeys(wanted, 1))  # each job run once
    assert all(deliveries(log) for log in logs)  # both replicas took jobs: they contended
    results = state / "results"
    assert sorted(p.name for p in results.iterdir()) == sorted(wanted)  # one output dir per job
    for job in db.jobs():
        assert (job.state, job.attempts) == ("complete", 1)
        assert job.output_dir == str(results / job.id)
        check_result(Path(job.output_dir), files, *wanted[job.id])
        manifest = json.loads((Path(job.output_dir) / "manifest.json").read_text())
        assert job.stored_bytes == sum(p["bytes"] for p in manifest["parts"])
        assert job.progress["parts_done"] == job.progress["parts_total"] == len(manifest["parts"])
    db.close()


# -- restart resume -------------------------------------------------------------


@pytest.mark.slow
def test_a_runner_killed_mid_delivery_is_resumed_after_its_lease(
    db_url: str, files: list[Path], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    db = Database(db_url)
    columns, where = ["Jet_pt", "MET_pt"], "MET_pt > 10"
    view = submit(db, request(files, columns, where))
    job_id = view.samples[""].id
    log = tmp_path / "killed.log"
    proc = start_runner_process(
        db_url, state, log, lease_s=8, runners=1, mode="forever", env={PART_SLEEP: "0.4"}
    )
    try:
        wait_for(
            lambda: db.job(job_id).progress["parts_done"] >= 2 or proc.poll() is not None,
            "two parts delivered",
        )
        assert proc.poll() is None, output_of(log)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    output = state / "results" / job_id
    job = db.job(job_id)
    assert (job.state, job.attempts) == ("running", 1)
    assert job.progress["parts_done"] < job.progress["parts_total"] == 6  # killed mid-delivery
    assert [p for p in output.iterdir() if p.name.startswith(".staging")]  # what it left
    manifest = output / "manifest.json"
    assert not manifest.exists() or not json.loads(manifest.read_text())["complete"]
    runner = Runner(db, Config(state, lease_s=8))
    assert not runner.run_once()  # the dead runner's lease still holds
    wait_for(runner.run_once, "the lease to expire and the job to be claimed again", timeout=60)
    job = db.job(job_id)
    assert (job.state, job.attempts) == ("complete", 2)
    assert db.get(view.id).status == "complete"
    check_result(output, files, columns, where)
    assert deliveries(log)[job_id] == 1  # the killed process started it once
    db.close()


# -- cancel ------------------------------------------------------------------------


@pytest.mark.slow
def test_cancel_while_running_stops_the_delivery_and_removes_its_output(
    files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    cache = tmp_path / "cache"
    db = Database(f"sqlite:///{state / 'columnhub.db'}")
    columns = ["Jet_eta", "Muon_pt"]
    cancelled = submit(db, request(files, columns))
    after = submit(db, request(files, ["MET_pt"]))  # queued behind it
    job_id = cancelled.samples[""].id
    monkeypatch.setenv(PART_SLEEP, "0.5")
    runner = Runner(db, Config(state, cache=str(cache), lease_s=3))
    runner.start()
    try:
        wait_for(lambda: db.job(job_id).progress["parts_done"] >= 1, "a part delivered")
        view = db.cancel(cancelled.id, "alice")
        assert view.status == "cancelled"
        assert view.to_json()["status"] == "cancelled"
        wait_for(lambda: db.get(after.id).status == "complete", "the next job run")
    finally:
        runner.stop()
    assert db.job(job_id).state == "cancelled"
    assert not (state / "results" / job_id).exists()  # no staging, nothing looking complete
    check_result(state / "results" / after.samples[""].id, files, ["MET_pt"], None)
    # the cancelled delivery stopped early: delivering it now computes the rest (cache misses)
    redo = columnhub.deliver(request(files, columns), output=tmp_path / "redo", cache=str(cache))
    assert redo.manifest["cache"]["misses"] > 0
    assert redo.manifest["cache"]["hits"] > 0  # ... after the parts it did before the cancel
    db.close()


def test_cancel_keeps_a_job_another_user_still_waits_for(db_url: str) -> None:
    db = Database(db_url)
    alice = db.submit("alice", {"x": 1}, None, {"": ("c" * 32, {"x": 1})})
    bob = db.submit("bob", {"x": 1}, None, {"": ("c" * 32, {"x": 1})})
    job_id = alice.samples[""].id
    with pytest.raises(RequestNotFoundError):
        db.cancel(alice.id, "bob")  # not bob's
    assert db.cancel(alice.id, "alice").status == "cancelled"
    assert db.job(job_id).state == "queued"  # bob still waits for it
    assert db.get(bob.id).status == "queued"
    assert db.active_requests("alice") == 0
    assert db.active_requests("bob") == 1
    assert db.cancel(bob.id, "bob").status == "cancelled"
    assert db.job(job_id).state == "cancelled"
    assert db.claim("w", 30) is None
    db.close()


# -- failures ------------------------------------------------------------------------


def test_a_failing_job_stores_the_error_type_and_message(
    db_url: str, files: list[Path], tmp_path: Path
) -> None:
    db = Database(db_url)
    bad = request(files, ["MET_ptt"])
    view = submit(db, bad)
    runner = Runner(db, Config(tmp_path / "state"))
    assert runner.run_once()
    with pytest.raises(columnhub.errors.ColumnhubError) as direct:  # the embedded call's error
        columnhub.deliver(bad, output=tmp_path / "direct", cache=False)
    status = db.get(view.id).to_json()
    assert status["status"] == "failed"
    assert status["error"] == {"type": type(direct.value).__name__, "message": str(direct.value)}
    assert status["samples"][""]["error"] == status["error"]
    assert "MET_ptt" in status["error"]["message"]
    db.close()


def test_multi_sample_request_state_and_progress(
    db_url: str, files: list[Path], tmp_path: Path
) -> None:
    db = Database(db_url)
    met, jets = request(files, ["MET_pt"]), request(files, ["Jet_pt"])
    spec = {"samples": {"met": {}, "jets": {}}}
    view = db.submit(
        "alice",
        spec,
        "two",
        {
            "met": (met.hash, met.model_dump(mode="json")),
            "jets": (jets.hash, jets.model_dump(mode="json")),
        },
    )
    assert list(view.samples) == ["met", "jets"]
    assert view.status == "queued"
    runner = Runner(db, Config(tmp_path / "state"))
    assert runner.run_once()
    assert db.get(view.id).status == "running"  # one done, one waiting
    assert runner.run_once()
    status = db.get(view.id).to_json()
    assert status["status"] == "complete"
    assert status["title"] == "two"
    for name, req, columns in (("met", met, ["MET_pt"]), ("jets", jets, ["Jet_pt"])):
        job = db.job(status["samples"][name]["job"])
        check_result(Path(job.output_dir), files, columns, None)
        assert job.spec == req.model_dump(mode="json")
    summed = {
        k: sum(s["progress"][k] for s in status["samples"].values())
        for k in ("parts_done", "events", "bytes")
    }
    assert {k: status["progress"][k] for k in summed} == summed
    assert status["progress"]["events"] == 2 * len(reference(files, [], None))
    assert db.stored_bytes("alice") == status["progress"]["bytes"]
    assert db.counts()["complete"] == 1
    db.close()


def test_a_job_whose_runner_keeps_dying_is_failed_not_retried_forever(db_url: str) -> None:
    from columnhub.service.db import MAX_ATTEMPTS

    db = Database(db_url)
    view = db.submit("alice", {"x": 1}, None, {"": ("d" * 32, {"x": 1})})
    for attempt in range(1, MAX_ATTEMPTS + 1):
        job = db.claim(f"runner-{attempt}", 0.01)
        assert job is not None
        assert job.attempts == attempt
        time.sleep(0.05)  # it dies: the lease runs out
    assert db.claim("runner-last", 30) is None
    status = db.get(view.id).to_json()
    assert status["status"] == "failed"
    assert status["error"]["type"] == "JobLostError"
    assert str(MAX_ATTEMPTS) in status["error"]["message"]
    db.close()


@pytest.mark.slow
def test_the_heartbeat_holds_the_lease_through_a_part_longer_than_it(
    files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part runs 7 s with a 5 s lease: no other runner may claim the job meanwhile."""
    state = tmp_path / "state"
    db = Database(f"sqlite:///{state / 'columnhub.db'}")
    columns = ["MET_pt"]
    view = submit(db, request(files[:1], columns, chunk_size=600))  # one part
    job_id = view.samples[""].id
    monkeypatch.setenv(PART_SLEEP, "7")
    runner = Runner(db, Config(state, lease_s=5))
    thread = threading.Thread(target=runner.run_once)
    thread.start()
    stolen = []
    try:
        wait_for(lambda: db.job(job_id).state == "running", "the job claimed")
        while thread.is_alive():
            claimed = db.claim("thief", 5)
            if claimed is not None:
                stolen.append(claimed)
                break
            time.sleep(0.1)
    finally:
        thread.join()
    assert not stolen
    job = db.job(job_id)
    assert (job.state, job.attempts) == ("complete", 1)
    check_result(state / "results" / job_id, files[:1], columns, None)
    db.close()


@pytest.mark.slow
def test_stopping_a_runner_hands_its_job_back_to_the_queue(
    files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    db = Database(f"sqlite:///{state / 'columnhub.db'}")
    columns = ["Jet_pt"]
    view = submit(db, request(files, columns))
    job_id = view.samples[""].id
    monkeypatch.setenv(PART_SLEEP, "0.3")
    runner = Runner(db, Config(state, lease_s=30))
    runner.start()
    try:
        wait_for(lambda: db.job(job_id).progress["parts_done"] >= 1, "a part delivered")
    finally:
        runner.stop()
    job = db.job(job_id)
    assert (job.state, job.claimed_by, job.lease_expires_at) == ("queued", None, None)
    output = state / "results" / job_id
    assert not [p for p in output.iterdir() if p.name.startswith(".staging")]
    monkeypatch.delenv(PART_SLEEP)
    assert Runner(db, Config(state)).run_once()  # the next runner takes it at once
    assert db.job(job_id).attempts == 2
    check_result(output, files, columns, None)
    db.close()


def test_a_job_waiting_on_storage_stops_at_once_when_cancelled_or_shut_down(
    files: list[Path], tmp_path: Path, hanging_server: Any
) -> None:
    """A cancel, or a shutdown, ends a wait on storage that never answers: not its timeout."""
    state = tmp_path / "state"
    db = Database(f"sqlite:///{state / 'columnhub.db'}")
    timeout = 600  # the storage timeout: far longer than any wait below

    def stuck(name: str) -> Request:
        return Request.from_dict({
            "dataset": {"name": "stuck", "files": [hanging_server.url(name)], "timeout": timeout},
            "columns": ["MET_pt"],
        })

    def remote() -> set[threading.Thread]:  # the threads of waits on storage (left behind)
        return {t for t in threading.enumerate() if t.name == "columnhub-remote"}

    def waiting_on_storage(before: set[threading.Thread]) -> Callable[[], bool]:
        return lambda: bool(remote() - before)

    runner = Runner(db, Config(state, lease_s=3))
    runner.start()
    try:
        before = remote()
        cancelled = submit(db, stuck("a.root"))
        wait_for(waiting_on_storage(before), "the job waiting on the storage")
        db.cancel(cancelled.id, "alice")
        after = submit(db, request(files, ["MET_pt"]))
        # the one runner is free again: the job behind the cancelled one completes
        wait_for(lambda: db.get(after.id).status == "complete", "the next job run", timeout=60)
        assert db.job(cancelled.samples[""].id).state == "cancelled"
        assert not (state / "results" / cancelled.samples[""].id).exists()
        check_result(state / "results" / after.samples[""].id, files, ["MET_pt"], None)

        before = remote()
        handed = submit(db, stuck("b.root"))
        wait_for(waiting_on_storage(before), "the next job waiting on the storage")
    finally:
        runner.stop(timeout=60)
    assert not [t for t in threading.enumerate() if t.name.startswith("columnhub-runner")]
    job = db.job(handed.samples[""].id)
    assert (job.state, job.claimed_by) == ("queued", None)  # handed back for the next runner
    db.close()


def _task_keys(dask_scheduler: Any) -> list[str]:
    """Every task key the scheduler has seen (run on the scheduler)."""
    return sorted({str(entry[0]) for entry in dask_scheduler.transition_log})


@pytest.mark.distributed
@pytest.mark.slow
def test_a_runner_on_a_dask_scheduler_delivers_and_reports_parts(
    files: list[Path], tmp_path: Path
) -> None:
    """The service's Dask set-up: a scheduler address in the config, one client for all jobs."""
    distributed = pytest.importorskip("distributed")
    state = tmp_path / "state"
    db = Database(f"sqlite:///{state / 'columnhub.db'}")
    columns, where = ["Jet_pt", "Muon_pt"], "MET_pt > 15"
    first = submit(db, request(files, columns, where))
    second = submit(db, request(files, ["MET_pt"]))
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        runner = Runner(db, Config(state, scheduler=cluster.scheduler_address, workers=1))
        try:
            assert runner.run_once()
            assert runner.run_once()  # the same client serves the next job
            with distributed.Client(cluster.scheduler_address) as client:
                keys = client.run_on_scheduler(_task_keys)
        finally:
            runner.stop()
    # the part tasks ran on the cluster (the key names the request), not in threads here
    for view in (first, second):
        job = db.job(view.samples[""].id)
        parts = {k for k in keys if k.startswith(f"columnhub-{job.request_hash[:16]}-part-")}
        assert len(parts) == 6
    for view, cols, cut in ((first, columns, where), (second, ["MET_pt"], None)):
        job = db.job(view.samples[""].id)
        assert job.state == "complete", job.error
        check_result(Path(job.output_dir or ""), files, cols, cut)
        manifest = json.loads((Path(job.output_dir or "") / "manifest.json").read_text())
        assert job.progress["parts_done"] == len(manifest["parts"]) == 6
        assert job.progress["bytes"] == job.stored_bytes
        assert job.progress["cache_misses"] == manifest["cache"]["misses"]
        assert job.progress["events"] == job.progress["events_total"] == 1200
    db.close()


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("mysql://db.example/columnhub", ["'mysql' is not supported", "postgresql+psycopg://"]),
        ("not a url", ["'not a url' is not a URL", "sqlite:///PATH"]),
        (
            "postgresql://postgres@127.0.0.1:1/columnhub",
            ["cannot open the service database", "127.0.0.1:1/columnhub", "--database"],
        ),
        ("sqlite:////proc/columnhub/columnhub.db", ["cannot create /proc/columnhub", "state_dir"]),
    ],
)
def test_a_database_that_cannot_be_used_is_a_clear_error(url: str, named: list[str]) -> None:
    from columnhub.errors import ServiceError

    with pytest.raises(ServiceError) as err:
        Database(url)
    for part in named:
        assert part in str(err.value)


@pytest.mark.slow
def test_idle_runner_threads_wake_on_submit_and_run_jobs_side_by_side(
    files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No polling (an hour between looks): only the submit's wake-up can start the jobs."""
    from columnhub.service import jobs

    monkeypatch.setattr(jobs, "POLL_S", 3600.0)
    monkeypatch.setenv(PART_SLEEP, "0.3")
    state = tmp_path / "state"
    db = Database(f"sqlite:///{state / 'columnhub.db'}")
    runner = Runner(db, Config(state, runners=2))
    runner.start()
    try:
        time.sleep(0.5)  # both threads found nothing and wait
        first = submit(db, request(files, ["MET_pt"]))
        second = submit(db, request(files, ["Jet_pt"]))
        both = [first.samples[""].id, second.samples[""].id]
        wait_for(
            lambda: [db.job(j).state for j in both] == ["running", "running"],
            "both jobs running at once, one per runner thread",
        )
        wait_for(lambda: all(db.job(j).state == "complete" for j in both), "both jobs done")
    finally:
        runner.stop()
    claims = {db.job(j).claimed_by for j in both}
    assert len(claims) == 2
    check_result(state / "results" / both[0], files, ["MET_pt"], None)
    check_result(state / "results" / both[1], files, ["Jet_pt"], None)
    db.close()


def test_a_wakeup_between_looking_and_waiting_is_not_lost() -> None:
    """Runner threads read the generation, look for work, then wait: a submit in between counts."""
    from columnhub.service.db import Wakeup

    wakeup = Wakeup()
    seen = [wakeup.generation, wakeup.generation]  # two runner threads looked: nothing queued
    wakeup.set()  # a submit, before either waits
    woke = []
    threads = [threading.Thread(target=lambda s=s: woke.append(wakeup.wait(s, 30.0))) for s in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert woke == [True, True]
    assert not wakeup.wait(wakeup.generation, 0.01)  # nothing new: it times out


# -- derived request states --------------------------------------------------------

STATES = ["queued", "running", "complete", "failed", "cancelled"]


def reference_state(cancelled: bool, job_states: list[str]) -> str:
    """The contract's rule, written out: cancelled > failed > complete (all) > queued (all) > running."""
    if cancelled or "cancelled" in job_states:
        return "cancelled"
    if "failed" in job_states:
        return "failed"
    if all(s == "complete" for s in job_states):
        return "complete"
    if all(s == "queued" for s in job_states):
        return "queued"
    return "running"


def check_derived_states(db: Database, requests: list[tuple[str, bool, list[str]]]) -> None:
    """Store ``(owner, cancelled, job states)`` rows; every query must agree with the rule."""
    import datetime as dt

    from sqlalchemy.orm import Session

    from columnhub.service.db import Job, RequestJob, RequestRecord, empty_progress

    start = dt.datetime(2026, 1, 1)
    want: dict[str, tuple[str, str]] = {}  # id -> (owner, state)
    with Session(db.engine) as session, session.begin():
        for i, (owner, cancelled, job_states) in enumerate(requests):
            rid = f"{i:032x}"
            session.add(
                RequestRecord(
                    id=rid,
                    owner=owner,
                    title=None,
                    cancelled=cancelled,
                    spec={},
                    created_at=start + dt.timedelta(seconds=i),
                )
            )
            for k, state in enumerate(job_states):
                jid = f"{i:016x}{k:016x}"
                session.add(
                    Job(
                        id=jid,
                        request_hash=jid,
                        spec={},
                        state=state,
                        attempts=0,
                        progress=empty_progress(),
                        stored_bytes=0,
                        created_at=start,
                    )
                )
                session.flush()
                session.add(RequestJob(request_id=rid, sample=f"s{k}", job_id=jid))
            want[rid] = (owner, reference_state(cancelled, job_states))
    newest_first = sorted(want, reverse=True)
    for rid, (_owner, state) in want.items():
        assert db.get(rid).status == state
    assert db.counts() == {s: sum(1 for _, w in want.values() if w == s) for s in STATES}
    for owner in {o for o, _ in want.values()} | {None}:
        mine = [r for r in newest_first if owner is None or want[r][0] == owner]
        pages, page = [], 1
        while True:
            views, total = db.list(owner, page=page, per_page=2)
            assert total == len(mine)
            if not views:
                break
            pages += [v.id for v in views]
            page += 1
        assert pages == mine
        for state in STATES:
            views, total = db.list(owner, state=state, per_page=1000)
            assert [v.id for v in views] == [r for r in mine if want[r][1] == state]
            assert total == len(views)
        if owner is not None:
            live = sum(1 for r in mine if want[r][1] in ("queued", "running"))
            assert db.active_requests(owner) == live


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["alice", "bob"]),
            st.booleans(),
            st.lists(st.sampled_from(STATES), min_size=1, max_size=3),
        ),
        max_size=12,
    )
)
def test_request_states_lists_and_counts_follow_the_rule(
    requests: list[tuple[str, bool, list[str]]],
) -> None:
    db = Database("sqlite://")
    check_derived_states(db, requests)
    db.close()


def test_request_states_on_every_backend(db_url: str) -> None:
    """Every one- and two-job combination, on SQLite and PostgreSQL alike."""
    combos = [[a] for a in STATES] + [[a, b] for a in STATES for b in STATES]
    requests = [
        (("alice", "bob")[i % 2], cancelled, states)
        for i, states in enumerate(combos)
        for cancelled in (False, True)
    ]
    db = Database(db_url)
    check_derived_states(db, requests)
    db.close()


# -- imports from several runner threads ---------------------------------------------------

_RACE = r"""
import sys, threading
from columnhub import _fastpath

spec = {"dataset": {"name": "d", "files": ["x.root"]}, "columns": ["a"]}
seen_partial, errors = [], []
importer = threading.Thread(target=lambda: __import__("columnhub.spec"))

def probe():
    while importer.is_alive() or not seen_partial:
        module = sys.modules.get("columnhub.spec")
        if module is not None and not hasattr(module, "Request"):
            seen_partial.append(True)
        try:
            _fastpath.source_key(spec, chunk_size=None)
        except Exception as err:
            errors.append(repr(err))
            return
        if not importer.is_alive() and "columnhub.spec" in sys.modules:
            return

prober = threading.Thread(target=probe)
prober.start()
importer.start()
importer.join()
prober.join()
print("partial" if seen_partial else "no-partial", errors[:1])
"""


def test_fastpath_source_key_while_another_thread_imports_the_spec_module(tmp_path: Path) -> None:
    """A runner thread's fast-path lookup while another runner thread imports ``columnhub.spec``.

    The module is in ``sys.modules`` before its ``Request`` class exists;
    reading ``spec.Request`` then raised AttributeError and failed the job.
    """
    for _ in range(5):  # the probe must see the half-imported module at least once
        out = subprocess.run(
            [sys.executable, "-c", _RACE],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            check=True,
        ).stdout.strip()
        assert out.endswith("[]"), out
        if out.startswith("partial"):
            return
    pytest.fail("the half-imported columnhub.spec was never observed; the test proves nothing")


# -- retention -------------------------------------------------------------------------


def _end(db: Database, state: str) -> str:
    """Claim the oldest queued job and end it in ``state`` (complete with 10 bytes, or failed)."""
    job = db.claim("w", 30, results="/srv/results")  # output_dir /srv/results/<id>
    assert job is not None
    if state == "complete":
        assert db.finish(job.id, "w", 10)
    elif state == "failed":
        assert db.fail(job.id, "w", "SpecError", "bad column")
    return job.id


def test_expire_takes_out_only_results_no_live_request_references(db_url: str) -> None:
    import datetime as dt

    db = Database(db_url)
    one = {"": ("a" * 32, {"x": "a"})}
    done = db.submit("alice", {}, None, one)  # complete, asked for by no live request
    _end(db, "complete")
    bad = db.submit("alice", {}, None, {"": ("b" * 32, {"x": "b"})})
    _end(db, "failed")
    dropped = db.submit("bob", {}, None, {"": ("c" * 32, {"x": "c"})})
    _end(db, "complete")
    db.cancel(dropped.id, "bob")  # a cancelled request is no live reference
    running = db.submit("dave", {}, None, {"": ("d" * 32, {"x": "d"})})
    assert db.claim("w", 30) is not None  # running: never touched
    waiting = db.submit(
        "carol", {}, None, {"e": ("e" * 32, {"x": "e"}), "f": ("f" * 32, {"x": "f"})}
    )
    kept = _end(db, "complete")  # one sample complete, one queued: live, so it is kept
    (queued,) = {j.id for j in waiting.samples.values()} - {kept}
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert db.expire(now - dt.timedelta(hours=1)) == []  # everything finished since
    # every request was submitted before ``now + 1 h``: only live ones keep their jobs
    gone = db.expire(now + dt.timedelta(hours=1))
    ids = {v.samples[""].id for v in (done, bad, dropped)}
    assert {j.id for j in gone} == ids
    assert all(j.output_dir for j in gone)  # as they were: the caller removes the folders
    assert db.expire(now + dt.timedelta(hours=1)) == []  # handed out once
    expired = db.get(done.id)
    assert expired.status == "failed"
    assert expired.error is not None
    assert expired.error["type"] == "ResultExpiredError"
    assert db.job(done.samples[""].id).stored_bytes == 0
    assert db.job(done.samples[""].id).output_dir is None
    assert db.get(bad.id).error == {"type": "SpecError", "message": "bad column"}
    assert db.job(kept).state == "complete"
    assert db.job(queued).state == "queued"
    assert db.job(running.samples[""].id).state == "running"
    # a submit told to share the expired job queues the work again instead
    again = db.submit("alice", {}, None, one, reuse={"": done.samples[""].id})
    assert again.samples[""].id != done.samples[""].id
    assert again.status == "queued"
    # and one told to share a complete job shares it
    spec = next(
        (h, s)
        for h, s in (("e" * 32, {"x": "e"}), ("f" * 32, {"x": "f"}))
        if h == db.job(kept).request_hash
    )
    shared = db.submit("erin", {}, None, {"": spec}, reuse={"": kept})
    assert shared.samples[""].id == kept
    assert shared.status == "complete"
    assert db.stored_bytes("erin") == 10
    db.close()


# -- sharing a complete result ---------------------------------------------------------

_CHANGES = st.lists(
    st.sampled_from(["rewrite_input", "replace_input", "touch_input", "touch_part", "none"]),
    max_size=3,
)


@settings(max_examples=10, deadline=None)  # each example delivers once for real
@given(changes=_CHANGES)
def test_a_complete_result_is_shared_only_while_nothing_changed(
    files: list[Path], changes: list[str]
) -> None:
    """``reusable_result`` against the reference: reusable iff no input or part changed."""
    import shutil
    import tempfile

    from columnhub.service.jobs import reusable_result

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = [root / f"in{i}.root" for i in range(len(files))]
        for src, dst in zip(files, inputs, strict=True):
            shutil.copyfile(src, dst)
        cache = str(root / "cache")
        db = Database(f"sqlite:///{root / 'db.sqlite'}")
        view = submit(db, request(inputs, ["MET_pt"], "MET_pt > 20"))
        assert Runner(db, Config(root / "state", cache=cache)).run_once()
        job = db.job(view.samples[""].id)
        assert job.state == "complete"
        assert reusable_result(job, cache=cache)  # just delivered: shared as it is
        changed = False
        for i, change in enumerate(changes):
            later = time.time() + 10 + i  # a modification time no earlier write had
            if change == "rewrite_input":  # same inode, other events
                shutil.copyfile(files[1], inputs[0])
            elif change == "replace_input":  # a new file moved over the name
                shutil.copyfile(files[1], root / "new.root")
                os.replace(root / "new.root", inputs[0])
            elif change == "touch_input":
                os.utime(inputs[0], (later, later))
            elif change == "touch_part":
                part = min(Path(job.output_dir or "").glob("part-*"))
                os.utime(part, (later, later))
            changed = changed or change != "none"
        assert reusable_result(job, cache=cache) is (not changed), changes
        db.close()
