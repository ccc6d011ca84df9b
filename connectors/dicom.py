"""DICOM network I/O with the PACS through pynetdicom: associations and the DIMSE services riskbridge uses.

Every failure is a :class:`DicomError` naming the peer (``AE@host:port``), the operation and what the DICOM
status or association result means.
"""

from __future__ import annotations

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
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

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


class NoDelayAE(AE):
    """A pynetdicom AE whose outgoing association sockets have TCP_NODELAY set.

    pynetdicom 3.0.4 offers no socket-option hook and leaves Nagle's algorithm on; with Nagle on both sides a
    C-FIND took 92 ms here instead of 3-6 ms. The override relies on ``AE._create_socket`` of the pinned release.
    """

    def _create_socket(self, assoc: Association, address: Any, tls_args: Any) -> Any:
        association_socket = super()._create_socket(assoc, address, tls_args)
        if association_socket.socket is not None:
            association_socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return association_socket


def new_ae(ae_title: str, timeout_s: float) -> NoDelayAE:
    """Return an AE with riskbridge's timeouts and an unlimited receive PDU size (the sender sizes PDUs by it)."""
    ae = NoDelayAE(ae_title=ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.maximum_pdu_size = 0
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
        ae = new_ae(pacs.calling_ae, timeout_s)
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

    These are reported, never trusted: Orthanc 1.10 answers many different failures with 0xC000 and zero
    counters, so completeness is always decided by counting what actually arrived.
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
    ae = new_ae(pacs.calling_ae, timeout_s)
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
