"""A scripted requests Session and the Responses it hands out, for FHIR client unit tests (the faults and sequences
a real server cannot be made to produce on demand)."""

from __future__ import annotations

import json
from collections.abc import Callable
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


class ScriptedSession(requests.Session):
    """Answers each request with ``handler(method, url, headers, data)`` and records every request."""

    def __init__(self, handler: Callable[[str, str, dict[str, str], Any], requests.Response]) -> None:
        super().__init__()
        self.handler = handler
        self.calls: list[tuple[str, str, dict[str, str], Any]] = []

    def request(self, method, url, params=None, data=None, headers=None, **kwargs):  # type: ignore[override]
        merged = {**self.headers, **(headers or {})}
        self.calls.append((method, url, merged, data))
        return self.handler(method, url, merged, data)
