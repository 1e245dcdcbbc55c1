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
}


def missing_dependency(err: ImportError, *, what: str) -> MissingDependencyError | None:
    """The error to raise for ``err`` if it is a missing optional module, else ``None``.

    Args:
        err: the import error (raised by columnhub or by a library it called).
        what: what needed the module, e.g. ``"ONNX models"``.
    """
    name = getattr(err, "name", None) or ""
    top = name.split(".", 1)[0]
    if top not in EXTRAS:  # libraries sometimes wrap the error: look at its text
        text = str(err)
        top = next((m for m in EXTRAS if m in text or m.replace("_", "-") in text), "")
    if not top:
        return None
    extra, package = EXTRAS[top]
    msg = (
        f"{what}: the Python module {top!r} is not installed; install the extra with "
        f"pip install 'columnhub[{extra}]' (or pip install {package})"
    )
    found = MissingDependencyError(msg)
    found.name = top
    return found


def require(module: str, *, what: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming its extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        found = missing_dependency(err, what=what)
        if found is None:
            raise
        raise found from err
