"""PHI retention against the sandbox PostgreSQL (``riskbridge db purge``): identifiers of runs without activity for
phi_days are cleared and nothing the ledger reads afterwards is (already-done skip, retry marks, coverage, scores,
the outbox); undecided studies lose names and birth dates after undecided_days and stay matchable; a purged run is
never resumed; a dry run counts the same rows and changes nothing; the command prints counts, never a value.

Each test gets a database of its own (created and dropped here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from riskbridge.cli import app
from riskbridge.harmonize.features import FeatureVector
from riskbridge.harmonize.series import SelectionResult
from riskbridge.harmonize.windows import Disposition, WindowReason, WindowSelection
from riskbridge.ledger import Ledger, LedgerError
from riskbridge.records import PacsPatient, RetrievedSeries, SeriesDecision, StudyRef
from riskbridge.retention import PHI_COLUMNS, purge_phi
from riskbridge.settings import DatabaseSettings, RetentionSettings
from riskbridge.stages import clinical as clinical_stage
from riskbridge.stages import discover as discover_stage
from riskbridge.stages import harmonize as harmonize_stage
from riskbridge.stages import match as match_stage
from riskbridge.stages import report as report_stage
from riskbridge.stages import retrieve as retrieve_stage
from riskbridge.stages import score as score_stage
from riskbridge.stages import select as select_stage
from riskbridge.stages import write_back as write_back_stage
from riskbridge.stages.clinical import ClinicalResult
from riskbridge.stages.select import StudySelection

pytestmark = pytest.mark.integration

WINDOW = (datetime(2024, 1, 1, 5, tzinfo=UTC), datetime(2024, 1, 15, 5, tzinfo=UTC))
T = datetime(2024, 1, 10, 14, 30, tzinfo=UTC)
MODEL = ("fusion", "1.0", "ab" * 32)
NAME, BIRTH, MRN, OTHER_MRN, ACCESSION = "DOE^JANE", "19511105", "MRN-4711", "OTHER-0815", "ACC-99"
RETENTION = RetentionSettings()  # phi_days 30, undecided_days 7


@pytest.fixture
def database(scratch_database: Callable[[str], tuple[DatabaseSettings, str]]) -> DatabaseSettings:
    """A fresh, empty database in the sandbox cluster, dropped afterwards."""
    return scratch_database("rb_retention")[0]


@pytest.fixture
def ledger(database: DatabaseSettings) -> Iterator[Ledger]:
    with Ledger.connect(database) as opened:
        opened.upgrade()
        yield opened


def _study(uid: str, suffix: str = "") -> StudyRef:
    patient = PacsPatient(MRN + suffix, "MAIN_HOSP", ((OTHER_MRN + suffix, "OTHER"),), NAME, BIRTH, "F")
    return StudyRef(uid, ACCESSION + suffix, patient, datetime(2024, 1, 10, 9, 30), "-0500", ("CT",), "DOE CHEST", 120)


def _score(ledger: Ledger, run_id: int, uid: str, patient: str, tmp_path: Path) -> str:
    """Take a matched study through every stage to a written-back score; its RiskAssessment key."""
    series = f"{uid}.1"
    decision = SeriesDecision(uid, series, True, "chest_ct", "thinnest", 1, {"SliceThickness": 1.0})
    select_stage.record(ledger, run_id, StudySelection(SelectionResult(uid, "chest_ct@1", (decision,), "chosen"), {}))
    retrieve_stage.record(
        ledger, run_id, RetrievedSeries(uid, series, tmp_path, 120, 120, "c-get", 1.0), T, "AcquisitionDateTime"
    )
    vector = FeatureVector("chest_ct@1", ("crp",), (12.0,), (True,))
    disposition = Disposition("obs-1", WindowReason.USED, "final", T - timedelta(hours=3))
    labs = {"crp": WindowSelection("crp", T, 12.0, T - timedelta(hours=3), ("obs-1",), (disposition,))}
    clinical_stage.record(ledger, run_id, uid, ClinicalResult(patient, vector, labs, []), {"crp": "mg/L"})
    harmonize_stage.record(ledger, run_id, uid, True, [])
    key = write_back_stage.assessment_key(MODEL[1], patient, uid)
    score_stage.record(ledger, run_id, uid, patient, MODEL, 0.4, 0.4, "high", {}, key, T)
    ledger.enqueue_writebacks(run_id)
    ledger.mark_writeback(key, "created", "ra-1")
    return key


def _age(ledger: Ledger, run_id: int, days: float) -> None:
    """Move a run's start, finish and stage calls ``days`` into the past."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """UPDATE runs SET started = started - make_interval(secs => %(s)s),
                   finished = finished - make_interval(secs => %(s)s) WHERE run_id = %(run)s""",
            {"s": days * 86400, "run": run_id},
        )
        cursor.execute(
            "UPDATE stage_timings SET updated = updated - make_interval(secs => %(s)s) WHERE run_id = %(run)s",
            {"s": days * 86400, "run": run_id},
        )


def _rows(ledger: Ledger, sql: str, *args: Any) -> list[dict[str, Any]]:
    with ledger.transaction() as cursor:
        cursor.execute(sql, args)
        return [dict(row) for row in cursor.fetchall()]


def _phi_left(ledger: Ledger, run_id: int) -> dict[str, dict[str, Any]]:
    columns = ", ".join(c.column for c in PHI_COLUMNS if c.table == "studies")
    rows = _rows(ledger, f"SELECT study_uid, {columns} FROM studies WHERE run_id = %s", run_id)
    return {row.pop("study_uid"): row for row in rows}


def _snapshot(ledger: Ledger) -> dict[str, Any]:
    """What the audit trail, the already-done skip and the coverage read: must not change with a purge."""
    tables = ("identity_decisions", "selections", "series_decisions", "retrievals", "clinical_values", "features",
              "scores", "writebacks", "quarantine", "already_done", "coverage", "stage_marks")  # fmt: skip
    found: dict[str, Any] = {t: _rows(ledger, f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables}
    found["studies"] = _rows(
        ledger, "SELECT run_id, study_uid, study_datetime, earlier_run, late_arrival FROM studies ORDER BY 1, 2"
    )
    return found


def test_purge_clears_identifiers_of_quiet_runs_and_keeps_what_the_ledger_reads(ledger: Ledger, tmp_path: Path) -> None:
    old = ledger.start_run("backfill", "cli:backfill:old", WINDOW)
    discover_stage.add_studies(ledger, old, [_study("1.2.8.1"), _study("1.2.8.2", "b"), _study("1.2.8.3", "c")])
    match_stage.record(ledger, old, "1.2.8.1", "matched", "pat-1", ["identifier_match"])
    match_stage.record(ledger, old, "1.2.8.2", "conflict", None, ["identifier_multiple_patients"], ["a", "b"],
                       quarantine_reason="identity_conflict")  # fmt: skip
    # 1.2.8.3 stays undecided: its run failed in match.
    key = _score(ledger, old, "1.2.8.1", "pat-1", tmp_path)
    ledger.record_timing(old, "match", "all", 1.0, {"done": 1})
    ledger.finish_run(old, "success")
    on_demand = ledger.start_run("on_demand", "cli:on_demand:old", accessions=[ACCESSION], patient_ids=[MRN])
    ledger.finish_run(on_demand, "success")
    recent = ledger.start_run("backfill", "cli:backfill:recent", (WINDOW[0], WINDOW[1] + timedelta(days=1)))
    discover_stage.add_studies(ledger, recent, [_study("1.2.8.9", "r")])
    ledger.finish_run(recent, "failed")
    _age(ledger, old, 35)
    _age(ledger, on_demand, 31)
    _age(ledger, recent, 29)  # quiet, but not for phi_days; its study is undecided, so undecided_days applies
    before = _snapshot(ledger)
    coverage = ledger.coverage()

    dry = purge_phi(ledger, RETENTION, dry_run=True)
    assert (dry.identifiers, dry.undecided, dry.runs, dry.dry_run) == (3, 1, 2, True)
    assert _phi_left(ledger, old)["1.2.8.3"]["patient_name"] == NAME  # a dry run changes nothing
    assert ledger.run(old).phi_purged is None

    done = purge_phi(ledger, RETENTION)
    assert (done.identifiers, done.undecided, done.runs, done.dry_run) == (3, 1, 2, False)
    assert done.per_table() == {"studies": 4, "runs": 2}
    cleared: dict[str, Any] = {"patient_name": None, "patient_birth_date": None, "patient_id": None,
                               "patient_other_ids": [], "accession": None, "patient_sex": None,
                               "description": ""}  # fmt: skip
    assert _phi_left(ledger, old) == {uid: cleared for uid in ("1.2.8.1", "1.2.8.2", "1.2.8.3")}
    [recent_row] = _phi_left(ledger, recent).values()
    assert (recent_row["patient_name"], recent_row["patient_birth_date"]) == (None, None)
    assert (recent_row["patient_id"], recent_row["accession"]) == (MRN + "r", ACCESSION + "r")  # until phi_days
    assert ledger.run(on_demand).accessions == () and ledger.run(on_demand).patient_ids == ()
    assert ledger.run(old).phi_purged is not None and ledger.run(recent).phi_purged is None
    assert _snapshot(ledger) == before and ledger.coverage() == coverage

    again = purge_phi(ledger, RETENTION)
    assert (again.identifiers, again.undecided, again.runs) == (0, 0, 0)

    # A later run still skips the study scored and written back, and marks the quarantined one as retried.
    later = ledger.start_run("backfill", "cli:backfill:later", (WINDOW[0], WINDOW[1] + timedelta(days=2)))
    with ledger.transaction() as cursor:
        priors = discover_stage.priors(cursor, later, ["1.2.8.1", "1.2.8.2"], MODEL[:2])
    assert priors["1.2.8.1"] == discover_stage.Prior(old, key, old)
    assert priors["1.2.8.2"].earlier_run == old and priors["1.2.8.2"].scored_run is None
    summary = report_stage.run_summary(ledger, old, (0.1, 0.3))
    assert summary.scores == [("1.2.8.1", 0.4, "high")] and summary.quarantine == {"identity_conflict": 1}

    # A purged run is closed: neither its run key nor a stage resumes it.
    with pytest.raises(LedgerError, match="purged"):
        ledger.start_run("backfill", "cli:backfill:old", WINDOW)
    with pytest.raises(LedgerError, match="purged"):
        ledger.resume_run(old)
    assert ledger.resume_run(recent) is True  # not purged: resumed, and its undecided study can still be matched
    [pending] = match_stage.pending(ledger, recent)
    assert pending.patient.patient_id == MRN + "r" and pending.patient.name == "" and pending.patient.birth_date is None


def test_a_run_still_marked_running_is_judged_by_its_last_stage_call(ledger: Ledger) -> None:
    run_id = ledger.start_run("backfill", "cli:backfill:abandoned", WINDOW)
    discover_stage.add_studies(ledger, run_id, [_study("1.2.9.1")])
    ledger.record_timing(run_id, "discover", "all", 1.0, {"done": 1})
    _age(ledger, run_id, 40)
    ledger.record_timing(run_id, "match", "all", 1.0, {})  # a stage call five days ago keeps it
    with ledger.transaction() as cursor:
        cursor.execute("UPDATE stage_timings SET updated = now() - interval '5 days' WHERE stage = 'match'")
    counts = purge_phi(ledger, RETENTION)
    assert (counts.identifiers, counts.undecided, counts.runs) == (0, 0, 0)
    with ledger.transaction() as cursor:
        cursor.execute("UPDATE stage_timings SET updated = now() - interval '31 days'")
    counts = purge_phi(ledger, RETENTION)
    assert (counts.identifiers, counts.undecided, counts.runs) == (1, 0, 1)
    assert ledger.run(run_id).status == "running" and ledger.run(run_id).phi_purged is not None


def test_db_purge_prints_counts_per_table_and_never_a_value(
    ledger: Ledger, database: DatabaseSettings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    old = ledger.start_run("on_demand", "cli:on_demand:printed", accessions=[ACCESSION], patient_ids=[MRN])
    discover_stage.add_studies(ledger, old, [_study("1.2.10.1")])
    ledger.finish_run(old, "failed")
    _age(ledger, old, 40)
    monkeypatch.chdir(tmp_path)  # the pseudonym key file the command makes goes here
    monkeypatch.setenv("RISKBRIDGE_DATABASE__DSN", database.dsn.get_secret_value())
    runner = CliRunner()

    dry = runner.invoke(app, ["db", "purge", "--dry-run"], env={"COLUMNS": "200"})
    assert dry.exit_code == 0, dry.output
    assert "dry run" in dry.output and "studies: 1 row(s)" in dry.output and "runs: 1 row(s)" in dry.output
    assert _phi_left(ledger, old)["1.2.10.1"]["patient_id"] == MRN

    done = runner.invoke(app, ["db", "purge"], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert "studies: 1 row(s)" in done.output and "runs: 1 row(s)" in done.output
    for value in (NAME, BIRTH, MRN, OTHER_MRN, ACCESSION, "DOE", "1.2.10.1"):
        assert value not in dry.output + done.output
    assert _phi_left(ledger, old)["1.2.10.1"]["patient_id"] is None
