"""The ``columnhub`` codegen of the ServiceX front door: the selection is a columnhub request.

A ServiceX client user writes ``Query`` as a columnhub request (JSON: the
same mapping as a YAML spec, with ``define``, ``where``, ``friends``,
``models``); the ServiceX ``Sample``'s ``Dataset`` gives the primary
dataset's files, and the client's ``OutputFormat`` the output format.
"""

from __future__ import annotations

import json
from typing import Any

from columnhub.errors import SpecError

__all__ = ["CODEGEN", "OUTPUT_FORMATS", "translate"]

#: the name of this codegen in ``code-gen-image`` and in a transformation's ``codegen``
CODEGEN = "columnhub"
#: ServiceX result format -> columnhub ``output.format``
OUTPUT_FORMATS = {"parquet": "parquet", "root-file": "root"}


def output_format(result_format: str) -> str:
    """The columnhub ``output.format`` of a ServiceX ``result-format``.

    >>> output_format("root-file")
    'root'

    Raises:
        SpecError: a format columnhub does not write (``root-rntuple``).
    """
    try:
        return OUTPUT_FORMATS[result_format]
    except KeyError:
        msg = (
            f"result-format {result_format!r} is not supported by columnhub; use one of "
            f"{', '.join(OUTPUT_FORMATS)} (OutputFormat: parquet or root-ttree in the spec)"
        )
        raise SpecError(msg) from None


def translate(
    codegen: str, selection: str, *, files: list[str], result_format: str
) -> dict[str, Any]:
    """The columnhub spec (a dictionary) of a transformation with the ``columnhub`` codegen.

    The primary dataset's ``files`` are the transformation's files (any
    ``files`` in the selection are replaced: the ServiceX ``Dataset`` says
    what is read); its ``tree``, ``keys`` and ``name`` are kept. Friends keep
    their own datasets. ``output.format`` follows ``result_format``.

    >>> spec = translate("columnhub", '{"columns": ["MET_pt"]}', files=["/d/a.root"],
    ...                  result_format="parquet")
    >>> spec["dataset"], spec["output"]
    ({'files': ['/d/a.root']}, {'format': 'parquet'})

    Args:
        codegen: must be ``columnhub``.
        selection: the request as JSON text.
        files: the transformation's input files.
        result_format: the ServiceX result format (``parquet`` or ``root-file``).

    Raises:
        SpecError: not JSON, not an object, several samples, or an unsupported format.
    """
    if codegen != CODEGEN:
        msg = f"codegen {codegen!r} is not the {CODEGEN!r} codegen"
        raise SpecError(msg)
    try:
        data = json.loads(selection)
    except json.JSONDecodeError as err:
        msg = (
            f"the {CODEGEN!r} codegen's selection is not JSON ({err.msg} at line {err.lineno} "
            f"column {err.colno}); give the columnhub request as JSON text (json.dumps(spec))"
        )
        raise SpecError(msg) from err
    if not isinstance(data, dict):
        msg = (
            f"the {CODEGEN!r} codegen's selection must be a JSON object (a columnhub "
            f"request: columns, define, where, friends, ...), got a {type(data).__name__}"
        )
        raise SpecError(msg)
    if "samples" in data:
        msg = (
            f"the {CODEGEN!r} codegen's selection has 'samples'; one ServiceX Sample is one "
            "dataset: give each sample its own Sample (with its own Dataset) in the spec"
        )
        raise SpecError(msg)
    dataset = data.get("dataset", {})
    if not isinstance(dataset, dict):
        msg = (
            f"the selection's 'dataset' must be a mapping (tree, keys, name), got "
            f"{type(dataset).__name__}; the files come from the Sample's Dataset"
        )
        raise SpecError(msg)
    output = data.get("output", {})
    if not isinstance(output, dict):
        msg = f"the selection's 'output' must be a mapping, got {type(output).__name__}"
        raise SpecError(msg)
    if not files:
        msg = "the transformation names no input files; give the Sample a Dataset with files"
        raise SpecError(msg)
    return {
        **data,
        "dataset": {**dataset, "files": list(files)},
        "output": {**output, "format": output_format(result_format)},
    }
