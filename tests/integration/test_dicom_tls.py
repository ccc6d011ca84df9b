"""DICOM over TLS with dcmtk as the independent peer, in both directions.

riskbridge's storage SCP requires a client certificate from our CA (dcmtk's storescu connects with one, and
without TLS it gets nowhere); riskbridge's SCU verifies dcmtk storescp's server certificate and presents its own.
Certificates are made with the openssl command line for 127.0.0.1.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from riskbridge.connectors.dicom import DicomError, echo
from riskbridge.connectors.storescp import InstanceSink, StorageSCP
from riskbridge.settings import PacsSettings, TlsSettings

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(pki: Path, name: str) -> None:
    """A key and a certificate for ``name`` signed by the test CA, valid for 127.0.0.1."""
    (pki / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=pki)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=pki)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=riskbridge test CA", cwd=directory)  # fmt: skip
    for name in ("scp", "scu"):
        _issue(directory, name)
    return directory


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _tls(pki: Path, name: str) -> TlsSettings:
    return TlsSettings(ca_file=pki / "ca.crt", cert_file=pki / f"{name}.crt", key_file=pki / f"{name}.key")


def test_the_storage_scp_accepts_tls_with_a_client_certificate_only(pki: Path, tmp_path: Path) -> None:
    source = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    header = pydicom.dcmread(source, stop_before_pixels=True)
    sink = InstanceSink(tmp_path / "staging", allowed_calling_aes=frozenset({"DCMTK"}))
    sink.expect(header.StudyInstanceUID, header.SeriesInstanceUID, [header.SOPInstanceUID])
    port = _free_port()
    command = ["storescu", "-aet", "DCMTK", "-aec", "RB_TLS_SCP"]
    with StorageSCP("RB_TLS_SCP", port, sink, tls=_tls(pki, "scp"), timeout_s=10):
        plain = subprocess.run([*command, "127.0.0.1", str(port), str(source)],
                               capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        secured = subprocess.run(
            [*command, "+tls", str(pki / "scu.key"), str(pki / "scu.crt"), "+cf", str(pki / "ca.crt"),
             "127.0.0.1", str(port), str(source)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert plain.returncode != 0
    assert secured.returncode == 0, secured.stderr
    staged = tmp_path / "staging" / header.StudyInstanceUID / header.SeriesInstanceUID / f"{header.SOPInstanceUID}.dcm"
    assert staged.read_bytes()[132:] and pydicom.dcmread(staged).PixelData == pydicom.dcmread(source).PixelData


@pytest.fixture
def dcmtk_tls_scp(pki: Path, tmp_path: Path) -> Iterator[int]:
    """dcmtk's storescp listening with TLS and requiring a client certificate (-rc) from our CA."""
    port = _free_port()
    process = subprocess.Popen(
        ["storescp", "-aet", "DCMTK_TLS", "+tls", str(pki / "scp.key"), str(pki / "scp.crt"),
         "+cf", str(pki / "ca.crt"), "-rc", "-od", str(tmp_path), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"dcmtk storescp exited with {process.returncode} before listening")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_scu_speaks_tls_to_dcmtk_and_verifies_its_certificate(pki: Path, dcmtk_tls_scp: int) -> None:
    secured = PacsSettings(port=dcmtk_tls_scp, called_ae="DCMTK_TLS", tls=_tls(pki, "scu"))
    assert echo(secured, timeout_s=10) < 10
    # A CA that did not sign dcmtk's certificate: the handshake fails and the error names the peer.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.crt",
             "-days", "2", "-subj", "/CN=another CA", cwd=pki)  # fmt: skip
    distrusting = TlsSettings(ca_file=pki / "other.crt", cert_file=pki / "scu.crt", key_file=pki / "scu.key")
    with pytest.raises(DicomError, match=rf"C-ECHO RISKBRIDGE -> DCMTK_TLS@127\.0\.0\.1:{dcmtk_tls_scp}"):
        echo(PacsSettings(port=dcmtk_tls_scp, called_ae="DCMTK_TLS", tls=distrusting), timeout_s=10)
