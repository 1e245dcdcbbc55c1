"""glibc's allocator kept from unmapping freed buffers in ``columnhub deliver``."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt thresholds are glibc's",
)

# a child allocates eight 8 MiB buffers and frees them, again and again, as a
# delivery does chunk after chunk, and reports the page faults of the repeats
_CHILD = """
import resource, sys
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
chunk()
chunk()  # the first rounds fault in either case
before = faults()
for _ in range(20):
    chunk()
print(faults() - before)
"""


_ROUND = 8 * (8 << 20)  # bytes allocated per round


def _child(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode],
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


@glibc
def test_an_allocator_setting_in_the_environment_is_left_alone() -> None:
    told, faults = _child("tuned", {"MALLOC_ARENA_MAX": "2"})
    assert told == "False"
    assert faults >= 2 * _ROUND // os.sysconf("SC_PAGE_SIZE")


def test_deliver_command_tunes_the_allocator_and_others_do_not(monkeypatch) -> None:
    from columnhub.cli import main as cli

    called: list[str] = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: called.append("x") or True)
    monkeypatch.setattr(cli, "main", lambda: 0)
    monkeypatch.setattr(cli.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    monkeypatch.setattr(cli.gc, "disable", lambda: None)
    for argv, expected in (
        (["columnhub", "cache", "stats"], []),
        (["columnhub", "deliver"], ["x"]),
    ):
        called.clear()
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit):
            cli.run()
        assert called == expected
