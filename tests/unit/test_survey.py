"""The feed survey (riskbridge.survey): hand-made FHIR Observations and notes classified as the clinical stage would
classify them (converted, a known variant the spec does not read, an unknown code, an unknown unit, outside the
window, entered in error, notes outside the lookback), renderings without patient ids, and the batched fetch."""

from __future__ import annotations

import base64
import dataclasses
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from fhir_responses import ScriptedSession, make_response

from riskbridge.connectors.fhir import FhirClient
from riskbridge.harmonize.features import FeatureSpec, load_default_feature_spec
from riskbridge.settings import FhirAuth, FhirSettings
from riskbridge.survey import Survey, fetch_survey_resources, survey_resources

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
ZONE = "America/New_York"
INDEX = datetime(2024, 3, 5, 12, 0, tzinfo=UTC)
PATIENT_A = "pt-7f3a9c1e"
PATIENT_B = "pt-b20d44e8"


def at(hours: float) -> str:
    """A FHIR dateTime ``hours`` after the index time (negative: before it)."""
    return (INDEX + timedelta(hours=hours)).isoformat()


def lab(
    ident: str,
    code: str,
    value: float,
    unit: str,
    hours: float = -2,
    *,
    system: str = LOINC,
    status: str = "final",
    display: str = "",
    patient: str = PATIENT_A,
) -> dict[str, Any]:
    """A laboratory Observation with a valueQuantity (UCUM code = unit text) taken ``hours`` from the index time."""
    coding = {"system": system, "code": code, **({"display": display} if display else {})}
    return {
        "resourceType": "Observation",
        "id": ident,
        "status": status,
        "category": [{"coding": [{"code": "laboratory"}]}],
        "code": {"coding": [coding]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": at(hours),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }


def document(
    ident: str, days: float | None, *, status: str = "current", attachment: Any = None, patient: str = PATIENT_A
) -> dict[str, Any]:
    """A DocumentReference dated ``days`` before the index time with one attachment (inline text by default)."""
    if attachment is None:
        attachment = {"contentType": "text/plain", "data": base64.b64encode(b"History of COPD.").decode()}
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": ident,
        "status": status,
        "subject": {"reference": f"Patient/{patient}"},
        "content": [{"attachment": attachment}],
    }
    if days is not None:
        resource["date"] = (INDEX - timedelta(days=days)).isoformat()
    return resource


OBSERVATIONS: dict[str, list[dict[str, Any]]] = {
    PATIENT_A: [
        lab("o1", "2345-7", 100, "mg/dL"),  # glucose, the spec's code: converted and used
        lab("o2", "2339-0", 5.5, "mmol/L", display="Glucose [Mass/volume] in Blood"),  # blood glucose: a variant
        lab("o3", "K-123", 4, "U/L", system="http://lis.example.org/codes", display="Local enzyme"),  # unknown
        lab("o4", "2951-2", 140, "mmol/Ltr"),  # sodium in a spelling the table does not read
        lab("o5", "2160-0", 1.0, "mg/dL", hours=-5 * 24),  # creatinine five days before: outside the 48 h
        lab("o6", "6690-2", 7.0, "K/uL", status="entered-in-error"),  # WBC withdrawn
        lab("o7", "2823-3", 4.1, "mmol/L"),  # potassium: in the units table, no spec feature
        lab("o8", "2524-7", 1.1, "mmol/L", hours=1),  # lactate after the scan
    ],
    PATIENT_B: [
        lab("o9", "2339-0", 110, "mg/dL", patient=PATIENT_B),
        lab("o10", "1988-5", 3.0, "mg/L", patient=PATIENT_B),
    ],
}
NOTES: dict[str, list[dict[str, Any]]] = {
    PATIENT_A: [
        document("d1", 10),  # in the year before: used
        document("d2", 400),  # outside the 365-day lookback
        document("d3", 5, status="entered-in-error"),
        document("d4", None),  # no date
    ],
    PATIENT_B: [
        document("d5", 30, attachment={"contentType": "text/plain", "url": "Binary/b5"}, patient=PATIENT_B),  # unread
        document(
            "d6",
            30,
            attachment={"contentType": "application/pdf", "data": base64.b64encode(b"%PDF").decode()},
            patient=PATIENT_B,
        ),
    ],
}


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_default_feature_spec()


@pytest.fixture(scope="module")
def survey(spec: FeatureSpec) -> Survey:
    return survey_resources(spec, {PATIENT_A: INDEX, PATIENT_B: INDEX}, OBSERVATIONS, NOTES, ZONE)


def test_a_spec_code_in_the_window_is_converted_and_used(survey: Survey) -> None:
    glucose = survey.feature("glucose")
    assert (glucose.observations, glucose.converted, glucose.converted_share) == (1, 1, 1.0)
    assert glucose.codes == {"2345-7": 1} and glucose.units == {"mg/dL": 1}
    assert glucose.window == {"used": 1}
    assert glucose.patients_with_value == 1
    assert survey.feature("crp").patients_with_value == 1


def test_a_blood_glucose_code_the_spec_does_not_read_is_a_known_variant(survey: Survey) -> None:
    variant = next(code for code in survey.unmapped if code.code == "2339-0")
    assert (variant.kind, variant.analyte, variant.features) == ("variant", "glucose", ("glucose",))
    assert variant.count == 2 and variant.units == {"mmol/L": 1, "mg/dL": 1}
    assert variant.convertible == 2  # 5.5 mmol/L and 110 mg/dL both reach mg/dL
    assert variant.display == "Glucose [Mass/volume] in Blood"
    assert survey.variant_count == 2


def test_a_site_spec_that_lists_the_variant_reads_it(spec: FeatureSpec) -> None:
    labs = tuple(
        dataclasses.replace(lab, loinc=(*lab.loinc, "2339-0")) if lab.name == "glucose" else lab for lab in spec.labs
    )
    site = dataclasses.replace(spec, labs=labs)
    survey = survey_resources(site, {PATIENT_A: INDEX, PATIENT_B: INDEX}, OBSERVATIONS, NOTES, ZONE)
    glucose = survey.feature("glucose")
    assert glucose.codes == {"2345-7": 1, "2339-0": 2}
    assert glucose.converted == 3 and glucose.patients_with_value == 2
    assert glucose.window == {"used": 2, "superseded": 1}
    assert all(code.code != "2339-0" for code in survey.unmapped)


def test_unknown_codes_and_other_analytes_are_unmapped(survey: Survey) -> None:
    kinds = {code.key: (code.kind, code.analyte, code.count) for code in survey.unmapped}
    assert kinds["http://lis.example.org/codes|K-123"] == ("unknown", None, 1)
    assert kinds["http://loinc.org|2823-3"] == ("table_only", "potassium", 1)
    assert survey.unmapped_count == 4
    assert [code.kind for code in survey.unmapped] == ["variant", "table_only", "unknown"]


def test_an_unknown_unit_is_rejected_with_the_units_modules_reason(survey: Survey) -> None:
    sodium = survey.feature("sodium")
    assert sodium.rejected == {"unit_unknown": 1} and sodium.converted == 0
    assert sodium.units == {"mmol/Ltr": 1}
    assert sodium.window == {"value_unusable": 1}
    assert sodium.patients_with_value == 0


def test_window_exclusions(survey: Survey) -> None:
    creatinine = survey.feature("creatinine")
    assert creatinine.converted == 1  # its unit is fine; its time is not
    assert creatinine.outside_window == 1 and creatinine.window == {"before_window": 1}
    assert survey.feature("lactate").window == {"after_window": 1}
    wbc = survey.feature("wbc")
    assert wbc.other_window == {"entered_in_error": 1} and wbc.outside_window == 0


def test_notes_by_disposition(survey: Survey) -> None:
    notes = survey.notes
    assert notes.total == 6 and notes.lookback_days == 365
    assert notes.dispositions == {"used": 2, "outside_lookback": 1, "status": 1, "no_time": 1, "no_text": 1}
    assert notes.patients_with_notes == 2


def test_a_binary_reader_decides_text_behind_a_url(spec: FeatureSpec) -> None:
    reads: list[str] = []

    def read_binary(url: str) -> tuple[bytes, str | None]:
        reads.append(url)
        return b"%PDF-1.7", "application/pdf"

    notes = {PATIENT_B: [document("d5", 30, attachment={"url": "Binary/b5"})]}
    survey = survey_resources(spec, {PATIENT_B: INDEX}, {}, notes, ZONE, read_binary=read_binary)
    assert survey.notes.dispositions == {"no_text": 1} and reads == ["Binary/b5"]


def test_lines_and_dict_hold_no_patient_id(survey: Survey) -> None:
    lines = survey.lines()
    text = "\n".join(lines)
    payload = json.dumps(survey.to_dict())
    for secret in (PATIENT_A, PATIENT_B, "o1", "d1"):
        assert secret not in text.split() and f'"{secret}"' not in payload
    assert PATIENT_A not in text and PATIENT_B not in text
    assert PATIENT_A not in payload and PATIENT_B not in payload
    names = [lab.name for lab in load_default_feature_spec().labs]
    assert [line.split(" ", 1)[0] for line in lines[1 : 1 + len(names)]] == names  # one line per feature
    assert any("variant of glucose" in line and "2339-0" in line for line in lines)
    assert any("unknown to the units table" in line and "K-123" in line for line in lines)
    assert lines[-1].startswith("notes")
    assert "unit_unknown x1" in lines[1 + names.index("sodium")]
    data = survey.to_dict()
    assert data["unmapped_count"] == 4 and data["features"][names.index("glucose")]["converted_share"] == 1.0


def test_a_naive_index_time_is_refused(spec: FeatureSpec) -> None:
    with pytest.raises(ValueError, match="offset"):
        survey_resources(spec, {PATIENT_A: datetime(2024, 3, 5, 12)}, OBSERVATIONS, NOTES, ZONE)


# --- fetching -------------------------------------------------------------------------------------------------------


def test_fetch_reads_every_laboratory_observation_and_the_notes_in_batched_searches() -> None:
    base = "http://fhir.test/fhir"
    served = {
        "Observation": [*OBSERVATIONS[PATIENT_A], *OBSERVATIONS[PATIENT_B]],
        "DocumentReference": [*NOTES[PATIENT_A], *NOTES[PATIENT_B]],
        "DiagnosticReport": [
            {"resourceType": "DiagnosticReport", "id": "r1", "subject": {"reference": f"Patient/{PATIENT_B}"}}
        ],
    }

    def handler(method: str, url: str, headers: dict[str, str], data: Any) -> Any:
        resource_type = urlsplit(url).path.rsplit("/", 1)[-1]
        entries = [{"resource": r, "search": {"mode": "match"}} for r in served[resource_type]]
        return make_response(200, {"resourceType": "Bundle", "type": "searchset", "entry": entries})

    session = ScriptedSession(handler)
    client = FhirClient(
        FhirSettings(base_url=base, auth=FhirAuth()), sleep=lambda _: None, rng=random.Random(1), session=session
    )
    since = INDEX - timedelta(days=400)
    observations, notes = fetch_survey_resources(client, [PATIENT_A, PATIENT_B, PATIENT_A], since)
    assert [o["id"] for o in observations[PATIENT_A]] == [o["id"] for o in OBSERVATIONS[PATIENT_A]]
    assert len(observations[PATIENT_B]) == 2
    assert [n["id"] for n in notes[PATIENT_B]] == ["d5", "d6", "r1"]
    assert len(session.calls) == 3  # one search per resource type for both patients
    queries = {urlsplit(url).path.rsplit("/", 1)[-1]: parse_qsl(urlsplit(url).query) for _, url, _, _ in session.calls}
    observation_query = dict(queries["Observation"])
    assert observation_query["category"] == "laboratory" and "code" not in observation_query
    assert observation_query["subject"] == f"Patient/{PATIENT_A},Patient/{PATIENT_B}"
    for query in queries.values():
        assert ("date", f"ge{since.isoformat()}") in query
    assert fetch_survey_resources(client, [], None) == ({}, {})


def test_the_sample_of_a_cohort_is_deterministic_and_not_in_id_order() -> None:
    from riskbridge.survey import sample_patients

    patients = [f"patient-{i:03d}" for i in range(50)]
    chosen = sample_patients(patients, 10)
    assert len(chosen) == 10 and set(chosen) <= set(patients)
    assert sample_patients(list(reversed(patients)), 10) == chosen, "the same cohort, the same sample"
    assert chosen != patients[:10], "a hash order, not the ids' order"
    assert sample_patients(patients, 500) == sample_patients(patients, 50) and len(sample_patients(patients, 500)) == 50
