"""The column cache in delivery: full and partial hits, invalidation, races, corruption."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import awkward as ak
import pytest
import uproot

import columnhub
from columnhub.cache import ColumnCache

KEYS = ["run", "luminosityBlock", "event"]


def request(files: list[Path], columns: list[str], **extra: object) -> dict[str, object]:
    return {
        "dataset": {"name": "tt", "files": [str(f) for f in files]},
        "columns": columns,
        "chunk_size": 64,
        **extra,
    }


@pytest.fixture
def sample(shared_data: Path, tmp_path: Path) -> Path:
    path = tmp_path / "tt.root"
    shutil.copy(shared_data / "nano_tt_v12.root", path)
    return path


def test_repeat_is_a_full_hit_with_byte_identical_parts(sample: Path, tmp_path: Path) -> None:
    cache = ColumnCache(tmp_path / "cache")
    req = request([sample], ["MET_pt", "Jet_pt", "ht"], define={"ht": "sum(Jet_pt)"},
                  where="MET_pt > 20")
    cold = columnhub.deliver(req, output=tmp_path / "a", cache=cache)
    assert cold.manifest["cache"]["hits"] == 0
    same_dir = columnhub.deliver(req, output=tmp_path / "a", cache=cache)
    other_dir = columnhub.deliver(req, output=tmp_path / "b", cache=cache)
    entries = cold.manifest["cache"]["misses"]
    for warm in (same_dir, other_dir):
        assert warm.manifest["cache"]["misses"] == 0
        assert warm.manifest["cache"]["hits"] == entries
        assert all(c["read"] == [] for c in warm.manifest["chunks"])
        assert [f.name for f in warm.files] == [f.name for f in cold.files]
        for a, b in zip(cold.files, warm.files, strict=True):
            assert a.read_bytes() == b.read_bytes()
    # column level: without the stored result, every column chunk is still a hit
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    column_hits = columnhub.deliver(req, output=tmp_path / "c", cache=cache)
    assert column_hits.manifest["cache"]["misses"] == 0
    assert "reused_result" not in column_hits.manifest["cache"]
    assert all(c["read"] == [] for c in column_hits.manifest["chunks"])
    ref = uproot.open(sample)["Events"].arrays(["MET_pt", "Jet_pt"])
    sel = ref[ref.MET_pt > 20]
    got = column_hits.to_awkward()
    assert ak.to_list(got.Jet_pt) == ak.to_list(sel.Jet_pt)
    assert ak.to_list(got.ht) == pytest.approx(ak.to_list(ak.sum(sel.Jet_pt, axis=1)))


def test_overlapping_request_reads_only_missing_branches(sample: Path, tmp_path: Path) -> None:
    cache = ColumnCache(tmp_path / "cache")
    first = columnhub.deliver(
        request([sample], ["MET_pt", "Jet_pt", "Jet_eta"]), output=tmp_path / "a", cache=cache
    )
    chunks = len(first.manifest["chunks"])
    second = columnhub.deliver(
        request([sample], ["MET_pt", "Jet_pt", "Muon_pt", "lead"], define={"lead": "Jet_pt[:, 0]"}),
        output=tmp_path / "b",
        cache=cache,
    )
    m = second.manifest
    # keys, MET_pt, Jet_pt and its counter nJet (delivered with the Jet collection)
    assert m["cache"]["hits"] == (len(KEYS) + 3) * chunks
    assert m["cache"]["misses"] == 3 * chunks  # Muon_pt, its counter nMuon, lead
    assert {tuple(c["read"]) for c in m["chunks"]} == {("Muon_pt", "nMuon")}
    ref = uproot.open(sample)["Events"].arrays(["Muon_pt", "Jet_pt"])
    got = second.to_awkward()
    assert ak.to_list(got.Muon_pt) == ak.to_list(ref.Muon_pt)
    assert ak.to_list(got.lead) == ak.to_list(ak.firsts(ref.Jet_pt))


def test_changed_expression_recomputes_only_that_column(sample: Path, tmp_path: Path) -> None:
    cache = ColumnCache(tmp_path / "cache")
    columnhub.deliver(
        request([sample], ["x"], define={"x": "sum(Jet_pt)"}), output=tmp_path / "a", cache=cache
    )
    changed = columnhub.deliver(
        request([sample], ["x"], define={"x": "max(Jet_pt)"}), output=tmp_path / "b", cache=cache
    )
    chunks = len(changed.manifest["chunks"])
    assert changed.manifest["cache"]["misses"] == chunks  # only x; Jet_pt and keys hit
    ref = uproot.open(sample)["Events"]["Jet_pt"].array()
    assert ak.to_list(changed.to_awkward().x) == ak.to_list(ak.max(ref, axis=1))


def test_rewritten_input_never_serves_stale_columns(
    shared_data: Path, sample: Path, tmp_path: Path
) -> None:
    cache = ColumnCache(tmp_path / "cache")
    req = request([sample], ["MET_pt", "Jet_pt"])
    before = columnhub.deliver(req, output=tmp_path / "out", cache=cache)
    # Rewrite the file in place with different events (another sample, same schema)
    columnhub_synth = [sys.executable, "-m", "columnhub.cli.main", "synth"]
    subprocess.run(
        [*columnhub_synth, "--like", str(shared_data / "nano_tt_v12.root"), "--events", "300",
         "-o", str(tmp_path / "new.root"), "--seed", "7"],
        check=True, capture_output=True,
    )
    os.replace(tmp_path / "new.root", sample)
    after = columnhub.deliver(req, output=tmp_path / "out", cache=cache)
    assert after.manifest["cache"]["hits"] == 0
    assert "reused_result" not in after.manifest["cache"]
    ref = uproot.open(sample)["Events"].arrays(["MET_pt", "Jet_pt"])
    got = after.to_awkward()
    assert len(got) == 300 != before.events
    assert ak.to_list(got.Jet_pt) == ak.to_list(ref.Jet_pt)
    assert ak.to_list(got.MET_pt) == ak.to_list(ref.MET_pt)


def test_corrupt_entry_is_recomputed_not_served(sample: Path, tmp_path: Path) -> None:
    cache = ColumnCache(tmp_path / "cache")
    req = request([sample], ["Jet_pt"])
    columnhub.deliver(req, output=tmp_path / "a", cache=cache)
    shutil.rmtree(tmp_path / "a")  # no stored result: the columns are looked up one by one
    objects = sorted((tmp_path / "cache" / "objects").rglob("*"))
    entries = [p for p in objects if p.is_file()]
    for path in entries:  # damage every entry's payload
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    again = columnhub.deliver(req, output=tmp_path / "b", cache=cache)
    assert again.manifest["cache"]["hits"] == 0
    ref = uproot.open(sample)["Events"]["Jet_pt"].array()
    assert ak.to_list(again.to_awkward().Jet_pt) == ak.to_list(ref)
    assert cache.stats().corrupt >= 1


RACE = """
import sys, columnhub
req = {"dataset": {"name": "tt", "files": [sys.argv[1]]},
       "columns": ["MET_pt", "Jet_pt", "ht"], "define": {"ht": "sum(Jet_pt)"}, "chunk_size": 16}
r = columnhub.deliver(req, output=sys.argv[2], cache=sys.argv[3], workers=2, progress=False)
print(r.events)
"""


def test_two_processes_racing_on_one_request(sample: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(sample), str(tmp_path / f"out{i}"), str(cache_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    ref = uproot.open(sample)["Events"].arrays(["MET_pt", "Jet_pt"])
    for i in range(2):
        got = columnhub.Result.open(tmp_path / f"out{i}").to_awkward()
        assert ak.to_list(got.Jet_pt) == ak.to_list(ref.Jet_pt)
    assert not [p for p in cache_dir.rglob("*") if ".tmp" in p.name]
    # every entry left behind is valid: a third, column-level delivery is all hits
    for i in range(2):
        shutil.rmtree(tmp_path / f"out{i}")
    third = columnhub.deliver(
        request([sample], ["MET_pt", "Jet_pt", "ht"], define={"ht": "sum(Jet_pt)"},
                chunk_size=16),
        output=tmp_path / "third", cache=cache_dir,
    )
    assert third.manifest["cache"]["misses"] == 0


def test_cli_cache_stats_and_gc(sample: Path, tmp_path: Path) -> None:
    spec = tmp_path / "r.json"
    spec.write_text(json.dumps(request([sample], ["Jet_pt", "MET_pt"])))
    exe = Path(sys.executable).parent / "columnhub"
    cache = str(tmp_path / "cache")
    run = lambda *a: subprocess.run([str(exe), *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    assert run("deliver", str(spec), "-o", str(tmp_path / "o"), "--cache", cache).returncode == 0
    stats = json.loads(run("cache", "stats", "--cache", cache, "--json").stdout)
    assert stats["entries"] > 0
    assert stats["misses"] > 0
    done = run("cache", "gc", "--max-bytes", "0", "--cache", cache)
    assert done.returncode == 0, done.stderr
    assert json.loads(run("cache", "stats", "--cache", cache, "--json").stdout)["entries"] == 0
    bad = run("cache", "gc", "--max-bytes", "lots", "--cache", cache)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr


def test_read_only_cache_is_used_but_never_written(sample: Path, tmp_path: Path) -> None:
    spec = tmp_path / "r.json"
    spec.write_text(json.dumps(request([sample], ["Jet_pt"])))
    exe = Path(sys.executable).parent / "columnhub"
    cache = tmp_path / "cache"
    first = subprocess.run([str(exe), "deliver", str(spec), "-o", str(tmp_path / "a"), "--cache",
                            str(cache)], capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr
    shutil.rmtree(tmp_path / "a")
    before = sorted(p.name for p in (cache / "objects").rglob("*") if p.is_file())
    other = request([sample], ["Jet_pt", "MET_pt"])
    spec.write_text(json.dumps(other))
    done = subprocess.run([str(exe), "deliver", str(spec), "-o", str(tmp_path / "b"), "--cache",
                           str(cache), "--cache-read-only"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    m = columnhub.Result.open(tmp_path / "b").manifest
    assert m["cache"]["hits"] > 0  # keys and Jet_pt served from the shared cache
    assert m["cache"]["misses"] > 0  # MET_pt computed...
    after = sorted(p.name for p in (cache / "objects").rglob("*") if p.is_file())
    assert after == before  # ...but not written


def test_edited_result_is_not_reused(sample: Path, tmp_path: Path) -> None:
    cache = ColumnCache(tmp_path / "cache")
    req = request([sample], ["MET_pt"])
    first = columnhub.deliver(req, output=tmp_path / "a", cache=cache)
    part = first.files[0]
    stat = part.stat()
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, different bytes...
    part.write_bytes(bytes(data))
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...and the old time: the checksum catches it
    again = columnhub.deliver(req, output=tmp_path / "b", cache=cache)
    assert "reused_result" not in again.manifest["cache"]  # rebuilt from the column cache
    ref = uproot.open(sample)["Events"]["MET_pt"].array()
    assert ak.to_list(again.to_awkward().MET_pt) == ak.to_list(ref)
