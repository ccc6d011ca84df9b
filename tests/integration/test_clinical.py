"""The clinical stage end to end against the sandbox HAPI FHIR server, checked against the synthetic cohort's truth:
every expected lab value reproduced in its canonical unit, every other Observation excluded with a reason, the
note flags, the demographics; and the RiskAssessment write-back, run three times, leaves one per key."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from riskbridge.connectors.fhir import FhirClient
from riskbridge.dev.synth import LoadReport, generate, read_manifest, read_truth
from riskbridge.dev.synth.cohort import SITE_TZ
from riskbridge.dev.synth.load import load_fhir
from riskbridge.harmonize.features import load_default_feature_spec
from riskbridge.harmonize.windows import WindowReason
from riskbridge.settings import Settings
from riskbridge.stages.clinical import ClinicalHarmonizer, PatientIndex
from riskbridge.stages.write_back import Score, WritebackConfig, assessment_key, write_assessments

pytestmark = pytest.mark.integration

SPEC = load_default_feature_spec()


@pytest.fixture(scope="module")
def truth(sandbox: Settings, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Fourteen patients' FHIR data in the sandbox HAPI."""
    out = tmp_path_factory.mktemp("clinical") / "cohort"
    generate(out, patients=14, seed=41)
    load_fhir(out, sandbox.fhir.base_url, LoadReport(cohort_id=read_manifest(out)["cohort_id"]))
    return read_truth(out)


@pytest.fixture(scope="module")
def results(sandbox: Settings, truth: list[dict[str, Any]]) -> dict[str, Any]:
    patients = [
        PatientIndex(record["identity"]["fhir_patient_id"], datetime.fromisoformat(record["index_time"]))
        for record in truth
        if record["identity"]["outcome"] == "matched"
    ]
    with FhirClient(sandbox.fhir) as client:
        return ClinicalHarmonizer(client, SPEC, SITE_TZ).run(patients)


def _matched(truth: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in truth if record["identity"]["outcome"] == "matched"]


def test_every_expected_lab_value_is_reproduced_from_the_server(
    truth: list[dict[str, Any]], results: dict[str, Any]
) -> None:
    compared = 0
    for record in _matched(truth):
        result = results[record["identity"]["fhir_patient_id"]]
        for feature, expected in record["labs"].items():
            selection = result.labs[feature]
            if expected is None:
                assert selection.value is None, (record["patient_key"], feature)
                continue
            assert selection.value == pytest.approx(expected["value"], rel=1e-9), (record["patient_key"], feature)
            assert selection.used == (expected["observation_id"],)
            compared += 1
    assert compared >= 30


def test_every_observation_the_truth_does_not_use_is_excluded_with_a_reason(
    truth: list[dict[str, Any]], results: dict[str, Any]
) -> None:
    excluded = 0
    for record in _matched(truth):
        result = results[record["identity"]["fhir_patient_id"]]
        for observation in record["lab_observations"]:
            selection = result.labs[observation["feature"]]
            disposition = selection.disposition_of(observation["id"])
            if observation["disposition"] == "used":
                assert disposition is not None and disposition.code is WindowReason.USED
            elif disposition is not None:  # fetched (inside the searched date span): excluded, and why
                assert disposition.code is not WindowReason.USED and disposition.code, observation
                excluded += 1
    assert excluded > 0


def test_note_flags_and_demographics_match_the_truth(truth: list[dict[str, Any]], results: dict[str, Any]) -> None:
    for record in _matched(truth):
        vector = results[record["identity"]["fhir_patient_id"]].vector
        values = dict(zip(vector.names, vector.values, strict=True))
        observed = dict(zip(vector.names, vector.observed, strict=True))
        expected = record["comorbidities"]
        for flag in SPEC.flags:
            if expected is None:
                assert not observed[flag], (record["patient_key"], flag)
            else:
                assert values[flag] == float(expected[flag]), (record["patient_key"], flag)
        assert values["sex_male"] == (1.0 if record["pacs"]["sex"] == "M" else 0.0)
        assert observed["age_years"]


def test_write_back_three_times_leaves_one_assessment_per_key(
    sandbox: Settings, truth: list[dict[str, Any]], results: dict[str, Any]
) -> None:
    config = WritebackConfig(identifier_system="urn:riskbridge:test-assessment", bundle_size=4)
    # A model version of this run only: a developer's sandbox keeps what earlier runs wrote.
    version = f"test-{uuid.uuid4().hex[:12]}"
    scores = [
        Score(
            patient_id=record["identity"]["fhir_patient_id"],
            study_uid=record["index_study"]["study_uid"],
            model_name="fusion",
            model_version=version,
            probability=record["outcome"]["probability"],
            occurrence=datetime.fromisoformat(record["index_time"]),
            scored_at=datetime(2024, 1, 15, 6, 0, tzinfo=UTC),
            attention={"image": 0.5, "labs": 0.3, "notes": 0.2},
            observation_ids=results[record["identity"]["fhir_patient_id"]].observation_ids,
            document_ids=results[record["identity"]["fhir_patient_id"]].document_ids,
        )
        for record in _matched(truth)
    ]
    with FhirClient(sandbox.fhir) as client:
        reports = [write_assessments(scores, client, config) for _ in range(3)]
        assert len(reports[0].created) == len(scores) and not reports[0].existing
        assert [len(r.existing) for r in reports[1:]] == [len(scores), len(scores)]
        for score in scores[:3]:
            key = assessment_key(score.model_version, score.patient_id, score.study_uid)
            found = list(client.search("RiskAssessment", {"identifier": f"{config.identifier_system}|{key}"}))
            assert len(found) == 1
            provenance = client.read("Provenance", f"{key}-provenance")
            assert provenance["meta"]["versionId"] == "1"  # rewritten twice, changed never
            assert provenance["target"] == [{"reference": f"RiskAssessment/{found[0]['id']}"}]
        # A new model version is a new assessment.
        newer = [Score(**{**scores[0].__dict__, "model_version": scores[0].model_version + "-b"})]
        assert len(write_assessments(newer, client, config).created) == 1
