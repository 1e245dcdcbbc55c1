"""columnhub: select, join, compute, cache and deliver columns of HEP event data.

The names below are loaded on first use (PEP 562), so ``import columnhub``
and the ``columnhub`` command start without awkward, pyarrow, uproot or numba.

>>> import columnhub
>>> columnhub.Request  # doctest: +ELLIPSIS
<class 'columnhub.spec.Request'>
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from columnhub.client import Client
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
    "Client",
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

#: public name -> the module that defines it, imported when the name is first used
_LAZY = {
    "arrays": "columnhub.delivery",
    "deliver": "columnhub.delivery",
    "Client": "columnhub.client",
    "ColumnhubError": "columnhub.errors",
    "Result": "columnhub.result",
    "DatasetSpec": "columnhub.spec",
    "FriendSpec": "columnhub.spec",
    "ModelSpec": "columnhub.spec",
    "OutputSpec": "columnhub.spec",
    "Request": "columnhub.spec",
    "Samples": "columnhub.spec",
    "load_request": "columnhub.spec",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'columnhub' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
