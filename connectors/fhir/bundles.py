"""FHIR write-back bundles: outgoing resources as JSON, transaction entries, and the server's answer per entry.

Resources sent to the server are built with ``fhir.resources.R4B`` models (the package's default models are R5)
and serialized with :func:`resource_json`; :func:`transaction_entry` wraps one as a (conditional) create or an
update; :func:`entry_results` reads a transaction-response Bundle into one :class:`EntryResult` per entry, and
:func:`idempotent_entries` says whether a transaction may be sent again after a gateway error.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def resource_json(resource: Any) -> dict[str, Any]:
    """Serialize an outgoing resource built with a ``fhir.resources.R4B`` model to a JSON-ready dict.

    Raises TypeError for anything else, notably the package's default (R5) models, which would send non-R4
    content to an R4 server.
    """
    from fhir.resources.R4B.resource import Resource as R4BResource

    if not isinstance(resource, R4BResource):
        module = type(resource).__module__
        raise TypeError(f"build resources sent to the FHIR server with fhir.resources.R4B models (got {module})")
    result: dict[str, Any] = json.loads(resource.model_dump_json(exclude_none=True))
    return result


def transaction_entry(
    resource: Any, *, if_none_exist: str | None = None, method: str = "POST", url: str | None = None
) -> dict[str, Any]:
    """A transaction Bundle entry for an R4B resource: a create (conditional with ``if_none_exist``) by default.

    ``if_none_exist`` is a search query without the type, e.g. ``identifier=urn:x|abc``; ``method="PUT"`` with
    ``url="Type/id"`` gives an update-as-create. Each entry gets a ``urn:uuid`` fullUrl so other entries of the
    same Bundle can reference it.
    """
    body = resource_json(resource)
    request: dict[str, str] = {"method": method, "url": url or body["resourceType"]}
    if if_none_exist is not None:
        request["ifNoneExist"] = if_none_exist
    return {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": body, "request": request}


@dataclass(frozen=True)
class EntryResult:
    """The server's answer to one write: HTTP status, Location (``Type/id/_history/n``), ETag, any diagnostics."""

    status: int
    location: str | None
    etag: str | None = None
    diagnostics: str = ""

    @property
    def created(self) -> bool:
        """True when the server created a resource (201); a conditional create that matched answers 200."""
        return self.status == 201

    @property
    def resource_id(self) -> str | None:
        """The id in the Location, e.g. ``123`` from ``RiskAssessment/123/_history/1``."""
        if not self.location:
            return None
        parts = self.location.split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        return parts[-1] if parts else None


def _status_code(status: str) -> int:
    """The HTTP status code at the start of an entry's ``response.status`` (``"201 Created"``), else 0."""
    match = re.match(r"\s*(\d{3})", status or "")
    return int(match.group(1)) if match else 0


def idempotent_entries(entries: Iterable[Mapping[str, Any]]) -> bool:
    """True when sending the entries twice changes nothing more than once: every one a GET, PUT, DELETE or a
    conditional create (``ifNoneExist``)."""
    return all(
        (entry.get("request") or {}).get("method") in ("GET", "PUT", "DELETE")
        or "ifNoneExist" in (entry.get("request") or {})
        for entry in entries
    )


def entry_results(answered: Sequence[Mapping[str, Any]]) -> list[EntryResult]:
    """One :class:`EntryResult` per entry of a transaction-response Bundle, in order, with any OperationOutcome's
    diagnostics."""
    results = []
    for item in answered:
        reply = item.get("response") or {}
        outcome = reply.get("outcome")
        reason = ""
        if isinstance(outcome, dict) and outcome.get("resourceType") == "OperationOutcome":
            reason = "; ".join(i.get("diagnostics", "") for i in outcome.get("issue") or [] if i.get("diagnostics"))
        results.append(
            EntryResult(_status_code(str(reply.get("status", ""))), reply.get("location"), reply.get("etag"), reason)
        )
    return results
