"""``riskbridge survey`` against the sandbox: what the synthetic hospital's feeds send, and what no feature reads.

A cohort is loaded; one of its patients also gets three Observations a real feed sends: a whole-blood glucose
(LOINC 2339-0, a variant of the spec's serum glucose the units table knows), a point-of-care potassium under a
local code the units table does not know, and a creatinine in a unit nobody can convert. The survey over that
patient's scan day finds the day's CT studies (discover, match: nothing retrieved, nothing written), reads the
matched patients' laboratory Observations and notes from HAPI FHIR and names each of the three; its output carries
no PHI of the cohort.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
from synthetic_site import cohort_anchor, phi_strings, synthetic_site_settings
from typer.testing import CliRunner

from riskbridge import cli
from riskbridge.dev.synth import generate, load, read_truth
from riskbridge.dev.synth.cohort import SITE_TIMEZONE
from riskbridge.ledger import Ledger
from riskbridge.settings import DatabaseSettings, RunSettings, Settings

pytestmark = pytest.mark.integration

LABORATORY = [
    {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}
]


def _observation(patient: str, when: datetime, coding: dict[str, str], value: float, unit: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": LABORATORY,
        "code": {"coding": [coding]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when.isoformat(),
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }


def test_the_survey_names_what_it_cannot_map_and_retrieves_nothing(
    sandbox: Settings,
    tmp_path: Path,
    scratch_database: Callable[[str], tuple[DatabaseSettings, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cohort = tmp_path / "cohort"
    generate(cohort, patients=12, seed=9393, anchor=cohort_anchor("test_survey_sandbox"))
    load(cohort, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", sandbox.fhir.base_url)
    truth = read_truth(cohort)
    target = next(r for r in truth if r["quarantine"] is None and r["identity"]["fhir_patient_id"])
    patient = target["identity"]["fhir_patient_id"]
    scan = datetime.fromisoformat(target["index_study"]["study_time"])
    before = scan - timedelta(hours=3)
    extra = [
        _observation(patient, before, {"system": "http://loinc.org", "code": "2339-0"}, 112.0, "mg/dL"),
        _observation(
            patient, before, {"system": "urn:oid:1.2.3.4.5", "code": "K-POC", "display": "K POC"}, 4.1, "mmol/L"
        ),
        _observation(patient, before, {"system": "http://loinc.org", "code": "2160-0"}, 1.1, "furlongs"),
    ]
    for resource in extra:
        answer = requests.post(f"{sandbox.fhir.base_url}/Observation", json=resource, timeout=30)
        assert answer.status_code == 201, answer.text

    database = scratch_database("rb_survey")[0]
    with Ledger.connect(database) as ledger:
        ledger.upgrade()
    settings = synthetic_site_settings(sandbox, database, tmp_path, RunSettings(report_dir=tmp_path / "reports"))
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    day = scan.astimezone(ZoneInfo(SITE_TIMEZONE)).date().isoformat()
    window = f"{day}..{day}"

    result = CliRunner().invoke(cli.app, ["survey", "--window", window, "--format", "json"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["matched_patients"] >= 1 and found["patients"] == found["matched_patients"]
    unmapped = {code["code"]: code for code in found["unmapped"]}
    assert unmapped["2339-0"]["kind"] == "variant" and "glucose" in unmapped["2339-0"]["features"]
    assert unmapped["2339-0"]["convertible"] >= 1
    assert unmapped["K-POC"]["kind"] == "unknown"
    creatinine = next(f for f in found["features"] if f["feature"] == "creatinine")
    assert sum(creatinine["rejected"].values()) >= 1, creatinine
    assert "furlongs" in creatinine["units"]
    converted = sum(f["converted"] for f in found["features"])
    assert converted >= 3, "the synthetic hospital's own labs convert"
    assert found["notes"]["total"] >= 1

    text = CliRunner().invoke(cli.app, ["survey", "--window", window], env={"COLUMNS": "200"})
    assert text.exit_code == 0, text.output
    assert "unknown to the units table: urn:oid:1.2.3.4.5|K-POC" in text.output, text.output
    assert "variant of glucose" in text.output
    for record in truth:
        for value in phi_strings(record):
            assert value not in text.output and value not in result.output, f"PHI of {record['patient_key']}"

    with Ledger.connect(database) as ledger, ledger.transaction() as cursor:
        cursor.execute("SELECT kind, status FROM runs")
        assert [tuple(r.values()) for r in cursor.fetchall()] == [("survey", "success")], "the same run resumed"
        cursor.execute("SELECT count(*) AS n FROM retrievals")
        assert cursor.fetchone()["n"] == 0, "a survey retrieves nothing"
