"""The FHIR R4 client: :class:`FhirClient`, the REST interactions riskbridge uses, over the one HTTP layer.

Reads and searches (following ``link[next]`` to the end within ``fhir.max_pages`` and never to a page already read,
restarting a search whose page expired, batched across patients with OR-lists and optionally run several at once),
transaction bundles and conditional creates for write-back, and note text from DocumentReference / DiagnosticReport
attachments (Binaries type-checked before their body is read, and streamed up to ``fhir.max_attachment_bytes``). A
client with credentials refuses a plain ``http://`` server that is not loopback. Requests go through
:class:`riskbridge.connectors.http.HttpTransport` (pooled Session, retries with backoff that honour ``Retry-After``,
the authorizer of :mod:`.auth`); query building and paging are :mod:`.search`'s, bundles :mod:`.bundles`', note text
:mod:`.notes`'. :func:`capability` is the one-shot ``/metadata`` check of ``riskbridge doctor``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests

from riskbridge.connectors.http import (
    FORM_CONTENT_TYPE,
    HttpTransport,
    RetryPolicy,
    new_session,
    transport_reason,
)
from riskbridge.settings import FhirSettings

from .auth import authorizer_for, check_credentials_transport, static_authorization
from .bundles import EntryResult, entry_results, idempotent_entries, resource_json
from .errors import FHIR_JSON, AttachmentError, AttachmentTooLargeError, FhirError, checked, diagnostics, json_object
from .notes import TEXT_MEDIA_TYPES, NoteText, generic_media_type, media_type, note_texts
from .search import (
    PageTrail,
    SearchParams,
    _PageExpired,
    check_fhir_id,
    encode_query,
    in_chunk_order,
    next_link,
    or_list_chunks,
    page_resources,
    restarting,
    search_pairs,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerInfo:
    """Who a FHIR server says it is, from its CapabilityStatement."""

    name: str
    version: str
    fhir_version: str


def session_for(fhir: FhirSettings) -> requests.Session:
    """Return a pooled Session with static authentication (none, basic, bearer) and FHIR JSON headers.

    Token-based authentication (oauth2, smart) needs a token endpoint round trip: use :class:`FhirClient`. Raises
    ConfigurationError when credentials would go over plain ``http://`` to a host that is not loopback.
    """
    check_credentials_transport(fhir)
    return new_session(
        pool_size=fhir.pool_size, headers={"Accept": FHIR_JSON}, authorization=static_authorization(fhir.auth)
    )


def capability(fhir: FhirSettings, session: requests.Session | None = None) -> ServerInfo:
    """Read ``/metadata`` and return the server's software name, version and FHIR version."""
    session = session or session_for(fhir)
    url = f"{fhir.base_url}/metadata"
    try:
        response = session.get(url, timeout=fhir.timeout_s)
    except requests.RequestException as exc:
        raise FhirError(f"GET {url}: {transport_reason(exc)}") from exc
    body = json_object(checked(response, f"GET {url}"), f"GET {url}")
    software = body.get("software") or {}
    return ServerInfo(
        name=software.get("name", "unknown"),
        version=software.get("version", "unknown"),
        fhir_version=body.get("fhirVersion", "unknown"),
    )


@dataclass
class ClientStats:
    """Counters of what a :class:`FhirClient` did (for logs, tests and benchmarks)."""

    requests: int = 0
    retries: int = 0
    pages: int = 0
    search_restarts: int = 0
    token_requests: int = 0
    token_renewals_on_401: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, counter: str, amount: int = 1) -> None:
        """Increase one counter; safe when searches run in several threads."""
        with self._lock:
            setattr(self, counter, getattr(self, counter) + amount)


def _transport_error(what: str, exc: requests.RequestException, attempts: int) -> FhirError:
    """The FhirError of a failure below HTTP that outlasted the attempts (or is not retried)."""
    return FhirError(f"{what}: {transport_reason(exc)} (attempt {attempts})")


class FhirClient:
    """A FHIR R4 REST client over one pooled requests Session (see the module docstring).

    Use it as a context manager or call :meth:`close`. Not meant to be shared between processes; threads may share
    it (requests Sessions are used that way widely, and the token cache is locked).
    """

    def __init__(
        self,
        settings: FhirSettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        session: requests.Session | None = None,
    ) -> None:
        """Build a client for ``settings``; ``sleep``, ``clock``, ``rng`` and ``session`` are replaceable for tests.

        A given ``session`` (e.g. with a site's TLS adapter) is used as it is; otherwise a pooled one is made.
        Either way :meth:`close` closes it. Raises ConfigurationError when ``settings.auth`` has credentials and
        ``base_url`` (or the token URL) is plain ``http://`` to a host that is not loopback.
        """
        check_credentials_transport(settings)
        self.settings = settings
        self.base_url = settings.base_url
        self.stats = ClientStats()
        self.clock = clock
        self.sleep = sleep
        retry = settings.retry
        self._http = HttpTransport(
            RetryPolicy(
                max_attempts=retry.max_attempts,
                backoff_base_s=retry.backoff_base_s,
                backoff_max_s=retry.backoff_max_s,
                max_retry_after_s=retry.max_retry_after_s,
            ),
            error=_transport_error,
            timeout=settings.timeout_s,
            session=session,
            owns_session=True,
            pool_size=settings.pool_size,
            headers={"Accept": FHIR_JSON},
            sleep=sleep,
            rng=rng,
            count=self.stats.add,
            log=log,
            label="fhir",
        )
        self._http.authorizer = authorizer_for(self, settings.auth)

    def __repr__(self) -> str:
        """Base URL and auth type only: never a credential."""
        return f"FhirClient(base_url={self.base_url!r}, auth={self.settings.auth.type!r})"

    def __enter__(self) -> FhirClient:
        """Use the client in a ``with`` block; it is closed at the end."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the client."""
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    # -- transport -------------------------------------------------------------------------------------------------

    def url_for(self, path: str) -> str:
        """The absolute URL of ``path`` (``Observation``, ``Binary/1``) or ``path`` itself if it is absolute.

        Raises FhirError for an absolute URL outside ``base_url``: credentials are only ever sent to the server.
        """
        if path.startswith(("http://", "https://")):
            if (
                path != self.base_url
                and not path.startswith(self.base_url + "/")
                and not path.startswith(self.base_url + "?")
            ):
                raise FhirError(
                    f"refusing a URL outside the FHIR server {self.base_url} (host {urlsplit(path).netloc})"
                )
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    def _describe(self, method: str, url: str) -> str:
        """``METHOD path`` relative to the base, without the query string (it may hold identifiers)."""
        path = urlsplit(url).path
        base_path = urlsplit(self.base_url).path
        relative = path[len(base_path) :] if path.startswith(base_path) else path
        return f"{method} {relative or '/'}"

    def send(
        self,
        method: str,
        url: str,
        *,
        what: str | None = None,
        params: Sequence[tuple[str, str]] | None = None,
        data: bytes | Mapping[str, str] | Callable[[], bytes | Mapping[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        authorize: bool = True,
        idempotent: bool = True,
        stream: bool = False,
    ) -> requests.Response:
        """Send one request with retries; return the final response whatever its status (callers check it).

        Retried: 429 and 503 always; 502, 504 and connection errors only when ``idempotent`` (the server may have
        processed the request). ``Retry-After`` is honoured up to ``retry.max_retry_after_s``; otherwise the wait
        is exponential backoff with jitter. A 401 renews an OAuth2/SMART token once. Raises FhirError for
        transport failures that outlast the attempts. With ``stream`` the body is read as the caller iterates it
        (large downloads such as bulk export files); the caller then closes the response.
        """
        return self._http.send(
            method,
            url,
            what=what or self._describe(method, url),
            params=params,
            data=data,
            headers=headers,
            authorize=authorize,
            idempotent=idempotent,
            stream=stream,
        )

    def _checked(self, response: requests.Response, what: str, expected: Iterable[int] = (200,)) -> requests.Response:
        """``response`` if its status is expected, else FhirError with the server's diagnostics."""
        return checked(response, what, tuple(expected))

    def _json(self, response: requests.Response, what: str) -> dict[str, Any]:
        """The answer's JSON object, else FhirError."""
        return json_object(response, what)

    # -- reads and searches ----------------------------------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """Read one resource as a dict."""
        url = self.url_for(f"{resource_type}/{check_fhir_id(resource_id)}")
        what = f"GET {resource_type}/{resource_id}"
        return self._json(self._checked(self.send("GET", url, what=what), what), what)

    def search(
        self,
        resource_type: str,
        params: SearchParams | None = None,
        *,
        page_size: int | None = None,
        method: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield every resource a search matches (dicts), following ``link[next]`` to the last page.

        ``_count`` is ``page_size`` (default ``settings.page_size``); ``method`` is "get" or "post" (``_search``
        with a form body; default ``settings.search_method``). Every request carries ``Cache-Control: no-cache`` so
        HAPI does not answer from a cached identical search. A page that answers 410 Gone (the server dropped the
        search) restarts the search from its first page; resources already yielded are skipped (by type and id).
        Entries with search mode ``outcome`` are not yielded. A ``link[next]`` back to a page already read (a cycle),
        or one past ``settings.max_pages`` pages, raises FhirError naming the search, never its query.
        """
        pairs = [pair for pair in search_pairs(params) if pair[0] != "_count"]
        pairs.append(("_count", str(page_size or self.settings.page_size)))
        use_post = (method or self.settings.search_method).lower() == "post"
        yield from restarting(
            resource_type,
            lambda seen: self._search_once(resource_type, pairs, use_post, seen),
            lambda: self.stats.add("search_restarts"),
        )

    def _search_once(
        self, resource_type: str, pairs: list[tuple[str, str]], use_post: bool, seen: set[str]
    ) -> Iterator[dict[str, Any]]:
        """One pass over a search's pages from the first; raises ``_PageExpired`` when a next page answers 410."""
        headers = {"Cache-Control": "no-cache"}
        if use_post:
            what = f"POST {resource_type}/_search"
            body = encode_query(pairs).encode("ascii")
            response = self.send(
                "POST",
                self.url_for(f"{resource_type}/_search"),
                what=what,
                data=body,
                headers={**headers, "Content-Type": FORM_CONTENT_TYPE},
            )
        else:
            what = f"GET {resource_type}"
            url = f"{self.url_for(resource_type)}?{encode_query(pairs)}"
            response = self.send("GET", url, what=what, headers=headers)
        trail = PageTrail(f"{resource_type} search", self.settings.max_pages, None if use_post else url)
        while True:
            bundle = self._json(self._checked(response, what), what)
            self.stats.add("pages")
            yield from page_resources(bundle, seen)
            next_url = next_link(bundle)
            if not next_url:
                return
            target = self.url_for(next_url)
            page = trail.follow(target)
            what = f"GET {resource_type} search page {page}"
            response = self.send("GET", target, what=what, headers=headers)
            if response.status_code == 410:
                response.close()
                raise _PageExpired

    def search_by_patients(
        self,
        resource_type: str,
        patient_ids: Iterable[str],
        params: SearchParams | None = None,
        *,
        patient_param: str = "subject",
        page_size: int | None = None,
        method: str | None = None,
        workers: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield the resources of many patients with few searches: ``subject=Patient/a,Patient/b,...`` OR-lists.

        Patients are chunked by ``settings.batch_size`` and, for GET, so the URL stays under
        ``settings.max_url_length``; each chunk is one :meth:`search` (paged to the end). With ``workers`` > 1
        (default ``settings.search_workers``) that many chunks are searched at once in threads, and each chunk's
        resources are yielded, in chunk order, once its search is complete. Group the results with
        :func:`~riskbridge.connectors.fhir.subject_patient_id`.
        """
        references = [f"Patient/{check_fhir_id(pid)}" for pid in dict.fromkeys(patient_ids)]
        if not references:
            return
        pairs = [pair for pair in search_pairs(params) if pair[0] not in (patient_param, "_count")]
        pairs.append(("_count", str(page_size or self.settings.page_size)))
        use_post = (method or self.settings.search_method).lower() == "post"
        if use_post:
            limit = self.settings.batch_size
            chunks = [references[i : i + limit] for i in range(0, len(references), limit)]
        else:
            prefix = f"{self.url_for(resource_type)}?{encode_query(pairs)}&{patient_param}="
            try:
                chunks = or_list_chunks(prefix, references, self.settings.max_url_length, self.settings.batch_size)
            except ValueError as exc:
                raise FhirError(f"{resource_type} search: {exc}; raise fhir.max_url_length or use POST") from None
        log.debug("fhir: %s for %d patients in %d searches", resource_type, len(references), len(chunks))
        searches = [[*pairs, (patient_param, ",".join(chunk))] for chunk in chunks]
        parallel = min(workers or self.settings.search_workers, len(searches))
        if parallel <= 1:
            for search_pairs_of_chunk in searches:
                yield from self.search(resource_type, search_pairs_of_chunk, page_size=page_size, method=method)
            return

        def collect(chunk_pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
            """One chunk's search, read to the end."""
            return list(self.search(resource_type, chunk_pairs, page_size=page_size, method=method))

        yield from in_chunk_order(collect, searches, parallel)

    # -- writes ----------------------------------------------------------------------------------------------------

    def transaction(self, entries: Sequence[Mapping[str, Any]]) -> list[EntryResult]:
        """POST a transaction Bundle of ``entries`` (see :func:`transaction_entry`); one result per entry, in order.

        The server applies all entries or none; a refused transaction raises FhirError with its diagnostics. The
        transaction is retried on 502/504/connection errors only when every entry is idempotent (a conditional
        create, PUT, GET or DELETE).
        """
        if not entries:
            return []
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}
        what = f"POST transaction of {len(entries)} entries"
        response = self.send(
            "POST",
            self.base_url,
            what=what,
            data=json.dumps(bundle).encode("utf-8"),
            headers={"Content-Type": FHIR_JSON, "Prefer": "return=minimal"},
            idempotent=idempotent_entries(entries),
        )
        answer = self._json(self._checked(response, what), what)
        answered = answer.get("entry") or []
        if len(answered) != len(entries):
            raise FhirError(f"{what}: the server answered {len(answered)} entries", response.status_code)
        results = entry_results(answered)
        created = sum(result.created for result in results)
        log.info("fhir: transaction of %d entries: %d created, %d not", len(results), created, len(results) - created)
        return results

    def conditional_create(self, resource: Any, if_none_exist: str) -> EntryResult:
        """POST one R4B resource with ``If-None-Exist`` (e.g. ``identifier=urn:x|abc``): 201 created, 200 existed.

        Several matches (HAPI: 412) raise FhirError. Conditional creates of one identifier must not run in
        parallel: the server can then create duplicates.
        """
        body = resource_json(resource)
        resource_type = body["resourceType"]
        what = f"POST {resource_type} (conditional create)"
        response = self.send(
            "POST",
            self.url_for(resource_type),
            what=what,
            data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": FHIR_JSON, "If-None-Exist": if_none_exist, "Prefer": "return=minimal"},
        )
        self._checked(response, what, expected=(200, 201))
        location = response.headers.get("Location") or response.headers.get("Content-Location")
        return EntryResult(response.status_code, location, response.headers.get("ETag"))

    # -- notes -----------------------------------------------------------------------------------------------------

    def read_binary(self, url: str, *, media_types: Collection[str] | None = None) -> tuple[bytes, str | None]:
        """Read a Binary (relative ``Binary/id`` or an absolute URL on the server): its bytes and contentType.

        Accepts both answers servers give: the Binary resource as FHIR JSON (``data`` in base64) or the raw
        content with its own Content-Type. The body is streamed and read only up to ``settings.max_attachment_bytes``
        (the decoded content; the JSON form may be a third larger): beyond it, or when ``Content-Length`` already
        says so, :class:`AttachmentTooLargeError`. With ``media_types`` (e.g. the text types) a content whose
        served type is known and not one of them is not read: the answer is ``(b"", served type)``; a missing or
        ``application/octet-stream`` type is read. A Binary that is gone (404, 410), a JSON answer
        that cannot be read, or invalid base64 raise :class:`AttachmentError`; other failures FhirError.
        """
        target = self.url_for(url)
        what = self._describe("GET", target)
        limit = self.settings.max_attachment_bytes
        response = self.send("GET", target, what=what, headers={"Accept": f"{FHIR_JSON}, */*;q=0.5"}, stream=True)
        with response:
            if response.status_code in _UNREADABLE_BINARY_STATUSES:
                reason = diagnostics(response)
                raise AttachmentError(f"{what}: {response.status_code} {reason}".rstrip(), response.status_code, reason)
            self._checked(response, what)
            served = response.headers.get("Content-Type")
            if media_type(served) in (FHIR_JSON, "application/json"):
                # base64 makes the JSON form about 4/3 of the content; leave room for the resource around it.
                body = _read_capped(response, limit // 3 * 4 + _BINARY_JSON_OVERHEAD, what, limit)
                binary = _json_body(body, what)
                if binary.get("resourceType") != "Binary":
                    if len(body) > limit:
                        raise AttachmentTooLargeError(f"{what}: {_too_large(limit)}", response.status_code)
                    return body, served
                return _binary_content(binary, what, limit, media_types)
            if media_types is not None and not _wanted(served, media_types):
                log.debug("fhir: %s: a %s Binary, not read", what, media_type(served))
                return b"", served
            return _read_capped(response, limit, what, limit), served

    def note_texts(self, resource: Mapping[str, Any]) -> list[NoteText]:
        """The text of a DocumentReference's or DiagnosticReport's notes, decoded with their charset.

        See :func:`riskbridge.connectors.fhir.notes.note_texts`; attachments given by ``url`` are read with
        :meth:`read_binary` (a Binary on this server), whose body is not read when the server serves a type other
        than text. Attachments are capped at ``settings.max_attachment_bytes``: a larger one raises
        :class:`AttachmentTooLargeError`, and one that cannot be read (bad base64, a Binary gone) another
        :class:`AttachmentError`; the caller records that note as unreadable.
        """

        def read_text_binary(url: str) -> tuple[bytes, str | None]:
            """A Binary read for a note: a body the server says is not text is not downloaded."""
            return self.read_binary(url, media_types=TEXT_MEDIA_TYPES)

        return note_texts(resource, read_text_binary, max_bytes=self.settings.max_attachment_bytes)


# --- Binary reads --------------------------------------------------------------------------------------------------

# A Binary answered with these is gone for this one note (not a failing server). A 401/403 stays a FhirError: it
# usually means credentials or scopes that fail every read, which must not pass as unreadable notes.
_UNREADABLE_BINARY_STATUSES = frozenset({404, 410})
_BINARY_JSON_OVERHEAD = 64 * 1024
_CHUNK_BYTES = 64 * 1024


def _too_large(limit: int) -> str:
    """The reason of an attachment over the cap."""
    return f"attachment larger than fhir.max_attachment_bytes ({limit} bytes); not read"


def _read_capped(response: requests.Response, cap: int, what: str, limit: int) -> bytes:
    """A streamed body read to its end, or AttachmentTooLargeError as soon as it passes ``cap`` bytes (or its
    ``Content-Length`` says it will); ``limit`` is the setting named in the message."""
    declared = response.headers.get("Content-Length", "").strip()
    if declared.isdigit() and int(declared) > cap:
        raise AttachmentTooLargeError(f"{what}: {_too_large(limit)}", response.status_code)
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_content(_CHUNK_BYTES):
        total += len(chunk)
        if total > cap:
            raise AttachmentTooLargeError(f"{what}: {_too_large(limit)}", response.status_code)
        chunks.append(chunk)
    return b"".join(chunks)


def _json_body(body: bytes, what: str) -> dict[str, Any]:
    """The JSON object of a Binary answer; AttachmentError when it is not JSON or not an object."""
    try:
        parsed = json.loads(body)
    except ValueError:
        raise AttachmentError(f"{what}: the answer is not JSON", 200) from None
    if not isinstance(parsed, dict):
        raise AttachmentError(f"{what}: the answer is not a JSON object", 200)
    return parsed


def _wanted(content_type: str | None, media_types: Collection[str]) -> bool:
    """True when a served type is one of ``media_types``, or says nothing (missing, ``application/octet-stream``)."""
    return generic_media_type(content_type) or media_type(content_type) in media_types


def _binary_content(
    binary: Mapping[str, Any], what: str, limit: int, media_types: Collection[str] | None
) -> tuple[bytes, str | None]:
    """The decoded content of a Binary resource and its contentType: checked against ``media_types`` before it is
    decoded, and against the cap."""
    content_type = binary.get("contentType")
    if media_types is not None and not _wanted(content_type, media_types):
        log.debug("fhir: %s: a %s Binary, not decoded", what, media_type(content_type))
        return b"", content_type
    data = binary.get("data") or ""
    if not isinstance(data, str):
        raise AttachmentError(f"{what}: Binary.data is not valid base64")
    if len(data.rstrip("=")) * 3 // 4 > limit:
        raise AttachmentTooLargeError(f"{what}: {_too_large(limit)}", 200)
    try:
        return base64.b64decode(data, validate=True), content_type
    except (binascii.Error, ValueError):
        raise AttachmentError(f"{what}: Binary.data is not valid base64") from None
