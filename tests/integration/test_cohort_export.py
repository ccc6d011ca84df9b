"""Cohort export against the sandbox: a labelled, pseudonymized training table from the synthetic hospital.

A cohort whose EHR records the outcome (a lung cancer Condition within the year for positives, a follow-up
Encounter after it for everyone) is loaded; ``riskbridge cohort export`` runs the stages up to harmonize over part of
its index window with a ledger of the test's own, labels every patient from HAPI FHIR with the shipped chest CT
label spec and writes the table; the labels' resources read through FHIR Bulk Data ``$export`` and through batched
searches give the same table. Checked: every row of the cohort carries the truth's label under the HMAC
pseudonym of its patient and study, the table loads for training, no PHI string of the cohort (name, MRN, birth
date, accession number, PACS patient id, UIDs, FHIR ids) appears in the table, its manifest or the logs, nothing
was scored or written to FHIR, and the same command again resumes the same run and writes the same table.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from synthetic_site import cohort_anchor, phi_strings, synthetic_site_settings
from tiny_model import tiny_package
from typer.testing import CliRunner

from riskbridge import cli
from riskbridge.cohort import export_cohort, pseudonym
from riskbridge.dev.synth import generate, load, read_truth
from riskbridge.harmonize.features import load_default_feature_spec
from riskbridge.ledger import Ledger
from riskbridge.model.data import load_table
from riskbridge.pipeline import window_of_days
from riskbridge.settings import DatabaseSettings, ExportSettings, RunSettings, Settings

pytestmark = pytest.mark.integration

SECRET = "test-export-secret-0123456789"
ZONE = "America/New_York"  # the synthetic hospital's
ANCHOR = cohort_anchor("test_cohort_export")
DAYS = (ANCHOR - timedelta(days=7), ANCHOR - timedelta(days=2))  # part of the index window
WINDOW = f"{DAYS[0]}..{DAYS[1]}"


@pytest.fixture
def settings(
    sandbox: Settings, tmp_path: Path, scratch_database: Callable[[str], tuple[DatabaseSettings, str]]
) -> Settings:
    database = scratch_database("rb_export")[0]
    with Ledger.connect(database) as ledger:
        ledger.upgrade()
    package = tiny_package(tmp_path / "tiny", version=f"0.0.1-{uuid.uuid4().hex[:8]}", spacing_mm=8.0)
    run = RunSettings(report_dir=tmp_path / "reports", model_package=package, quarantine_alert_fraction=1.0)
    site = synthetic_site_settings(sandbox, database, tmp_path, run)
    # HAPI asks to poll its $export jobs every 120 s; a small job is done in a few.
    export = ExportSettings(pseudonym_secret=SECRET, bulk_max_poll_interval_s=1.0)
    return site.model_copy(update={"export": export})


def test_a_labelled_pseudonymized_table_from_the_synthetic_hospital(
    sandbox: Settings, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    cohort = tmp_path / "cohort"
    generate(cohort, patients=30, seed=2121, anchor=ANCHOR)
    load(cohort, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", sandbox.fhir.base_url)
    truth = read_truth(cohort)
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    out = tmp_path / "table"

    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(cli.app, ["cohort", "export", "--window", WINDOW, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "rows" in result.output and "left out:" in result.output

    rows = [json.loads(line) for line in (out / "table.jsonl").read_text().splitlines()]
    manifest = json.loads((out / "manifest.json").read_text())
    by_key = {row["key"]: row for row in rows}
    secret = SECRET.encode()
    mine = 0
    for record in truth:
        patient = record["identity"]["fhir_patient_id"]
        key = pseudonym(secret, patient, record["index_study"]["study_uid"]) if patient else None
        if key in by_key:
            mine += 1
            assert by_key[key]["label"] == record["outcome"]["label"], record["patient_key"]
            assert by_key[key]["volume"] == f"volumes/{key}.npy"
            assert record["quarantine"] is None, "a quarantined study made it into the table"
    assert mine >= 5, "the window holds index studies of the cohort"
    assert manifest["rows"] == len(rows) and manifest["source"]["label_spec"] == "lung_cancer_365d@1"
    start, end = window_of_days(*DAYS, ZONE)
    inside = [r for r in truth if start <= datetime.fromisoformat(r["index_study"]["study_time"]) < end]
    assert {r["quarantine"] for r in inside if r["quarantine"]} <= set(manifest["excluded"])

    text = (out / "table.jsonl").read_text() + (out / "manifest.json").read_text()
    logs = caplog.text + result.output
    for record in truth:
        for value in phi_strings(record):
            assert value not in text, f"PHI of {record['patient_key']} in the table"
            assert value not in logs, f"PHI of {record['patient_key']} in the log"

    table = load_table(out, load_default_feature_spec())
    assert len(table.keys) == len(rows) and int(table.labels.sum()) == manifest["positives"]

    with Ledger.connect(settings.database) as ledger:
        run = ledger.run_by_key(f"cli:export:{manifest['source']['window']}")
        assert run.kind == "export" and run.status == "success"
        with ledger.transaction() as cursor:
            cursor.execute("SELECT count(*) AS n FROM scores WHERE run_id = %s", (run.run_id,))
            assert cursor.fetchone()["n"] == 0, "an export scores nothing"
            cursor.execute("SELECT count(*) AS n FROM writebacks WHERE run_id = %s", (run.run_id,))
            assert cursor.fetchone()["n"] == 0, "an export writes nothing to FHIR"

    # The labels' resources through FHIR Bulk Data $export and through batched searches: the same table.
    tables = {}
    for source in ("bulk", "search"):
        export = settings.export.model_copy(update={"clinical_source": source})
        done = export_cohort(settings.model_copy(update={"export": export}), (start, end), tmp_path / source)
        assert done.run_id == run.run_id
        tables[source] = (tmp_path / source / "table.jsonl").read_text()
        written = json.loads((tmp_path / source / "manifest.json").read_text())
        assert written["source"]["label_resources_from"] == (
            "FHIR Bulk Data $export" if source == "bulk" else "FHIR searches"
        )
    assert tables["bulk"] == tables["search"] == (out / "table.jsonl").read_text()
    assert manifest["source"]["label_resources_from"] == "FHIR Bulk Data $export", "auto takes $export from HAPI"
    assert not (settings.staging_dir / "bulk-export").exists() or not any(
        (settings.staging_dir / "bulk-export").iterdir()
    )

    again = CliRunner().invoke(cli.app, ["cohort", "export", "--window", WINDOW, "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert f"export run {run.run_id}:" in again.output, "the same window resumes the same export run"
    assert [json.loads(line) for line in (out / "table.jsonl").read_text().splitlines()] == rows


def test_an_export_without_a_pseudonym_secret_is_refused(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    bare = settings.model_copy(update={"export": ExportSettings()})
    monkeypatch.setattr(cli, "_settings", lambda: bare)
    result = CliRunner().invoke(cli.app, ["cohort", "export", "--window", WINDOW, "--out", "unused"])
    assert result.exit_code == 2 and "pseudonym_secret" in result.output
