"""Data access of service users: which files and URLs a request may name.

A service reads files with its own rights, so a request may only name local
files under the configured **data roots** and URLs under the configured **URL
prefixes**. Everything else is refused with a
:class:`~columnhub.errors.PermissionDeniedError` (HTTP 403) naming the entry
and what is allowed, before anything is queued:

- a local entry must be absolute (a relative path or ``~`` would be resolved
  against the service's own working directory or home);
- every file the delivery would read is checked by its *real* path: ``..``
  and symbolic links are resolved, globs and directories (also a columnhub
  result directory's manifest) are expanded exactly as the delivery expands
  them, and each file found must lie under a root. Nothing outside a root is
  listed: the part of a glob before its first wildcard must itself resolve
  under a root;
- a URL must lie under a configured prefix: same scheme, host and port, and a
  path inside the prefix's path (``..`` and ``.`` segments, also
  percent-encoded, user names and passwords, backslashes, whitespace and
  fsspec ``::`` chains are refused): no server-side request forgery;
- ``file://`` URLs are refused (give the plain absolute path);
- the model registry and the output directory come from the service's
  configuration, never from a request.

The check runs again when a runner starts a job (a symbolic link made under
a root between submission and delivery is caught then).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, unquote, urlsplit

from columnhub.errors import PermissionDeniedError, SpecError

if TYPE_CHECKING:
    from columnhub.spec import DatasetSpec, Request, Samples

__all__ = ["check_entry", "check_inputs", "check_url", "under_prefix"]

#: default ports, so ``https://host/`` and ``https://host:443/`` are one origin
_DEFAULT_PORTS = {"http": 80, "https": 443, "root": 1094, "xroot": 1094, "davs": 443}
_BAD_URL_CHARS = re.compile(r"[\s\\\x00-\x1f\x7f]")


def check_inputs(
    request_or_samples: Request | Samples,
    *,
    data_roots: Iterable[str | os.PathLike[str]],
    url_prefixes: Iterable[str],
    registry: str | None = None,
) -> None:
    """Refuse a request naming anything outside the data roots and URL prefixes.

    Checks the primary dataset and every friend's dataset of every sample,
    and that the request sets neither a model registry nor an output
    directory (the service's configuration gives both).

    Args:
        request_or_samples: a single-sample :class:`~columnhub.spec.Request`
            or a multi-sample :class:`~columnhub.spec.Samples`.
        data_roots: local directories whose files requests may read. None
            given: every local path is refused.
        url_prefixes: URL prefixes (``root://eos.example.org//store/``,
            ``https://data.example.org/open/``) whose files requests may read.
        registry: the service's own model registry (``models:``): a request
            naming exactly it is allowed (the service sets it in the job
            specs its runners check again before delivering).

    Raises:
        PermissionDeniedError: an entry outside the roots and prefixes (the
            message names it, its real path and the allowed roots/prefixes),
            or a registry or output directory set in the request.
        SpecError: a configured URL prefix that is not an absolute URL.
        DatasetError: a file under a root that does not exist (as the
            delivery would report it).
    """
    from columnhub.spec import Samples

    roots = _real_roots(data_roots)
    prefixes = [_parse_prefix(p) for p in url_prefixes]
    if isinstance(request_or_samples, Samples):
        items = list(request_or_samples.requests().items())
    else:
        items = [("", request_or_samples)]
    for sample, request in items:
        where = f"sample {sample!r}: " if sample else ""
        if request.registry is not None and request.registry != registry:
            msg = (
                f"{where}registry {request.registry!r}: a service request cannot choose the "
                "model registry; the service's configuration sets it (models:). Remove "
                "'registry' from the request and name models by name and version"
            )
            raise PermissionDeniedError(msg)
        if request.output.directory is not None:
            msg = (
                f"{where}output.directory {request.output.directory!r}: the service writes "
                "results under its own state directory; remove output.directory from the "
                "request and fetch the result where you want it (columnhub fetch ID -o DIR)"
            )
            raise PermissionDeniedError(msg)
        datasets = [("dataset", request.dataset)]
        datasets += [(f"friend {f.name!r}", f.dataset) for f in request.friends]
        for what, dataset in datasets:
            for entry in dataset.files:
                _check(entry, dataset, roots=roots, prefixes=prefixes, what=f"{where}{what}")


def check_entry(
    entry: str,
    *,
    data_roots: Iterable[str | os.PathLike[str]],
    url_prefixes: Iterable[str],
) -> list[str]:
    """The files one dataset entry names, after checking each is allowed.

    Args:
        entry: a local path, glob, directory or URL, as in a dataset's ``files``.
        data_roots: see :func:`check_inputs`.
        url_prefixes: see :func:`check_inputs`.

    Returns:
        The real paths of the local files (or the URL itself) the delivery reads.

    Raises:
        PermissionDeniedError: the entry or a file it names is outside them.
    """
    from columnhub.spec import DatasetSpec

    dataset = DatasetSpec(name="input", files=(entry,))
    roots = _real_roots(data_roots)
    prefixes = [_parse_prefix(p) for p in url_prefixes]
    return _check(entry, dataset, roots=roots, prefixes=prefixes, what="input")


def check_url(url: str, *, url_prefixes: Iterable[str], what: str = "input") -> None:
    """Refuse ``url`` unless it lies under one of ``url_prefixes`` (see the module doc).

    Raises:
        PermissionDeniedError: naming the URL, the reason and the allowed prefixes.
    """
    prefixes = [_parse_prefix(p) for p in url_prefixes]
    _check_url(url, prefixes, what=what)


def under_prefix(url: str, prefix: str) -> bool:
    """True when ``url`` lies under the URL ``prefix`` (same origin, path inside).

    >>> under_prefix("https://data.example.org/open/a.root", "https://data.example.org/open/")
    True
    >>> under_prefix("https://data.example.org/openx/a.root", "https://data.example.org/open")
    False
    >>> under_prefix("https://data.example.org@evil.example/open/a.root",
    ...              "https://data.example.org/open/")
    False
    """
    try:
        _check_url(url, [_parse_prefix(prefix)], what="input")
    except PermissionDeniedError:
        return False
    return True


# -- local files -------------------------------------------------------------


def _real_roots(data_roots: Iterable[str | os.PathLike[str]]) -> list[Path]:
    return [Path(os.path.realpath(os.path.expanduser(os.fspath(r)))) for r in data_roots]


def _is_under(path: str, roots: Sequence[Path]) -> bool:
    return any(Path(path).is_relative_to(root) for root in roots)


def _roots_text(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots) if roots else "none configured"


def _check(
    entry: str,
    dataset: DatasetSpec,
    *,
    roots: Sequence[Path],
    prefixes: Sequence[SplitResult],
    what: str,
) -> list[str]:
    from columnhub.datasets import is_url

    if entry.lower().startswith("file:"):
        msg = (
            f"{what}: {entry!r}: file: URLs are not accepted by the service; give the plain "
            f"absolute path under a data root ({_roots_text(roots)})"
        )
        raise PermissionDeniedError(msg)
    if is_url(entry):  # the delivery reads this as a URL: it must be under a prefix
        _check_url(entry, prefixes, what=what)
        return [entry]
    if "\x00" in entry or not os.path.isabs(entry):
        msg = (
            f"{what}: {entry!r} is not an absolute path; the service resolves no relative "
            f"paths (nor ~): name the file by its absolute path under a data root "
            f"({_roots_text(roots)})"
        )
        raise PermissionDeniedError(msg)
    if not roots:
        msg = (
            f"{what}: {entry!r}: this service reads no local files (no data roots are "
            "configured); use a URL under one of its URL prefixes, or ask the operator to "
            "add a data root (--data-root)"
        )
        raise PermissionDeniedError(msg)
    # nothing outside a root is even listed: the fixed part of the entry first
    fixed = _fixed_part(entry)
    real = os.path.realpath(fixed)
    if not _is_under(real, roots):
        # where links lead is told only for paths inside a root (no map of the rest)
        shown = real if _is_under(os.path.normpath(fixed), roots) else fixed
        raise PermissionDeniedError(_outside(what, entry, fixed, shown, roots))
    from columnhub.datasets import _expand

    # expanded as the delivery expands it (globs, directories, result manifests)
    files = [path for path, _ in _expand(dataset.model_copy(update={"files": (entry,)}))]
    for path in files:  # every file the delivery reads, by its real path
        real = os.path.realpath(path)
        if not _is_under(real, roots):
            raise PermissionDeniedError(_outside(what, entry, path, real, roots))
    return files


def _fixed_part(entry: str) -> str:
    """The leading components of a path that hold no glob wildcard."""
    if not glob.has_magic(entry):
        return entry
    parts = PurePosixPath(entry).parts
    fixed: list[str] = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.path.join(*fixed)


def _outside(what: str, entry: str, path: str, real: str, roots: Sequence[Path]) -> str:
    shown = repr(entry) if path == entry else f"{entry!r} (file {path!r})"
    resolved = f" resolves to {real!r}, which is" if real != path else " is"
    return (
        f"{what}: {shown}{resolved} outside the service's data roots ({_roots_text(roots)}); "
        "name files under one of them (symbolic links and '..' leaving a root are refused)"
    )


# -- URLs --------------------------------------------------------------------


def _parse_prefix(prefix: str) -> SplitResult:
    try:
        parts = urlsplit(prefix)
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError as err:
        msg = f"URL prefix {prefix!r} is not a valid URL ({err}); give e.g. https://host/path/"
        raise SpecError(msg) from err
    if (
        not parts.scheme
        or parts.scheme == "file"
        or not parts.hostname
        or parts.username is not None
        or parts.query
        or parts.fragment
        or _BAD_URL_CHARS.search(prefix)
    ):
        msg = (
            f"URL prefix {prefix!r} must be an absolute URL with a scheme and a host, no user, "
            "query or fragment, and not file:// (use --data-root for local files); "
            "e.g. root://eos.example.org//store/ or https://data.example.org/open/"
        )
        raise SpecError(msg)
    return parts


def _normal_path(path: str) -> str | None:
    """The URL path with repeated slashes collapsed, or ``None`` if it has dot segments."""
    decoded = unquote(path)
    segments = decoded.split("/")
    if any(s in (".", "..") for s in segments) or "\\" in decoded or "\x00" in decoded:
        return None
    return re.sub(r"/+", "/", "/" + decoded).rstrip("/") or "/"


def _origin(parts: SplitResult) -> tuple[str, str, int | None]:
    scheme = parts.scheme.lower()
    port = parts.port if parts.port is not None else _DEFAULT_PORTS.get(scheme)
    return scheme, (parts.hostname or "").lower().rstrip("."), port


def _check_url(url: str, prefixes: Sequence[SplitResult], *, what: str) -> None:
    allowed = ", ".join(p.geturl() for p in prefixes) or "none configured"
    reason = _url_problem(url)
    if reason is None:
        parts = urlsplit(url)
        path = _normal_path(parts.path)
        if path is None:
            reason = "its path has '.' or '..' segments"
        else:
            origin = _origin(parts)
            for prefix in prefixes:
                base = _normal_path(prefix.path)
                if _origin(prefix) != origin or base is None:
                    continue
                if base == "/" or path == base or path.startswith(base + "/"):
                    return
            reason = "it is under none of the service's URL prefixes"
    msg = (
        f"{what}: URL {url!r} is refused: {reason}. Allowed URL prefixes: {allowed}; name "
        "files under one of them (or ask the operator to add a prefix, --url-prefix)"
    )
    raise PermissionDeniedError(msg)


def _url_problem(url: str) -> str | None:
    if _BAD_URL_CHARS.search(url):
        return "it holds whitespace, control characters or backslashes"
    if "::" in url:
        return "fsspec URL chains ('::') are not accepted"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError as err:
        return f"it is not a valid URL ({err})"
    if not parts.scheme or not parts.hostname:
        return "it is not an absolute URL with a host"
    if parts.scheme.lower() == "file":
        return "file: URLs are not accepted (give the plain absolute path under a data root)"
    if "@" in parts.netloc:
        return "user names or passwords in URLs are not accepted"
    return None
