"""DICOMweb retrieval: QIDO-RS to list a series' instances, WADO-RS to stream them into the staging area.

The third transport next to C-MOVE and C-GET (``pacs.transport = "dicomweb"``, or ``auto`` when
:meth:`DicomwebClient.supports_dicomweb` says the PACS answers). A whole series is one WADO-RS request,
``GET {base}/studies/{study}/series/{series}`` with ``Accept: multipart/related; type="application/dicom";
transfer-syntax=*`` (the instances as the PACS stores them, no transcoding) and ``Accept-Encoding: identity``
(Orthanc gzips single-instance answers otherwise, which made it 14-20x slower). Requests go through the one HTTP
layer (:mod:`riskbridge.connectors.http`: a pooled Session; a GET whose connection failed before any answer is sent
again, a body that breaks off mid-stream never), with the same authentication as FHIR (``pacs.dicomweb.auth``:
none, basic, bearer, oauth2, smart; refused over plain ``http://`` to a host that is not loopback), a site CA
bundle and an optional client certificate (``pacs.dicomweb.tls``). The response is streamed through the
incremental multipart/related parser of :mod:`riskbridge.connectors.multipart` (:func:`iter_multipart`) and every
part is written atomically to ``<staging>/<study>/<series>/<SOPInstanceUID>.dcm`` from the bytes as received
(:func:`stage_multipart`; the SOPInstanceUID comes from the part's file meta, never from decoding the dataset).

Only parts verified as the instance they claim to be are staged (:mod:`.multipart`: Content-Type, file meta,
transfer syntax, SOP class, and the SOP class, instance, study and series the dataset itself names). A part that
fails this fails its request (:class:`DicomwebError`, not transient: asking again gets the same answer); a
verified part naming an instance the series' QIDO-RS listing lacks (or, for a single-instance request, not that
instance) is refused alone and the rest is staged. Every refusal is logged (hashed UIDs) and recorded in
:attr:`DicomwebClient.refusals`.

Answers are read within caps, each violation a :class:`DicomwebError`, never a silent truncation: a part over
``max_part_bytes`` (``pacs.dicomweb.max_part_mb``), a QIDO-RS listing that still grows after ``max_pages`` pages, a
JSON answer over :data:`MAX_JSON_BYTES`. Of an error answer at most ``max_error_body_bytes`` are read, for its
reason.

Completeness is decided by comparing the staged instances with QIDO-RS's list, never by the HTTP status: the
whole-series answer of Orthanc is delimited by closing the connection, so a server that dies mid-stream looks
like a short body; the parser insists on the closing delimiter. :meth:`DicomwebClient.retrieve_series` retries
only what is missing, a bounded number of times.

Every failure is a :class:`DicomwebError` naming the URL path with UIDs replaced by
:func:`riskbridge.records.uid_hash`, the HTTP status and a short reason; nothing identifying is logged, and never
a query string, a token or a secret.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from riskbridge.errors import ConfigurationError
from riskbridge.records import RetrievedSeries, uid_hash
from riskbridge.settings import FhirAuth, PacsSettings

from . import staging
from .dicom import DicomError
from .http import (
    TRANSIENT_STATUSES,
    CertificateFiles,
    HttpTransport,
    RetryPolicy,
    authorizer_for,
    backoff_delay,
    check_credentials_url,
    root_cause,
    tls_files,
)
from .multipart import (
    CT_STORAGE_CLASSES,
    HEAD_BYTES,
    MultipartError,
    MultipartPart,
    PartTooLargeError,
    RefusedPart,
    RejectedPartError,
    StagedParts,
    boundary_from_content_type,
    iter_multipart,
    stage_multipart,
)

__all__ = [
    "CHUNK_SIZE",
    "CT_STORAGE_CLASSES",
    "DEFAULT_MAX_ERROR_BODY_BYTES",
    "DEFAULT_MAX_PAGES",
    "DEFAULT_MAX_PART_BYTES",
    "DICOM_JSON",
    "HEAD_BYTES",
    "MAX_JSON_BYTES",
    "REQUEST_POLICY",
    "WADO_ACCEPT",
    "DicomwebClient",
    "DicomwebError",
    "MultipartError",
    "MultipartPart",
    "PartTooLargeError",
    "RefusedPart",
    "RejectedPartError",
    "StagedParts",
    "TransferCounters",
    "boundary_from_content_type",
    "iter_multipart",
    "redact",
    "stage_multipart",
]

LOG = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHUNK_SIZE = 1 << 20
# Each request: a GET whose connection failed before any answer arrived (e.g. a keep-alive connection the server
# closed: Orthanc's keep-alive timeout is 1 s) is sent up to three times in all, after 0.1-0.2 s and 0.2-0.4 s.
# HTTP error statuses are not retried here: they fail the request as DicomwebError (``transient`` for
# TRANSIENT_STATUSES) and retrieve_series fetches what is still missing.
REQUEST_POLICY = RetryPolicy(
    max_attempts=3,
    backoff_base_s=0.2,
    backoff_max_s=0.4,
    retry_statuses=frozenset(),
    not_processed_statuses=frozenset(),
)
MAX_SERIES_BACKOFF_S = 8.0
MIB = 1024 * 1024
# The defaults of pacs.dicomweb.max_part_mb, max_error_body_kb and max_pages (riskbridge.settings.DicomwebSettings).
DEFAULT_MAX_PART_BYTES = 512 * MIB
DEFAULT_MAX_ERROR_BODY_BYTES = 4 * 1024
DEFAULT_MAX_PAGES = 100
# A QIDO-RS page of 1000 matches with every attribute is a few MB; an answer past this is not one.
MAX_JSON_BYTES = 64 * MIB

_UID_TEXT = re.compile(r"\b\d+(?:\.\d+){3,}\b")  # free text: UIDs, not version numbers
_UID_SEGMENT = re.compile(r"\d+(?:\.\d+)+")


class DicomwebError(DicomError):
    """A DICOMweb request failed: the message names the path (UIDs hashed), the HTTP status and the reason.

    A :class:`~riskbridge.connectors.dicom.DicomError`, so a :class:`riskbridge.errors.PacsError`. ``status`` is
    None when no HTTP answer came (connection refused, timeout). ``transient`` says whether trying again may help
    (connection errors, 408/429/5xx, a truncated stream); a refused instance or a 404 is not transient.
    """

    def __init__(self, path: str, status: int | None, reason: str, transient: bool = False) -> None:
        """Keep the fields for callers and pickling; the message is built from them."""
        self.path = path
        self.status = status
        self.reason = reason
        self.transient = transient
        shown = f"HTTP {status}" if status is not None else "no HTTP answer"
        super().__init__(f"DICOMweb {path}: {shown}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuild from the fields when unpickled."""
        # Picklable with its fields, so it crosses process boundaries (retrieval worker processes).
        return type(self), (self.path, self.status, self.reason, self.transient)


def redact(text: str) -> str:
    """Replace everything that looks like a DICOM UID in ``text`` by its :func:`uid_hash`."""
    return _UID_TEXT.sub(lambda match: uid_hash(match.group(0)), text)


# --------------------------------------------------------------------------------------------------------------
# the client


@dataclass
class TransferCounters:
    """Running totals of one client: HTTP requests, their retries, instances staged, bytes staged, seconds spent,
    parts refused."""

    requests: int = 0
    retries: int = 0
    instances: int = 0
    bytes: int = 0
    seconds: float = 0.0
    refused: int = 0


class DicomwebClient:
    """QIDO-RS and WADO-RS against one DICOMweb base URL (e.g. ``http://pacs:8042/dicom-web``).

    ``auth`` is an auth section like ``fhir.auth`` (none, basic, bearer, oauth2, smart; :func:`from_settings` takes
    ``pacs.dicomweb.auth``): with credentials, ``base_url`` and a token URL must be https:// unless their host is
    loopback, else ConfigurationError here. Pass ``session`` to use a :class:`requests.Session` as it is (a site's
    TLS adapter); otherwise the client makes its own pooled session (:func:`riskbridge.connectors.http.new_session`:
    ``verify`` is True or a CA bundle file, ``client_cert`` a PEM certificate and key pair) and closes it in
    :meth:`close`. Requests are retried by :data:`REQUEST_POLICY`. ``timeout_s`` bounds connecting and each wait for
    bytes (not a whole transfer). ``allowed_sop_classes`` are the SOP classes a retrieved part may have (None:
    any). ``max_attempts`` bounds :meth:`retrieve_series`' tries, waiting ``backoff_s`` (doubling, with jitter)
    between them. Missing instances are fetched one request each only while they are at most
    ``single_fetch_limit`` and at most an eighth of the series: on Orthanc 1.10 one single-instance request took
    about 3.5 ms, a whole series 0.4-0.7 ms per instance. ``max_part_bytes`` (None: no cap), ``max_pages`` and
    ``max_error_body_bytes`` are the caps of the module docstring; ``qido_page_size`` is QIDO-RS's ``limit``.
    """

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 30.0,
        session: requests.Session | None = None,
        allowed_sop_classes: Iterable[str] | None = CT_STORAGE_CLASSES,
        max_attempts: int = 3,
        single_fetch_limit: int = 16,
        chunk_size: int = CHUNK_SIZE,
        qido_page_size: int = 1000,
        backoff_s: float = 0.5,
        *,
        auth: FhirAuth | None = None,
        verify: bool | str | Path = True,
        client_cert: CertificateFiles | None = None,
        max_part_bytes: int | None = DEFAULT_MAX_PART_BYTES,
        max_pages: int = DEFAULT_MAX_PAGES,
        max_error_body_bytes: int = DEFAULT_MAX_ERROR_BODY_BYTES,
    ) -> None:
        """Check the base URL and the credentials' transport, set up the HTTP transport; nothing is sent yet."""
        if not base_url.startswith(("http://", "https://")):
            raise DicomwebError("(base URL)", None, "the DICOMweb URL must start with http:// or https://")
        if urlsplit(base_url).username is not None:
            # requests would send them as Basic auth, past the check below, and they would show wherever the URL does.
            raise ConfigurationError("pacs.dicomweb_url: credentials in the URL are refused; use pacs.dicomweb.auth")
        auth = auth or FhirAuth()
        check_credentials_url(auth, base_url, base_key="pacs.dicomweb_url", auth_key="pacs.dicomweb.auth")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.auth_type = auth.type
        self._http = HttpTransport(
            REQUEST_POLICY,
            error=self._transport_error,
            timeout=(min(timeout_s, 10.0), timeout_s),
            session=session,
            pool_size=4,
            pool_connections=4,
            verify=verify,
            client_cert=client_cert,
            count=self._count,
            log=LOG,
            label="DICOMweb",
        )
        self._http.authorizer = authorizer_for(
            auth,
            self._http,
            error=_token_errors(auth.token_url),
            setting="pacs.dicomweb.auth",
            key_error=ConfigurationError,
        )
        self.session = self._http.session
        self.allowed_sop_classes = frozenset(allowed_sop_classes) if allowed_sop_classes is not None else None
        self.max_attempts = max(1, max_attempts)
        self.single_fetch_limit = single_fetch_limit
        self.chunk_size = chunk_size
        self.qido_page_size = qido_page_size
        self.backoff_s = backoff_s
        self.max_part_bytes = max_part_bytes
        self.max_pages = max(1, max_pages)
        self.max_error_body_bytes = max_error_body_bytes
        self.counters = TransferCounters()
        self.refusals: list[RefusedPart] = []
        # Files are written on these threads while the next parts are read off the socket, and each answer's files
        # are fsynced together before they are renamed: an fsync per file in line cut this client's throughput by
        # more than half (docs/retrieval.md "Staging on disk").
        self.writer = staging.BackgroundWriter()

    @classmethod
    def from_settings(cls, pacs: PacsSettings, session: requests.Session | None = None) -> DicomwebClient:
        """Build a client from the PACS settings (``dicomweb_url``, ``timeout_s``, ``max_attempts`` and the
        ``dicomweb`` section: auth, TLS, caps, QIDO-RS page size)."""
        if not pacs.dicomweb_url:
            raise DicomwebError("(settings)", None, "pacs.dicomweb_url is not set")
        web = pacs.dicomweb
        verify, client_cert = tls_files(web.tls)
        return cls(
            pacs.dicomweb_url,
            timeout_s=pacs.timeout_s,
            session=session,
            max_attempts=pacs.max_attempts,
            qido_page_size=web.qido_page_size,
            auth=web.auth,
            verify=verify,
            client_cert=client_cert,
            max_part_bytes=web.max_part_mb * MIB,
            max_pages=web.max_pages,
            max_error_body_bytes=web.max_error_body_kb * 1024,
        )

    def __repr__(self) -> str:
        """Base URL and auth type only: never a credential."""
        return f"DicomwebClient(base_url={self.base_url!r}, auth={self.auth_type!r})"  # no userinfo: refused

    def close(self) -> None:
        """Close the session if the client made it, and stop the staging writer threads."""
        self._http.close()
        self.writer.close()

    def __enter__(self) -> DicomwebClient:
        """Use the client in a ``with`` block; it is closed at the end."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the client."""
        self.close()

    # HTTP plumbing
    @staticmethod
    def _route(*segments: str) -> tuple[str, str]:
        """Return the path and its loggable form (every UID segment hashed)."""
        path = "/" + "/".join(segments)
        shown = "/" + "/".join(uid_hash(s) if _UID_SEGMENT.fullmatch(s) else s for s in segments)
        return path, shown

    def _count(self, counter: str) -> None:
        """Count the HTTP layer's retries (requests are counted once each in :meth:`_get`, retried or not)."""
        if counter == "retries":
            self.counters.retries += 1

    def _transport_error(self, shown: str, exc: requests.RequestException, attempts: int) -> DicomwebError:
        """The transient DicomwebError of a request that got no HTTP answer (refused, timed out, broken)."""
        if isinstance(exc, requests.Timeout):
            reason = f"no answer within {self.timeout_s:g} s"
        elif isinstance(exc, requests.ConnectionError):
            reason = f"cannot connect ({root_cause(exc)})"
        else:
            reason = f"request failed ({type(exc).__name__})"
        return DicomwebError(shown, None, reason, transient=True)

    def _get(self, path: str, shown: str, accept: str, params: dict[str, Any] | None = None) -> requests.Response:
        """GET ``path`` through the HTTP layer, streamed (bodies are read within caps); DicomwebError for no answer
        or an HTTP error status, whose body is read only up to ``max_error_body_bytes``."""
        headers = {"Accept": accept, "Accept-Encoding": "identity"}
        self.counters.requests += 1
        response = self._http.send("GET", self.base_url + path, what=shown, params=params, headers=headers, stream=True)
        if response.status_code >= 400:
            with response:
                reason = self._error_reason(response, shown)
            raise DicomwebError(
                shown, response.status_code, reason, transient=response.status_code in TRANSIENT_STATUSES
            )
        return response

    def _chunks(self, response: requests.Response, shown: str, chunk_size: int | None = None) -> Iterator[bytes]:
        """The body of a streamed answer; a connection lost mid-stream is a transient DicomwebError."""
        try:
            yield from response.iter_content(chunk_size=chunk_size or self.chunk_size)
        except requests.RequestException as exc:
            raise DicomwebError(
                shown, response.status_code, f"connection lost mid-stream ({root_cause(exc)})", transient=True
            ) from None

    def _read(self, response: requests.Response, shown: str, limit: int) -> bytes | None:
        """The body of a streamed answer if it is at most ``limit`` bytes, else None (read no further than that)."""
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            return None
        data = bytearray()
        for chunk in self._chunks(response, shown, min(limit + 1, 64 * 1024)):
            data += chunk
            if len(data) > limit:
                return None
        return bytes(data)

    def _json(self, response: requests.Response, shown: str) -> Any:
        """The JSON of an answer, read up to :data:`MAX_JSON_BYTES`; DicomwebError when it is larger or not JSON."""
        data = self._read(response, shown, MAX_JSON_BYTES)
        if data is None:
            raise DicomwebError(shown, response.status_code, f"the answer is larger than {MAX_JSON_BYTES // MIB} MiB")
        try:
            return json.loads(data)
        except ValueError:
            raise DicomwebError(shown, response.status_code, "QIDO-RS answer is not JSON") from None

    def _error_reason(self, response: requests.Response, shown: str) -> str:
        """A short reason for an HTTP error answer: the reason phrase and, from an Orthanc JSON body of at most
        ``max_error_body_bytes``, its message; a larger body is not read."""
        reason = response.reason or "error"
        try:
            data = self._read(response, shown, self.max_error_body_bytes)
        except DicomwebError:
            data = None  # the error body broke off: the status says enough
        body: Any = None
        if data is None:
            reason = f"{reason} (error body over {self.max_error_body_bytes} bytes, not read)"
        else:
            try:
                body = json.loads(data)
            except ValueError:
                body = None
        if isinstance(body, dict) and isinstance(body.get("Message"), str):
            reason = f"{reason} ({body['Message'][:120]})"
        return redact(reason)

    # QIDO-RS
    def supports_dicomweb(self) -> bool:
        """True when QIDO-RS ``/studies?limit=1`` answers 200 or 204 with DICOM JSON; never raises."""
        path, shown = self._route("studies")
        try:
            response = self._get(path, shown, DICOM_JSON, params={"limit": 1})
            with response:
                if response.status_code == 204:
                    return True
                content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if response.status_code != 200 or content_type not in (DICOM_JSON, "application/json"):
                    LOG.info("DICOMweb probe: %s answered %d with %r", shown, response.status_code, content_type)
                    return False
                answer = self._json(response, shown)
        except DicomwebError as exc:
            LOG.info("DICOMweb probe: %s", exc)
            return False
        if not isinstance(answer, list):
            LOG.info("DICOMweb probe: %s answered JSON that is not a list", shown)
            return False
        return True

    def series_instances(self, study_uid: str, series_uid: str) -> set[str]:
        """Return the SOPInstanceUIDs QIDO-RS lists for a series (empty when the series is unknown).

        Pages with ``limit``/``offset`` until a page is empty or adds nothing new, so a server that caps its
        result size silently (or ignores paging) still gives the full list. A listing that still grows on page
        ``max_pages`` + 1 raises :class:`DicomwebError` (a server paging without end), never a partial list.
        """
        _check_uids(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        path, shown = self._route("studies", study_uid, "series", series_uid, "instances")
        found: set[str] = set()
        offset = 0
        pages = 0
        while True:
            params = {"limit": self.qido_page_size, "offset": offset, "includefield": "00080018"}
            response = self._get(path, shown, DICOM_JSON, params=params)
            with response:
                if response.status_code == 204:
                    return found
                page = self._json(response, shown)
            if not isinstance(page, list):
                raise DicomwebError(shown, response.status_code, "QIDO-RS answer is not a JSON array")
            before = len(found)
            for entry in page:
                values = entry.get("00080018", {}).get("Value") if isinstance(entry, dict) else None
                if not values or not isinstance(values[0], str):
                    raise DicomwebError(shown, response.status_code, "a QIDO-RS match has no SOPInstanceUID")
                found.add(values[0])
            if not page or len(found) == before:
                return found
            pages += 1
            if pages > self.max_pages:
                raise DicomwebError(
                    shown,
                    response.status_code,
                    f"the listing still grows after {self.max_pages} pages of {self.qido_page_size} "
                    "(pacs.dicomweb.max_pages)",
                )
            offset += len(page)

    # WADO-RS
    def _stage_response(
        self,
        path: str,
        shown: str,
        study_uid: str,
        series_uid: str,
        staging_root: Path,
        only: Collection[str] | None,
    ) -> StagedParts:
        """Stage the multipart answer of one WADO-RS GET; every failure becomes a DicomwebError, every refused part
        is recorded."""
        started = time.perf_counter()
        response = self._get(path, shown, WADO_ACCEPT)
        with response:
            try:
                boundary = boundary_from_content_type(response.headers.get("Content-Type", ""))
                staged = stage_multipart(
                    self._chunks(response, shown),
                    boundary,
                    staging_root,
                    study_uid,
                    series_uid,
                    self.allowed_sop_classes,
                    only,
                    self.max_part_bytes,
                    self.writer,
                )
            except MultipartError as exc:
                raise DicomwebError(
                    shown, response.status_code, f"bad multipart answer: {exc}", transient=True
                ) from None
            except RejectedPartError as exc:
                self._refused(shown, exc.refusal)
                cap = " (pacs.dicomweb.max_part_mb)" if isinstance(exc, PartTooLargeError) else ""
                raise DicomwebError(shown, response.status_code, f"refused {exc}{cap}") from None
            except staging.StagingError as exc:
                raise DicomwebError(shown, response.status_code, f"cannot stage: {exc}") from None
            except OSError as exc:
                raise DicomwebError(shown, response.status_code, f"cannot write staging: {exc.strerror}") from None
        for refusal in staged.refused:
            self._refused(shown, refusal)
        self.counters.instances += len(staged.instances)
        self.counters.bytes += staged.bytes
        self.counters.seconds += time.perf_counter() - started
        return staged

    def _refused(self, shown: str, refusal: RefusedPart) -> None:
        """Record and log a part that was not staged (its instance hashed)."""
        self.refusals.append(refusal)
        self.counters.refused += 1
        LOG.warning("DICOMweb %s: refused %s", shown, refusal)

    def retrieve_instances(
        self,
        study_uid: str,
        series_uid: str,
        sop_instance_uids: Sequence[str] | None,
        staging_root: Path,
        listed: Collection[str] | None = None,
    ) -> StagedParts:
        """Stage a whole series (``sop_instance_uids`` None) or the listed instances, one request each.

        ``listed`` is the series' QIDO-RS listing, when known: a part of the whole series naming an instance it
        lacks is refused (recorded, not staged). A single-instance answer must be that instance. Raises
        :class:`DicomwebError` on the first failure, except that an instance the server does not have (404) is
        skipped: whether everything arrived is for the caller to check against the staging area.
        """
        _check_uids(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        for sop in sop_instance_uids or ():
            _check_uids(SOPInstanceUID=sop)
        if sop_instance_uids is None:
            path, shown = self._route("studies", study_uid, "series", series_uid)
            return self._stage_response(path, shown, study_uid, series_uid, staging_root, listed)
        total = StagedParts()
        for sop in sop_instance_uids:
            path, shown = self._route("studies", study_uid, "series", series_uid, "instances", sop)
            try:
                staged = self._stage_response(path, shown, study_uid, series_uid, staging_root, {sop})
            except DicomwebError as exc:
                if exc.status != 404:
                    raise
                LOG.warning("DICOMweb: %s", exc)
                continue
            total.instances.extend(staged.instances)
            total.bytes += staged.bytes
            total.verified += staged.verified
            total.refused.extend(staged.refused)
        return total

    def retrieve_series(
        self, study_uid: str, series_uid: str, staging_root: Path, expected: set[str] | None = None
    ) -> RetrievedSeries:
        """Stage a series until every expected instance is there or ``max_attempts`` are spent.

        ``expected`` comes from QIDO-RS when not given. Instances already staged are not fetched again; the first
        attempt asks for the whole series, later ones (and a resumed series) only for the missing instances, or
        for the whole series again when too many are missing (see the class docstring). A part naming an instance
        ``expected`` lacks is refused (:attr:`refusals`). Transient failures are retried with backoff; others
        raise :class:`DicomwebError`. The result lists what is still missing: the caller decides whether that
        fails the series. ``bytes`` and ``seconds`` are this call's.
        """
        started = time.perf_counter()
        bytes_before = self.counters.bytes
        tag = uid_hash(series_uid)
        _check_uids(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        if expected is None:
            expected = self.series_instances(study_uid, series_uid)
        missing = expected - staging.staged_instances(staging_root, study_uid, series_uid)
        attempts = 0
        last_error: DicomwebError | None = None
        # With nothing expected the series is still asked for once: a series the PACS lacks answers 404.
        while (missing or not expected) and attempts < self.max_attempts:
            if attempts:
                self._http.sleep(backoff_delay(attempts, self.backoff_s, MAX_SERIES_BACKOFF_S, self._http.rng))
            attempts += 1
            whole = missing == expected or len(missing) > max(1, min(self.single_fetch_limit, len(expected) // 8))
            try:
                self.retrieve_instances(
                    study_uid, series_uid, None if whole else sorted(missing), staging_root, listed=expected
                )
            except DicomwebError as exc:
                if not exc.transient:
                    raise
                last_error = exc
                LOG.warning("series %s: DICOMweb attempt %d failed: %s", tag, attempts, exc)
            staged = staging.staged_instances(staging_root, study_uid, series_uid)
            missing = expected - staged
            if not expected:
                break
        staged = staging.staged_instances(staging_root, study_uid, series_uid)
        seconds = time.perf_counter() - started
        transferred = self.counters.bytes - bytes_before
        record = RetrievedSeries(
            study_uid=study_uid,
            series_uid=series_uid,
            path=staging.series_dir(staging_root, study_uid, series_uid),
            expected=len(expected),
            received=len(expected & staged) if expected else len(staged),
            transport="dicomweb",
            seconds=seconds,
            bytes=transferred,
            attempts=attempts,
            missing=tuple(sorted(missing)),
        )
        LOG.info(
            "series %s: DICOMweb %d/%d staged in %d attempt(s), %.1f MB in %.2f s%s",
            tag, record.received, record.expected, attempts, transferred / 1e6, seconds,
            f"; last error: {last_error}" if missing and last_error else "",
        )  # fmt: skip
        return record


def _check_uids(**uids: str) -> None:
    """Raise :class:`DicomwebError` unless every value is a DICOM UID (digits and dots: safe in a URL and a path)."""
    for name, value in uids.items():
        if not (isinstance(value, str) and len(value) <= 64 and _UID_SEGMENT.fullmatch(value)):
            raise DicomwebError("(arguments)", None, f"{name} is not a valid DICOM UID")


def _token_errors(token_url: str | None) -> Callable[[str, int | None, str], DicomwebError]:
    """The factory of the DicomwebError of a token endpoint that gave no usable token, naming it by host only."""
    what = f"POST token endpoint {urlsplit(token_url or '').netloc.rpartition('@')[2]}"  # never a userinfo part

    def error(message: str, status: int | None, reason: str) -> DicomwebError:
        return DicomwebError(what, status, redact(reason))

    return error
