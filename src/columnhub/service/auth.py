"""Who is calling the service: bearer tokens from a static token file or OIDC/JWT.

Two sources of identity, either or both:

- a **static token file** (an embedded, single-user or small start): YAML
  ``tokens: {<sha256 hex of the token>: {user: NAME, scopes: [read, submit],
  groups: [...]}}``. The file holds hashes, never plain tokens (a plain entry
  is refused with the command that hashes it); tokens are compared in
  constant time; the file is re-read when it changes (a revoked token stops
  working at once; a file broken by an edit refuses every token until fixed).
- **OIDC/JWT** access tokens from a facility's identity provider: the issuer's
  discovery document (``/.well-known/openid-configuration``) names its JWKS,
  which is fetched and cached; a token signed with a key id the cache lacks
  refetches it (rate-limited), so key rotation needs no restart. Signatures
  RS256 or ES256 only (never ``none``, never HMAC), the audience, issuer,
  expiry and not-before (30 s leeway) are checked. Scopes come from the
  ``scope`` claim (space separated) or ``scp`` (a list), and from a
  configured groups claim mapped to scopes.

Scopes are ``read``, ``submit`` and ``admin`` (``admin`` implies the others).
With neither source configured auth is off: every caller is ``anonymous``
with every scope.

FastAPI routes take the caller with ``user: Principal = Depends(principal("submit"))``;
the app keeps its :class:`Authenticator` on ``app.state.authenticator``. A
missing or invalid token is an :class:`~columnhub.errors.AuthError` (401), a
missing scope a :class:`~columnhub.errors.PermissionDeniedError` (403); the
app's error handler adds :func:`challenge_headers` (``WWW-Authenticate``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from columnhub.errors import AuthError, PermissionDeniedError, ServiceUnavailableError, SpecError

if TYPE_CHECKING:
    import jwt as _jwt

__all__ = [
    "ALGORITHMS",
    "ANONYMOUS",
    "LEEWAY_S",
    "SCOPES",
    "Authenticator",
    "OIDCVerifier",
    "Principal",
    "TokenFile",
    "challenge_headers",
    "hash_token",
    "principal",
]

#: the scopes of the service; ``admin`` implies the others.
SCOPES: tuple[str, ...] = ("read", "submit", "admin")
#: the signature algorithms accepted in OIDC tokens (asymmetric only).
ALGORITHMS: tuple[str, ...] = ("RS256", "ES256")
#: seconds of clock difference tolerated on ``exp`` and ``nbf``.
LEEWAY_S = 30.0
_REALM = "columnhub"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    Attributes:
        user: the user name (owner of the requests it submits).
        scopes: what it may do: a subset of :data:`SCOPES`.
        groups: the groups it belongs to (token file ``groups``, or the OIDC
            groups claim).
    """

    user: str
    scopes: frozenset[str]
    groups: frozenset[str] = field(default_factory=frozenset)

    @property
    def admin(self) -> bool:
        """True with the ``admin`` scope (sees and cancels every user's requests)."""
        return "admin" in self.scopes

    def has(self, scope: str) -> bool:
        """True when the caller holds ``scope`` (``admin`` holds every scope)."""
        return scope in self.scopes or self.admin

    def require(self, scope: str) -> None:
        """Raise :class:`~columnhub.errors.PermissionDeniedError` unless it holds ``scope``."""
        if not self.has(scope):
            held = ", ".join(sorted(self.scopes)) or "none"
            msg = (
                f"user {self.user!r} lacks the scope {scope!r} this call needs (it holds: "
                f"{held}); ask the service's operator for a token with the {scope!r} scope"
            )
            err = PermissionDeniedError(msg)
            err.__dict__["_challenge"] = ("insufficient_scope", msg, scope)
            raise err


#: the caller when auth is off: every scope.
ANONYMOUS = Principal(user="anonymous", scopes=frozenset(SCOPES))


def hash_token(token: str) -> str:
    """The SHA-256 hex digest a token file stores for ``token``.

    The same as ``printf %s TOKEN | sha256sum``.

    >>> hash_token("s3cret")[:16]
    '1ec1c26b50d5d3c5'
    """
    return hashlib.sha256(token.encode()).hexdigest()


def challenge_headers(err: BaseException) -> dict[str, str]:
    """The ``WWW-Authenticate`` header (RFC 6750) for an auth error, else ``{}``.

    A missing token gets a bare ``Bearer realm="columnhub"``; an invalid one
    ``error="invalid_token"``; a missing scope ``error="insufficient_scope"``
    and the scope.
    """
    challenge = getattr(err, "_challenge", None)
    if challenge is None:
        if isinstance(err, AuthError):
            challenge = ("invalid_token", str(err), None)
        else:
            return {}
    code, description, scope = challenge
    value = f'Bearer realm="{_REALM}"'
    if code:
        value += f', error="{code}", error_description="{_quoted(description)}"'
    if scope:
        value += f', scope="{scope}"'
    return {"WWW-Authenticate": value}


def _quoted(text: str) -> str:
    """``text`` safe inside a quoted header parameter (ASCII, no quotes or backslashes)."""
    clean = text.encode("ascii", "replace").decode().replace("\\", "/").replace('"', "'")
    clean = re.sub(r"[\x00-\x1f\x7f]", " ", clean)
    return clean if len(clean) <= 200 else clean[:197] + "..."


def _auth_error(msg: str, *, code: str | None = "invalid_token") -> AuthError:
    err = AuthError(msg)
    err.__dict__["_challenge"] = (code, msg, None)
    return err


def _scopes(values: Iterable[Any], *, where: str) -> frozenset[str]:
    found = frozenset(str(v) for v in values)
    unknown = sorted(found - set(SCOPES))
    if unknown:
        msg = f"{where}: unknown scopes {unknown}; the service's scopes are {list(SCOPES)}"
        raise SpecError(msg)
    return found


# -- static token file -----------------------------------------------------------


class TokenFile:
    """A YAML file of token hashes, re-read whenever it changes.

    Args:
        path: the file (``tokens: {<sha256 hex>: {user, scopes, groups}}``).

    Raises:
        SpecError: the file is missing, not YAML of that shape, or holds a
            plain token (the message says how to hash it).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stat: tuple[int, ...] | None = None
        self._digest = ""
        self._problem: str | None = None
        self._entries: list[tuple[str, Principal]] = []
        self._load(first=True)

    def lookup(self, token: str) -> Principal | None:
        """The principal of ``token``, or ``None`` if the file does not hold its hash.

        Every entry is compared (in constant time), whether or not one matched.

        Raises:
            ServiceUnavailableError: the file was changed into something unusable
                (every token is refused until it is fixed).
        """
        self._load(first=False)
        with self._lock:
            if self._problem is not None:
                raise ServiceUnavailableError(self._problem)
            entries = self._entries
        digest = hash_token(token)
        found: Principal | None = None
        for key, who in entries:
            if hmac.compare_digest(digest, key):
                found = who
        return found

    def _load(self, *, first: bool) -> None:
        try:
            st = self.path.stat()
            stat = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        except OSError as err:
            self._fail(f"token file {str(self.path)!r} cannot be read ({err})", first, err)
            return
        # racy-git rule: a change within the clock's granularity of the last
        # stat keeps the same times, so a young file is always read again
        if stat == self._stat and time.time_ns() - st.st_mtime_ns > 2_000_000_000:
            return
        try:
            data = self.path.read_bytes()
        except OSError as err:
            self._fail(f"token file {str(self.path)!r} cannot be read ({err})", first, err)
            return
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest and self._problem is None:
            self._stat = stat
            return
        try:
            entries = self._parse(data)
        except SpecError as err:
            self._fail(str(err), first, err)
            return
        with self._lock:
            self._entries, self._stat, self._digest, self._problem = entries, stat, digest, None

    def _fail(self, problem: str, first: bool, err: Exception) -> None:
        if first:
            raise SpecError(problem) from err
        with self._lock:  # fail closed: a broken edit must not leave revoked tokens valid
            self._problem = (
                f"the service's token file is unusable, so every token is refused until an "
                f"operator fixes it: {problem}"
            )
            self._stat = None

    def _parse(self, data: bytes) -> list[tuple[str, Principal]]:
        from columnhub import _yaml

        where = f"token file {str(self.path)!r}"
        try:
            doc = _yaml.load(data)
        except _yaml.YAMLError as err:
            msg = f"{where} is not valid YAML ({err})"
            raise SpecError(msg) from err
        tokens = doc.get("tokens") if isinstance(doc, Mapping) else None
        if not isinstance(tokens, Mapping):
            msg = (
                f"{where} must hold a mapping 'tokens: {{<sha256 hex of a token>: "
                "{user: NAME, scopes: [read, submit]}}'"
            )
            raise SpecError(msg)
        entries: list[tuple[str, Principal]] = []
        for raw, value in tokens.items():
            key = f"{raw:064d}" if isinstance(raw, int) else str(raw).strip().lower()
            if not _HEX64.match(key):
                shown = key[:4] + "..." if len(key) > 4 else "..."
                msg = (
                    f"{where}: the entry {shown!r} is not the SHA-256 hex digest of a token: "
                    "the file holds hashes, never plain tokens. Replace the entry by the "
                    "token's hash: printf %s 'TOKEN' | sha256sum, or python -c "
                    '"import hashlib,sys; print(hashlib.sha256(sys.argv[1].encode())'
                    ".hexdigest())\" 'TOKEN'"
                )
                raise SpecError(msg)
            short = f"{where}: entry {key[:8]}..."
            if not isinstance(value, Mapping) or not isinstance(value.get("user"), str):
                msg = f"{short} needs a mapping with 'user' (a name) and 'scopes' (a list)"
                raise SpecError(msg)
            user = value["user"].strip()
            scopes = value.get("scopes", [])
            groups = value.get("groups", [])
            if not user or not isinstance(scopes, list) or not isinstance(groups, list):
                msg = f"{short}: 'user' must be a non-empty name, 'scopes' and 'groups' lists"
                raise SpecError(msg)
            extra = sorted(set(value) - {"user", "scopes", "groups"})
            if extra:
                msg = f"{short}: unknown fields {extra}; allowed: user, scopes, groups"
                raise SpecError(msg)
            who = Principal(
                user=user,
                scopes=_scopes(scopes, where=short),
                groups=frozenset(str(g) for g in groups),
            )
            entries.append((key, who))
        return entries


# -- OIDC / JWT ----------------------------------------------------------------------


def _check_https(url: str, *, what: str) -> None:
    parts = urlsplit(url)
    loopback = (parts.hostname or "") in _LOOPBACK
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        msg = f"{what} {url!r} must be an https:// URL (plain http:// only on loopback)"
        raise SpecError(msg)


class OIDCVerifier:
    """Validates OIDC/JWT access tokens of one issuer.

    Args:
        issuer: the issuer URL (https; http only on loopback).
        audience: the audience tokens must be issued for (this service).
        scopes_claim: the claim with space-separated scopes (also ``scp``, a list).
        groups_claim: a claim with the caller's groups, or ``None``.
        group_scopes: group name -> the scopes its members get.
        user_claim: the claim naming the user (``sub`` by default: stable and
            unique at the issuer; ``preferred_username`` can be reassigned).
        leeway: seconds of clock difference tolerated on ``exp``/``nbf``.
        algorithms: accepted signature algorithms (a subset of :data:`ALGORITHMS`).
        jwks_refetch_s: at most one JWKS fetch per this many seconds for
            tokens with an unknown key id.
        jwks_max_age_s: the JWKS is fetched again after this long (keys the
            issuer removed stop verifying).
        timeout: seconds to wait for the issuer.
    """

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        scopes_claim: str = "scope",
        groups_claim: str | None = None,
        group_scopes: Mapping[str, Iterable[str]] | None = None,
        user_claim: str = "sub",
        leeway: float = LEEWAY_S,
        algorithms: Iterable[str] = ALGORITHMS,
        jwks_refetch_s: float = 30.0,
        jwks_max_age_s: float = 3600.0,
        timeout: float = 10.0,
    ) -> None:
        _check_https(issuer, what="OIDC issuer")
        if not audience:
            msg = (
                "an OIDC issuer needs an audience (--oidc-audience): without it a token "
                "issued for any other service would be accepted"
            )
            raise SpecError(msg)
        self.algorithms = tuple(algorithms)
        bad = sorted(set(self.algorithms) - set(ALGORITHMS))
        if bad:
            msg = f"OIDC algorithms {bad} are not accepted; choose among {list(ALGORITHMS)}"
            raise SpecError(msg)
        self.issuer = issuer
        self.audience = audience
        self.scopes_claim = scopes_claim
        self.groups_claim = groups_claim
        self.group_scopes = {
            str(g): _scopes(s, where=f"OIDC group {g!r}") for g, s in (group_scopes or {}).items()
        }
        self.user_claim = user_claim
        self.leeway = leeway
        self.jwks_refetch_s = jwks_refetch_s
        self.jwks_max_age_s = jwks_max_age_s
        self.timeout = timeout
        self.jwks_fetches = 0
        self._lock = threading.Lock()
        self._jwks_uri: str | None = None
        self._issuer_exact = issuer
        self._keys: dict[str | None, _jwt.PyJWK] | None = None
        self._fetched_at = float("-inf")

    # -- the issuer's documents -----------------------------------------------------

    def _get_json(self, url: str, *, what: str) -> Any:
        import httpx

        try:
            response = httpx.get(url, timeout=self.timeout, follow_redirects=False)
        except httpx.HTTPError as err:
            msg = (
                f"the OIDC issuer's {what} {url!r} cannot be fetched ({err}); tokens cannot be "
                "checked until it answers"
            )
            raise ServiceUnavailableError(msg) from err
        if response.status_code != 200:
            msg = f"the OIDC issuer's {what} {url!r} answered HTTP {response.status_code}"
            raise ServiceUnavailableError(msg)
        try:
            return response.json()
        except ValueError as err:
            msg = f"the OIDC issuer's {what} {url!r} is not JSON"
            raise ServiceUnavailableError(msg) from err

    def _discover(self) -> str:
        if self._jwks_uri is not None:
            return self._jwks_uri
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = self._get_json(url, what="discovery document")
        if not isinstance(doc, Mapping) or not isinstance(doc.get("jwks_uri"), str):
            msg = f"the OIDC discovery document {url!r} names no jwks_uri"
            raise ServiceUnavailableError(msg)
        issuer = doc.get("issuer")
        if not isinstance(issuer, str) or issuer.rstrip("/") != self.issuer.rstrip("/"):
            msg = (
                f"the OIDC discovery document {url!r} is for the issuer {issuer!r}, not the "
                f"configured {self.issuer!r}; fix --oidc-issuer"
            )
            raise ServiceUnavailableError(msg)
        jwks_uri = str(doc["jwks_uri"])
        try:
            _check_https(jwks_uri, what="the issuer's jwks_uri")
        except SpecError as err:
            raise ServiceUnavailableError(str(err)) from err
        self._issuer_exact = issuer
        self._jwks_uri = jwks_uri
        return jwks_uri

    def _fetch_keys(self) -> None:
        import jwt

        self._fetched_at = time.monotonic()  # failures are rate-limited too
        try:
            uri = self._discover()
        except ServiceUnavailableError:
            self._jwks_uri = None
            raise
        self.jwks_fetches += 1
        doc = self._get_json(uri, what="JWKS")
        if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
            msg = f"the OIDC issuer's JWKS {uri!r} holds no 'keys' list"
            raise ServiceUnavailableError(msg)
        keys: dict[str | None, jwt.PyJWK] = {}
        for data in doc["keys"]:
            if not isinstance(data, dict) or data.get("use", "sig") != "sig":
                continue
            if data.get("kty") not in ("RSA", "EC"):
                continue  # no symmetric ('oct') keys, ever
            try:
                key = jwt.PyJWK(data)
            except jwt.PyJWTError:
                continue  # a key of a kind this service does not accept
            if key.algorithm_name in self.algorithms:
                keys[data.get("kid")] = key
        self._keys = keys

    def _key(self, kid: str | None) -> _jwt.PyJWK:
        with self._lock:
            now = time.monotonic()
            if self._keys is None:
                self._fetch_keys()
            elif now - self._fetched_at > self.jwks_max_age_s:
                try:
                    self._fetch_keys()  # the periodic refresh: removed keys stop verifying
                except ServiceUnavailableError:
                    # the issuer is down: keep the cached keys, try again soon
                    self._fetched_at = now - self.jwks_max_age_s + self.jwks_refetch_s
            assert self._keys is not None
            key = self._pick(kid)
            if key is None and now - self._fetched_at >= self.jwks_refetch_s:
                self._fetch_keys()  # key rotation: the issuer may have a new key
                key = self._pick(kid)
            if key is None:
                known = sorted(str(k) for k in self._keys)
                msg = (
                    f"the token is signed with the key id {kid!r}, which the issuer "
                    f"{self.issuer!r} does not publish (its keys: {known}); get a new token"
                )
                raise _auth_error(msg)
            return key

    def _pick(self, kid: str | None) -> _jwt.PyJWK | None:
        assert self._keys is not None
        if kid is not None:
            return self._keys.get(kid)
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    # -- tokens ---------------------------------------------------------------------

    def verify(self, token: str) -> Principal:
        """The principal of a valid token.

        Raises:
            AuthError: the token is not valid (the message says why).
            ServiceUnavailableError: the issuer cannot be reached to get its keys.
        """
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as err:
            msg = f"the bearer token is not a valid JWT ({err}); send an access token"
            raise _auth_error(msg) from err
        alg = header.get("alg")
        if alg not in self.algorithms:
            msg = (
                f"the token's signature algorithm {alg!r} is not accepted; the service "
                f"accepts {list(self.algorithms)} signed with the issuer's published keys"
            )
            raise _auth_error(msg)
        kid = header.get("kid")
        key = self._key(kid if isinstance(kid, str) else None)
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=self._issuer_exact,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as err:
            raise _auth_error(self._explain(err, token)) from err
        return self._principal(claims)

    def _explain(self, err: Exception, token: str) -> str:
        import jwt

        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            claims = {}

        def when(name: str) -> str:
            value = claims.get(name)
            if not isinstance(value, int | float):
                return "?"
            return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")

        now = datetime.now(UTC).isoformat(timespec="seconds")
        if isinstance(err, jwt.ExpiredSignatureError):
            return (
                f"the token expired at {when('exp')} (now {now}, leeway {self.leeway:g} s); "
                "get a new token"
            )
        if isinstance(err, jwt.ImmatureSignatureError):
            return (
                f"the token is not valid before {when('nbf' if 'nbf' in claims else 'iat')} "
                f"(now {now}, leeway "
                f"{self.leeway:g} s); check the clocks or wait"
            )
        if isinstance(err, jwt.InvalidAudienceError):
            return (
                f"the token is for the audience {claims.get('aud')!r}, not this service "
                f"({self.audience!r}); get a token for {self.audience!r}"
            )
        if isinstance(err, jwt.InvalidIssuerError):
            return (
                f"the token is from the issuer {claims.get('iss')!r}; this service accepts "
                f"tokens of {self._issuer_exact!r} only"
            )
        if isinstance(err, jwt.InvalidSignatureError):
            return "the token's signature does not verify with the issuer's key; get a new token"
        if isinstance(err, jwt.MissingRequiredClaimError):
            return f"the token lacks the {err.claim!r} claim; get an access token of the issuer"
        return f"the token is not valid ({err}); get a new token"

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        user = claims.get(self.user_claim)
        if not isinstance(user, str) or not user:
            msg = f"the token has no {self.user_claim!r} claim naming the user"
            raise _auth_error(msg)
        granted: set[str] = set()
        for name in dict.fromkeys((self.scopes_claim, "scp")):
            value = claims.get(name)
            if isinstance(value, str):
                granted.update(value.split())
            elif isinstance(value, list):
                granted.update(v for v in value if isinstance(v, str))
        groups: frozenset[str] = frozenset()
        if self.groups_claim is not None:
            value = claims.get(self.groups_claim)
            if isinstance(value, str):
                value = [value]
            if isinstance(value, list):
                groups = frozenset(v for v in value if isinstance(v, str))
            for group in groups:
                granted.update(self.group_scopes.get(group, ()))
        return Principal(user=user, scopes=frozenset(granted & set(SCOPES)), groups=groups)


# -- the authenticator ---------------------------------------------------------------


class Authenticator:
    """Turns an ``Authorization`` header into a :class:`Principal`.

    Args:
        token_file: a static token file, or ``None``.
        oidc: an OIDC verifier, or ``None``. With neither, auth is off.
    """

    def __init__(
        self, *, token_file: TokenFile | None = None, oidc: OIDCVerifier | None = None
    ) -> None:
        self.token_file = token_file
        self.oidc = oidc

    @classmethod
    def from_config(cls, config: Any) -> Authenticator:
        """The authenticator a :class:`~columnhub.service.config.ServiceConfig` describes.

        Reads ``token_file``, ``oidc_issuer``, ``oidc_audience``,
        ``oidc_scopes_claim``, ``oidc_groups_claim``, ``oidc_group_scopes``
        (group -> scopes) and ``oidc_user_claim``.

        Raises:
            SpecError: an unusable token file, an issuer without an audience, ...
        """
        path = getattr(config, "token_file", None)
        issuer = getattr(config, "oidc_issuer", None)
        oidc = None
        if issuer:
            oidc = OIDCVerifier(
                issuer,
                getattr(config, "oidc_audience", None) or "",
                scopes_claim=getattr(config, "oidc_scopes_claim", None) or "scope",
                groups_claim=getattr(config, "oidc_groups_claim", None),
                group_scopes=getattr(config, "oidc_group_scopes", None) or {},
                user_claim=getattr(config, "oidc_user_claim", None) or "sub",
            )
        return cls(token_file=TokenFile(path) if path else None, oidc=oidc)

    @property
    def enabled(self) -> bool:
        """False when auth is off (every caller is :data:`ANONYMOUS`)."""
        return self.token_file is not None or self.oidc is not None

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller named by an ``Authorization: Bearer <token>`` header value.

        Raises:
            AuthError: no token, another scheme, or a token that is not valid.
            ServiceUnavailableError: the token file is broken or the issuer unreachable.
        """
        if not self.enabled:
            return ANONYMOUS
        if not authorization or not authorization.strip():
            msg = "this call needs a token: send the header 'Authorization: Bearer <token>'"
            raise _auth_error(msg, code=None)
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            msg = (
                f"the Authorization header uses the scheme {scheme!r}; the service accepts "
                "only 'Authorization: Bearer <token>'"
            )
            raise _auth_error(msg, code="invalid_request")
        jwt_shaped = self.oidc is not None and token.count(".") == 2
        if self.token_file is not None:
            try:
                found = self.token_file.lookup(token)
            except ServiceUnavailableError:
                if not jwt_shaped:  # a broken token file does not lock OIDC users out
                    raise
                found = None
            if found is not None:
                return found
        if self.oidc is not None and jwt_shaped:
            return self.oidc.verify(token)
        accepted = []
        if self.token_file is not None:
            accepted.append("a token of its token file")
        if self.oidc is not None:
            accepted.append(f"an OIDC access token of {self.oidc.issuer!r}")
        msg = f"the bearer token is not valid; the service accepts {' or '.join(accepted)}"
        raise _auth_error(msg)


def principal(scope: str) -> Callable[..., Principal]:
    """A FastAPI dependency giving the caller, who must hold ``scope``.

    ``user: Principal = Depends(principal("submit"))``. It reads the
    :class:`Authenticator` from ``app.state.authenticator`` (one with no sources:
    auth is off; none at all is a programming error, never an open door).

    Raises:
        SpecError: ``scope`` is not one of :data:`SCOPES` (a programming error).
    """
    if scope not in SCOPES:
        msg = f"unknown scope {scope!r}; the service's scopes are {list(SCOPES)}"
        raise SpecError(msg)
    from fastapi import Request, Security
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    bearer = HTTPBearer(auto_error=False, description=f"needs the {scope!r} scope")

    credentials_default = Security(bearer)  # only for OpenAPI's "Authorize" (/docs)

    def dependency(request: Any, credentials: Any = credentials_default) -> Principal:
        authenticator = getattr(request.app.state, "authenticator", None)
        if not isinstance(authenticator, Authenticator):  # fail closed, never open
            msg = (
                "app.state.authenticator is not an Authenticator: the app must set one "
                "(Authenticator() with no sources is auth off)"
            )
            raise TypeError(msg)
        who = authenticator.authenticate(request.headers.get("authorization"))
        who.require(scope)
        return who

    # FastAPI reads the annotations; fastapi is imported only here (lazily)
    dependency.__annotations__ = {
        "request": Request,
        "credentials": HTTPAuthorizationCredentials | None,
        "return": Principal,
    }
    return dependency
