"""The request: an immutable, validated description of the columns a user wants.

YAML, JSON and Python dictionaries build the same :class:`Request`. A request
has a canonical form (file lists sorted, expressions normalised) and a stable
hash of it, :attr:`Request.hash`, that names its result everywhere (manifest,
cache, service).

>>> req = Request.model_validate(
...     {"dataset": {"name": "dy", "files": ["a.root"]}, "columns": ["Jet_pt"]}
... )
>>> req.dataset.keys
('run', 'luminosityBlock', 'event')
>>> req.hash == Request.from_yaml(req.to_yaml()).hash
True
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from columnhub.errors import ExpressionError, SpecError

__all__ = [
    "CMS_KEYS",
    "DatasetSpec",
    "FriendSpec",
    "ModelSpec",
    "OutputSpec",
    "Request",
    "load_request",
]

CMS_KEYS: tuple[str, ...] = ("run", "luminosityBlock", "event")
_DEFAULT_PART_BYTES = 256 * 1024**2


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class DatasetSpec(_Frozen):
    """Where the events are.

    Attributes:
        name: a short name, used in messages and provenance.
        files: local paths, glob patterns, ``root://`` or ``https://`` URLs, or
            a columnhub output directory (Parquet parts with key columns).
        tree: the TTree (or RNTuple) name in ROOT files.
        keys: the event-key columns (CMS default ``run, luminosityBlock, event``;
            ATLAS e.g. ``EventInfoAuxDyn.runNumber, EventInfoAuxDyn.eventNumber``).
        timeout: seconds to wait for remote storage before giving up.
    """

    name: str = Field(min_length=1)
    files: tuple[str, ...] = Field(min_length=1)
    tree: str = "Events"
    keys: tuple[str, ...] = Field(default=CMS_KEYS, min_length=1)
    timeout: float = Field(default=30.0, gt=0)

    @field_validator("files", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, value: Any) -> Any:
        if isinstance(value, str | os.PathLike):
            return (os.fspath(value),)
        if isinstance(value, list | tuple):
            return tuple(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value)
        return value

    def canonical(self) -> dict[str, Any]:
        """The dataset with its file list sorted (file order does not change the events)."""
        out = self.model_dump(mode="json", exclude={"timeout"})
        out["files"] = sorted(self.files)
        return out


class FriendSpec(_Frozen):
    """Columns from another dataset, matched to the primary event by event.

    Attributes:
        name: the friend's name; its match flag is ``<name>_matched``.
        dataset: where the friend's events are.
        columns: the friend columns to bring in.
        on: key columns of the friend (default: the friend dataset's keys); the
            primary side uses its own dataset keys, matched in order.
        match: ``keyed`` (any order, any file grouping) or ``aligned``
            (same files and order, keys still verified).
        how: ``inner``, ``left`` (default), ``right`` or ``outer``.
        validate: ``one_to_one`` (default), ``many_to_one`` or ``one_to_many``.
        prefix: optional prefix for the friend's column names. Without it a
            friend column keeps its own name, as in a ROOT friend tree
            (``Jet_btagNew``); with it, it is named ``prefix + column``
            (``jesup_Jet_pt``).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    dataset: DatasetSpec
    columns: tuple[str, ...] = Field(min_length=1)
    on: tuple[str, ...] | None = None
    match: Literal["keyed", "aligned"] = "keyed"
    how: Literal["inner", "left", "right", "outer"] = "left"
    validate_: Literal["one_to_one", "many_to_one", "one_to_many"] = Field(
        default="one_to_one", alias="validate"
    )
    prefix: str | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @property
    def friend_keys(self) -> tuple[str, ...]:
        """The key columns on the friend's side."""
        return self.on if self.on is not None else self.dataset.keys

    def output_name(self, column: str) -> str:
        """The name a friend column has in the request: its own, or ``prefix + column``."""
        return f"{self.prefix}{column}" if self.prefix is not None else column

    @property
    def matched_name(self) -> str:
        """The boolean column telling which rows found a partner: ``<name>_matched``.

        The friend's name, not its prefix, names it (with or without a prefix).
        """
        return f"{self.name}_matched"

    def canonical(self) -> dict[str, Any]:
        out = self.model_dump(mode="json", by_alias=True, exclude={"dataset"})
        out["dataset"] = self.dataset.canonical()
        out["columns"] = sorted(self.columns)
        out["on"] = list(self.friend_keys)
        return out


class ModelSpec(_Frozen):
    """An ML model whose outputs become columns.

    Attributes:
        model: the model's name in the registry.
        version: its explicit version.
        outputs: the card's output name -> column name in the request; by
            default each output keeps the name its card gives it.
        backend: ``auto`` (remote when the card names servers, else local),
            ``local`` or ``remote``.
    """

    model: str = Field(min_length=1)
    version: str = Field(min_length=1)
    outputs: dict[str, str] | None = None
    backend: Literal["auto", "local", "remote"] = "auto"

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) else value


class OutputSpec(_Frozen):
    """How and where the result is written.

    Attributes:
        format: ``parquet`` (default) or ``root`` (a TTree).
        directory: output directory; default a per-request folder in the cache.
        target_part_bytes: a new part file starts once a part reaches this size.
        compression: Parquet codec (``zstd``, ``lz4``, ``snappy``, ``none``...).
        include_keys: write the event-key columns too (default; needed to use
            the result as a friend dataset later).
    """

    format: Literal["parquet", "root"] = "parquet"
    directory: str | None = None
    target_part_bytes: int = Field(default=_DEFAULT_PART_BYTES, gt=0)
    compression: str = "zstd"
    include_keys: bool = True

    @field_validator("directory", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value


class Request(_Frozen):
    """A validated, immutable column request.

    Attributes:
        dataset: the primary dataset; one output row per (selected) event of it.
        columns: the columns to deliver: raw branches, names from ``define``,
            friend columns (their own names, or ``prefix + column``) and model outputs.
        define: new columns as safe expressions, ``{name: expression}``.
        where: a boolean expression selecting events.
        friends: datasets joined event by event.
        models: ML models whose outputs become columns.
        registry: the model registry directory (default ``$COLUMNHUB_MODELS``).
        chunk_size: events per chunk task (chunks start on basket
            boundaries). The chunk grid is also the cache's grid: requests with
            the same ``chunk_size`` share cached column chunks, so the default is
            one fixed number rather than one derived from the columns read.
        output: how the result is written.
    """

    dataset: DatasetSpec
    columns: tuple[str, ...] = Field(min_length=1)
    define: dict[str, str] = Field(default_factory=dict)
    where: str | None = None
    friends: tuple[FriendSpec, ...] = ()
    models: tuple[ModelSpec, ...] = ()
    registry: str | None = None
    chunk_size: int = Field(default=500_000, gt=0)
    output: OutputSpec = Field(default_factory=OutputSpec)

    @field_validator("columns", mode="before")
    @classmethod
    def _one_column_is_a_list(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> Request:
        from columnhub.expressions import parse

        dupes = sorted({c for c in self.columns if self.columns.count(c) > 1})
        if dupes:
            msg = f"columns {dupes} are requested twice; list each column once"
            raise ValueError(msg)
        for name, text in self.define.items():
            if not name.strip() or any(ch.isspace() for ch in name):
                msg = f"define: {name!r} is not a valid column name (no spaces)"
                raise ValueError(msg)
            try:
                parse(text)
            except ExpressionError as err:
                msg = f"define {name!r}: {err}"
                raise ValueError(msg) from None
        if self.where is not None:
            try:
                parse(self.where)
            except ExpressionError as err:
                msg = f"where: {err}"
                raise ValueError(msg) from None
        names = [f.name for f in self.friends]
        if len(set(names)) != len(names):
            msg = f"friend names must be unique, got {names}"
            raise ValueError(msg)
        return self

    # -- construction ------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any) -> Request:
        """Build a request from a dictionary, with a clear :class:`SpecError` if invalid."""
        if isinstance(data, Request):
            return data
        if not isinstance(data, dict):
            msg = f"a request must be a mapping (YAML/JSON object), got {type(data).__name__}"
            raise SpecError(msg)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise SpecError(_describe(err)) from None

    @classmethod
    def from_yaml(cls, text: str) -> Request:
        """Build a request from YAML (or JSON, which is YAML) text."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            msg = f"the request is not valid YAML/JSON: {err}"
            raise SpecError(msg) from None
        return cls.from_dict(data)

    @classmethod
    def from_json(cls, text: str) -> Request:
        """Build a request from JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            msg = f"the request is not valid JSON: {err}"
            raise SpecError(msg) from None
        return cls.from_dict(data)

    # -- canonical form ----------------------------------------------------------

    def canonical(self) -> dict[str, Any]:
        """The request's canonical form: what it asks for, not how it is spelt.

        File lists are sorted, expressions are normalised, and settings that
        only say where the result goes (``output.directory``) are left out.
        """
        from columnhub.expressions import parse

        return {
            "dataset": self.dataset.canonical(),
            "columns": list(self.columns),
            "define": {k: parse(v).canonical for k, v in sorted(self.define.items())},
            "where": parse(self.where).canonical if self.where is not None else None,
            "friends": sorted((f.canonical() for f in self.friends), key=lambda f: f["name"]),
            "models": [m.model_dump(mode="json") for m in self.models],
            "registry": self.registry,
            "chunk_size": self.chunk_size,
            "output": self.output.model_dump(mode="json", exclude={"directory"}),
        }

    @property
    def hash(self) -> str:
        """A stable hex digest of :meth:`canonical` (the result's identity)."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The request as plain data (round-trips through :meth:`from_dict`)."""
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True)

    def to_yaml(self) -> str:
        """The request as YAML text."""
        return str(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> Request:
        """A copy with some fields changed (validated again)."""
        data = self.model_dump(by_alias=True)
        data.update(changes)
        return Request.from_dict(data)


def load_request(source: str | os.PathLike[str] | dict[str, Any] | Request) -> Request:
    """A request from a YAML/JSON file path, a dictionary or a :class:`Request`."""
    if isinstance(source, Request):
        return source
    if isinstance(source, dict):
        return Request.from_dict(source)
    path = Path(source)
    if not path.is_file():
        msg = f"request file {str(path)!r} does not exist; give the path of a YAML or JSON spec"
        raise SpecError(msg)
    text = path.read_text()
    if path.suffix == ".json":
        return Request.from_json(text)
    return Request.from_yaml(text)


def _describe(err: ValidationError) -> str:
    """A readable, one-problem-per-line version of a pydantic error."""
    lines = ["the request is invalid:"]
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        text = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            text = "unknown field; check the spelling (see docs/spec.md for the fields)"
        elif problem["type"] == "missing":
            text = "required field is missing"
        elif problem["type"] == "literal_error":
            text = f"{text} (got {problem.get('input')!r})"
        lines.append(f"  - {where}: {text}")
    return "\n".join(lines)
