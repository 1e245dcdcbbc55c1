"""A hard wall-clock limit for calls into remote storage."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from columnhub.errors import SourceConnectionError, SourceTimeoutError

__all__ = ["call_with_timeout"]

T = TypeVar("T")


def call_with_timeout(
    fn: Callable[[], T], *, seconds: float, what: str, url: str | None = None
) -> T:
    """Run ``fn`` and give up after ``seconds`` with :class:`SourceTimeoutError`.

    The call runs in a daemon thread, so a transfer that never returns cannot
    hang the request nor the interpreter's exit. With ``url``, a server that
    refuses connections (which some clients retry until the time is up) is a
    :class:`SourceConnectionError` instead.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller thread)
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True, name="columnhub-remote")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
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
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
