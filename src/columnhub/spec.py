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
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from columnhub.errors import ExpressionError, SpecError

__all__ = [
    "CMS_KEYS",
    "DatasetSpec",
    "FriendSpec",
    "ModelSpec",
    "OutputSpec",
    "Request",
    "Samples",
    "default_dataset_name",
    "load_request",
    "rebase_paths",
]

CMS_KEYS: tuple[str, ...] = ("run", "luminosityBlock", "event")
_DEFAULT_PART_BYTES = 256 * 1024**2


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class DatasetSpec(_Frozen):
    """Where the events are.

    Attributes:
        name: a short name, used in messages and provenance; by default derived
            from the files (their common file-name stem, else their folder; see
            :func:`default_dataset_name`). A friend's dataset defaults to the
            friend's name.
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

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") is None and data.get("files"):
            files = data["files"]
            files = [files] if isinstance(files, str | os.PathLike) else files
            if isinstance(files, list | tuple) and all(
                isinstance(f, str | os.PathLike) for f in files
            ):
                data = {**data, "name": default_dataset_name([os.fspath(f) for f in files])}
        return data

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

    @model_validator(mode="before")
    @classmethod
    def _dataset_named_after_friend(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and isinstance(data.get("dataset"), dict)
            and data["dataset"].get("name") is None
            and isinstance(data.get("name"), str)
        ):
            data = {**data, "dataset": {**data["dataset"], "name": data["name"]}}
        return data

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
        min_parts: split a result into at least this many parts (4 by
            default), each of at least 8 MiB, even when it is smaller than
            ``target_part_bytes``: parts are the unit of parallel work, so a
            64 MB result is written by several tasks at once, not by one. The
            part boundaries never depend on the number of workers.
        compression: Parquet codec (``zstd``, ``lz4``, ``snappy``, ``none``...).
        include_keys: write the event-key columns too (default; needed to use
            the result as a friend dataset later).
        explode: write one row per object instead of one per event: after the
            selection, every column in ``columns`` must be a list of one
            collection (the same number of objects in every event), and each
            is written flattened. Event keys and the collections' counters
            are not written (they are per event); the manifest's ``events``
            still counts events, its parts' ``rows`` count objects.
    """

    format: Literal["parquet", "root"] = "parquet"
    directory: str | None = None
    target_part_bytes: int = Field(default=_DEFAULT_PART_BYTES, gt=0)
    min_parts: int = Field(default=4, ge=1)
    compression: str = "zstd"
    include_keys: bool = True
    explode: bool = False

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
        return cls.from_dict(_parse_yaml(text))

    @classmethod
    def from_json(cls, text: str) -> Request:
        """Build a request from JSON text."""
        return cls.from_dict(_parse_json(text))

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
            "output": self.output.model_dump(
                mode="json",
                # explode only when set: the hashes of one-row-per-event requests stay
                exclude={"directory"} if self.output.explode else {"directory", "explode"},
            ),
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
        import yaml

        return str(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> Request:
        """A copy with some fields changed (validated again)."""
        data = self.model_dump(by_alias=True)
        data.update(changes)
        return Request.from_dict(data)


#: A sample name: a safe directory name on every filesystem (``DIR/<sample>/``).
_SAMPLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
#: Request fields a multi-sample spec shares between its samples (all but ``dataset``).
_SHARED = ("columns", "define", "where", "friends", "models", "registry", "chunk_size", "output")
#: Fields a sample merges name by name over the shared ones (any other replaces).
_MERGED = ("define", "output")
#: Keys of a coffea fileset entry that say nothing about which events are read.
_FILESET_EXTRAS = ("metadata", "form", "compressed_form", "did", "format")


class Samples(_Frozen):
    """Several samples delivered with one spec: each an ordinary :class:`Request`.

    Built from a mapping with ``samples:`` (sample name -> dataset, with the
    shared request fields and per-sample overrides) or with a coffea fileset as
    its ``dataset``; see :meth:`from_dict`. Each sample's request is exactly the
    single-sample request one would write by hand, so the column cache, the
    reuse of whole results and :attr:`Request.hash` work per sample unchanged.

    >>> multi = Samples.from_dict({
    ...     "samples": {"dy": ["dy.root"], "tt": {"files": {"tt.root": "Events"}}},
    ...     "columns": ["MET_pt"],
    ... })
    >>> list(multi.requests())
    ['dy', 'tt']
    >>> multi.requests()["tt"].dataset.files
    ('tt.root',)

    Attributes:
        samples: sample name -> its request, in the order given.
    """

    samples: dict[str, Request] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_names(self) -> Samples:
        folded: dict[str, str] = {}
        for name in self.samples:
            _check_sample_name(name)
            other = folded.setdefault(name.casefold(), name)
            if other != name:
                raise ValueError(_case_clash(other, name))
        return self

    def requests(self) -> dict[str, Request]:
        """Sample name -> its single-sample :class:`Request`, in the order given."""
        return dict(self.samples)

    @property
    def names(self) -> tuple[str, ...]:
        """The sample names, in order."""
        return tuple(self.samples)

    # -- construction ------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any) -> Samples:
        """Build the samples from a mapping, with a clear :class:`SpecError` if invalid.

        The mapping has the fields of a :class:`Request` shared by every sample
        (``columns``, ``define``, ``where``, ``friends``, ``models``,
        ``registry``, ``chunk_size``, ``output``) and either ``samples`` or a
        coffea fileset as ``dataset``. ``samples`` maps each name to one of:

        - a file list (or one path): the dataset's files (coffea's ``{name: [paths]}``);
        - a dataset mapping (``files``, ``tree``, ``keys``, ``name``,
          ``timeout``), or a coffea fileset entry (``files`` as
          ``{path: treename}``, with ``metadata``, ``treename``);
        - a mapping with ``dataset`` and per-sample overrides of the shared
          fields: ``define`` and ``output`` are merged name by name over the
          shared ones, any other field replaces the shared value.

        ``samples`` may also be a list of such mappings, each with its ``name``
        (as ServiceX's ``Sample:`` list). A dataset's ``name`` defaults to the
        sample's name; a shared ``output.directory`` gives ``<directory>/<sample>``.
        """
        if isinstance(data, Samples):
            return data
        if not isinstance(data, Mapping):
            msg = f"a request must be a mapping (YAML/JSON object), got {type(data).__name__}"
            raise SpecError(msg)
        data = dict(data)
        if "samples" in data and "dataset" in data:
            msg = (
                "give either 'samples' (several samples) or 'dataset' (one), not both; "
                "move the dataset into 'samples' under a name"
            )
            raise SpecError(msg)
        if "samples" not in data and not _is_fileset(data.get("dataset")):
            msg = (
                "the request is invalid:\n  - samples: required field is missing (sample name "
                "-> dataset, or a coffea fileset as 'dataset'); one dataset is a Request"
            )
            raise SpecError(msg)
        entries = _plain(data.pop("samples") if "samples" in data else data.pop("dataset"))
        unknown = sorted(set(data) - set(_SHARED))
        if unknown:
            msg = (
                f"the request is invalid:\n  - {', '.join(unknown)}: unknown field; a multi-sample "
                f"request shares only {', '.join(_SHARED)} (see docs/spec.md)"
            )
            raise SpecError(msg)
        requests: dict[str, Request] = {}
        folded: dict[str, str] = {}
        for name, entry in _sample_entries(entries):
            if name in requests:
                msg = f"sample {name!r} is given twice; give each sample one name"
                raise SpecError(msg)
            _check_sample_name_spec(name)
            other = folded.setdefault(name.casefold(), name)
            if other != name:
                raise SpecError(_case_clash(other, name))
            merged = _merge(name, data, entry)
            try:
                requests[name] = Request.from_dict(merged)
            except SpecError as err:
                msg = f"sample {name!r}: {err}"
                raise SpecError(msg) from None
        try:
            return cls(samples=requests)
        except ValidationError as err:
            raise SpecError(_describe(err)) from None

    @classmethod
    def from_yaml(cls, text: str) -> Samples:
        """Build the samples from YAML (or JSON) text."""
        return cls.from_dict(_parse_yaml(text))

    @classmethod
    def from_json(cls, text: str) -> Samples:
        """Build the samples from JSON text."""
        return cls.from_dict(_parse_json(text))

    def to_dict(self) -> dict[str, Any]:
        """Plain data, every sample written out whole (round-trips through :meth:`from_dict`)."""
        return {"samples": {name: req.to_dict() for name, req in self.samples.items()}}

    def to_yaml(self) -> str:
        """The samples as YAML text."""
        import yaml

        return str(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _case_clash(one: str, other: str) -> str:
    return (
        f"sample names {one!r} and {other!r} differ only in case; their output directories "
        "would be one on case-insensitive filesystems: rename one"
    )


def _check_sample_name(name: str) -> None:
    if not _SAMPLE_NAME.match(name):
        msg = (
            f"sample name {name!r} is not a safe directory name: use 1-128 letters, digits "
            "and '_', '.', '+', '-', starting with a letter or digit (a DAS path such as "
            "'/DYJets/.../NANOAODSIM' needs a short name, e.g. 'DYJets')"
        )
        raise ValueError(msg)


def _check_sample_name_spec(name: Any) -> None:
    if not isinstance(name, str):
        msg = f"sample name {name!r} is not text; name each sample with a string"
        raise SpecError(msg)
    try:
        _check_sample_name(name)
    except ValueError as err:
        raise SpecError(str(err)) from None


def _sample_entries(entries: Any) -> list[tuple[Any, Any]]:
    """(name, entry) pairs from ``samples`` as a mapping or a list of named mappings."""
    if isinstance(entries, Mapping):
        if not entries:
            msg = "samples: no sample given; name at least one (sample name -> dataset)"
            raise SpecError(msg)
        return list(entries.items())
    if isinstance(entries, list | tuple) and entries:
        pairs = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or "name" not in entry:
                msg = (
                    f"samples[{i}]: a sample in a list is a mapping with its 'name' "
                    f"(got {entry!r}); or write samples as a mapping name -> dataset"
                )
                raise SpecError(msg)
            rest = dict(entry)
            pairs.append((rest.pop("name"), rest))
        return pairs
    msg = (
        f"samples must map sample names to datasets (or be a list of named samples), got "
        f"{entries!r}"
    )
    raise SpecError(msg)


def _merge(name: str, shared: dict[str, Any], entry: Any) -> dict[str, Any]:
    """The request of sample ``name``: the shared fields, its dataset, its overrides."""
    if isinstance(entry, Mapping) and "dataset" in entry:
        overrides = dict(entry)
        dataset = overrides.pop("dataset")
    else:
        overrides = {}
        dataset = entry
    unknown = sorted(set(overrides) - set(_SHARED))
    if unknown:
        msg = (
            f"sample {name!r}: {', '.join(unknown)}: unknown field; a sample has its "
            f"'dataset' and overrides only {', '.join(_SHARED)}"
        )
        raise SpecError(msg)
    shared = {k: _set_fields(v) if k in _MERGED else v for k, v in shared.items()}
    overrides = {k: _set_fields(v) if k in _MERGED else v for k, v in overrides.items()}
    merged = dict(shared)
    for field, value in overrides.items():
        base = merged.get(field)
        if field in _MERGED and isinstance(value, Mapping) and isinstance(base, Mapping):
            merged[field] = {**base, **value}  # name by name over the shared ones
        else:
            merged[field] = value
    merged["dataset"] = _sample_dataset(name, dataset)
    shared_output = shared.get("output")
    own_output = overrides.get("output")
    if (
        isinstance(shared_output, Mapping)
        and shared_output.get("directory") is not None
        and not (isinstance(own_output, Mapping) and "directory" in own_output)
    ):
        out = dict(merged["output"])
        out["directory"] = os.path.join(os.fspath(shared_output["directory"]), name)
        merged["output"] = out
    return merged


def _set_fields(value: Any) -> Any:
    """An :class:`OutputSpec` given as an object: the fields it sets, as a mapping."""
    if isinstance(value, _Frozen):
        return value.model_dump(by_alias=True, exclude_unset=True)
    return value


def _sample_dataset(name: str, entry: Any) -> Any:
    """A sample's dataset as :class:`DatasetSpec` data, from any of the accepted forms."""
    entry = _plain(entry)
    if isinstance(entry, DatasetSpec):
        return entry
    if isinstance(entry, str | os.PathLike) or (
        isinstance(entry, list | tuple) and all(isinstance(f, str | os.PathLike) for f in entry)
    ):
        return {"name": name, "files": entry}
    if not isinstance(entry, Mapping):
        msg = (
            f"sample {name!r}: {entry!r} is no dataset; give a file list, a dataset mapping "
            "(files, tree, keys) or a coffea fileset entry ({'files': {path: treename}})"
        )
        raise SpecError(msg)
    misplaced = sorted(set(entry) & set(_SHARED))
    if misplaced:
        msg = (
            f"sample {name!r}: {', '.join(misplaced)} next to its files; to override shared "
            "fields for one sample, put its dataset under 'dataset' "
            "({dataset: {files: [...]}, where: ...})"
        )
        raise SpecError(msg)
    data = {k: v for k, v in entry.items() if k not in _FILESET_EXTRAS}
    data.setdefault("name", name)
    treename = data.pop("treename", None)
    files = data.get("files")
    trees: set[str] = set()
    if isinstance(files, Mapping):
        paths = []
        for path, where in files.items():
            paths.append(os.fspath(path))
            tree = _fileset_tree(name, path, where)
            if tree is not None:  # None: a Parquet file (no tree)
                trees.add(tree)
        data["files"] = paths
    if treename is not None:
        trees.add(treename)
    if "tree" in data and trees:
        trees.add(data["tree"])
    if len(trees) > 1:
        msg = (
            f"sample {name!r}: its files name several trees {sorted(trees)}; columnhub reads "
            "one tree per sample: split the files into one sample per tree"
        )
        raise SpecError(msg)
    if trees:
        data["tree"] = trees.pop()
    return data


def _fileset_tree(name: str, path: Any, where: Any) -> str | None:
    """The tree of one file of a coffea fileset: ``{path: treename}`` or a preprocessed entry."""
    if isinstance(where, str):
        return where
    if isinstance(where, Mapping) and isinstance(where.get("object_path", 0), str | None):
        steps = where.get("steps")
        if steps is not None and not _whole_file(steps, where.get("num_entries")):
            msg = (
                f"sample {name!r}: file {os.fspath(path)!r} has steps {steps!r} that do not cover "
                "the whole file; columnhub delivers every entry of a file: drop 'steps' (or "
                "give the fileset from before coffea's preprocess/max_chunks)"
            )
            raise SpecError(msg)
        tree = where.get("object_path")
        return None if tree is None else str(tree)
    msg = (
        f"sample {name!r}: file {os.fspath(path)!r} maps to {where!r}; a coffea fileset maps "
        "each file to its tree name (or to a preprocessed entry with 'object_path')"
    )
    raise SpecError(msg)


def _whole_file(steps: Any, entries: Any) -> bool:
    """True when coffea ``steps`` cover ``[0, entries)`` exactly, in order."""
    if not isinstance(entries, int) or not isinstance(steps, list | tuple):
        return False
    stop = 0
    for step in steps:
        if not isinstance(step, list | tuple) or len(step) != 2 or step[0] != stop:
            return False
        stop = step[1]
    return stop == entries


def _plain(value: Any) -> Any:
    """Another library's pydantic model (coffea's ``DataGroupSpec``) as plain data."""
    if isinstance(value, BaseModel) and not isinstance(value, _Frozen):
        return value.model_dump()
    return value


def _is_fileset(value: Any) -> bool:
    """True when ``value`` looks like a coffea fileset (name -> entry), not one dataset."""
    value = _plain(value)
    return (
        isinstance(value, Mapping)
        and bool(value)
        and not set(value) & set(DatasetSpec.model_fields)
        and all(isinstance(_plain(v), Mapping | list | tuple) for v in value.values())
    )


def load_request(
    source: str | os.PathLike[str] | dict[str, Any] | Request | Samples,
) -> Request | Samples:
    """A request from a YAML/JSON file path, a dictionary, a :class:`Request` or :class:`Samples`.

    A spec with ``samples:``, or whose ``dataset`` is a coffea fileset, gives
    :class:`Samples`; any other gives a :class:`Request`.

    Relative paths in a spec *file* (dataset and friend ``files``, ``registry``,
    ``output.directory``) are relative to the file's folder, so a spec works
    from any working directory; in a dictionary or a :class:`Request` they stay
    relative to the working directory.
    """
    if isinstance(source, Request | Samples):
        return source
    if isinstance(source, dict):
        return _from_data(source)
    path = Path(source)
    if not path.is_file():
        msg = f"request file {str(path)!r} does not exist; give the path of a YAML or JSON spec"
        raise SpecError(msg)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        msg = (
            f"request file {str(path)!r} is not text (a data file?); give the path of a YAML "
            "or JSON spec, and name data files under dataset: files:"
        )
        raise SpecError(msg) from None
    data = _parse_json(text) if path.suffix == ".json" else _parse_yaml(text)
    return _from_data(rebase_paths(data, path.resolve().parent))


def _parse_yaml(text: str) -> Any:
    from columnhub import _yaml  # not for JSON specs: PyYAML takes 9 ms to import

    try:
        return _yaml.load(text)
    except _yaml.YAMLError as err:
        msg = f"the request is not valid YAML/JSON: {err}"
        raise SpecError(msg) from None


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        msg = f"the request is not valid JSON: {err}"
        raise SpecError(msg) from None


def _from_data(data: Any) -> Request | Samples:
    """One place that decides between a single request and several samples."""
    if _is_multi(data):
        return Samples.from_dict(data)
    return Request.from_dict(data)


def _is_multi(data: Any) -> bool:
    return isinstance(data, Mapping) and ("samples" in data or _is_fileset(data.get("dataset")))


#: fields that hold text of the user's own (column names, expressions, model
#: names), never paths: not looked into by :func:`rebase_paths`
_NOT_PATHS = frozenset({"columns", "define", "where", "models", "keys", "on"})


def rebase_paths(data: Any, base: str | os.PathLike[str]) -> Any:
    """A copy of request data with its relative local paths made relative to ``base``.

    Wherever it appears in the request (the primary dataset, friends, and any
    nesting of them such as several samples), a ``files`` entry (text, a list,
    or a mapping path -> tree as in a coffea fileset) and a ``registry`` are
    rebased, as is ``directory`` in an ``output``. URLs (``scheme://``),
    absolute paths and ``~`` paths are left as they are.

    >>> rebase_paths({"dataset": {"files": ["a.root", "/x/b.root"]}}, "/specs")
    {'dataset': {'files': ['/specs/a.root', '/x/b.root']}}
    """
    root = os.fspath(base)

    def one(value: Any) -> Any:
        if not isinstance(value, str) or not value.strip():
            return value
        if "://" in value or os.path.isabs(value) or value.startswith("~"):
            return value
        return os.path.normpath(os.path.join(root, value))

    def walk(node: Any, field: str | None) -> Any:
        if isinstance(node, list):
            return [walk(item, field) for item in node]
        if not isinstance(node, dict):
            return node
        out: dict[Any, Any] = {}
        for key, value in node.items():
            if key in _NOT_PATHS:
                out[key] = value
            elif key == "files":
                if isinstance(value, dict):
                    out[key] = {one(k): v for k, v in value.items()}
                elif isinstance(value, list):
                    out[key] = [one(v) for v in value]
                else:
                    out[key] = one(value)
            elif key == "registry" or (key == "directory" and field == "output"):
                out[key] = one(value)
            elif key == "dataset" and isinstance(value, str | list):
                out[key] = [one(f) for f in value] if isinstance(value, list) else one(value)
            elif isinstance(value, dict) and (
                key == "samples" or (key == "dataset" and _is_fileset(value))
            ):
                # a sample (or coffea fileset entry) given as its bare file list
                out[key] = {
                    k: [one(f) for f in v] if isinstance(v, list)
                    else one(v) if isinstance(v, str) and key == "samples"
                    else walk(v, k if isinstance(k, str) else None)
                    for k, v in value.items()
                }
            else:
                out[key] = walk(value, key if isinstance(key, str) else None)
        return out

    return walk(data, None)


def default_dataset_name(files: list[str]) -> str:
    """A dataset name derived from its files, for a dataset that gives none.

    The longest common beginning of the file names without their suffix
    (``dy_1.root``, ``dy_2.root`` -> ``dy``), else the name of the folder they
    share, else ``dataset``. Glob characters and URL queries are left out.

    >>> default_dataset_name(["data/dy_1.root", "data/dy_2.root"])
    'dy'
    >>> default_dataset_name(["mc/ttbar/a.root", "mc/ttbar/b.root"])
    'ttbar'
    >>> default_dataset_name(["root://eos.example//store/nano_dy.root?svcClass=x"])
    'nano_dy'
    """
    paths = [re.split(r"[?#]", f, maxsplit=1)[0].rstrip("/") for f in files]
    paths = [p.split("://", 1)[-1] for p in paths]
    stems = []
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        stem = name.split(".", 1)[0] if "." in name else name
        stems.append(re.split(r"[*?\[]", stem, maxsplit=1)[0])
    name = os.path.commonprefix(stems).rstrip("_-. ")  # noqa: RUF071 - a name prefix, not a path
    if name:
        return name
    parents = {p.rsplit("/", 1)[0] if "/" in p else "" for p in paths}
    if len(parents) == 1:
        folder = parents.pop().rstrip("/").rsplit("/", 1)[-1]
        if folder and folder not in (".", "..") and not re.search(r"[*?\[]", folder):
            return folder
    return "dataset"


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
