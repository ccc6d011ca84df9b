"""FHIR Bulk Data export against the sandbox HAPI FHIR server loaded with a synthetic cohort.

A ``Patient/$export`` for the cohort's patients returns exactly the Conditions and Encounters that batched searches
(``FhirClient.search_by_patients``) find, and those are the ground truth's outcome diagnoses and follow-up visits;
a ``_typeFilter`` narrows the export as the same search parameter narrows the search; an abandoned job is cancelled.
The sandbox's launcher runs batch2 maintenance every second (``riskbridge.fhir.batch2-maintenance-interval-millis``),
so an export of a small cohort completes in a few seconds; HAPI still answers ``Retry-After: 120``, hence the cap.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from riskbridge.connectors.fhir import (
    BulkExport,
    BulkExportError,
    FhirClient,
    bulk_export,
    read_ndjson,
    subject_patient_id,
    supports_bulk_export,
)
from riskbridge.dev.synth import generate, load, read_truth
from riskbridge.dev.synth.fhir import OUTCOME_CODINGS
from riskbridge.settings import Settings

pytestmark = pytest.mark.integration

EXPORT_TIMEOUT_S = 180.0
POLL_CAP_S = 1.0  # HAPI asks for 120 s between polls; the sandbox finishes a small export within seconds


@dataclass(frozen=True)
class Cohort:
    patient_ids: list[str]  # every FHIR Patient of the cohort (duplicate charts included)
    condition_ids: set[str]  # the outcome diagnoses of the positives
    encounter_ids: set[str]  # everyone's follow-up visit


@pytest.fixture(scope="module")
def cohort(sandbox: Settings, tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    out = tmp_path_factory.mktemp("fhir-bulk") / "cohort"
    generate(out, patients=16, seed=3131)
    load(out, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", sandbox.fhir.base_url)
    truth = read_truth(out)
    patient_ids = sorted({pid for record in truth for pid in record["identity"]["candidate_fhir_patient_ids"]})
    conditions: set[str] = set()
    encounters: set[str] = set()
    for record in truth:
        candidates = record["identity"]["candidate_fhir_patient_ids"]
        if not candidates:
            continue  # no FHIR Patient, so no FHIR records
        owner = candidates[0]  # the first chart holds the patient's records
        if record["outcome"]["onset"] is not None:
            conditions.add(f"{owner}-outcome")
        if record["outcome"]["follow_up"] is not None:
            encounters.add(f"{owner}-follow-up")
    assert conditions and encounters, "the cohort should have outcome diagnoses and follow-up visits"
    return Cohort(patient_ids, conditions, encounters)


@pytest.fixture
def client(sandbox: Settings) -> Iterator[FhirClient]:
    with FhirClient(sandbox.fhir) as fhir:
        if not supports_bulk_export(fhir, "patient"):
            pytest.fail(
                "the sandbox HAPI FHIR server does not declare Patient/$export: it runs a launcher built before bulk "
                "export was enabled; stop it (riskbridge sandbox down) so the next start rebuilds the jar"
            )
        yield fhir


def by_id(resources: Iterator[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Resources keyed by id, without ``meta`` (versionId/lastUpdated/source are the server's bookkeeping)."""
    found: dict[str, dict[str, Any]] = {}
    for resource in resources:
        assert resource["id"] not in found, f"{resource['resourceType']}/{resource['id']} came twice"
        found[resource["id"]] = {key: value for key, value in resource.items() if key != "meta"}
    return found


def test_the_server_declares_bulk_export_at_every_level(client: FhirClient) -> None:
    assert supports_bulk_export(client, "system")
    assert supports_bulk_export(client, "patient")
    assert supports_bulk_export(client, "group")


def test_a_patient_export_equals_batched_searches(client: FhirClient, cohort: Cohort, tmp_path: Path) -> None:
    stages: list[str] = []
    files = bulk_export(
        client,
        ["Condition", "Encounter"],
        patient_ids=cohort.patient_ids,
        out_dir=tmp_path,
        timeout_s=EXPORT_TIMEOUT_S,
        max_poll_interval_s=POLL_CAP_S,
        progress=lambda stage, message: stages.append(stage),
    )
    assert set(files) == {"Condition", "Encounter"}
    assert all(path.parent == tmp_path and path.suffix == ".ndjson" for paths in files.values() for path in paths)
    assert stages[0] == "kick-off" and stages[-1] == "download"

    expected = {"Condition": cohort.condition_ids, "Encounter": cohort.encounter_ids}
    members = set(cohort.patient_ids)
    for resource_type in ("Condition", "Encounter"):
        exported = by_id(read_ndjson(files[resource_type]))
        searched = by_id(client.search_by_patients(resource_type, cohort.patient_ids))
        assert exported == searched, resource_type
        assert set(exported) == expected[resource_type], resource_type
        assert all(resource["resourceType"] == resource_type for resource in exported.values())
        assert {subject_patient_id(resource) for resource in exported.values()} <= members


def test_a_type_filter_narrows_the_export_like_the_search(client: FhirClient, cohort: Cohort, tmp_path: Path) -> None:
    coding = OUTCOME_CODINGS[1]  # ICD-10-CM C34.90
    code = f"{coding['system']}|{coding['code']}"
    files = bulk_export(
        client,
        ["Condition", "Encounter"],
        patient_ids=cohort.patient_ids,
        type_filters=[f"Condition?code={code}", "Encounter?status=cancelled"],
        out_dir=tmp_path,
        timeout_s=EXPORT_TIMEOUT_S,
        max_poll_interval_s=POLL_CAP_S,
    )
    exported = by_id(read_ndjson(files["Condition"]))
    searched = by_id(client.search_by_patients("Condition", cohort.patient_ids, {"code": code}))
    assert exported == searched
    assert set(exported) == cohort.condition_ids
    assert files["Encounter"] == []  # every follow-up visit is finished: nothing matches


def test_an_abandoned_job_is_cancelled(client: FhirClient, cohort: Cohort) -> None:
    job = BulkExport.start(client, ["Condition"], patient_ids=cohort.patient_ids[:2])
    assert job.cancel()
    with pytest.raises(BulkExportError) as caught:
        job.wait(timeout_s=30.0, max_poll_interval_s=POLL_CAP_S)
    assert caught.value.status == 404
    assert "is gone" in str(caught.value)
    assert job.status_url in str(caught.value)
    assert all(pid not in str(caught.value) for pid in cohort.patient_ids)
