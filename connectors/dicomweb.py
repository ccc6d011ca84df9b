"""DICOMweb retrieval: QIDO-RS to list a series' instances, WADO-RS to stream them into the staging area.

The third transport next to C-MOVE and C-GET (``pacs.transport = "dicomweb"``, or ``auto`` when
:meth:`DicomwebClient.supports_dicomweb` says the PACS answers). A whole series is one WADO-RS request,
``GET {base}/studies/{study}/series/{series}`` with ``Accept: multipart/related; type="application/dicom";
transfer-syntax=*`` (the instances as the PACS stores them, no transcoding) and ``Accept-Encoding: identity``
(Orthanc gzips single-instance answers otherwise, which made it 14-20x slower). The response is streamed through
an incremental multipart/related parser (:func:`iter_multipart`) and every part is written atomically to
``<staging>/<study>/<series>/<SOPInstanceUID>.dcm`` from the bytes as received; the SOPInstanceUID comes from the
part's file meta (group 0002), read with a few struct unpacks, never by decoding the dataset.

A part is refused (:class:`RejectedPartError`, the whole request fails) when its file meta is missing or
unreadable, its SOP class is not one the caller allows, or its Study/SeriesInstanceUID (checked when the
elements before group 0020 can be walked in the part's first 64 KiB) is not the series asked for.

Completeness is decided by comparing the staged instances with QIDO-RS's list, never by the HTTP status: the
whole-series answer of Orthanc is delimited by closing the connection, so a server that dies mid-stream looks
like a short body; the parser insists on the closing delimiter. :meth:`DicomwebClient.retrieve_series` retries
only what is missing, a bounded number of times.

Every failure is a :class:`DicomwebError` naming the URL path with UIDs replaced by
:func:`riskbridge.records.uid_hash`, the HTTP status and a short reason; nothing identifying is logged.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message
from email.utils import collapse_rfc2231_value
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from riskbridge.records import RetrievedSeries, uid_hash
from riskbridge.settings import PacsSettings

from . import staging
from .dicom import DicomError
from .part10 import FileMeta, Part10Error, dataset_uids, read_file_meta
from .storescp import CT_STORAGE_CLASSES as CT_STORAGE_SOP_CLASSES

LOG = logging.getLogger(__name__)

CT_STORAGE_CLASSES: frozenset[str] = frozenset(CT_STORAGE_SOP_CLASSES)
"""The storage SOP classes a CT series arrives as (the storage SCP's list): the default of ``allowed_sop_classes``."""

DICOM_JSON = "application/dicom+json"
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHUNK_SIZE = 1 << 20
HEAD_BYTES = 64 * 1024  # how much of a part is looked at before writing it: file meta + dataset up to group 0020

_UID_TEXT = re.compile(r"\b\d+(?:\.\d+){3,}\b")  # free text: UIDs, not version numbers
_UID_SEGMENT = re.compile(r"\d+(?:\.\d+)+")
_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class DicomwebError(DicomError):
    """A DICOMweb request failed: the message names the path (UIDs hashed), the HTTP status and the reason.

    ``status`` is None when no HTTP answer came (connection refused, timeout). ``transient`` says whether trying
    again may help (connection errors, 5xx, a truncated stream); a refused instance or a 404 is not transient.
    """

    def __init__(self, path: str, status: int | None, reason: str, transient: bool = False) -> None:
        self.path = path
        self.status = status
        self.reason = reason
        self.transient = transient
        shown = f"HTTP {status}" if status is not None else "no HTTP answer"
        super().__init__(f"DICOMweb {path}: {shown}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with its fields, so it crosses process boundaries (retrieval worker processes).
        return type(self), (self.path, self.status, self.reason, self.transient)


class MultipartError(ValueError):
    """A body is not well-formed multipart/related (bad framing, truncated, no closing delimiter)."""


class RejectedPartError(ValueError):
    """A multipart part is not an acceptable DICOM instance (no readable file meta, wrong SOP class or series)."""


def redact(text: str) -> str:
    """Replace everything that looks like a DICOM UID in ``text`` by its :func:`uid_hash`."""
    return _UID_TEXT.sub(lambda match: uid_hash(match.group(0)), text)


# --------------------------------------------------------------------------------------------------------------
# multipart/related


def boundary_from_content_type(content_type: str) -> str:
    """Return the boundary of a ``multipart/related`` Content-Type; raise :class:`MultipartError` otherwise.

    When the header has a ``type`` parameter it must be ``application/dicom``.
    """
    message = Message()
    message["content-type"] = content_type
    if message.get_content_type() != "multipart/related":
        raise MultipartError(f"expected multipart/related, got {message.get_content_type()!r}")
    part_type = message.get_param("type")
    if part_type is not None:
        part_type = collapse_rfc2231_value(part_type)
        if str(part_type).strip().lower() != "application/dicom":
            raise MultipartError(f"expected parts of type application/dicom, got {part_type!r}")
    boundary = message.get_param("boundary")
    if boundary is None:
        raise MultipartError("multipart/related Content-Type has no boundary parameter")
    text = str(collapse_rfc2231_value(boundary))
    if not 1 <= len(text) <= 200 or text.endswith(" "):
        raise MultipartError(f"invalid multipart boundary of {len(text)} characters")
    return text


class MultipartPart:
    """One part of a multipart body: its headers (lower-case names) and its body, readable once as chunks."""

    def __init__(self, index: int, headers: dict[str, str], reader: _MultipartReader) -> None:
        self.index = index
        self.headers = headers
        self._body = reader.body(headers)
        self._started = False

    @property
    def content_type(self) -> str | None:
        """The part's Content-Type header, if any."""
        return self.headers.get("content-type")

    def body(self) -> Iterator[bytes]:
        """Yield the part's body in chunks; may be called once."""
        if self._started:
            raise RuntimeError("a multipart part's body can be read only once")
        self._started = True
        return self._body

    def _drain(self) -> None:
        self._started = True
        for _ in self._body:
            pass


class _MultipartReader:
    """A pull parser over an iterable of byte chunks; never holds more than one chunk plus a small tail."""

    MAX_HEADER_BYTES = 64 * 1024
    MAX_EPILOGUE_BYTES = 64 * 1024

    def __init__(self, chunks: Iterable[bytes], boundary: str) -> None:
        self._source = iter(chunks)
        self._buf = b"\r\n"  # so that a body starting with the first boundary needs no special case
        self._pos = 0
        self._dash_boundary = b"--" + boundary.encode("ascii")
        self._delimiter = b"\r\n" + self._dash_boundary

    # buffer primitives
    def _more(self) -> bool:
        """Append the next non-empty chunk to the unread bytes; False at the end of the source."""
        for chunk in self._source:
            if chunk:
                rest = self._buf[self._pos :]
                self._buf = rest + chunk if rest else bytes(chunk)
                self._pos = 0
                return True
        return False

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _ensure(self, count: int) -> bool:
        while self._available() < count:
            if not self._more():
                return False
        return True

    def _startswith(self, prefix: bytes) -> bool:
        return self._buf.startswith(prefix, self._pos)

    # grammar
    def parts(self) -> Iterator[MultipartPart]:
        """Yield the parts in order; raise :class:`MultipartError` on any framing problem."""
        self._skip_preamble()
        index = 0
        while True:
            if not self._ensure(2):
                raise MultipartError(f"body ends after a boundary without the closing delimiter ({index} parts)")
            if self._startswith(b"--"):
                self._pos += 2
                self._skip_epilogue()
                return
            self._end_of_boundary_line(index)
            part = MultipartPart(index, self._headers(index), self)
            yield part
            part._drain()
            index += 1

    def _skip_preamble(self) -> None:
        keep = len(self._delimiter) - 1
        while True:
            found = self._buf.find(self._delimiter, self._pos)
            if found >= 0:
                self._pos = found + len(self._delimiter)
                return
            self._pos = max(self._pos, len(self._buf) - keep)
            if not self._more():
                raise MultipartError("no multipart boundary found in the body")

    def _end_of_boundary_line(self, index: int) -> None:
        while True:  # transport padding (linear white space) after the boundary
            if not self._ensure(1):
                raise MultipartError(f"body ends inside the boundary line before part {index}")
            if self._buf[self._pos] not in b" \t":
                break
            self._pos += 1
        if not self._ensure(2) or not self._startswith(b"\r\n"):
            raise MultipartError(f"boundary line before part {index} is not followed by CRLF")
        self._pos += 2

    def _line(self, index: int) -> bytes:
        """Return the next CRLF-terminated line (without CRLF) of a part's header block."""
        scanned = self._pos
        while True:
            end = self._buf.find(b"\r\n", scanned)
            if end >= 0:
                line = self._buf[self._pos : end]
                self._pos = end + 2
                return line
            if self._available() > self.MAX_HEADER_BYTES:
                raise MultipartError(f"headers of part {index} exceed {self.MAX_HEADER_BYTES} bytes")
            rescan_from = max(0, self._available() - 1)  # a CR may be the last byte read so far
            if not self._more():
                raise MultipartError(f"body ends inside the headers of part {index}")
            scanned = self._pos + rescan_from

    def _headers(self, index: int) -> dict[str, str]:
        headers: dict[str, str] = {}
        last: str | None = None
        size = 0
        while True:
            line = self._line(index)
            if not line:
                return headers
            size += len(line) + 2
            if size > self.MAX_HEADER_BYTES:
                raise MultipartError(f"headers of part {index} exceed {self.MAX_HEADER_BYTES} bytes")
            text = line.decode("latin-1")
            if text[:1] in (" ", "\t") and last is not None:  # folded continuation line
                headers[last] += " " + text.strip()
                continue
            name, colon, value = text.partition(":")
            if not colon or not name.strip():
                raise MultipartError(f"malformed header line in part {index}")
            last = name.strip().lower()
            headers[last] = value.strip()

    def body(self, headers: dict[str, str]) -> Iterator[bytes]:
        """Yield one part's body; leaves the reader just after the delimiter that ends it."""
        length_text = headers.get("content-length")
        if length_text is None:
            yield from self._body_until_delimiter()
            return
        try:
            length = int(length_text)
        except ValueError:
            raise MultipartError(f"part Content-Length {length_text[:20]!r} is not a number") from None
        if length < 0:
            raise MultipartError("part Content-Length is negative")
        yield from self._body_of_length(length)

    def _body_of_length(self, length: int) -> Iterator[bytes]:
        remaining = length
        while remaining:
            if not self._available() and not self._more():
                raise MultipartError(f"body ends {remaining} bytes before the end of a part (Content-Length)")
            available = self._available()
            if self._pos == 0 and available <= remaining:
                piece = self._buf
            else:
                piece = self._buf[self._pos : self._pos + min(available, remaining)]
            self._pos += len(piece)
            remaining -= len(piece)
            yield piece
        if not self._ensure(len(self._delimiter)):
            raise MultipartError("body ends after a part without the closing delimiter")
        if not self._startswith(self._delimiter):
            raise MultipartError("a part is not followed by a boundary where its Content-Length says it ends")
        self._pos += len(self._delimiter)

    def _body_until_delimiter(self) -> Iterator[bytes]:
        delimiter = self._delimiter
        keep = len(delimiter) - 1  # a delimiter may begin in these last bytes and end in the next chunk
        while True:
            found = self._buf.find(delimiter, self._pos)
            if found >= 0:
                if found > self._pos:
                    yield self._buf[self._pos : found]
                self._pos = found + len(delimiter)
                return
            safe = len(self._buf) - keep
            if safe > self._pos:
                yield self._buf[self._pos : safe]
                self._pos = safe
            if not self._more():
                raise MultipartError("body ends inside a part: no closing delimiter")

    def _skip_epilogue(self) -> None:
        skipped = self._available()
        self._pos = len(self._buf)
        while skipped < self.MAX_EPILOGUE_BYTES and self._more():
            skipped += self._available()
            self._pos = len(self._buf)


def iter_multipart(chunks: Iterable[bytes], boundary: str) -> Iterator[MultipartPart]:
    """Parse a multipart body incrementally from ``chunks``; yield each :class:`MultipartPart` in order.

    Read each part's :meth:`~MultipartPart.body` before advancing (an unread body is skipped). A part with a
    ``Content-Length`` header is read by length and must be followed by the delimiter; other parts end at the
    next ``CRLF--boundary``. Preamble and epilogue are ignored. Raises :class:`MultipartError` when the framing
    is wrong or the body ends before the closing delimiter ``--boundary--``.
    """
    return _MultipartReader(chunks, boundary).parts()


# --------------------------------------------------------------------------------------------------------------
# staging the parts of a WADO-RS answer


@dataclass
class StagedParts:
    """What :func:`stage_multipart` wrote: SOPInstanceUIDs in arrival order, bytes, and how many were verified."""

    instances: list[str] = field(default_factory=list)
    bytes: int = 0
    verified: int = 0  # parts whose Study/SeriesInstanceUID were checked against the request


def _checked_head(
    head: bytes,
    whole: bool,
    study_uid: str,
    series_uid: str,
    allowed_sop_classes: frozenset[str] | None,
    only: frozenset[str] | None,
    index: int,
) -> tuple[FileMeta, bool]:
    try:
        meta = read_file_meta(head)
    except Part10Error as exc:
        raise RejectedPartError(f"part {index}: {exc}") from None
    tag = uid_hash(meta.sop_instance_uid)
    if allowed_sop_classes is not None and meta.sop_class_uid not in allowed_sop_classes:
        raise RejectedPartError(f"part {index} (instance {tag}): SOP class {meta.sop_class_uid} is not allowed here")
    if only is not None and meta.sop_instance_uid not in only:
        raise RejectedPartError(f"part {index} (instance {tag}): not the instance that was asked for")
    uids = dataset_uids(head, meta, whole)
    if uids is None:
        return meta, False
    for name, found, wanted in (("StudyInstanceUID", uids[0], study_uid), ("SeriesInstanceUID", uids[1], series_uid)):
        if found is None:
            raise RejectedPartError(f"part {index} (instance {tag}): the dataset has no {name}")
        if found != wanted:
            raise RejectedPartError(
                f"part {index} (instance {tag}): {name} {uid_hash(found)} is not the one asked for ({uid_hash(wanted)})"
            )
    return meta, True


def stage_multipart(
    chunks: Iterable[bytes],
    boundary: str,
    staging_root: Path,
    study_uid: str,
    series_uid: str,
    allowed_sop_classes: frozenset[str] | None = CT_STORAGE_CLASSES,
    only: Iterable[str] | None = None,
) -> StagedParts:
    """Write every part of a WADO-RS multipart body atomically to the staging area; return what was written.

    Each part is named by the MediaStorageSOPInstanceUID of its file meta and placed under
    ``staging_root/study_uid/series_uid``. A part is refused with :class:`RejectedPartError` (and nothing more
    is read) when its meta is unreadable, its SOP class is not in ``allowed_sop_classes`` (None: any), it is not
    in ``only`` (when given), or its dataset names another study or series. Framing errors raise
    :class:`MultipartError`; a part being written when an error occurs leaves no file behind.
    """
    result = StagedParts()
    wanted = frozenset(only) if only is not None else None
    for part in iter_multipart(chunks, boundary):
        content_type = (part.content_type or "application/dicom").split(";")[0].strip().lower()
        if content_type != "application/dicom":
            raise RejectedPartError(f"part {part.index}: Content-Type {content_type!r} is not application/dicom")
        body = part.body()
        pieces: list[bytes] = []
        size = 0
        whole = True
        for piece in body:
            pieces.append(piece)
            size += len(piece)
            if size >= HEAD_BYTES:
                whole = False
                break
        head = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        meta, verified = _checked_head(head, whole, study_uid, series_uid, allowed_sop_classes, wanted, part.index)
        try:
            path = staging.instance_path(staging_root, study_uid, series_uid, meta.sop_instance_uid)
        except staging.StagingError:
            raise RejectedPartError(f"part {part.index}: MediaStorageSOPInstanceUID is not a valid UID") from None
        result.bytes += staging.write_atomic(path, itertools.chain((head,), body))
        result.instances.append(meta.sop_instance_uid)
        result.verified += verified
    return result


# --------------------------------------------------------------------------------------------------------------
# the client


@dataclass
class TransferCounters:
    """Running totals of one client: HTTP requests sent, instances staged, bytes staged, seconds spent."""

    requests: int = 0
    instances: int = 0
    bytes: int = 0
    seconds: float = 0.0


def new_session(pool_size: int = 4) -> requests.Session:
    """Return a requests Session with a connection pool that retries a GET whose connection failed before any
    answer arrived (e.g. a keep-alive connection the server closed: Orthanc's keep-alive timeout is 1 s); a body
    that breaks off mid-stream is never retried here."""
    session = requests.Session()
    retry = Retry(total=2, connect=2, read=1, status=0, redirect=0, other=0, backoff_factor=0.2)
    adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class DicomwebClient:
    """QIDO-RS and WADO-RS against one DICOMweb base URL (e.g. ``http://pacs:8042/dicom-web``).

    Pass ``session`` to use an authenticated :class:`requests.Session` (basic, bearer, mutual TLS); otherwise
    the client makes its own pooled session and closes it in :meth:`close`. ``timeout_s`` bounds connecting and
    each wait for bytes (not a whole transfer). ``allowed_sop_classes`` are the SOP classes a retrieved part may
    have (None: any). ``max_attempts`` bounds :meth:`retrieve_series`' tries. Missing instances are fetched one
    request each only while they are at most ``single_fetch_limit`` and at most an eighth of the series: on
    Orthanc 1.10 one single-instance request took about 3.5 ms, a whole series 0.4-0.7 ms per instance.
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
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise DicomwebError("(base URL)", None, "the DICOMweb URL must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._own_session = session is None
        self.session = session if session is not None else new_session()
        self.allowed_sop_classes = frozenset(allowed_sop_classes) if allowed_sop_classes is not None else None
        self.max_attempts = max(1, max_attempts)
        self.single_fetch_limit = single_fetch_limit
        self.chunk_size = chunk_size
        self.qido_page_size = qido_page_size
        self.backoff_s = backoff_s
        self.counters = TransferCounters()

    @classmethod
    def from_settings(cls, pacs: PacsSettings, session: requests.Session | None = None) -> DicomwebClient:
        """Build a client from the PACS settings (``dicomweb_url``, ``timeout_s``, ``max_attempts``)."""
        if not pacs.dicomweb_url:
            raise DicomwebError("(settings)", None, "pacs.dicomweb_url is not set")
        return cls(pacs.dicomweb_url, timeout_s=pacs.timeout_s, session=session, max_attempts=pacs.max_attempts)

    def close(self) -> None:
        """Close the session if the client made it."""
        if self._own_session:
            self.session.close()

    def __enter__(self) -> DicomwebClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # HTTP plumbing
    @staticmethod
    def _route(*segments: str) -> tuple[str, str]:
        """Return the path and its loggable form (every UID segment hashed)."""
        path = "/" + "/".join(segments)
        shown = "/" + "/".join(uid_hash(s) if _UID_SEGMENT.fullmatch(s) else s for s in segments)
        return path, shown

    def _get(
        self, path: str, shown: str, accept: str, params: dict[str, Any] | None = None, stream: bool = False
    ) -> requests.Response:
        headers = {"Accept": accept, "Accept-Encoding": "identity"}
        self.counters.requests += 1
        try:
            response = self.session.get(
                self.base_url + path,
                headers=headers,
                params=params,
                stream=stream,
                timeout=(min(self.timeout_s, 10.0), self.timeout_s),
            )
        except requests.Timeout:
            raise DicomwebError(shown, None, f"no answer within {self.timeout_s:g} s", transient=True) from None
        except requests.ConnectionError as exc:
            raise DicomwebError(shown, None, f"cannot connect ({_cause(exc)})", transient=True) from None
        except requests.RequestException as exc:
            raise DicomwebError(shown, None, f"request failed ({type(exc).__name__})", transient=True) from None
        if response.status_code >= 400:
            reason = _error_reason(response)
            response.close()
            raise DicomwebError(
                shown, response.status_code, reason, transient=response.status_code in _TRANSIENT_STATUSES
            )
        return response

    def _chunks(self, response: requests.Response, shown: str) -> Iterator[bytes]:
        try:
            yield from response.iter_content(chunk_size=self.chunk_size)
        except requests.RequestException as exc:
            raise DicomwebError(
                shown, response.status_code, f"connection lost mid-stream ({_cause(exc)})", transient=True
            ) from None

    # QIDO-RS
    def supports_dicomweb(self) -> bool:
        """True when QIDO-RS ``/studies?limit=1`` answers 200 or 204 with DICOM JSON; never raises."""
        path, shown = self._route("studies")
        try:
            response = self._get(path, shown, DICOM_JSON, params={"limit": 1})
        except DicomwebError as exc:
            LOG.info("DICOMweb probe: %s", exc)
            return False
        with response:
            if response.status_code == 204:
                return True
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if response.status_code != 200 or content_type not in (DICOM_JSON, "application/json"):
                LOG.info("DICOMweb probe: %s answered %d with %r", shown, response.status_code, content_type)
                return False
            try:
                return isinstance(response.json(), list)
            except ValueError:
                LOG.info("DICOMweb probe: %s answered JSON that is not a list", shown)
                return False

    def series_instances(self, study_uid: str, series_uid: str) -> set[str]:
        """Return the SOPInstanceUIDs QIDO-RS lists for a series (empty when the series is unknown).

        Pages with ``limit``/``offset`` until a page is empty or adds nothing new, so a server that caps its
        result size silently (or ignores paging) still gives the full list.
        """
        _check_uids(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        path, shown = self._route("studies", study_uid, "series", series_uid, "instances")
        found: set[str] = set()
        offset = 0
        while True:
            params = {"limit": self.qido_page_size, "offset": offset, "includefield": "00080018"}
            response = self._get(path, shown, DICOM_JSON, params=params)
            with response:
                if response.status_code == 204:
                    return found
                try:
                    page = response.json()
                except ValueError:
                    raise DicomwebError(shown, response.status_code, "QIDO-RS answer is not JSON") from None
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
            offset += len(page)

    # WADO-RS
    def _stage_response(
        self, path: str, shown: str, study_uid: str, series_uid: str, staging_root: Path, only: set[str] | None
    ) -> StagedParts:
        started = time.perf_counter()
        response = self._get(path, shown, WADO_ACCEPT, stream=True)
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
                )
            except MultipartError as exc:
                raise DicomwebError(
                    shown, response.status_code, f"bad multipart answer: {exc}", transient=True
                ) from None
            except RejectedPartError as exc:
                raise DicomwebError(shown, response.status_code, f"refused: {exc}") from None
            except staging.StagingError as exc:
                raise DicomwebError(shown, response.status_code, f"cannot stage: {exc}") from None
            except OSError as exc:
                raise DicomwebError(shown, response.status_code, f"cannot write staging: {exc.strerror}") from None
        self.counters.instances += len(staged.instances)
        self.counters.bytes += staged.bytes
        self.counters.seconds += time.perf_counter() - started
        return staged

    def retrieve_instances(
        self, study_uid: str, series_uid: str, sop_instance_uids: Sequence[str] | None, staging_root: Path
    ) -> StagedParts:
        """Stage a whole series (``sop_instance_uids`` None) or the listed instances, one request each.

        Raises :class:`DicomwebError` on the first failure, except that an instance the server does not have
        (404) is skipped: whether everything arrived is for the caller to check against the staging area.
        """
        _check_uids(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        for sop in sop_instance_uids or ():
            _check_uids(SOPInstanceUID=sop)
        if sop_instance_uids is None:
            path, shown = self._route("studies", study_uid, "series", series_uid)
            return self._stage_response(path, shown, study_uid, series_uid, staging_root, None)
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
        return total

    def retrieve_series(
        self, study_uid: str, series_uid: str, staging_root: Path, expected: set[str] | None = None
    ) -> RetrievedSeries:
        """Stage a series until every expected instance is there or ``max_attempts`` are spent.

        ``expected`` comes from QIDO-RS when not given. Instances already staged are not fetched again; the first
        attempt asks for the whole series, later ones (and a resumed series) only for the missing instances, or
        for the whole series again when too many are missing (see the class docstring). Transient failures are
        retried with backoff; others raise :class:`DicomwebError`. The result lists what is still missing: the
        caller decides whether that fails the series. ``bytes`` and ``seconds`` are this call's.
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
                time.sleep(min(self.backoff_s * 2 ** (attempts - 1), 8.0))
            attempts += 1
            whole = missing == expected or len(missing) > max(1, min(self.single_fetch_limit, len(expected) // 8))
            try:
                self.retrieve_instances(study_uid, series_uid, None if whole else sorted(missing), staging_root)
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


def _cause(exc: BaseException) -> str:
    """A short, PHI-free name for the root cause of a requests exception."""
    cause: BaseException = exc
    for _ in range(8):
        inner = cause.__cause__ or cause.__context__
        if inner is None:
            break
        cause = inner
    return type(cause).__name__


def _error_reason(response: requests.Response) -> str:
    """A short reason for an HTTP error answer: the reason phrase and, from an Orthanc JSON body, its message."""
    reason = response.reason or "error"
    body: Any = None
    if len(response.content) <= 8192:
        try:
            body = response.json()
        except ValueError:
            body = None
    if isinstance(body, dict) and isinstance(body.get("Message"), str):
        reason = f"{reason} ({body['Message'][:120]})"
    return redact(reason)
