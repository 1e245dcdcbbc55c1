"""One concurrency setting per process: how many threads each of columnhub's pools gets.

Every pool columnhub keeps (basket decompression, the numba kernels, the
Triton request threads, file description) is sized by :func:`threads`, so a
process never runs several pools of CPU-count threads each. The setting:

1. ``$COLUMNHUB_THREADS``, when set (a positive integer);
2. else, inside a Dask worker, that worker's ``nthreads`` (a worker started
   with ``threads_per_worker=1`` uses one thread for everything);
3. else the CPUs this process may run on.
"""

from __future__ import annotations

import contextvars
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from columnhub.errors import SpecError

__all__ = ["THREADS_ENV", "in_context", "threads"]

#: the environment variable that sets :func:`threads`
THREADS_ENV = "COLUMNHUB_THREADS"


def threads() -> int:
    """The number of threads a pool of this process may use (at least 1).

    Raises:
        SpecError: ``$COLUMNHUB_THREADS`` is not a positive integer.
    """
    raw = os.environ.get(THREADS_ENV)
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            msg = f"${THREADS_ENV} must be a positive integer (threads per pool), got {raw!r}"
            raise SpecError(msg)
        return value
    worker = _dask_worker_threads()
    if worker is not None:
        return worker
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _dask_worker_threads() -> int | None:
    """The ``nthreads`` of the Dask worker this process is, else ``None``.

    Looked up only when ``distributed`` is already imported (a worker
    process has it): never imports it.
    """
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ValueError, AttributeError):  # not inside a worker (a client process)
        return None


def in_context(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run in a copy of the calling thread's context variables, for a pool's thread.

    A pool's threads do not inherit them; what columnhub keeps there (a
    service job's :func:`columnhub.sources._timeout.abandon_waits`) should
    hold for the work the job hands to its pools.
    """
    context = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        # a context may be entered by one thread at a time: each call runs in its own copy
        return context.copy().run(fn, *args, **kwargs)

    return run
