"""The ServiceX front door's own key: short-lived access tokens and per-transformation S3 keys.

One secret per service (``servicex_secret_file``, default
``state_dir/servicex.key``, made at first use with mode 0600; replicas point
at the same file) signs:

- the access tokens ``POST /token/refresh`` hands out: HS256 JWTs with
  ``exp``, naming the user, scopes and groups of the columnhub token (static
  or OIDC) the client sent as its refresh token;
- the object-store credentials of each transformation: the access key is the
  request id (the bucket), the secret key an HMAC of it, so a key pair reads
  that one transformation's results and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from columnhub.errors import AuthError, SpecError
from columnhub.service.auth import LEEWAY_S, Principal

__all__ = ["ISSUER", "ServiceKeys", "service_keys"]

#: ``iss`` and ``aud`` of the access tokens (tokens of any other issuer are not ours)
ISSUER = "columnhub:servicex"
_ALGORITHM = "HS256"
_MIN_SECRET_BYTES = 32
_LOCK = threading.Lock()


def _read_or_make(path: Path) -> bytes:
    """The secret in ``path``; a new random one (mode 0600) when the file does not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    secret = path.read_bytes().strip()
    if len(secret) < _MIN_SECRET_BYTES:
        msg = (
            f"servicex_secret_file {os.fspath(path)!r} holds {len(secret)} bytes; it needs at "
            f"least {_MIN_SECRET_BYTES} random bytes (remove it and the service makes one)"
        )
        raise SpecError(msg)
    return secret


class ServiceKeys:
    """Signs and checks the front door's access tokens and S3 credentials.

    Args:
        secret: the service's secret (at least 32 bytes).
        ttl_s: seconds an access token lasts.
    """

    def __init__(self, secret: bytes, *, ttl_s: float) -> None:
        self._secret = secret
        self.ttl_s = ttl_s

    def access_token(self, who: Principal) -> str:
        """A JWT for ``who`` that lasts :attr:`ttl_s` seconds."""
        import jwt

        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": ISSUER,
            "sub": who.user,
            "scope": " ".join(sorted(who.scopes)),
            "groups": sorted(who.groups),
            "iat": now,
            "exp": now + int(self.ttl_s),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def principal(self, token: str) -> Principal | None:
        """The caller of one of our access tokens; ``None`` for a token that is not ours.

        Raises:
            AuthError: one of ours that expired or whose signature is wrong.
        """
        import jwt

        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return None
        if header.get("alg") != _ALGORITHM or unverified.get("iss") != ISSUER:
            return None
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=ISSUER,
                issuer=ISSUER,
                leeway=LEEWAY_S,
                options={"require": ["exp", "sub", "iat"]},
            )
        except jwt.ExpiredSignatureError as err:
            msg = (
                "the ServiceX access token expired; the servicex client gets a new one from "
                "POST /token/refresh with its refresh token (the token in servicex.yaml)"
            )
            raise _unauthorized(msg) from err
        except jwt.PyJWTError as err:
            msg = (
                f"the ServiceX access token is not valid ({err}); get one from POST "
                "/token/refresh of this service with a columnhub token"
            )
            raise _unauthorized(msg) from err
        return Principal(
            user=str(claims["sub"]),
            scopes=frozenset(str(claims.get("scope", "")).split()),
            groups=frozenset(str(g) for g in claims.get("groups", [])),
        )

    def s3_credentials(self, request_id: str) -> tuple[str, str]:
        """``(access key, secret key)`` that read the results of one transformation."""
        secret = hmac.new(self._secret, b"s3:" + request_id.encode(), hashlib.sha256)
        return request_id, secret.hexdigest()


def _unauthorized(msg: str) -> AuthError:
    from columnhub.service.auth import _auth_error

    return _auth_error(msg)


def service_keys(app: Any) -> ServiceKeys:
    """The :class:`ServiceKeys` of an app (made at the first call, kept on ``app.state``)."""
    keys = getattr(app.state, "servicex_keys", None)
    if isinstance(keys, ServiceKeys):
        return keys
    with _LOCK:
        keys = getattr(app.state, "servicex_keys", None)
        if not isinstance(keys, ServiceKeys):
            config = app.state.config
            path = config.servicex_secret_file or config.state_dir / "servicex.key"
            keys = ServiceKeys(_read_or_make(Path(path)), ttl_s=config.servicex_token_ttl_s)
            app.state.servicex_keys = keys
    return keys
