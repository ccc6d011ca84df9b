"""Monitoring against the sandbox: no drift for patients like the training table's, drift for a shifted cohort.

A small package is trained on a synthetic training table (the reference the monitor compares with); it scores a
cohort of the synthetic hospital drawn like that table (one ledger) and a cohort whose CRP, creatinine and glucose
run 1.8 to 4 times higher (another ledger, as a later month would be). ``riskbridge monitor`` over each: no alert
for the first, exit 1 naming the shifted labs for the second, with an HTML page and its plots, outcome performance
from the labels HAPI FHIR holds, and no PHI of either cohort on the page or in the log. The site's feature spec here
switches the minimum-data pattern floor off: the tiny package's validated AUROCs mean nothing at this size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml
from airflow.sdk.exceptions import AirflowFailException
from synthetic_site import phi_strings, synthetic_site_settings
from typer.testing import CliRunner

from riskbridge import cli
from riskbridge.airflow import dagkit
from riskbridge.dev.synth import generate, load, read_truth
from riskbridge.dev.synth.cohort import SITE_TIMEZONE
from riskbridge.dev.training_table import build_synthetic_table
from riskbridge.harmonize import features
from riskbridge.ledger import Ledger
from riskbridge.model.data import load_table
from riskbridge.model.preprocess import PreprocessConfig
from riskbridge.model.train import TrainOptions, train_package
from riskbridge.pipeline import Pipeline, window_of_days
from riskbridge.settings import DatabaseSettings, ExportSettings, MonitorSettings, RunSettings, Settings

pytestmark = pytest.mark.integration

WINDOW = "2024-01-01..2024-01-15"  # the synthetic hospital's index window
TINY = PreprocessConfig(spacing_mm=(12.0, 12.0, 12.0), size=(24, 16, 8), hu_window=(-1000.0, 400.0))
OPTIONS = TrainOptions(
    image_epochs=2, fusion_epochs=20, readout_epochs=3, dense_iterations=12, dense_batch_size=4, batch_size=16,
    embed_dim=8, hidden_dim=16, bootstrap=50,
)  # fmt: skip
SHIFT = {"crp": 4.0, "creatinine": 2.5, "glucose": 1.8}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(training table, package, the site's feature spec without the pattern floor)."""
    root = tmp_path_factory.mktemp("monitor-model")
    raw = yaml.safe_load(Path(features.__file__).with_name("data").joinpath("features_chest_ct.yaml").read_text())
    raw["minimum_data"]["pattern_auroc_floor"] = None
    spec_file = root / "features.yaml"
    spec_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    spec = features.load_feature_spec(spec_file)
    table = build_synthetic_table(root / "table", spec, patients=160, seed=7171, preprocess=TINY)
    package = root / "package"
    train_package(spec, load_table(table, spec), package, "hybrid", OPTIONS, folds=2, version="0.0.9-monitor")
    return table, package, spec_file


def _score(sandbox: Settings, settings: Settings, cohort: Path, key: str) -> int:
    load(cohort, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", sandbox.fhir.base_url)
    accessions = [r["index_study"]["accession"] for r in read_truth(cohort)]
    with Pipeline.from_settings(settings) as pipeline:
        run_id = pipeline.start_run("on_demand", key, accessions=accessions)
        results = pipeline.run_stages(run_id)
        assert sum(r.failed for r in results) == 0, results
        pipeline.finish_run(run_id)
        with pipeline.ledger.transaction() as cursor:
            cursor.execute("SELECT count(*) AS n FROM scores WHERE run_id = %s", (run_id,))
            return int(cursor.fetchone()["n"])


def _site(
    sandbox: Settings,
    scratch_database: Callable[[str], tuple[DatabaseSettings, str]],
    tmp_path: Path,
    trained: tuple[Path, Path, Path],
) -> Settings:
    table, package, spec_file = trained
    database = scratch_database("rb_monitor")[0]
    with Ledger.connect(database) as ledger:
        ledger.upgrade()
    run = RunSettings(report_dir=tmp_path / "reports", model_package=package, quarantine_alert_fraction=1.0)
    site = synthetic_site_settings(sandbox, database, tmp_path, run)
    return site.model_copy(
        update={
            "feature_spec": str(spec_file),
            "monitor": MonitorSettings(training_table=table, min_current=15),
            "export": ExportSettings(bulk_max_poll_interval_s=1.0),
        }
    )


@pytest.mark.parametrize("shifted", [False, True], ids=["like-training", "shifted"])
def test_monitor_finds_drift_in_a_shifted_cohort_and_none_in_an_unshifted_one(
    sandbox: Settings,
    scratch_database: Callable[[str], tuple[DatabaseSettings, str]],
    tmp_path: Path,
    trained: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: Any,
    shifted: bool,
) -> None:
    settings = _site(sandbox, scratch_database, tmp_path, trained)
    cohort = tmp_path / "cohort"
    generate(cohort, patients=30, seed=8181 if shifted else 8282, lab_shift=SHIFT if shifted else None)
    scored = _score(sandbox, settings, cohort, f"test:monitor:{shifted}")
    assert scored >= 20

    monkeypatch.setattr(cli, "_settings", lambda: settings)
    out = tmp_path / "page"
    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(cli.app, ["monitor", "--window", WINDOW, "--out", str(out)])
    output = result.output
    assert f"studies scored in the window: {scored}" in output, output
    assert "labelled in the outcome window: 0" not in output, "the outcomes recorded in FHIR label the patients"
    page = (out / "monitor.html").read_text()
    assert "crp" in page and (out / "missing_share.png").is_file() and (out / "calibration.png").is_file()
    assert any(out.glob("hist_*score*.png")), "the score distribution against the package's calibration split"
    if shifted:
        assert result.exit_code == 1, output
        alerts = output.split("ALERT: ", 1)[1]
        assert "value drift of creatinine" in alerts and "value drift of glucose" in alerts, output
        assert "value drift of hemoglobin" not in alerts and "value drift of sodium" not in alerts, output
        # CRP varies most between patients: four times higher in 16 patients is a large PSI, flagged, but it
        # alerts only when the KS test says it is beyond chance at this size.
        (crp,) = [line for line in output.splitlines() if line.split()[1:3] == ["value", "crp"]]
        assert crp.split()[0] in ("warn", "alert"), output
    else:
        assert result.exit_code == 0, output
        assert "ALERT" not in output and "alert " not in output

    # The weekly DAG's task over the same week: it fails without retries on the alerts, else returns the page.
    monkeypatch.setattr(dagkit, "task_settings", lambda: settings)
    start, end = window_of_days(date(2024, 1, 1), date(2024, 1, 15), SITE_TIMEZONE)
    context = {"params": {"start": "", "end": "", "table": ""}, "data_interval_start": start, "data_interval_end": end}
    if shifted:
        with pytest.raises(AirflowFailException, match="value drift of creatinine"):
            dagkit.run_monitor(context)
    else:
        assert Path(dagkit.run_monitor(context)).name == "monitor.html"

    text = page + caplog.text + output
    for record in read_truth(cohort):
        for value in phi_strings(record):
            assert value not in text, f"PHI of {record['patient_key']} in the monitor's page or log"
