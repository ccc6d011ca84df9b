"""FHIR R4 server I/O through a pooled requests Session: authentication and the REST interactions riskbridge uses.

Errors are :class:`FhirError` carrying the HTTP status and the OperationOutcome's diagnostics, so a message
reads like ``GET /metadata: 503 HAPI-1234: ...``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import requests

from riskbridge.settings import FhirSettings

FHIR_JSON = "application/fhir+json"


class FhirError(Exception):
    """A FHIR interaction failed; the message names the request, the HTTP status and the server's diagnostics."""


@dataclass(frozen=True)
class ServerInfo:
    """Who a FHIR server says it is, from its CapabilityStatement."""

    name: str
    version: str
    fhir_version: str


def diagnostics(response: requests.Response) -> str:
    """Return the OperationOutcome diagnostics of an error response, or a short excerpt of its body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = body.get("issue") or []
        texts = [issue.get("diagnostics") or issue.get("code", "") for issue in issues]
        return "; ".join(text for text in texts if text)
    return ""


def transport_reason(exc: requests.RequestException) -> str:
    """Return a one-line reason for a failure below HTTP (refused, DNS, timeout, TLS)."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(exc))
    if errno:
        return f"cannot connect: {errno.group(0)}"
    return f"cannot connect: {type(exc).__name__}"


def session_for(fhir: FhirSettings) -> requests.Session:
    """Return a requests Session with the configured authentication and FHIR JSON headers."""
    session = requests.Session()
    session.headers.update({"Accept": FHIR_JSON})
    auth = fhir.auth
    if auth.type == "basic":
        assert auth.username is not None and auth.password is not None  # enforced by FhirAuth
        session.auth = (auth.username, auth.password.get_secret_value())
    elif auth.type == "bearer":
        assert auth.token is not None  # enforced by FhirAuth
        session.headers["Authorization"] = f"Bearer {auth.token.get_secret_value()}"
    return session


def capability(fhir: FhirSettings, session: requests.Session | None = None) -> ServerInfo:
    """Read ``/metadata`` and return the server's software name, version and FHIR version."""
    session = session or session_for(fhir)
    url = f"{fhir.base_url}/metadata"
    try:
        response = session.get(url, timeout=fhir.timeout_s)
    except requests.RequestException as exc:
        raise FhirError(f"GET {url}: {transport_reason(exc)}") from exc
    if response.status_code != 200:
        raise FhirError(f"GET {url}: {response.status_code} {diagnostics(response)}".rstrip())
    body: dict[str, Any] = response.json()
    software = body.get("software") or {}
    return ServerInfo(
        name=software.get("name", "unknown"),
        version=software.get("version", "unknown"),
        fhir_version=body.get("fhirVersion", "unknown"),
    )
