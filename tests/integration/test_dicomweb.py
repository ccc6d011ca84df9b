"""DICOMweb retrieval against the sandbox's Orthanc (DICOMweb plugin): QIDO-RS lists, WADO-RS streams into staging.

Orthanc stores the bytes it was sent and WADO-RS with ``transfer-syntax=*`` returns them unchanged, so every staged
file must be byte-identical to the file the synthetic cohort generated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from riskbridge.connectors import staging
from riskbridge.connectors.dicomweb import DicomwebClient, DicomwebError
from riskbridge.dev.synth import generate, load
from riskbridge.records import uid_hash
from riskbridge.settings import Settings

pytestmark = pytest.mark.integration

DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"


@pytest.fixture(scope="module")
def cohort(sandbox: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dicomweb") / "cohort"
    generate(out, patients=3, seed=307)
    load(out, orthanc_url=f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", fhir_base_url=sandbox.fhir.base_url)
    return out


@pytest.fixture
def client(sandbox: Settings) -> Iterator[DicomwebClient]:
    with DicomwebClient.from_settings(sandbox.pacs) as dicomweb:
        yield dicomweb


def _largest_series(cohort: Path) -> Path:
    return max((cohort / "dicom").glob("*/*"), key=lambda directory: len(list(directory.glob("*.dcm"))))


def test_the_probe_says_dicomweb_is_supported(client: DicomwebClient) -> None:
    assert client.supports_dicomweb()


def test_a_series_arrives_byte_identical_and_only_missing_instances_are_fetched_again(
    client: DicomwebClient, cohort: Path, tmp_path: Path
) -> None:
    source = _largest_series(cohort)
    study_uid, series_uid = source.parent.name, source.name
    listed = client.series_instances(study_uid, series_uid)
    generated = {path.stem for path in source.glob("*.dcm")}
    assert listed == generated

    result = client.retrieve_series(study_uid, series_uid, tmp_path)
    assert result.complete and result.transport == "dicomweb" and result.attempts == 1
    assert result.expected == result.received == len(listed)
    assert staging.staged_instances(tmp_path, study_uid, series_uid) == listed
    for path in source.glob("*.dcm"):
        assert staging.instance_path(tmp_path, study_uid, series_uid, path.stem).read_bytes() == path.read_bytes()
    assert result.bytes == sum(path.stat().st_size for path in source.glob("*.dcm"))

    victim = sorted(listed)[len(listed) // 2]
    staging.instance_path(tmp_path, study_uid, series_uid, victim).unlink()
    before = (client.counters.requests, client.counters.instances)
    again = client.retrieve_series(study_uid, series_uid, tmp_path, expected=listed)
    assert again.complete and again.attempts == 1
    assert (client.counters.requests - before[0], client.counters.instances - before[1]) == (1, 1)
    assert again.bytes == (source / f"{victim}.dcm").stat().st_size
    assert staging.instance_path(tmp_path, study_uid, series_uid, victim).read_bytes() == (
        (source / f"{victim}.dcm").read_bytes()
    )

    before = (client.counters.requests, client.counters.instances)
    complete = client.retrieve_series(study_uid, series_uid, tmp_path, expected=listed)
    assert complete.complete and complete.attempts == 0 and complete.bytes == 0
    assert (client.counters.requests, client.counters.instances) == before


def test_a_list_of_instances_is_retrieved_one_request_each(
    client: DicomwebClient, cohort: Path, tmp_path: Path
) -> None:
    source = _largest_series(cohort)
    study_uid, series_uid = source.parent.name, source.name
    wanted = sorted(path.stem for path in source.glob("*.dcm"))[:3]
    requests_before = client.counters.requests
    staged = client.retrieve_instances(study_uid, series_uid, wanted, tmp_path)
    assert sorted(staged.instances) == wanted and staged.verified == 3
    assert client.counters.requests - requests_before == 3
    assert staging.staged_instances(tmp_path, study_uid, series_uid) == set(wanted)


def test_an_unknown_series_is_a_dicomweb_error_with_the_status(
    client: DicomwebClient, cohort: Path, tmp_path: Path
) -> None:
    study_uid = _largest_series(cohort).parent.name
    unknown = "1.2.826.0.1.3680043.8.498.999999"
    assert client.series_instances(study_uid, unknown) == set()  # Orthanc: 200 with an empty array
    with pytest.raises(DicomwebError) as caught:
        client.retrieve_series(study_uid, unknown, tmp_path)
    assert caught.value.status == 404 and not caught.value.transient
    assert uid_hash(unknown) in str(caught.value) and unknown not in str(caught.value)
    assert not staging.series_dir(tmp_path, study_uid, unknown).exists()


def test_a_series_of_a_sop_class_not_allowed_is_refused(client: DicomwebClient, cohort: Path, tmp_path: Path) -> None:
    dose = next(
        path.parent
        for path in (cohort / "dicom").glob("*/*/*.dcm")
        if pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID == DOSE_SR
    )
    with pytest.raises(DicomwebError, match=r"SOP class \S+ is not allowed") as caught:
        client.retrieve_series(dose.parent.name, dose.name, tmp_path)
    assert caught.value.status == 200 and not caught.value.transient
    assert staging.staged_instances(tmp_path, dose.parent.name, dose.name) == set()

    permissive = DicomwebClient(client.base_url, allowed_sop_classes=None)
    result = permissive.retrieve_series(dose.parent.name, dose.name, tmp_path)
    permissive.close()
    assert result.complete and result.received == 1
