"""The chunk task is a picklable, idempotent function of (plan, chunk): ready for Dask workers."""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest

import columnhub
from columnhub.cache import ColumnCache
from columnhub.execute.chunk import run_chunk
from columnhub.plan import make_plan


def _run(args: tuple[bytes, int, str | None]) -> pa.Table:
    plan_blob, index, cache = args
    plan = pickle.loads(plan_blob)
    store = ColumnCache(cache) if cache else None
    return run_chunk(plan, plan.chunks[index], cache=store).table


def test_chunk_tasks_run_unchanged_in_other_processes(shared_data: Path, tmp_path: Path) -> None:
    request = columnhub.Request.from_dict({
        "dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
        "columns": ["MET_pt", "Jet_pt", "ht", "f_MET_pt"],
        "define": {"ht": "sum(Jet_pt[Jet_pt > 30])"},
        "where": "ht > 100",
        "friends": [{"name": "f", "dataset": {"name": "same",
                                               "files": [str(shared_data / "nano_tt_v12.root")]},
                     "columns": ["MET_pt"], "prefix": "f_"}],
        "chunk_size": 50,
    })
    plan = make_plan(request)
    blob = pickle.dumps(plan)
    here = [run_chunk(plan, c).table for c in plan.chunks]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=spawn) as pool:
        there = list(pool.map(_run, [(blob, i, None) for i in range(len(plan.chunks))]))
        # idempotent: run twice through a shared cache, the second time from the cache
        cache = str(tmp_path / "cache")
        first = list(pool.map(_run, [(blob, i, cache) for i in range(len(plan.chunks))]))
        second = list(pool.map(_run, [(blob, i, cache) for i in range(len(plan.chunks))]))
    assert len(here) == len(plan.chunks) == 4
    for a, b, c, d in zip(here, there, first, second, strict=True):
        assert a.equals(b)
        assert a.equals(c)
        assert a.equals(d)
    assert sum(t.num_rows for t in here) > 0


def test_forked_children_get_their_own_pools_and_files(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process forked after columnhub ran (its thread pools and open files
    exist) runs chunk tasks, joins included, with the same results, no hang."""
    import columnhub._kernels as kernels

    monkeypatch.setattr(kernels, "PARALLEL_MIN_ROWS", 1)  # every kernel uses the pool
    request = columnhub.Request.from_dict({
        "dataset": {"name": "tt", "files": [str(shared_data / "nano_tt_v12.root")]},
        "columns": ["Jet_pt", "f_Jet_eta"],
        "friends": [{"name": "f", "dataset": {"name": "same",
                                               "files": [str(shared_data / "nano_tt_v12.root")]},
                     "columns": ["Jet_eta"], "prefix": "f_"}],
        "chunk_size": 50,
    })
    plan = make_plan(request)
    blob = pickle.dumps(plan)
    here = [run_chunk(plan, c).table for c in plan.chunks]  # pools and the open file exist now
    fork = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(2, mp_context=fork) as pool:
        futures = [pool.submit(_run, (blob, i, None)) for i in range(len(plan.chunks))]
        there = [f.result(timeout=60) for f in futures]
    for a, b in zip(here, there, strict=True):
        assert a.equals(b)
