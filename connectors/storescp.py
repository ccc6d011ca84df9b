"""riskbridge's own Storage SCP: the receiving end of C-MOVE (and the C-STORE handler of C-GET).

It accepts associations only from the configured PACS AE titles and only instances the caller said it expects:
listed by SOPInstanceUID (:meth:`InstanceSink.expect`) or, when only the series' instance count is known, any
instance whose dataset names an expected series (:meth:`InstanceSink.expect_series`, read from the received bytes
without decoding them). Anything else is refused with a DICOM failure status and logged by hashed UID.
Every accepted instance is written atomically to the staging area from the received bytes as they are
(``event.encoded_dataset()``: decoding in the handler measured 33% slower), so receiving one twice is harmless.
Writes run on background threads (:class:`~riskbridge.connectors.staging.BackgroundWriter`), a bounded number in
flight, so the sender's next C-STORE is not held up by the disk (the PACS waits for each C-STORE response before it
sends the next instance); :meth:`InstanceSink.flush`, called after each C-MOVE or C-GET, fsyncs the batch and only
then renames its files into place. The response is therefore sent before the file is on disk: completeness is
decided afterwards by the staged files (after :meth:`InstanceSink.flush`), never by the statuses this SCP returned,
so a failed write shows up as a missing instance and is fetched again.
It hardens what it accepts, in this order: a connection from an address outside the allowed peers
(``[pacs] scp_allowed_peers``, by default the PACS host's addresses) is closed as it is accepted, before TLS or any
DICOM is read; the TLS handshake runs on the connection's own thread with a timeout, so a client that connects and
stays silent holds up nobody else; the calling AE title must be the PACS's; PDUs longer than the maximum PDU length
it advertises (``[pacs] max_pdu_kb``) and instances larger than ``[pacs] max_instance_mb`` abort the association
before they are buffered (:class:`~riskbridge.connectors.dicom.BoundedAssociationSocket`). Off loopback it refuses
to listen without TLS unless told to (``[pacs] scp_allow_plaintext``). It sets TCP_NODELAY on accepted connections.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    Verification,
)
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from riskbridge.connectors import part10, staging
from riskbridge.connectors.dicom import BoundedAssociationSocket, DicomError, TransferLimits
from riskbridge.errors import ConfigurationError
from riskbridge.records import uid_hash
from riskbridge.settings import PacsSettings, TlsSettings

LOG = logging.getLogger(__name__)

CT_STORAGE_CLASSES: tuple[str, ...] = (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
"""The storage SOP classes a CT series arrives as."""

STATUS_SUCCESS = 0x0000
STATUS_REFUSED = 0xC000  # "Error: cannot understand": C-STORE defines no "not authorized" status
STATUS_OUT_OF_RESOURCES = 0xA700


@dataclass
class Refusal:
    """One instance the sink refused, for logs and tests (UIDs hashed)."""

    calling_ae: str
    sop_hash: str
    reason: str


@dataclass
class InstanceSink:
    """Writes received instances to staging if, and only if, they were expected."""

    staging_root: Path
    allowed_calling_aes: frozenset[str] | None = None  # None: any (C-GET, where we called the PACS ourselves)
    refusals: list[Refusal] = field(default_factory=list)
    bytes_received: int = 0
    write_errors: int = 0
    writers: int = 4
    max_in_flight: int = 32  # instances received but not yet written (about 17 MB of 512x512 slices)
    _expected: dict[str, tuple[str, str]] = field(default_factory=dict)
    _expected_series: set[tuple[str, str]] = field(default_factory=set)
    _received: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # accepted by series, per series
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _writer: staging.BackgroundWriter | None = None

    def expect(self, study_uid: str, series_uid: str, sop_instance_uids: Iterable[str]) -> None:
        """Accept these instances of this series from now on."""
        with self._lock:
            for sop in sop_instance_uids:
                self._expected[sop] = (study_uid, series_uid)

    def forget(self, sop_instance_uids: Iterable[str]) -> None:
        """Stop accepting these instances."""
        with self._lock:
            for sop in sop_instance_uids:
                self._expected.pop(sop, None)

    def expect_series(self, study_uid: str, series_uid: str) -> None:
        """Accept any instance whose dataset belongs to this series, from now on; :meth:`take_received` tells
        which were accepted so."""
        with self._lock:
            self._expected_series.add((study_uid, series_uid))
            self._received[(study_uid, series_uid)] = set()

    def take_received(self, study_uid: str, series_uid: str) -> set[str]:
        """The SOPInstanceUIDs accepted for this series by their dataset since :meth:`expect_series`, less those
        whose write failed; call it after :meth:`flush` (the staged ones, then). Forgets them."""
        with self._lock:
            return self._received.pop((study_uid, series_uid), set())

    def forget_series(self, study_uid: str, series_uid: str) -> None:
        """Stop accepting instances by their series."""
        with self._lock:
            self._expected_series.discard((study_uid, series_uid))

    def _target(self, sop: str, meta: bytes, dataset: bytes) -> tuple[str, str] | None:
        """The (study, series) an instance is expected for, by its SOP UID or by the series its dataset names."""
        with self._lock:
            target = self._expected.get(sop)
            by_series = bool(self._expected_series)
        if target is not None or not by_series:
            return target
        uids = _study_and_series(meta, dataset)
        with self._lock:
            if uids not in self._expected_series:
                return None
            self._received.setdefault(uids, set()).add(sop)
            return uids

    def _refuse(self, calling_ae: str, sop: str, reason: str) -> int:
        refusal = Refusal(calling_ae, uid_hash(sop) if sop else "-", reason)
        with self._lock:
            self.refusals.append(refusal)
        LOG.warning("C-STORE refused from %s: instance %s: %s", calling_ae, refusal.sop_hash, reason)
        return STATUS_REFUSED

    def handle_store(self, event: Any) -> int:
        """The EVT_C_STORE handler: check, then queue the received bytes for an atomic write; return the status."""
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        sop = str(event.request.AffectedSOPInstanceUID or "")
        if self.allowed_calling_aes is not None and calling_ae not in self.allowed_calling_aes:
            return self._refuse(calling_ae, sop, "calling AE title is not a configured PACS")
        # The same bytes as event.encoded_dataset(include_meta=True), without building a pydicom FileMetaDataset, and
        # kept as two pieces written one after the other: joining them copied every instance once more.
        meta = part10.file_preamble(str(event.request.AffectedSOPClassUID), sop, str(event.context.transfer_syntax))
        dataset = event.request.DataSet.getvalue()
        target = self._target(sop, meta, dataset)
        if target is None:
            return self._refuse(calling_ae, sop, "instance was not requested")
        try:
            path = staging.instance_path(self.staging_root, target[0], target[1], sop)
        except staging.StagingError as exc:
            LOG.error("C-STORE from %s: instance %s could not be staged: %s", calling_ae, uid_hash(sop), exc)
            return STATUS_OUT_OF_RESOURCES
        self._submit(path, (meta, dataset))
        return STATUS_SUCCESS

    def _submit(self, path: Path, data: tuple[bytes, ...]) -> None:
        with self._lock:
            if self._writer is None:
                # Back-pressure: a slow disk slows the sender instead of filling memory.
                self._writer = staging.BackgroundWriter(self.writers, max_bytes=1 << 62, max_items=self.max_in_flight)
            writer = self._writer
        writer.submit(path, data)

    def flush(self) -> None:
        """Make every instance received so far durable and staged (written, fsynced, renamed into place) or failed:
        failures are logged (hashed UID) and counted in ``write_errors``, and show up as missing instances."""
        with self._lock:
            writer = self._writer
        if writer is None:
            return
        committed = writer.commit()
        for failure in committed.failures:
            LOG.error("C-STORE: instance %s could not be staged: %s", uid_hash(failure.path.stem), failure.error)
        with self._lock:
            self.bytes_received += committed.bytes
            self.write_errors += len(committed.failures)
            for failure in committed.failures:
                series = (failure.path.parent.parent.name, failure.path.parent.name)
                self._received.get(series, set()).discard(failure.path.stem)

    def close(self) -> None:
        """Flush and stop the writer threads."""
        self.flush()
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()


# The dataset's Study and Series Instance UIDs come early (group 0020, after groups 0008-0018); this much of it is
# walked first, and the whole instance only when they are not within it.
_HEAD_BYTES = 64 * 1024


def _study_and_series(meta: bytes, dataset: bytes) -> tuple[str, str] | None:
    """(StudyInstanceUID, SeriesInstanceUID) of the instance whose file meta is ``meta`` and dataset ``dataset``.

    The first :data:`_HEAD_BYTES` of the dataset are walked (a result only when the walk passed the Series
    Instance UID, so never from a cut element); otherwise, or for encodings the walk leaves to pydicom, the whole
    instance is read as :func:`part10.study_and_series` reads it.
    """
    if len(dataset) > _HEAD_BYTES:
        head = meta + dataset[:_HEAD_BYTES]
        try:
            uids = part10.dataset_uids(head, part10.read_file_meta(head), whole=False)
        except part10.Part10Error:
            uids = None
        if uids is not None:
            study, series = uids
            return (study, series) if study and series else None
    return part10.study_and_series(meta + dataset)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _unmapped(network: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``) as the IPv4 network it means; others as they are."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def peer_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IP address of a connection's ``host``: an IPv4-mapped IPv6 address as its IPv4 address, no zone."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def allowed_networks(allowed_peers: Sequence[str], pacs_host: str) -> tuple[IPNetwork, ...]:
    """The networks a peer's address must be in: ``allowed_peers``, or when empty the addresses of ``pacs_host``.

    A PACS host that resolves to a loopback address allows all of loopback (``127.0.0.0/8`` and ``::1``): a PACS on
    this machine may connect from any of them. Raises :class:`DicomError` when ``pacs_host`` cannot be resolved, since
    no peer could be trusted then.
    """
    if allowed_peers:
        return tuple(_unmapped(ipaddress.ip_network(peer, strict=True)) for peer in allowed_peers)
    try:
        found = socket.getaddrinfo(pacs_host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise DicomError(
            f"storage SCP: cannot resolve the PACS host {pacs_host!r} to decide which peers to accept ({exc}); "
            "list them in [pacs] scp_allowed_peers"
        ) from None
    addresses = {peer_address(str(info[4][0])) for info in found}
    networks: list[IPNetwork] = [ipaddress.ip_network(a) for a in sorted(addresses, key=str) if not a.is_loopback]
    if any(address.is_loopback for address in addresses):
        networks.extend(LOOPBACK_NETWORKS)
    return tuple(networks)


class _BoundedRequestHandler(RequestHandler):
    """pynetdicom's request handler, with the association reading through the server's transfer limits."""

    server: _StorageServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        plain = assoc.dul.socket
        assert plain is not None and plain.socket is not None
        bounded = BoundedAssociationSocket(assoc, self.server.limits, client_socket=plain.socket)
        # Both sockets announced the same connection to the not yet started DUL (Evt5): it must see it once.
        assoc.dul.event_queue.get_nowait()
        assoc.dul.socket = bounded
        return assoc


class _StorageServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, hardened: the peer check at accept, TLS on the request's thread, bounded reads.

    The accept loop only accepts, sets TCP_NODELAY and checks the peer's address; anything that waits on the peer
    (the TLS handshake, the association) runs on the connection's own thread.
    """

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        allowed: tuple[IPNetwork, ...],
        handshake_timeout_s: float,
        limits: TransferLimits,
    ) -> None:
        self.allowed = allowed
        self.handshake_timeout_s = handshake_timeout_s
        self.limits = limits
        self.refused_peers = 0
        super().__init__(
            ae, address, ae_title, contexts, ssl_context, evt_handlers, request_handler=_BoundedRequestHandler
        )

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Accept a connection only from an allowed peer address; socketserver closes the others."""
        host = str(client_address[0])
        try:
            address = peer_address(host)
        except ValueError:
            address = None
        if address is not None and any(address in network for network in self.allowed):
            return True
        self.refused_peers += 1
        LOG.warning(
            "storage SCP %s: connection from %s refused: not an allowed peer ([pacs] scp_allowed_peers); "
            "%d refused since start",
            self.ae_title,
            host,
            self.refused_peers,
        )
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Finish the TLS handshake (when configured) on this connection's thread, then serve the association."""
        if self.ssl_context is not None:
            request = self._handshake(request, client_address)
            if request is None:
                return
        super().process_request_thread(request, client_address)

    def _handshake(self, client: socket.socket, client_address: Any) -> ssl.SSLSocket | None:
        """The TLS-wrapped ``client``, or None (connection closed, reason logged) when the handshake fails or stalls."""
        assert self.ssl_context is not None
        timeout = client.gettimeout()
        client.settimeout(self.handshake_timeout_s)
        try:
            secured = self.ssl_context.wrap_socket(client, server_side=True)
        except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            LOG.warning("storage SCP %s: TLS handshake with %s failed: %s", self.ae_title, client_address[0], reason)
            self.shutdown_request(client)
            return None
        secured.settimeout(timeout)
        return secured


def server_tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """Return a TLS context for the SCP that requires a client certificate signed by the configured CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca_file))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    return context


_DEFAULTS = PacsSettings()


class StorageSCP:
    """A Storage SCP listening on ``(bind_address, port)`` as ``ae_title`` while the context is open.

    The keyword arguments after ``timeout_s`` are ``[pacs]`` settings, with their defaults: ``allowed_peers`` is
    ``scp_allowed_peers``, ``pacs_host`` is ``host`` (whose addresses are the allowed peers when that list is empty),
    ``allow_plaintext`` is ``scp_allow_plaintext``; the others have the settings' names.
    """

    def __init__(
        self,
        ae_title: str,
        port: int,
        sink: InstanceSink,
        *,
        bind_address: str = "127.0.0.1",
        tls: TlsSettings | None = None,
        timeout_s: float = 30.0,
        allowed_peers: Sequence[str] = (),
        pacs_host: str = _DEFAULTS.host,
        allow_plaintext: bool = _DEFAULTS.scp_allow_plaintext,
        tls_handshake_timeout_s: float = _DEFAULTS.tls_handshake_timeout_s,
        max_pdu_kb: int = _DEFAULTS.max_pdu_kb,
        max_instance_mb: int = _DEFAULTS.max_instance_mb,
    ) -> None:
        self.ae_title = ae_title
        self.port = port
        self.sink = sink
        self.bind_address = bind_address
        self.tls = tls
        self.timeout_s = timeout_s
        self.allowed_peers = tuple(allowed_peers)
        self.pacs_host = pacs_host
        self.allow_plaintext = allow_plaintext
        self.tls_handshake_timeout_s = tls_handshake_timeout_s
        self.limits = TransferLimits(max_pdu_bytes=max_pdu_kb * 1024, max_message_bytes=max_instance_mb * 1024 * 1024)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._refused_peers = 0

    @property
    def refused_peers(self) -> int:
        """Connections refused because their address is not an allowed peer, since the last start."""
        return int(self._server.refused_peers) if self._server is not None else self._refused_peers

    def start(self) -> StorageSCP:
        """Start listening in a background thread.

        Raises :class:`ConfigurationError` for plaintext off loopback without ``allow_plaintext``,
        :class:`DicomError` when the PACS host (the default allowed peer) cannot be resolved, OSError when the port
        cannot be bound.
        """
        if self.tls is None and not self.allow_plaintext and not PacsSettings.is_loopback(self.bind_address):
            raise ConfigurationError(
                f"storage SCP {self.ae_title}: refusing to listen on {self.bind_address} without TLS; configure "
                "[pacs.tls], or set [pacs] scp_allow_plaintext = true to accept unencrypted images"
            )
        allowed = allowed_networks(self.allowed_peers, self.pacs_host)
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = self.limits.max_pdu_bytes
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        if self.sink.allowed_calling_aes is not None:
            ae.require_calling_aet = sorted(self.sink.allowed_calling_aes)
        for sop_class in CT_STORAGE_CLASSES:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self._server = ae.make_server(
            (self.bind_address, self.port),
            ae_title=self.ae_title,
            ssl_context=server_tls_context(self.tls) if self.tls else None,
            evt_handlers=[(evt.EVT_C_STORE, self.sink.handle_store)],
            server_class=_StorageServer,
            allowed=allowed,
            handshake_timeout_s=self.tls_handshake_timeout_s,
            limits=self.limits,
        )
        # What AE.start_server does after make_server; the server's shutdown() expects to find itself there.
        ae._servers.append(self._server)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"storescp-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening, close the socket, and wait for the sink to write what it received."""
        if self._server is not None:
            self._server.shutdown()  # also closes the listening socket
            self._refused_peers = self._server.refused_peers
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.sink.flush()

    def __enter__(self) -> StorageSCP:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
