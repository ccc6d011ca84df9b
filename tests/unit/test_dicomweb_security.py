"""DICOMweb hardening without a PACS: only verified parts are staged, answers are read within caps, and the client
authenticates like the FHIR client (same auth section, token handling, plain-http rule) with a site CA bundle and a
client certificate (checked against a local HTTPS server that requires one)."""

from __future__ import annotations

import base64
import datetime
import http.server
import io
import json
import logging
import pickle
import ssl
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian
from requests.adapters import BaseAdapter
from test_dicomweb_multipart import BOUNDARY, CT, SERIES, STUDY, body, chunked, instance, sop_uid

from riskbridge.connectors import dicomweb, staging
from riskbridge.connectors.dicomweb import DicomwebClient, DicomwebError
from riskbridge.connectors.multipart import (
    MAX_HEAD_BYTES,
    PartTooLargeError,
    RefusedPart,
    RejectedPartError,
    stage_multipart,
)
from riskbridge.connectors.part10 import file_preamble
from riskbridge.connectors.retrieval import Retriever
from riskbridge.errors import ConfigurationError
from riskbridge.records import uid_hash
from riskbridge.settings import DicomwebSettings, FhirAuth, HttpTlsSettings, PacsSettings, SettingsError, load_settings

MR = "1.2.840.10008.5.1.4.1.1.4"  # same length as CT's SOP class UID: patched in place
SECRET = "pa55-w0rd-not-default"
SERIES_PATH = f"/studies/{STUDY}/series/{SERIES}"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def encoded(
    sop: str,
    transfer_syntax: str = ExplicitVRLittleEndian,
    private_bytes: int = 0,
    series: str = SERIES,
    payload: bytes = b"\x05" * 3000,
) -> bytes:
    """Part 10 bytes of a CT instance in ``transfer_syntax``; ``private_bytes`` of a private element (group 0009)
    stand before the study and series UIDs."""
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = sop
    if private_bytes:
        ds.add_new(0x00090010, "LO", "RISKBRIDGE TEST")
        ds.add_new(0x00091010, "OB", b"\x00" * private_bytes)
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.BitsAllocated = 16
    ds.PixelData = payload
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT)
    meta.MediaStorageSOPInstanceUID = UID(sop)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta = meta
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # big endian is retired; pydicom still writes it
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def in_dataset(data: bytes, old: str, new: str) -> bytes:
    """``data`` with the dataset's copy of UID ``old`` (the last one) replaced by ``new`` of the same length."""
    assert len(old) == len(new)
    at = data.rindex(old.encode())
    return data[:at] + new.encode() + data[at + len(old) :]


def part(data: bytes, content_type: str | None = "application/dicom", length: bool = True) -> bytes:
    """One multipart part with the given headers."""
    headers = b"".join(
        [
            b"Content-Type: %s\r\n" % content_type.encode() if content_type is not None else b"",
            b"Content-Length: %d\r\n" % len(data) if length else b"",
        ]
    )
    return b"--" + BOUNDARY.encode() + b"\r\n" + headers + b"\r\n" + data + b"\r\n"


def multipart(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--" + BOUNDARY.encode() + b"--\r\n"


def stage(data: bytes, root: Path, **kwargs: Any) -> Any:
    return stage_multipart(chunked(data, 4096), BOUNDARY, root, STUDY, SERIES, **kwargs)


# --- only a part verified as the instance it claims to be is staged --------------------------------------------------


TWO = in_dataset(instance(sop_uid(2)), sop_uid(2), sop_uid(2)[:-1] + "9")
UNKNOWN_SYNTAX = instance(sop_uid(2)).replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.7\x00", 1)


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (part(instance(sop_uid(2)), content_type=None), "has no Content-Type"),
        (part(instance(sop_uid(2)), content_type="application/octet-stream"), "is not application/dicom"),
        (part(instance(sop_uid(2)), content_type="application/dicom-x"), "is not application/dicom"),
        (
            part(instance(sop_uid(2)), content_type="application/dicom; transfer-syntax=1.2.840.10008.1.2"),
            "Content-Type names transfer syntax 1.2.840.10008.1.2, the file meta 1.2.840.10008.1.2.1",
        ),
        (part(UNKNOWN_SYNTAX), "transfer syntax 1.2.840.10008.1.2.7 is not a known one"),
        (part(TWO), "SOPInstanceUID .* in the dataset is not the file meta's"),
        (part(in_dataset(instance(sop_uid(2)), CT, MR)), "SOPClassUID .* in the dataset is not the file meta's"),
        (
            part(file_preamble(CT, sop_uid(2), ExplicitVRLittleEndian) + b"\x08\x00\x16\x00ui\x02\x001\x00"),
            "the dataset has no SOPClassUID",
        ),
        (part(encoded(sop_uid(2), private_bytes=MAX_HEAD_BYTES + 100_000)), "not within its first 1048576 bytes"),
        (part(encoded(sop_uid(2), DeflatedExplicitVRLittleEndian, series=STUDY + ".3")), "SeriesInstanceUID"),
        (part(encoded(sop_uid(2), ExplicitVRBigEndian, series=STUDY + ".3")), "SeriesInstanceUID"),
    ],
)
def test_a_part_that_cannot_be_verified_is_refused_and_not_staged(tmp_path: Path, second: bytes, message: str) -> None:
    data = multipart(part(instance(sop_uid(1))), second, part(instance(sop_uid(3))))
    with pytest.raises(RejectedPartError, match=message) as caught:
        stage(data, tmp_path)
    assert caught.value.refusal.index == 1 and str(caught.value).startswith("part 1")
    assert sop_uid(2) not in str(caught.value)  # UIDs appear hashed only
    assert staging.staged_instances(tmp_path, STUDY, SERIES) == {sop_uid(1)}


@pytest.mark.parametrize(
    "data",
    [
        encoded(sop_uid(1), DeflatedExplicitVRLittleEndian),  # small: the whole part inflates
        encoded(sop_uid(1), DeflatedExplicitVRLittleEndian, payload=bytes(range(256)) * 2000),  # head inflated alone
        encoded(sop_uid(1), ExplicitVRBigEndian, payload=b"\x05" * 200_000),
        encoded(sop_uid(1), private_bytes=200_000),  # group 0020 past the first 64 KiB: read on to 1 MiB
    ],
)
def test_encodings_the_walk_cannot_read_at_once_are_still_verified(tmp_path: Path, data: bytes) -> None:
    staged = stage(multipart(part(data, content_type=f"application/dicom; transfer-syntax={_syntax(data)}")), tmp_path)
    assert staged.instances == [sop_uid(1)] and staged.verified == 1
    assert staging.instance_path(tmp_path, STUDY, SERIES, sop_uid(1)).read_bytes() == data


def _syntax(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)


def test_a_part_over_the_size_cap_is_refused_by_its_content_length_or_as_it_arrives(tmp_path: Path) -> None:
    big = instance(sop_uid(2), payload=b"\x07" * 200_000)
    for length in (True, False):
        root = tmp_path / str(length)
        data = multipart(part(instance(sop_uid(1))), part(big, length=length), part(instance(sop_uid(3))))
        with pytest.raises(PartTooLargeError, match=r"part 1.*cap of 100000 bytes") as caught:
            stage(data, root, max_part_bytes=100_000)
        assert ("Content-Length" in str(caught.value)) == length
        directory = staging.series_dir(root, STUDY, SERIES)
        assert sorted(p.name for p in directory.iterdir()) == [f"{sop_uid(1)}.dcm"]  # no partial file either
    assert stage(multipart(part(big)), tmp_path / "roomy", max_part_bytes=len(big)).instances == [sop_uid(2)]


def test_refusals_survive_pickling() -> None:
    error = pickle.loads(pickle.dumps(PartTooLargeError(3, sop_uid(1), "too big")))
    assert isinstance(error, PartTooLargeError)
    assert error.refusal == RefusedPart(3, uid_hash(sop_uid(1)), "too big")
    assert str(error) == f"part 3 (instance {uid_hash(sop_uid(1))}): too big"


# --- the client: an in-memory server ----------------------------------------------------------------------------------


class Body(io.RawIOBase):
    """A response body that counts what was read of it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self.data[self.read_bytes : self.read_bytes + len(buffer)]
        buffer[: len(chunk)] = chunk
        self.read_bytes += len(chunk)
        return len(chunk)


Answer = tuple[int, str, bytes]


class Server(BaseAdapter):
    """Answers each request with ``handle(path, query, headers)``; keeps what was asked and what was read."""

    def __init__(self, handle: Callable[[str, str, dict[str, str]], Answer]) -> None:
        super().__init__()
        self.handle = handle
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.bodies: list[Body] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        path, _, query = (request.path_url or "").partition("?")
        headers = dict(request.headers)
        self.requests.append((path, query, headers))
        status, content_type, data = self.handle(path.removeprefix("/dicom-web"), query, headers)
        response = requests.Response()
        response.status_code = status
        response.reason = {200: "OK", 401: "Unauthorized", 500: "Internal Server Error"}.get(status, "Other")
        response.headers["Content-Type"] = content_type
        body = Body(data)
        self.bodies.append(body)
        response.raw = io.BufferedReader(body)
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        pass


def client_for(server: Server, base: str = "http://pacs/dicom-web", **kwargs: Any) -> DicomwebClient:
    session = requests.Session()
    session.mount(base.split("/")[0] + "//", server)
    return DicomwebClient(base, session=session, backoff_s=0.0, **kwargs)


def listing(sops: list[str]) -> bytes:
    return json.dumps([{"00080018": {"vr": "UI", "Value": [sop]}} for sop in sops]).encode()


def test_an_instance_the_listing_lacks_is_refused_and_recorded_and_the_series_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    listed = [sop_uid(n) for n in (1, 2, 3)]
    extra = sop_uid(4)  # a real instance of the series, but not one QIDO-RS lists

    def handle(path: str, query: str, headers: dict[str, str]) -> Answer:
        if path.endswith("/instances"):
            return 200, "application/dicom+json", listing(listed) if "offset=0" in query else b"[]"
        return 200, MULTIPART, body([instance(sop) for sop in [*listed[:2], extra, listed[2]]])

    client = client_for(Server(handle))
    with caplog.at_level(logging.WARNING, logger="riskbridge.connectors.dicomweb"):
        result = client.retrieve_series(STUDY, SERIES, tmp_path)
    assert result.complete and result.received == 3
    assert staging.staged_instances(tmp_path, STUDY, SERIES) == set(listed)
    assert client.refusals == [RefusedPart(2, uid_hash(extra), "not asked for")] and client.counters.refused == 1
    assert f"refused part 2 (instance {uid_hash(extra)}): not asked for" in caplog.text and extra not in caplog.text


def test_a_part_of_another_series_fails_the_request_and_is_recorded(tmp_path: Path) -> None:
    stranger = instance(sop_uid(2), series=STUDY + ".7")

    def handle(path: str, query: str, headers: dict[str, str]) -> Answer:
        return 200, MULTIPART, body([instance(sop_uid(1)), stranger, instance(sop_uid(3))])

    client = client_for(Server(handle))
    with pytest.raises(DicomwebError, match=r"refused part 1 .*SeriesInstanceUID") as caught:
        client.retrieve_series(STUDY, SERIES, tmp_path, expected={sop_uid(n) for n in (1, 2, 3)})
    assert not caught.value.transient and caught.value.status == 200
    assert [r.index for r in client.refusals] == [1] and "SeriesInstanceUID" in client.refusals[0].reason
    assert staging.staged_instances(tmp_path, STUDY, SERIES) == {sop_uid(1)}


def test_a_part_over_max_part_bytes_fails_the_request_naming_the_setting(tmp_path: Path) -> None:
    def handle(path: str, query: str, headers: dict[str, str]) -> Answer:
        return 200, MULTIPART, body([instance(sop_uid(1), payload=b"\x01" * 150_000)], content_length=False)

    client = client_for(Server(handle), max_part_bytes=100_000, chunk_size=16 * 1024)
    with pytest.raises(DicomwebError, match=r"cap of 100000 bytes.*pacs\.dicomweb\.max_part_mb") as caught:
        client.retrieve_instances(STUDY, SERIES, None, tmp_path)
    assert not caught.value.transient and client.counters.refused == 1
    directory = staging.series_dir(tmp_path, STUDY, SERIES)
    # A part is held in memory until it ends (a bigger one is written as it arrives): nothing is left either way.
    assert not directory.exists() or list(directory.iterdir()) == []


def test_only_a_few_kib_of_an_error_body_are_read(tmp_path: Path) -> None:
    huge = b'{"Message": "' + b"x" * 5_000_000 + b'"}'
    small = json.dumps({"Message": f"no such series {SERIES}"}).encode()
    answers = [huge, small]
    server = Server(lambda path, query, headers: (500, "application/json", answers.pop(0)))
    client = client_for(server, max_error_body_bytes=4096)
    with pytest.raises(
        DicomwebError, match=r"HTTP 500: Internal Server Error \(error body over 4096 bytes, not read\)"
    ):
        client.series_instances(STUDY, SERIES)
    assert server.bodies[0].read_bytes <= 64 * 1024  # not the 5 MB
    with pytest.raises(DicomwebError) as caught:
        client.series_instances(STUDY, SERIES)
    assert f"(no such series {uid_hash(SERIES)})" in str(caught.value) and caught.value.transient


def test_a_listing_that_pages_without_end_fails_after_max_pages(tmp_path: Path) -> None:
    def endless(path: str, query: str, headers: dict[str, str]) -> Answer:
        offset = int(query.split("offset=")[1].split("&")[0])
        return 200, "application/dicom+json", listing([sop_uid(offset + n) for n in range(1, 3)])

    server = Server(endless)
    client = client_for(server, qido_page_size=2, max_pages=5)
    with pytest.raises(DicomwebError, match=r"still grows after 5 pages of 2 .*pacs\.dicomweb\.max_pages"):
        client.series_instances(STUDY, SERIES)
    assert len(server.requests) == 6

    def fixed(path: str, query: str, headers: dict[str, str]) -> Answer:  # ignores offset: no progress ends it
        return 200, "application/dicom+json", listing([sop_uid(1), sop_uid(2)])

    server = Server(fixed)
    assert client_for(server, qido_page_size=2, max_pages=5).series_instances(STUDY, SERIES) == {
        sop_uid(1),
        sop_uid(2),
    }
    assert len(server.requests) == 2


def test_a_json_answer_over_its_cap_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dicomweb, "MAX_JSON_BYTES", 1000)
    server = Server(lambda path, query, headers: (200, "application/dicom+json", listing([sop_uid(1)] * 100)))
    with pytest.raises(DicomwebError, match="larger than"):
        client_for(server).series_instances(STUDY, SERIES)
    assert not client_for(server).supports_dicomweb()


# --- authentication and TLS -------------------------------------------------------------------------------------------


def wado_with_auth(accepted: Callable[[dict[str, str]], bool]) -> Callable[[str, str, dict[str, str]], Answer]:
    def handle(path: str, query: str, headers: dict[str, str]) -> Answer:
        if not accepted(headers):
            return 401, "application/json", b"{}"
        if path.endswith("/instances"):
            return 200, "application/dicom+json", listing([sop_uid(1)]) if "offset=0" in query else b"[]"
        return 200, MULTIPART, body([instance(sop_uid(1))])

    return handle


@pytest.mark.parametrize(
    ("auth", "header"),
    [
        (
            FhirAuth(type="basic", username="svc", password=SECRET),
            "Basic " + base64.b64encode(f"svc:{SECRET}".encode()).decode(),
        ),
        (FhirAuth(type="bearer", token=SECRET), f"Bearer {SECRET}"),
    ],
)
def test_static_credentials_from_settings_go_with_every_request(tmp_path: Path, auth: FhirAuth, header: str) -> None:
    server = Server(wado_with_auth(lambda headers: headers.get("Authorization") == header))
    session = requests.Session()
    session.mount("https://", server)
    pacs = PacsSettings(dicomweb_url="https://pacs.test/dicom-web", dicomweb=DicomwebSettings(auth=auth))
    with DicomwebClient.from_settings(pacs, session=session) as client:
        assert client.retrieve_series(STUDY, SERIES, tmp_path).complete
        assert SECRET not in repr(client)
    assert len(server.requests) == 3  # two QIDO-RS pages and the series, each authorized


def test_oauth2_tokens_come_through_the_same_transport_and_are_renewed_once_on_401(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    issued: list[str] = []
    valid: set[str] = set()

    def handle(path: str, query: str, headers: dict[str, str]) -> Answer:
        if path == "/token":
            assert headers["Authorization"].startswith("Basic ")  # client_secret_basic
            issued.append(f"t{len(issued) + 1}")
            valid.add(issued[-1])
            return 200, "application/json", json.dumps({"access_token": issued[-1], "expires_in": 300}).encode()
        return wado_with_auth(lambda h: h.get("Authorization", "").removeprefix("Bearer ") in valid)(
            path, query, headers
        )

    server = Server(handle)
    auth = FhirAuth(type="oauth2", token_url="https://pacs.test/token", client_id="rb", client_secret=SECRET)
    caplog.set_level(logging.DEBUG)
    client = client_for(server, base="https://pacs.test/dicom-web", auth=auth)
    assert client.series_instances(STUDY, SERIES) == {sop_uid(1)}
    assert issued == ["t1"]
    valid.clear()  # the server revoked t1
    assert client.retrieve_series(STUDY, SERIES, tmp_path, expected={sop_uid(1)}).complete
    assert issued == ["t1", "t2"]
    assert "access token obtained" in caplog.text and "t1" not in caplog.text and SECRET not in caplog.text

    refusing = Server(lambda path, query, headers: (401, "application/json", b'{"error": "invalid_client"}'))
    with pytest.raises(DicomwebError, match=r"POST token endpoint pacs\.test: HTTP 401: invalid_client") as caught:
        client_for(refusing, base="https://pacs.test/dicom-web", auth=auth).series_instances(STUDY, SERIES)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "auth", "refused"),
    [
        ("http://127.0.0.1:18042/dicom-web", FhirAuth(type="basic", username="u", password=SECRET), None),
        ("http://localhost/dicom-web", FhirAuth(type="bearer", token=SECRET), None),
        ("https://pacs.hospital.example/dicom-web", FhirAuth(type="bearer", token=SECRET), None),
        ("http://pacs.hospital.example/dicom-web", FhirAuth(), None),
        (
            "http://pacs.hospital.example/dicom-web",
            FhirAuth(type="basic", username="u", password=SECRET),
            "pacs.dicomweb_url",
        ),
        ("http://10.0.0.8/dicom-web", FhirAuth(type="bearer", token=SECRET), "pacs.dicomweb_url"),
        (
            "https://pacs.hospital.example/dicom-web",
            FhirAuth(type="oauth2", token_url="http://auth.hospital.example/t", client_id="c", client_secret=SECRET),
            "pacs.dicomweb.auth.token_url",
        ),
    ],
)
def test_credentials_are_never_configured_over_plain_http_to_a_remote_host(
    url: str, auth: FhirAuth, refused: str | None
) -> None:
    pacs = PacsSettings(dicomweb_url=url, dicomweb=DicomwebSettings(auth=auth))
    if refused is None:
        DicomwebClient.from_settings(pacs).close()
        return
    with pytest.raises(
        ConfigurationError, match=f"{refused}: pacs.dicomweb.auth type '{auth.type}' would send"
    ) as caught:
        DicomwebClient.from_settings(pacs)
    assert "https://" in str(caught.value) and SECRET not in str(caught.value)


def test_credentials_in_the_url_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="credentials in the URL are refused") as caught:
        DicomwebClient(f"https://svc:{SECRET}@pacs.test/dicom-web")
    assert SECRET not in str(caught.value)


def test_dicomweb_settings_check_their_files_and_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pem = tmp_path / "c.pem"
    pem.write_text("x")
    with pytest.raises(ValueError, match="file not found"):
        HttpTlsSettings(ca_file=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        HttpTlsSettings(cert_file=pem)
    defaults = PacsSettings().dicomweb
    assert (defaults.auth.type, defaults.max_part_mb, defaults.max_error_body_kb, defaults.max_pages) == (
        "none",
        512,
        4,
        100,
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RISKBRIDGE_PACS__DICOMWEB__AUTH__TYPE", "bearer")
    with pytest.raises(SettingsError, match=r"pacs\.dicomweb\.auth"):
        load_settings()
    monkeypatch.setenv("RISKBRIDGE_PACS__DICOMWEB__AUTH__TOKEN", SECRET)
    monkeypatch.setenv("RISKBRIDGE_PACS__DICOMWEB__MAX_PART_MB", "64")
    settings = load_settings()
    assert settings.pacs.dicomweb.auth.type == "bearer" and settings.pacs.dicomweb.max_part_mb == 64
    monkeypatch.setenv("RISKBRIDGE_PACS__DICOMWEB__MAX_PAGES", "0")
    with pytest.raises(SettingsError, match=r"pacs\.dicomweb\.max_pages"):
        load_settings()


# A local HTTPS server signed by a throwaway CA, requiring a client certificate from the same CA.


def _certificate(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_file, key_file = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


@pytest.fixture
def https_pacs(tmp_path: Path) -> Iterator[tuple[str, Path, tuple[Path, Path]]]:
    """A QIDO-RS endpoint over HTTPS at 127.0.0.1 that requires a client certificate; yields (base URL, CA bundle,
    client certificate and key)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("riskbridge test CA", ca_key, None)
    ca_file, _ = _write(tmp_path / "ca", ca, ca_key)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server_files = _write(tmp_path / "server", _certificate("127.0.0.1", server_key, (ca.subject, ca_key)), server_key)
    client_files = _write(tmp_path / "client", _certificate("riskbridge", client_key, (ca.subject, ca_key)), client_key)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = listing([sop_uid(1)]) if "offset=0" in self.path else b"[]"
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_file))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(*server_files)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/dicom-web", ca_file, client_files
    finally:
        server.shutdown()
        server.server_close()


def test_the_site_ca_and_the_client_certificate_from_settings_reach_an_https_pacs(
    https_pacs: tuple[str, Path, tuple[Path, Path]],
) -> None:
    url, ca_file, (cert_file, key_file) = https_pacs
    tls = HttpTlsSettings(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    pacs = PacsSettings(dicomweb_url=url, timeout_s=5, dicomweb=DicomwebSettings(tls=tls))
    with DicomwebClient.from_settings(pacs) as client:
        assert client.session.verify == str(ca_file) and client.session.cert == (str(cert_file), str(key_file))
        assert client.series_instances(STUDY, SERIES) == {sop_uid(1)}
    without_ca = pacs.model_copy(
        update={"dicomweb": DicomwebSettings(tls=HttpTlsSettings(cert_file=cert_file, key_file=key_file))}
    )
    with DicomwebClient.from_settings(without_ca) as client, pytest.raises(DicomwebError, match="cannot connect"):
        client.series_instances(STUDY, SERIES)  # the system CAs do not know the site CA
    without_certificate = pacs.model_copy(update={"dicomweb": DicomwebSettings(tls=HttpTlsSettings(ca_file=ca_file))})
    with (
        DicomwebClient.from_settings(without_certificate) as client,
        pytest.raises(DicomwebError, match="no HTTP answer"),
    ):
        client.series_instances(STUDY, SERIES)  # the server requires a client certificate


def test_a_secret_never_shows_in_the_settings_repr() -> None:
    web = DicomwebSettings(auth=FhirAuth(type="bearer", token=SecretStr(SECRET)))
    assert SECRET not in repr(web) and SECRET not in repr(PacsSettings(dicomweb=web))


def _retriever_on(server: Server, root: Path, monkeypatch: pytest.MonkeyPatch) -> Retriever:
    client = client_for(server)
    monkeypatch.setattr(DicomwebClient, "from_settings", classmethod(lambda cls, pacs, session=None: client))
    return Retriever(PacsSettings(dicomweb_url="http://pacs/dicom-web"), root, "dicomweb")


def _listings(server: Server) -> int:
    """QIDO-RS listings asked for (their first pages)."""
    return sum(1 for path, query, _ in server.requests if path.endswith("/instances") and "offset=0" in query)


def test_a_whole_clean_answer_of_the_counted_instances_proves_the_series_without_a_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sops = [sop_uid(n) for n in (1, 2, 3)]

    def handle(path: str, query: str, headers: dict[str, str]) -> Answer:
        assert not path.endswith("/instances"), "no listing is needed"
        return 200, MULTIPART, body([instance(sop) for sop in sops])

    server = Server(handle)
    with _retriever_on(server, tmp_path, monkeypatch) as retriever:
        record = retriever.retrieve(STUDY, SERIES, expected=3)
    assert record.complete and (record.received, record.attempts) == (3, 1)
    assert len(server.requests) == 1 and _listings(server) == 0


def test_a_whole_series_answer_with_a_duplicate_part_proves_nothing_and_the_series_is_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection (Orthanc never sends an instance twice): three parts for three counted instances, one of
    them twice. The answer does not stand for the listing; the listing names the third, which is fetched alone."""
    sops = [sop_uid(n) for n in (1, 2, 3)]

    def handle(path: str, query: str, headers: dict[str, str]) -> Answer:
        if path.endswith("/instances"):
            return 200, "application/dicom+json", listing(sops) if "offset=0" in query else b"[]"
        if path.endswith(sops[2]):
            return 200, MULTIPART, body([instance(sops[2])])
        return 200, MULTIPART, body([instance(sop) for sop in (sops[0], sops[1], sops[0])])

    server = Server(handle)
    with _retriever_on(server, tmp_path, monkeypatch) as retriever:
        record = retriever.retrieve(STUDY, SERIES, expected=3)
    assert record.complete and record.received == 3
    assert _listings(server) == 1
    assert staging.staged_instances(tmp_path, STUDY, SERIES) == set(sops)
