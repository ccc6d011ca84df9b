"""FHIR R4 side of the synthetic cohort: one transaction Bundle per patient, built with fhir.resources.R4B models.

Every resource has a client-assigned, non-numeric id (``rb-<cohort id>-<patient key>[-...]``) and is sent as
``PUT <type>/<id>`` (update-as-create). That makes loading idempotent without searches: the first load answers
201 per entry, a reload of unchanged content 200 with no new version, and the ids are known at generation time,
so the ground truth can name the exact FHIR Patient a PACS patient must link to. Conditional create
(``ifNoneExist``) would also be idempotent but leaves ids to the server, and the truth could then only name the
Patient by a search. References are relative (``Patient/<id>``); the Patient is the first entry of its bundle.
Every resource also carries the identifier ``urn:riskbridge:synth|<id>`` so a cohort's resources can be found.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient

from riskbridge.dev.synth.cohort import (
    LABS,
    MRN_SYSTEM,
    SYNTH_ID_SYSTEM,
    FhirPatient,
    LabObservation,
    NoteDocument,
    PatientSpec,
    make_uuid,
)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
US_CORE_DOC_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
# The outcome the reference model predicts (its RiskAssessment's prediction), coded as a problem-list diagnosis.
OUTCOME_CODINGS = (
    {"system": "http://snomed.info/sct", "code": "363358000", "display": "Malignant tumor of lung"},
    {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "C34.90",
     "display": "Malignant neoplasm of unspecified part of unspecified bronchus or lung"},
)  # fmt: skip
REFERENCE_RANGE_CRP = {"high": {"value": 5, "unit": "mg/L", "system": UCUM, "code": "mg/L"}}


def _fhir_time(moment: datetime, utc: bool) -> str:
    """dateTime/instant text: local offset, or the same instant in UTC with 'Z'."""
    if utc:
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return moment.isoformat(timespec="seconds")


def _synth_identifier(resource_id: str) -> dict[str, str]:
    return {"system": SYNTH_ID_SYSTEM, "value": resource_id}


def patient_resource(patient: FhirPatient) -> Patient:
    """A Patient with the MRN identifier (type MR), a title-case name, gender and birth date."""
    return Patient.model_validate(
        {
            "resourceType": "Patient",
            "id": patient.id,
            "identifier": [
                {
                    "use": "usual",
                    "type": {"coding": [{"system": V2_0203, "code": "MR", "display": "Medical record number"}]},
                    "system": MRN_SYSTEM,
                    "value": patient.mrn,
                },
                _synth_identifier(patient.id),
            ],
            "active": True,
            "name": [
                {"use": "official", "family": f"Synth-{patient.family.title()}", "given": [patient.given.title()]}
            ],
            "gender": "male" if patient.sex == "M" else "female",
            "birthDate": patient.birth_date.isoformat(),
        }
    )


def observation_resource(obs: LabObservation, patient_id: str) -> Observation:
    """A laboratory Observation as a feed would send it (unit spelling, status, value form as generated)."""
    spec = LABS[obs.feature]
    body: dict[str, Any] = {
        "resourceType": "Observation",
        "id": obs.id,
        "identifier": [_synth_identifier(obs.id)],
        "status": obs.status,
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "laboratory", "display": "Laboratory"}]}],
        "code": {
            "coding": [{"system": LOINC, "code": obs.loinc, "display": obs.display}],
            "text": spec.feature.upper(),
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": _fhir_time(obs.effective, obs.utc),
        "issued": _fhir_time(obs.issued, obs.utc),
    }
    if obs.value_string is not None:
        body["valueString"] = obs.value_string
        if obs.feature == "crp":
            body["referenceRange"] = [REFERENCE_RANGE_CRP]
    else:
        quantity: dict[str, Any] = {"value": obs.value}
        if obs.comparator is not None:
            quantity["comparator"] = obs.comparator
        if obs.unit is not None:
            quantity["unit"] = obs.unit
        if obs.ucum_code is not None:
            quantity["system"] = UCUM
            quantity["code"] = obs.ucum_code
        body["valueQuantity"] = quantity
    if obs.note is not None:
        body["note"] = [{"text": obs.note}]
    return Observation.model_validate(body)


def _attachment(note: NoteDocument) -> dict[str, Any]:
    data = note.text.encode(note.charset)
    return {
        "contentType": note.content_type,
        "language": "en-US",
        "data": base64.b64encode(data).decode("ascii"),
        "title": note.type_display,
        "creation": _fhir_time(note.date, False),
    }


def note_resource(note: NoteDocument, patient_id: str) -> DocumentReference | DiagnosticReport:
    """A DocumentReference (text/plain attachment) or a DiagnosticReport with the note as presentedForm."""
    code = {"coding": [{"system": LOINC, "code": note.type_code, "display": note.type_display}]}
    subject = {"reference": f"Patient/{patient_id}"}
    if note.resource_type == "DiagnosticReport":
        return DiagnosticReport.model_validate(
            {
                "resourceType": "DiagnosticReport",
                "id": note.id,
                "identifier": [_synth_identifier(note.id)],
                "status": "final" if note.status == "current" else note.status,
                "category": [{"coding": [{"system": V2_0074, "code": "OTH", "display": "Other"}]}],
                "code": code,
                "subject": subject,
                "effectiveDateTime": _fhir_time(note.date, False),
                "issued": _fhir_time(note.date, False),
                "presentedForm": [_attachment(note)],
            }
        )
    return DocumentReference.model_validate(
        {
            "resourceType": "DocumentReference",
            "id": note.id,
            "identifier": [_synth_identifier(note.id)],
            "status": note.status,
            "docStatus": "final",
            "type": code,
            "category": [
                {"coding": [{"system": US_CORE_DOC_CATEGORY, "code": "clinical-note", "display": "Clinical Note"}]}
            ],
            "subject": subject,
            "date": _fhir_time(note.date, False),
            "content": [{"attachment": _attachment(note)}],
            "context": {"period": {"start": _fhir_time(note.date, False)}},
        }
    )


def outcome_condition_resource(patient: PatientSpec, patient_id: str) -> Condition | None:
    """The outcome diagnosis of a positive patient (onset and recorded at its onset), or None for a negative."""
    if patient.outcome_onset is None:
        return None
    resource_id = f"{patient_id}-outcome"
    return Condition.model_validate(
        {
            "resourceType": "Condition",
            "id": resource_id,
            "identifier": [_synth_identifier(resource_id)],
            "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL, "code": "active"}]},
            "verificationStatus": {"coding": [{"system": CONDITION_VERIFICATION, "code": "confirmed"}]},
            "code": {"coding": list(OUTCOME_CODINGS), "text": OUTCOME_CODINGS[0]["display"]},
            "subject": {"reference": f"Patient/{patient_id}"},
            "onsetDateTime": _fhir_time(patient.outcome_onset, utc=False),
            "recordedDate": _fhir_time(patient.outcome_onset, utc=False),
        }
    )


def follow_up_encounter_resource(patient: PatientSpec, patient_id: str) -> Encounter | None:
    """The patient's follow-up visit after the outcome horizon (evidence that a negative is one)."""
    if patient.follow_up is None:
        return None
    resource_id = f"{patient_id}-follow-up"
    return Encounter.model_validate(
        {
            "resourceType": "Encounter",
            "id": resource_id,
            "identifier": [_synth_identifier(resource_id)],
            "status": "finished",
            "class": {"system": V3_ACT_CODE, "code": "AMB", "display": "ambulatory"},
            "subject": {"reference": f"Patient/{patient_id}"},
            "period": {
                "start": _fhir_time(patient.follow_up, utc=False),
                "end": _fhir_time(patient.follow_up + timedelta(minutes=30), utc=False),
            },
        }
    )


def patient_bundle(patient: PatientSpec, cohort_id: str) -> Bundle | None:
    """The transaction Bundle of one cohort patient (None when the patient has no FHIR Patient)."""
    if not patient.fhir_patients:
        return None
    owner = patient.fhir_patients[0].id
    resources: list[Any] = [patient_resource(fp) for fp in patient.fhir_patients]
    resources += [observation_resource(obs, owner) for obs in patient.labs]
    resources += [note_resource(note, owner) for note in patient.notes]
    resources += [
        r for r in (outcome_condition_resource(patient, owner), follow_up_encounter_resource(patient, owner)) if r
    ]
    entries = [
        {
            "fullUrl": f"urn:uuid:{make_uuid(cohort_id, resource.get_resource_type(), resource.id)}",
            "resource": resource,
            "request": {"method": "PUT", "url": f"{resource.get_resource_type()}/{resource.id}"},
        }
        for resource in resources
    ]
    return Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "id": f"rb-{cohort_id}-{patient.key}-bundle",
            "type": "transaction",
            "entry": entries,
        }
    )


def bundle_json(bundle: Bundle) -> str:
    """Serialize a bundle deterministically (field order of the models, no nulls)."""
    return bundle.model_dump_json(exclude_none=True)
