"""Service auth: real signed JWTs against a real JWKS on loopback, and the static token file.

The identity provider is a real HTTP server thread on loopback serving a
discovery document and a JWKS built from RSA and EC keys generated here;
tokens are signed with those keys by PyJWT (or, for the forgeries PyJWT
refuses to make, by hand). The FastAPI app is a small one built here around
``principal(...)``, with the error handling the service app uses.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from columnhub.errors import (
    AuthError,
    PermissionDeniedError,
    ServiceError,
    ServiceUnavailableError,
    SpecError,
)
from columnhub.service.auth import (
    ANONYMOUS,
    SCOPES,
    Authenticator,
    OIDCVerifier,
    Principal,
    TokenFile,
    challenge_headers,
    hash_token,
    principal,
)

pytestmark = pytest.mark.service

AUDIENCE = "columnhub-test"


# ---------------------------------------------------------------------------
# a real identity provider on loopback


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if self.alg == "RS256":
            data = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
            data["alg"] = "RS256"  # the RSA key names its algorithm, the EC one does not
        else:
            data = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        data.update(kid=self.kid, use="sig")
        return data

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


@dataclass
class IdP:
    """The issuer: ``.keys`` is what its JWKS publishes (tests swap it)."""

    url: str = ""
    keys: list[SigningKey] = field(default_factory=list)
    jwks_hits: int = 0
    discovery_issuer: str | None = None
    down: bool = False  # answer 503 to everything

    def token(
        self,
        key: SigningKey | None = None,
        *,
        kid: str | None = None,
        **claims: Any,
    ) -> str:
        key = key or self.keys[0]
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "alice",
            "iat": now,
            "exp": now + 300,
            "scope": "openid read submit",
        }
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key.private, algorithm=key.alg, headers={"kid": kid or key.kid})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    """A JWT put together by hand (PyJWT refuses to make these)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = sign(signing_input.encode()) if sign is not None else b""
    return f"{signing_input}.{_b64(signature)}"


@pytest.fixture(scope="module")
def module_keys() -> dict[str, SigningKey]:
    return {"rsa1": rsa_key("rsa1"), "ec1": ec_key("ec1"), "rsa2": rsa_key("rsa2")}


@pytest.fixture
def idp(module_keys: dict[str, SigningKey]) -> Iterator[IdP]:
    state = IdP(keys=[module_keys["rsa1"], module_keys["ec1"]])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if state.down:
                self.send_error(503)
                return
            if self.path == "/realm/.well-known/openid-configuration":
                body = {
                    "issuer": state.discovery_issuer or state.url,
                    "jwks_uri": state.url + "/jwks",
                }
            elif self.path == "/realm/jwks":
                state.jwks_hits += 1
                body = {"keys": [k.jwk() for k in state.keys]}
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/realm"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def verifier(idp: IdP, **options: Any) -> OIDCVerifier:
    options.setdefault("jwks_refetch_s", 0.0)
    return OIDCVerifier(idp.url, AUDIENCE, **options)


# ---------------------------------------------------------------------------
# OIDC / JWT


@pytest.mark.parametrize("which", ["rsa1", "ec1"])
def test_valid_token_gives_user_and_scopes(idp: IdP, which: str) -> None:
    key = next(k for k in idp.keys if k.kid == which)
    who = verifier(idp).verify(idp.token(key))
    assert who == Principal("alice", frozenset({"read", "submit"}))
    assert not who.admin


@pytest.mark.parametrize(
    ("claims", "words"),
    [
        ({"exp": -120}, "expired"),
        ({"nbf": 120}, "not valid before"),
        ({"exp": None}, "'exp'"),
    ],
)
def test_expired_and_not_yet_valid_are_refused(
    idp: IdP, claims: dict[str, Any], words: str
) -> None:
    now = int(time.time())
    claims = {k: (None if v is None else now + v) for k, v in claims.items()}
    with pytest.raises(AuthError, match=words):
        verifier(idp).verify(idp.token(**claims))


def test_leeway_accepts_small_clock_differences(idp: IdP) -> None:
    now = int(time.time())
    v = verifier(idp)
    assert v.verify(idp.token(exp=now - 10)).user == "alice"  # expired 10 s ago: within 30 s
    assert v.verify(idp.token(nbf=now + 10)).user == "alice"  # valid in 10 s
    with pytest.raises(AuthError, match="expired"):
        v.verify(idp.token(exp=now - 45))  # beyond the leeway


def test_wrong_audience_and_issuer_are_refused(idp: IdP) -> None:
    v = verifier(idp)
    with pytest.raises(AuthError, match="audience 'another-service'"):
        v.verify(idp.token(aud="another-service"))
    with pytest.raises(AuthError, match=r"issuer 'https://evil\.example/realm'"):
        v.verify(idp.token(iss="https://evil.example/realm"))
    with pytest.raises(AuthError, match="'aud'"):
        v.verify(idp.token(aud=None))


def test_bad_signature_is_refused(idp: IdP, module_keys: dict[str, SigningKey]) -> None:
    impostor = rsa_key("rsa1")  # same kid as the published key, another private key
    with pytest.raises(AuthError, match="signature does not verify"):
        verifier(idp).verify(idp.token(impostor))
    # a published token with one byte of its payload changed
    good = idp.token()
    head, body, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["scope"] = "read submit admin"
    tampered = f"{head}.{_b64(json.dumps(claims).encode())}.{sig}"
    with pytest.raises(AuthError, match="signature does not verify"):
        verifier(idp).verify(tampered)


def test_alg_none_is_refused(idp: IdP) -> None:
    now = int(time.time())
    claims = {
        "iss": idp.url,
        "aud": AUDIENCE,
        "sub": "mallory",
        "exp": now + 300,
        "scope": "read submit admin",
    }
    token = forged({"alg": "none", "typ": "JWT", "kid": "rsa1"}, claims)
    with pytest.raises(AuthError, match="algorithm 'none' is not accepted"):
        verifier(idp).verify(token)


def test_hs256_signed_with_the_public_key_is_refused(idp: IdP) -> None:
    """The classic key-confusion forgery: HMAC with the issuer's public key as secret."""
    now = int(time.time())
    claims = {
        "iss": idp.url,
        "aud": AUDIENCE,
        "sub": "mallory",
        "exp": now + 300,
        "scope": "read submit admin",
    }
    pem = idp.keys[0].public_pem()
    jwk_json = json.dumps(idp.keys[0].jwk()).encode()
    for secret in (pem, jwk_json):
        token = forged(
            {"alg": "HS256", "typ": "JWT", "kid": "rsa1"},
            claims,
            lambda data, s=secret: hmac.new(s, data, hashlib.sha256).digest(),
        )
        with pytest.raises(AuthError, match="algorithm 'HS256' is not accepted"):
            verifier(idp).verify(token)
    # even a verifier told to accept only ES256 refuses an RS256 token
    with pytest.raises(AuthError, match="'RS256' is not accepted"):
        verifier(idp, algorithms=["ES256"]).verify(idp.token())


def test_token_algorithm_must_match_the_key(idp: IdP) -> None:
    """An ES256 header on the RSA key id is refused, not verified some other way."""
    ec_private = idp.keys[1].private
    token = jwt.encode(
        {"iss": idp.url, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60},
        ec_private,
        algorithm="ES256",
        headers={"kid": "rsa1"},
    )
    with pytest.raises(AuthError, match="not valid"):
        verifier(idp).verify(token)


def test_scp_list_and_groups_claim_map_to_scopes(idp: IdP) -> None:
    v = verifier(
        idp,
        groups_claim="groups",
        group_scopes={"/cms/analysts": ["read", "submit"], "/cms/ops": ["admin"]},
    )
    who = v.verify(idp.token(scope=None, scp=["read"]))
    assert who.scopes == {"read"}
    who = v.verify(idp.token(scope=None, groups=["/cms/analysts", "/other"]))
    assert who.scopes == {"read", "submit"}
    assert who.groups == {"/cms/analysts", "/other"}
    who = v.verify(idp.token(scope="read", groups=["/cms/ops"]))
    assert who.admin
    assert who.has("submit")
    who = v.verify(idp.token(scope=None, groups=["/atlas"]))
    assert who.scopes == frozenset()
    with pytest.raises(PermissionDeniedError, match="lacks the scope 'read'"):
        who.require("read")
    with pytest.raises(SpecError, match="unknown scopes"):
        verifier(idp, groups_claim="groups", group_scopes={"g": ["write"]})


def test_user_claim_is_configurable(idp: IdP) -> None:
    v = verifier(idp, user_claim="preferred_username")
    assert v.verify(idp.token(preferred_username="bob")).user == "bob"
    with pytest.raises(AuthError, match="'preferred_username'"):
        v.verify(idp.token())


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    granted=st.lists(st.sampled_from([*SCOPES, "openid", "email", "Read", "admin:x"]), max_size=6),
    as_list=st.booleans(),
)
def test_scopes_are_exactly_the_known_ones_granted(
    idp: IdP, granted: list[str], as_list: bool
) -> None:
    claim: dict[str, Any] = (
        {"scope": None, "scp": granted} if as_list else {"scope": " ".join(granted)}
    )
    who = verifier(idp, jwks_refetch_s=3600).verify(idp.token(**claim))
    assert who.scopes == {s for s in granted if s in ("read", "submit", "admin")}
    for scope in ("read", "submit", "admin"):
        assert who.has(scope) == (scope in granted or "admin" in granted)


def test_key_rotation_refetches_the_jwks(idp: IdP, module_keys: dict[str, SigningKey]) -> None:
    v = verifier(idp)
    old, new = module_keys["rsa1"], module_keys["rsa2"]
    assert v.verify(idp.token(old)).user == "alice"
    assert idp.jwks_hits == 1
    idp.keys = [new, module_keys["ec1"]]  # the issuer rotates: rsa1 removed, rsa2 added
    assert v.verify(idp.token(old)).user == "alice"  # still cached, no fetch for a known kid
    assert idp.jwks_hits == 1
    assert v.verify(idp.token(new)).user == "alice"  # unknown kid: refetched, accepted
    assert idp.jwks_hits == 2
    with pytest.raises(AuthError, match="key id 'rsa1'"):
        v.verify(idp.token(old))  # removed from the JWKS: refused after the refetch


def test_unknown_key_ids_refetch_at_most_once_per_interval(
    idp: IdP, module_keys: dict[str, SigningKey]
) -> None:
    v = verifier(idp, jwks_refetch_s=3600)
    assert v.verify(idp.token()).user == "alice"
    for kid in ("x1", "x2", "x3", "x4"):
        with pytest.raises(AuthError, match=f"key id '{kid}'"):
            v.verify(idp.token(kid=kid))
    assert idp.jwks_hits == 1  # a flood of made-up kids does not hammer the issuer


def test_an_issuer_down_at_refresh_time_keeps_the_cached_keys(idp: IdP) -> None:
    v = verifier(idp, jwks_max_age_s=0.0)
    assert v.verify(idp.token()).user == "alice"
    idp.down = True
    assert v.verify(idp.token()).user == "alice"  # the refresh failed: cached keys still verify
    with pytest.raises(ServiceUnavailableError, match="HTTP 503"):
        v.verify(idp.token(kid="new-key"))  # a key it has never seen cannot be checked
    idp.down = False
    with pytest.raises(AuthError, match="key id 'new-key'"):
        v.verify(idp.token(kid="new-key"))


def test_issuer_mismatch_in_discovery_and_unreachable_issuer(idp: IdP) -> None:
    idp.discovery_issuer = "https://other.example/realm"
    with pytest.raises(ServiceUnavailableError, match="is for the issuer"):
        verifier(idp).verify(idp.token())
    closed = OIDCVerifier("http://127.0.0.1:9/realm", AUDIENCE, timeout=2)
    with pytest.raises(ServiceUnavailableError, match="cannot be fetched"):
        closed.verify(idp.token())


def test_oidc_settings_are_checked() -> None:
    with pytest.raises(SpecError, match="audience"):
        OIDCVerifier("https://idp.example/realm", "")
    with pytest.raises(SpecError, match="https"):
        OIDCVerifier("http://idp.example/realm", AUDIENCE)
    with pytest.raises(SpecError, match="HS256"):
        OIDCVerifier("https://idp.example/realm", AUDIENCE, algorithms=["HS256"])


# ---------------------------------------------------------------------------
# the static token file


def write_tokens(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    lines = ["tokens:"]
    for key, value in entries.items():
        lines.append(f"  {key!s}: {json.dumps(value)}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def test_token_file_accepts_hashed_tokens_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    alice, bob = "alice-" + "x" * 30, "bob-" + "y" * 30
    write_tokens(
        path,
        {
            hashlib.sha256(alice.encode()).hexdigest(): {"user": "alice", "scopes": ["read"]},
            hashlib.sha256(bob.encode()).hexdigest().upper(): {
                "user": "bob",
                "scopes": ["read", "submit"],
                "groups": ["cms"],
            },
        },
    )
    auth = Authenticator(token_file=TokenFile(path))
    assert auth.authenticate(f"Bearer {alice}") == Principal("alice", frozenset({"read"}))
    assert auth.authenticate(f"bearer  {bob} ") == Principal(
        "bob", frozenset({"read", "submit"}), frozenset({"cms"})
    )
    for header in (f"Bearer {alice}x", "Bearer " + hashlib.sha256(alice.encode()).hexdigest()):
        with pytest.raises(AuthError, match="not valid"):
            auth.authenticate(header)
    with pytest.raises(AuthError, match="needs a token"):
        auth.authenticate(None)
    with pytest.raises(AuthError, match="scheme 'Basic'"):
        auth.authenticate("Basic YWxpY2U6eA==")


def test_token_file_with_a_plain_token_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    write_tokens(path, {"my-plain-secret-token": {"user": "alice", "scopes": ["read"]}})
    with pytest.raises(SpecError, match="never plain tokens") as err:
        TokenFile(path)
    assert "sha256sum" in str(err.value)
    assert "my-plain-secret-token" not in str(err.value)  # the secret is not echoed
    write_tokens(path, {hash_token("t"): {"user": "alice", "scopes": ["write"]}})
    with pytest.raises(SpecError, match=r"unknown scopes \['write'\]"):
        TokenFile(path)


def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    write_tokens(path, {hash_token("old-token"): {"user": "alice", "scopes": ["read"]}})
    auth = Authenticator(token_file=TokenFile(path))
    assert auth.authenticate("Bearer old-token").user == "alice"
    # in place, same size, within the same second: the revoked token stops working at once
    path.write_text(path.read_text().replace(hash_token("old-token"), hash_token("new-token")))
    with pytest.raises(AuthError):
        auth.authenticate("Bearer old-token")
    assert auth.authenticate("Bearer new-token").user == "alice"
    # an edit that breaks the file refuses every token until fixed (fail closed)
    path.write_text("tokens: [oops\n")
    with pytest.raises(ServiceUnavailableError, match="token file is unusable"):
        auth.authenticate("Bearer new-token")
    write_tokens(path, {hash_token("new-token"): {"user": "carol", "scopes": ["submit"]}})
    assert auth.authenticate("Bearer new-token") == Principal("carol", frozenset({"submit"}))
    path.unlink()
    with pytest.raises(ServiceUnavailableError, match="cannot be read"):
        auth.authenticate("Bearer new-token")


def test_token_file_and_oidc_together(tmp_path: Path, idp: IdP) -> None:
    path = tmp_path / "tokens.yaml"
    write_tokens(path, {hash_token("static"): {"user": "robot", "scopes": ["admin"]}})
    auth = Authenticator(token_file=TokenFile(path), oidc=verifier(idp))
    assert auth.authenticate("Bearer static").user == "robot"
    assert auth.authenticate(f"Bearer {idp.token()}").user == "alice"
    with pytest.raises(AuthError, match="token file or an OIDC access token"):
        auth.authenticate("Bearer nothing")
    path.write_text("tokens: [broken\n")  # a broken token file locks out static tokens only
    with pytest.raises(ServiceUnavailableError, match="token file is unusable"):
        auth.authenticate("Bearer static")
    assert auth.authenticate(f"Bearer {idp.token()}").user == "alice"


def test_auth_off_is_anonymous_with_every_scope() -> None:
    auth = Authenticator()
    assert not auth.enabled
    assert auth.authenticate(None) is ANONYMOUS
    assert all(ANONYMOUS.has(s) for s in SCOPES)


def test_from_config(tmp_path: Path, idp: IdP) -> None:
    path = tmp_path / "tokens.yaml"
    write_tokens(path, {hash_token("static"): {"user": "robot", "scopes": ["read"]}})

    @dataclass
    class Config:
        token_file: Path | None = None
        oidc_issuer: str | None = None
        oidc_audience: str | None = None
        oidc_groups_claim: str | None = None
        oidc_scopes_claim: str = "scope"
        oidc_group_scopes: dict[str, list[str]] = field(default_factory=dict)

    assert not Authenticator.from_config(Config()).enabled
    auth = Authenticator.from_config(
        Config(
            token_file=path,
            oidc_issuer=idp.url,
            oidc_audience=AUDIENCE,
            oidc_groups_claim="groups",
            oidc_group_scopes={"ops": ["admin"]},
        )
    )
    assert auth.authenticate("Bearer static").user == "robot"
    assert auth.authenticate(f"Bearer {idp.token(scope=None, groups=['ops'])}").admin
    with pytest.raises(SpecError, match="audience"):
        Authenticator.from_config(Config(oidc_issuer=idp.url))


# ---------------------------------------------------------------------------
# through a FastAPI app: 401 vs 403 and WWW-Authenticate


@pytest.fixture
def app(tmp_path: Path, idp: IdP) -> Any:
    from fastapi import Depends, FastAPI
    from fastapi.responses import JSONResponse

    from columnhub.errors import ColumnhubError

    path = tmp_path / "tokens.yaml"
    write_tokens(
        path,
        {
            hash_token("reader"): {"user": "rita", "scopes": ["read"]},
            hash_token("submitter"): {"user": "sam", "scopes": ["read", "submit"]},
        },
    )
    app = FastAPI()
    app.state.authenticator = Authenticator(token_file=TokenFile(path), oidc=verifier(idp))

    @app.exception_handler(ColumnhubError)
    def handle(request: Any, err: ColumnhubError) -> JSONResponse:
        status = err.status if isinstance(err, ServiceError) else 400
        body = {"error": {"type": type(err).__name__, "message": str(err)}}
        return JSONResponse(body, status_code=status, headers=challenge_headers(err))

    @app.get("/read")
    def read(user: Principal = Depends(principal("read"))) -> dict[str, str]:  # noqa: B008
        return {"user": user.user}

    @app.post("/submit")
    def submit(user: Principal = Depends(principal("submit"))) -> dict[str, str]:  # noqa: B008
        return {"user": user.user}

    return app


def calls(app: Any, *requests: tuple[str, str, str | None]) -> list[Any]:
    """Each (method, path, token) through the app in-process (httpx.ASGITransport)."""
    import httpx

    async def run() -> list[Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            out = []
            for method, path, token in requests:
                headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
                out.append(await client.request(method, path, headers=headers))
            return out

    return asyncio.run(run())


def test_app_401_403_and_www_authenticate(app: Any, idp: IdP) -> None:
    expired = idp.token(exp=int(time.time()) - 3600)
    read_only = idp.token(scope="read")
    (anonymous, wrong, old, reader, reader_submits, submitter, oidc_submits, oidc_reads, api) = (
        calls(
            app,
            ("GET", "/read", None),
            ("GET", "/read", "wrong"),
            ("GET", "/read", expired),
            ("GET", "/read", "reader"),
            ("POST", "/submit", "reader"),
            ("POST", "/submit", "submitter"),
            ("POST", "/submit", read_only),
            ("GET", "/read", read_only),
            ("GET", "/openapi.json", None),
        )
    )
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == 'Bearer realm="columnhub"'
    assert anonymous.json()["error"]["type"] == "AuthError"

    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"].startswith(
        'Bearer realm="columnhub", error="invalid_token"'
    )
    assert old.status_code == 401
    assert "expired" in old.json()["error"]["message"]

    assert reader.status_code == 200
    assert reader.json() == {"user": "rita"}
    assert reader_submits.status_code == 403
    assert reader_submits.json()["error"]["type"] == "PermissionDeniedError"
    assert 'error="insufficient_scope"' in reader_submits.headers["www-authenticate"]
    assert 'scope="submit"' in reader_submits.headers["www-authenticate"]
    assert submitter.status_code == 200
    assert submitter.json() == {"user": "sam"}

    assert oidc_submits.status_code == 403
    assert oidc_reads.status_code == 200
    assert oidc_reads.json() == {"user": "alice"}
    # the OpenAPI document offers bearer auth (the "Authorize" button of /docs)
    assert api.json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_an_app_without_an_authenticator_fails_closed() -> None:
    from fastapi import Depends, FastAPI

    bare = FastAPI()

    @bare.get("/read")
    def read(user: Principal = Depends(principal("read"))) -> dict[str, str]:  # noqa: B008
        return {"user": user.user}

    with pytest.raises(TypeError, match=r"app\.state\.authenticator"):
        calls(bare, ("GET", "/read", None))


def test_principal_rejects_unknown_scope() -> None:
    with pytest.raises(SpecError, match="unknown scope 'write'"):
        principal("write")


# ---------------------------------------------------------------------------
# the real service app with OIDC: the auth matrix


def test_the_service_app_with_oidc_tokens(tmp_path: Path, idp: IdP, shared_data: Path) -> None:
    """Scopes from the scope claim and from groups, 401/403/404 through ``create_app``."""
    from columnhub.service.app import create_app
    from columnhub.service.config import load_config

    config = load_config(
        state_dir=tmp_path / "state",
        data_roots=[shared_data],
        oidc_issuer=idp.url,
        oidc_audience=AUDIENCE,
        oidc_groups_claim="groups",
        oidc_group_scopes={"/cms/analysts": ["read", "submit"], "/cms/ops": ["admin"]},
    )
    app = create_app(config, runner=False)  # API only: the requests stay queued
    alice = idp.token(sub="alice", scope=None, groups=["/cms/analysts"])
    bob = idp.token(sub="bob", scope="openid read submit")
    carol = idp.token(sub="carol", scope="read")
    ops = idp.token(sub="ops", scope=None, groups=["/cms/ops"])
    expired = idp.token(sub="alice", exp=int(time.time()) - 3600, groups=["/cms/analysts"])
    spec = {"dataset": {"files": [str(shared_data / "nano_dy.root")]}, "columns": ["MET_pt"]}
    escape = {"dataset": {"files": ["/etc/passwd"]}, "columns": ["MET_pt"]}

    import httpx

    async def run() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=app)
        out: dict[str, Any] = {}
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            def h(token: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {token}"}

            out["submit"] = await client.post("/api/v1/requests", json=spec, headers=h(alice))
            assert out["submit"].status_code == 202, out["submit"].text
            rid = out["submit"].json()["id"]
            url = f"/api/v1/requests/{rid}"
            out["own"] = await client.get(url, headers=h(alice))
            out["other"] = await client.get(url, headers=h(bob))
            out["other_cancel"] = await client.delete(url, headers=h(bob))
            out["other_list"] = await client.get("/api/v1/requests", headers=h(bob))
            out["admin"] = await client.get(url, headers=h(ops))
            out["reader_submit"] = await client.post(
                "/api/v1/requests", json=spec, headers=h(carol)
            )
            out["escape"] = await client.post("/api/v1/requests", json=escape, headers=h(bob))
            out["expired"] = await client.get(url, headers=h(expired))
            out["none"] = await client.get(url)
        return out

    r = asyncio.run(run())
    assert r["submit"].status_code == 202, r["submit"].text
    assert r["own"].status_code == 200
    assert r["own"].json()["owner"] == "alice"
    assert r["other"].status_code == 404  # another user's request does not exist for bob
    assert r["other_cancel"].status_code == 404
    assert r["other_list"].json()["total"] == 0
    assert r["admin"].status_code == 200  # the ops group maps to admin
    assert r["reader_submit"].status_code == 403
    assert 'error="insufficient_scope"' in r["reader_submit"].headers["www-authenticate"]
    assert r["escape"].status_code == 403
    assert "/etc/passwd" in r["escape"].json()["error"]["message"]
    assert r["expired"].status_code == 401
    assert 'error="invalid_token"' in r["expired"].headers["www-authenticate"]
    assert "expired" in r["expired"].json()["error"]["message"]
    assert r["none"].status_code == 401
