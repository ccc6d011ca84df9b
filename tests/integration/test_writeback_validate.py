"""The write-back's resources pass HAPI FHIR's ``$validate`` with riskbridge's definitions loaded.

RiskAssessments and Provenances are written the way the pipeline writes them (``write_assessments``: transaction
bundles of conditional creates and PUTs) for three modality patterns, read back, and validated as read
(``POST [type]/$validate``): no issue may be an error or fatal. The one exception is checked, not
assumed: HAPI 8.8's terminology is FHIR 4.0.1's, whose ``v3-ObservationValue`` predates the AI Transparency IG's
``AIAST`` code, so HAPI calls the label an unknown code. The test accepts that error only while the server itself
answers ``CodeSystem/$validate-code`` for AIAST with false; a server that knows AIAST gets no exception.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from typer.testing import CliRunner

from riskbridge.cli import app
from riskbridge.connectors.fhir import FhirClient, transaction_entry
from riskbridge.settings import Settings
from riskbridge.stages.write_back import (
    AI_ASSERTED_CODE,
    MODALITIES,
    MODALITY_ATTENTION_URL,
    MODALITY_PATTERN_URL,
    SECURITY_OBSERVATION_VALUE_SYSTEM,
    Score,
    WritebackConfig,
    assessment_key,
    definition_resources,
    install_definitions,
    modality_pattern,
    write_assessments,
)

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"
TEST_SYSTEM = "urn:riskbridge:test:writeback-validate"
# Weights exact at the 6 significant digits the write-back keeps, so what is read back equals what was scored.
ATTENTIONS = [
    {"image": 0.5, "labs": 0.3, "notes": 0.2},
    {"image": 0.7, "labs": 0.3, "notes": 0.0},
    {"image": 1.0, "labs": 0.0, "notes": 0.0},
]
# HAPI 8.8 fails to build a snapshot when it validates any StructureDefinition, FHIR's own core extensions
# included (checked by hand with core's patient-nationality): a limit of its validator, not of the definition.
HAPI_SNAPSHOT_LIMIT = "Unable to resolve package id hl7.fhir.r4.core#null"


@pytest.fixture(scope="module")
def client(sandbox: Settings) -> Iterator[FhirClient]:
    with FhirClient(sandbox.fhir) as fhir:
        yield fhir


def _validate(client: FhirClient, resource: dict[str, Any]) -> list[dict[str, Any]]:
    """The issues of ``$validate`` on a resource as read back from the server, ``meta`` included.

    POSTed rather than ``GET [type]/[id]/$validate``: HAPI 8.8 validates a stored resource without its ``meta``,
    so the GET form never looks at the security label.
    """
    what = f"POST {resource['resourceType']}/$validate"
    response = client.send(
        "POST",
        client.url_for(f"{resource['resourceType']}/$validate"),
        what=what,
        data=json.dumps(resource).encode("utf-8"),
        headers={"Content-Type": FHIR_JSON},
    )
    # HAPI answers 412 when the outcome holds an error; both carry the OperationOutcome.
    assert response.status_code in (200, 412), (what, response.status_code, response.text[:2000])
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    return list(outcome.get("issue") or [])


def _server_knows_aiast(client: FhirClient) -> bool:
    response = client.send(
        "GET",
        client.url_for("CodeSystem/$validate-code"),
        params=[("url", SECURITY_OBSERVATION_VALUE_SYSTEM), ("code", AI_ASSERTED_CODE)],
    )
    assert response.status_code == 200, response.text[:2000]
    result = [p for p in response.json()["parameter"] if p["name"] == "result"]
    return bool(result[0]["valueBoolean"])


def _is_unknown_aiast(issue: dict[str, Any]) -> bool:
    return issue.get("expression", [None])[0] == "RiskAssessment.meta.security[0]" and (
        f"Unknown code '{SECURITY_OBSERVATION_VALUE_SYSTEM}#{AI_ASSERTED_CODE}'" == issue.get("diagnostics")
    )


def _is_hapi_snapshot_limit(issue: dict[str, Any]) -> bool:
    codes = [coding.get("code") for coding in (issue.get("details") or {}).get("coding", [])]
    return "ERROR_GENERATING_SNAPSHOT" in codes and HAPI_SNAPSHOT_LIMIT in issue.get("diagnostics", "")


def _errors(issues: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [issue for issue in issues if issue["severity"] in ("error", "fatal")]


def _inputs(client: FhirClient, n: int) -> list[tuple[str, str, str]]:
    """Create ``n`` patients, each with a lab Observation and a note: (patient id, observation id, note id)."""
    inputs = []
    for _ in range(n):
        marker = uuid.uuid4().hex
        patient = Patient(identifier=[{"system": TEST_SYSTEM, "value": marker}], gender="female")
        patient_entry = transaction_entry(patient, if_none_exist=f"identifier={TEST_SYSTEM}|{marker}")
        subject = {"reference": patient_entry["fullUrl"]}
        observation = Observation(
            status="final",
            code={"coding": [{"system": "http://loinc.org", "code": "2160-0", "display": "Creatinine"}]},
            subject=subject,
            effectiveDateTime="2024-01-03T09:00:00-05:00",
            valueQuantity={"value": 0.9, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
        )
        note = DocumentReference(
            status="current",
            subject=subject,
            content=[{"attachment": {"contentType": "text/plain", "data": "Tm8gc21va2luZyBoaXN0b3J5Lg=="}}],
        )
        entries = [patient_entry, transaction_entry(observation), transaction_entry(note)]
        results = client.transaction(entries)
        ids = [result.resource_id for result in results]
        assert all(ids), results
        inputs.append((str(ids[0]), str(ids[1]), str(ids[2])))
    return inputs


def _scores(client: FhirClient) -> list[Score]:
    version = f"test-{uuid.uuid4().hex[:12]}"  # a developer's sandbox keeps what earlier runs wrote
    eastern = timezone(timedelta(hours=-5))
    scores = []
    for attention, (patient_id, observation_id, note_id) in zip(
        ATTENTIONS, _inputs(client, len(ATTENTIONS)), strict=True
    ):
        scores.append(
            Score(
                patient_id=patient_id,
                study_uid=f"1.2.826.0.1.3680043.10.543.{uuid.uuid4().int % 10**12}",
                model_name="fusion",
                model_version=version,
                probability=0.42,
                occurrence=datetime(2024, 1, 4, 18, 44, tzinfo=eastern),
                scored_at=datetime(2024, 1, 5, 7, 0, tzinfo=UTC),
                attention=attention,
                observation_ids=(observation_id,) if attention["labs"] > 0 else (),
                document_ids=(note_id,) if attention["notes"] > 0 else (),
            )
        )
    return scores


def test_definitions_install_idempotently_and_validate(client: FhirClient) -> None:
    first = install_definitions(client)
    assert set(first) == {resource["url"] for resource in definition_resources()}
    versions = {}
    for resource in definition_resources():
        stored = client.read(resource["resourceType"], resource["id"])
        versions[resource["url"]] = stored["meta"]["versionId"]
    # the second time through the command line, as an integrator runs it: nothing new, nothing rewritten
    result = CliRunner().invoke(
        app, ["fhir", "install-definitions"], env={"RISKBRIDGE_FHIR__BASE_URL": client.base_url}
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("up to date: ") == len(first) and "created" not in result.output
    for resource in definition_resources():
        stored = client.read(resource["resourceType"], resource["id"])
        assert stored["meta"]["versionId"] == versions[resource["url"]], "an unchanged definition was rewritten"
        errors = [issue for issue in _errors(_validate(client, stored)) if not _is_hapi_snapshot_limit(issue)]
        assert not errors, (resource["url"], errors)


def test_every_written_assessment_and_provenance_validates_and_reads_back_what_was_used(
    client: FhirClient,
) -> None:
    install_definitions(client)
    knows_aiast = _server_knows_aiast(client)
    scores = _scores(client)
    config = WritebackConfig(identifier_system=f"{TEST_SYSTEM}:assessment", bundle_size=2)
    report = write_assessments(scores, client, config)
    assert len(report.created) == len(scores) and report.bundles == 2

    for score in scores:
        key = assessment_key(score.model_version, score.patient_id, score.study_uid)
        found = list(client.search("RiskAssessment", {"identifier": f"{config.identifier_system}|{key}"}))
        assert len(found) == 1
        assessment = found[0]

        # What was used, read back as data.
        extensions = assessment["extension"]
        assert [e["valueCode"] for e in extensions if e["url"] == MODALITY_PATTERN_URL] == [
            modality_pattern(score.attention)
        ]
        weights = []
        for extension in extensions:
            if extension["url"] == MODALITY_ATTENTION_URL:
                parts = {part["url"]: part for part in extension["extension"]}
                weights.append((parts["modality"]["valueCode"], parts["weight"]["valueDecimal"]))
        assert weights == [(name, score.attention[name]) for name in MODALITIES]
        security = [(c.get("system"), c.get("code")) for c in assessment["meta"].get("security", [])]
        assert (SECURITY_OBSERVATION_VALUE_SYSTEM, AI_ASSERTED_CODE) in security

        issues = _validate(client, assessment)
        # The definitions are in use: an unknown-extension notice would mean the extensions went unchecked.
        assert not [i for i in issues if "Unknown extension" in i.get("diagnostics", "")], issues
        # The label was looked at (the GET form of $validate skips meta): a server without AIAST must say so.
        assert knows_aiast or any(_is_unknown_aiast(i) for i in issues), issues
        errors = [i for i in _errors(issues) if knows_aiast or not _is_unknown_aiast(i)]
        assert not errors, json.dumps(errors, indent=1)

        provenance = client.read("Provenance", f"{key}-provenance")
        assert provenance["target"] == [{"reference": f"RiskAssessment/{assessment['id']}"}]
        errors = _errors(_validate(client, provenance))
        assert not errors, json.dumps(errors, indent=1)


def test_the_validator_enforces_the_extension_definitions(client: FhirClient) -> None:
    # Without this, "no errors" above could also mean "extensions not checked at all".
    install_definitions(client)
    bad = {
        "resourceType": "RiskAssessment",
        "status": "final",
        "subject": {"reference": "Patient/does-not-matter"},
        "extension": [
            {"url": MODALITY_PATTERN_URL, "valueCode": "labs+image"},
            {
                "url": MODALITY_ATTENTION_URL,
                "extension": [{"url": "modality", "valueCode": "ecg"}, {"url": "weight", "valueDecimal": 1.5}],
            },
        ],
    }
    response = client.send(
        "POST",
        client.url_for("RiskAssessment/$validate"),
        data=json.dumps(bad).encode(),
        headers={"Content-Type": FHIR_JSON},
    )
    assert response.status_code in (200, 412), response.text[:2000]
    messages = " | ".join(issue.get("diagnostics", "") for issue in _errors(response.json()["issue"]))
    assert "rbmp-1" in messages  # the pattern's order/grammar
    assert "ecg" in messages  # the modality code outside the value set
    assert "maximum value" in messages  # the weight above 1
