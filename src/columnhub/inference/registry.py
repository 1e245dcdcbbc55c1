"""Model cards and the model registry (a directory of YAML cards).

A *model card* describes one version of one model: its file (ONNX or XGBoost
JSON, relative to the card), its granularity (one row per event, or one row per
object of a collection such as ``Jet``), its inputs as column expressions, its
outputs, and optionally the inference servers that host it. The registry finds
every card under a directory and hands out :class:`ModelCard` objects, which are
frozen, picklable and carry the hashes the column cache keys on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from columnhub import _yaml
from columnhub.errors import ModelError, ModelNotFoundError, closest

__all__ = [
    "CARD_SUFFIXES",
    "ModelCard",
    "ModelOutput",
    "ModelRegistry",
    "RemoteConfig",
    "file_sha256",
    "load_card",
]

#: File name suffixes the registry reads as model cards.
CARD_SUFFIXES = (".yaml", ".yml")

OutputType = Literal["float32", "float64", "int32", "int64", "bool"]


class ModelOutput(BaseModel):
    """One output column of a model.

    Attributes:
        name: the column name the output is delivered under.
        type: the column's type (values are cast to it).
        tensor: the model's output tensor holding it (default: ``name``; for
            XGBoost and single-output models any value, the only output is used).
        index: column of a 2-D output tensor (e.g. one class of a classifier);
            ``None`` for a 1-D tensor or an ``(n, 1)`` tensor.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    type: OutputType = "float32"
    tensor: str | None = None
    index: int | None = Field(default=None, ge=0)


class RemoteConfig(BaseModel):
    """Where a model is served (Triton / KServe v2) and how to call it.

    Attributes:
        servers: server addresses, ``host:port`` (a scheme such as ``http://`` or
            ``grpc://`` is accepted and ignored).
        protocol: ``http`` or ``grpc``.
        model_name: the model's name on the server.
        model_version: the explicit version to call (``""`` would let the server
            choose, which is refused: results must be reproducible).
        timeout_s: time limit of one request (connection and answer).
        retries: how many times a failed batch is sent again, to another server
            when one is healthy.
        backoff_ms: first wait before a retry; doubles on each retry.
        max_in_flight: requests in flight at once, over all servers.
        max_batch_rows: upper bound on rows per request (the server's
            ``max_batch_size`` bounds it too).
        max_batch_bytes: upper bound on input bytes per request.
        fallback_local: when every server fails, compute with the local backend
            (the card's ``file``) instead of raising.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    servers: tuple[str, ...] = Field(min_length=1)
    protocol: Literal["http", "grpc"] = "http"
    model_name: str = Field(min_length=1)
    model_version: str = Field(min_length=1)
    timeout_s: float = Field(default=30.0, gt=0)
    retries: int = Field(default=3, ge=0)
    backoff_ms: float = Field(default=10.0, ge=0)
    max_in_flight: int = Field(default=4, ge=1)
    max_batch_rows: int = Field(default=65536, ge=1)
    max_batch_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    fallback_local: bool = False

    @field_validator("model_version", mode="before")
    @classmethod
    def _version_to_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @field_validator("servers", mode="before")
    @classmethod
    def _one_server(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value


class ModelCard(BaseModel):
    """One version of one model, as the registry resolved it.

    Build it with :func:`load_card` or :meth:`ModelRegistry.get`; the resolved
    fields (``path``, ``file_sha256``, ``card_sha256``) are filled there.

    Attributes:
        name: model name.
        version: model version (a string; YAML integers are converted).
        file: model file as written in the card, relative to the card.
        format: ``onnx`` or ``xgboost`` (default: from the file suffix).
        granularity: ``event`` (one row per event) or ``object`` (one row per
            object of ``collection``).
        collection: the collection for ``object`` granularity, e.g. ``Jet``.
        inputs: input column expressions, in the model's feature order.
        outputs: output columns.
        remote: servers hosting the model, or ``None`` for local only.
        description: free text.
        path: absolute path of the model file.
        file_sha256: SHA-256 of the model file.
        card_sha256: SHA-256 of the model file hash and the card's content.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    file: str = Field(min_length=1)
    format: Literal["onnx", "xgboost"] | None = None
    granularity: Literal["event", "object"] = "event"
    collection: str | None = None
    inputs: list[str] = Field(min_length=1)
    outputs: list[ModelOutput] = Field(min_length=1)
    remote: RemoteConfig | None = None
    description: str = ""
    path: Path | None = None
    file_sha256: str = ""
    card_sha256: str = ""

    @field_validator("version", mode="before")
    @classmethod
    def _version_to_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _check(self) -> ModelCard:
        if self.granularity == "object" and not self.collection:
            msg = (
                f"model {self.name!r} version {self.version!r}: granularity 'object' needs "
                "'collection' (e.g. collection: Jet)"
            )
            raise ValueError(msg)
        if self.granularity == "event" and self.collection:
            msg = (
                f"model {self.name!r} version {self.version!r}: 'collection' "
                f"({self.collection!r}) is only allowed with granularity 'object'"
            )
            raise ValueError(msg)
        names = [o.name for o in self.outputs]
        if len(set(names)) != len(names):
            msg = f"model {self.name!r}: output names must be unique, got {names}"
            raise ValueError(msg)
        if self.format is None:
            suffix = Path(self.file).suffix.lower()
            fmt = {".onnx": "onnx", ".json": "xgboost", ".ubj": "xgboost"}.get(suffix)
            if fmt is None:
                msg = (
                    f"model {self.name!r}: cannot tell the format of {self.file!r}; "
                    "use a .onnx or .json file or set 'format: onnx|xgboost'"
                )
                raise ValueError(msg)
            object.__setattr__(self, "format", fmt)
        return self

    @property
    def model_format(self) -> Literal["onnx", "xgboost"]:
        """The model file's format (``onnx`` or ``xgboost``)."""
        return self.format or "onnx"

    @property
    def output_names(self) -> list[str]:
        """The output column names, in card order."""
        return [o.name for o in self.outputs]

    @property
    def identity(self) -> str:
        """A stable string naming exactly this model and how it is fed.

        It changes when the model file, the inputs, the outputs or anything
        else in the card changes; the column cache keys on it.
        """
        return (
            f"model:{self.name}@{self.version}"
            f";file={self.file_sha256}"
            f";card={self.card_sha256}"
            f";inputs={json.dumps(self.inputs)}"
        )

    def model_path(self) -> Path:
        """The model file's absolute path.

        Raises:
            ModelError: the card was built without a resolved path.
        """
        if self.path is None:
            msg = (
                f"model {self.name!r} version {self.version!r} has no resolved file path; "
                "load cards with ModelRegistry(path).get(...) or load_card(path)"
            )
            raise ModelError(msg)
        return self.path


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 hex digest of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read and validate one YAML model card.

    Args:
        path: the card file.

    Returns:
        The card with its model file resolved and hashed.

    Raises:
        ModelError: the card is not valid YAML, misses fields or names a model
            file that does not exist.
    """
    card_path = Path(path).resolve()
    try:
        text = card_path.read_text()
        document = _yaml.load(text)
    except (OSError, _yaml.YAMLError) as err:
        msg = f"cannot read model card {str(card_path)!r}: {err}"
        raise ModelError(msg) from err
    if not isinstance(document, dict):
        msg = f"model card {str(card_path)!r} must be a YAML mapping, got {type(document).__name__}"
        raise ModelError(msg)
    for resolved in ("path", "file_sha256", "card_sha256"):
        if resolved in document:
            msg = (
                f"model card {str(card_path)!r}: {resolved!r} is computed, remove it from the card"
            )
            raise ModelError(msg)
    try:
        card = ModelCard.model_validate(document)
    except ValidationError as err:
        msg = f"invalid model card {str(card_path)!r}:\n{err}"
        raise ModelError(msg) from err
    model_path = (card_path.parent / card.file).resolve()
    if not model_path.is_file():
        msg = (
            f"model card {str(card_path)!r} names file {card.file!r}, "
            f"but {str(model_path)!r} does not exist; the path is relative to the card"
        )
        raise ModelError(msg)
    fhash = file_sha256(model_path)
    canonical = json.dumps(card.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    chash = hashlib.sha256(f"{fhash}\n{canonical}".encode()).hexdigest()
    return card.model_copy(update={"path": model_path, "file_sha256": fhash, "card_sha256": chash})


def _version_key(version: str) -> tuple[int, int | str]:
    return (1, int(version)) if version.isdigit() else (0, version)


class ModelRegistry:
    """A directory of model cards (``*.yaml``/``*.yml``, at any depth).

    The directory is scanned on each :meth:`get` (cheap for the tens of cards a
    registry holds), so cards added later are found. Only the path is stored:
    the object pickles to workers.

    Args:
        path: the registry directory.

    Raises:
        ModelError: the directory does not exist.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            msg = f"model registry {str(self.path)!r} is not a directory; create it or fix the path"
            raise ModelError(msg)

    def __repr__(self) -> str:
        return f"ModelRegistry({str(self.path)!r})"

    def _card_files(self) -> Iterator[Path]:
        for p in sorted(self.path.rglob("*")):
            if p.suffix.lower() in CARD_SUFFIXES and p.is_file():
                yield p

    def _index(self) -> dict[tuple[str, str], Path]:
        index: dict[tuple[str, str], Path] = {}
        for p in self._card_files():
            try:
                document = _yaml.load(p.read_text())
            except (OSError, _yaml.YAMLError) as err:
                msg = f"cannot read model card {str(p)!r}: {err}"
                raise ModelError(msg) from err
            if not isinstance(document, dict) or "name" not in document:
                continue
            key = (str(document["name"]), str(document.get("version", "")))
            if key in index:
                msg = (
                    f"model {key[0]!r} version {key[1]!r} is defined twice: "
                    f"{str(index[key])!r} and {str(p)!r}; remove one"
                )
                raise ModelError(msg)
            index[key] = p
        return index

    def models(self) -> dict[str, list[str]]:
        """Every model name with its versions (sorted, numeric versions by value)."""
        out: dict[str, list[str]] = {}
        for name, version in self._index():
            out.setdefault(name, []).append(version)
        return {n: sorted(v, key=_version_key) for n, v in sorted(out.items())}

    def get(self, name: str, version: str | int) -> ModelCard:
        """The card of model ``name`` at ``version``.

        Args:
            name: model name.
            version: model version (an explicit one: results must be reproducible).

        Raises:
            ModelNotFoundError: no such model or version; the message lists the
                registry's models (closest names first) or the model's versions.
        """
        version = str(version)
        index = self._index()
        if (name, version) in index:
            return load_card(index[(name, version)])
        available = self.models()
        if name not in available:
            near = closest(name, available)
            listing = ", ".join(f"{n} ({', '.join(v)})" for n, v in available.items()) or "none"
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            msg = (
                f"model {name!r} is not in registry {str(self.path)!r}{hint} "
                f"The registry has: {listing}"
            )
            raise ModelNotFoundError(msg)
        msg = (
            f"model {name!r} has no version {version!r} in registry {str(self.path)!r}; "
            f"available versions: {', '.join(available[name])}"
        )
        raise ModelNotFoundError(msg)
