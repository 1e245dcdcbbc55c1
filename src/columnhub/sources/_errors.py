"""What went wrong with a file or its storage, named as what it is.

A failed open or read surfaces from uproot, fsspec, aiohttp or the XRootD
client as one of many exception types, often wrapped (a stalled HTTP read
even arrives as ``TypeError: 'TimeoutError' object is not subscriptable``).
:func:`classify` turns such an exception into the :class:`DatasetError` that
says what happened: a refused connection, a server without byte ranges, a
stall, a branch uproot cannot interpret, or (only when nothing else fits) a
damaged file.
"""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

from columnhub.errors import (
    CorruptFileError,
    DatasetError,
    SourceConnectionError,
    SourceProtocolError,
    SourceTimeoutError,
    UnreadableBranchError,
)

__all__ = ["classify", "refuses_connections", "unreadable_branch"]

_REFUSED = ("connection refused", "connect call failed", "cannot connect to host", "errno 111")
_TIMEOUT = ("timeouterror", "timed out", "timeout", "operation expired")


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err``, its causes and contexts (each once)."""
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo.extend(e for e in (item.__cause__, item.__context__) if e is not None)
        todo.extend(a for a in item.args if isinstance(a, BaseException))
        os_error = getattr(item, "os_error", None)  # aiohttp's ClientConnectorError
        if isinstance(os_error, BaseException):
            todo.append(os_error)


def unreadable_branch(err: BaseException) -> BaseException | None:
    """The uproot error in ``err``'s chain saying a branch cannot be interpreted, if any."""
    import uproot

    kinds: tuple[type[BaseException], ...] = (uproot.interpretation.identify.UnknownInterpretation,)
    cannot = getattr(uproot.interpretation.objects, "CannotBeAwkward", None)
    if isinstance(cannot, type) and issubclass(cannot, BaseException):
        kinds = (*kinds, cannot)
    return next((e for e in _chain(err) if isinstance(e, kinds)), None)


def _branch_of(err: BaseException) -> str | None:
    path = getattr(err, "object_path", None)
    if isinstance(path, str) and ":" in path:
        return path.rsplit(":", 1)[-1]
    found = re.search(r"in object \S*:(\S+)", str(err))
    return found.group(1) if found else None


_DEFAULT_PORTS = {"root": 1094, "roots": 1094, "xroot": 1094, "http": 80, "https": 443}


def refuses_connections(url: str) -> bool:
    """True when the host of ``url`` actively refuses a TCP connection on its port.

    A client that retries a refused connection (the XRootD client does, for
    minutes) looks like a server that does not answer; one connection attempt
    tells the two apart.
    """
    parts = urllib.parse.urlsplit(url)
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    if parts.hostname is None or port is None:
        return False
    try:
        with socket.create_connection((parts.hostname, port), timeout=2.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def _serves_ranges(url: str, *, timeout: float) -> bool | None:
    """Whether the server of ``url`` answers a byte-range request with 206 (``None``: unknown)."""
    request = urllib.request.Request(url, headers={"Range": "bytes=0-15"})
    try:
        with urllib.request.urlopen(request, timeout=min(timeout, 10.0)) as response:
            return int(response.status) == 206
    except (OSError, ValueError, urllib.error.URLError):
        return None


def classify(
    err: BaseException,
    *,
    dataset: str,
    path: str,
    doing: str,
    timeout: float,
    remote: bool,
    fmt: str = "ROOT",
) -> DatasetError:
    """The :class:`DatasetError` that names what ``err`` (raised while ``doing``) means.

    Args:
        err: the exception from uproot / fsspec / the storage client.
        dataset: the dataset's name, for the message.
        path: the file's path or URL.
        doing: what was being done, e.g. ``"reading ['Jet_pt'] of entries 0-100"``.
        timeout: the dataset's timeout in seconds (for the message, and the range probe).
        remote: whether ``path`` is a URL.
        fmt: the file format, for the message when the file itself is the problem.
    """
    where = f"dataset {dataset!r}"
    chain = list(_chain(err))
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain).lower()
    branch_error = unreadable_branch(err)
    if branch_error is not None:
        branch = _branch_of(branch_error) or "?"
        msg = (
            f"{where}: branch {branch!r} of {path} has a type that uproot cannot read as an "
            f"array ({str(branch_error).splitlines()[0]}); leave it out of the request (and "
            "out of define/where), or convert it to a plain numeric branch"
        )
        return UnreadableBranchError(msg)
    refused = any(isinstance(e, ConnectionRefusedError) for e in chain)
    stalled = any(isinstance(e, TimeoutError) for e in chain)
    timed_out = remote and (stalled or any(w in text for w in _TIMEOUT))
    # the XRootD client retries a refused connection until its own timeout and then
    # says "Operation expired": ask the port once before calling it a stall
    if remote and (
        refused or any(w in text for w in _REFUSED) or (timed_out and refuses_connections(path))
    ):
        msg = (
            f"{where}: the server of {path} refused the connection while {doing}; check the "
            "host name and port, that the server is running, and that this machine may reach it"
        )
        return SourceConnectionError(msg)
    if timed_out:
        msg = (
            f"{where}: the server of {path} stopped answering while {doing} (no data within "
            f"{timeout:g} s); check that the server is up and not overloaded, or raise the "
            "dataset's 'timeout'"
        )
        return SourceTimeoutError(msg)
    if (remote and path.lower().startswith(("http://", "https://"))) and (
        "range request" in text or _serves_ranges(path, timeout=timeout) is False
    ):
        msg = (
            f"{where}: the HTTP server of {path} does not support byte-range requests "
            f"(it answers a Range request with the whole file), and reading {fmt} files "
            "needs them; serve the file from a server that supports ranges (XRootD, "
            "nginx, Apache, S3, ...) or copy it to a local disk"
        )
        return SourceProtocolError(msg)
    msg = (
        f"{where}: {doing} of {path!r} failed ({type(err).__name__}: {err}); "
        f"the file may be truncated, corrupt or not {fmt} at all"
    )
    return CorruptFileError(msg)
