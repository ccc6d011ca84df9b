"""Coverage against the sandbox: a study that reaches the PACS after its night's run is scored by the next nightly
run, decided studies are skipped, a rerun over a scored window only queries, and overlapping runs never retrieve
the same series at once.

One story on a synthetic cohort and a ledger of the test's own:
1. the cohort is loaded except half of the index studies of the three days before the first night (held back, as if
   the modality or an outside import sent them late);
2. nightly run 1 (trigger 02:00 site time on the cohort's anchor day; its first window the 72 h before) scores what
   it finds;
3. the held-back studies are loaded; nightly run 2 (trigger 24 h later, through ``riskbridge run --nightly``)
   continues from run 1's trigger, looks back 72 h, finds the held-back studies as late arrivals and scores them,
   and records the studies run 1 scored as already done: no retrieval, no FHIR fetch, no score;
4. ``riskbridge coverage`` lists the covered interval and the uncovered ones around it;
5. a second nightly run at the same trigger (a new run key) covers only the lookback: every decided study skipped,
   nothing retrieved or written for them; with ``rescore`` the same window is scored again and writes nothing new.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from synthetic_site import cohort_anchor, synthetic_site_settings
from tiny_model import tiny_package
from typer.testing import CliRunner

from riskbridge import cli
from riskbridge.dev.synth import generate, load, read_truth
from riskbridge.dev.synth.cohort import SITE_TZ
from riskbridge.ledger import Ledger
from riskbridge.pipeline import Pipeline
from riskbridge.settings import DatabaseSettings, RunSettings, Settings
from riskbridge.stages import report as report_stage

pytestmark = pytest.mark.integration

ANCHOR = cohort_anchor("test_coverage_nightly")
FIRST_TRIGGER = datetime(ANCHOR.year, ANCHOR.month, ANCHOR.day, 2, 0, tzinfo=SITE_TZ)
HOURS = 72


def _rows(ledger: Ledger, sql: str, *values: Any) -> list[dict[str, Any]]:
    with ledger.transaction() as cursor:
        cursor.execute(sql, values)
        return list(cursor.fetchall())


def _utc(day: date, hour: int) -> str:
    """How ``riskbridge coverage --format json`` writes that hour of that day in UTC."""
    return f"{day.isoformat()}T{hour:02d}:00:00+00:00"


def _uids(ledger: Ledger, table: str, run_id: int) -> set[str]:
    return {r["study_uid"] for r in _rows(ledger, f"SELECT study_uid FROM {table} WHERE run_id = %s", run_id)}


@pytest.fixture
def settings(
    sandbox: Settings, tmp_path: Path, scratch_database: Callable[[str], tuple[DatabaseSettings, str]]
) -> Settings:
    """The synthetic site with a ledger, model version and RiskAssessment identifier system of this test's own."""
    database = scratch_database("rb_coverage")[0]
    with Ledger.connect(database) as ledger:
        ledger.upgrade()
    package = tiny_package(tmp_path / "tiny", version=f"0.0.1-{uuid.uuid4().hex[:8]}", spacing_mm=8.0)
    run = RunSettings(report_dir=tmp_path / "reports", model_package=package, quarantine_alert_fraction=1.0)
    writeback = sandbox.writeback.model_copy(
        update={"identifier_system": f"urn:riskbridge:test-coverage-{uuid.uuid4().hex[:12]}"}
    )
    airflow = sandbox.airflow.model_copy(update={"nightly_window_hours": HOURS, "nightly_lookback_hours": HOURS})
    site = synthetic_site_settings(sandbox, database, tmp_path, run)
    return site.model_copy(update={"writeback": writeback, "airflow": airflow})


def _remove_study(orthanc: str, study_uid: str) -> None:
    """Delete a study from Orthanc (its REST API: /tools/lookup, then DELETE /studies/{id})."""
    found = requests.post(f"{orthanc}/tools/lookup", data=study_uid, timeout=30)
    found.raise_for_status()
    for item in found.json():
        if item["Type"] == "Study":
            requests.delete(f"{orthanc}/studies/{item['ID']}", timeout=60).raise_for_status()


def _nightly(settings: Settings, key: str, trigger: datetime, rescore: bool = False) -> int:
    with Pipeline.from_settings(settings) as pipeline:
        run_id = pipeline.start_nightly_run(key, trigger, trigger - timedelta(hours=HOURS), rescore)
        results = pipeline.run_stages(run_id)
        assert sum(r.failed for r in results) == 0, results
        assert pipeline.finish(run_id) is None
    return run_id


def test_a_late_study_is_scored_by_the_next_night_and_decided_studies_are_skipped(
    sandbox: Settings, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cohort = tmp_path / "cohort"
    generate(cohort, patients=24, seed=1818, anchor=ANCHOR)
    truth = read_truth(cohort)
    first_window = (FIRST_TRIGGER - timedelta(hours=HOURS) + timedelta(hours=1), FIRST_TRIGGER - timedelta(hours=1))
    # The truth's clean studies first, then alternately on time and held back: each night gets one to score.
    recent = sorted(
        (r for r in truth if first_window[0] <= datetime.fromisoformat(r["index_time"]) < first_window[1]),
        key=lambda r: (r["quarantine"] is not None, r["patient_key"]),
    )
    held_back = {r["index_study"]["study_uid"] for r in recent[::2]}
    on_time = {r["index_study"]["study_uid"] for r in recent[1::2]}
    assert held_back and on_time, "the seed puts index studies into the three days before the first night"
    aside = tmp_path / "held-back"
    aside.mkdir()
    for uid in held_back:
        shutil.move(cohort / "dicom" / uid, aside / uid)
    orthanc = f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}"
    for uid in held_back:  # not in the PACS yet (an earlier run of this test on the same sandbox loaded them)
        _remove_study(orthanc, uid)
    load(cohort, orthanc, sandbox.fhir.base_url)

    first = _nightly(settings, "test:coverage:night-1", FIRST_TRIGGER)
    with Ledger.connect(settings.database) as ledger:
        assert _uids(ledger, "studies", first) & held_back == set()
        scored_first = _uids(ledger, "scores", first) & on_time
        assert scored_first, "run 1 scores some of the cohort's on-time studies"
        assert ledger.coverage()[0].interval.end == FIRST_TRIGGER

    for uid in held_back:  # the late studies reach the PACS
        shutil.move(aside / uid, cohort / "dicom" / uid)
    load(cohort, orthanc, sandbox.fhir.base_url)

    # Night 2 through the CLI, as a site without Airflow would run it.
    second_trigger = FIRST_TRIGGER + timedelta(hours=24)
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    night = CliRunner().invoke(
        cli.app, ["run", "--nightly", "--at", second_trigger.isoformat()], env={"COLUMNS": "200"}
    )
    assert night.exit_code == 0, night.output
    output = " ".join(night.output.split())
    assert "late arrivals: " in output and "gaps since" in output and ": none" in output
    with Ledger.connect(settings.database) as ledger:
        second = ledger.run_by_key(f"cli:nightly:{second_trigger.astimezone(UTC):%Y-%m-%dT%H:%MZ}").run_id
        run = ledger.run(second)
        assert run.watermark == FIRST_TRIGGER
        assert run.window == (FIRST_TRIGGER - timedelta(hours=HOURS), second_trigger)
        late = {
            r["study_uid"]
            for r in _rows(ledger, "SELECT study_uid FROM studies WHERE run_id = %s AND late_arrival", second)
        }
        assert held_back <= late
        done = {r["study_uid"]: r for r in _rows(ledger, "SELECT * FROM already_done WHERE run_id = %s", second)}
        assert scored_first <= set(done) and all(done[uid]["scored_run"] == first for uid in scored_first)
        # Decided studies are never worked on again: no identity match, retrieval, clinical fetch or score.
        for table in ("studies", "retrievals", "clinical_values", "scores"):
            assert _uids(ledger, table, second) & scored_first == set(), table
        written = {w.study_uid for w in ledger.writebacks(second) if w.status in ("created", "exists")}
        quarantined = ledger.quarantined(second)
        for record in truth:
            uid = record["index_study"]["study_uid"]
            if uid in held_back:  # a late arrival: scored and written, or quarantined with a reason like any study
                assert uid in written or uid in quarantined, record["patient_key"]
                if record["quarantine"]:
                    assert quarantined[uid][1] == record["quarantine"]
        assert written & held_back, "a late study was scored and written by the next night"
        summary = report_stage.run_summary(ledger, second)
        assert summary.coverage is not None
        assert summary.coverage.late_arrivals >= len(held_back) and summary.coverage.already_done >= len(scored_first)
        assert summary.coverage.gaps == ()
        assert summary.stage_counts["discover"]["skipped"] == summary.coverage.already_done

    # The same night again under a new key: only the lookback, every decided study skipped, nothing written.
    again = _nightly(settings, "test:coverage:night-2-again", second_trigger)
    with Ledger.connect(settings.database) as ledger:
        assert ledger.run(again).window == (second_trigger - timedelta(hours=HOURS), second_trigger)
        decided = scored_first | (written & held_back)
        skipped = {r["study_uid"] for r in _rows(ledger, "SELECT study_uid FROM already_done WHERE run_id = %s", again)}
        assert skipped & decided, "the decided studies inside the lookback are skipped"
        assert _uids(ledger, "studies", again) & decided == set()
        for table in ("retrievals", "scores"):
            assert _uids(ledger, table, again) & decided == set(), table
        assert not _rows(ledger, "SELECT 1 FROM writebacks WHERE run_id = %s", again)

    first_day, next_day = ANCHOR - timedelta(days=3), ANCHOR + timedelta(days=1)
    listing = ["coverage", "--from", first_day.isoformat(), "--to", ANCHOR.isoformat(), "--format", "json"]
    listed = CliRunner().invoke(cli.app, listing)
    assert listed.exit_code == 1, listed.output  # 00:00..02:00 site time of the first day: before the first window
    rows = json.loads(listed.output)
    assert [(row["status"], row["start"], row["end"]) for row in rows] == [
        ("uncovered", _utc(first_day, 5), _utc(first_day, 7)),
        ("covered", _utc(first_day, 7), _utc(next_day, 5)),
    ]
    assert rows[1]["runs"] == f"nightly {first}, nightly {second}, nightly {again}"
    second_day = first_day + timedelta(days=1)
    inside = CliRunner().invoke(cli.app, ["coverage", "--from", second_day.isoformat(), "--to", ANCHOR.isoformat()])
    assert inside.exit_code == 0, inside.output

    # --rescore does them again on purpose; the outbox keys exist, so nothing new is written.
    rescored = _nightly(settings, "test:coverage:night-2-rescore", second_trigger, rescore=True)
    with Ledger.connect(settings.database) as ledger:
        assert ledger.run(rescored).rescore
        assert skipped <= _uids(ledger, "scores", rescored)
        assert not _rows(ledger, "SELECT 1 FROM already_done WHERE run_id = %s", rescored)
        assert not _rows(ledger, "SELECT 1 FROM writebacks WHERE run_id = %s", rescored)


def test_a_series_claimed_by_one_run_waits_for_the_other(settings: Settings) -> None:
    series = ["1.2.826.0.1.3680043.99.1", "1.2.826.0.1.3680043.99.2"]
    entered = threading.Event()
    with Ledger.connect(settings.database) as holder, Ledger.connect(settings.database) as other:

        def claim() -> None:
            with other.claim_series(list(reversed(series))):
                entered.set()

        with holder.claim_series(series[:1]):
            thread = threading.Thread(target=claim)
            thread.start()
            assert not entered.wait(1.0), "a series claimed by another run must not be claimed again meanwhile"
        assert entered.wait(10.0), "the claim follows as soon as the other run is done with the series"
        thread.join()
        with holder.claim_series(series):  # released: claimed again at once
            pass
