"""The PACS probe (``riskbridge doctor --pacs-capabilities``) against the sandbox's Orthanc, checked against a
synthetic cohort's ground truth and against what :func:`~riskbridge.connectors.retrieval.resolve_transport` and
selection actually do there. The unit tests (tests/unit/test_pacs_probe.py) cover strict PACS on stand-in answers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from riskbridge.cli import app
from riskbridge.connectors import query
from riskbridge.connectors.retrieval import resolve_transport
from riskbridge.dev.synth import LoadReport, generate, read_manifest, read_truth
from riskbridge.dev.synth.load import load_dicom
from riskbridge.harmonize.series import RuleSet, load_default_rules
from riskbridge.pacs_probe import conclusions, probe
from riskbridge.settings import Settings

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture(scope="module")
def truth(sandbox: Settings, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Three patients loaded into Orthanc."""
    out = tmp_path_factory.mktemp("pacs-probe") / "cohort"
    generate(out, patients=3, seed=47)
    report = LoadReport(cohort_id=read_manifest(out)["cohort_id"])
    load_dicom(out, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", report)
    return read_truth(out)


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return load_default_rules()


def test_the_probe_of_a_cohort_study_matches_the_ground_truth(
    sandbox: Settings, truth: list[dict[str, Any]], rules: RuleSet
) -> None:
    study = truth[0]["index_study"]
    result = probe(sandbox.pacs, rules, study["study_uid"])
    assert (result.study.error, result.series.error, result.image.error) == (None, None, None)
    assert result.study_source == "given" and result.series_count == len(study["series"])
    assert {"StudyInstanceUID", "PatientID", "StudyDate"} <= set(result.study.answered)
    assert result.issuer_of_patient_id == bool(truth[0]["pacs"]["issuer"])

    instances = {series["uid"]: series["instances"] for series in study["series"]}
    assert result.image_find and result.image_series_uid in instances
    assert result.image.answers == instances[result.image_series_uid]
    assert result.instance_count_answered and result.instance_count_agrees is True

    # What the probe says riskbridge will do is what riskbridge does.
    auto = sandbox.pacs.model_copy(update={"transport": "auto"})
    assert result.auto_transport == resolve_transport(auto)
    completed = sum(bool(rules.needed_attributes(s)) for s in query.find_series(sandbox.pacs, study["study_uid"],
                                                                                 keywords=rules.keywords))  # fmt: skip
    assert result.completion_series == completed
    required = [k for k in result.sampling_keywords if k not in result.optional_keywords]
    assert required == [], conclusions(result)  # Orthanc answers every attribute the chest CT rules need


def test_without_a_study_the_probe_finds_a_ct_study(sandbox: Settings, truth: list[dict[str, Any]]) -> None:
    result = probe(sandbox.pacs, load_default_rules())
    assert result.study_uid is not None and "CT study" in result.study_source
    assert result.series.error is None and result.series_count > 0


def test_the_cli_prints_the_probe_as_tables_and_as_json(
    sandbox: Settings, truth: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    study_uid = truth[0]["index_study"]["study_uid"]
    monkeypatch.delenv("COLUMNS", raising=False)
    table = runner.invoke(app, ["doctor", "--pacs-capabilities", "--study", study_uid])
    print(table.stdout)  # the probe's report on Orthanc (pytest -s shows it; docs/retrieval.md quotes it)
    assert table.exit_code == 0, table.output
    assert study_uid in table.stdout and "what riskbridge will do" in table.stdout and "…" not in table.stdout
    document = json.loads(runner.invoke(app, ["doctor", "--pacs-capabilities", "--study", study_uid,
                                              "--format", "json"]).stdout)  # fmt: skip
    assert document["study_uid"] == study_uid
    assert {c["verdict"] for c in document["conclusions"]} <= {"ok", "note"}
