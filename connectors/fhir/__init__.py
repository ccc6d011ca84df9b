"""FHIR R4 server I/O: authentication and the REST interactions riskbridge uses, through the one HTTP layer.

:class:`FhirClient` is what the pipeline uses: searches that follow ``link[next]`` to the end (restarting a search
whose page expired; stopped by a paging cycle or ``fhir.max_pages``), batched across patients with OR-lists, retries
with backoff that honour ``Retry-After`` (:mod:`riskbridge.connectors.http`), OAuth2 client credentials and SMART
Backend Services tokens cached until they expire, transaction bundles and conditional creates for write-back, and
note text from DocumentReference / DiagnosticReport attachments (type-checked before download, capped at
``fhir.max_attachment_bytes``). Credentials are never sent over plain ``http://`` to a host that is not loopback.
Resources are read as plain dicts (validating them with fhir.resources costs ~100x more); resources sent to the
server are built with ``fhir.resources.R4B`` models (the package's default models are R5) and serialized with
:func:`resource_json`.

The package is split by concern: :mod:`.client` (the client and ``/metadata``), :mod:`.auth` (static, OAuth2 and
SMART credentials), :mod:`.search` (query strings, OR-lists, paging), :mod:`.bundles` (outgoing resources and
transaction answers), :mod:`.notes` (attachment text), :mod:`.bulk` (Bulk Data ``$export`` jobs and their NDJSON
files) and :mod:`.errors`. Import from here: ``from riskbridge.connectors.fhir import FhirClient, code_filter``.

Errors are :class:`FhirError` (a :class:`riskbridge.errors.FhirServerError`) carrying the HTTP status and the
OperationOutcome's diagnostics, so a message reads like ``GET /metadata: 503 HAPI-1234: ...``. Log lines and error
messages name resource types, ids, counts and statuses only: never a query string (it can hold an MRN), a token or
a secret.
"""

from __future__ import annotations

from riskbridge.connectors.http import (
    FORM_CONTENT_TYPE,
    NOT_PROCESSED_STATUSES,
    RETRY_STATUSES,
    backoff_delay,
    basic_authorization,
    parse_retry_after,
    transport_reason,
)

from .auth import (
    CLIENT_ASSERTION_LIFETIME_S,
    CLIENT_ASSERTION_TYPE,
    DEFAULT_TOKEN_LIFETIME_S,
    check_credentials_transport,
    is_loopback_host,
    load_private_key,
    smart_client_assertion,
)
from .bulk import BulkExport, BulkExportError, bulk_export, read_ndjson, supports_bulk_export
from .bundles import EntryResult, resource_json, transaction_entry
from .client import ClientStats, FhirClient, ServerInfo, capability, session_for
from .errors import FHIR_JSON, AttachmentError, AttachmentTooLargeError, FhirError, diagnostics
from .notes import (
    GENERIC_MEDIA_TYPES,
    TEXT_MEDIA_TYPES,
    NoteText,
    attachment_text,
    content_type_charset,
    decode_text,
    generic_media_type,
    html_to_text,
    media_type,
)
from .search import (
    MAX_SEARCH_RESTARTS,
    QUERY_SAFE,
    PageTrail,
    SearchParams,
    check_fhir_id,
    code_filter,
    date_filter,
    encode_query,
    or_list_chunks,
    referenced_id,
    search_pairs,
    subject_patient_id,
)

__all__ = [
    "CLIENT_ASSERTION_LIFETIME_S",
    "CLIENT_ASSERTION_TYPE",
    "DEFAULT_TOKEN_LIFETIME_S",
    "FHIR_JSON",
    "FORM_CONTENT_TYPE",
    "GENERIC_MEDIA_TYPES",
    "MAX_SEARCH_RESTARTS",
    "NOT_PROCESSED_STATUSES",
    "QUERY_SAFE",
    "RETRY_STATUSES",
    "TEXT_MEDIA_TYPES",
    "AttachmentError",
    "AttachmentTooLargeError",
    "BulkExport",
    "BulkExportError",
    "ClientStats",
    "EntryResult",
    "FhirClient",
    "FhirError",
    "NoteText",
    "PageTrail",
    "SearchParams",
    "ServerInfo",
    "attachment_text",
    "backoff_delay",
    "basic_authorization",
    "bulk_export",
    "capability",
    "check_credentials_transport",
    "check_fhir_id",
    "code_filter",
    "content_type_charset",
    "date_filter",
    "decode_text",
    "diagnostics",
    "encode_query",
    "generic_media_type",
    "html_to_text",
    "is_loopback_host",
    "load_private_key",
    "media_type",
    "or_list_chunks",
    "parse_retry_after",
    "read_ndjson",
    "referenced_id",
    "resource_json",
    "search_pairs",
    "session_for",
    "smart_client_assertion",
    "subject_patient_id",
    "supports_bulk_export",
    "transaction_entry",
    "transport_reason",
]
