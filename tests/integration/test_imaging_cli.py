"""``riskbridge imaging`` end to end against the sandbox Orthanc: list studies, show selection decisions, and
retrieve each study's chosen series verified into staging, checked against the synthetic cohort's ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from riskbridge.cli import app
from riskbridge.dev.synth import EdgeCaseRates, LoadReport, generate, read_manifest, read_truth
from riskbridge.dev.synth.load import load_dicom
from riskbridge.settings import Settings

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture(scope="module")
def truth(sandbox: Settings, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Five patients, one of them without a usable series, loaded into Orthanc."""
    out = tmp_path_factory.mktemp("imaging-cli") / "cohort"
    generate(out, patients=5, seed=31, rates=EdgeCaseRates(no_usable_series=0.2))
    report = LoadReport(cohort_id=read_manifest(out)["cohort_id"])
    load_dicom(out, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", report)
    return read_truth(out)


def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps table cells to the terminal width


def test_select_shows_the_chosen_series_and_every_rejection(
    truth: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _wide(monkeypatch)
    record = next(r for r in truth if r["correct_series_uid"] is not None)
    study = record["index_study"]
    result = runner.invoke(app, ["imaging", "select", study["study_uid"]])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    chosen = [line for line in lines if "chosen" in line and "runner" not in line]
    assert len(chosen) == 1 and record["correct_series_uid"] in chosen[0]
    assert "not_localizer" in result.output and "slice_thickness" in result.output


def test_retrieve_stages_the_ground_truth_series_and_reports_skips(
    truth: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _wide(monkeypatch)
    monkeypatch.setenv("RISKBRIDGE_STAGING_DIR", str(tmp_path / "staging"))
    studies = [record["index_study"]["study_uid"] for record in truth]
    result = runner.invoke(app, ["imaging", "retrieve", *studies, "--transport", "c-get", "--workers", "1"])
    assert result.exit_code == 0, result.output
    staged = {path.name for path in (tmp_path / "staging").glob("*/*") if path.is_dir()}
    assert staged == {record["correct_series_uid"] for record in truth if record["correct_series_uid"]}
    assert result.output.count("staged") == len(staged)
    assert "skipped" in result.output  # the patient without a usable series


def test_a_bad_rule_file_is_one_line_naming_it(tmp_path: Path, truth: list[dict[str, Any]]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("name: broken\nrules: [ {attribute: SliceThickness, min: thin} ]\n")
    result = runner.invoke(app, ["imaging", "select", truth[0]["index_study"]["study_uid"], "--rules", str(rules)])
    assert result.exit_code == 2
    assert str(rules) in result.output and "Traceback" not in result.output


def test_studies_lists_the_cohort_in_its_date_range(
    truth: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _wide(monkeypatch)
    days = sorted(record["index_study"]["acquisition_time"][:10] for record in truth)
    result = runner.invoke(app, ["imaging", "studies", "--from", days[0], "--to", days[-1]])
    assert result.exit_code == 0, result.output
    for record in truth:
        assert record["index_study"]["study_uid"] in result.output
    assert runner.invoke(app, ["imaging", "studies", "--from", "yesterday"]).exit_code == 2
