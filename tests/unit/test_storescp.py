"""The storage SCP's hardening against real pynetdicom peers on loopback: the peer allow-list at accept time, the TLS
handshake off the accept loop, and PDU and instance size limits (as SCP for C-MOVE, and as SCU for C-GET)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from riskbridge.connectors import dicom
from riskbridge.connectors.storescp import InstanceSink, StorageSCP
from riskbridge.settings import PacsSettings, TlsSettings

PACS_AE = "PACS"
SCP_AE = "RB_SCP"
MIB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _instance(size: int) -> Dataset:
    """A CT instance whose dataset is about ``size`` bytes (almost all of it pixel data)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.add_new(0x7FE00010, "OB", bytes(size))
    return ds


def _sink(root: Path, *instances: Dataset, calling_aes: frozenset[str] | None = frozenset({PACS_AE})) -> InstanceSink:
    sink = InstanceSink(root, allowed_calling_aes=calling_aes)
    for ds in instances:
        sink.expect(ds.StudyInstanceUID, ds.SeriesInstanceUID, [ds.SOPInstanceUID])
    return sink


def _staged(root: Path, ds: Dataset) -> Path:
    return root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def _scu(*contexts: str) -> AE:
    ae = AE(ae_title=PACS_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 3
    for context in contexts or (Verification,):
        ae.add_requested_context(context, ExplicitVRLittleEndian if context == CTImageStorage else None)
    return ae


def _closed_within(client: socket.socket, seconds: float) -> bytes:
    """Everything the server sent until it closed ``client``; fails when it is still open after ``seconds``."""
    client.settimeout(seconds)
    received = b""
    try:
        while chunk := client.recv(4096):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the SCP kept the connection open for more than {seconds} s")
    except ConnectionResetError:
        pass
    return received


# --- peer allow-list ---------------------------------------------------------------------------------------------


def test_a_peer_not_on_the_allow_list_is_refused_at_accept_and_a_listed_one_is_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = _free_port()
    with StorageSCP(SCP_AE, port, _sink(tmp_path), allowed_peers=["127.0.0.2"], timeout_s=5) as scp:
        with caplog.at_level(logging.WARNING, logger="riskbridge.connectors.storescp"):
            refused = _scu().associate("127.0.0.1", port, ae_title=SCP_AE)  # the right AE title, the wrong address
        assert not refused.is_established
        assert scp.refused_peers == 1
        assert "connection from 127.0.0.1 refused" in caplog.text and "1 refused since start" in caplog.text
        listed = _scu().associate("127.0.0.1", port, ae_title=SCP_AE, bind_address=("127.0.0.2", 0))
        assert listed.is_established
        assert listed.send_c_echo().Status == 0x0000
        listed.release()
    assert scp.refused_peers == 1


def test_the_pacs_host_is_the_default_peer_and_the_ae_title_check_stays(tmp_path: Path) -> None:
    port = _free_port()
    # A PACS elsewhere (TEST-NET-1): a client on loopback is refused by address even with the PACS's AE title.
    with StorageSCP(SCP_AE, port, _sink(tmp_path), pacs_host="192.0.2.10", timeout_s=5) as scp:
        assert not _scu().associate("127.0.0.1", port, ae_title=SCP_AE).is_established
        assert scp.refused_peers == 1
    # A loopback PACS host allows all of loopback, and the calling AE title is still checked on top.
    with StorageSCP(SCP_AE, port, _sink(tmp_path), pacs_host="127.0.0.1", timeout_s=5) as scp:
        listed = _scu().associate("127.0.0.1", port, ae_title=SCP_AE, bind_address=("127.0.0.3", 0))
        assert listed.is_established
        listed.release()
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(Verification)
        assert not stranger.associate("127.0.0.1", port, ae_title=SCP_AE).is_established
        assert scp.refused_peers == 0


# --- TLS -----------------------------------------------------------------------------------------------------------


def _certificate(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        address = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
        builder = builder.add_extension(x509.SubjectAlternativeName([address]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and two certificates signed by it (``scp``, ``scu``), valid for 127.0.0.1; EC keys, made in-process."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "riskbridge unit test CA")])
    ca = _certificate("riskbridge unit test CA", ca_key, ca_name, ca_key, ca=True)
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in ("scp", "scu"):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _certificate(name, key, ca_name, ca_key, ca=False)
        (directory / f"{name}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return directory


def _tls(pki: Path, name: str) -> TlsSettings:
    return TlsSettings(ca_file=pki / "ca.crt", cert_file=pki / f"{name}.crt", key_file=pki / f"{name}.key")


def _client_context(pki: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    context.load_cert_chain(certfile=str(pki / "scu.crt"), keyfile=str(pki / "scu.key"))
    return context


def test_a_silent_tls_client_does_not_hold_up_the_next_association(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = _free_port()
    scp = StorageSCP(SCP_AE, port, _sink(tmp_path), tls=_tls(pki, "scp"), tls_handshake_timeout_s=1.0, timeout_s=5)
    with scp, caplog.at_level(logging.WARNING, logger="riskbridge.connectors.storescp"):
        silent = socket.create_connection(("127.0.0.1", port))
        try:
            time.sleep(0.2)  # the SCP has accepted the silent connection and waits for its ClientHello
            started = time.monotonic()
            assoc = _scu().associate("127.0.0.1", port, ae_title=SCP_AE, tls_args=(_client_context(pki), "127.0.0.1"))
            assert assoc.is_established, "the second client's association waited on the first client's handshake"
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
            assert time.monotonic() - started < 1.0  # served while the silent client still held its handshake
            # The silent client itself is dropped once tls_handshake_timeout_s has passed.
            assert _closed_within(silent, 4.0) == b""
        finally:
            silent.close()
        # A client that does not speak TLS at all fails its handshake alone, and is logged.
        assert not _scu().associate("127.0.0.1", port, ae_title=SCP_AE).is_established
        assoc = _scu().associate("127.0.0.1", port, ae_title=SCP_AE, tls_args=(_client_context(pki), "127.0.0.1"))
        assert assoc.is_established
        assoc.release()
    assert "TLS handshake with 127.0.0.1 failed: timed out" in caplog.text
    assert caplog.text.count("TLS handshake with 127.0.0.1 failed") == 2


def test_a_refused_peer_is_closed_before_any_tls_handshake(pki: Path, tmp_path: Path) -> None:
    port = _free_port()
    with StorageSCP(
        SCP_AE, port, _sink(tmp_path), tls=_tls(pki, "scp"), allowed_peers=["127.0.0.2"], timeout_s=5
    ) as scp:
        with socket.create_connection(("127.0.0.1", port)) as client:
            # Nothing sent: an SCP that started a handshake would wait for the ClientHello instead of closing.
            assert _closed_within(client, 2.0) == b""
        assert scp.refused_peers == 1


# --- PDU and instance size -------------------------------------------------------------------------------------


def test_an_instance_over_max_instance_mb_aborts_the_association_before_it_is_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = _free_port()
    fits, too_large = _instance(MIB // 2), _instance(MIB + MIB // 2)
    with (
        StorageSCP(SCP_AE, port, _sink(tmp_path, fits, too_large), max_instance_mb=1, timeout_s=5),
        caplog.at_level(logging.WARNING, logger="riskbridge.connectors.dicom"),
    ):
        assoc = _scu(CTImageStorage).associate("127.0.0.1", port, ae_title=SCP_AE)
        assert assoc.send_c_store(fits).Status == 0x0000
        assoc.release()
        assoc = _scu(CTImageStorage).associate("127.0.0.1", port, ae_title=SCP_AE)
        started = time.monotonic()
        assert "Status" not in assoc.send_c_store(too_large)
        assert time.monotonic() - started < 2.0  # no answer because the SCP closed, not a DIMSE timeout (3 s)
    assert _staged(tmp_path, fits).is_file()
    assert not _staged(tmp_path, too_large).exists()
    assert "association aborted: a DIMSE message exceeds 1 MiB ([pacs] max_instance_mb)" in caplog.text


def test_a_pdu_longer_than_the_advertised_maximum_aborts_the_association(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _free_port()
    ds = _instance(200 * 1024)
    with StorageSCP(SCP_AE, port, _sink(tmp_path, ds), max_pdu_kb=16, timeout_s=5):
        assoc = _scu(CTImageStorage).associate("127.0.0.1", port, ae_title=SCP_AE)
        assert assoc.acceptor.maximum_length == 16 * 1024
        # A peer that ignores the length we advertised and sends the whole instance in one PDU.
        monkeypatch.setattr(DIMSEServiceProvider, "maximum_pdu_size", property(lambda self: 1024 * 1024))
        started = time.monotonic()
        assert "Status" not in assoc.send_c_store(ds)
        assert time.monotonic() - started < 2.0
    assert not _staged(tmp_path, ds).exists()


def test_a_pdu_header_claiming_gigabytes_is_answered_with_an_abort_at_once(tmp_path: Path) -> None:
    port = _free_port()
    with (
        StorageSCP(SCP_AE, port, _sink(tmp_path), timeout_s=10),
        socket.create_connection(("127.0.0.1", port)) as client,
    ):
        # An A-ASSOCIATE-RQ header announcing 2 GiB; pynetdicom alone would wait to read all of it.
        client.sendall(struct.pack(">BBL", 0x01, 0x00, 2 * 1024 * MIB) + b"\x00" * 64)
        answer = _closed_within(client, 2.0)
    assert answer[:1] == b"\x07"  # A-ABORT


# --- C-GET: the PACS's C-STOREs arrive on our SCU association ------------------------------------------------------


@pytest.fixture
def get_pacs() -> Iterator[tuple[int, list[Dataset]]]:
    """A C-GET SCP on loopback that sends back whatever datasets the test puts in the list, as C-STORE sub-ops."""
    to_send: list[Dataset] = []

    def handle_get(event: Any) -> Iterator[Any]:
        yield len(to_send)
        for ds in to_send:
            yield 0xFF00, ds

    ae = AE(ae_title=PACS_AE)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    ae.maximum_pdu_size = 0
    port = _free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_GET, handle_get)])
    assert server is not None
    try:
        yield port, to_send
    finally:
        server.shutdown()


def test_c_get_refuses_an_instance_over_max_instance_mb_on_the_scu_association(
    tmp_path: Path, get_pacs: tuple[int, list[Dataset]]
) -> None:
    port, to_send = get_pacs
    pacs = PacsSettings(port=port, called_ae=PACS_AE, max_instance_mb=1, max_attempts=1)
    fits, too_large = _instance(MIB // 2), _instance(MIB + MIB // 2)
    sink = _sink(tmp_path, fits, too_large, calling_aes=None)
    to_send.append(fits)
    answer = dicom.get(
        pacs, fits.StudyInstanceUID, fits.SeriesInstanceUID, sink.handle_store, [CTImageStorage], None, 5
    )
    assert (answer.status, answer.completed) == (0x0000, 1)
    to_send[:] = [too_large]
    with pytest.raises(dicom.DicomError, match="association aborted"):
        dicom.get(pacs, too_large.StudyInstanceUID, too_large.SeriesInstanceUID, sink.handle_store, [CTImageStorage])
    sink.close()
    assert _staged(tmp_path, fits).is_file()
    assert not _staged(tmp_path, too_large).exists()


# --- acceptance by series, from the received bytes ---------------------------------------------------------------


def test_instances_are_accepted_by_the_series_their_dataset_names_wherever_it_names_it(tmp_path: Path) -> None:
    """The study and series are read from the dataset's first 64 KiB when they are there, from the whole instance
    when a long private element pushes them further; an instance naming another series is refused. The staged file
    is the file meta followed by the dataset as received."""
    early = _instance(MIB // 2)
    late = _instance(MIB // 2)
    late.StudyInstanceUID, late.SeriesInstanceUID = early.StudyInstanceUID, early.SeriesInstanceUID
    late.add_new(0x00090010, "LO", "RISKBRIDGE TEST")
    late.add_new(0x00091000, "OB", b"\x01" * (100 * 1024))  # group 0009 comes before group 0020
    other = _instance(1024)
    other.StudyInstanceUID = early.StudyInstanceUID
    sink = InstanceSink(tmp_path, allowed_calling_aes=frozenset({PACS_AE}))
    sink.expect_series(early.StudyInstanceUID, early.SeriesInstanceUID)
    port = _free_port()
    with StorageSCP(SCP_AE, port, sink, timeout_s=5):
        assoc = _scu(CTImageStorage).associate("127.0.0.1", port, ae_title=SCP_AE)
        statuses = [assoc.send_c_store(ds).Status for ds in (early, late, other)]
        assoc.release()
    sink.close()
    assert statuses == [0x0000, 0x0000, 0xC000]
    for ds in (early, late):
        staged = pydicom.dcmread(_staged(tmp_path, ds))
        assert staged.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert staged.PixelData == ds.PixelData
    assert staged[0x00091000].value == late[0x00091000].value
    assert not (tmp_path / other.StudyInstanceUID / other.SeriesInstanceUID).exists()
    assert [refusal.reason for refusal in sink.refusals] == ["instance was not requested"]
    series = (early.StudyInstanceUID, early.SeriesInstanceUID)
    assert sink.take_received(*series) == {early.SOPInstanceUID, late.SOPInstanceUID}
    assert sink.take_received(*series) == set(), "taken once"


def test_an_instance_whose_write_failed_is_not_among_those_received_by_series(tmp_path: Path) -> None:
    """A whole-series answer is judged by what was staged from it: a failed write is a missing instance."""
    written, failing = _instance(1024), _instance(1024)
    failing.StudyInstanceUID = written.StudyInstanceUID
    blocked = tmp_path / failing.StudyInstanceUID / failing.SeriesInstanceUID
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the series directory should be")
    sink = InstanceSink(tmp_path, allowed_calling_aes=frozenset({PACS_AE}))
    for ds in (written, failing):
        sink.expect_series(ds.StudyInstanceUID, ds.SeriesInstanceUID)
    port = _free_port()
    with StorageSCP(SCP_AE, port, sink, timeout_s=5):
        assoc = _scu(CTImageStorage).associate("127.0.0.1", port, ae_title=SCP_AE)
        for ds in (written, failing):
            assoc.send_c_store(ds)
        assoc.release()
    sink.flush()
    assert sink.write_errors == 1
    assert sink.take_received(written.StudyInstanceUID, written.SeriesInstanceUID) == {written.SOPInstanceUID}
    assert sink.take_received(failing.StudyInstanceUID, failing.SeriesInstanceUID) == set()
    sink.close()
