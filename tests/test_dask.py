"""The Dask executor on a real ``LocalCluster``: same bytes, retries, errors, progress."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import awkward as ak
import pyarrow.parquet as pq
import pytest
import uproot
import yaml

import columnhub
from columnhub.errors import ExpressionError
from columnhub.execute.part import run_part
from columnhub.plan import make_plan
from columnhub.spec import load_request
from columnhub.synth import synthesize

distributed = pytest.importorskip("distributed")

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
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
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
