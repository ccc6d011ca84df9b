"""The three sandbox servers answer riskbridge and an independent peer (dcmtk) the way the pipeline needs."""

from __future__ import annotations

import subprocess
import uuid
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from riskbridge.cli import app
from riskbridge.connectors import db, dicom, fhir
from riskbridge.settings import Settings

pytestmark = pytest.mark.integration

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


def _ct_instance(study_uid: str, accession: str) -> bytes:
    """One small, valid CT Image Storage instance (enough for Q/R plumbing tests)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "RBTEST1", "TEST^ECHO", "19600101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "101500", accession, "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.zeros((8, 8), dtype=np.int16).tobytes()
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stored_study(sandbox: Settings) -> str:
    """A study stored in the sandbox Orthanc; returns its StudyInstanceUID."""
    study_uid = generate_uid()
    url = f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}/instances"
    response = requests.post(url, data=_ct_instance(study_uid, "RBACC0001"), timeout=30)
    assert response.status_code == 200, response.text
    return study_uid


def test_c_echo_from_riskbridge(sandbox: Settings) -> None:
    assert dicom.echo(sandbox.pacs) < 5.0


def test_unknown_calling_ae_is_refused(sandbox: Settings) -> None:
    stranger = sandbox.pacs.model_copy(update={"calling_ae": "STRANGER"})
    with pytest.raises(dicom.DicomError, match=r"STRANGER -> ORTHANC@127\.0\.0\.1"):
        dicom.echo(stranger)


def test_c_find_from_riskbridge(sandbox: Settings, stored_study: str) -> None:
    query = Dataset()
    query.StudyInstanceUID = stored_study
    query.AccessionNumber = ""
    query.ModalitiesInStudy = ""
    matches = list(dicom.find(sandbox.pacs, "STUDY", query))
    assert len(matches) == 1
    assert matches[0].AccessionNumber == "RBACC0001"
    assert "CT" in matches[0].ModalitiesInStudy


def test_c_find_from_dcmtk_findscu(sandbox: Settings, stored_study: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            "findscu", "-S", "-aet", "DCMTK", "-aec", sandbox.pacs.called_ae,
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={stored_study}", "-k", "AccessionNumber",
            "-X", "-od", str(tmp_path), "127.0.0.1", str(sandbox.pacs.port),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    responses = [pydicom.dcmread(path) for path in sorted(tmp_path.glob("rsp*.dcm"))]
    assert [response.AccessionNumber for response in responses] == ["RBACC0001"]


def test_hapi_accepts_a_transaction_bundle(sandbox: Settings) -> None:
    marker = uuid.uuid4().hex
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_url,
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": "urn:riskbridge:test", "value": marker}],
                },
                "request": {
                    "method": "POST",
                    "url": "Patient",
                    "ifNoneExist": f"identifier=urn:riskbridge:test|{marker}",
                },
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "2951-2"}]},
                    "subject": {"reference": patient_url},
                    "valueQuantity": {
                        "value": 140,
                        "unit": "mmol/L",
                        "system": "http://unitsofmeasure.org",
                        "code": "mmol/L",
                    },
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }  # fmt: skip
    response = requests.post(sandbox.fhir.base_url, json=bundle, headers=FHIR_JSON, timeout=60)
    assert response.status_code == 200, fhir.diagnostics(response)
    statuses = [entry["response"]["status"] for entry in response.json()["entry"]]
    assert [status.split()[0] for status in statuses] == ["201", "201"]
    observation_ref = response.json()["entry"][1]["response"]["location"].split("/_history")[0]
    observation = requests.get(f"{sandbox.fhir.base_url}/{observation_ref}", headers=FHIR_JSON, timeout=30).json()
    assert observation["subject"]["reference"].startswith("Patient/")


def test_repeated_conditional_create_returns_200_without_duplicate(sandbox: Settings) -> None:
    marker = uuid.uuid4().hex
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:riskbridge:test", "value": marker}]}
    headers = {**FHIR_JSON, "If-None-Exist": f"identifier=urn:riskbridge:test|{marker}"}
    url = f"{sandbox.fhir.base_url}/Patient"
    first = requests.post(url, json=patient, headers=headers, timeout=30)
    second = requests.post(url, json=patient, headers=headers, timeout=30)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    search = requests.get(
        url,
        params={"identifier": f"urn:riskbridge:test|{marker}", "_summary": "count"},
        headers={**FHIR_JSON, "Cache-Control": "no-cache"},
        timeout=30,
    )
    assert search.json()["total"] == 1


def test_postgres_accepts_a_psycopg2_connection(sandbox: Settings) -> None:
    connection = db.connect(sandbox.database)
    try:
        with connection.cursor() as cursor:
            cursor.execute("CREATE TEMP TABLE probe (id serial PRIMARY KEY, note text)")
            cursor.execute("INSERT INTO probe (note) VALUES (%s) RETURNING id", ("ledger",))
            row = cursor.fetchone()
            assert row is not None and row[0] == 1
            cursor.execute("SELECT current_database(), inet_server_addr()::text")
            assert cursor.fetchone() == ("riskbridge", "127.0.0.1/32")
    finally:
        connection.close()


def test_doctor_shows_all_ok(sandbox: Settings) -> None:
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.count("OK") == 3
    assert "HAPI FHIR" in result.output and "FHIR 4.0.1" in result.output
    assert "PostgreSQL 15" in result.output
