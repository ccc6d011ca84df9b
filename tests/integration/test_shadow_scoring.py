"""Shadow scoring against the sandbox: a candidate package scores the same studies as the active one, into the
ledger and the report only; the FHIR server gets the active model's RiskAssessments and nothing of the candidate's.

Both packages are tiny real packages with seeded random weights (their scores mean nothing; the plumbing is tested),
of different fusion strategies so their scores differ. The run is on demand over a few accessions of a small cohort.
"""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from synthetic_site import synthetic_site_settings
from tiny_model import tiny_package
from typer.testing import CliRunner

from riskbridge import cli
from riskbridge.connectors.fhir import FhirClient
from riskbridge.dev.synth import generate, load, read_truth
from riskbridge.ledger import Ledger
from riskbridge.model.package import read_package_info
from riskbridge.pipeline import Pipeline
from riskbridge.settings import DatabaseSettings, RunSettings, Settings
from riskbridge.stages.write_back import assessment_key

pytestmark = pytest.mark.integration


def test_a_candidate_in_shadow_is_compared_in_the_report_never_written_then_promoted(
    sandbox: Settings,
    tmp_path: Path,
    scratch_database: Callable[[str], tuple[DatabaseSettings, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cohort = tmp_path / "cohort"
    generate(cohort, patients=8, seed=3131)
    load(cohort, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", sandbox.fhir.base_url)
    accessions = [r["index_study"]["accession"] for r in read_truth(cohort) if r["quarantine"] is None]

    database = scratch_database("rb_shadow")[0]
    with Ledger.connect(database) as ledger:
        ledger.upgrade()
    tag = uuid.uuid4().hex[:8]
    active = tiny_package(tmp_path / "active", version=f"0.0.1-{tag}", spacing_mm=8.0)
    candidate = tiny_package(tmp_path / "candidate", strategy="late", version=f"0.0.2-{tag}", spacing_mm=8.0)
    candidate_sha = read_package_info(candidate).sha256
    run = RunSettings(
        report_dir=tmp_path / "reports",
        model_package=active,
        model_sha256=read_package_info(active).sha256,
        shadow_package=candidate,
        shadow_sha256=candidate_sha,
        quarantine_alert_fraction=1.0,
    )
    system = f"urn:riskbridge:test-shadow-{tag}"
    site = synthetic_site_settings(sandbox, database, tmp_path, run)
    settings = site.model_copy(update={"writeback": sandbox.writeback.model_copy(update={"identifier_system": system})})

    with Pipeline.from_settings(settings) as pipeline:
        run_id = pipeline.start_run("on_demand", f"test:shadow:{tag}", accessions=accessions)
        results = pipeline.run_stages(run_id)
        assert sum(r.failed for r in results) == 0, results
        pipeline.finish_run(run_id)
        summary = pipeline.summary(run_id)
        page = pipeline.report(run_id)
        with pipeline.ledger.transaction() as cursor:
            cursor.execute("SELECT study_uid, fhir_patient_id FROM scores WHERE run_id = %s", (run_id,))
            scored = {r["study_uid"]: r["fhir_patient_id"] for r in cursor.fetchall()}
            cursor.execute("SELECT * FROM shadow_scores WHERE run_id = %s", (run_id,))
            shadow = cursor.fetchall()
        # Scoring again finds nothing left for either model.
        assert pipeline.run_stage("score", run_id).total == 0

    assert len(scored) >= 3
    assert {r["study_uid"] for r in shadow} == set(scored)
    assert {r["model_sha256"] for r in shadow} == {candidate_sha} and all(r["error"] is None for r in shadow)
    (comparison,) = summary.shadow
    assert comparison.scored == len(scored) and comparison.failed == 0
    assert comparison.model.endswith(candidate_sha[:12]) and comparison.spearman is not None
    text = page.read_text()
    assert "Shadow model" in text and (page.parent / "shadow.png").is_file()

    with FhirClient(settings.fhir) as client:
        written = list(client.search("RiskAssessment", {"identifier": f"{system}|"}))
    version = read_package_info(active).version
    assert sorted(r["identifier"][0]["value"] for r in written) == sorted(
        assessment_key(version, patient, study) for study, patient in scored.items()
    ), "only the active model's RiskAssessments reach the FHIR server"

    # Promotion: refused while the shadow record is too short (nothing changes), then done, pinned in the config.
    config = tmp_path / "riskbridge.toml"
    config.write_text(f'[run]\nshadow_package = "{candidate.as_posix()}"\n', encoding="utf-8")
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    promote = ["--config", str(config), "model", "promote", str(candidate), "--min-studies", "3"]
    refused = CliRunner().invoke(cli.app, [*promote, "--min-runs", "2"], env={"COLUMNS": "200"})
    assert refused.exit_code == 1, refused.output
    assert "FAIL" in refused.output and "1 finished run(s) scored it in shadow (need 2)" in refused.output
    assert "model_sha256" not in config.read_text()
    promoted = CliRunner().invoke(cli.app, [*promote, "--min-runs", "1"], env={"COLUMNS": "200"})
    assert promoted.exit_code == 0, promoted.output
    assert tomllib.loads(config.read_text())["run"] == {
        "model_package": candidate.resolve().as_posix(),
        "model_sha256": candidate_sha,
    }
    with Ledger.connect(database) as ledger, ledger.transaction() as cursor:
        cursor.execute("SELECT model_sha256, shadow_runs, shadow_studies FROM model_promotions")
        assert [tuple(r.values()) for r in cursor.fetchall()] == [(candidate_sha, 1, len(scored))]
