"""The minimum-data policy by modality pattern, through the pipeline against the sandbox (Orthanc, HAPI FHIR,
PostgreSQL): a patient with a CT and labs but no clinical note (pattern image+labs) is scored under the shipped feature
spec when the model package validated that pattern, and quarantined at harmonize with the pattern named when the
package's AUROC for it is below the spec's floor. The ledger records every vector's pattern and the AUROC that judged
it, the run names the package whose table decided, and the run report counts studies per pattern.

A 4-patient synthetic cohort of its own (half without notes), run on demand by accession so that other tests'
cohorts in the sandbox stay out of it; the runs stop after scoring, and the first is then written back to HAPI. The
model is a tiny real package with seeded random weights and a made-up pattern table (the scores mean nothing).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from synthetic_site import synthetic_site_settings
from tiny_model import ALL_VALIDATED, tiny_package

from riskbridge.connectors.fhir import FhirClient
from riskbridge.dev.synth import EdgeCaseRates, generate, load, read_truth
from riskbridge.harmonize.features import load_default_feature_spec
from riskbridge.ledger import Ledger
from riskbridge.pipeline import Pipeline
from riskbridge.settings import DatabaseSettings, RunSettings, Settings
from riskbridge.stages import report as report_stage
from riskbridge.stages.write_back import MODALITY_PATTERN_URL, assessment_key

pytestmark = pytest.mark.integration

# Only the no-notes edge case (half the cohort); nothing that would stop a study before harmonize.
RATES = EdgeCaseRates(
    shared_mrn=0.0,
    no_fhir_patient=0.0,
    no_usable_series=0.0,
    no_labs=0.0,
    no_notes=0.5,
    prior_study=0.0,
    pacs_id_leading_zeros=0.0,
    pacs_id_site_prefix=0.0,
    pacs_missing_issuer=0.0,
)


@pytest.fixture(scope="module")
def truth(sandbox: Settings, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("patterns") / "cohort"
    generate(out, patients=4, seed=1212, rates=RATES)
    load(out, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", sandbox.fhir.base_url)
    records = read_truth(out)
    assert all(record["quarantine"] is None and record["labs"] for record in records)
    assert sum(record["comorbidities"] is None for record in records) == 2  # two patients without a note
    return records


@pytest.fixture
def make_settings(
    sandbox: Settings, tmp_path: Path, scratch_database: Callable[[str], tuple[DatabaseSettings, str]]
) -> Callable[[Path], Settings]:
    """Settings with the cohort's site rules, a fresh ledger, staging and report dirs, and the given package."""
    database = scratch_database("rb_patterns")[0]
    with Ledger.connect(database) as ledger:
        ledger.upgrade()

    def make(package: Path) -> Settings:
        run = RunSettings(report_dir=tmp_path / "reports", model_package=package)
        return synthetic_site_settings(sandbox, database, tmp_path, run)

    return make


def _run(settings: Settings, truth: list[dict[str, Any]]) -> int:
    """An on-demand run of the cohort's index studies, through scoring (the report is written too)."""
    accessions = [record["index_study"]["accession"] for record in truth]
    with Pipeline.from_settings(settings) as pipeline:
        run_id = pipeline.start_run("on_demand", f"test:patterns:{uuid.uuid4().hex[:8]}", accessions=accessions)
        results = pipeline.run_stages(run_id, until="score")
        assert sum(r.failed for r in results) == 0, results
        pipeline.report(run_id)
    return run_id


def _decisions(settings: Settings, run_id: int) -> dict[str, tuple[str, str | None, float | None, list[str]]]:
    """Study UID -> (decision, pattern, pattern AUROC, reasons) as the ledger holds them."""
    with Ledger.connect(settings.database) as ledger, ledger.connection, ledger.connection.cursor() as cursor:
        cursor.execute(
            "SELECT study_uid, decision, pattern, pattern_auroc, reasons FROM features WHERE run_id = %s", (run_id,)
        )
        return {row[0]: (row[1], row[2], row[3], list(row[4])) for row in cursor.fetchall()}


def _patterns(truth: list[dict[str, Any]]) -> Mapping[str, str]:
    """Study UID -> the pattern the truth implies: every study has its image and labs; notes where it has notes."""
    return {
        record["index_study"]["study_uid"]: "image+labs" if record["comorbidities"] is None else "image+labs+notes"
        for record in truth
    }


def test_a_ct_with_labs_and_no_note_is_scored_under_the_shipped_spec(
    make_settings: Callable[[Path], Settings], truth: list[dict[str, Any]], tmp_path: Path
) -> None:
    spec = load_default_feature_spec()
    assert spec.minimum.pattern_auroc_floor == 0.70 and spec.minimum.max_missing_fraction == 1.0
    package = tiny_package(tmp_path / "tiny", spacing_mm=8.0, patterns=ALL_VALIDATED)
    settings = make_settings(package)
    run_id = _run(settings, truth)

    decisions = _decisions(settings, run_id)
    expected = _patterns(truth)
    assert {uid: decisions[uid][:3] for uid in expected} == {uid: ("score", p, 0.9) for uid, p in expected.items()}
    with Ledger.connect(settings.database) as ledger:
        summary = report_stage.run_summary(ledger, run_id)
        assert not ledger.quarantined(run_id)
    assert {uid for uid, _, _ in summary.scores} == set(expected)  # the two without a note among them
    assert summary.model is not None and summary.model.startswith("tiny 0.0.1 ")
    assert {p: (c.scored, c.quarantined, c.unscored) for p, c in summary.patterns.items()} == {
        "image+labs+notes": (2, 0, 0),
        "image+labs": (2, 0, 0),
    }
    page = (settings.run.report_dir / str(run_id) / "index.html").read_text()
    assert "<td>image+labs</td><td>2</td><td>2</td><td>0</td><td>0</td><td>0.900</td>" in page
    assert (settings.run.report_dir / str(run_id) / "patterns.png").is_file()

    # written back, each RiskAssessment says which modalities the model used: the note-less two image+labs
    with Pipeline.from_settings(settings) as pipeline:
        assert sum(r.failed for r in pipeline.run_stages(run_id)) == 0
    with FhirClient(settings.fhir) as client:
        for record in truth:
            key = assessment_key("0.0.1", record["identity"]["fhir_patient_id"], record["index_study"]["study_uid"])
            query = {"identifier": f"{settings.writeback.identifier_system}|{key}"}
            found = list(client.search("RiskAssessment", query))
            assert len(found) == 1
            used = [e["valueCode"] for e in found[0].get("extension", []) if e["url"] == MODALITY_PATTERN_URL]
            assert used == [expected[record["index_study"]["study_uid"]]]


def test_a_pattern_below_the_floor_is_quarantined_with_the_pattern_named(
    make_settings: Callable[[Path], Settings], truth: list[dict[str, Any]], tmp_path: Path
) -> None:
    weak = {"image+labs+notes": 0.86, "image+labs": 0.62}  # and image+labs is the pattern of the note-less two
    settings = make_settings(tiny_package(tmp_path / "tiny", spacing_mm=8.0, patterns=weak))
    run_id = _run(settings, truth)

    decisions = _decisions(settings, run_id)
    expected = _patterns(truth)
    without_notes = {uid for uid, pattern in expected.items() if pattern == "image+labs"}
    with Ledger.connect(settings.database) as ledger:
        quarantined = ledger.quarantined(run_id)
        summary = report_stage.run_summary(ledger, run_id)
    for uid in without_notes:
        assert decisions[uid] == ("skip", "image+labs", 0.62, ["pattern_below_floor:image+labs:0.620<0.700"])
        assert quarantined[uid] == ("harmonize", "pattern_below_floor", "pattern_below_floor:image+labs:0.620<0.700")
    assert {uid for uid, _, _ in summary.scores} == set(expected) - without_notes
    assert summary.quarantine == {"pattern_below_floor": 2}
    assert {p: (c.scored, c.quarantined, c.auroc) for p, c in summary.patterns.items()} == {
        "image+labs+notes": (2, 0, (0.86, 0.86)),
        "image+labs": (0, 2, (0.62, 0.62)),
    }
    page = (settings.run.report_dir / str(run_id) / "index.html").read_text()
    assert "<td>image+labs</td><td>2</td><td>0</td><td>2</td><td>0</td><td>0.620</td>" in page

    # A rerun of the harmonize stage decides nothing again (and needs no package read).
    with Pipeline.from_settings(settings) as pipeline:
        assert pipeline.run_stage("harmonize", run_id).total == 0
    assert _decisions(settings, run_id) == decisions
