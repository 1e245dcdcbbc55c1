"""A limit on how long a call into remote storage may wait for it."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from columnhub.errors import SourceConnectionError, SourceTimeoutError

__all__ = ["abandon_waits", "call_with_timeout"]

T = TypeVar("T")

_TICK = 0.05  # seconds between looks at what the calling thread is doing
_HARD_LIMIT = 10  # times ``seconds``: the wall-clock limit, whatever the thread does

# what a wait on storage calls every tick; what it raises ends the wait (a cancelled job)
_abandon: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "columnhub_abandon_waits", default=None
)


@contextlib.contextmanager
def abandon_waits(check: Callable[[], None]) -> Iterator[None]:
    """Inside, every wait on storage calls ``check`` every 50 ms; what it raises ends the wait.

    A service job that is cancelled, or a service shutting down, so stops at
    once instead of holding its runner until the storage's ``timeout``. It
    holds for this context and the threads that copy it
    (:func:`columnhub._concurrency.in_context`: the local executor's part and
    chunk tasks, file description, the exchange's readers). The transfer's own
    thread is left behind, as after a timeout: it ends with its transfer.
    """
    token = _abandon.set(check)
    try:
        yield
    finally:
        _abandon.reset(token)


def call_with_timeout(
    fn: Callable[[], T], *, seconds: float, what: str, url: str | None = None
) -> T:
    """Run ``fn`` and give up once it has waited ``seconds`` with :class:`SourceTimeoutError`.

    The call runs in a daemon thread, so a transfer that never returns cannot
    hang the request nor the interpreter's exit. The limit is on waiting, not
    on working: time during which that thread runs, or is ready to run and
    waits for a core, does not count (decoding the metadata of a tree with
    thousands of branches takes seconds of CPU on a loaded machine, and is not
    a storage that stopped answering). Whatever the thread does, it gives up
    after ``10 * seconds`` of wall time (a client that spins instead of
    waiting). Where the operating system does not tell a thread's state (no
    ``/proc``), it is a plain wall-clock limit. With
    ``url``, a server that refuses connections (which some clients retry until
    the time is up) is a :class:`SourceConnectionError` instead.
    """
    box: dict[str, object] = {}
    check = _abandon.get()

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller thread)
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True, name="columnhub-remote")
    thread.start()
    state = f"/proc/self/task/{thread.native_id}/stat"
    waited = 0.0
    last = start = time.monotonic()
    while True:
        thread.join(min(_TICK, max(seconds - waited, 0.001)))
        if not thread.is_alive():
            break
        now = time.monotonic()
        if not _running(state):
            waited += now - last
        last = now
        if check is not None:
            check()
        if waited >= seconds or now - start >= _HARD_LIMIT * seconds:
            _give_up(what=what, seconds=seconds, url=url)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _running(stat_path: str) -> bool:
    """Whether the thread is running or ready to run (Linux's state ``R``).

    ``False`` where it sleeps or waits for a transfer, and where the system
    has no such file (then every second counts, as a wall clock).
    """
    try:
        with open(stat_path, "rb") as file:
            stat = file.read()
    except OSError:
        return False
    # "tid (name) S ...": the name may hold spaces and parentheses, the state follows the last ")"
    end = stat.rfind(b")")
    return stat[end + 2 : end + 3] == b"R"


def _give_up(*, what: str, seconds: float, url: str | None) -> None:
    from columnhub.sources._errors import refuses_connections

    if url is not None and refuses_connections(url):
        msg = (
            f"{what}: the server refused the connection; check the host name and port, "
            "that the server is running, and that this machine may reach it"
        )
        raise SourceConnectionError(msg)
    msg = (
        f"{what} did not answer within {seconds:g} s; check that the server is up "
        "and reachable, or raise the dataset's 'timeout'"
    )
    raise SourceTimeoutError(msg)
