"""File identity checks: is the file being read still the file that was planned?

The plan records each input file's identity (:attr:`FileInfo.identity`, part
of every cache key) and what a finished read compares (:attr:`FileInfo.check`):
size, modification time, inode and device of a local file, plus its ROOT UUID
(the header's first 70 bytes) or its Parquet footer's digest; for a URL, what
storage says (size, ETag, Last-Modified or mtime) and the ROOT UUID read with
one ranged request. :func:`verify_unchanged` runs after every read, before the
data is used or cached; it costs a ``stat`` and a small read (~0.02 ms locally).
"""

from __future__ import annotations

from typing import Any

from columnhub._checksum import footer_hash, local_stamp
from columnhub._rootheader import HEADER_BYTES, parse_uuid, read_uuid
from columnhub.datasets import FileInfo, is_url
from columnhub.errors import InputChangedError
from columnhub.spec import DatasetSpec

__all__ = [
    "current_check",
    "footer_hash",
    "header_uuid",
    "local_stamp",
    "remote_header_uuid",
    "remote_stamp",
    "verify_unchanged",
]


def remote_stamp(url: str, *, timeout: float, what: str | None = None) -> dict[str, Any]:
    """What storage says of a URL now: size, and ETag / Last-Modified / mtime if given.

    One metadata request (HTTP ``HEAD``, XRootD ``stat``) through fsspec. An
    empty dict when storage does not answer within ``timeout`` seconds, or
    fails otherwise; with ``what`` (e.g. ``"dataset 'x': storage for <url>"``),
    storage that does not answer in time, or refuses connections, raises instead.

    Raises:
        SourceTimeoutError: with ``what``: no answer within ``timeout`` seconds.
        SourceConnectionError: with ``what``: the server refused the connection.
    """
    import fsspec

    from columnhub.errors import SourceConnectionError, SourceTimeoutError
    from columnhub.sources._timeout import call_with_timeout

    def info() -> dict[str, Any]:
        fs, inner = fsspec.core.url_to_fs(url)
        return dict(fs.info(inner))

    try:
        found = call_with_timeout(
            info, seconds=timeout, what=what or f"storage for {url}", url=url if what else None
        )
    except (SourceTimeoutError, SourceConnectionError):
        if what is not None:
            raise
        return {}
    except Exception:  # noqa: BLE001 - no stamp: nothing to compare
        return {}
    out: dict[str, Any] = {}
    for name in ("ETag", "Last-Modified", "mtime", "size"):
        value = found.get(name)
        if value is not None and value != "":
            out[name.lower()] = value if isinstance(value, int | str) else str(value)
    return out


def header_uuid(path: str) -> str | None:
    """The UUID in a local ROOT file's header: one read of 70 bytes.

    ``None`` if the file cannot be read or has no ROOT header.
    """
    return read_uuid(path)


def remote_header_uuid(url: str, *, timeout: float) -> str | None:
    """The UUID in the header of a ROOT file on remote storage: one ranged read of 70 bytes."""
    import fsspec

    from columnhub.sources._timeout import call_with_timeout

    def head() -> bytes:
        fs, inner = fsspec.core.url_to_fs(url)
        return bytes(fs.cat_file(inner, start=0, end=HEADER_BYTES))

    try:
        return parse_uuid(call_with_timeout(head, seconds=timeout, what=f"storage for {url}"))
    except Exception:  # noqa: BLE001 - storage did not answer: nothing to compare
        return None


def current_check(file: FileInfo, spec: DatasetSpec) -> dict[str, Any]:
    """The fields of ``file.check`` as the file is now; empty when it is gone or unanswered."""
    if is_url(file.path):
        now = remote_stamp(file.path, timeout=spec.timeout)
        if now and file.format == "root":
            found = remote_header_uuid(file.path, timeout=spec.timeout)
            if found is None:
                return {}
            now["uuid"] = found
        return now
    try:
        stamp: dict[str, Any] = dict(local_stamp(file.path))
    except OSError:
        return {}
    if file.format == "parquet":
        stamp["footer"] = footer_hash(file.path)
    else:
        stamp["uuid"] = header_uuid(file.path)
    return stamp


def verify_unchanged(
    file: FileInfo, spec: DatasetSpec, *, cause: BaseException | None = None
) -> None:
    """Check that ``file`` is still the file that was planned (a stat and a small read).

    Compares :attr:`FileInfo.check` with the file as it is now. A URL whose
    storage does not answer the check is not compared (the read just before
    it was answered).

    Raises:
        InputChangedError: the file was replaced, rewritten or removed; what
            was read from it must not be used (nor cached).
    """
    want = dict(file.check)
    if not want:
        return
    now = current_check(file, spec)
    if is_url(file.path) and not now:
        return
    changed = [f"{k} {want[k]!r} -> {now.get(k)!r}" for k in sorted(want) if now.get(k) != want[k]]
    if not changed:
        return
    if file.format == "root":
        from columnhub.sources import root

        root.forget_file(file.path)
    what = "was removed" if not now else f"was replaced or rewritten ({'; '.join(changed)})"
    msg = (
        f"dataset {spec.name!r}: input file {file.path!r} changed while this request read it: "
        f"it {what}. Nothing read from it was used or cached; re-run the request, which "
        "then reads the file as it is now (or restore the original file)"
    )
    raise InputChangedError(msg) from cause
