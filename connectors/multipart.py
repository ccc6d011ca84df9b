"""multipart/related for WADO-RS: an incremental parser and the stager that writes each part as a DICOM file.

A WADO-RS answer is ``multipart/related; type="application/dicom"``, one instance per part. :func:`iter_multipart`
parses such a body from the chunks as they arrive, never holding more than one chunk plus a small tail, and
insists on the closing delimiter (a server that dies mid-stream looks like a short body). :func:`stage_multipart`
writes every part atomically to ``<staging>/<study>/<series>/<SOPInstanceUID>.dcm`` from the bytes as received;
the SOPInstanceUID comes from the part's file meta (group 0002), read with a few struct unpacks, never by decoding
the dataset.

A part is refused (:class:`RejectedPartError`, nothing more is read) when its file meta is missing or unreadable,
its SOP class is not one the caller allows, or its Study/SeriesInstanceUID (checked when the elements before group
0020 can be walked in the part's first 64 KiB) is not the series asked for. Framing errors are
:class:`MultipartError`. Both are :class:`riskbridge.errors.PacsError` (the PACS answered something unusable) and
``ValueError``. Messages name parts by index and instances by :func:`riskbridge.records.uid_hash`.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.utils import collapse_rfc2231_value
from pathlib import Path

from riskbridge.errors import PacsError
from riskbridge.records import uid_hash

from . import staging
from .part10 import FileMeta, Part10Error, dataset_uids, read_file_meta
from .storescp import CT_STORAGE_CLASSES

HEAD_BYTES = 64 * 1024  # how much of a part is looked at before writing it: file meta + dataset up to group 0020


class MultipartError(PacsError, ValueError):
    """A body is not well-formed multipart/related (bad framing, truncated, no closing delimiter)."""


class RejectedPartError(PacsError, ValueError):
    """A multipart part is not an acceptable DICOM instance (no readable file meta, wrong SOP class or series)."""


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
    """What :func:`stage_multipart` wrote: SOPInstanceUIDs in arrival order, bytes, and how many were verified."""

    instances: list[str] = field(default_factory=list)
    bytes: int = 0
    verified: int = 0  # parts whose Study/SeriesInstanceUID were checked against the request


def _checked_head(
    head: bytes,
    whole: bool,
    study_uid: str,
    series_uid: str,
    allowed_sop_classes: Collection[str] | None,
    only: frozenset[str] | None,
    index: int,
) -> tuple[FileMeta, bool]:
    """Vet the first bytes of part ``index``: its file meta, SOP class, instance and, when they can be read, its
    Study/SeriesInstanceUID; return the meta and whether the UIDs were checked. Raises RejectedPartError."""
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
    allowed_sop_classes: Collection[str] | None = CT_STORAGE_CLASSES,
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
