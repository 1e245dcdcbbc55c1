"""The Dask executor on a real ``LocalCluster``: same bytes, retries, errors, progress."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pyarrow.parquet as pq
import pytest
import uproot
import yaml

import columnhub
from columnhub.cache import ColumnCache
from columnhub.errors import DuplicateKeyError, ExpressionError
from columnhub.execute.part import run_part
from columnhub.join import provider
from columnhub.join.index import KeyIndex
from columnhub.output.manifest import read_manifest
from columnhub.plan import make_plan
from columnhub.spec import load_request
from columnhub.synth import synthesize

distributed = pytest.importorskip("distributed")
import dask

pytestmark = pytest.mark.distributed

KEYS = ["run", "luminosityBlock", "event"]
COLUMNS = ["MET_pt", "Jet_pt", "Jet_eta"]
WHERE = "(nJet >= 2) & (MET_pt > 20)"
CLI = str(Path(sys.executable).parent / "columnhub")


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> list[Path]:
    d = tmp_path_factory.mktemp("dask-primary")
    return synthesize(
        shared_data / "nano_tt_v12.root",
        events=3000,
        output=d,
        files=2,
        basket_events=250,
        branches=["Jet_pt", "Jet_eta", "MET_pt"],
    )


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """Two single-threaded worker processes (with nannies, which restart a killed one)."""
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def spec(files: list[Path], **extra: Any) -> dict[str, Any]:
    return {
        "dataset": {"name": "primary", "files": [str(f) for f in files]},
        "columns": COLUMNS,
        "where": WHERE,
        "chunk_size": 250,
        "output": {"target_part_bytes": 12_000},
        **extra,
    }


def spec_yaml(directory: Path, files: list[Path]) -> Path:
    """:func:`spec` of ``files`` written to ``directory/spec.yaml`` (for the command line)."""
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec(files)))
    return path


def uproot_rows(files: list[Path]) -> list[tuple[Any, ...]]:
    arrays = ak.concatenate(
        [uproot.open(f)["Events"].arrays([*KEYS, *COLUMNS], cut=WHERE) for f in files]
    )
    return list(zip(*(ak.to_list(arrays[n]) for n in [*KEYS, *COLUMNS]), strict=True))


def delivered_rows(result: columnhub.Result) -> list[tuple[Any, ...]]:
    table = result.to_arrow()
    return list(zip(*(table.column(n).to_pylist() for n in [*KEYS, *COLUMNS]), strict=True))


def test_the_plan_pickles_and_a_part_task_gives_the_same_bytes(
    primary: list[Path], tmp_path: Path
) -> None:
    plan = make_plan(load_request(spec(primary)))
    again = pickle.loads(pickle.dumps(plan))
    assert again.parts == plan.parts and again.outputs == plan.outputs
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = run_part(plan, plan.parts[1], tmp_path / "a")
    two = run_part(again, again.parts[1], tmp_path / "b")
    assert one.name == two.name == "part-00001.parquet"
    assert (tmp_path / "a" / one.name).read_bytes() == (tmp_path / "b" / two.name).read_bytes()
    assert pickle.loads(pickle.dumps(one)).xxh3 == one.xxh3  # the metadata travels back


def test_a_local_cluster_gives_the_local_executors_bytes(
    primary: list[Path], tmp_path: Path
) -> None:
    request = spec(primary)
    local = columnhub.deliver(request, output=tmp_path / "threads", workers=2, cache=False)
    seen: list[tuple[int, int]] = []
    on_dask = columnhub.deliver(
        request,
        output=tmp_path / "dask",
        scheduler="local",
        workers=2,
        cache=tmp_path / "cache",
        progress=lambda done, total: seen.append((done, total)),
    )
    assert len(local.files) >= 3
    assert [f.name for f in on_dask.files] == [f.name for f in local.files]
    for a, b in zip(local.files, on_dask.files, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert delivered_rows(on_dask) == uproot_rows(primary)
    # progress per part: one report as each part finishes, ending at every event
    plan = make_plan(load_request(request))
    assert len(seen) == len(plan.parts)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (3000, 3000)
    # the workers wrote the shared cache: a second request is served from it
    again = columnhub.deliver(
        {**request, "columns": [*COLUMNS, "nJet"]},
        output=tmp_path / "again",
        scheduler="local",
        workers=2,
        cache=tmp_path / "cache",
    )
    assert again.manifest["cache"]["misses"] == 0
    assert again.manifest["cache"]["hits"] > 0


def test_a_killed_worker_has_its_task_retried(
    primary: list[Path], tmp_path: Path, client: Any, deliver_killing_a_worker: Any
) -> None:
    result = deliver_killing_a_worker(
        client,
        lambda: columnhub.deliver(
            spec(primary), output=tmp_path / "out", scheduler=client, cache=False
        ),
        sleep_env="COLUMNHUB_TEST_PART_SLEEP",
        seconds="1.5",
        task_key="-part-",
        wait=20,
    )
    assert result.complete
    assert delivered_rows(result) == uproot_rows(primary)  # nothing duplicated or missing
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f.name for f in result.files), "manifest.json"]
    )


def _hold(event_name: str, seconds: float) -> bool:
    """Task: another user's long task (ends early once the test sets ``event_name``)."""
    return distributed.Event(event_name).wait(seconds)


@pytest.mark.parametrize("join", [False, True], ids=["plain", "keyed-friend"])
def test_a_request_does_not_wait_for_a_worker_busy_with_another_users_task(
    primary: list[Path], tmp_path: Path, client: Any, join: bool
) -> None:
    """A worker held by a long task of someone else's does not hold the request up.

    The check that every worker sees the paths runs on each worker's event
    loop (``Client.run``), not as a task queued behind the held one, and the
    exchange's tasks are spread over the free workers only: the other worker
    does the whole request meanwhile (before, 120 s: the held task's time).
    """
    busy = min(client.nthreads())
    event = f"columnhub-test-hold-{os.getpid()}-{tmp_path.name}"
    held = client.submit(_hold, event, 120.0, workers=[busy], pure=False)
    try:
        deadline = time.monotonic() + 60
        while not client.processing(workers=[busy])[busy]:  # the other user's task runs
            assert time.monotonic() < deadline, "the holding task never started"
            time.sleep(0.05)
        request = spec(primary)
        if join:  # its exchange's tasks are spread over the workers, the busy one too
            keys = primary_keys(primary)
            rows = np.random.default_rng(5).permutation(len(keys["event"]))
            request = friend_spec(primary, write_friend(tmp_path / "friend", keys, rows))
        result = columnhub.deliver(
            request, output=tmp_path / "out", scheduler=client, cache=tmp_path / "cache"
        )
        assert not held.done()  # the request did not wait for that task
    finally:
        distributed.Event(event, client=client).set()
        assert held.result(timeout=60) is True
    assert result.complete
    assert delivered_rows(result) == uproot_rows(primary)
    if join:  # the friend's columns too: what the threads here deliver
        local = columnhub.deliver(request, output=tmp_path / "local", workers=2, cache=False)
        assert result.to_arrow().equals(local.to_arrow())


def test_a_user_error_in_a_task_reaches_the_caller(
    primary: list[Path], tmp_path: Path, client: Any
) -> None:
    request = spec(primary, where="MET_pt + 1")  # known to be no boolean only when computed
    with pytest.raises(ExpressionError) as local:
        columnhub.deliver(request, output=tmp_path / "threads", cache=False)
    with pytest.raises(ExpressionError) as remote:
        columnhub.deliver(request, output=tmp_path / "dask", scheduler=client, cache=False)
    assert str(remote.value) == str(local.value)
    assert "where must be a boolean expression" in str(remote.value)


def test_the_cli_takes_a_scheduler_and_exits_2_on_a_user_error(
    primary: list[Path], tmp_path: Path, client: Any
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec(primary, where="MET_pt + 1")))
    env = {**os.environ}
    address = client.scheduler.address
    done = subprocess.run(
        [CLI, "deliver", str(path), "-o", str(tmp_path / "out"), "--no-cache",
         "--scheduler", address],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "where must be a boolean expression" in done.stderr
    assert "Traceback" not in done.stderr
    # the environment variable names the scheduler too
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(spec(primary)))
    env["DASK_SCHEDULER_ADDRESS"] = address
    done = subprocess.run(
        [CLI, "deliver", str(good), "-o", str(tmp_path / "good"), "--no-cache"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    parts = sorted((tmp_path / "good").glob("part-*.parquet"))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    assert rows == len(uproot_rows(primary))


def test_a_worker_uses_its_own_thread_count(client: Any) -> None:
    from columnhub._concurrency import threads

    def pools() -> tuple[int, int, Any]:
        from columnhub._kernels import kernel_pool_size
        from columnhub.sources.root import read_executor

        return threads(), kernel_pool_size(), read_executor()

    assert client.submit(pools, pure=False).result() == (1, 1, None)  # one thread: serial reads


# ---------------------------------------------------------------------------
# a keyed friend on the cluster: key indexes built by tasks, routing chunk by chunk


def primary_keys(files: list[Path]) -> dict[str, np.ndarray]:
    """The primary's key columns, read directly, in file order."""
    parts = [uproot.open(f)["Events"].arrays(KEYS, library="np") for f in files]
    return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


def fx_of(event: np.ndarray) -> np.ndarray:
    return np.sqrt(event.astype(np.float64)) * 3.0


def write_friend(
    d: Path,
    keys: dict[str, np.ndarray],
    rows: np.ndarray,
    *,
    files: int = 2,
    basket: int = 300,
    column: str = "fx",
) -> list[Path]:
    """A ROOT friend holding the primary rows ``rows`` (in that order), one basket per ``basket``.

    Its value column ``column`` is :func:`fx_of` the event number.
    """
    d.mkdir(exist_ok=True)
    out = []
    for i, part in enumerate(np.array_split(rows, files)):
        path = d / f"friend{i}.root"
        with uproot.recreate(path) as f:
            tree = f.mktree(
                "Events", {"run": np.uint32, "luminosityBlock": np.uint32, "event": np.uint64,
                           column: np.float64},
            )
            for a in range(0, len(part), basket):
                take = part[a : a + basket]
                tree.extend(
                    {**{k: keys[k][take] for k in KEYS}, column: fx_of(keys["event"][take])}
                )
        out.append(path)
    return out


def friend_spec(primary: list[Path], friend: list[Path], **extra: Any) -> dict[str, Any]:
    return {
        **spec(primary),
        "columns": [*COLUMNS, "fx", "f_matched"],
        "friends": [
            {"name": "f", "dataset": {"name": "f", "files": [str(f) for f in friend]},
             "columns": ["fx"], "how": "left", **extra}
        ],
    }


def test_a_keyed_friend_on_the_cluster_builds_its_index_on_the_workers(
    primary: list[Path], tmp_path: Path, client: Any
) -> None:
    keys = primary_keys(primary)
    rng = np.random.default_rng(3)
    rows = rng.permutation(len(keys["event"]))[: int(0.9 * len(keys["event"]))]  # shuffled
    friend = write_friend(tmp_path / "friend", keys, rows)
    request = friend_spec(primary, friend)
    provider._memo.clear()  # this process's key indexes
    on_dask = columnhub.deliver(
        request, output=tmp_path / "dask", scheduler=client, cache=tmp_path / "c-dask"
    )
    # built by the workers: none reached this process, the cache holds it
    assert not provider._memo
    plan = make_plan(load_request(request))
    address = provider._index_key(plan.friend("f").dataset, KEYS)
    blob = ColumnCache(tmp_path / "c-dask").get_bytes(address)
    assert blob is not None
    index = KeyIndex.from_bytes(blob)
    direct = [uproot.open(f)["Events"].arrays(KEYS, library="np") for f in friend]
    for k in KEYS:  # the index's keys, in dataset row order, are the friend files' keys
        np.testing.assert_array_equal(
            index.key_columns()[k], np.concatenate([d[k] for d in direct]).astype(np.uint64)
        )
    assert index.is_unique
    exchange = on_dask.manifest["friend_exchange"]["f"]
    assert exchange["ran"], exchange
    # the same bytes as the local executor
    local = columnhub.deliver(request, output=tmp_path / "local", workers=2, cache=False)
    assert [f.name for f in on_dask.files] == [f.name for f in local.files]
    for a, b in zip(local.files, on_dask.files, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    # and the brute-force join: a dict from event key to the friend's value
    fx = {
        tuple(int(keys[k][r]) for k in KEYS): float(fx_of(keys["event"][r : r + 1])[0])
        for r in rows
    }
    arrays = ak.concatenate(
        [uproot.open(f)["Events"].arrays([*KEYS, *COLUMNS], cut=WHERE) for f in primary]
    )
    expected = [
        (*key, fx.get(key), key in fx)
        for key in zip(*(ak.to_list(arrays[k]) for k in KEYS), strict=True)
    ]
    table = on_dask.to_arrow()
    got = list(
        zip(*(table.column(n).to_pylist() for n in [*KEYS, "fx", "f_matched"]), strict=True)
    )
    assert got == expected
    # a second request finds the index in the cache and only checks it, on a worker
    provider._memo.clear()  # the local executor's
    again = columnhub.deliver(
        {**request, "columns": [*COLUMNS, "fx"]},
        output=tmp_path / "again",
        scheduler=client,
        cache=tmp_path / "c-dask",
    )
    assert not provider._memo
    assert again.to_arrow().column("fx").to_pylist() == [e[len(KEYS)] for e in expected]


@pytest.mark.parametrize("side", ["friend", "primary"])
def test_duplicate_keys_found_on_the_cluster_give_the_local_error(
    primary: list[Path], tmp_path: Path, client: Any, side: str
) -> None:
    keys = primary_keys(primary)
    n = len(keys["event"])
    if side == "friend":
        rows = np.concatenate([np.arange(n), [17, 1234, 17]])  # 17 three times, 1234 twice
        files = primary
    else:  # a primary with a repeated event (42), the friend unique
        rows = np.arange(n)
        files = write_friend(
            tmp_path / "dup", keys, np.concatenate([np.arange(n), [42]]), files=1, column="px"
        )
    friend = write_friend(tmp_path / "friend", keys, np.random.default_rng(1).permutation(rows))
    request = friend_spec(files, friend)
    if side == "primary":
        request["columns"] = ["px", "fx"]
        del request["where"]
    with pytest.raises(DuplicateKeyError) as local:
        columnhub.deliver(request, output=tmp_path / "local", cache=tmp_path / "c-local")
    with pytest.raises(DuplicateKeyError) as remote:
        columnhub.deliver(
            request, output=tmp_path / "dask", scheduler=client, cache=tmp_path / "c-dask"
        )
    assert str(remote.value) == str(local.value)
    assert side in str(remote.value)
    manifest = read_manifest(tmp_path / "dask")
    assert manifest is None or not manifest["complete"]  # reported before any part: none
    assert not list((tmp_path / "dask").glob("part-*"))


def test_a_scheduler_address_is_connected_while_planning_and_each_worker_warmed(
    primary: list[Path], tmp_path: Path, client: Any
) -> None:
    keys = primary_keys(primary)
    rows = np.random.default_rng(5).permutation(len(keys["event"]))
    friend = write_friend(tmp_path / "friend", keys, rows)
    request = friend_spec(primary, friend)
    with distributed.get_task_stream(client) as stream:
        on_dask = columnhub.deliver(
            request, output=tmp_path / "dask", scheduler=client.scheduler.address,
            cache=tmp_path / "c-dask",
        )
    warmed = [t["worker"] for t in stream.data if "-warm-" in str(t["key"])]
    assert sorted(warmed) == sorted(client.nthreads())  # one warm-up task per worker
    local = columnhub.deliver(request, output=tmp_path / "local", workers=2, cache=False)
    assert [f.name for f in on_dask.files] == [f.name for f in local.files]
    for a, b in zip(local.files, on_dask.files, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_an_unreachable_scheduler_address_is_a_user_error(
    primary: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from columnhub.errors import SpecError

    monkeypatch.setenv("COLUMNHUB_SCHEDULER_TIMEOUT", "1s")
    with pytest.raises(SpecError, match="cannot connect to the Dask scheduler") as caught:
        columnhub.deliver(
            spec(primary), output=tmp_path / "out", scheduler="tcp://127.0.0.1:9", cache=False
        )
    assert "nothing listens at 127.0.0.1:9" in str(caught.value)
    manifest = read_manifest(tmp_path / "out")
    assert manifest is None or not manifest["complete"]


def test_a_server_that_is_not_a_scheduler_is_a_user_error_not_a_hang(
    primary: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TCP server that accepts and never answers (a dashboard's port given for the scheduler's).

    Dask's own connect timeout covers the TCP connection only: its handshake
    would wait for ever.
    """
    from columnhub.errors import SpecError
    from columnhub.execute import dask as on_dask

    monkeypatch.setenv("COLUMNHUB_SCHEDULER_TIMEOUT", "1s")
    monkeypatch.setattr(on_dask, "_HANDSHAKE_GRACE_S", 1.0)
    with silent_server() as (port, accepted):
        with pytest.raises(SpecError, match="does not answer as a Dask scheduler"):
            columnhub.deliver(
                spec(primary), output=tmp_path / "out", scheduler=f"tcp://127.0.0.1:{port}",
                cache=False,
            )
        assert accepted  # the client did reach it
    manifest = read_manifest(tmp_path / "out")
    assert manifest is None or not manifest["complete"]


@contextlib.contextmanager
def silent_server() -> Iterator[tuple[int, list[Any]]]:
    """A TCP server on loopback that accepts connections and never answers.

    Yields its port and the connections it accepted (all closed at the end).
    """
    import socket
    import threading

    accepted: list[socket.socket] = []
    stop = threading.Event()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.1)

        def accept() -> None:
            while not stop.is_set():
                try:
                    accepted.append(server.accept()[0])  # held open, never answered
                except TimeoutError:
                    continue
                except OSError:
                    return

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            yield server.getsockname()[1], accepted
        finally:
            stop.set()
            thread.join()
            for conn in accepted:
                conn.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mistake", "error", "message"),
    [
        ({"where": "MET_pt >"}, "SpecError", "where: invalid syntax"),
        ({"columns": ["No_such_branch"]}, "ColumnNotFoundError", "'No_such_branch' is neither"),
    ],
    ids=["invalid request", "missing column"],
)
def test_a_mistake_in_the_request_is_reported_at_once_while_the_scheduler_is_still_waited_for(
    primary: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    mistake: dict[str, Any], error: str, message: str,
) -> None:
    """Connecting starts before the request is read; a request that fails first does not wait.

    The scheduler here never answers, and it is waited for up to 120 s: a
    delivery that waited for the connection before reporting the mistake
    would run past the test's timeout.
    """
    import columnhub.errors

    monkeypatch.setenv("COLUMNHUB_SCHEDULER_TIMEOUT", "120s")
    with silent_server() as (port, _), pytest.raises(getattr(columnhub.errors, error), match=message):
        columnhub.deliver(
            spec(primary, **mistake), output=tmp_path / "out",
            scheduler=f"tcp://127.0.0.1:{port}", cache=False,
        )
    assert not list((tmp_path / "out").glob("part-*"))


def test_the_client_reports_its_package_versions_without_importing_them() -> None:
    """What the scheduler is told is what distributed's own report says; pandas stays unloaded.

    Each side in a new process (pandas, once imported, cannot be unloaded).
    """
    import json

    code = """
import json, sys
import distributed
if sys.argv[1] == "columnhub":
    from columnhub.execute.dask import _report_versions_without_importing
    _report_versions_without_importing(distributed)
versions = distributed.versions.get_versions()
print(json.dumps({"versions": versions, "pandas": "pandas" in sys.modules}))
"""

    def report(side: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-c", code, side], capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)

    theirs, ours = report("distributed"), report("columnhub")
    assert theirs["pandas"]  # distributed's own report imports it
    assert not ours["pandas"]
    assert ours["versions"]["packages"] == theirs["versions"]["packages"]
    assert ours["versions"]["packages"]["pandas"] is not None
    assert ours["versions"]["host"] == theirs["versions"]["host"]


def test_a_scheduler_host_that_does_not_resolve_fails_at_once(
    primary: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No 30 s of retries for a host name no resolver knows (``.invalid``: RFC 6761)."""
    from columnhub.errors import SpecError

    # a retry loop would end in "Timed out trying to connect", not in this message
    monkeypatch.setenv("COLUMNHUB_SCHEDULER_TIMEOUT", "1s")
    address = "tcp://no-such-scheduler.invalid:8786"
    with pytest.raises(SpecError, match=r"host 'no-such-scheduler\.invalid' does not resolve"):
        columnhub.deliver(spec(primary), output=tmp_path / "out", scheduler=address, cache=False)
    manifest = read_manifest(tmp_path / "out")
    assert manifest is None or not manifest["complete"]


def test_the_index_built_on_the_cluster_is_the_local_build_byte_for_byte(
    primary: list[Path], tmp_path: Path, client: Any
) -> None:
    keys = primary_keys(primary)
    rows = np.random.default_rng(11).permutation(len(keys["event"]))[:2500]
    friend = write_friend(tmp_path / "friend", keys, rows, files=3, basket=170)
    request = friend_spec(primary, friend)
    columnhub.deliver(request, output=tmp_path / "dask", scheduler=client, cache=tmp_path / "c")
    plan = make_plan(load_request(request))
    dataset = plan.friend("f").dataset
    blob = ColumnCache(tmp_path / "c").get_bytes(provider._index_key(dataset, KEYS))
    assert blob is not None
    direct = [uproot.open(f)["Events"].arrays(KEYS, library="np") for f in friend]
    built = KeyIndex.from_files(
        [{k: d[k] for k in KEYS} for d in direct], file_names=[f.path for f in dataset.files]
    )
    assert blob == built.to_bytes()


def _worker_malloc_env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}


def test_close_cluster_stops_the_heartbeats_then_closes_workers_and_scheduler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from columnhub._malloc import MMAP_THRESHOLD
    from columnhub.execute.dask import _stop_heartbeat, close_cluster, local_cluster

    # a nanny copies its variables into this process's environment: start clean, end clean
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    cluster = local_cluster(2)
    client = distributed.Client(cluster)
    # the workers' buffers come from the heap, and distributed still trims it
    trim = dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_")
    assert set(map(str, client.run(_worker_malloc_env).values())) == {
        str({"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(trim)})
    }
    # the setting was for that cluster only
    assert "MALLOC_MMAP_THRESHOLD_" not in dask.config.get("distributed.nanny.pre-spawn-environ")

    def heartbeating(dask_worker: Any) -> bool:
        return bool(dask_worker.periodic_callbacks["heartbeat"].is_running())

    assert set(client.run(heartbeating).values()) == {True}
    pids = list(client.run(os.getpid).values())
    client.run(_stop_heartbeat)  # the step close_cluster takes before closing
    assert set(client.run(heartbeating).values()) == {False}
    close_cluster(cluster, client)
    assert cluster.status.value == "closed"
    assert client.status == "closed"
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)


def test_a_local_cluster_keeps_the_allocator_setting_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from columnhub.execute.dask import close_cluster, local_cluster

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 1 << 20}):
        cluster = local_cluster(1)
    client = distributed.Client(cluster)
    try:
        (env,) = client.run(_worker_malloc_env).values()
        assert env["MALLOC_MMAP_THRESHOLD_"] == str(1 << 20)
    finally:
        close_cluster(cluster, client)


# ---------------------------------------------------------------------------
# a worker that does not share the file system


def _can_unshare_mounts() -> bool:
    try:
        run = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "true"],
            capture_output=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return run.returncode == 0


@pytest.fixture
def split_cluster(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A scheduler, a worker, and a worker that sees ``hidden/`` as an empty tmpfs of its own.

    The second worker runs in a mount namespace of its own (``unshare``, as
    root), as a worker on a node without the shared file system would:
    the same paths, other directories.
    """
    if not _can_unshare_mounts():
        pytest.skip("needs mount namespaces (unshare --mount, as root)")
    import signal
    import socket

    hidden = tmp_path / "hidden"
    hidden.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).parent / "dask")
    worker = [dask, "worker", address, "--nthreads", "1", "--no-dashboard"]
    commands = [
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        [*worker, "--name", "shared"],
        [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs none "$0" && exec "$@"', str(hidden), *worker, "--name", "elsewhere",
        ],
    ]
    procs = []
    try:
        for n, command in enumerate(commands):
            with (tmp_path / f"dask-{n}.log").open("wb") as log:  # the child keeps its own fd
                procs.append(
                    subprocess.Popen(
                        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
            if n == 0:
                time.sleep(1.0)
        with distributed.Client(address, timeout="60s") as c:
            c.wait_for_workers(2, timeout=120)
        yield address, hidden
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_worker_that_does_not_see_the_cache_or_the_output_is_named_before_any_work(
    primary: list[Path], tmp_path: Path, split_cluster: tuple[str, Path]
) -> None:
    """Named before any task: not a FileNotFoundError, an input "removed", a friend read twice."""
    from columnhub.errors import SpecError

    address, hidden = split_cluster
    request = spec(primary)
    copies = []
    for f in primary:  # inputs only this process sees
        copies.append(hidden / f.name)
        copies[-1].write_bytes(f.read_bytes())
    with pytest.raises(SpecError, match=r"worker 'elsewhere' .* does not see the input file"):
        columnhub.deliver(spec(copies), output=tmp_path / "out-0", scheduler=address, cache=False)
    with pytest.raises(SpecError, match=r"worker 'elsewhere' .* does not see the column cache"):
        columnhub.deliver(request, output=tmp_path / "out-1", scheduler=address, cache=hidden)
    with pytest.raises(SpecError, match=r"worker 'elsewhere' .* the output's staging directory"):
        columnhub.deliver(request, output=hidden / "out-2", scheduler=address, cache=False)
    # nothing was written, and nothing is left behind: no part, no probe, no staging
    for out in (tmp_path / "out-0", tmp_path / "out-1", hidden / "out-2"):
        manifest = read_manifest(out)
        assert manifest is None or not manifest["complete"]
        assert not list(out.glob("*.parquet"))
        assert not list(out.glob(".staging-*"))
    assert not list(hidden.rglob(".columnhub-probe-*"))
    # where both are shared, the same cluster delivers what the threads here deliver
    shared = columnhub.deliver(
        request, output=tmp_path / "out-3", scheduler=address, cache=tmp_path / "cache"
    )
    local = columnhub.deliver(request, output=tmp_path / "threads", workers=2, cache=False)
    assert [f.read_bytes() for f in shared.files] == [f.read_bytes() for f in local.files]


@contextlib.contextmanager
def subprocess_cluster(
    tmp_path: Path,
    *,
    scheduler_path: str = "",
    worker_path: str = "",
    worker: bool = True,
    worker_env: dict[str, str] | None = None,
    scheduler_env: dict[str, str] | None = None,
    processes: list[subprocess.Popen[bytes]] | None = None,
) -> Iterator[str]:
    """A ``dask scheduler`` and one ``dask worker`` process, each with its own ``PYTHONPATH``.

    ``processes`` (a list) receives them, scheduler first.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    dask_cli = str(Path(sys.executable).parent / "dask")
    commands = [
        ([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
         scheduler_path),
        ([dask_cli, "worker", address, "--nthreads", "1", "--no-dashboard", "--name", "w0"],
         worker_path),
    ][: 2 if worker else 1]
    procs = processes if processes is not None else []
    try:
        for n, (command, path) in enumerate(commands):
            env = {**os.environ, "PYTHONPATH": path} if path else dict(os.environ)
            if n == 1 and worker_env:
                env.update(worker_env)
            if n == 0 and scheduler_env:
                env.update(scheduler_env)
            with (tmp_path / f"dask-{n}.log").open("wb") as log:
                procs.append(subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,
                ))
            if n == 0:
                time.sleep(1.0)
        with distributed.Client(address, timeout="60s") as c:
            if worker:
                c.wait_for_workers(1, timeout=120)
        yield address
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def without_columnhub(tmp_path: Path) -> str:
    """A ``PYTHONPATH`` on which ``import columnhub`` fails as where it is not installed."""
    fake = tmp_path / "not-installed" / "columnhub"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'columnhub'\", name='columnhub')\n"
    )
    return str(fake.parent)


def test_a_scheduler_without_columnhub_is_a_user_error_before_any_task(
    primary: list[Path], tmp_path: Path, without_columnhub: str
) -> None:
    """The scheduler unpickles the tasks: without columnhub, exit 2 and what to install."""
    with subprocess_cluster(tmp_path, scheduler_path=without_columnhub) as address:
        spec_file = spec_yaml(tmp_path, primary)
        run = subprocess.run(
            [CLI, "deliver", str(spec_file), "-o", str(tmp_path / "out"), "--no-progress",
             "--no-cache", "--scheduler", address],
            capture_output=True, text=True, timeout=300, check=False,
        )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert f"the Dask scheduler at {address} cannot import columnhub" in run.stderr
    assert "install it in the scheduler's environment" in run.stderr
    assert read_manifest(tmp_path / "out") is None or not read_manifest(tmp_path / "out")["complete"]
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_a_worker_without_columnhub_is_named_before_any_task(
    primary: list[Path], tmp_path: Path, without_columnhub: str
) -> None:
    from columnhub.errors import SpecError

    with (
        subprocess_cluster(tmp_path, worker_path=without_columnhub) as address,
        pytest.raises(SpecError, match=r"Dask worker 'w0' \(tcp://.*\) cannot import columnhub"),
    ):
        columnhub.deliver(spec(primary), output=tmp_path / "out", scheduler=address, cache=False)
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_a_cluster_running_another_columnhub_version_is_a_user_error(
    primary: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks, cache addresses and output format belong to one version: no mixing."""
    from columnhub.errors import SpecError
    from columnhub.execute import dask as executor

    with subprocess_cluster(tmp_path) as address:
        monkeypatch.setattr(executor, "__version__", "0.0.0+elsewhere")  # this process's
        with pytest.raises(
            SpecError,
            match=rf"scheduler at {address} runs columnhub {columnhub.__version__}, "
            r"this process 0\.0\.0\+elsewhere",
        ):
            columnhub.deliver(
                spec(primary), output=tmp_path / "out", scheduler=address, cache=False
            )
        monkeypatch.setattr(executor, "_ready", lambda: "0.0.0+elsewhere")  # a scheduler that agrees
        with pytest.raises(
            SpecError, match=rf"Dask worker 'w0' .* runs columnhub {columnhub.__version__}"
        ):
            columnhub.deliver(
                spec(primary), output=tmp_path / "out", scheduler=address, cache=False
            )


def test_a_cluster_without_workers_yet_is_said_and_waited_for(
    primary: list[Path], tmp_path: Path
) -> None:
    """As under dask-jobqueue while the batch system starts the workers: a note, then the work."""
    import threading

    outcome: dict[str, Any] = {}
    with subprocess_cluster(tmp_path, worker=False) as address:

        def run() -> None:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                try:
                    outcome["result"] = columnhub.deliver(
                        spec(primary), output=tmp_path / "out", scheduler=address, cache=False
                    )
                except BaseException as err:  # noqa: BLE001 - handed to the test thread
                    outcome["error"] = err
            outcome["warnings"] = [str(w.message) for w in seen]

        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(3.0)
        assert thread.is_alive()  # waiting, not failed
        worker = subprocess.Popen(
            [str(Path(sys.executable).parent / "dask"), "worker", address, "--nthreads", "1",
             "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            thread.join(120)
            assert not thread.is_alive()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    assert "error" not in outcome, outcome.get("error")
    assert any(
        f"no Dask worker has joined the cluster at {address} yet" in w
        for w in outcome["warnings"]
    ), outcome["warnings"]
    assert delivered_rows(outcome["result"]) == uproot_rows(primary)


def test_a_scheduler_lost_mid_request_is_said_in_one_line_and_nothing_published(
    primary: list[Path], tmp_path: Path
) -> None:
    """Not the user's mistake (exit 1), no traceback, no part published, the manifest says so."""
    spec_file = spec_yaml(tmp_path, primary)
    out = tmp_path / "out"
    procs: list[subprocess.Popen[bytes]] = []
    with subprocess_cluster(
        tmp_path, worker_env={"COLUMNHUB_TEST_PART_SLEEP": "30"}, processes=procs
    ) as address:
        cli = subprocess.Popen(
            [CLI, "deliver", str(spec_file), "-o", str(out), "--no-progress", "--no-cache",
             "--scheduler", address],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        with distributed.Client(address, timeout="60s") as c:
            deadline = time.monotonic() + 60
            while not any("-part-" in str(k) for ks in c.processing().values() for k in ks):
                assert time.monotonic() < deadline, "no part task started"
                time.sleep(0.1)
            os.killpg(procs[0].pid, signal.SIGKILL)  # the scheduler, inside a part task
        _, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    expected = (
        f"columnhub: error: lost the connection to the Dask scheduler at {address} "
        "mid-request (FutureCancelledError): nothing was published; once the scheduler is "
        "back, run the request again (what the workers stored in the column cache is reused)"
    )
    assert stderr.strip().splitlines() == [expected]
    manifest = read_manifest(out)
    assert manifest is not None
    assert not manifest["complete"]
    assert "lost the connection to the Dask scheduler" in manifest["error"]
    assert not list(out.glob("*.parquet"))


def test_a_part_whose_workers_all_die_is_said_in_one_line(
    primary: list[Path], tmp_path: Path
) -> None:
    """distributed's ``KilledWorker`` (a worker OOM-killed in every attempt): one line, exit 1."""
    spec_file = spec_yaml(tmp_path, primary)
    out = tmp_path / "out"
    with subprocess_cluster(
        tmp_path,
        worker_env={"COLUMNHUB_TEST_PART_EXIT": "1"},
        scheduler_env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"},
    ) as address:
        run = subprocess.run(
            [CLI, "deliver", str(spec_file), "-o", str(out), "--no-progress", "--no-cache",
             "--scheduler", address],
            capture_output=True, text=True, timeout=300, check=False,
        )
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("columnhub: error: the Dask workers running task 'part 0000")
    assert "died one after another while running it (distributed gave up after 2)" in lines[0]
    assert "lower output.target_part_bytes and chunk_size" in lines[0]
    manifest = read_manifest(out)
    assert manifest is not None
    assert not manifest["complete"]
    assert not list(out.glob("*.parquet"))


def _set_paused(paused: bool, dask_worker: Any = None) -> None:
    """On a worker: a pause threshold below its memory (distributed pauses it), or the default."""
    dask_worker.memory_manager.memory_pause_fraction = 1e-6 if paused else 0.8


def test_a_paused_worker_is_said_while_the_request_waits_for_it(
    primary: list[Path], tmp_path: Path, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As when its memory passes the pause threshold: a warning, then the work once it resumes."""
    import threading

    from columnhub.execute import dask as executor

    monkeypatch.setattr(executor, "_WATCH_S", 0.2)
    outcome: dict[str, Any] = {}
    client.run(_set_paused, True)
    try:

        def run() -> None:
            try:
                outcome["result"] = columnhub.deliver(
                    spec(primary), output=tmp_path / "out", scheduler=client, cache=False
                )
            except BaseException as err:  # noqa: BLE001 - handed to the test thread
                outcome["error"] = err

        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            thread = threading.Thread(target=run)
            thread.start()
            deadline = time.monotonic() + 60
            while not any("is paused" in str(w.message) for w in seen):
                assert time.monotonic() < deadline, [str(w.message) for w in seen]
                time.sleep(0.1)
            assert thread.is_alive()  # waiting for the paused workers
            client.run(_set_paused, False)
            thread.join(120)
            assert not thread.is_alive()
    finally:
        client.run(_set_paused, False)
    assert "error" not in outcome, outcome.get("error")
    paused = [str(w.message) for w in seen if "is paused" in str(w.message)]
    assert len(paused) == len(set(paused)) <= 2  # once a worker
    assert "give the workers more memory, or lower output.target_part_bytes" in paused[0]
    assert delivered_rows(outcome["result"]) == uproot_rows(primary)
