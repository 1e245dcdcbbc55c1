"""Start-up: what a new process imports for ``--help``, ``cache stats`` and a whole-result hit.

A request answered entirely from the cache never imports uproot or numba
(nor awkward, pyarrow, numpy or pydantic): it is recognised before planning
from the spec's bytes and each input file's quick identity (stat + the ROOT
UUID read from the header, or a digest of the Parquet footer). The fast path
must never answer what the full path would answer differently: its result key
is checked against the full plan's, and every kind of input change is a miss.
Times are never asserted (they are in docs/cache.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uproot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import columnhub
from columnhub import _fastpath
from columnhub._rootheader import read_uuid
from columnhub.cache import ColumnCache
from columnhub.delivery import _result_key
from columnhub.plan import make_plan
from columnhub.spec import load_request

ENTRY_POINT = Path(sys.executable).parent / "columnhub"
KEYS = ["run", "luminosityBlock", "event"]
#: never imported by --help, cache stats or a whole-result hit
HEAVY = ("numba", "uproot", "awkward", "pyarrow", "numpy", "pydantic", "pandas", "fsspec")


def run_cli(*args: str, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the installed ``columnhub`` entry point in a new process; also every module it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(ENTRY_POINT), *args],
        check=False, capture_output=True, text=True, timeout=300, cwd=cwd,
    )
    imported = set()
    stderr = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name != "package":  # the header line
                imported.add(name)
        else:
            stderr.append(line)
    done.stderr = "\n".join(stderr)
    return done, imported


def heavy(imported: set[str]) -> list[str]:
    return sorted(m for m in imported if m.split(".")[0] in HEAVY)


def part_bytes(directory: Path) -> dict[str, bytes]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return {name: (directory / name).read_bytes() for name in manifest["files"]}


@pytest.fixture
def primary(shared_data: Path, tmp_path: Path) -> Path:
    path = tmp_path / "data" / "tt.root"
    path.parent.mkdir()
    shutil.copy(shared_data / "nano_tt_v12.root", path)
    return path


@pytest.fixture
def friend_file(primary: Path, tmp_path: Path) -> Path:
    """A Parquet friend: the primary's keys, shuffled, with a per-event score."""
    keys = uproot.open(primary)["Events"].arrays(KEYS, library="np")
    order = np.random.default_rng(5).permutation(len(keys["event"]))
    table = pa.table(
        {
            **{k: keys[k][order] for k in KEYS},
            "score": (keys["event"][order] % 97).astype(np.float32),
        }
    )
    path = tmp_path / "friend" / "f.parquet"
    path.parent.mkdir()
    pq.write_table(table, path)
    return path


def spec_dict(primary: Path, friend: Path | None = None, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "dataset": {"name": "tt", "files": [str(primary)]},
        "columns": ["MET_pt", "Jet_pt"],
        "where": "(nJet >= 2) & (MET_pt > 15)",
        "chunk_size": 64,
        **extra,
    }
    if friend is not None:
        data["friends"] = [
            {"name": "sc", "dataset": {"name": "sc", "files": [str(friend)]}, "columns": ["score"]}
        ]
        data["columns"] = [*data["columns"], "score"]
    return data


# ---------------------------------------------------------------------------
# the ROOT header


def test_root_header_uuid_is_uproots(shared_data: Path, tmp_path: Path) -> None:
    synth = tmp_path / "synth.root"
    done, _ = run_cli(
        "synth", "--like", str(shared_data / "nano_dy.root"), "--events", "50",
        "-o", str(synth), "--seed", "3",
    )
    assert done.returncode == 0, done.stderr
    files = [*sorted(shared_data.glob("*.root")), synth]
    assert len(files) >= 4
    for path in files:
        with uproot.open(path) as f:
            assert read_uuid(path) == str(f.file.uuid), path


def test_root_header_of_a_non_root_file_is_none(tmp_path: Path, shared_data: Path) -> None:
    text = tmp_path / "x.root"
    text.write_text("not a ROOT file at all, but long enough to hold a header" * 3)
    assert read_uuid(text) is None
    short = tmp_path / "short.root"
    short.write_bytes((shared_data / "nano_dy.root").read_bytes()[:40])
    assert read_uuid(short) is None
    assert read_uuid(tmp_path / "missing.root") is None


def test_root_header_large_file_layout(shared_data: Path, tmp_path: Path) -> None:
    """fVersion >= 1000000 (files over 2 GB): 8-byte seeks move the UUID; uproot agrees."""
    import struct

    small = struct.Struct(">4siiiiiiiBiiiH16s")
    big = struct.Struct(">4siiqqiiiBiqiH16s")
    data = bytearray((shared_data / "nano_dy.root").read_bytes())
    fields = list(small.unpack_from(data))
    fields[1] += 1_000_000  # the same version, 64-bit layout
    fields[-1] = uuid.UUID(int=0x0123456789ABCDEF0011223344556677).bytes
    header = big.pack(*fields)
    path = tmp_path / "big.root"
    # uproot reads the header only from the first bytes; the rest is padding
    path.write_bytes(header + bytes(max(0, 512 - len(header))))
    assert read_uuid(path) == "01234567-89ab-cdef-0011-223344556677"
    source = uproot.source.chunk.Chunk.wrap(None, bytes(path.read_bytes()))
    parsed = uproot.source.cursor.Cursor(0).fields(
        source, uproot.reading._file_header_fields_big, {}
    )
    assert str(uuid.UUID(bytes=parsed[-1])) == read_uuid(path)


# ---------------------------------------------------------------------------
# new processes: what they import


def test_help_and_version_import_nothing_heavy() -> None:
    done, imported = run_cli("--help")
    assert done.returncode == 0, done.stderr
    assert "deliver" in done.stdout
    assert "columnhub.cli.main" in imported  # the listing is real
    assert heavy(imported) == []
    for sub in ("deliver", "cache", "synth"):
        done, imported = run_cli(sub, "--help")
        assert done.returncode == 0, done.stderr
        assert heavy(imported) == [], sub
    done, imported = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"columnhub {columnhub.__version__}"
    assert heavy(imported) == []


def test_import_columnhub_is_light_and_names_resolve() -> None:
    code = (
        "import sys, columnhub; heavy = [m for m in sys.modules if m.split('.')[0] in "
        f"{HEAVY!r}]; r = columnhub.Request; print(heavy, r.__module__, columnhub.deliver.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "columnhub.spec", "columnhub.delivery"]
    assert dir(columnhub) == sorted(columnhub.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        columnhub.no_such_name  # noqa: B018


def test_cache_stats_imports_nothing_heavy(primary: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    columnhub.deliver(spec_dict(primary), output=tmp_path / "out", cache=cache)
    done, imported = run_cli("cache", "stats", "--cache", str(cache), "--json")
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["entries"] == sum(1 for p in (cache / "objects").rglob("*") if p.is_file()) > 0
    assert heavy(imported) == []


def test_whole_result_hit_imports_neither_numba_nor_uproot(
    primary: Path, friend_file: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(spec_dict(primary, friend_file)))
    cache = str(tmp_path / "cache")
    first, imported = run_cli("deliver", str(spec), "-o", str(tmp_path / "a"), "--cache", cache)
    assert first.returncode == 0, first.stderr
    assert "uproot" in imported  # the first one plans and reads
    before = part_bytes(tmp_path / "a")

    again, imported = run_cli("deliver", str(spec), "-o", str(tmp_path / "a"), "--cache", cache)
    assert again.returncode == 0, again.stderr
    assert heavy(imported) == []
    assert "whole result reused" in again.stdout
    assert part_bytes(tmp_path / "a") == before

    # another output directory: the parts are copied (and verified), still without planning
    other, imported = run_cli("deliver", str(spec), "-o", str(tmp_path / "b"), "--cache", cache)
    assert other.returncode == 0, other.stderr
    assert heavy(imported) == []
    assert list(part_bytes(tmp_path / "b").values()) == list(before.values())

    # the delivered rows are the request's, against a direct read
    got = columnhub.Result.open(tmp_path / "b").to_awkward()
    ref = uproot.open(primary)["Events"].arrays(["MET_pt", "Jet_pt", "nJet", *KEYS])
    keep = (ref.nJet >= 2) & (ref.MET_pt > 15)
    assert ak.to_list(got.MET_pt) == ak.to_list(ref.MET_pt[keep])
    assert ak.to_list(got.Jet_pt) == ak.to_list(ref.Jet_pt[keep])
    assert ak.to_list(got.score) == [float(e % 97) for e in ak.to_list(ref.event[keep])]


def test_modified_input_is_recomputed_by_a_new_process(
    primary: Path, shared_data: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(spec_dict(primary)))
    cache = str(tmp_path / "cache")
    first, _ = run_cli("deliver", str(spec), "-o", str(tmp_path / "a"), "--cache", cache)
    assert first.returncode == 0, first.stderr
    shutil.copy(shared_data / "nano_dy.root", tmp_path / "new.root")
    os.replace(tmp_path / "new.root", primary)  # the same path, other events
    again, imported = run_cli("deliver", str(spec), "-o", str(tmp_path / "a"), "--cache", cache)
    assert again.returncode == 0, again.stderr
    assert "whole result reused" not in again.stdout
    assert "uproot" in imported
    got = columnhub.Result.open(tmp_path / "a").to_awkward()
    ref = uproot.open(primary)["Events"].arrays(["MET_pt", "nJet"])
    assert ak.to_list(got.MET_pt) == ak.to_list(ref.MET_pt[(ref.nJet >= 2) & (ref.MET_pt > 15)])


# ---------------------------------------------------------------------------
# the fast path agrees with the full path, and misses every change


def full_key(request: Any, chunk_size: int | None = None) -> str:
    req = load_request(request)
    if chunk_size is not None:
        req = req.replace(chunk_size=chunk_size)
    return _result_key(make_plan(req))


def fast_key(store: ColumnCache, request: Any, chunk_size: int | None = None) -> str | None:
    known = _fastpath.lookup(store, _fastpath.source_key(request, chunk_size=chunk_size))
    if known is None or not _fastpath.unchanged(known):
        return None
    return known.result_key


COLUMNS = ["MET_pt", "Jet_pt", "Jet_eta", "nMuon", "Muon_pt", "PV_npvs"]
WHERES = [None, "MET_pt > 20", "(nJet >= 2) | (MET_pt < 10)", "num(Muon_pt) == 0"]


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    columns=st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=4, unique=True),
    where=st.sampled_from(WHERES),
    chunk=st.sampled_from([None, 50, 64, 1000]),
    with_friend=st.booleans(),
    as_file=st.booleans(),
)
def test_fast_key_is_the_full_plans_key(
    primary: Path,
    friend_file: Path,
    tmp_path: Path,
    columns: list[str],
    where: str | None,
    chunk: int | None,
    with_friend: bool,
    as_file: bool,
) -> None:
    store = ColumnCache(tmp_path / "cache")
    data = spec_dict(primary, friend_file if with_friend else None, where=where)
    data["columns"] = [*columns, *(["score"] if with_friend else [])]
    source: Any = data
    if as_file:
        source = tmp_path / "spec.yaml"
        source.write_text(json.dumps(data))
    result = columnhub.deliver(source, output=tmp_path / "out", cache=store, chunk_size=chunk)
    assert result.manifest["result_key"] == full_key(source, chunk)
    assert fast_key(store, source, chunk) == full_key(source, chunk)
    # another chunk size, where or column list is another source: never this result
    other = {**data, "chunk_size": 65}
    assert fast_key(store, other, chunk) is None


def test_a_request_object_is_a_fast_source_too(primary: Path, tmp_path: Path) -> None:
    store = ColumnCache(tmp_path / "cache")
    req = load_request(spec_dict(primary))
    first = columnhub.deliver(req, output=tmp_path / "a", cache=store)
    assert fast_key(store, req) == full_key(req)
    again = columnhub.deliver(req, output=tmp_path / "a", cache=store)
    assert again.manifest["cache"]["reused_result"]
    assert part_bytes(tmp_path / "a") == {n: (first.directory / n).read_bytes() for n in first.manifest["files"]}


def _same_size_rewrite(path: Path, edit: Any) -> None:
    """Rewrite ``path`` in place (same inode, same size) and restore its times."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    edit(data)
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        stat.st_ino, stat.st_size, stat.st_mtime_ns
    )


def _flip_root_uuid(data: bytearray) -> None:
    # "root", 7 ints, fUnits (1 byte), 3 ints, the UUID's version (2 bytes): the UUID at 47
    data[50] ^= 0xFF


def _flip_parquet_footer(data: bytearray) -> None:
    length = int.from_bytes(data[-8:-4], "little")
    at = len(data) - 8 - length // 2
    data[at] ^= 0x01


CHANGES = [
    "touch",  # a new modification time
    "replace",  # another file renamed over it (new inode)
    "root uuid",  # same inode, size and mtime, another UUID in the header
    "friend rewritten",  # the Parquet friend replaced by other rows
    "friend footer",  # same inode, size and mtime, another footer
    "file added",  # a glob of the primary matches one more file
    "file removed",  # a glob matches one file fewer
    "spec edited",  # the spec file's bytes changed
]


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(change=st.sampled_from(CHANGES))
def test_a_changed_input_is_never_a_fast_hit(
    shared_data: Path, tmp_path_factory: pytest.TempPathFactory, change: str
) -> None:
    tmp = tmp_path_factory.mktemp("change")
    (tmp / "data").mkdir()
    for name in ("nano_dy.root", "nano_dimuon.root"):
        shutil.copy(shared_data / name, tmp / "data" / name)
    keys = uproot.open(tmp / "data" / "nano_dy.root")["Events"].arrays(KEYS, library="np")
    keys2 = uproot.open(tmp / "data" / "nano_dimuon.root")["Events"].arrays(KEYS, library="np")
    friend = tmp / "f.parquet"
    both = {k: np.concatenate([keys[k], keys2[k]]) for k in KEYS}
    pq.write_table(pa.table({**both, "score": np.arange(len(both["event"]), dtype=np.float32)}), friend)
    data = {
        "dataset": {"name": "nano", "files": [str(tmp / "data" / "nano_d*.root")]},
        "columns": ["MET_pt", "score"],
        "friends": [
            {"name": "sc", "dataset": {"name": "sc", "files": [str(friend)]}, "columns": ["score"]}
        ],
    }
    spec = tmp / "spec.yaml"
    spec.write_text(json.dumps(data))
    store = ColumnCache(tmp / "cache")
    columnhub.deliver(spec, output=tmp / "out", cache=store)
    assert fast_key(store, spec) == full_key(spec)  # the hit before the change

    primary = tmp / "data" / "nano_dy.root"
    if change == "touch":
        os.utime(primary, ns=(primary.stat().st_atime_ns, primary.stat().st_mtime_ns + 10**9))
    elif change == "replace":
        shutil.copy(shared_data / "nano_dy.root", tmp / "copy.root")
        os.replace(tmp / "copy.root", primary)
    elif change == "root uuid":
        _same_size_rewrite(primary, _flip_root_uuid)
        assert read_uuid(primary) != str(uproot.open(shared_data / "nano_dy.root").file.uuid)
    elif change == "friend rewritten":
        table = pq.read_table(friend)
        pq.write_table(table.set_column(3, "score", pa.array(np.zeros(len(table), np.float32))), friend)
    elif change == "friend footer":
        _same_size_rewrite(friend, _flip_parquet_footer)
    elif change == "file added":
        shutil.copy(shared_data / "nano_dy.root", tmp / "data" / "nano_dz.root")
    elif change == "file removed":
        (tmp / "data" / "nano_dimuon.root").unlink()
    elif change == "spec edited":
        spec.write_text(json.dumps({**data, "columns": ["MET_pt"]}))
    assert fast_key(store, spec) is None
    if change not in ("friend footer", "spec edited"):
        # what the full path computes now is another result (it would not reuse this one)
        assert full_key(spec) != _fastpath.lookup(
            store, _fastpath.source_key(spec, chunk_size=None)
        ).result_key  # type: ignore[union-attr]


def test_a_file_changed_while_delivered_records_nothing(primary: Path, tmp_path: Path) -> None:
    """The quick identity must agree with the identity the plan saw, else nothing is recorded."""
    store = ColumnCache(tmp_path / "cache")
    data = spec_dict(primary)
    plan = make_plan(load_request(data))
    key = _fastpath.source_key(data, chunk_size=None)
    os.utime(primary, ns=(0, 10**18))  # the file the plan saw is not the file there now
    assert not _fastpath.remember(store, key, plan, _result_key(plan), directory=None)
    assert _fastpath.lookup(store, key) is None


def test_samples_and_unhashable_sources_have_no_fast_key(primary: Path) -> None:
    data = {"samples": {"a": spec_dict(primary)}}
    key = _fastpath.source_key(data, chunk_size=None)
    assert key is not None  # a dict: hashed; nothing is ever recorded under it (several samples)
    assert _fastpath.source_key(load_request(data), chunk_size=None) is None
    assert _fastpath.source_key({"x": object()}, chunk_size=None) is None
    assert _fastpath.source_key("/no/such/spec.yaml", chunk_size=None) is None


def test_a_remote_input_records_nothing(primary: Path, tmp_path: Path, http_server: Any) -> None:
    """Remote files take the full path (their identity needs a request to the server)."""
    store = ColumnCache(tmp_path / "cache")
    data = spec_dict(primary)
    data["dataset"]["files"] = [http_server.put(primary)]
    columnhub.deliver(data, output=tmp_path / "a", cache=store)
    assert _fastpath.lookup(store, _fastpath.source_key(data, chunk_size=None)) is None
    again = columnhub.deliver(data, output=tmp_path / "a", cache=store)
    assert again.manifest["cache"]["reused_result"]  # the full path still reuses it


def test_numba_loads_on_the_first_kernel_call() -> None:
    """Importing the engine (plan, chunk tasks, joins) costs no numba, nor do the numpy
    kernels; the first compiled-only kernel (the in-memory join's) loads it."""
    code = """
import sys
import numpy as np
import columnhub.delivery, columnhub.plan, columnhub.execute.chunk, columnhub.join
from columnhub import _kernels
before = 'numba' in sys.modules
rng = np.random.default_rng(1)
values = rng.integers(-1000, 1000, 5000)
rows = rng.integers(-1, 5000, 3000)
lo, hi = _kernels.minmax(values)
numpy_taken, _, _ = _kernels.gather_flat(values.astype(np.float64), rows)
numpy_only = 'numba' in sys.modules
keys = {"event": np.arange(10, dtype=np.uint64)}
joined = columnhub.join.join_arrays(keys, {**keys, "x": np.arange(10.0)}, on="event")
taken, valid, _ = _kernels.gather_flat(values.astype(np.float64), rows)  # uses the intrinsic
ok = (lo, hi) == (values.min(), values.max())
ok &= bool(np.array_equal(taken[rows >= 0], values[rows[rows >= 0]].astype(np.float64)))
ok &= bool(np.array_equal(np.asarray(valid, dtype=bool), rows >= 0))
ok &= bool(np.array_equal(taken[rows >= 0], numpy_taken[rows >= 0]))
ok &= joined["x"].tolist() == list(range(10))
print(before, numpy_only, 'numba' in sys.modules, ok)
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True", "True"]


@pytest.mark.parametrize("as_request", [False, True])
def test_what_the_request_hash_leaves_out_is_not_the_same_delivery(
    shared_data: Path, tmp_path: Path, as_request: bool
) -> None:
    """File order and the output directory are outside the request's hash, not outside its source."""
    a, b = shared_data / "nano_dy.root", shared_data / "nano_dimuon.root"

    def make(files: list[Path], directory: Path) -> Any:
        data = {
            "dataset": {"name": "d", "files": [str(f) for f in files]},
            "columns": ["MET_pt"],
            "output": {"directory": str(directory)},
        }
        return load_request(data) if as_request else data

    store = ColumnCache(tmp_path / "cache")
    first = make([a, b], tmp_path / "ab")
    columnhub.deliver(first, cache=store)
    other_order = make([b, a], tmp_path / "ab")
    if as_request:
        assert first.hash == other_order.hash  # the same request, as the hash sees it
    assert fast_key(store, other_order) is None
    swapped = columnhub.deliver(other_order, cache=store)
    assert "reused_result" not in swapped.manifest["cache"]
    ref = [*uproot.open(b)["Events"]["MET_pt"].array().tolist(),
           *uproot.open(a)["Events"]["MET_pt"].array().tolist()]
    assert swapped.to_awkward().MET_pt.tolist() == ref

    elsewhere = make([b, a], tmp_path / "elsewhere")
    moved = columnhub.deliver(elsewhere, cache=store)
    assert moved.directory == tmp_path / "elsewhere"
    assert moved.manifest["cache"]["reused_result"] == str((tmp_path / "ab").resolve())
    assert moved.to_awkward().MET_pt.tolist() == ref


# ---------------------------------------------------------------------------
# every column chunk cached: planned from the cached file metadata, no uproot, no numba


def direct(primary: Path, where: Any, columns: list[str]) -> dict[str, list[Any]]:
    """The rows a request delivers, from a direct uproot read of ``primary``."""
    ref = uproot.open(primary)["Events"].arrays(list(dict.fromkeys([*KEYS, *columns, "nJet", "MET_pt"])))
    keep = where(ref)
    return {name: ak.to_list(ref[name][keep]) for name in [*KEYS, *columns]}


#: the second request of each case, after a first one with MET_pt, Jet_pt and a keyed
#: friend's score under (nJet >= 2) & (MET_pt > 15): (its changes, its selection as a
#: direct read computes it, whether it joins the friend)
CHUNK_HITS = {
    "subset of the columns": (
        {"columns": ["Jet_pt"]},
        lambda ev: (ev.nJet >= 2) & (ev.MET_pt > 15),
        False,
    ),
    "another where": (
        {"where": "(nJet >= 3) | (MET_pt < 20)"},
        lambda ev: (ev.nJet >= 3) | (ev.MET_pt < 20),
        True,
    ),
    "the friend's column with another primary column subset": (
        {"columns": ["MET_pt"]},
        lambda ev: (ev.nJet >= 2) & (ev.MET_pt > 15),
        True,
    ),
}


@pytest.mark.parametrize("case", list(CHUNK_HITS))
def test_every_column_chunk_cached_imports_neither_numba_nor_uproot(
    primary: Path, friend_file: Path, tmp_path: Path, case: str
) -> None:
    """A request whose columns an earlier, different request cached plans without opening a file."""
    cache = str(tmp_path / "cache")
    first_spec = tmp_path / "first.json"
    first_spec.write_text(json.dumps(spec_dict(primary, friend_file)))
    first, imported = run_cli("deliver", str(first_spec), "-o", str(tmp_path / "a"), "--cache", cache)
    assert first.returncode == 0, first.stderr
    assert "uproot" in imported  # the first one plans from the file and reads it

    change, where, with_friend = CHUNK_HITS[case]
    spec = tmp_path / "second.json"
    spec.write_text(json.dumps(spec_dict(primary, friend_file if with_friend else None, **change)))
    done, imported = run_cli("deliver", str(spec), "-o", str(tmp_path / "b"), "--cache", cache)
    assert done.returncode == 0, done.stderr
    assert "whole result reused" not in done.stdout  # another request: built from column chunks
    assert "uproot" not in imported
    assert "numba" not in imported
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert all(c["read"] == [] for c in manifest["chunks"])  # no branch read from the file
    if "where" in change:  # only the new selection's mask is computed, from cached columns
        assert manifest["cache"]["misses"] == len(manifest["chunks"])
    else:
        assert manifest["cache"]["misses"] == 0  # the selection too was cached
    columns = change.get("columns", ["MET_pt", "Jet_pt"])
    got = columnhub.Result.open(tmp_path / "b").to_awkward()
    ref = direct(primary, where, ["nJet", *columns])
    expected = [*KEYS, *(["MET_pt"] if "MET_pt" in columns else [])]
    expected += ["nJet", "Jet_pt"] if "Jet_pt" in columns else []
    assert got.fields == expected + (["score"] if with_friend else [])
    for name in expected:
        assert ak.to_list(got[name]) == ref[name], name
    if with_friend:  # the friend's score of each event is its event number % 97
        assert ak.to_list(got.score) == [float(e % 97) for e in ref["event"]]


def test_a_rewritten_file_is_planned_from_the_file_again(shared_data: Path, tmp_path: Path) -> None:
    """Same path, inode, size and modification time, other contents and ROOT UUID: never
    planned from the metadata stored for the file it replaced (whose columns it would serve)."""
    from columnhub.synth import synthesize

    versions = []
    for seed in (1, 2):  # uncompressed flat branches: the same size for any seed
        (made,) = synthesize(
            shared_data / "nano_tt_v12.root", events=600, output=tmp_path / f"v{seed}.root",
            seed=seed, branches=["MET_*"], compression="none", basket_events=200,
        )
        versions.append(made)
    old, new = versions
    assert old.stat().st_size == new.stat().st_size
    assert read_uuid(old) != read_uuid(new)
    path = tmp_path / "data" / "ev.root"
    path.parent.mkdir()
    shutil.copyfile(old, path)
    cache = str(tmp_path / "cache")
    request = {"dataset": {"name": "ev", "files": [str(path)]}, "columns": ["MET_pt"],
               "chunk_size": 200}
    spec = tmp_path / "a.json"
    spec.write_text(json.dumps(request))
    first, _ = run_cli("deliver", str(spec), "-o", str(tmp_path / "a"), "--cache", cache)
    assert first.returncode == 0, first.stderr

    _same_size_rewrite(path, lambda data: data.__setitem__(slice(None), new.read_bytes()))
    assert read_uuid(path) == read_uuid(new)
    # another request over the cached column: planned from the file, read from the file
    spec = tmp_path / "b.json"
    spec.write_text(json.dumps({**request, "columns": ["MET_pt", "MET_phi"]}))
    done, imported = run_cli("deliver", str(spec), "-o", str(tmp_path / "b"), "--cache", cache)
    assert done.returncode == 0, done.stderr
    assert "uproot" in imported
    result = columnhub.Result.open(tmp_path / "b")
    assert [f["uuid"] for f in result.manifest["inputs"]] == [read_uuid(new)]
    assert result.manifest["cache"]["hits"] == 0
    got = result.to_awkward()
    ref = uproot.open(new)["Events"].arrays([*KEYS, "MET_pt", "MET_phi"])
    stale = uproot.open(old)["Events"]["MET_pt"].array()
    assert ak.to_list(ref.MET_pt) != ak.to_list(stale)  # the test can tell them apart
    for name in [*KEYS, "MET_pt", "MET_phi"]:
        assert ak.to_list(got[name]) == ak.to_list(ref[name]), name


def _plan_facts(plan: Any) -> dict[str, Any]:
    """What of a plan could come from file metadata, in comparable form."""
    return {
        "files": [*plan.dataset.files, *(f for fr in plan.friends for f in fr.dataset.files)],
        "checks": [f.check for f in plan.dataset.files],
        "columns": plan.dataset.columns,
        "absent": plan.dataset.absent,
        "chunks": plan.chunks,
        "parts": plan.parts,
        "bytes_per_event": plan.bytes_per_event,
        "outputs": plan.outputs,
        "collections": plan.collections,
        "definitions": {n: (c.kind, c.deps, c.fingerprint) for n, c in plan.columns.items()},
        "result_key": _result_key(plan),
    }


class _CountingOpens:
    """Counts the ROOT files opened with uproot (a wrapper of the real ``open_tree``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from columnhub.sources import root

        self.opened: list[str] = []
        real = root.open_tree

        def counting(path: str, spec: Any) -> Any:
            self.opened.append(path)
            return real(path, spec)

        monkeypatch.setattr(root, "open_tree", counting)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    columns=st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=4, unique=True),
    where=st.sampled_from(WHERES),
    chunk=st.sampled_from([50, 64, 1000]),
    compression=st.sampled_from(["zstd", "none"]),
    with_friend=st.booleans(),
)
def test_a_plan_from_cached_metadata_is_the_plan_from_the_files(
    primary: Path,
    friend_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    columns: list[str],
    where: str | None,
    chunk: int,
    compression: str,
    with_friend: bool,
) -> None:
    from columnhub.sources import root

    second = tmp_path_factory.mktemp("other") / "tt2.root"  # a second file of the dataset
    shutil.copyfile(primary, second)
    data = spec_dict(primary, friend_file if with_friend else None, where=where, chunk_size=chunk)
    data["dataset"]["files"] = [str(primary), str(second)]
    data["columns"] = [*columns, *(["score"] if with_friend else [])]
    data["output"] = {"compression": compression}
    req = load_request(data)
    store = ColumnCache(tmp_path_factory.mktemp("cache"))
    opens = _CountingOpens(monkeypatch)
    root.forget_files()
    from_files = make_plan(req)  # no cache: the files themselves
    assert opens.opened  # really read from the files
    root.forget_files()
    storing = make_plan(req, cache=store)  # reads the files and stores what it read
    root.forget_files()
    opens.opened.clear()
    from_cache = make_plan(req, cache=store)
    assert opens.opened == []  # planned without opening a file
    assert _plan_facts(from_cache) == _plan_facts(storing) == _plan_facts(from_files)


def test_a_remote_file_is_planned_from_cached_metadata_until_it_changes(
    primary: Path, shared_data: Path, tmp_path: Path, http_server: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over HTTP: the stamp is what storage says (size, ETag / Last-Modified) and the UUID
    read with one ranged request; the file itself is opened only when that changes."""
    from columnhub.sources import root

    name = f"remote-{uuid.uuid4().hex}.root"
    url = http_server.put(primary, name=name)
    req = load_request({"dataset": {"name": "r", "files": [url]}, "columns": ["MET_pt", "Jet_pt"],
                        "where": "nJet >= 2", "chunk_size": 64})
    store = ColumnCache(tmp_path / "cache")
    opens = _CountingOpens(monkeypatch)
    root.forget_files()
    first = make_plan(req, cache=store)
    assert opens.opened == [url]
    root.forget_files()
    opens.opened.clear()
    again = make_plan(req, cache=store)
    assert opens.opened == []
    assert _plan_facts(again) == _plan_facts(first)

    http_server.put(shared_data / "nano_dy.root", name=name)  # another file at the same URL
    root.forget_files()
    changed = make_plan(req, cache=store)
    assert opens.opened == [url]
    assert [f.identity_dict["uuid"] for f in changed.dataset.files] == [
        read_uuid(shared_data / "nano_dy.root")
    ]
    assert changed.dataset.entries == uproot.open(shared_data / "nano_dy.root")["Events"].num_entries
    result = columnhub.deliver(req, output=tmp_path / "out", cache=store)
    got = result.to_awkward()
    ref = uproot.open(shared_data / "nano_dy.root")["Events"].arrays(["MET_pt", "nJet"])
    assert ak.to_list(got.MET_pt) == ak.to_list(ref.MET_pt[ref.nJet >= 2])


def test_an_unreadable_branch_is_named_from_cached_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What uproot said of a branch it cannot read is stored too: the same error, file unopened."""
    from columnhub.errors import UnreadableBranchError
    from columnhub.sources import root

    n = 7
    good = tmp_path / "good.root"
    with uproot.recreate(good, compression=None) as file:
        file.mktree("Events", {"run": np.uint32, "luminosityBlock": np.uint32,
                               "event": np.uint64, "weird": np.float64, "y": np.float32})
        file["Events"].extend({"run": np.ones(n, np.uint32), "luminosityBlock": np.ones(n, np.uint32),
                               "event": np.arange(n, dtype=np.uint64), "weird": np.arange(n) * 1.5,
                               "y": np.arange(n, dtype=np.float32)})
    bad = tmp_path / "bad.root"
    bad.write_bytes(good.read_bytes().replace(b"TLeafD", b"TLeafX"))  # a leaf class uproot lacks
    req = load_request({"dataset": {"name": "d", "files": [str(bad)]}, "columns": ["y", "weird"]})
    store = ColumnCache(tmp_path / "cache")
    with pytest.raises(UnreadableBranchError) as direct_err:
        make_plan(req)  # no cache: from the file
    root.forget_files()
    with pytest.raises(UnreadableBranchError):
        make_plan(req, cache=store)  # from the file, stored
    opens = _CountingOpens(monkeypatch)
    root.forget_files()
    with pytest.raises(UnreadableBranchError) as cached_err:
        make_plan(req, cache=store)
    assert opens.opened == []
    assert str(cached_err.value) == str(direct_err.value)
    assert "'weird'" in str(cached_err.value)
    assert "TLeafX" in str(cached_err.value)
    ok = make_plan(load_request({"dataset": {"name": "d", "files": [str(bad)]}, "columns": ["y"]}),
                   cache=store)
    assert opens.opened == []
    assert ok.dataset.entries == n


def test_a_computed_counter_is_planned_from_cached_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file without NanoAOD counters: whether a branch holds lists is stored too."""
    from columnhub.sources import root

    rng = np.random.default_rng(3)
    counts = rng.integers(0, 5, 40)
    jets = {n: ak.unflatten(rng.normal(size=int(counts.sum())).astype(np.float32), counts)
            for n in ("Jet_pt", "Jet_eta")}
    path = tmp_path / "nocounters.root"
    with uproot.recreate(path) as file:
        file["Events"] = {"run": np.ones(40, np.uint32), "luminosityBlock": np.ones(40, np.uint32),
                          "event": np.arange(40, dtype=np.uint64), "MET_pt": np.arange(40.0), **jets}
    with uproot.open(path) as file:
        assert "nJet" not in file["Events"]  # uproot names its counters nJet_pt, nJet_eta
    req = load_request({"dataset": {"name": "d", "files": [str(path)]},
                        "columns": ["Jet_pt", "Jet_eta", "MET_pt"], "chunk_size": 16})
    store = ColumnCache(tmp_path / "cache")
    root.forget_files()
    from_files = make_plan(req)
    root.forget_files()
    make_plan(req, cache=store)
    opens = _CountingOpens(monkeypatch)
    root.forget_files()
    from_cache = make_plan(req, cache=store)
    assert opens.opened == []
    assert from_cache.columns["nJet"].source == {"counts": "Jet_pt"}  # computed from the lists
    assert _plan_facts(from_cache) == _plan_facts(from_files)
    got = columnhub.deliver(req, output=tmp_path / "out", cache=store).to_awkward()
    assert ak.to_list(got.nJet) == counts.tolist()
    assert ak.to_list(got.Jet_eta) == ak.to_list(jets["Jet_eta"])
