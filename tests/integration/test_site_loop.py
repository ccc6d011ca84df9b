"""The site's own training loop on the sandbox, end to end: export -> train -> package -> shadow -> promote.

A training cohort of the synthetic hospital (outcomes recorded in its FHIR server) is exported by its list of
accession numbers (``riskbridge cohort export --accessions``); ``riskbridge train`` fits a package on the table (its
image encoder ``auto`` takes resnet: a site's table has no dense nodule masks); the package scores a held-out cohort
in shadow next to the shipped reference model (nothing of it reaches FHIR); ``riskbridge model promote`` makes it
the active model. The AUROC of both models on the held-out patients is printed; at this size it says little (see
``bench/site_loop.py`` for the loop at a size where it does). No PHI string of the training cohort appears in the
table, its manifest, the package's metrics or the logs.
"""

from __future__ import annotations

import json
import logging
import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from synthetic_site import phi_strings, synthetic_site_settings
from typer.testing import CliRunner

from riskbridge import cli
from riskbridge.dev.synth import generate, load, read_truth
from riskbridge.ledger import Ledger
from riskbridge.model.package import read_package_info, reference_package_path
from riskbridge.pipeline import Pipeline
from riskbridge.settings import DatabaseSettings, ExportSettings, RunSettings, Settings
from riskbridge.stages.shadow import auroc

pytestmark = pytest.mark.integration

SECRET = "test-loop-secret-0123456789"

WIDE = {"COLUMNS": "200"}


def _load(sandbox: Settings, directory: Path, patients: int, seed: int) -> list[dict[str, Any]]:
    generate(directory, patients=patients, seed=seed)
    load(directory, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", sandbox.fhir.base_url)
    return read_truth(directory)


def test_export_train_shadow_promote_on_the_sandbox(
    sandbox: Settings,
    tmp_path: Path,
    scratch_database: Callable[[str], tuple[DatabaseSettings, str]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: Any,
) -> None:
    training = _load(sandbox, tmp_path / "training", patients=40, seed=5252)
    database = scratch_database("rb_loop")[0]
    with Ledger.connect(database) as ledger:
        ledger.upgrade()
    run = RunSettings(report_dir=tmp_path / "reports", quarantine_alert_fraction=1.0)
    site = synthetic_site_settings(sandbox, database, tmp_path, run)
    settings = site.model_copy(update={"export": ExportSettings(pseudonym_secret=SECRET, bulk_max_poll_interval_s=1.0)})
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    runner = CliRunner()

    # 1. Export the training cohort by its accession numbers.
    listed = tmp_path / "accessions.txt"
    listed.write_text("\n".join(r["index_study"]["accession"] for r in training) + "\n", encoding="utf-8")
    table = tmp_path / "table"
    with caplog.at_level(logging.INFO):
        exported = runner.invoke(
            cli.app, ["cohort", "export", "--accessions", str(listed), "--out", str(table)], env=WIDE
        )
    assert exported.exit_code == 0, exported.output
    manifest = json.loads((table / "manifest.json").read_text())
    usable = [r for r in training if r["quarantine"] is None]
    assert manifest["source"]["accessions"] == len(training) and manifest["source"]["window"] is None
    assert manifest["rows"] >= len(usable) - 3, manifest  # a few lack follow-up or a readable label
    assert manifest["positives"] >= 4

    # 2. Train a package on it.
    tag = uuid.uuid4().hex[:8]
    package = tmp_path / "site-model"
    with caplog.at_level(logging.INFO):
        options = ["--folds", "2", "--epochs", "1", "--fusion-epochs", "15"]
        arguments = ["train", "--table", str(table), "--out", str(package), *options, "--version", f"0.2.0-{tag}"]
        trained = runner.invoke(cli.app, arguments, env=WIDE)
    assert trained.exit_code == 0, trained.output
    assert "image encoder: resnet" in trained.output, "an export has no dense masks: auto takes resnet"
    info = read_package_info(package)
    assert info.feature_spec == "chest_ct@1" and info.metrics["training"]["rows"] == manifest["rows"]
    assert not info.metrics["training"]["synthetic"], "a site export is not the synthetic training table"
    assert len(info.metrics["score_reference"]["probabilities"]) >= 5

    # No PHI of the training cohort in the table, its manifest, the package's metrics or any log.
    text = (table / "table.jsonl").read_text() + (table / "manifest.json").read_text()
    text += (package / "metrics.json").read_text()
    logs = caplog.text + exported.output + trained.output
    for record in training:
        for value in phi_strings(record):
            assert value not in text, f"PHI of {record['patient_key']} in the table or package"
            assert value not in logs, f"PHI of {record['patient_key']} in the log"

    # 3. The package in shadow next to the shipped reference model, on held-out patients.
    held_out = _load(sandbox, tmp_path / "held-out", patients=16, seed=5353)
    reference = reference_package_path()
    shadow_run = run.model_copy(
        update={
            "model_package": reference,
            "model_sha256": read_package_info(reference).sha256,
            "shadow_package": package,
            "shadow_sha256": info.sha256,
        }
    )
    scoring = settings.model_copy(update={"run": shadow_run})
    accessions = [r["index_study"]["accession"] for r in held_out]
    with Pipeline.from_settings(scoring) as pipeline:
        run_id = pipeline.start_run("on_demand", f"test:loop:{tag}", accessions=accessions)
        results = pipeline.run_stages(run_id)
        assert sum(r.failed for r in results) == 0, results
        pipeline.finish_run(run_id)
        with pipeline.ledger.transaction() as cursor:
            cursor.execute(
                """SELECT s.study_uid, s.probability AS active, h.probability AS shadow
                   FROM scores s JOIN shadow_scores h USING (run_id, study_uid) WHERE s.run_id = %s""",
                (run_id,),
            )
            paired = cursor.fetchall()
    truth = {r["index_study"]["study_uid"]: r["outcome"]["label"] for r in held_out}
    assert len(paired) >= 8, "the held-out patients were scored by both models"
    labels = [truth[row["study_uid"]] for row in paired]
    if 0 < sum(labels) < len(labels):
        active_auroc = auroc([row["active"] for row in paired], labels)
        shadow_auroc = auroc([row["shadow"] for row in paired], labels)
        print(f"held-out AUROC (n={len(labels)}): reference {active_auroc:.3f}, site model {shadow_auroc:.3f}")

    # 4. Promotion: the package becomes the active model, pinned in the config file.
    config = tmp_path / "riskbridge.toml"
    config.write_text(f'[run]\nshadow_package = "{package.as_posix()}"\n', encoding="utf-8")
    monkeypatch.setattr(cli, "_settings", lambda: scoring)
    promote = ["--config", str(config), "model", "promote", str(package), "--min-runs", "1"]
    promoted = runner.invoke(cli.app, [*promote, "--min-studies", str(len(paired))], env=WIDE)
    assert promoted.exit_code == 0, promoted.output
    assert tomllib.loads(config.read_text())["run"] == {
        "model_package": package.resolve().as_posix(),
        "model_sha256": info.sha256,
    }
