"""The DICOMweb connector without a server: the incremental multipart/related parser (connectors/multipart.py) on
synthetic bodies cut into awkward chunks, the file-meta and dataset-UID readers, staging of parts, and the retry
logic of ``DicomwebClient.retrieve_series`` against an in-memory requests adapter."""

from __future__ import annotations

import io
import json
import pickle
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from requests.adapters import BaseAdapter

from riskbridge.connectors import multipart, staging
from riskbridge.connectors.dicom import DicomError
from riskbridge.connectors.dicomweb import DicomwebClient, DicomwebError, redact
from riskbridge.connectors.multipart import (
    MultipartError,
    RejectedPartError,
    boundary_from_content_type,
    iter_multipart,
    stage_multipart,
)
from riskbridge.connectors.part10 import Part10Error, dataset_uids, read_file_meta
from riskbridge.records import uid_hash

BOUNDARY = "f8394610-7312-440b-980a-eb1109d28964-7a79494f-4970-419c-92ae-efe7d8ade"  # Orthanc-style, 72 chars
CT = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.2"


def sop_uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.1.2.{n}"


def instance(
    sop: str,
    study: str = STUDY,
    series: str = SERIES,
    sop_class: str = CT,
    payload: bytes = b"",
    implicit: bool = False,
    sequence_before_uids: bool = False,
) -> bytes:
    """Part 10 bytes of a small instance; ``payload`` becomes its pixel data."""
    with warnings.catch_warnings():  # some cases carry an invalid UID on purpose
        warnings.simplefilter("ignore")
        return _instance(sop, study, series, sop_class, payload, implicit, sequence_before_uids)


def _instance(
    sop: str, study: str, series: str, sop_class: str, payload: bytes, implicit: bool, sequence_before_uids: bool
) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    if sequence_before_uids:
        item = Dataset()
        item.ReferencedSOPClassUID = CT
        item.ReferencedSOPInstanceUID = "1.2.3.4.5"
        nested = Dataset()
        nested.SeriesInstanceUID = "9.9.9.9"  # a SeriesInstanceUID inside a sequence must not be taken
        item.ReferencedSeriesSequence = Sequence([nested])
        ds.ReferencedImageSequence = Sequence([item])
    ds.BitsAllocated = 16
    ds.PixelData = payload + (b"\x00" if len(payload) % 2 else b"")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop)
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta = meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def body(
    parts: list[bytes],
    boundary: str = BOUNDARY,
    content_length: bool = True,
    preamble: bytes = b"",
    epilogue: bytes = b"\r\n",
    close: bool = True,
) -> bytes:
    dash = b"--" + boundary.encode()
    out = preamble + b"\r\n" if preamble else b""
    for part in parts:
        out += dash + b"\r\nContent-Type: application/dicom\r\n"
        if content_length:
            out += b"Content-Length: %d\r\n" % len(part)
        out += b"MIME-Version: 1.0\r\n\r\n" + part + b"\r\n"
    return out + (dash + b"--" + epilogue if close else b"")


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def parse(chunks: Iterator[bytes] | list[bytes], boundary: str = BOUNDARY) -> list[tuple[dict[str, str], bytes]]:
    return [(part.headers, b"".join(part.body())) for part in iter_multipart(chunks, boundary)]


TRICKY = b"x\r\n--" + BOUNDARY[:-1].encode() + b"y--" + BOUNDARY.encode() + b"\r\n-\r\n--"


@pytest.fixture(scope="module")
def payloads() -> list[bytes]:
    rng = random.Random(3)
    out = [b"", b"a", TRICKY, b"\r\n", b"--" + BOUNDARY.encode() + b"\r\n"]
    out += [rng.randbytes(rng.randint(0, 3000)) for _ in range(25)]
    return out


# multipart framing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_length", [True, False])
@pytest.mark.parametrize("size", [1, 7, 4096, 1 << 20])
def test_many_parts_survive_any_chunk_size(payloads: list[bytes], content_length: bool, size: int) -> None:
    data = body(payloads, content_length=content_length)
    parsed = parse(chunked(data, size))
    assert [content for _, content in parsed] == payloads
    assert all(headers["content-type"] == "application/dicom" for headers, _ in parsed)


@pytest.mark.parametrize("content_length", [True, False])
def test_a_boundary_split_at_every_position_across_two_chunks(content_length: bool) -> None:
    parts = [b"first" * 50, TRICKY, b"third"]
    data = body(parts, content_length=content_length)
    delimiter = b"\r\n--" + BOUNDARY.encode()
    second = data.index(delimiter, data.index(b"first"))
    for cut in range(second, second + len(delimiter) + 6):
        assert [content for _, content in parse([data[:cut], data[cut:]])] == parts, cut
    closing = data.rindex(b"--" + BOUNDARY.encode() + b"--")
    for cut in range(closing - 2, closing + len(BOUNDARY) + 5):
        assert [content for _, content in parse([data[:cut], data[cut:]])] == parts, cut


def test_random_splits_and_empty_chunks(payloads: list[bytes]) -> None:
    rng = random.Random(11)
    data = body(payloads, content_length=False, preamble=b"preamble text", epilogue=b"\r\nepilogue")
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(data)), 40))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        pieces.insert(rng.randrange(len(pieces)), b"")
        assert [content for _, content in parse(pieces)] == payloads


def test_preamble_epilogue_transport_padding_and_folded_headers() -> None:
    dash = b"--" + BOUNDARY.encode()
    data = (
        b"This is a preamble; --" + BOUNDARY.encode() + b" inside it is no boundary\r\n"
        + dash + b"  \t\r\nContent-Type: application/dicom;\r\n  transfer-syntax=1.2.840.10008.1.2.1\r\n\r\nONE\r\n"
        + dash + b"\r\n\r\nTWO\r\n"  # a part without headers
        + dash + b"--\r\nepilogue, ignored\r\n" + dash + b"\r\n"
    )  # fmt: skip
    parsed = parse(chunked(data, 5))
    assert [content for _, content in parsed] == [b"ONE", b"TWO"]
    assert parsed[0][0]["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
    assert parsed[1][0] == {}


def test_a_body_that_starts_with_the_boundary_and_one_with_no_parts() -> None:
    assert [c for _, c in parse([body([b"only"])])] == [b"only"]
    assert parse([b"--" + BOUNDARY.encode() + b"--"]) == []


@pytest.mark.parametrize("content_length", [True, False])
def test_a_missing_closing_delimiter_is_an_error(content_length: bool) -> None:
    data = body([b"one", b"two"], content_length=content_length, close=False)
    with pytest.raises(MultipartError, match="closing delimiter"):
        parse(chunked(data, 7))
    without_dashes = data + b"--" + BOUNDARY.encode()  # delimiter, but neither "--" nor a next part
    with pytest.raises(MultipartError, match="closing delimiter"):
        parse([without_dashes])


@pytest.mark.parametrize("content_length", [True, False])
def test_a_body_cut_inside_a_part_is_an_error(content_length: bool) -> None:
    data = body([b"one" * 100, b"two" * 100], content_length=content_length)
    with pytest.raises(MultipartError):
        parse(chunked(data[: data.index(b"two") + 50], 64))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"no boundary at all", "no multipart boundary"),
        (b"--" + BOUNDARY.encode() + b"X\r\n\r\nbody\r\n--" + BOUNDARY.encode() + b"--", "not followed by CRLF"),
        (b"--" + BOUNDARY.encode() + b"\r\nno colon here\r\n\r\nx\r\n--" + BOUNDARY.encode() + b"--", "malformed"),
        (b"--" + BOUNDARY.encode() + b"\r\nContent-Length: 2\r\n\r\nabc\r\n--" + BOUNDARY.encode() + b"--", "Length"),
        (b"--" + BOUNDARY.encode() + b"\r\nContent-Length: x\r\n\r\nab\r\n--" + BOUNDARY.encode() + b"--", "number"),
        (b"--" + BOUNDARY.encode() + b"\r\nContent-Type: a", "inside the headers"),
    ],
)
def test_malformed_framing(data: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        parse(chunked(data, 3))


def test_an_unread_part_body_is_skipped() -> None:
    parts = list(iter_multipart([body([b"skip me", b"read me"])], BOUNDARY))
    assert len(parts) == 2  # advancing drained the first body
    with pytest.raises(RuntimeError):
        parts[0].body()


@pytest.mark.parametrize(
    ("header", "boundary"),
    [
        (f'multipart/related; type="application/dicom"; boundary={BOUNDARY}', BOUNDARY),
        ('Multipart/Related; boundary="a b:c"; type=application/dicom', "a b:c"),
        ("multipart/related; boundary=xyz", "xyz"),
    ],
)
def test_boundary_from_content_type(header: str, boundary: str) -> None:
    assert boundary_from_content_type(header) == boundary


@pytest.mark.parametrize(
    "header",
    [
        "application/dicom",
        "multipart/related; type=application/dicom",
        'multipart/related; type="image/jpeg"; boundary=a',
    ],
)
def test_boundary_from_a_wrong_content_type(header: str) -> None:
    with pytest.raises(MultipartError):
        boundary_from_content_type(header)


# file meta and dataset UIDs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("sequence", [False, True])
def test_file_meta_and_dataset_uids_agree_with_pydicom(implicit: bool, sequence: bool) -> None:
    data = instance(sop_uid(1), implicit=implicit, sequence_before_uids=sequence, payload=b"\x01" * 100)
    reference = pydicom.dcmread(io.BytesIO(data))
    meta = read_file_meta(data)
    assert meta.sop_instance_uid == reference.file_meta.MediaStorageSOPInstanceUID
    assert meta.sop_class_uid == reference.file_meta.MediaStorageSOPClassUID
    assert meta.transfer_syntax_uid == reference.file_meta.TransferSyntaxUID
    assert dataset_uids(data, meta, whole=True) == (reference.StudyInstanceUID, reference.SeriesInstanceUID)
    cut = data.index(SERIES.encode()) + 3  # head ends inside SeriesInstanceUID: not verifiable, not wrong
    assert dataset_uids(data[:cut], meta, whole=False) is None


def test_file_meta_of_the_synthetic_cohort(tmp_path: Path) -> None:
    from riskbridge.dev.synth import generate

    generate(tmp_path / "cohort", patients=1, seed=5, workers=1)
    files = sorted((tmp_path / "cohort" / "dicom").rglob("*.dcm"))
    assert files
    for path in files[::7]:
        data = path.read_bytes()
        reference = pydicom.dcmread(path, stop_before_pixels=True)
        meta = read_file_meta(data)
        assert (meta.sop_class_uid, meta.sop_instance_uid) == (reference.SOPClassUID, reference.SOPInstanceUID)
        assert dataset_uids(data, meta, whole=True) == (reference.StudyInstanceUID, reference.SeriesInstanceUID)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "no DICOM file meta"),
        (b"\x00" * 128 + b"DIC", "no DICOM file meta"),
        (b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x40\x00" + b"1.2", "truncated"),
        (b"\x00" * 128 + b"DICM" + b"\x08\x00\x16\x00UI\x02\x001\x00", "lacks MediaStorageSOPClassUID"),
        (b"\x00" * 128 + b"DICM" + b"\x02\x00\x02\x00\x1a\x00\x00\x00" + b"1" * 26, "not explicit VR"),
    ],
)
def test_unreadable_file_meta(data: bytes, message: str) -> None:
    with pytest.raises(Part10Error, match=message):
        read_file_meta(data)


# staging parts ------------------------------------------------------------------------------------------------


def test_stage_multipart_names_files_by_sop_instance_uid(tmp_path: Path) -> None:
    files = {sop_uid(n): instance(sop_uid(n), payload=bytes([n]) * (n * 997) + TRICKY) for n in range(1, 13)}
    for content_length in (True, False):
        root = tmp_path / str(content_length)
        staged = stage_multipart(chunked(body(list(files.values()), content_length=content_length), 4096), BOUNDARY,
                                 root, STUDY, SERIES)  # fmt: skip
        assert staged.instances == list(files)
        assert staged.verified == len(files)
        assert staged.bytes == sum(len(data) for data in files.values())
        assert staging.staged_instances(root, STUDY, SERIES) == set(files)
        for sop, data in files.items():
            assert staging.instance_path(root, STUDY, SERIES, sop).read_bytes() == data


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (b"not a DICOM file at all", "no DICOM file meta"),
        (instance(sop_uid(2), sop_class=SECONDARY_CAPTURE), "SOP class 1.2.840.10008.5.1.4.1.1.7 is not allowed"),
        (instance(sop_uid(2), series="1.2.826.0.1.3680043.8.498.1.3"), "SeriesInstanceUID"),
        (instance(sop_uid(2), study="1.2.826.0.1.3680043.8.498.9"), "StudyInstanceUID"),
        (instance("1.2.826.0.1.3680043.8.498.1.2.2.x"), "not a valid UID"),
    ],
)
def test_a_refused_part_stops_staging_and_names_the_reason(tmp_path: Path, part: bytes, message: str) -> None:
    data = body([instance(sop_uid(1)), part, instance(sop_uid(3))])
    with pytest.raises(RejectedPartError, match=message) as caught:
        stage_multipart(chunked(data, 7), BOUNDARY, tmp_path, STUDY, SERIES)
    assert "part 1" in str(caught.value)
    assert "1.2.826.0.1.3680043.8.498.1.2.2" not in str(caught.value)  # UIDs appear hashed only
    assert staging.staged_instances(tmp_path, STUDY, SERIES) == {sop_uid(1)}


def test_any_sop_class_when_allowed_is_none_and_only_restricts_instances(tmp_path: Path) -> None:
    data = body([instance(sop_uid(1), sop_class=SECONDARY_CAPTURE)])
    assert stage_multipart([data], BOUNDARY, tmp_path, STUDY, SERIES, allowed_sop_classes=None).instances == [
        sop_uid(1)
    ]
    # A verified instance that was not asked for is refused alone: recorded, not staged, the next part staged.
    other = tmp_path / "other"
    data = body([instance(sop_uid(1)), instance(sop_uid(2))])
    staged = stage_multipart([data], BOUNDARY, other, STUDY, SERIES, only={sop_uid(2)})
    assert staged.instances == [sop_uid(2)]
    assert [(r.index, r.instance, r.reason) for r in staged.refused] == [(0, uid_hash(sop_uid(1)), "not asked for")]
    assert staging.staged_instances(other, STUDY, SERIES) == {sop_uid(2)}


def test_parts_too_big_to_hold_are_written_as_they_arrive_and_small_ones_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts up to IN_MEMORY_PART_BYTES go to the writer threads whole, bigger ones are streamed to their file on
    the reading thread; either way every file is in place, byte for byte, when stage_multipart returns."""
    monkeypatch.setattr(multipart, "IN_MEMORY_PART_BYTES", 100_000)  # above the 64 KiB head read first
    handed: list[str] = []
    real_submit = staging.BackgroundWriter.submit

    def submit(self: staging.BackgroundWriter, path: Path, chunks: Any) -> None:
        handed.append(path.stem)
        real_submit(self, path, chunks)

    monkeypatch.setattr(staging.BackgroundWriter, "submit", submit)
    files = {sop_uid(n): instance(sop_uid(n), payload=bytes([n]) * (n * 40_000)) for n in range(1, 7)}
    writer = staging.BackgroundWriter(threads=2)
    staged = stage_multipart(chunked(body(list(files.values())), 4096), BOUNDARY, tmp_path, STUDY, SERIES,
                             writer=writer)  # fmt: skip
    assert staged.instances == list(files)
    assert staged.bytes == sum(len(data) for data in files.values())
    assert handed == [sop for sop, data in files.items() if len(data) <= 100_000]
    assert 0 < len(handed) < len(files)
    for sop, data in files.items():
        assert staging.instance_path(tmp_path, STUDY, SERIES, sop).read_bytes() == data
    writer.close()


def test_a_truncated_stream_leaves_no_partial_file(tmp_path: Path) -> None:
    files = [instance(sop_uid(n), payload=b"\x07" * 20000) for n in (1, 2)]
    data = body(files)
    with pytest.raises(MultipartError):
        stage_multipart(chunked(data[: data.index(b"\x07" * 100, len(files[0]) + 500)], 4096), BOUNDARY, tmp_path,
                        STUDY, SERIES)  # fmt: skip
    directory = staging.series_dir(tmp_path, STUDY, SERIES)
    assert sorted(p.name for p in directory.iterdir()) == [f"{sop_uid(1)}.dcm"]


# the client against an in-memory server -----------------------------------------------------------------------


class FakeDicomweb(BaseAdapter):
    """Answers QIDO-RS and WADO-RS for one series from memory; can cut the series answer short once."""

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__()
        self.files = files
        self.paths: list[str] = []
        self.truncate_next_series_after: int | None = None

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        path = (request.path_url or "").split("?")[0].removeprefix("/dicom-web")
        self.paths.append(path)
        assert request.headers["Accept-Encoding"] == "identity"
        series_path = f"/studies/{STUDY}/series/{SERIES}"
        if path == "/studies":
            return self._answer(request, 200, b"[]", "application/dicom+json")
        if path.endswith("/instances"):  # QIDO-RS; like Orthanc, an unknown series has no matches
            known = path == series_path + "/instances"
            matches = [{"00080018": {"vr": "UI", "Value": [sop]}} for sop in self.files if known]
            offset = int((request.url or "").split("offset=")[1].split("&")[0])
            return self._answer(request, 200, json.dumps(matches[offset:]).encode(), "application/dicom+json")
        if path == series_path:
            data = body(list(self.files.values()))
            if self.truncate_next_series_after is not None:
                data = data[: self.truncate_next_series_after]
                self.truncate_next_series_after = None
            return self._answer(request, 200, data, f"multipart/related; type=application/dicom; boundary={BOUNDARY}")
        sop = path.removeprefix(series_path + "/instances/")
        if sop in self.files:
            data = body([self.files[sop]])
            return self._answer(request, 200, data, f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
        return self._answer(request, 404, b'{"Message": "Accessing an inexistent item"}', "application/json")

    @staticmethod
    def _answer(request: requests.PreparedRequest, status: int, data: bytes, content_type: str) -> requests.Response:
        response = requests.Response()
        response.status_code = status
        response.reason = {200: "OK", 404: "Not Found"}[status]
        response.headers["Content-Type"] = content_type
        response.raw = io.BytesIO(data)
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        pass


@pytest.fixture
def fake() -> tuple[DicomwebClient, FakeDicomweb]:
    files = {sop_uid(n): instance(sop_uid(n), payload=b"\x05" * 3000) for n in range(1, 41)}
    adapter = FakeDicomweb(files)
    session = requests.Session()
    session.mount("http://", adapter)
    client = DicomwebClient("http://pacs/dicom-web/", session=session, backoff_s=0.0, single_fetch_limit=4)
    return client, adapter


def test_retrieve_series_then_only_the_missing_instances(tmp_path: Path, fake: tuple[DicomwebClient, Any]) -> None:
    client, adapter = fake
    assert client.supports_dicomweb()
    first = client.retrieve_series(STUDY, SERIES, tmp_path)
    assert first.complete and first.received == first.expected == 40 and first.attempts == 1
    assert first.bytes == sum(len(d) for d in adapter.files.values())
    for n in (3, 7):
        staging.instance_path(tmp_path, STUDY, SERIES, sop_uid(n)).unlink()
    adapter.paths.clear()
    second = client.retrieve_series(STUDY, SERIES, tmp_path)
    assert second.complete and second.attempts == 1
    fetched = [p.rsplit("/", 1)[1] for p in adapter.paths if "/instances/" in p]
    assert sorted(fetched) == sorted([sop_uid(3), sop_uid(7)])
    adapter.paths.clear()
    assert client.retrieve_series(STUDY, SERIES, tmp_path).attempts == 0
    assert all(p.endswith("/instances") for p in adapter.paths)  # QIDO only


def test_a_truncated_series_answer_is_retried_for_what_is_missing(
    tmp_path: Path, fake: tuple[DicomwebClient, Any]
) -> None:
    client, adapter = fake
    full = body(list(adapter.files.values()))
    adapter.truncate_next_series_after = full.index(adapter.files[sop_uid(39)]) + 100  # 38 parts arrive whole
    result = client.retrieve_series(STUDY, SERIES, tmp_path, expected=set(adapter.files))
    assert result.complete and result.attempts == 2
    fetched = [p.rsplit("/", 1)[1] for p in adapter.paths if "/instances/" in p]
    assert sorted(fetched) == sorted([sop_uid(39), sop_uid(40)])


def test_instances_the_pacs_lacks_stay_missing(tmp_path: Path, fake: tuple[DicomwebClient, Any]) -> None:
    client, _ = fake
    ghost = "1.2.826.0.1.3680043.8.498.1.2.99"
    expected = {sop_uid(1), ghost}
    staging.write_atomic(staging.instance_path(tmp_path, STUDY, SERIES, sop_uid(1)), [instance(sop_uid(1))])
    result = client.retrieve_series(STUDY, SERIES, tmp_path, expected=expected)
    assert not result.complete and result.missing == (ghost,) and result.attempts == client.max_attempts


def test_errors_are_dicomweb_errors_with_hashed_uids_and_status(
    tmp_path: Path, fake: tuple[DicomwebClient, Any]
) -> None:
    client, _ = fake
    unknown = "1.2.826.0.1.3680043.8.498.1.77"
    with pytest.raises(DicomwebError) as caught:
        client.retrieve_series(STUDY, unknown, tmp_path)
    error = caught.value
    assert isinstance(error, DicomError)
    assert error.status == 404 and not error.transient
    assert unknown not in str(error) and uid_hash(unknown) in str(error)
    assert "HTTP 404" in str(error) and "inexistent" in str(error)


def test_connection_errors_are_transient_dicomweb_errors(tmp_path: Path) -> None:
    client = DicomwebClient("http://127.0.0.1:9/dicom-web", timeout_s=2)
    assert not client.supports_dicomweb()
    with pytest.raises(DicomwebError, match="no HTTP answer") as caught:
        client.series_instances(STUDY, SERIES)
    assert caught.value.transient and caught.value.status is None
    client.close()


def test_redact_hashes_uids_but_not_versions() -> None:
    assert redact(f"series {SERIES} on Orthanc 1.10.1") == f"series {uid_hash(SERIES)} on Orthanc 1.10.1"


def test_dicomweb_errors_survive_pickling_and_bad_uids_are_refused_before_any_request(
    tmp_path: Path, fake: tuple[DicomwebClient, Any]
) -> None:
    error = pickle.loads(pickle.dumps(DicomwebError("/studies/abc", 503, "Service Unavailable", transient=True)))
    assert (error.path, error.status, error.reason, error.transient) == (
        "/studies/abc",
        503,
        "Service Unavailable",
        True,
    )
    assert str(error) == "DICOMweb /studies/abc: HTTP 503: Service Unavailable"
    client, adapter = fake
    for call in (
        lambda: client.series_instances(STUDY, "1.2/../3"),
        lambda: client.retrieve_series("x", SERIES, tmp_path),
        lambda: client.retrieve_instances(STUDY, SERIES, ["1.2.3?a=b"], tmp_path),
    ):
        with pytest.raises(DicomwebError, match="not a valid DICOM UID"):
            call()
    assert adapter.paths == []


def test_many_missing_instances_are_fetched_as_the_whole_series(
    tmp_path: Path, fake: tuple[DicomwebClient, Any]
) -> None:
    client, adapter = fake
    client.retrieve_series(STUDY, SERIES, tmp_path)
    for n in range(1, 8):  # 7 of 40 missing: more than an eighth of the series (5)
        staging.instance_path(tmp_path, STUDY, SERIES, sop_uid(n)).unlink()
    adapter.paths.clear()
    assert client.retrieve_series(STUDY, SERIES, tmp_path).complete
    assert [p for p in adapter.paths if not p.endswith("/instances")] == [f"/studies/{STUDY}/series/{SERIES}"]
