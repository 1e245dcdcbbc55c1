"""glibc's allocator kept from handing memory back mid-delivery (private).

A delivery allocates and frees the same few sizes of large buffers chunk
after chunk: decompressed baskets, columns, masks, selected copies. With
glibc's defaults, a buffer of more than 128 KiB (a threshold that grows to
at most 32 MiB as larger ones are freed) is its own ``mmap``, and freeing it
``munmap``s it at once, so the next chunk's buffer of the same size faults
in fresh zeroed pages again: about 120,000 page faults and 0.42 s of
system time in a cold 2M-event delivery on 2 cores. With a fixed 32 MiB
``mmap`` threshold (the most glibc allows) and a 1 GiB trim threshold, freed
buffers stay in the heap and are reused: 80,000 faults, 0.33 s, and 0.05 s
less wall time (median of 8 interleaved runs, 1.05 -> 0.99 s). The price is
a little more peak memory (481-487 MB -> 505-541 MB in 3 runs each), and
memory freed at the end is kept until the process exits.

Kept memory is only reused by the threads of the arena that holds it, though:
glibc gives each new thread an arena of its own (up to 8 per core; one whose
threads have all ended is handed on), and a freed buffer goes back to the
arena it came from. A delivery's buffers come from many threads (the part
tasks, each part's read-ahead thread, the readers' and kernels' pools), so
a thread that takes over the next chunk faults in fresh pages while another
arena sits on freed ones. One arena for the whole process (``M_ARENA_MAX``
= 1) shares them. In two series of interleaved cold 2M-event deliveries:
55,000 page faults instead of 81,000 in both, system time 0.34 -> 0.28 s
and 0.32 -> 0.28 s, wall time (medians) 1.04 -> 0.99 s (10 runs each) and
0.968 -> 0.946 s (16 runs each), peak memory 514 -> 428 MB. Cold Parquet
joins did not move. The large buffers are few (tens per chunk), so threads
seldom wait on the arena's lock; Python's small objects have their own
allocator, and Arrow its own (mimalloc).

Applied by the ``columnhub deliver`` command only, which runs once and
exits: it calls :func:`columnhub.delivery.deliver` inside :func:`armed`, and
``deliver`` applies it (:func:`apply_armed`) once the request is not a
whole-result cache hit (a hit allocates nothing worth it, and does not load
``ctypes``). Never by the library in someone else's process (a notebook, a
Dask worker, the service), where holding on to freed memory is not ours to
decide. A ``MALLOC_*`` or ``GLIBC_TUNABLES`` setting in the environment
means someone tuned the allocator already: it is left alone. Other C
libraries (musl, macOS) are left alone too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["MMAP_ENV", "MMAP_THRESHOLD", "apply_armed", "armed", "keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: the largest ``mmap`` threshold glibc accepts (half its 64 MiB thread heaps)
MMAP_THRESHOLD = 32 * 1024**2
#: the variable glibc reads it from at a process's start (the Dask workers
#: ``columnhub.execute.dask.local_cluster`` starts)
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
TRIM_THRESHOLD = 1024**3

_armed = {"deliver": False}


@contextlib.contextmanager
def armed() -> Iterator[None]:
    """Inside, a delivery that computes tunes the allocator (the ``deliver`` command's)."""
    _armed["deliver"] = True
    try:
        yield
    finally:
        _armed["deliver"] = False


def apply_armed() -> bool:
    """:func:`keep_freed_memory`, once, inside :func:`armed`; ``True`` if set."""
    if not _armed["deliver"]:
        return False
    _armed["deliver"] = False
    return keep_freed_memory()


def keep_freed_memory() -> bool:
    """Set glibc's ``mmap`` and trim thresholds and one arena for this process; ``True`` if set."""
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):  # no ctypes, or no mallopt: not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # the mmap threshold first: setting either turns off glibc's moving threshold,
    # and a trim threshold alone would leave every buffer over 128 KiB its own mmap
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return False
    if mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return False
    # the threads that start from now on share the main arena's kept memory
    return bool(mallopt(_M_ARENA_MAX, 1) == 1)
