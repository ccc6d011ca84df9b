"""requests.Response objects as a FHIR server's transport would return them, for client unit tests that script a
Session (the faults and sequences a real server cannot be made to produce on demand)."""

from __future__ import annotations

import json
from typing import Any

import requests
from requests.structures import CaseInsensitiveDict


def make_response(
    status: int, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> requests.Response:
    """A requests.Response with a JSON body (FHIR JSON content type when there is one) or ``raw`` bytes."""
    response = requests.Response()
    response.status_code = status
    response.headers = CaseInsensitiveDict(headers or {})
    # the body is already in memory; close() has no connection to release (a private attribute the stubs omit)
    response._content_consumed = True  # type: ignore[attr-defined]
    if raw is not None:
        response._content = raw
    else:
        response._content = b"" if body is None else json.dumps(body).encode()
        if body is not None:
            response.headers.setdefault("Content-Type", "application/fhir+json")
    return response
