"""DICOM network I/O with the PACS through pynetdicom: associations and the DIMSE services riskbridge uses.

Every failure is a :class:`DicomError` naming the peer (``AE@host:port``), the operation and what the DICOM
status or association result means.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from typing import Literal

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from riskbridge.settings import PacsSettings


class DicomError(Exception):
    """A DICOM operation failed; the message names the peer, the operation and the reason."""


def peer_name(pacs: PacsSettings) -> str:
    """Return the PACS as ``CALLED_AE@host:port`` for messages and logs."""
    return f"{pacs.called_ae}@{pacs.host}:{pacs.port}"


def tls_context(pacs: PacsSettings) -> ssl.SSLContext | None:
    """Build the client TLS context from the PACS settings, or None when TLS is not configured."""
    if pacs.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pacs.tls.ca_file))
    context.load_cert_chain(certfile=str(pacs.tls.cert_file), keyfile=str(pacs.tls.key_file))
    return context


def check_reachable(pacs: PacsSettings, timeout_s: float = 5.0) -> None:
    """Raise :class:`DicomError` unless a TCP connection to the PACS port can be opened."""
    try:
        with socket.create_connection((pacs.host, pacs.port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DicomError(f"{peer_name(pacs)}: cannot open a TCP connection: {reason}") from None


def associate(pacs: PacsSettings, abstract_syntax: str, operation: str, timeout_s: float = 30.0) -> Association:
    """Open an association to the PACS proposing one abstract syntax; raise :class:`DicomError` if refused."""
    ae = AE(ae_title=pacs.calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.add_requested_context(abstract_syntax)
    context = tls_context(pacs)
    tls_args = (context, pacs.host) if context is not None else None
    check_reachable(pacs, timeout_s)
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.called_ae, tls_args=tls_args)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        reason = "association rejected (is the calling AE title known to the PACS, the called AE right?)"
    elif assoc.is_aborted:
        reason = "association aborted by the peer (unknown calling AE title, or TLS mismatch)"
    else:
        reason = "no association (timed out or the peer closed the connection)"
    raise DicomError(f"{operation} {pacs.calling_ae} -> {peer_name(pacs)}: {reason}")


def echo(pacs: PacsSettings, timeout_s: float = 10.0) -> float:
    """Send a C-ECHO to the PACS and return the round trip in seconds; raise :class:`DicomError` on failure."""
    started = time.perf_counter()
    assoc = associate(pacs, Verification, "C-ECHO", timeout_s)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or "Status" not in status:
        raise DicomError(f"C-ECHO {pacs.calling_ae} -> {peer_name(pacs)}: no response within {timeout_s:.0f} s")
    if status.Status != 0x0000:
        raise DicomError(f"C-ECHO {pacs.calling_ae} -> {peer_name(pacs)}: status 0x{status.Status:04X}")
    return time.perf_counter() - started


QueryLevel = Literal["STUDY", "SERIES", "IMAGE"]


def find(pacs: PacsSettings, level: QueryLevel, identifier: Dataset, timeout_s: float = 30.0) -> Iterator[Dataset]:
    """C-FIND (Study Root) at ``level``, yielding each matching identifier as the PACS streams it.

    ``identifier`` holds the matching keys and the empty return keys; ``QueryRetrieveLevel`` is set here.
    Raises :class:`DicomError` on a failure status (0xA700 out of resources, 0xA900 identifier does not match
    the SOP class, 0xCxxx unable to process) or when the PACS stops answering.
    """
    query = Dataset()
    query.update(identifier)
    query.QueryRetrieveLevel = level
    operation = f"C-FIND {level}"
    assoc = associate(pacs, StudyRootQueryRetrieveInformationModelFind, operation, timeout_s)
    try:
        for status, match in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status or "Status" not in status:
                raise DicomError(f"{operation} -> {peer_name(pacs)}: no response within {timeout_s:.0f} s")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                if match is not None:
                    yield match
            elif code == 0x0000:
                return
            else:
                raise DicomError(f"{operation} -> {peer_name(pacs)}: {_find_status_meaning(code)}")
    finally:
        if assoc.is_established:
            assoc.release()


def _find_status_meaning(code: int) -> str:
    if code == 0xFE00:
        return "status 0xFE00 (cancelled)"
    if code == 0xA700:
        return "status 0xA700 (refused: out of resources)"
    if code == 0xA900:
        return "status 0xA900 (identifier does not match SOP class)"
    if 0xC000 <= code <= 0xCFFF:
        return f"status 0x{code:04X} (failed: unable to process)"
    return f"status 0x{code:04X}"
