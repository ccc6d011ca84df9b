"""FHIR errors: :class:`FhirError` and the server's reason for refusing a request (its OperationOutcome).

A message reads like ``GET /metadata: 503 HAPI-1234: ...``: the request, the HTTP status and the diagnostics, never
a query string (it can hold an MRN), a token or a secret. :class:`AttachmentError` (and its
:class:`AttachmentTooLargeError`) is the one note attachment that cannot be read: a caller records that note as
unreadable and goes on with the others.
"""

from __future__ import annotations

from typing import Any

import requests

from riskbridge.errors import FhirServerError

FHIR_JSON = "application/fhir+json"


class FhirError(FhirServerError):
    """A FHIR interaction failed; the message names the request, the HTTP status and the server's diagnostics."""

    def __init__(self, message: str, status: int | None = None, diagnostics: str = "") -> None:
        """Keep the HTTP ``status`` (None when no answer came) and the server's ``diagnostics`` next to the message."""
        super().__init__(message)
        self.status = status
        self.diagnostics = diagnostics


class AttachmentError(FhirError):
    """One note attachment cannot be read: its data is not valid base64, its Binary is gone (404, 410) or its answer
    is not readable, or it is too large. The note is unreadable; other notes are not affected."""


class AttachmentTooLargeError(AttachmentError):
    """A note attachment is larger than ``fhir.max_attachment_bytes``; its body was not read past the cap."""


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


def checked(response: requests.Response, what: str, expected: tuple[int, ...] = (200,)) -> requests.Response:
    """Return ``response`` if its status is one of ``expected``; else raise :class:`FhirError` with the diagnostics."""
    if response.status_code not in expected:
        reason = diagnostics(response)
        raise FhirError(f"{what}: {response.status_code} {reason}".rstrip(), response.status_code, reason)
    return response


def json_object(response: requests.Response, what: str) -> dict[str, Any]:
    """The JSON object of an answer; :class:`FhirError` when the body is not JSON or not an object."""
    try:
        body = response.json()
    except ValueError:
        raise FhirError(f"{what}: the answer is not JSON", response.status_code) from None
    if not isinstance(body, dict):
        raise FhirError(f"{what}: the answer is not a JSON object", response.status_code)
    return body
