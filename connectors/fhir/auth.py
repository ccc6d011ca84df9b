"""FHIR authentication: static credentials, OAuth2 client credentials and SMART Backend Services tokens.

The machinery is the one HTTP layer's (:mod:`riskbridge.connectors.http`), shared with the DICOMweb client; this
module binds it to ``fhir.auth`` and :class:`FhirError`. :func:`authorizer_for` turns ``fhir.auth`` into the
:class:`~riskbridge.connectors.http.Authorizer` the HTTP layer asks for each request's ``Authorization`` header:
none, basic or bearer as they are; ``oauth2`` (client secret, ``client_secret_basic``) and ``smart`` (a
``private_key_jwt`` client assertion signed with :func:`smart_client_assertion`, RS384 or ES384) fetch an access
token from the token endpoint and cache it until shortly before it expires; the HTTP layer renews it once on a 401.
Every attempt of a SMART token request (retries included) carries a freshly signed assertion with its own ``jti``
(the HTTP layer builds the form per attempt). :func:`check_credentials_transport` refuses credentials that would
travel over plain ``http://`` to a host other than loopback. Neither tokens nor secrets are ever logged or put in a
message.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import requests

from riskbridge.connectors.http import (
    CLIENT_ASSERTION_LIFETIME_S,
    CLIENT_ASSERTION_TYPE,
    DEFAULT_TOKEN_LIFETIME_S,
    Authorizer,
    check_credentials_url,
    oauth_error_reason,
    smart_client_assertion,
    static_authorization,
)
from riskbridge.connectors.http import authorizer_for as _authorizer_for
from riskbridge.connectors.http import load_private_key as _load_private_key
from riskbridge.hosts import LOOPBACK_NAMES, is_loopback_host
from riskbridge.settings import FhirAuth, FhirSettings

from .errors import FhirError, diagnostics

if TYPE_CHECKING:
    from riskbridge.connectors.http import PrivateKey

    from .client import FhirClient

__all__ = [
    "CLIENT_ASSERTION_LIFETIME_S",
    "CLIENT_ASSERTION_TYPE",
    "DEFAULT_TOKEN_LIFETIME_S",
    "LOOPBACK_NAMES",
    "authorizer_for",
    "check_credentials_transport",
    "is_loopback_host",
    "load_private_key",
    "smart_client_assertion",
    "static_authorization",
]


def load_private_key(path: Path, algorithm: str) -> PrivateKey:
    """Read a PEM private key for SMART client assertions; check it fits ``algorithm`` (RS384: RSA, ES384: P-384)."""
    return _load_private_key(path, algorithm, setting="fhir.auth.private_key_file", error=FhirError)


def check_credentials_transport(fhir: FhirSettings) -> None:
    """Raise ConfigurationError when credentials would travel over plain ``http://`` to a host that is not loopback.

    With any ``fhir.auth`` other than ``none``, ``base_url`` (every request's Authorization header) and, for oauth2
    and smart, ``token_url`` (the client secret or signed assertion) must be ``https://`` unless their host is
    loopback (127.0.0.0/8, ``::1``, ``localhost``: the sandbox). Without credentials plain http stays allowed.
    """
    check_credentials_url(fhir.auth, fhir.base_url, base_key="fhir.base_url", auth_key="fhir.auth")


def authorizer_for(client: FhirClient, auth: FhirAuth) -> Authorizer:
    """The authorizer of ``fhir.auth``: a token authorizer for oauth2 and smart (token requests through the client's
    transport, on its clock), a static one otherwise."""
    return _authorizer_for(
        auth,
        client._http,
        error=FhirError,
        setting="fhir.auth",
        clock=lambda: client.clock(),
        describe=_oauth_error,
    )


def _oauth_error(response: requests.Response) -> str:
    """``error: error_description`` of an OAuth2 error answer (RFC 6749 5.2), else the FHIR diagnostics."""
    return oauth_error_reason(response, diagnostics)
