"""columnhub: select, join, compute, cache and deliver columns of HEP event data.

>>> import columnhub
>>> columnhub.Request  # doctest: +ELLIPSIS
<class 'columnhub.spec.Request'>
"""

from __future__ import annotations

from columnhub.delivery import arrays, deliver
from columnhub.errors import ColumnhubError
from columnhub.result import Result
from columnhub.spec import (
    DatasetSpec,
    FriendSpec,
    ModelSpec,
    OutputSpec,
    Request,
    Samples,
    load_request,
)

__version__ = "0.1.0"

__all__ = [
    "ColumnhubError",
    "DatasetSpec",
    "FriendSpec",
    "ModelSpec",
    "OutputSpec",
    "Request",
    "Result",
    "Samples",
    "__version__",
    "arrays",
    "deliver",
    "load_request",
]
