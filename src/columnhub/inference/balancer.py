"""Several inference servers: health, least-outstanding-requests choice, retry backoff.

A :class:`ServerPool` lives in one process (never pickled; see :func:`pool_for`).
Each request asks :meth:`ServerPool.acquire` for the healthy server with the
fewest requests in flight, and reports back with :meth:`ServerPool.release`.
A failed server is marked down and skipped; after ``probe_interval_s`` it is
health-checked again before it gets traffic. When no server is up and none
passes its health check, ``acquire`` returns ``None`` at once: callers raise,
never wait forever.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = ["ServerPool", "ServerState", "backoff_s", "pool_for"]


@dataclass
class ServerState:
    """What the pool knows about one server."""

    url: str
    outstanding: int = 0
    healthy: bool = True
    down_since: float = 0.0
    failures: int = 0
    requests: int = 0
    last_error: str = ""


def backoff_s(attempt: int, *, base_ms: float, cap_ms: float = 2000.0) -> float:
    """Exponential backoff in seconds: ``base_ms * 2**attempt``, capped.

    >>> [backoff_s(a, base_ms=10) for a in range(3)]
    [0.01, 0.02, 0.04]
    """
    return float(min(cap_ms, base_ms * (2**attempt))) / 1000.0


class ServerPool:
    """Least-outstanding-requests balancing over servers, with health checks.

    Args:
        servers: server addresses.
        check: health check of one address (``True`` when live and ready); it
            must return within a bounded time.
        probe_interval_s: how long a failed server is skipped before it is
            health-checked again.
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        check: Callable[[str], bool],
        probe_interval_s: float = 1.0,
    ) -> None:
        self._lock = threading.Lock()
        self._states = [ServerState(url) for url in servers]
        self._check = check
        self._probe_interval_s = probe_interval_s

    @property
    def states(self) -> list[ServerState]:
        """A copy of every server's state."""
        with self._lock:
            return [ServerState(**vars(s)) for s in self._states]

    def _pick(self, exclude: Iterable[str]) -> ServerState | None:
        excluded = set(exclude)
        healthy = [s for s in self._states if s.healthy]
        preferred = [s for s in healthy if s.url not in excluded] or healthy
        if not preferred:
            return None
        return min(preferred, key=lambda s: (s.outstanding, s.requests))

    def acquire(self, *, exclude: Iterable[str] = ()) -> str | None:
        """The server to send the next request to, or ``None`` when all are down.

        Healthy servers not in ``exclude`` come first (``exclude`` holds the
        servers that already failed this request); among them the one with the
        fewest requests in flight. Down servers whose probe interval passed are
        health-checked first (outside the lock).
        """
        exclude = tuple(exclude)
        now = time.monotonic()
        with self._lock:
            due = [
                s.url
                for s in self._states
                if not s.healthy and now - s.down_since >= self._probe_interval_s
            ]
            if due:  # mark them probed now, so other threads do not probe too
                for s in self._states:
                    if s.url in due:
                        s.down_since = now
        for url in due:
            ok = self._safe_check(url)
            with self._lock:
                for s in self._states:
                    if s.url == url and ok:
                        s.healthy = True
        with self._lock:
            chosen = self._pick(exclude)
            if chosen is None:
                return None
            chosen.outstanding += 1
            chosen.requests += 1
            return chosen.url

    def _safe_check(self, url: str) -> bool:
        try:
            return bool(self._check(url))
        except Exception:  # noqa: BLE001 - a failed health check is a "no", whatever raised
            return False

    def release(self, url: str, *, error: BaseException | str | None = None) -> None:
        """Report the end of a request to ``url``; an ``error`` marks it down."""
        with self._lock:
            for s in self._states:
                if s.url == url:
                    s.outstanding = max(0, s.outstanding - 1)
                    if error is not None:
                        s.healthy = False
                        s.down_since = time.monotonic()
                        s.failures += 1
                        s.last_error = str(error) or type(error).__name__

    def probe_all(self) -> bool:
        """Health-check every down server now; ``True`` when any server is up."""
        with self._lock:
            down = [s.url for s in self._states if not s.healthy]
        for url in down:
            if self._safe_check(url):
                with self._lock:
                    for s in self._states:
                        if s.url == url:
                            s.healthy = True
        with self._lock:
            return any(s.healthy for s in self._states)

    def describe(self) -> str:
        """One line per server: address, health, last error (for messages)."""
        with self._lock:
            return "; ".join(
                f"{s.url} ({'up' if s.healthy else 'down'}"
                f"{': ' + s.last_error if s.last_error else ''})"
                for s in self._states
            )


_pools_lock = threading.Lock()
_pools: dict[tuple[object, ...], ServerPool] = {}


def _forget_after_fork() -> None:
    # a forked child must not inherit locks another thread may hold at the fork
    global _pools_lock
    _pools_lock = threading.Lock()
    _pools.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def pool_for(
    key: tuple[object, ...],
    servers: Sequence[str],
    *,
    check: Callable[[str], bool],
    probe_interval_s: float = 1.0,
) -> ServerPool:
    """The process's pool for ``key`` (created once, shared by threads)."""
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ServerPool(servers, check=check, probe_interval_s=probe_interval_s)
        return pool
