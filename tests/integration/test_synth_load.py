"""Loading the synthetic cohort into the sandbox's Orthanc and HAPI FHIR: idempotent, and errors name the cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from riskbridge.dev.synth import LoadError, LoadReport, generate, load, read_manifest, read_truth
from riskbridge.dev.synth.load import load_dicom, load_fhir
from riskbridge.settings import Settings

pytestmark = pytest.mark.integration

FHIR_TYPES = ("Patient", "Observation", "DocumentReference", "DiagnosticReport")
NO_CACHE = {"Cache-Control": "no-cache", "Accept": "application/fhir+json"}


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth-load") / "cohort"
    generate(out, patients=8, seed=101)
    return out


def _orthanc_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.sandbox.orthanc_http_port}"


def _server_counts(settings: Settings) -> dict[str, int]:
    stats = requests.get(f"{_orthanc_url(settings)}/statistics", timeout=30).json()
    counts = {key: int(stats[key]) for key in ("CountPatients", "CountStudies", "CountSeries", "CountInstances")}
    for kind in FHIR_TYPES:
        response = requests.get(f"{settings.fhir.base_url}/{kind}?_summary=count", headers=NO_CACHE, timeout=30)
        response.raise_for_status()
        counts[kind] = int(response.json()["total"])
    return counts


def test_loading_twice_leaves_the_same_counts_and_reports_everything_existing(
    sandbox: Settings, small_cohort: Path
) -> None:
    manifest = read_manifest(small_cohort)
    orthanc, fhir = _orthanc_url(sandbox), sandbox.fhir.base_url
    first = load(small_cohort, orthanc, fhir)
    after_first = _server_counts(sandbox)
    second = load(small_cohort, orthanc, fhir)
    after_second = _server_counts(sandbox)

    assert after_second == after_first
    expected_resources = manifest["counts"]["fhir_resources"]
    for report in (first, second):
        assert report.instances_sent == manifest["counts"]["instances"]
        assert report.instances_new + report.instances_already_stored == report.instances_sent
        assert report.fhir_bundles == manifest["counts"]["fhir_bundles"]
        merged = {k: report.fhir_created.get(k, 0) + report.fhir_existing.get(k, 0) for k in expected_resources}
        assert merged == expected_resources
    assert second.all_existing
    assert second.instances_already_stored == manifest["counts"]["instances"]
    assert second.fhir_existing == expected_resources and not second.fhir_created
    assert after_second["CountInstances"] >= manifest["counts"]["instances"]
    assert after_second["CountStudies"] >= manifest["counts"]["studies"]


def test_truth_ids_resolve_on_the_servers(sandbox: Settings, small_cohort: Path) -> None:
    load(small_cohort, _orthanc_url(sandbox), sandbox.fhir.base_url)
    for record in read_truth(small_cohort):
        found = requests.post(
            f"{_orthanc_url(sandbox)}/tools/lookup", data=record["index_study"]["study_uid"], timeout=30
        ).json()
        assert [item["Type"] for item in found] == ["Study"]
        patient_id = record["identity"]["fhir_patient_id"]
        if patient_id is None:
            continue
        patient = requests.get(f"{sandbox.fhir.base_url}/Patient/{patient_id}", headers=NO_CACHE, timeout=30).json()
        assert [i["value"] for i in patient["identifier"] if i["system"] == "http://hospital.example/mrn"] == [
            record["mrn"]
        ]
        assert patient["meta"]["versionId"] == "1"  # reloads did not create new versions


def test_server_refusals_name_the_file_and_the_reason(sandbox: Settings, tmp_path: Path) -> None:
    bad = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Observation",
                    "id": "rb-missing-patient-obs",
                    "status": "final",
                    "code": {"text": "x"},
                    "subject": {"reference": "Patient/rb-no-such-patient"},
                },
                "request": {"method": "PUT", "url": "Observation/rb-missing-patient-obs"},
            }
        ],
    }
    (tmp_path / "fhir").mkdir()
    (tmp_path / "fhir" / "p09999.json").write_text(json.dumps(bad))
    with pytest.raises(LoadError, match=r"p09999.*HTTP 400.*HAPI-\d+"):
        load_fhir(tmp_path, sandbox.fhir.base_url, LoadReport(cohort_id="bad"))

    series = tmp_path / "dicom" / "1.2.3" / "1.2.3.4"
    series.mkdir(parents=True)
    (series / "1.2.3.4.5.dcm").write_bytes(b"not a DICOM file")
    with pytest.raises(
        LoadError, match=r"Orthanc refused 1\.2\.3\.4\.5\.dcm \(series 1\.2\.3\.4 of study 1\.2\.3\): HTTP 400"
    ):
        load_dicom(tmp_path, _orthanc_url(sandbox), LoadReport(cohort_id="bad"))
