"""The exception tree of columnhub.

Every error a user can cause is a :class:`ColumnhubError`; the CLI maps them to
exit code 2 and the service to HTTP 4xx in one place each. Each class also
subclasses the fitting builtin, so ``except KeyError`` keeps working.

.. code-block:: text

    ColumnhubError
    ├── SpecError (ValueError)                 invalid request / configuration
    ├── SampleError                            samples of a multi-sample request failed
    ├── ExpressionError (ValueError)           bad expression text (with position)
    ├── ColumnNotFoundError (KeyError)         unknown column (with closest names)
    ├── DatasetError                           a dataset cannot be read
    │   ├── DatasetFileNotFoundError (FileNotFoundError)
    │   ├── InputChangedError                  a file changed while it was read
    │   ├── TreeNotFoundError (KeyError)
    │   ├── CorruptFileError                   truncated / damaged file
    │   ├── UnreadableBranchError (TypeError)  a branch of a type uproot cannot read
    │   ├── SourceTimeoutError (TimeoutError)  remote storage did not answer
    │   ├── SourceConnectionError (ConnectionError)  remote storage refused the connection
    │   └── SourceProtocolError                remote storage cannot serve byte ranges
    ├── JoinError                              event-key joins
    │   ├── KeyMismatchError                   aligned friends disagree
    │   ├── DuplicateKeyError                  ``validate`` violated
    │   └── KeyTypeError (TypeError)           float / negative key columns
    ├── CacheError                             column cache misuse
    ├── MissingDependencyError (ModuleNotFoundError)  an optional extra is not installed
    ├── ModelError                             ML inference
    │   ├── ModelNotFoundError (KeyError)
    │   ├── ModelInputError (ValueError)
    │   └── InferenceServerError (ConnectionError)
    ├── OutputError (OSError)                  output directory problems
    └── ServiceError                           the multi-user service (HTTP status in brackets)
        ├── AuthError                          missing or invalid credentials [401]
        ├── PermissionDeniedError (PermissionError)  scope, data root or URL prefix [403]
        ├── RequestNotFoundError (KeyError)    unknown request id, or another user's [404]
        ├── QuotaExceededError                 a per-user limit is reached [429]
        └── ServiceUnavailableError (ConnectionError)  the client cannot reach the service
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = [
    "AuthError",
    "CacheError",
    "ColumnNotFoundError",
    "ColumnhubError",
    "CorruptFileError",
    "DatasetError",
    "DatasetFileNotFoundError",
    "DuplicateKeyError",
    "ExpressionError",
    "InferenceServerError",
    "InputChangedError",
    "JoinError",
    "KeyMismatchError",
    "KeyTypeError",
    "MissingDependencyError",
    "ModelError",
    "ModelInputError",
    "ModelNotFoundError",
    "OutputError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RequestNotFoundError",
    "SampleError",
    "ServiceError",
    "ServiceUnavailableError",
    "SourceConnectionError",
    "SourceProtocolError",
    "SourceTimeoutError",
    "SpecError",
    "TreeNotFoundError",
    "UnreadableBranchError",
    "closest",
]


class ColumnhubError(Exception):
    """Base class of every error columnhub raises on purpose."""

    def __str__(self) -> str:  # KeyError would repr() its message otherwise
        return str(self.args[0]) if self.args else self.__class__.__name__


class SpecError(ColumnhubError, ValueError):
    """The request (spec) is invalid."""


class SampleError(ColumnhubError):
    """Some samples of a multi-sample request failed (each sample's own error inside).

    Attributes:
        errors: sample name -> the error that stopped it.
        results: sample name -> the result of each sample that was delivered
            (a :class:`~columnhub.Result`, or an awkward array for ``arrays``).
    """

    def __init__(
        self, message: str, *, errors: dict[str, Exception], results: dict[str, Any]
    ) -> None:
        super().__init__(message)
        self.errors = errors
        self.results = results


class ExpressionError(ColumnhubError, ValueError):
    """An expression cannot be parsed or evaluated.

    Attributes:
        text: the expression text.
        position: 0-based character offset of the problem, or ``None``.
    """

    def __init__(self, message: str, *, text: str = "", position: int | None = None) -> None:
        self.text = text
        self.position = position
        if text and position is not None:
            caret = " " * position + "^"
            message = f"{message}\n    {text}\n    {caret}"
        super().__init__(message)


class ColumnNotFoundError(ColumnhubError, KeyError):
    """A requested column exists nowhere (with the closest names that do)."""


class DatasetError(ColumnhubError):
    """A dataset (file list, tree, storage) cannot be used."""


class DatasetFileNotFoundError(DatasetError, FileNotFoundError):
    """A file of a dataset does not exist."""


class InputChangedError(DatasetError):
    """An input file was replaced or rewritten while a request read it.

    Raised when a read finishes and the file's identity (size, modification
    time, inode, ROOT UUID; ETag or Last-Modified for URLs) no longer matches
    the one planned. Nothing read from it is cached; re-running the request is
    correct (it plans with the file as it is then).
    """


class TreeNotFoundError(DatasetError, KeyError):
    """The named tree is not in the file."""


class CorruptFileError(DatasetError):
    """A file is truncated or damaged."""


class UnreadableBranchError(DatasetError, TypeError):
    """A branch has a type that uproot cannot read as an array."""


class SourceTimeoutError(DatasetError, TimeoutError):
    """Remote storage did not answer in time."""


class SourceConnectionError(DatasetError, ConnectionError):
    """Remote storage refused (or reset) the connection."""


class SourceProtocolError(DatasetError):
    """Remote storage answers, but not as reading needs (e.g. no HTTP byte ranges)."""


class JoinError(ColumnhubError):
    """An event-key join cannot be done safely."""


class KeyMismatchError(JoinError):
    """Aligned datasets disagree on an event key."""


class DuplicateKeyError(JoinError):
    """Duplicate event keys violate the join's ``validate`` setting."""


class KeyTypeError(JoinError, TypeError):
    """An event-key column has a type that cannot be a key."""


class CacheError(ColumnhubError):
    """The column cache cannot be used as asked."""


class MissingDependencyError(ColumnhubError, ModuleNotFoundError):
    """An optional dependency is not installed (the message names the extra to install)."""


class ModelError(ColumnhubError):
    """ML inference cannot be done as asked."""


class ModelNotFoundError(ModelError, KeyError):
    """No such model (or version) in the registry."""


class ModelInputError(ModelError, ValueError):
    """Model inputs have the wrong shape, type or names."""


class InferenceServerError(ModelError, ConnectionError):
    """No inference server could answer."""


class OutputError(ColumnhubError, OSError):
    """The output cannot be written."""


class ClusterError(ColumnhubError):
    """The Dask cluster failed the request (no mistake in it: the CLI exits 1)."""


class ClusterLostError(ClusterError, ConnectionError):
    """The connection to the Dask scheduler was lost mid-request (run the request again)."""


class WorkersDiedError(ClusterError):
    """A task's workers died while running it, one after another (most often: memory)."""


class ServiceError(ColumnhubError):
    """The multi-user service refuses or cannot serve a call.

    ``status`` is the HTTP status the service answers with; the service maps
    every :class:`ColumnhubError` to one in one place (``service/app.py``).
    """

    status = 400


class AuthError(ServiceError):
    """No credentials, or credentials that are not valid (expired, wrong issuer, ...)."""

    status = 401


class PermissionDeniedError(ServiceError, PermissionError):
    """Valid credentials without the right: a scope, or a file outside the data roots."""

    status = 403


class RequestNotFoundError(ServiceError, KeyError):
    """No such request for this user (another user's request is not found either)."""

    status = 404


class QuotaExceededError(ServiceError):
    """A per-user limit (requests at once, stored bytes) is reached."""

    status = 429


class ServiceUnavailableError(ServiceError, ConnectionError):
    """The client could not reach the service, or it answered with a server error."""

    status = 503


def closest(name: str, candidates: Iterable[str], *, n: int = 5) -> list[str]:
    """The names in ``candidates`` most similar to ``name``, best first.

    >>> closest("Jet_Pt", ["Jet_pt", "Jet_eta", "Muon_pt"], n=2)
    ['Jet_pt', 'Jet_eta']
    """
    pool = list(candidates)
    found = difflib.get_close_matches(name, pool, n=n, cutoff=0.5)
    if len(found) < n:
        lower = name.lower()
        found += [c for c in pool if lower in c.lower() and c not in found][: n - len(found)]
    return found
