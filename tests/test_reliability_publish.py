"""Publishing under faults: kills at every publish step, full disks, races, strays.

Every fault is real: child processes stopped at a named publish step (the
test-only hook ``COLUMNHUB_TEST_PAUSE_AT`` makes the process SIGSTOP itself
there) and then killed with SIGKILL or SIGTERM; full disks are size-capped
tmpfs mounts (or, where mounting is not allowed, a child process under
``RLIMIT_FSIZE``); unreadable directories are read by a child that has
dropped to the ``nobody`` user. Each result is compared byte for byte with a
clean delivery of the same request, and the clean deliveries with a direct
uproot read.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import awkward as ak
import pytest
import uproot
from hypothesis import given
from hypothesis import strategies as st

import columnhub
from columnhub.errors import OutputError

SAMPLE = "nano_tt_v12.root"
KEYS = ["run", "luminosityBlock", "event"]
SMALL = ["MET_pt", "Jet_pt"]  # 2 parts
LARGE = ["MET_pt", "Jet_pt", "Jet_eta", "Jet_phi", "Muon_pt", "Electron_pt", "Jet_mass"]  # 5 parts
CLI = Path(sys.executable).parent / "columnhub"

CHILD = """
import json, sys, columnhub
columnhub.deliver(json.loads(sys.argv[1]), output=sys.argv[2], cache=sys.argv[3],
                  workers=1, progress=False)
"""


def request(shared_data: Path, columns: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "dataset": {"name": "tt", "files": [str(shared_data / SAMPLE)]},
        "columns": columns,
        "chunk_size": 20,
        "output": {"target_part_bytes": 6000, "compression": "none"},
        **extra,
    }


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, list[bytes]]:
    """Clean deliveries (no cache, fresh directory): the bytes of each part, in order.

    Checked once against a direct uproot read, so byte equality with them
    means the right rows and columns.
    """
    base = tmp_path_factory.mktemp("clean")
    ref = uproot.open(shared_data / SAMPLE)["Events"].arrays(KEYS + LARGE)
    out = {}
    for name, columns in (("small", SMALL), ("large", LARGE)):
        result = columnhub.deliver(
            request(shared_data, columns), output=base / name, cache=False, progress=False
        )
        got = result.to_awkward()
        for column in KEYS + columns:
            assert ak.to_list(got[column]) == ak.to_list(ref[column]), column
        out[name] = [f.read_bytes() for f in result.files]
    assert len(out["small"]) >= 2
    assert len(out["large"]) > len(out["small"])
    return out


def holds(directory: Path, parts: list[bytes], *, tidy: bool = False) -> None:
    """``directory`` holds a complete result whose parts are exactly ``parts``."""
    result = columnhub.Result.open(directory)
    assert result.complete
    assert [f.read_bytes() for f in result.files] == parts
    assert [p["xxh3"] for p in result.manifest["parts"]] == [
        columnhub_checksum(f) for f in result.files
    ]
    if tidy:  # nothing left over: no old parts, staging, journal or lock
        assert sorted(p.name for p in directory.iterdir()) == sorted(
            ["manifest.json", *result.manifest["files"]]
        )


def columnhub_checksum(path: Path) -> str:
    import xxhash

    return xxhash.xxh3_64(path.read_bytes()).hexdigest()


def start_stopped(step: str, *args: str, cli: bool = False) -> subprocess.Popen[bytes]:
    """Start a delivery in a child process and wait until it stops itself at ``step``."""
    env = {**os.environ, "COLUMNHUB_TEST_PAUSE_AT": step}
    command = [str(CLI), *args] if cli else [sys.executable, "-c", CHILD, *args]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)
        out, err = proc.communicate()
        pytest.fail(f"the child never reached step {step!r}: {out.decode()}{err.decode()}")
    return proc


def kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.communicate()


def deliver(req: dict[str, Any], directory: Path, cache: Path) -> columnhub.Result:
    return columnhub.deliver(req, output=directory, cache=cache, workers=1, progress=False)


# -- kills at every publish step -------------------------------------------------------

BEFORE_SWITCH = ["locked", "staged", "journal", "moving", "moved"]
AFTER_SWITCH = ["published", "cleaned"]


@pytest.mark.parametrize("step", BEFORE_SWITCH + AFTER_SWITCH)
def test_kill_at_each_publish_step_keeps_a_complete_result(
    shared_data: Path, tmp_path: Path, clean: dict[str, list[bytes]], step: str
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    deliver(request(shared_data, SMALL), out, cache)
    holds(out, clean["small"], tidy=True)
    child = start_stopped(step, json.dumps(request(shared_data, LARGE)), str(out), str(cache))
    # stopped mid-publish: the previous result until the manifest's rename, the new one after
    expected = clean["small"] if step in BEFORE_SWITCH else clean["large"]
    holds(out, expected)
    kill(child)
    holds(out, expected)
    again = deliver(request(shared_data, LARGE), out, cache)  # recovers whatever was left
    holds(out, clean["large"], tidy=True)
    assert again.complete


@pytest.mark.parametrize("step", ["staged", "moving", "published"])
def test_kill_during_a_first_delivery_then_rerun(
    shared_data: Path, tmp_path: Path, clean: dict[str, list[bytes]], step: str
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    child = start_stopped(step, json.dumps(request(shared_data, LARGE)), str(out), str(cache))
    if step == "published":
        holds(out, clean["large"])
    else:  # nothing published yet: no manifest, so nothing that looks like a result
        assert not (out / "manifest.json").exists()
    kill(child)
    deliver(request(shared_data, LARGE), out, cache)
    holds(out, clean["large"], tidy=True)


@pytest.mark.parametrize("step", ["copying", "staged", "moving", "published"])
def test_kill_while_a_reused_result_is_copied(
    shared_data: Path, tmp_path: Path, clean: dict[str, list[bytes]], step: str
) -> None:
    out, elsewhere, cache = tmp_path / "out", tmp_path / "elsewhere", tmp_path / "cache"
    deliver(request(shared_data, LARGE), elsewhere, cache)  # the cache records this result
    deliver(request(shared_data, SMALL), out, cache)
    child = start_stopped(step, json.dumps(request(shared_data, LARGE)), str(out), str(cache))
    expected = clean["large"] if step == "published" else clean["small"]
    holds(out, expected)
    kill(child)
    holds(out, expected)
    again = deliver(request(shared_data, LARGE), out, cache)
    assert again.manifest["cache"].get("reused_result")
    holds(out, clean["large"], tidy=True)
    holds(elsewhere, clean["large"], tidy=True)


# -- reuse ------------------------------------------------------------------------------


def test_tampered_part_with_restored_mtime_is_not_reused_in_place(
    shared_data: Path, tmp_path: Path, clean: dict[str, list[bytes]]
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    first = deliver(request(shared_data, LARGE), out, cache)
    part = first.files[1]
    stat = part.stat()
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size...
    part.write_bytes(bytes(data))
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...and the old mtime
    again = deliver(request(shared_data, LARGE), out, cache)
    assert "reused_result" not in again.manifest["cache"]  # recomputed (from the column cache)
    holds(out, clean["large"], tidy=True)


def test_a_reused_result_is_cloned_where_the_file_system_shares_blocks(
    shared_data: Path, tmp_path: Path, clean: dict[str, list[bytes]]
) -> None:
    with reflink_disk(tmp_path / "xfs") as mounted:
        if not mounted:
            pytest.skip("needs root, mkfs.xfs (xfsprogs) and a loop device")
        disk, cache = tmp_path / "xfs", tmp_path / "xfs" / "cache"
        first = deliver(request(shared_data, LARGE), disk / "first", cache)
        second = deliver(request(shared_data, LARGE), disk / "second", cache)
        assert second.manifest["cache"]["reused_result"] == str((disk / "first").resolve())
        holds(disk / "second", clean["large"], tidy=True)
        for part in second.files:  # clones: their blocks are the first result's, not copies
            frag = subprocess.run(
                ["filefrag", "-v", str(part)], capture_output=True, text=True, check=False
            )
            assert "shared" in frag.stdout, frag.stdout
        # copy-on-write, unlike a hard link: the first result damaged in place (one bit,
        # same size and mtime) leaves the clone intact, and is itself not cloned again
        part = first.files[1]
        stat = part.stat()
        with part.open("r+b") as f:
            f.seek(stat.st_size // 2)
            byte = f.read(1)
            f.seek(stat.st_size // 2)
            f.write(bytes([byte[0] ^ 0x01]))
        os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        holds(disk / "second", clean["large"], tidy=True)
        third = deliver(request(shared_data, LARGE), disk / "third", cache)
        assert third.manifest["cache"].get("reused_result") != str((disk / "first").resolve())
        holds(disk / "third", clean["large"], tidy=True)


def test_whole_result_reuse_reports_what_this_run_did(shared_data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    req = request(shared_data, SMALL, define={"ht": "sum(Jet_pt)"})
    req["columns"] = [*SMALL, "ht"]
    cold = deliver(req, tmp_path / "a", cache)
    assert cold.manifest["events_read"] == 200
    for target in ("a", "b"):  # in place, then copied from "a"
        warm = deliver(req, tmp_path / target, cache).manifest
        assert warm["cache"]["reused_result"] == str((tmp_path / "a").resolve())
        assert warm["events_read"] == 0  # nothing read...
        assert warm["cache"]["misses"] == 0  # ...nothing computed...
        assert warm["cache"]["hits"] == cold.manifest["cache"]["misses"]  # ...all served
        assert all(c["read"] == [] and c["cache_misses"] == 0 for c in warm["chunks"])
        assert sum(c["cache_hits"] for c in warm["chunks"]) == warm["cache"]["hits"]
        assert warm["events"] == cold.manifest["events"]


# -- one directory, two requests ----------------------------------------------------------


def test_second_request_waits_for_the_lock_then_fails_clearly(
    shared_data: Path,
    tmp_path: Path,
    clean: dict[str, list[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    holder = start_stopped("staged", json.dumps(request(shared_data, SMALL)), str(out), str(cache))
    monkeypatch.setenv("COLUMNHUB_OUTPUT_LOCK_TIMEOUT", "0.3")
    try:
        busy = rf"in use by another delivery \(process {holder.pid}\)"
        with pytest.raises(OutputError, match=busy):
            deliver(request(shared_data, LARGE), out, cache)
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        _, err = holder.communicate(timeout=300)
    assert holder.returncode == 0, err.decode()
    holds(out, clean["small"], tidy=True)  # the holder's result, none of the other's parts
    monkeypatch.setenv("COLUMNHUB_OUTPUT_LOCK_TIMEOUT", "300")
    deliver(request(shared_data, LARGE), out, cache)
    holds(out, clean["large"], tidy=True)


def test_two_requests_racing_for_one_directory(
    shared_data: Path, tmp_path: Path, clean: dict[str, list[bytes]]
) -> None:
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                json.dumps(request(shared_data, columns)),
                str(out),
                str(tmp_path / f"cache{i}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i, columns in enumerate((SMALL, LARGE))
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()  # the second waited for the first
    result = columnhub.Result.open(out)
    # the columns only LARGE asks for tell which request's result is there
    which = "large" if set(LARGE) - set(SMALL) <= result.manifest["columns"].keys() else "small"
    holds(out, clean[which], tidy=True)


# -- full disks ---------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str = "2m") -> Iterator[bool]:
    """A size-capped tmpfs at ``path``; yields False where mounting is not allowed."""
    path.mkdir()
    with _mount(path, ["-t", "tmpfs", "-o", f"size={size}", "tmpfs"]) as mounted:
        yield mounted


@contextlib.contextmanager
def reflink_disk(path: Path) -> Iterator[bool]:
    """An XFS file system with reflinks, on a loop device, at ``path``; False where not allowed."""
    path.mkdir()
    image = path.with_suffix(".img")
    made = False
    if shutil.which("mkfs.xfs") and os.geteuid() == 0:
        with image.open("wb") as f:
            f.truncate(320 * 2**20)  # sparse; mkfs.xfs wants >= 300 MiB
        command = ["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)]
        made = subprocess.run(command, capture_output=True, check=False).returncode == 0
    try:
        with _mount(path, ["-o", "loop", str(image)], allowed=made) as mounted:
            yield mounted  # unmounted, the loop device goes too
    finally:
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def _mount(path: Path, args: list[str], *, allowed: bool = True) -> Iterator[bool]:
    """``mount ARGS path`` for the block; yields False where mounting is not allowed."""
    mounted = allowed and (
        subprocess.run(["mount", *args, str(path)], capture_output=True, check=False).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, *, leave: int) -> Path:
    """Fill ``disk`` until only about ``leave`` bytes are free."""
    filler = disk / ".filler"
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


def cli(*args: str, fsize: int | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a child; ``fsize`` caps each file it writes (RLIMIT_FSIZE, SIGXFSZ ignored)."""

    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [str(CLI), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        preexec_fn=limit if fsize is not None else None,  # noqa: PLW1509
    )


def spec_file(tmp_path: Path, req: dict[str, Any]) -> str:
    path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.json"
    path.write_text(json.dumps(req))
    return str(path)


def deliver_small_with_the_cli(shared_data: Path, tmp_path: Path, out: Path, cache: str) -> None:
    """The small result delivered into ``out`` by the CLI (the previous result of a test)."""
    spec = spec_file(tmp_path, request(shared_data, SMALL))
    done = cli("deliver", spec, "-o", str(out), "--cache", cache)
    assert done.returncode == 0, done.stderr


def test_full_output_disk_is_one_clear_error_and_keeps_the_previous_result(
    shared_data: Path, tmp_path: Path, clean: dict[str, list[bytes]]
) -> None:
    cache = str(tmp_path / "cache")
    large = spec_file(tmp_path, request(shared_data, LARGE))
    with small_disk(tmp_path / "disk") as mounted:
        out = tmp_path / "disk" / "out"
        deliver_small_with_the_cli(shared_data, tmp_path, out, cache)
        if mounted:
            filler = fill(tmp_path / "disk", leave=24 * 1024)  # less than the new result
            full = cli("deliver", large, "-o", str(out), "--cache", cache)
        else:  # no mounting here: every file the child writes is capped instead
            full = cli("deliver", large, "-o", str(out), "--cache", cache, "--no-cache", fsize=4096)
        assert full.returncode == 2, full.stderr
        assert ("ran out of space" if mounted else "hit a file size limit") in full.stderr
        assert str(out) in full.stderr
        assert "Traceback" not in full.stderr
        holds(out, clean["small"], tidy=True)  # nothing of the failed run is left
        if mounted:
            filler.unlink()
        done = cli("deliver", large, "-o", str(out), "--cache", cache)
        assert done.returncode == 0, done.stderr
        holds(out, clean["large"], tidy=True)


def test_disk_full_at_the_manifest_switch_undoes_the_publish(
    shared_data: Path, tmp_path: Path, clean: dict[str, list[bytes]]
) -> None:
    """The new parts are in, the disk fills before the manifest's rename: the old result stays."""
    cache = str(tmp_path / "cache")
    with small_disk(tmp_path / "disk") as mounted:
        if not mounted:
            pytest.skip("mount -t tmpfs is not allowed here (needs root)")
        out = tmp_path / "disk" / "out"
        deliver_small_with_the_cli(shared_data, tmp_path, out, cache)
        large = spec_file(tmp_path, request(shared_data, LARGE))
        child = start_stopped("moved", "deliver", large, "-o", str(out), "--cache", cache, cli=True)
        filler = fill(tmp_path / "disk", leave=0)
        os.kill(child.pid, signal.SIGCONT)
        _, err = child.communicate(timeout=300)
        assert child.returncode == 2, err.decode()
        assert "ran out of space" in err.decode()
        assert "Traceback" not in err.decode()
        holds(out, clean["small"], tidy=True)  # the moved-in parts are gone again
        filler.unlink()


def test_full_disk_while_a_reused_result_is_copied(
    shared_data: Path, tmp_path: Path, clean: dict[str, list[bytes]]
) -> None:
    cache = str(tmp_path / "cache")
    large = spec_file(tmp_path, request(shared_data, LARGE))
    first = cli("deliver", large, "-o", str(tmp_path / "elsewhere"), "--cache", cache)
    assert first.returncode == 0, first.stderr
    with small_disk(tmp_path / "disk") as mounted:
        out = tmp_path / "disk" / "out"
        deliver_small_with_the_cli(shared_data, tmp_path, out, cache)
        if mounted:
            fill(tmp_path / "disk", leave=24 * 1024)
            full = cli("deliver", large, "-o", str(out), "--cache", cache)
        else:
            full = cli("deliver", large, "-o", str(out), "--cache", cache, fsize=4096)
        assert full.returncode == 2, full.stderr
        assert ("ran out of space" if mounted else "hit a file size limit") in full.stderr
        assert "Traceback" not in full.stderr
        holds(out, clean["small"], tidy=True)
        holds(tmp_path / "elsewhere", clean["large"], tidy=True)


def test_full_cache_disk_at_the_result_record_warns_and_delivers(
    shared_data: Path, tmp_path: Path, clean: dict[str, list[bytes]]
) -> None:
    with small_disk(tmp_path / "disk", size="4m") as mounted:
        if not mounted:
            pytest.skip("mount -t tmpfs is not allowed here (needs root)")  # no other cap fits
        cache = tmp_path / "disk" / "cache"
        deliver(request(shared_data, LARGE), tmp_path / "first", cache)
        fill(tmp_path / "disk", leave=0)
        # every column chunk is a hit (nothing to put); only the result's record is new
        with pytest.warns(RuntimeWarning, match="could not record it"):
            result = deliver(request(shared_data, SMALL), tmp_path / "out", cache)
        assert result.complete
        assert result.manifest["cache"]["misses"] == 0
        assert result.manifest["cache"]["partial"] is True
        holds(tmp_path / "out", clean["small"], tidy=True)
        assert columnhub.Result.open(tmp_path / "out").manifest["cache"]["partial"] is True
        # the CLI: one warning line, exit 0
        spec = spec_file(tmp_path, request(shared_data, ["Jet_eta"]))
        done = cli("deliver", spec, "-o", str(tmp_path / "cli"), "--cache", str(cache))
        assert done.returncode == 0, done.stderr
        assert "columnhub: warning: the result in" in done.stderr
        assert "Traceback" not in done.stderr
        assert columnhub.Result.open(tmp_path / "cli").manifest["cache"]["partial"] is True


# -- left-overs, signals, refusals ----------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_of_a_dead_process_is_removed(
    shared_data: Path, tmp_path: Path, clean: dict[str, list[bytes]]
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    deliver(request(shared_data, SMALL), out, cache)
    stale = out / f".staging-{dead_pid()}-1"
    stale.mkdir()
    (stale / "part-00000.parquet").write_bytes(b"x" * 100_000)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        alive = out / f".staging-{live.pid}-1"
        alive.mkdir()
        deliver(request(shared_data, LARGE), out, cache)
        assert not stale.exists()
        assert alive.is_dir()  # its process still runs: not ours to remove
    finally:
        live.kill()
        live.wait()
    alive.rmdir()
    holds(out, clean["large"], tidy=True)


def test_sigterm_cleans_up_staging_like_ctrl_c(
    shared_data: Path, tmp_path: Path, clean: dict[str, list[bytes]]
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    deliver(request(shared_data, SMALL), out, cache)
    large = spec_file(tmp_path, request(shared_data, LARGE))
    child = start_stopped(
        "staged", "deliver", large, "-o", str(out), "--cache", str(cache), cli=True
    )
    assert list(out.glob(".staging-*/part-*"))  # the new parts, written, not yet published
    os.kill(child.pid, signal.SIGTERM)
    os.kill(child.pid, signal.SIGCONT)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 128 + signal.SIGTERM
    assert "terminated" in err.decode()
    assert "Traceback" not in err.decode()
    holds(out, clean["small"], tidy=True)


UNREADABLE = """
import os, pwd, sys
import columnhub
from columnhub.errors import ColumnhubError
# everything a delivery imports, imported while the interpreter (under /root) is readable
columnhub.deliver({"dataset": {"name": "p", "files": [sys.argv[2]]}, "columns": ["MET_pt"]},
                  output=sys.argv[3], cache=False, progress=False)
nobody = pwd.getpwnam("nobody")
os.setgroups([]); os.setgid(nobody.pw_gid); os.setuid(nobody.pw_uid)
try:
    columnhub.deliver({"dataset": {"name": "locked", "files": [sys.argv[1]]},
                       "columns": ["MET_pt"]}, output=sys.argv[4], cache=False, progress=False)
except ColumnhubError as err:
    print(type(err).__name__, err)
"""


@pytest.mark.parametrize("entry", ["{d}", "{d}/*.root", "{d}/sample.root"])
def test_unreadable_dataset_directory_is_a_clear_error(shared_data: Path, entry: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the nobody user")
    base = Path(tempfile.mkdtemp(prefix="columnhub-perm-"))
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir()
        shutil.copy(shared_data / "nano_dy.root", locked / "sample.root")
        locked.chmod(0)
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                UNREADABLE,
                entry.format(d=locked),
                str(shared_data / "nano_dy.root"),
                str(base / "prime"),
                str(base / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stdout.startswith("DatasetError ")
        assert f"permission denied reading '{locked}'" in done.stdout
    finally:
        (base / "locked").chmod(0o755)
        shutil.rmtree(base)


def test_part_named_user_file_is_refused_not_overwritten(
    shared_data: Path, tmp_path: Path, clean: dict[str, list[bytes]]
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    deliver(request(shared_data, SMALL), out, cache)
    mine = out / f"part-{len(clean['small']):05d}.parquet"  # a name the larger result writes
    mine.write_bytes(b"my own file")
    with pytest.raises(OutputError, match=mine.name):
        deliver(request(shared_data, LARGE), out, cache)
    assert mine.read_bytes() == b"my own file"
    assert columnhub.Result.open(out).files == [
        out / n for n in ("part-00000.parquet", "part-00001.parquet")
    ]
    holds(out, clean["small"])


def test_delivering_into_the_input_dataset_is_refused(
    shared_data: Path, tmp_path: Path, clean: dict[str, list[bytes]]
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    deliver(request(shared_data, SMALL), out, cache)
    on_itself = {"dataset": {"name": "mine", "files": [str(out)]}, "columns": ["MET_pt"]}
    with pytest.raises(OutputError, match="input dataset 'mine'"):
        columnhub.deliver(on_itself, output=out, cache=cache, progress=False)
    holds(out, clean["small"], tidy=True)
    # inside an input directory, and holding an input file, are refused too
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(shared_data / SAMPLE, raw / SAMPLE)
    inside = {"dataset": {"name": "raw", "files": [str(raw)]}, "columns": ["MET_pt"]}
    with pytest.raises(OutputError, match="inside the input dataset 'raw'"):
        columnhub.deliver(inside, output=raw / "sub", cache=cache, progress=False)
    (raw / "manifest.json").write_text(json.dumps({"complete": True, "files": [SAMPLE]}))
    with pytest.raises(OutputError, match="input dataset 'raw'"):
        columnhub.deliver(inside, output=raw, cache=cache, progress=False)
    assert (raw / SAMPLE).read_bytes() == (shared_data / SAMPLE).read_bytes()


# -- properties ---------------------------------------------------------------------------


@given(
    n=st.integers(1, 30),
    suffix=st.sampled_from(["parquet", "root"]),
    taken=st.sets(st.text("part-0123456789.parquetroo", max_size=24), max_size=40),
    clash=st.lists(st.integers(0, 29), max_size=10),
    copied=st.booleans(),
)
def test_fresh_part_names_never_clash_and_stay_part_names(
    n: int, suffix: str, taken: set[str], clash: list[int], copied: bool
) -> None:
    """Whatever the directory holds; ``copied``: names of a reused result that had variants."""
    from columnhub.delivery import _PART_NAME, _fresh_names

    names = [f"part-{i:05d}{'.3' if copied else ''}.{suffix}" for i in range(n)]
    plain = [f"part-{i:05d}.{suffix}" for i in range(n)]
    taken = taken | {plain[i] for i in clash if i < n}  # the previous result's names
    taken |= {f"part-{i:05d}.1.{suffix}" for i in clash[:3] if i < n}
    fresh = _fresh_names(names, taken)
    assert not taken.intersection(fresh)
    assert len(set(fresh)) == n
    assert all(_PART_NAME.match(f) and f.endswith(f".{suffix}") for f in fresh)
    assert _fresh_names(names, taken) == fresh  # deterministic
    if not taken.intersection(plain):
        assert fresh == plain


def test_temporary_files_of_dead_writers_are_removed_and_a_live_ones_kept(
    shared_data: Path, tmp_path: Path
) -> None:
    """What a killed delivery leaves (a half-written manifest or journal under either
    temp-name form, a staging folder) goes with the next delivery; a live writer's stays."""
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    gone = int(dead.stdout)  # exited: no process has this pid now (short of reuse)
    live = os.getppid()
    leftovers = [
        f".manifest.json.tmp-{gone}",
        f".manifest.json.tmp-{gone}-1a2b3c4d",
        f".columnhub-publish.json.tmp-{gone}-deadbeef",
    ]
    for name in leftovers:
        (out / name).write_text("{")
    (out / f".staging-{gone}-0").mkdir()
    kept = out / f".manifest.json.tmp-{live}-0badf00d"
    kept.write_text("{")
    result = columnhub.deliver(request(shared_data, SMALL), output=out, cache=False, progress=False)
    assert result.manifest["complete"]
    names = {p.name for p in out.iterdir()}
    assert not names & {*leftovers, f".staging-{gone}-0"}, names
    assert kept.exists()
