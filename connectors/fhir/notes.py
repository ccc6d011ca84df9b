"""Note text from FHIR attachments: media types, charsets, HTML stripped to plain text, one :class:`NoteText` each.

:func:`note_texts` reads every text attachment of a DocumentReference or DiagnosticReport (inline base64 ``data``,
else a Binary at ``url`` read through the caller's ``read_binary``) and a DiagnosticReport's ``conclusion``;
:func:`attachment_text` decodes one attachment's bytes with its charset (text/plain as it is, text/html with tags
stripped by :func:`html_to_text`) and skips other media types (PDF, images). An attachment whose declared
``contentType`` is not text is skipped before anything is read, and one larger than the caller's cap (its declared
``size``, or its inline data) raises :class:`AttachmentTooLargeError`. Logs name resource types, ids and media types
only, never note text.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

from .errors import AttachmentError, AttachmentTooLargeError

log = logging.getLogger(__name__)


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type / attachment contentType, lower case, without parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


GENERIC_MEDIA_TYPES = frozenset({"", "application/octet-stream"})


def generic_media_type(content_type: str | None) -> bool:
    """True when a Content-Type says nothing about the content: missing, empty or ``application/octet-stream``."""
    return media_type(content_type) in GENERIC_MEDIA_TYPES


def content_type_charset(content_type: str | None) -> str | None:
    """The ``charset`` parameter of a contentType (``text/plain; charset=ISO-8859-1`` -> ``ISO-8859-1``), or None."""
    for parameter in (content_type or "").split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"').strip("'")
    return None


_BLOCK_TAGS = frozenset(
    {"p", "div", "br", "li", "ul", "ol", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6", "section", "pre", "hr"}
)
_SKIPPED_TAGS = frozenset({"script", "style", "head", "title"})


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML document; block elements become line breaks, script/style is dropped."""

    def __init__(self) -> None:
        """Start with no text collected."""
        super().__init__(convert_charrefs=True)  # entities (&amp; &deg; &#176;) arrive unescaped in handle_data
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Enter a skipped element, or break the line before a block element."""
        if tag in _SKIPPED_TAGS:
            self._skipping += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        """Leave a skipped element, or break the line after a block element."""
        if tag in _SKIPPED_TAGS:
            self._skipping = max(0, self._skipping - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        """Keep text outside skipped elements."""
        if not self._skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Plain text of an HTML note: tags removed, entities unescaped, one line per block, blank lines dropped."""
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    lines = (" ".join(line.split()) for line in "".join(extractor.parts).splitlines())
    return "\n".join(line for line in lines if line)


def decode_text(raw: bytes, content_type: str | None) -> str:
    """Decode note bytes with the contentType's charset (UTF-8 when none is given or it is unknown)."""
    charset = content_type_charset(content_type) or "utf-8"
    try:
        return raw.decode(charset)
    except LookupError:
        log.warning("fhir: unknown charset %r in a note's contentType; decoding as UTF-8", charset)
        return raw.decode("utf-8", errors="replace")
    except UnicodeDecodeError:
        log.warning("fhir: note bytes are not valid %s; undecodable bytes replaced", charset)
        return raw.decode(charset, errors="replace")


TEXT_MEDIA_TYPES = frozenset({"text/plain", "text/html", "application/xhtml+xml"})


def attachment_text(raw: bytes, content_type: str | None) -> str | None:
    """The plain text of attachment bytes for text/plain and text/html; None for other media types (PDF, ...)."""
    kind = media_type(content_type) or "text/plain"  # contentType is optional; notes without one are text
    if kind not in TEXT_MEDIA_TYPES:
        return None
    text = decode_text(raw, content_type)
    return text if kind == "text/plain" else html_to_text(text)


@dataclass(frozen=True)
class NoteText:
    """The text of one note attachment (or a DiagnosticReport's conclusion) and where it came from."""

    resource_type: str
    resource_id: str
    text: str
    content_type: str
    origin: str  # "data" (inline base64), "url" (a Binary read), or "conclusion"


def note_texts(
    resource: Mapping[str, Any],
    read_binary: Callable[[str], tuple[bytes, str | None]],
    max_bytes: int | None = None,
) -> list[NoteText]:
    """The text of a DocumentReference's or DiagnosticReport's notes, decoded with their charset.

    DocumentReference: every ``content.attachment``; DiagnosticReport: every ``presentedForm`` and the
    ``conclusion``. An attachment is read from its inline ``data`` (base64), else from its ``url`` with
    ``read_binary`` (bytes and served contentType). text/plain is returned as it is, text/html with tags
    stripped; other media types are skipped: a declared ``contentType`` that is not text before anything is read or
    decoded, and a served type that is not text (other than ``application/octet-stream``) even when the attachment
    declared text. With ``max_bytes``, an attachment whose declared ``size`` or inline data is larger raises
    :class:`AttachmentTooLargeError` (``read_binary`` applies its own cap to what it downloads); invalid base64
    raises :class:`AttachmentError`.
    """
    resource_type = str(resource.get("resourceType", ""))
    resource_id = str(resource.get("id", ""))
    if resource_type == "DocumentReference":
        attachments = [c.get("attachment") or {} for c in resource.get("content") or []]
    elif resource_type == "DiagnosticReport":
        attachments = list(resource.get("presentedForm") or [])
    else:
        raise ValueError(f"notes come from DocumentReference or DiagnosticReport, not {resource_type or '?'}")
    where = f"{resource_type}/{resource_id}"
    texts: list[NoteText] = []
    for attachment in attachments:
        content_type = attachment.get("contentType")
        if content_type and media_type(content_type) not in TEXT_MEDIA_TYPES:
            log.debug("fhir: %s: skipped a %s attachment, unread", where, media_type(content_type))
            continue
        if attachment.get("data") is not None:
            _check_size(attachment, where, max_bytes)
            raw = _decoded(attachment["data"], where)
            origin = "data"
        elif attachment.get("url"):
            _check_size(attachment, where, max_bytes)
            raw, served = read_binary(str(attachment["url"]))
            if not generic_media_type(served) and media_type(served) not in TEXT_MEDIA_TYPES:
                log.debug("fhir: %s: skipped an attachment served as %s", where, media_type(served))
                continue
            content_type = content_type or served
            origin = "url"
        else:
            continue
        text = attachment_text(raw, content_type)
        if text is None:
            log.debug("fhir: %s: skipped a %s attachment", where, media_type(content_type))
            continue
        texts.append(NoteText(resource_type, resource_id, text, content_type or "text/plain", origin))
    conclusion = resource.get("conclusion")
    if resource_type == "DiagnosticReport" and isinstance(conclusion, str) and conclusion.strip():
        texts.append(NoteText(resource_type, resource_id, conclusion, "text/plain", "conclusion"))
    return texts


def _check_size(attachment: Mapping[str, Any], where: str, max_bytes: int | None) -> None:
    """AttachmentTooLargeError when the attachment's declared ``size`` or its inline data exceeds ``max_bytes``."""
    if max_bytes is None:
        return
    declared = attachment.get("size")
    data = attachment.get("data")
    inline = len(data.rstrip("=")) * 3 // 4 if isinstance(data, str) else 0  # base64: 4 characters per 3 bytes
    if (isinstance(declared, int) and declared > max_bytes) or inline > max_bytes:
        raise AttachmentTooLargeError(
            f"{where}: attachment larger than fhir.max_attachment_bytes ({max_bytes} bytes); not read"
        )


def _decoded(data: Any, where: str) -> bytes:
    """The bytes of an attachment's inline base64 ``data``; AttachmentError when it is not valid base64."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise AttachmentError(f"{where}: attachment data is not valid base64") from None
