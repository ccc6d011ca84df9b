"""The same cohort through the whole pipeline twice: from Orthanc, which answers C-FIND with everything it stored,
and from dcmtk's dcmqrscp, a strict PACS that answers SERIES level with Modality, SeriesNumber and UIDs only and
returns no OtherPatientIDsSequence (docs/sandbox.md). Against dcmqrscp the series are chosen on sampled headers
and the identities that need OtherPatientIDsSequence come from them (docs/series-selection.md "Header sampling"),
so both runs must quarantine the same studies for the same reasons and write RiskAssessments with the same
content; and with sampling off, dcmqrscp gives the failure the issue describes (no series chosen).

The model is a tiny real package with seeded random weights (the scores mean nothing; equality across PACS is
what is tested). The cohort has an index window of its own (:data:`synthetic_site.COHORT_ANCHORS`) in both PACS.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from synthetic_site import cohort_anchor, index_days, synthetic_site_settings
from tiny_model import tiny_package

from riskbridge.connectors.fhir import FhirClient
from riskbridge.dev.sandbox import dcmqrscp_pacs
from riskbridge.dev.synth import EdgeCaseRates, generate, load, read_truth
from riskbridge.dev.synth.load import load_dicom_into
from riskbridge.ledger import Ledger
from riskbridge.pipeline import Pipeline, window_of_days
from riskbridge.settings import DatabaseSettings, RunSettings, Settings
from riskbridge.stages import report as report_stage

pytestmark = pytest.mark.integration

ZONE = "America/New_York"
WINDOW: tuple[date, date] = index_days("test_pipeline_two_pacs")
# pacs_mrn_in_other_ids: PatientID is the radiology system's own, the MRN only in OtherPatientIDsSequence, which
# neither PACS returns in C-FIND: identity must read it from a sampled header.
RATES = EdgeCaseRates(no_fhir_patient=0.15, no_usable_series=0.15, pacs_mrn_in_other_ids=0.25)


@pytest.fixture(scope="module")
def truth(sandbox: Settings, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """A small cohort, loaded into Orthanc and HAPI FHIR and its DICOM also into the sandbox dcmqrscp."""
    out = tmp_path_factory.mktemp("two-pacs") / "cohort"
    generate(out, patients=8, seed=4421, rates=RATES, anchor=cohort_anchor("test_pipeline_two_pacs"))
    load(out, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", sandbox.fhir.base_url)
    report = load_dicom_into(dcmqrscp_pacs(sandbox), out)
    assert report.instances_sent > 0
    return read_truth(out)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_package(
        tmp_path_factory.mktemp("tiny") / "tiny", version=f"0.0.2-{uuid.uuid4().hex[:8]}", spacing_mm=8.0
    )


def _settings(
    sandbox: Settings, package: Path, tmp_path: Path, database: DatabaseSettings, pacs_name: str, sampling: str
) -> Settings:
    """The synthetic site's settings with the PACS named, its own ledger, staging and write-back identifier."""
    with Ledger.connect(database) as ledger:
        ledger.upgrade()
    run = RunSettings(report_dir=tmp_path / "reports", model_package=package, quarantine_alert_fraction=1.0)
    settings = synthetic_site_settings(sandbox, database, tmp_path / pacs_name, run)
    pacs = dcmqrscp_pacs(settings) if pacs_name == "dcmqrscp" else settings.pacs
    writeback = settings.writeback.model_copy(update={"identifier_system": f"urn:riskbridge:test-{uuid.uuid4().hex}"})
    return settings.model_copy(
        update={"pacs": pacs.model_copy(update={"header_sampling": sampling}), "writeback": writeback}
    )


def _run(settings: Settings, key: str) -> int:
    with Pipeline.from_settings(settings) as pipeline:
        run_id = pipeline.start_run("backfill", key, window_of_days(*WINDOW, ZONE))
        results = pipeline.run_stages(run_id)
        pipeline.finish_run(run_id)
    assert sum(r.failed for r in results) == 0, [r for r in results if r.failed]
    return run_id


def _outcomes(settings: Settings, run_id: int, truth: list[dict[str, Any]]) -> dict[str, tuple[str, Any]]:
    """This cohort's studies: ("scored", probability) or ("quarantined", reason)."""
    mine = {record["index_study"]["study_uid"] for record in truth}
    with Ledger.connect(settings.database) as ledger:
        quarantined = ledger.quarantined(run_id)
        summary = report_stage.run_summary(ledger, run_id)
    found: dict[str, tuple[str, Any]] = {uid: ("quarantined", quarantined[uid][1]) for uid in mine & set(quarantined)}
    found |= {uid: ("scored", round(p, 6)) for uid, p, _ in summary.scores if uid in mine}
    return found


def _assessments(settings: Settings) -> dict[str, dict[str, Any]]:
    """This run's RiskAssessments by study, without what differs by design (ids, identifiers, meta)."""
    found = {}
    with FhirClient(settings.fhir) as client:
        for resource in client.search("RiskAssessment", {"identifier": f"{settings.writeback.identifier_system}|"}):
            imaging = next(basis for basis in resource["basis"] if basis.get("type") == "ImagingStudy")
            study = imaging["identifier"]["value"].removeprefix("urn:oid:")
            found[study] = {k: v for k, v in resource.items() if k not in ("id", "identifier", "meta", "text")}
    return found


def test_a_strict_pacs_scores_the_cohort_like_orthanc(
    sandbox: Settings,
    truth: list[dict[str, Any]],
    package: Path,
    tmp_path: Path,
    scratch_database: Callable[[str], tuple[DatabaseSettings, str]],
) -> None:
    orthanc = _settings(sandbox, package, tmp_path, scratch_database("rb_orthanc")[0], "orthanc", "when-needed")
    strict = _settings(sandbox, package, tmp_path, scratch_database("rb_dcmqrscp")[0], "dcmqrscp", "when-needed")
    on_orthanc = _outcomes(orthanc, _run(orthanc, "test:two-pacs:orthanc"), truth)
    strict_run = _run(strict, "test:two-pacs:dcmqrscp")
    on_strict = _outcomes(strict, strict_run, truth)

    assert set(on_orthanc) == {record["index_study"]["study_uid"] for record in truth}
    assert on_strict == on_orthanc
    expected = {record["index_study"]["study_uid"]: record["quarantine"] for record in truth if record["quarantine"]}
    assert {uid: outcome[1] for uid, outcome in on_strict.items() if uid in expected} == expected
    scored = {uid for uid, (kind, _) in on_strict.items() if kind == "scored"}
    assert len(scored) >= 3

    with Ledger.connect(strict.database) as ledger:
        sampling = report_stage.run_summary(ledger, strict_run).sampling
    assert sampling is not None and sampling.series >= len(scored)  # the rules' attributes came from headers
    other_ids = [r for r in truth if r["identity"]["variant"] == "other_ids" and r["quarantine"] is None]
    assert other_ids and all(on_strict[r["index_study"]["study_uid"]][0] == "scored" for r in other_ids)
    assert sampling.identities >= len(other_ids)  # matched on the sampled header's OtherPatientIDsSequence
    with Ledger.connect(strict.database) as ledger, ledger.transaction() as cursor:
        cursor.execute("SELECT sources FROM series_decisions WHERE run_id = %s AND chosen", (strict_run,))
        assert all(row["sources"].get("ImageType") == "header" for row in cursor.fetchall())

    mine = {record["index_study"]["study_uid"] for record in truth}
    from_orthanc = {uid: ra for uid, ra in _assessments(orthanc).items() if uid in mine}
    from_strict = {uid: ra for uid, ra in _assessments(strict).items() if uid in mine}
    assert set(from_strict) == set(from_orthanc) == scored
    assert from_strict == from_orthanc


def test_without_header_sampling_a_strict_pacs_chooses_no_series(
    sandbox: Settings,
    truth: list[dict[str, Any]],
    package: Path,
    tmp_path: Path,
    scratch_database: Callable[[str], tuple[DatabaseSettings, str]],
) -> None:
    strict = _settings(sandbox, package, tmp_path, scratch_database("rb_nosampling")[0], "dcmqrscp", "off")
    outcomes = _outcomes(strict, _run(strict, "test:two-pacs:off"), truth)
    matched = {
        uid for uid, (kind, reason) in outcomes.items() if reason not in ("identity_unmatched", "identity_conflict")
    }
    assert matched and all(outcomes[uid] == ("quarantined", "no_usable_series") for uid in matched)
