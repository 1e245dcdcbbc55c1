"""YAML as columnhub reads it everywhere: PyYAML's safe loader with YAML 1.2 booleans.

PyYAML implements YAML 1.1, where ``on``, ``off``, ``yes``, ``no``, ``y``
and ``n`` are booleans, so a friend's ``on: [run, event]`` would become the
key ``True`` and a user called ``no`` in a token file the user ``False``. In
YAML 1.2 only ``true`` and ``false`` are; everything else stays a string.
Request specs, the service's config and token files, the client's config
and model cards all load through :func:`load`, so one file means the same
thing wherever columnhub reads it. A resolver on the safe loader is enough
for that (no second YAML library to install).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["YAMLError", "load"]

YAMLError = yaml.YAMLError

_BOOL_TAG = "tag:yaml.org,2002:bool"


class _Yaml12Loader(yaml.SafeLoader):
    """:class:`yaml.SafeLoader` whose only booleans are ``true`` and ``false``."""

    yaml_implicit_resolvers = {  # noqa: RUF012 - PyYAML's class-level table
        first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


_Yaml12Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load(text: str | bytes) -> Any:
    """YAML (or JSON) text as plain data, with YAML 1.2 booleans.

    >>> load("on: [run, event]\\nstrict: yes\\ncheck: true")
    {'on': ['run', 'event'], 'strict': 'yes', 'check': True}
    """
    return yaml.load(text, Loader=_Yaml12Loader)
