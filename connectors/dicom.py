"""DICOM network I/O with the PACS through pynetdicom: associations and the DIMSE services riskbridge uses.

Every failure is a :class:`DicomError` naming the peer (``AE@host:port``), the operation and what the DICOM
status or association result means.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import AddressInformation, AssociationSocket

from riskbridge.errors import PacsError
from riskbridge.settings import PacsSettings

LOG = logging.getLogger(__name__)


def keep_phi_out_of_logs() -> None:
    """Stop pynetdicom from logging DICOM identifiers and DIMSE traffic below WARNING.

    pynetdicom logs each C-FIND request and answer (patient names, IDs, accession numbers) at INFO, and a host that
    records INFO from every library (Airflow's task log, a site's root logger) would keep them. Applied when this
    module is imported, so every riskbridge DICOM path (CLI, ``riskbridge run``, the DAGs) has it.
    """
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


keep_phi_out_of_logs()


class DicomError(PacsError):
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


@dataclass(frozen=True)
class TransferLimits:
    """How much one peer may make riskbridge hold: the largest PDU and the largest DIMSE message it receives."""

    max_pdu_bytes: int
    max_message_bytes: int

    @classmethod
    def from_settings(cls, pacs: PacsSettings) -> TransferLimits:
        """The limits ``[pacs] max_pdu_kb`` and ``max_instance_mb`` set."""
        return cls(max_pdu_bytes=pacs.max_pdu_kb * 1024, max_message_bytes=pacs.max_instance_mb * 1024 * 1024)


DEFAULT_LIMITS = TransferLimits.from_settings(PacsSettings())
"""The limits of the default settings, for AEs built without settings at hand."""

_P_DATA_TF = 0x04
# A-ASSOCIATE-RQ/AC/RJ, A-RELEASE and A-ABORT carry no data: 128 presentation contexts, each with every transfer
# syntax, and a user identity token fit in a fraction of this.
_CONTROL_PDU_LIMIT = 1024 * 1024


class BoundedAssociationSocket(AssociationSocket):
    """An association socket that aborts the association when the peer sends more than ``limits`` allow.

    pynetdicom 3.0.4 reads every PDU whole at the length its header claims (up to 4 GiB), whatever maximum PDU length
    was negotiated, and keeps a DIMSE message's fragments in memory until the last one. Here a P-DATA-TF PDU longer
    than ``limits.max_pdu_bytes`` (the length we advertise), any other PDU longer than 1 MiB, and a message whose
    fragments pass ``limits.max_message_bytes`` are refused before pynetdicom buffers them: the peer gets an A-ABORT,
    the connection is closed, and the association ends as aborted. So one association holds at most one message of
    ``max_message_bytes`` plus one PDU. Relies on the pinned release's DUL reading a PDU as ``recv(6)`` for its header,
    then ``recv(length)`` for the rest.
    """

    def __init__(
        self,
        assoc: Association,
        limits: TransferLimits,
        client_socket: socket.socket | None = None,
        address: AddressInformation | None = None,
    ) -> None:
        super().__init__(assoc, client_socket=client_socket, address=address)
        self.limits = limits
        self._read_ahead: bytearray | None = None
        self._message_bytes = 0
        self._refused = False

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` as pynetdicom asks; a PDU header is checked, and its body read and counted, first."""
        if self._refused:
            # pynetdicom's reactor may read once more before it handles the close: nothing after a refusal counts.
            return bytearray()
        if self._read_ahead is not None:
            body, self._read_ahead = self._read_ahead, None
            return body
        header = super().recv(nr_bytes)
        if nr_bytes != 6 or len(header) != 6:
            return header
        pdu_type, length = header[0], int.from_bytes(header[2:6], "big")
        if pdu_type == _P_DATA_TF and length > self.limits.max_pdu_bytes:
            limit = f"the {self.limits.max_pdu_bytes} bytes we advertised ([pacs] max_pdu_kb)"
            return self._refuse(f"a P-DATA PDU of {length} bytes exceeds {limit}")
        if pdu_type != _P_DATA_TF and length > _CONTROL_PDU_LIMIT:
            return self._refuse(f"a PDU of type 0x{pdu_type:02X} claims {length} bytes (at most {_CONTROL_PDU_LIMIT})")
        # The body is read with its header so that a message over the cap is refused before pynetdicom queues it.
        body = super().recv(length)
        if pdu_type == _P_DATA_TF and self._passes_message_cap(body):
            cap_mb = self.limits.max_message_bytes // (1024 * 1024)
            return self._refuse(f"a DIMSE message exceeds {cap_mb} MiB ([pacs] max_instance_mb)")
        self._read_ahead = body
        return header

    def _passes_message_cap(self, body: bytearray) -> bool:
        """Count the fragment bytes of the P-DATA-TF ``body``; True once the current message passes the cap."""
        offset = 0
        while offset + 6 <= len(body):
            item_length = int.from_bytes(body[offset : offset + 4], "big")
            control_header = body[offset + 5]
            # The item holds the presentation context ID and the message control header, then the fragment.
            self._message_bytes += max(item_length - 2, 0)
            if self._message_bytes > self.limits.max_message_bytes:
                return True
            if control_header & 0x02:  # the last fragment of a command set or data set
                self._message_bytes = 0
            offset += 4 + item_length
        return False

    def _refuse(self, reason: str) -> bytearray:
        """Send an A-ABORT, log why, and return an empty header: pynetdicom then ends the association as aborted."""
        self._refused = True
        LOG.warning("DICOM peer %s: association aborted: %s", self._peer(), reason)
        abort = A_ABORT_RQ()
        abort.source = 0x02  # service provider: the limit is ours, not a decision of the peer's DICOM application
        abort.reason_diagnostic = 0x00
        # Straight to the socket: AssociationSocket.send would queue a second "connection closed" event on failure.
        if self.socket is not None:
            with contextlib.suppress(OSError):  # the peer is gone already; the association ends all the same
                self.socket.sendall(abort.encode())
                self.socket.shutdown(socket.SHUT_RDWR)  # the peer learns now, not when pynetdicom gets to it
        # Nothing of the refused PDU is read: pynetdicom sees a connection closed mid-header and closes it for good.
        return bytearray()

    def _peer(self) -> str:
        """The peer as ``AE@address:port`` (what is known of it), for the log."""
        remote = self.assoc.acceptor if self.assoc.is_requestor else self.assoc.requestor
        title = str(remote.ae_title or "").strip() or "?"
        info = remote.address_info
        where = f"{info.address}:{info.port}" if info is not None else "?"
        return f"{title}@{where}"


class NoDelayAE(AE):
    """A pynetdicom AE whose outgoing associations have TCP_NODELAY set and read through the ``limits``.

    pynetdicom 3.0.4 offers no socket-option hook and leaves Nagle's algorithm on; with Nagle on both sides a
    C-FIND took 92 ms here instead of 3-6 ms. The override relies on ``AE._create_socket`` of the pinned release.
    """

    limits: TransferLimits = DEFAULT_LIMITS

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: tuple[ssl.SSLContext, str] | None
    ) -> AssociationSocket:
        association_socket = BoundedAssociationSocket(assoc, self.limits, address=address)
        association_socket.tls_args = tls_args
        if association_socket.socket is not None:
            association_socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return association_socket


def new_ae(ae_title: str, timeout_s: float, limits: TransferLimits = DEFAULT_LIMITS) -> NoDelayAE:
    """Return an AE with riskbridge's timeouts that receives at most ``limits`` (PDU and message size).

    It advertises ``limits.max_pdu_bytes`` as its maximum PDU length, the size the peer fragments messages by.
    """
    ae = NoDelayAE(ae_title=ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.maximum_pdu_size = limits.max_pdu_bytes
    ae.limits = limits
    return ae


def associate(
    pacs: PacsSettings,
    abstract_syntax: str | Sequence[str],
    operation: str,
    timeout_s: float = 30.0,
    *,
    ae: AE | None = None,
    ext_neg: list[Any] | None = None,
    evt_handlers: list[Any] | None = None,
    attempts: int | None = None,
) -> Association:
    """Open an association to the PACS; raise :class:`DicomError` if it is refused or cannot be made.

    ``abstract_syntax`` is one or several SOP classes to propose (ignored when ``ae`` comes with its own
    requested contexts); ``ext_neg`` and ``evt_handlers`` are passed to pynetdicom (SCP/SCU role selection and
    C-STORE handlers for C-GET). A transient failure (port closed, aborted, timed out, rejected as transient,
    e.g. too many associations) is retried with exponential backoff up to ``attempts`` (default
    ``pacs.max_attempts``) times; a permanent rejection (unknown AE title) is not.
    """
    if ae is None:
        ae = new_ae(pacs.calling_ae, timeout_s, TransferLimits.from_settings(pacs))
        for syntax in [abstract_syntax] if isinstance(abstract_syntax, str) else abstract_syntax:
            ae.add_requested_context(syntax)
    context = tls_context(pacs)
    tls_args = (context, pacs.host) if context is not None else None
    total = attempts or pacs.max_attempts
    for attempt in range(1, total + 1):
        if attempt > 1:
            time.sleep(min(0.5 * 2 ** (attempt - 2), 8.0))
        try:
            check_reachable(pacs, timeout_s)
        except DicomError:
            if attempt == total:
                raise
            continue
        assoc = ae.associate(
            pacs.host,
            pacs.port,
            ae_title=pacs.called_ae,
            tls_args=tls_args,
            ext_neg=ext_neg,
            evt_handlers=evt_handlers,
        )
        if assoc.is_established:
            return assoc
        reason, transient = _association_failure(assoc)
        if not transient or attempt == total:
            break
        LOG.warning("%s -> %s: %s; attempt %d of %d", operation, peer_name(pacs), reason, attempt, total)
    raise DicomError(f"{operation} {pacs.calling_ae} -> {peer_name(pacs)}: {reason} (attempt {attempt} of {total})")


def _association_failure(assoc: Association) -> tuple[str, bool]:
    """Explain why an association was not established, and whether trying again may help."""
    if assoc.is_rejected:
        result = getattr(assoc.acceptor.primitive, "result", None)
        if result == 0x02:
            return "association rejected, transient (the PACS may be at its association limit)", True
        return "association rejected (is the calling AE title known to the PACS, the called AE right?)", False
    if assoc.is_aborted:
        return "association aborted by the peer (unknown calling AE title, or TLS mismatch)", False
    return "no association (timed out or the peer closed the connection)", True


def echo(pacs: PacsSettings, timeout_s: float = 10.0, attempts: int = 1) -> float:
    """Send a C-ECHO to the PACS and return the round trip in seconds; raise :class:`DicomError` on failure.

    One attempt by default: an echo is a health check and should report what it sees, not retry past it.
    """
    started = time.perf_counter()
    assoc = associate(pacs, Verification, "C-ECHO", timeout_s, attempts=attempts)
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


def find(
    pacs: PacsSettings, level: QueryLevel, identifier: Dataset, timeout_s: float = 30.0
) -> Generator[Dataset, None, None]:
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
    finished = False
    try:
        for status, match in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status or "Status" not in status:
                raise DicomError(f"{operation} -> {peer_name(pacs)}: no response within {timeout_s:.0f} s")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                if match is not None:
                    yield match
            elif code == 0x0000:
                finished = True
                return
            else:
                finished = True
                raise DicomError(f"{operation} -> {peer_name(pacs)}: {_find_status_meaning(code)}")
    finally:
        if assoc.is_established:
            # A caller that stops reading early leaves the PACS still sending matches: a release then races
            # them (pynetdicom warns, and one release in three hung for the whole timeout here), an abort does not.
            if finished:
                assoc.release()
            else:
                assoc.abort()


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


@dataclass(frozen=True)
class SubOperations:
    """The final answer of a C-MOVE or C-GET: its status and the PACS's sub-operation counters.

    These are reported, never trusted alone: Orthanc 1.10 answers many different failures with 0xC000 and zero
    counters, so completeness is always decided by what actually arrived (a clean success is one condition of a
    whole-series answer standing for the listing: :mod:`riskbridge.connectors.retrieval`).
    """

    status: int
    completed: int
    failed: int
    warning: int
    meaning: str


_RETRIEVE_STATUS = {
    0x0000: "success",
    0xA701: "refused: out of resources (unable to calculate number of matches)",
    0xA702: "refused: out of resources (unable to perform sub-operations)",
    0xA801: "refused: move destination unknown",
    0xA900: "identifier does not match SOP class",
    0xB000: "sub-operations complete, one or more failures",
    0xFE00: "cancelled",
}


def retrieve_status_meaning(code: int) -> str:
    """Return what a C-MOVE/C-GET final status means, e.g. ``0xC000 (failed: unable to process)``."""
    if code in _RETRIEVE_STATUS:
        return f"0x{code:04X} ({_RETRIEVE_STATUS[code]})"
    if 0xC000 <= code <= 0xCFFF:
        return f"0x{code:04X} (failed: unable to process; Orthanc uses it for unknown destinations and dead SCPs too)"
    return f"0x{code:04X}"


def _retrieve_identifier(study_uid: str, series_uid: str, sop_instance_uids: Sequence[str] | None) -> Dataset:
    identifier = Dataset()
    identifier.StudyInstanceUID = study_uid
    identifier.SeriesInstanceUID = series_uid
    if sop_instance_uids:
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.SOPInstanceUID = list(sop_instance_uids)
    else:
        identifier.QueryRetrieveLevel = "SERIES"
    return identifier


def _final_suboperations(responses: Iterator[tuple[Dataset, Dataset | None]], operation: str) -> SubOperations:
    last: Dataset | None = None
    for status, _ in responses:
        if not status or "Status" not in status:
            raise DicomError(f"{operation}: no response from the PACS (DIMSE timeout or association aborted)")
        last = status
        if int(status.Status) not in (0xFF00, 0xFF01):
            break
    if last is None:
        raise DicomError(f"{operation}: the PACS sent no response")
    code = int(last.Status)

    def counter(name: str) -> int:
        return int(getattr(last, name, 0) or 0)

    return SubOperations(
        status=code,
        completed=counter("NumberOfCompletedSuboperations"),
        failed=counter("NumberOfFailedSuboperations"),
        warning=counter("NumberOfWarningSuboperations"),
        meaning=retrieve_status_meaning(code),
    )


def move(
    pacs: PacsSettings,
    destination_ae: str,
    study_uid: str,
    series_uid: str,
    sop_instance_uids: Sequence[str] | None = None,
    timeout_s: float = 30.0,
) -> SubOperations:
    """C-MOVE a series (or, with ``sop_instance_uids``, just those instances) to ``destination_ae``.

    Returns the final status and counters; raises :class:`DicomError` only when no association or no answer.
    """
    operation = f"C-MOVE {pacs.calling_ae} -> {peer_name(pacs)} (destination {destination_ae})"
    assoc = associate(pacs, StudyRootQueryRetrieveInformationModelMove, operation, timeout_s)
    try:
        identifier = _retrieve_identifier(study_uid, series_uid, sop_instance_uids)
        responses = assoc.send_c_move(identifier, destination_ae, StudyRootQueryRetrieveInformationModelMove)
        return _final_suboperations(responses, operation)
    finally:
        if assoc.is_established:
            assoc.release()


def get(
    pacs: PacsSettings,
    study_uid: str,
    series_uid: str,
    store_handler: Callable[[Any], int],
    storage_classes: Sequence[str],
    sop_instance_uids: Sequence[str] | None = None,
    timeout_s: float = 30.0,
) -> SubOperations:
    """C-GET a series (or just ``sop_instance_uids``); the PACS's C-STOREs go to ``store_handler``.

    Proposes the Study Root GET model plus the SCP role for ``storage_classes`` only (one association carries at
    most 128 presentation contexts), each with every transfer syntax so stored compression arrives unchanged.
    """
    operation = f"C-GET {pacs.calling_ae} -> {peer_name(pacs)}"
    if len(storage_classes) > 127:
        raise DicomError(f"{operation}: {len(storage_classes)} storage classes exceed one association's contexts")
    # The PACS's C-STOREs arrive on this association: the same PDU and instance size limits as the storage SCP's.
    ae = new_ae(pacs.calling_ae, timeout_s, TransferLimits.from_settings(pacs))
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in storage_classes:
        ae.add_requested_context(sop_class, ALL_TRANSFER_SYNTAXES)
    roles = [build_role(sop_class, scp_role=True) for sop_class in storage_classes]
    assoc = associate(
        pacs, (), operation, timeout_s, ae=ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, store_handler)]
    )
    try:
        identifier = _retrieve_identifier(study_uid, series_uid, sop_instance_uids)
        responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
        return _final_suboperations(responses, operation)
    finally:
        if assoc.is_established:
            assoc.release()
