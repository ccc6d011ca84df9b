"""DICOM network I/O with the PACS through pynetdicom: associations and the DIMSE services riskbridge uses.

Every failure is a :class:`DicomError` naming the peer (``AE@host:port``), the operation and what the DICOM
status or association result means.
"""

from __future__ import annotations

import socket
import ssl
import time

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

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


def echo(pacs: PacsSettings, timeout_s: float = 10.0) -> float:
    """Send a C-ECHO to the PACS and return the round trip in seconds; raise :class:`DicomError` on failure."""
    ae = AE(ae_title=pacs.calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    context = tls_context(pacs)
    tls_args = (context, pacs.host) if context is not None else None
    check_reachable(pacs, timeout_s)
    started = time.perf_counter()
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.called_ae, tls_args=tls_args)
    if not assoc.is_established:
        if assoc.is_rejected:
            reason = "association rejected (is the calling AE title known to the PACS?)"
        elif assoc.is_aborted:
            reason = "association aborted by the peer (unknown calling AE title, or TLS mismatch)"
        else:
            reason = "no association (host unreachable, port closed or timed out)"
        raise DicomError(f"C-ECHO {pacs.calling_ae} -> {peer_name(pacs)}: {reason}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or "Status" not in status:
        raise DicomError(f"C-ECHO {pacs.calling_ae} -> {peer_name(pacs)}: no response within {timeout_s:.0f} s")
    if status.Status != 0x0000:
        raise DicomError(f"C-ECHO {pacs.calling_ae} -> {peer_name(pacs)}: status 0x{status.Status:04X}")
    return time.perf_counter() - started
