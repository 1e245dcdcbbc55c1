"""Local executor: a thread pool in this process (the embedded default, no Dask).

Results come back in task order while at most ``workers + 1`` tasks are in
flight, so memory is bounded by chunk size x workers, not by dataset size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["run_ordered"]

T = TypeVar("T")
R = TypeVar("R")


def run_ordered(fn: Callable[[T], R], tasks: Iterable[T], *, workers: int = 1) -> Iterator[R]:
    """``fn`` over ``tasks`` on ``workers`` threads, yielding results in task order.

    Even with one worker the task runs on a pool thread, so the caller (which
    writes the output) overlaps with the next task's reading. The first failure is raised as soon as its result is due; queued tasks are
    then cancelled.
    """
    items = iter(tasks)
    workers = max(1, workers)
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="columnhub-chunk") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
