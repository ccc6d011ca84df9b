"""multipart/related for WADO-RS: an incremental parser and the stager that writes each part as a DICOM file.

A WADO-RS answer is ``multipart/related; type="application/dicom"``, one instance per part. :func:`iter_multipart`
parses such a body from the chunks as they arrive, never holding more than one chunk plus a small tail, and
insists on the closing delimiter (a server that dies mid-stream looks like a short body). :func:`stage_multipart`
writes every part atomically to ``<staging>/<study>/<series>/<SOPInstanceUID>.dcm`` from the bytes as received;
the SOPInstanceUID comes from the part's file meta (group 0002), read with a few struct unpacks, never by decoding
the dataset.

Only a part verified as the instance it claims to be is staged. Its Content-Type must be ``application/dicom``
(a ``transfer-syntax`` parameter must name the transfer syntax of its file meta), its file meta readable and its
transfer syntax a known one, its SOP class one the caller allows, and its dataset must name, at its top level, the
SOP class and instance of its file meta and the study and series asked for. These elements are read from the
part's first bytes (up to :data:`MAX_HEAD_BYTES`; the walk of :mod:`.part10`, deflated data inflated first, big
endian read by pydicom). Any other part is refused with :class:`RejectedPartError` and nothing more is read; a
part over the caller's size cap is :class:`PartTooLargeError`. A verified part naming an instance the caller did
not ask for (``only``: the series' listing, or the one instance of a single-instance request) is not an error of
the answer: it is refused alone, recorded in :attr:`StagedParts.refused`, and the other parts are staged.

Framing errors are :class:`MultipartError`. Both are :class:`riskbridge.errors.PacsError` (the PACS answered
something unusable) and ``ValueError``. Messages name parts by index and instances by
:func:`riskbridge.records.uid_hash`.
"""

from __future__ import annotations

import itertools
import warnings
import zlib
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.utils import collapse_rfc2231_value
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID

from riskbridge.errors import PacsError
from riskbridge.records import uid_hash

from . import staging

# The underscored names are part10's element walk: its dataset_uids stops at the study and series, and the stager
# also needs the SOP class and instance the dataset names, read in the same single pass.
from .part10 import (
    FileMeta,
    Part10Error,
    _element_header,
    _skip_undefined_sequence,
    _tag,
    _uid_value,
    _Unwalkable,
    read_file_meta,
)
from .storescp import CT_STORAGE_CLASSES

HEAD_BYTES = 64 * 1024  # how much of a part is looked at first: file meta + dataset up to group 0020
# A part whose identifying elements are not within this many bytes is refused (private groups 0009/0019 and
# sequences of group 0008 can push group 0020 back; nothing real pushes it this far).
MAX_HEAD_BYTES = 1024 * 1024
PART_TYPE = "application/dicom"
# A verified part up to this size is read whole and written on a background thread (BackgroundWriter); a bigger one
# is written as it arrives, so one answer holds at most this much per part plus the writer's own bound in memory.
IN_MEMORY_PART_BYTES = 16 * 1024 * 1024

_IMPLICIT_LE = "1.2.840.10008.1.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_SOP_CLASS_TAG, _SOP_INSTANCE_TAG = 0x00080016, 0x00080018
_STUDY_TAG, _SERIES_TAG = 0x0020000D, 0x0020000E
_UNDEFINED = 0xFFFFFFFF
_IDENTIFYING = {
    _SOP_CLASS_TAG: "SOPClassUID",
    _SOP_INSTANCE_TAG: "SOPInstanceUID",
    _STUDY_TAG: "StudyInstanceUID",
    _SERIES_TAG: "SeriesInstanceUID",
}


class MultipartError(PacsError, ValueError):
    """A body is not well-formed multipart/related (bad framing, truncated, no closing delimiter)."""


@dataclass(frozen=True)
class RefusedPart:
    """A part that was not staged: its index in the answer (from 0), its instance as :func:`uid_hash` (None when
    its file meta could not be read) and why."""

    index: int
    instance: str | None
    reason: str

    def __str__(self) -> str:
        """``part 3 (instance <hash>): reason``."""
        shown = f" (instance {self.instance})" if self.instance else ""
        return f"part {self.index}{shown}: {self.reason}"


class RejectedPartError(PacsError, ValueError):
    """A multipart part cannot be verified as the instance it claims to be (see the module docstring).

    ``refusal`` holds the part's index, hashed instance and the reason.
    """

    def __init__(self, index: int, sop_instance_uid: str | None, reason: str) -> None:
        """Refuse part ``index`` (its MediaStorageSOPInstanceUID, None when unread) for ``reason``."""
        self.refusal = RefusedPart(index, uid_hash(sop_instance_uid) if sop_instance_uid else None, reason)
        super().__init__(str(self.refusal))

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuild from the refusal when unpickled (the UID is already hashed)."""
        return _rejected, (type(self), self.refusal)


class PartTooLargeError(RejectedPartError):
    """A multipart part is larger than the caller's cap (declared by its Content-Length, or as it arrives)."""


def _rejected(cls: type[RejectedPartError], refusal: RefusedPart) -> RejectedPartError:
    """A RejectedPartError (or subclass) around an existing refusal, for unpickling."""
    error = cls.__new__(cls)
    error.refusal = refusal
    PacsError.__init__(error, str(refusal))
    return error


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
        """Part number ``index`` (from 0) with its ``headers``; its body is read from ``reader``."""
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
        """Read and drop what is left of the body, so the reader reaches the next part."""
        self._started = True
        for _ in self._body:
            pass


class _MultipartReader:
    """A pull parser over an iterable of byte chunks; never holds more than one chunk plus a small tail."""

    MAX_HEADER_BYTES = 64 * 1024
    MAX_EPILOGUE_BYTES = 64 * 1024

    def __init__(self, chunks: Iterable[bytes], boundary: str) -> None:
        """Read from ``chunks`` a body delimited by ``boundary``."""
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
        """How many unread bytes are buffered."""
        return len(self._buf) - self._pos

    def _ensure(self, count: int) -> bool:
        """Buffer at least ``count`` unread bytes; False when the source ends first."""
        while self._available() < count:
            if not self._more():
                return False
        return True

    def _startswith(self, prefix: bytes) -> bool:
        """True when the unread bytes begin with ``prefix``."""
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
        """Skip everything up to and including the first delimiter."""
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
        """Skip transport padding and the CRLF that end a boundary line."""
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
        """Read a part's header block up to its empty line: lower-case names, folded lines joined."""
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
        """Yield a body of ``length`` bytes (Content-Length) and check that the delimiter follows it."""
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
        """Yield a body up to the next delimiter, holding back bytes where a delimiter may begin."""
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
        """Read and drop at most ``MAX_EPILOGUE_BYTES`` after the closing delimiter."""
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
    """What :func:`stage_multipart` wrote: SOPInstanceUIDs in arrival order, bytes, how many were verified (every
    staged part is), and the verified parts it did not stage because they were not asked for."""

    instances: list[str] = field(default_factory=list)
    bytes: int = 0
    verified: int = 0  # parts whose identity was checked against the request: every staged one
    refused: list[RefusedPart] = field(default_factory=list)


def _top_level_uids(data: bytes, start: int, explicit: bool, whole: bool) -> dict[int, str] | None:
    """The identifying UIDs (:data:`_IDENTIFYING`) at the top level of the dataset that begins at ``start``; None
    when they cannot be known from ``data``: it ends before (0020,000E) is passed (unless it is ``whole``), or its
    encoding cannot be walked."""
    found: dict[int, str] = {}
    pos = start
    try:
        while pos < len(data):
            tag = _tag(data, pos)
            if tag > _SERIES_TAG:
                return found
            header, length, vr = _element_header(data, pos, explicit)
            pos += header
            if length == _UNDEFINED:
                pos = _skip_undefined_sequence(data, pos, explicit and vr != b"UN")
                continue
            if tag in _IDENTIFYING:
                if pos + length > len(data):
                    raise _Unwalkable
                found[tag] = _uid_value(data[pos : pos + length])
            pos += length
    except _Unwalkable:
        return None
    return found if whole and pos == len(data) else None


def _pydicom_uids(head: bytes) -> dict[int, str] | None:
    """The identifying UIDs as pydicom reads them from ``head`` (big endian, which the walk leaves alone); None
    when pydicom cannot read it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(BytesIO(head), stop_before_pixels=True, specific_tags=list(_IDENTIFYING.values()))
    except Exception:  # pydicom raises many types on bytes it cannot read; any of them leaves the part unverified
        return None
    values = {tag: dataset.get(keyword) for tag, keyword in _IDENTIFYING.items()}
    return {tag: str(value) for tag, value in values.items() if value}


def _dataset_uids(head: bytes, meta: FileMeta, whole: bool) -> dict[int, str] | None:
    """The identifying UIDs of the dataset after the file meta; None when ``head`` is too short to know them."""
    syntax = meta.transfer_syntax_uid
    found: dict[int, str] | None
    if syntax == _DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            # Bounded: a few KiB of deflated zeros inflate to far more than the elements before group 0020.
            inflated = inflater.decompress(head[meta.dataset_offset :], MAX_HEAD_BYTES)
            found = _top_level_uids(inflated, 0, True, whole and inflater.eof)
        except zlib.error:
            found = None
    elif syntax == _BIG_ENDIAN:
        found = _pydicom_uids(head)
        if not whole and (found is None or len(found) < len(_IDENTIFYING)):
            found = None
    else:
        found = _top_level_uids(head, meta.dataset_offset, syntax != _IMPLICIT_LE, whole)
    # The whole part is there and still cannot be read: nothing in it is verifiable.
    return {} if found is None and whole else found


def _content_transfer_syntax(content_type: str | None, index: int) -> str | None:
    """Check a part's Content-Type (``application/dicom``); return its ``transfer-syntax`` parameter, if any."""
    if content_type is None:
        raise RejectedPartError(index, None, "the part has no Content-Type")
    message = Message()
    message["content-type"] = content_type
    # email's parser falls back to text/plain for a malformed type; compare the raw type too.
    given = content_type.split(";")[0].strip().lower()
    if given != PART_TYPE or message.get_content_type() != PART_TYPE:
        raise RejectedPartError(index, None, f"Content-Type {given[:60]!r} is not {PART_TYPE}")
    syntax = message.get_param("transfer-syntax")
    return str(collapse_rfc2231_value(syntax)).strip() if syntax is not None else None


def _checked_meta(
    head: bytes, declared_syntax: str | None, allowed_sop_classes: Collection[str] | None, index: int
) -> FileMeta:
    """The file meta of part ``index``, checked: readable, a known transfer syntax (the one the part's
    Content-Type names, if it names one) and an allowed SOP class. Raises RejectedPartError."""
    try:
        meta = read_file_meta(head)
    except Part10Error as exc:
        raise RejectedPartError(index, None, str(exc)) from None
    sop = meta.sop_instance_uid
    syntax = meta.transfer_syntax_uid
    if not UID(syntax).is_transfer_syntax:
        raise RejectedPartError(
            index, sop, f"transfer syntax {syntax[:64]} is not a known one: its dataset cannot be read"
        )
    if declared_syntax is not None and declared_syntax != syntax:
        raise RejectedPartError(
            index, sop, f"Content-Type names transfer syntax {declared_syntax[:64]}, the file meta {syntax}"
        )
    if allowed_sop_classes is not None and meta.sop_class_uid not in allowed_sop_classes:
        raise RejectedPartError(index, sop, f"SOP class {meta.sop_class_uid[:64]} is not allowed here")
    return meta


def _checked_dataset(uids: dict[int, str], meta: FileMeta, study_uid: str, series_uid: str, index: int) -> None:
    """Check that the dataset names the SOP class and instance of its file meta and the study and series asked for.
    Raises RejectedPartError."""
    sop = meta.sop_instance_uid
    wanted = {
        _SOP_CLASS_TAG: (meta.sop_class_uid, "the file meta's"),
        _SOP_INSTANCE_TAG: (sop, "the file meta's"),
        _STUDY_TAG: (study_uid, "the one asked for"),
        _SERIES_TAG: (series_uid, "the one asked for"),
    }
    for tag, (expected, which) in wanted.items():
        name = _IDENTIFYING[tag]
        found = uids.get(tag)
        if found is None:
            raise RejectedPartError(index, sop, f"the dataset has no {name} (or it cannot be read)")
        if found != expected:
            raise RejectedPartError(
                index, sop, f"{name} {uid_hash(found)} in the dataset is not {which} ({uid_hash(expected)})"
            )


def _capped(body: Iterator[bytes], index: int, max_bytes: int | None) -> Iterator[bytes]:
    """``body``, raising :class:`PartTooLargeError` as soon as more than ``max_bytes`` arrived (None: no cap)."""
    size = 0
    for piece in body:
        size += len(piece)
        if max_bytes is not None and size > max_bytes:
            raise PartTooLargeError(index, None, f"larger than the cap of {max_bytes} bytes; not staged")
        yield piece


def _declared_length(part: MultipartPart) -> int | None:
    """The part's Content-Length, if it sends a readable one (the parser enforces it)."""
    text = part.headers.get("content-length")
    return int(text) if text is not None and text.strip().isdigit() else None


def _rest_in_memory(head: bytes, body: Iterator[bytes], limit: int) -> tuple[list[bytes], Iterator[bytes] | None]:
    """The part's bytes as a list of chunks, read to its end while they total at most ``limit``; otherwise the
    chunks read so far and the unread rest of ``body`` (the part is then too big to hold: it is written as it
    arrives)."""
    pieces = [head]
    size = len(head)
    for piece in body:
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            return pieces, body
    return pieces, None


def stage_multipart(
    chunks: Iterable[bytes],
    boundary: str,
    staging_root: Path,
    study_uid: str,
    series_uid: str,
    allowed_sop_classes: Collection[str] | None = CT_STORAGE_CLASSES,
    only: Iterable[str] | None = None,
    max_part_bytes: int | None = None,
    writer: staging.BackgroundWriter | None = None,
) -> StagedParts:
    """Write every verified part of a WADO-RS multipart body atomically to the staging area; return what was done.

    Each part is named by the MediaStorageSOPInstanceUID of its file meta and placed under
    ``staging_root/study_uid/series_uid``. A part that cannot be verified as that instance of this series (see the
    module docstring; ``allowed_sop_classes`` None allows any SOP class) raises :class:`RejectedPartError` and
    nothing more is read; one larger than ``max_part_bytes`` (None: no cap) raises :class:`PartTooLargeError`. A
    verified part whose instance is not in ``only`` (when given) is read past and listed in ``refused``. Framing
    errors raise :class:`MultipartError`; a part being written when an error occurs leaves no file behind.

    A verified part of at most :data:`IN_MEMORY_PART_BYTES` is read whole and handed to ``writer`` (a
    :class:`~riskbridge.connectors.staging.BackgroundWriter`; without one, a writer of this call's own), so the
    next part is parsed while the file is written; the parts are fsynced together and renamed into place at the end
    of the answer (a bigger part is written, fsynced and renamed as it arrives). So every staged file was fsynced
    before its rename, and all of them are in place when this returns or raises; a failed write raises its
    OSError, unless another error is being raised already (then the parts before it are still committed).
    """
    own_writer = writer is None
    active = writer if writer is not None else staging.BackgroundWriter()
    try:
        try:
            result = _stage_parts(
                chunks, boundary, staging_root, study_uid, series_uid, allowed_sop_classes, only, max_part_bytes, active
            )
        except BaseException:
            # The answer failed: commit the parts already handed over (they were verified) before the caller looks
            # at the staging area; a write failure among them shows up as a missing instance.
            active.commit()
            raise
        committed = active.commit()
    finally:
        if own_writer:
            active.close()
    if committed.failures:
        raise committed.failures[0].error
    return result


def _stage_parts(
    chunks: Iterable[bytes],
    boundary: str,
    staging_root: Path,
    study_uid: str,
    series_uid: str,
    allowed_sop_classes: Collection[str] | None,
    only: Iterable[str] | None,
    max_part_bytes: int | None,
    writer: staging.BackgroundWriter,
) -> StagedParts:
    """The work of :func:`stage_multipart`; the writes it hands to ``writer`` may still be running when it returns."""
    result = StagedParts()
    wanted = frozenset(only) if only is not None else None
    for part in iter_multipart(chunks, boundary):
        declared_syntax = _content_transfer_syntax(part.content_type, part.index)
        declared = _declared_length(part)
        if max_part_bytes is not None and declared is not None and declared > max_part_bytes:
            raise PartTooLargeError(
                part.index, None, f"its Content-Length {declared} is over the cap of {max_part_bytes} bytes"
            )
        body = _capped(part.body(), part.index, max_part_bytes)
        pieces: list[bytes] = []
        size = 0
        whole = False
        target = HEAD_BYTES
        meta: FileMeta | None = None
        while True:
            for piece in body:
                pieces.append(piece)
                size += len(piece)
                if size >= target:
                    break
            else:
                whole = True
            head = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces = [head]
            if meta is None:
                meta = _checked_meta(head, declared_syntax, allowed_sop_classes, part.index)
                try:
                    path = staging.instance_path(staging_root, study_uid, series_uid, meta.sop_instance_uid)
                except staging.StagingError:
                    raise RejectedPartError(part.index, None, "MediaStorageSOPInstanceUID is not a valid UID") from None
            uids = _dataset_uids(head, meta, whole)
            if uids is not None:
                break
            if target >= MAX_HEAD_BYTES:
                raise RejectedPartError(
                    part.index,
                    meta.sop_instance_uid,
                    f"its StudyInstanceUID and SeriesInstanceUID are not within its first {MAX_HEAD_BYTES} bytes",
                )
            target = MAX_HEAD_BYTES
        _checked_dataset(uids, meta, study_uid, series_uid, part.index)
        if wanted is not None and meta.sop_instance_uid not in wanted:
            for _ in body:  # read past it, still within the cap
                pass
            result.refused.append(RefusedPart(part.index, uid_hash(meta.sop_instance_uid), "not asked for"))
            continue
        held, rest = _rest_in_memory(head, body, IN_MEMORY_PART_BYTES)
        if rest is None:
            if writer.failed:
                break  # the disk failed: stop reading; stage_multipart's commit raises the failure
            writer.submit(path, held)
            result.bytes += sum(len(piece) for piece in held)
        else:
            result.bytes += staging.write_atomic(path, itertools.chain(held, rest))
        result.instances.append(meta.sop_instance_uid)
        result.verified += 1
    return result
