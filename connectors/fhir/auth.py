"""FHIR authentication: static credentials, OAuth2 client credentials and SMART Backend Services tokens.

:func:`authorizer_for` turns ``fhir.auth`` into the :class:`~riskbridge.connectors.http.Authorizer` the HTTP layer
asks for each request's ``Authorization`` header: none, basic or bearer as they are; ``oauth2`` (client secret,
``client_secret_basic``) and ``smart`` (a ``private_key_jwt`` client assertion signed with
:func:`smart_client_assertion`, RS384 or ES384) fetch an access token from the token endpoint and cache it until
shortly before it expires; the HTTP layer renews it once on a 401. Every attempt of a SMART token request (retries
included) carries a freshly signed assertion with its own ``jti`` (the HTTP layer builds the form per attempt).
:func:`check_credentials_transport` refuses credentials that would travel over plain ``http://`` to a host other
than loopback. Neither tokens nor secrets are
ever logged or put in a message.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus, urlsplit

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from riskbridge.connectors.http import (
    FORM_CONTENT_TYPE,
    Authorizer,
    basic_authorization,
    bearer_authorization,
)
from riskbridge.errors import ConfigurationError
from riskbridge.settings import FhirAuth, FhirSettings

from .errors import FhirError, diagnostics

if TYPE_CHECKING:
    from .client import FhirClient

log = logging.getLogger(__name__)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART Backend Services: the assertion's exp must be no more than five minutes ahead; stay clear of that limit so
# a server clock a little ahead of ours still accepts it.
CLIENT_ASSERTION_LIFETIME_S = 240
DEFAULT_TOKEN_LIFETIME_S = 300.0

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def load_private_key(path: Path, algorithm: str) -> PrivateKey:
    """Read a PEM private key for SMART client assertions; check it fits ``algorithm`` (RS384: RSA, ES384: P-384)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        # The exception text says nothing about the key material; a passphrase-protected key is a TypeError.
        raise FhirError(f"fhir.auth.private_key_file: {path} is not an unencrypted PEM private key ({exc})") from None
    if algorithm == "RS384":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise FhirError(f"fhir.auth.private_key_file: algorithm RS384 needs an RSA key, {path} is not one")
        return key
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise FhirError(f"fhir.auth.private_key_file: algorithm ES384 needs an EC P-384 key, {path} is not one")
    return key


def smart_client_assertion(
    client_id: str,
    token_url: str,
    private_key: PrivateKey,
    key_id: str,
    algorithm: str,
    now: float | None = None,
    lifetime_s: int = CLIENT_ASSERTION_LIFETIME_S,
) -> str:
    """A signed SMART Backend Services client assertion: iss = sub = client_id, aud = token URL, unique jti, exp."""
    import jwt  # only SMART needs it

    issued = int(now if now is not None else time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "exp": issued + lifetime_s, "jti": uuid.uuid4().hex}
    return jwt.encode(claims, private_key, algorithm=algorithm, headers={"kid": key_id, "typ": "JWT"})


LOOPBACK_NAMES = frozenset({"localhost"})


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ``::1``, IPv4-mapped 127.x), False otherwise."""
    if not host:
        return False
    name = host.strip("[]").rstrip(".").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_credentials_transport(fhir: FhirSettings) -> None:
    """Raise ConfigurationError when credentials would travel over plain ``http://`` to a host that is not loopback.

    With any ``fhir.auth`` other than ``none``, ``base_url`` (every request's Authorization header) and, for oauth2
    and smart, ``token_url`` (the client secret or signed assertion) must be ``https://`` unless their host is
    loopback (127.0.0.0/8, ``::1``, ``localhost``: the sandbox). Without credentials plain http stays allowed.
    """
    auth = fhir.auth
    if auth.type == "none":
        return
    urls = [("fhir.base_url", fhir.base_url)]
    if auth.type in ("oauth2", "smart") and auth.token_url is not None:
        urls.append(("fhir.auth.token_url", auth.token_url))
    for key, url in urls:
        parts = urlsplit(url)
        if parts.scheme.lower() == "http" and not is_loopback_host(parts.hostname):
            raise ConfigurationError(
                f"{key}: fhir.auth type {auth.type!r} would send credentials over plain http:// to {parts.hostname}; "
                "use https:// (plain http with credentials is allowed only to loopback: 127.0.0.0/8, ::1, localhost)"
            )


def static_authorization(auth: FhirAuth) -> str | None:
    """The fixed ``Authorization`` value of ``basic`` and ``bearer`` authentication; None for the other types."""
    if auth.type == "basic":
        assert auth.username is not None and auth.password is not None  # enforced by FhirAuth
        return basic_authorization(auth.username, auth.password.get_secret_value())
    if auth.type == "bearer":
        assert auth.token is not None  # enforced by FhirAuth
        return bearer_authorization(auth.token.get_secret_value())
    return None


def authorizer_for(client: FhirClient, auth: FhirAuth) -> Authorizer:
    """The authorizer of ``fhir.auth``: a token authorizer for oauth2 and smart, a static one otherwise."""
    if auth.type in ("oauth2", "smart"):
        return _TokenAuthorizer(client, auth)
    return Authorizer(static_authorization(auth))


class _TokenAuthorizer(Authorizer):
    """OAuth2 client credentials (client secret or SMART private_key_jwt); the access token is cached until expiry."""

    renewable = True

    def __init__(self, client: FhirClient, auth: FhirAuth) -> None:
        """Prepare token requests for ``auth`` sent through ``client`` (its clock, statistics and retries)."""
        super().__init__()
        assert auth.token_url is not None and auth.client_id is not None  # enforced by FhirAuth
        self._client = client
        self._auth = auth
        self._token_url = auth.token_url
        self._client_id = auth.client_id
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self._private_key: PrivateKey | None = None
        if auth.type == "smart":
            assert auth.private_key_file is not None  # enforced by FhirAuth
            self._private_key = load_private_key(auth.private_key_file, auth.algorithm)

    def headers(self) -> dict[str, str]:
        """``Authorization: Bearer <token>``, fetching a token first when none is cached or it expired."""
        with self._lock:
            if self._token is None or self._client.clock() >= self._expires_at:
                self._token, self._expires_at = self._fetch()
            return {"Authorization": bearer_authorization(self._token)}

    def invalidate(self) -> None:
        """Forget the cached token; the next request fetches a new one."""
        with self._lock:
            self._token = None

    def _request(self) -> tuple[Callable[[], dict[str, str]], dict[str, str]]:
        """The form (built anew for each attempt) and headers of a token request: a client assertion (SMART, signed
        for every attempt, retries included, with its own ``jti`` and ``exp``: a token endpoint may refuse a
        ``jti`` it has seen) or client_secret_basic."""
        fixed = {"grant_type": "client_credentials"}
        headers = {"Accept": "application/json", "Content-Type": FORM_CONTENT_TYPE}
        if self._auth.scope:
            fixed["scope"] = self._auth.scope
        if self._private_key is not None:
            key_id, private_key = self._auth.key_id, self._private_key
            assert key_id is not None  # enforced by FhirAuth

            def signed_form() -> dict[str, str]:
                assertion = smart_client_assertion(
                    self._client_id, self._token_url, private_key, key_id, self._auth.algorithm
                )
                return {**fixed, "client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": assertion}

            return signed_form, headers
        assert self._auth.client_secret is not None  # enforced by FhirAuth
        # client_secret_basic (RFC 6749 2.3.1): both parts form-encoded, then HTTP Basic.
        secret = self._auth.client_secret.get_secret_value()
        headers["Authorization"] = basic_authorization(quote_plus(self._client_id), quote_plus(secret))
        return lambda: dict(fixed), headers

    def _fetch(self) -> tuple[str, float]:
        """Ask the token endpoint for a token; return it and the clock reading at which to renew it."""
        form, headers = self._request()
        self._client.stats.add("token_requests")
        what = f"POST token endpoint {urlsplit(self._token_url).netloc}"
        response = self._client.send(
            "POST", self._token_url, data=form, headers=headers, what=what, authorize=False, idempotent=True
        )
        if response.status_code != 200:
            reason = _oauth_error(response)
            raise FhirError(f"{what}: {response.status_code} {reason}".rstrip(), response.status_code, reason)
        try:
            body = response.json()
            token = str(body["access_token"])
        except (ValueError, KeyError, TypeError):
            raise FhirError(f"{what}: the answer holds no access_token", response.status_code) from None
        token_type = str(body.get("token_type", "bearer"))
        if token_type.lower() != "bearer":
            raise FhirError(f"{what}: token_type {token_type!r} is not supported (bearer only)")
        lifetime = _positive_float(body.get("expires_in"), DEFAULT_TOKEN_LIFETIME_S)
        skew = min(self._auth.refresh_skew_s, lifetime / 2)
        log.info("fhir: access token obtained from %s, expires in %.0f s", urlsplit(self._token_url).netloc, lifetime)
        return token, self._client.clock() + lifetime - skew


def _positive_float(value: Any, default: float) -> float:
    """``value`` as a positive number of seconds, else ``default``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if number > 0 else default


def _oauth_error(response: requests.Response) -> str:
    """``error: error_description`` of an OAuth2 error answer (RFC 6749 5.2), else the FHIR diagnostics."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict) and "error" in body:
        description = body.get("error_description")
        return f"{body['error']}: {description}" if description else str(body["error"])
    return diagnostics(response)
