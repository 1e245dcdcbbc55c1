"""Local executor: a thread pool in this process (the embedded default, no Dask).

:func:`run_ordered` yields results in task order while at most ``workers + 1``
tasks are in flight, so memory is bounded by chunk size x workers, not by
dataset size. :func:`run_parts` runs part tasks and yields each part's
metadata as it finishes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import pyarrow as pa

    from columnhub.cache import ColumnCache, ColumnLookup
    from columnhub.execute.part import PartMeta
    from columnhub.plan import Part, Plan

__all__ = ["run_ordered", "run_parts"]

T = TypeVar("T")
R = TypeVar("R")


def run_ordered(fn: Callable[[T], R], tasks: Iterable[T], *, workers: int = 1) -> Iterator[R]:
    """``fn`` over ``tasks`` on ``workers`` threads, yielding results in task order.

    Even with one worker the task runs on a pool thread, so the caller (which
    writes the output) overlaps with the next task's reading. The first
    failure is raised as soon as its result is due; queued tasks are then
    cancelled.
    """
    from columnhub._concurrency import in_context

    items = iter(tasks)
    workers = max(1, workers)
    fn = in_context(fn)
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


def run_parts(
    plan: Plan,
    parts: Sequence[Part],
    staging: Path,
    cache: ColumnCache | None,
    schema: pa.Schema | None,
    *,
    workers: int = 1,
    exchanged: ColumnLookup | None = None,
    fresh: Mapping[int, Collection[str]] | None = None,
) -> Iterator[PartMeta]:
    """Part tasks on ``workers`` threads; each part's metadata as it finishes.

    The first failure is raised as soon as it is seen; tasks not started yet
    are cancelled, and the ones running are waited for.
    """
    from columnhub._concurrency import in_context
    from columnhub.execute.part import run_part

    if not parts:
        return
    # the largest parts first (then in order): a big part started last would
    # leave the other workers idle while it finishes (parts are published in
    # the plan's order whatever order they run in)
    entries = [sum(plan.chunks[i].entries for i in part.chunks) for part in parts]
    order = sorted(range(len(parts)), key=lambda k: (-entries[k], k))
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="columnhub-part") as pool:
        pending: set[Future[Any]] = {
            pool.submit(
                in_context(run_part), plan, parts[k], staging, cache,
                schema=schema, exchanged=exchanged, fresh=fresh,
            )
            for k in order
        }
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()
