"""Optional dependencies: which extra installs which module.

Heavy or protocol-specific packages (ONNX Runtime, XGBoost, tritonclient,
Dask, XRootD, aiohttp) are imported where they are used. When one is
missing, :func:`require` raises :class:`~columnhub.errors.MissingDependencyError`
(also a ``ModuleNotFoundError``) naming the ``pip install`` that brings it,
so the CLI reports it as a user error (exit 2, no traceback).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from columnhub.errors import MissingDependencyError

__all__ = ["EXTRAS", "missing_dependency", "require"]

#: top-level module -> (columnhub extra, the package to pip install on its own)
EXTRAS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("ml", "onnxruntime"),
    "onnx": ("ml", "onnx"),
    "xgboost": ("ml", "xgboost"),
    "tritonclient": ("ml", "'tritonclient[http,grpc]'"),
    "dask": ("dask", "'dask[distributed]'"),
    "distributed": ("dask", "'dask[distributed]'"),
    "dask_awkward": ("dask", "dask-awkward"),
    "fsspec_xrootd": ("xrootd", "fsspec-xrootd xrootd"),
    "XRootD": ("xrootd", "fsspec-xrootd xrootd"),
    "pyxrootd": ("xrootd", "fsspec-xrootd xrootd"),
    "aiohttp": ("http", "aiohttp"),
    "requests": ("http", "requests"),
    "fastapi": ("service", "fastapi"),
    "botocore": ("service", "botocore"),
    "uvicorn": ("service", "uvicorn"),
    "prometheus_client": ("service", "prometheus-client"),
    "httpx": ("service", "httpx"),
}


def missing_dependency(
    err: ImportError, *, what: str, wanted: str | None = None
) -> MissingDependencyError | None:
    """The error to raise for ``err`` if it is a missing optional module, else ``None``.

    Args:
        err: the import error (raised by columnhub or by a library it called).
        what: what needed the module, e.g. ``"ONNX models"``.
        wanted: the optional module that was being imported, if known (a
            dependency of it that is missing is installed by the same extra).
    """
    name = getattr(err, "name", None) or ""
    top = name.split(".", 1)[0]
    if top not in EXTRAS:  # libraries sometimes wrap the error: look at its text
        text = str(err)
        top = next((m for m in EXTRAS if m in text or m.replace("_", "-") in text), "")
    if not top and wanted is not None and wanted.split(".", 1)[0] in EXTRAS:
        top = wanted.split(".", 1)[0]
    if not top:
        return None
    extra, package = EXTRAS[top]
    missing = name if name and name.split(".", 1)[0] != top else top
    msg = (
        f"{what}: the Python module {missing!r} is not installed; install the extra with "
        f"pip install 'columnhub[{extra}]' (or pip install {package})"
    )
    found = MissingDependencyError(msg)
    found.name = top
    return found


def require(module: str, *, what: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming its extra."""
    try:
        return importlib.import_module(module)
    except (ImportError, RuntimeError) as err:
        # some packages re-raise a missing dependency of theirs as a RuntimeError
        # (tritonclient.http without geventhttpclient)
        cause = err if isinstance(err, ImportError) else err.__cause__
        if not isinstance(cause, ImportError):
            raise
        found = missing_dependency(cause, what=what, wanted=module)
        if found is None:
            raise
        raise found from err
