"""The service's settings: :class:`ServiceConfig`, from a YAML file and command-line flags.

Every ``columnhub serve`` flag is also a key of the YAML config file (the
same name with ``_`` for ``-``); a flag given on the command line overrides
the file. Relative paths in a config *file* are relative to the file's folder,
so a config works from any working directory.

.. code-block:: yaml

    host: 0.0.0.0
    port: 8000
    scheduler: tcp://scheduler.facility:8786
    state_dir: /srv/columnhub
    database: postgresql+psycopg://columnhub@db/columnhub
    cache: /shared/columnhub/cache
    data_roots: [/store/user, /eos/cms/store]
    url_prefixes: [root://xrootd.facility//store/]
    oidc_issuer: https://auth.facility/realms/hep
    oidc_audience: columnhub
    max_active_requests_per_user: 8
    max_stored_bytes_per_user: 500G
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from columnhub import _yaml
from columnhub.errors import SpecError

__all__ = ["DEFAULT_STATE_DIR", "ServiceConfig", "load_config", "parse_duration"]

#: where the service keeps its database, results and cache unless told otherwise
DEFAULT_STATE_DIR = Path("~/.local/share/columnhub-service")

#: config keys that hold local paths (made relative to a config file's folder)
_PATH_KEYS = ("state_dir", "token_file", "data_roots", "cache", "models", "servicex_secret_file")

_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class ServiceConfig(BaseModel):
    """The settings of one service replica (immutable).

    Attributes:
        host: the address to listen on (loopback by default).
        port: the TCP port.
        scheduler: where deliveries run: ``None`` for a thread pool in the
            service process, ``"local"`` for a Dask ``LocalCluster`` the
            service starts (``workers`` processes), or a scheduler address.
        workers: part tasks at once (thread pool) or the ``LocalCluster``'s processes.
        state_dir: the service's own folder: results under
            ``state_dir/results/<job id>/``, the SQLite database and the cache by default.
        database: the SQLAlchemy URL of the request database (default SQLite
            in ``state_dir``; PostgreSQL for several replicas).
        cache: the column cache (a path or fsspec URL every worker sees;
            default ``state_dir/cache``).
        models: the model registry (never taken from a request).
        data_roots: the only local folders requests may read from (none: every
            local path is refused).
        url_prefixes: the only URL prefixes requests may read from.
        token_file: the static token file (YAML of sha256 hashes of tokens).
        oidc_issuer: the OIDC issuer whose access tokens are accepted.
        oidc_audience: the audience those tokens must name.
        oidc_groups_claim: a claim listing the user's groups, if any.
        oidc_scopes_claim: the claim listing the token's scopes.
        oidc_group_scopes: group -> the scopes its members get (with ``oidc_groups_claim``).
        oidc_user_claim: the claim naming the user (default ``sub``).
        max_active_requests_per_user: queued or running requests a user may
            have at once; one more is refused with HTTP 429.
        max_stored_bytes_per_user: bytes of results a user may hold; a new
            request beyond it is refused with HTTP 403 (``None``: no limit).
            YAML may give a size such as ``500G``.
        result_ttl: seconds a finished job's result is kept after it was last
            asked for (``None``, the default: kept for ever); then it is
            removed (``Runner`` sweep, or ``POST /api/v1/admin/sweep``) and an
            identical request runs the work again. YAML may give ``7d``,
            ``12h``, ``30m`` or ``90s``.
        runners: jobs this replica runs at once.
        lease_s: seconds a running job's claim lasts without a heartbeat
            (after a crash, another runner resumes it after this long).
        insecure_no_auth: allow a non-loopback ``host`` with no authentication.
        log_level: the server's log level.
        servicex_secret_file: the key the ServiceX front door signs its access
            tokens and object-store credentials with (default
            ``state_dir/servicex.key``, made at first use; replicas share one).
        servicex_token_ttl_s: seconds an access token of ``/token/refresh`` lasts.
        servicex_s3_endpoint: ``[https://]host:port/s3`` handed to ServiceX clients
            for downloads (default: the host they reached the service at, ``/s3``;
            ``https://`` behind a TLS proxy).
        servicex_resolvers: DID scheme (``rucio``, ``cernopendata``) -> its
            resolver: ``python:package.module:function`` (called with the DID,
            returns the files) or a command (run with the DID as its last
            argument, prints one file per line). See ``docs/servicex.md``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    scheduler: str | None = None
    workers: int | None = Field(default=None, ge=1)
    state_dir: Path = DEFAULT_STATE_DIR
    database: str = ""
    cache: str | None = None
    models: str | None = None
    data_roots: list[Path] = Field(default_factory=list)
    url_prefixes: list[str] = Field(default_factory=list)
    token_file: Path | None = None
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_groups_claim: str | None = None
    oidc_scopes_claim: str = "scope"
    oidc_group_scopes: dict[str, list[str]] = Field(default_factory=dict)
    oidc_user_claim: str = "sub"
    max_active_requests_per_user: int = Field(default=8, ge=1)
    max_stored_bytes_per_user: int | None = Field(default=None, ge=0)
    result_ttl: float | None = Field(default=None, gt=0)
    runners: int = Field(default=1, ge=1)
    lease_s: float = Field(default=30.0, gt=0)
    insecure_no_auth: bool = False
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    servicex_secret_file: Path | None = None
    servicex_token_ttl_s: float = Field(default=900.0, ge=120)
    servicex_s3_endpoint: str | None = None
    servicex_resolvers: dict[str, str] = Field(default_factory=dict)

    @field_validator("state_dir", "token_file", "servicex_secret_file", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(os.path.abspath(os.path.expanduser(value)))

    @field_validator("data_roots", mode="after")
    @classmethod
    def _expand_roots(cls, value: list[Path]) -> list[Path]:
        return [Path(os.path.abspath(os.path.expanduser(v))) for v in value]

    @field_validator("max_stored_bytes_per_user", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if isinstance(value, str):
            from columnhub.cli.cache import parse_size

            return parse_size(value)
        return value

    @field_validator("result_ttl", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_duration(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _defaults_in_state_dir(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        state = Path(os.path.abspath(os.path.expanduser(data.get("state_dir") or DEFAULT_STATE_DIR)))
        data = dict(data)
        if not data.get("database"):
            data["database"] = f"sqlite:///{state / 'columnhub.db'}"
        if not data.get("cache"):
            data["cache"] = os.fspath(state / "cache")
        elif "://" not in str(data["cache"]):
            data["cache"] = os.path.abspath(os.path.expanduser(os.fspath(data["cache"])))
        return data

    @model_validator(mode="after")
    def _check(self) -> ServiceConfig:
        if (self.oidc_issuer is None) != (self.oidc_audience is None):
            msg = (
                "oidc_issuer and oidc_audience go together: give both (--oidc-issuer URL "
                "--oidc-audience AUD) or neither"
            )
            raise ValueError(msg)
        if not self.auth_enabled and self.host not in _LOOPBACK and not self.insecure_no_auth:
            msg = (
                f"host {self.host!r} is not loopback and no authentication is configured: "
                "anyone who reaches it could read and submit as admin. Give a token_file "
                "(--token-file) or oidc_issuer/oidc_audience, or listen on 127.0.0.1, or "
                "accept the risk with --insecure-no-auth"
            )
            raise ValueError(msg)
        return self

    @property
    def auth_enabled(self) -> bool:
        """Whether callers must authenticate (a token file or an OIDC issuer is set)."""
        return self.token_file is not None or self.oidc_issuer is not None

    @property
    def results_dir(self) -> Path:
        """The folder holding each job's result, ``state_dir/results``."""
        return self.state_dir / "results"

    def result_directory(self, job_id: str) -> Path:
        """The result folder of one job: ``state_dir/results/<job id>``."""
        return self.results_dir / job_id


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> ServiceConfig:
    """The service configuration: the YAML file at ``path`` (if any), then ``overrides``.

    Args:
        path: a YAML config file whose keys are :class:`ServiceConfig` fields.
        **overrides: field values that replace the file's (command-line flags);
            ``None`` values are ignored (a flag not given). A list given here
            replaces the file's list.

    Raises:
        SpecError: the file is missing or not YAML, a key is unknown, or a
            value is invalid (the message names the key and what is allowed).
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read(Path(path))
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as err:
        raise SpecError(_describe(err, path)) from None


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        msg = f"service config file {str(path)!r} does not exist; give the path of a YAML file"
        raise SpecError(msg)
    try:
        data = _yaml.load(path.read_text())
    except _yaml.YAMLError as err:
        msg = f"service config file {str(path)!r} is not valid YAML: {err}"
        raise SpecError(msg) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        msg = (
            f"service config file {str(path)!r} must be a mapping of settings (key: value), "
            f"got a {type(data).__name__}"
        )
        raise SpecError(msg)
    base = path.resolve().parent
    for key in _PATH_KEYS:
        if key in data and data[key] is not None:
            data[key] = _rebase(data[key], base)
    return data


def _rebase(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_rebase(v, base) for v in value]
    if not isinstance(value, str) or "://" in value or value.startswith("~"):
        return value
    return os.fspath(base / value) if not os.path.isabs(value) else value


def _describe(err: ValidationError, path: str | os.PathLike[str] | None) -> str:
    where = f" (config file {os.fspath(path)!r} and flags)" if path is not None else ""
    allowed = ", ".join(ServiceConfig.model_fields)
    lines = [f"the service configuration is invalid{where}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            from columnhub.errors import closest

            near = closest(str(e["loc"][0]), ServiceConfig.model_fields, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            lines.append(f"  - {key}: unknown setting{hint} (settings: {allowed})")
        elif not e["loc"]:  # a check of several settings together
            lines.append(f"  - {str(e['msg']).removeprefix('Value error, ')}")
        else:
            message = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"  - {key}: {message} (got {e.get('input')!r})")
    return "\n".join(lines)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``7d``, ``12h``, ``30m``, ``90s`` or ``3600``.

    >>> parse_duration("7d"), parse_duration("1.5h"), parse_duration("90")
    (604800.0, 5400.0, 90.0)
    """
    raw = text.strip().lower()
    unit = raw[-1:] if raw[-1:] in _UNITS else "s"
    number = raw[:-1] if raw[-1:] in _UNITS else raw
    try:
        value = float(number)
    except ValueError:
        msg = (
            f"{text!r} is not a duration; give a number with a unit: s, m, h, d or w "
            "(e.g. 7d, 12h, 30m)"
        )
        raise ValueError(msg) from None
    return value * _UNITS[unit]
