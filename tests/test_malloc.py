"""glibc's allocator kept from unmapping freed buffers in ``columnhub deliver``, in one arena."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt thresholds are glibc's",
)

# a child tunes its allocator ("tuned") or not, and says so; chunk() allocates
# eight 8 MiB buffers and frees them, as a delivery does for each chunk
_PRELUDE = """
import resource, sys, threading
import numpy as np
if sys.argv[1] == "tuned":
    from columnhub._malloc import keep_freed_memory
    print(keep_freed_memory())
else:
    print(None)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def chunk():
    held = [np.ones(8 << 20, np.uint8) for _ in range(8)]
    del held
"""

# chunk after chunk on one thread: the page faults of the repeats
_CHILD = _PRELUDE + """
chunk()
chunk()  # the first rounds fault in either case
before = faults()
for _ in range(20):
    chunk()
print(faults() - before)
"""


_ROUND = 8 * (8 << 20)  # bytes allocated per round


def _child(
    mode: str, env: dict[str, str] | None = None, *, script: str = _CHILD
) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", script, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**clean, **(env or {})},
    ).stdout.split()
    return out[0], int(out[1])


@glibc
def test_freed_buffers_are_reused_without_new_page_faults() -> None:
    pages = _ROUND // os.sysconf("SC_PAGE_SIZE")
    told, tuned = _child("tuned")
    assert told == "True"
    _, plain = _child("plain")
    # glibc's default: the freed buffers at the heap's top are handed back
    # (trimmed), so every round faults its pages in again
    assert plain >= 2 * pages
    # kept in the heap: the rounds reuse the same pages
    assert tuned < pages // 4


# thread A allocates and frees a chunk's buffers and stays alive (as a pool's
# thread does); then thread B, another thread, takes the next chunk
_THREADS = _PRELUDE + """
ready, finish = threading.Event(), threading.Event()
def a():
    chunk()
    chunk()
    ready.set()
    finish.wait()
ta = threading.Thread(target=a)
ta.start()
ready.wait()
before = faults()
tb = threading.Thread(target=chunk)
tb.start()
tb.join()
print(faults() - before)
finish.set()
ta.join()
"""


@glibc
def test_memory_one_thread_freed_is_reused_by_another_thread() -> None:
    """One arena: a pool's next thread takes over the buffers the last one freed."""
    pages = _ROUND // os.sysconf("SC_PAGE_SIZE")
    told, tuned = _child("tuned", script=_THREADS)
    assert told == "True"
    # the thresholds alone (glibc reads them from the environment): B allocates in
    # an arena of its own, from fresh pages, while A's arena keeps the freed ones
    thresholds = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
    _, apart = _child("plain", thresholds, script=_THREADS)
    assert apart >= pages // 8
    # one arena: B reuses the pages A freed
    assert tuned < pages // 64


@glibc
def test_an_allocator_setting_in_the_environment_is_left_alone() -> None:
    told, faults = _child("tuned", {"MALLOC_ARENA_MAX": "2"})
    assert told == "False"
    assert faults >= 2 * _ROUND // os.sysconf("SC_PAGE_SIZE")


def test_the_deliver_command_tunes_the_allocator_when_it_computes(
    monkeypatch: pytest.MonkeyPatch, shared_data: Path, tmp_path: Path
) -> None:
    """Armed by ``columnhub deliver``; applied once a request computes, not on a cache hit."""
    import json

    from columnhub import _malloc
    from columnhub.cli.main import main

    called: list[int] = []
    monkeypatch.setattr(_malloc, "keep_freed_memory", lambda: called.append(1) or True)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "dataset": {"name": "dy", "files": [str(shared_data / "nano_dy.root")]},
                "columns": ["MET_pt", "Jet_pt"],
            }
        )
    )
    cache = str(tmp_path / "cache")
    out = str(tmp_path / "out")
    assert main(["deliver", str(spec), "-o", out, "--cache", cache, "--no-progress"]) == 0
    assert called == [1]
    # the same request again: a whole-result hit allocates nothing worth tuning
    assert main(["deliver", str(spec), "-o", out, "--cache", cache, "--no-progress"]) == 0
    assert called == [1]
    # the library in someone else's process (a notebook) never tunes it
    import columnhub

    columnhub.deliver(str(spec), output=tmp_path / "lib", cache=False)
    assert called == [1]
    assert main(["cache", "stats", "--cache", cache]) == 0
    assert called == [1]
