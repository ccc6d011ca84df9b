"""The ledger against the sandbox PostgreSQL: migrations applied once and guarded, runs resumed by key, every stage's
rows written once however often it is recorded, quarantine with reasons, the write-back outbox, the run summary.

Each test gets a database of its own (created and dropped here), so runs and migrations never meet another test's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from riskbridge.harmonize.features import FeatureVector
from riskbridge.harmonize.series import SelectionResult
from riskbridge.harmonize.windows import Disposition, WindowReason, WindowSelection
from riskbridge.ledger import Ledger, LedgerError, Migration, load_migrations
from riskbridge.records import PacsPatient, RetrievedSeries, SeriesDecision, StudyRef
from riskbridge.settings import DatabaseSettings
from riskbridge.stages import clinical as clinical_stage
from riskbridge.stages import discover as discover_stage
from riskbridge.stages import harmonize as harmonize_stage
from riskbridge.stages import match as match_stage
from riskbridge.stages import report as report_stage
from riskbridge.stages import retrieve as retrieve_stage
from riskbridge.stages import score as score_stage
from riskbridge.stages import select as select_stage
from riskbridge.stages import write_back as write_back_stage
from riskbridge.stages.clinical import ClinicalResult, NoteDisposition
from riskbridge.stages.select import StudySelection

pytestmark = pytest.mark.integration

WINDOW = (datetime(2024, 1, 1, 5, tzinfo=UTC), datetime(2024, 1, 15, 5, tzinfo=UTC))
T = datetime(2024, 1, 10, 14, 30, tzinfo=UTC)
KEY = write_back_stage.assessment_key("1.0", "pat-1", "1.2.3.1")


@pytest.fixture
def database(scratch_database: Callable[[str], tuple[DatabaseSettings, str]]) -> DatabaseSettings:
    """A fresh, empty database in the sandbox cluster, dropped afterwards."""
    return scratch_database("rb_ledger")[0]


@pytest.fixture
def ledger(database: DatabaseSettings) -> Iterator[Ledger]:
    with Ledger.connect(database) as opened:
        opened.upgrade()
        yield opened


def _count(ledger: Ledger, table: str) -> int:
    with ledger.connection, ledger.connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table}")
        row = cursor.fetchone()
    assert row is not None
    return int(row[0])


def test_upgrade_applies_each_migration_once_and_check_schema_sees_it(database: DatabaseSettings) -> None:
    with Ledger.connect(database) as ledger:
        with pytest.raises(LedgerError, match="riskbridge db upgrade"):
            ledger.check_schema()
        applied = ledger.upgrade()
        assert [m.version for m in applied] == [m.version for m in load_migrations()]
        assert ledger.upgrade() == []
        ledger.check_schema()
        assert set(ledger.applied_migrations()) == {m.version for m in load_migrations()}


def test_concurrent_upgrades_apply_the_schema_once(database: DatabaseSettings) -> None:
    results: list[list[Migration]] = []
    errors: list[BaseException] = []

    def upgrade() -> None:
        try:
            with Ledger.connect(database) as ledger:
                results.append(ledger.upgrade())
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=upgrade) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(len(applied) for applied in results) == [0, 0, len(load_migrations())]


def test_an_edited_applied_migration_and_an_unknown_one_are_refused(ledger: Ledger) -> None:
    first, *rest = load_migrations()
    with pytest.raises(LedgerError, match="changed after it was applied"):
        ledger.upgrade([Migration(first.version, first.name, first.sql + "\n-- edited\n"), *rest])
    newer = Migration(len(load_migrations()) + 1, "from_the_future", "CREATE TABLE future_table (id integer)")
    ledger.upgrade([*load_migrations(), newer])
    with pytest.raises(LedgerError, match="does not know"):
        ledger.upgrade()


def test_a_run_key_resumes_its_run_and_refuses_other_parameters(ledger: Ledger) -> None:
    run_id = ledger.start_run("nightly", "cli:test", WINDOW)
    assert ledger.start_run("nightly", "cli:test", WINDOW) == run_id
    assert ledger.start_run("on_demand", "cli:other", accessions=["A1"]) != run_id
    with pytest.raises(LedgerError, match="another kind"):
        ledger.start_run("nightly", "cli:test", (WINDOW[0], WINDOW[1] + timedelta(days=1)))
    with pytest.raises(LedgerError, match="aware"):
        ledger.start_run("nightly", "cli:naive", (datetime(2024, 1, 1), datetime(2024, 1, 2)))
    with pytest.raises(LedgerError, match="kind"):
        ledger.start_run("weekly", "cli:weekly")
    ledger.finish_run(run_id, "success")
    assert ledger.run(run_id).status == "success" and ledger.run(run_id).finished is not None
    assert _count(ledger, "runs") == 2


def test_a_failed_run_whose_stages_run_again_is_running_until_it_finishes(ledger: Ledger) -> None:
    run_id = ledger.start_run("nightly", "cli:resume", WINDOW)
    ledger.finish_run(run_id, "failed")
    assert ledger.run(run_id).status == "failed"
    assert ledger.resume_run(run_id) is True
    assert ledger.run(run_id).status == "running" and ledger.run(run_id).finished is None
    assert ledger.resume_run(run_id) is False  # already running
    ledger.finish_run(run_id, "success")
    assert ledger.resume_run(run_id) is False  # a finished run is not reopened (a rerun of write-back, say)
    assert ledger.run(run_id).status == "success"


def _study(uid: str, patient_id: str) -> StudyRef:
    patient = PacsPatient(patient_id, "SYNTH_HOSP", (("X9", None),), "SYNTH-ECHO^THREE", "19511105", "M")
    return StudyRef(uid, f"ACC{uid[-1]}", patient, datetime(2024, 1, 10, 9, 30), "-0500", ("CT",), "chest", 120)


def _selection(study_uid: str, chosen: bool) -> SelectionResult:
    decisions = [SeriesDecision(study_uid, f"{study_uid}.9", False, "not_localizer", "localizer", None, {"x": 1})]
    if chosen:
        decisions.insert(0, SeriesDecision(study_uid, f"{study_uid}.1", True, "chest_ct", "thinnest", 1, {}))
    return SelectionResult(study_uid, "chest_ct@1", tuple(decisions), "chosen" if chosen else "no usable series")


def _clinical(patient_id: str) -> ClinicalResult:
    vector = FeatureVector("chest_ct@1", ("crp", "copd"), (12.0, 0.0), (True, False))
    dispositions = (
        Disposition("obs-1", WindowReason.USED, "final", T - timedelta(hours=3)),
        Disposition("obs-2", WindowReason.ENTERED_IN_ERROR, "entered-in-error", T - timedelta(hours=1)),
    )
    labs = {"crp": WindowSelection("crp", T, 12.0, T - timedelta(hours=3), ("obs-1",), dispositions)}
    notes = [NoteDisposition("DocumentReference", "doc-1", "status")]
    return ClinicalResult(patient_id, vector, labs, notes)


def test_every_stage_row_is_written_once_and_the_pending_lists_shrink(ledger: Ledger, tmp_path: Path) -> None:
    run_id = ledger.start_run("nightly", "cli:flow", WINDOW)
    studies = [_study("1.2.3.1", "P1"), _study("1.2.3.2", "P2"), _study("1.2.3.3", "P3")]
    assert discover_stage.add_studies(ledger, run_id, studies) == 3
    assert discover_stage.add_studies(ledger, run_id, studies) == 0
    pending = match_stage.pending(ledger, run_id)
    assert [s.patient for s in pending] == [s.patient for s in studies]  # matching gets the PACS patient back
    assert pending[0].study_datetime == studies[0].study_datetime
    for _ in range(2):
        match_stage.record(ledger, run_id, "1.2.3.1", "matched", "pat-1", ["identifier_match"])
        match_stage.record(ledger, run_id, "1.2.3.2", "matched", "pat-2", ["identifier_match"])
        match_stage.record(ledger, run_id, "1.2.3.3", "conflict", None, ["identifier_multiple_patients"], ["a", "b"],
                               quarantine_reason="identity_conflict")  # fmt: skip
    assert match_stage.pending(ledger, run_id) == []
    with ledger.connection, ledger.connection.cursor() as cursor:  # PHI gone once matching is done
        cursor.execute("SELECT count(*) FROM studies WHERE patient_name IS NOT NULL OR patient_birth_date IS NOT NULL")
        assert cursor.fetchone() == (0,)

    assert select_stage.pending(ledger, run_id) == ["1.2.3.1", "1.2.3.2"]
    for _ in range(2):
        select_stage.record(ledger, run_id, StudySelection(_selection("1.2.3.1", True), {"1.2.3.1.1": 120}))
        select_stage.record(ledger, run_id, StudySelection(_selection("1.2.3.2", False)))
    assert select_stage.pending(ledger, run_id) == []
    assert _count(ledger, "series_decisions") == 3
    assert {uid: q[1] for uid, q in ledger.quarantined(run_id).items()} == {
        "1.2.3.2": "no_usable_series",
        "1.2.3.3": "identity_conflict",
    }

    [task] = retrieve_stage.pending(ledger, run_id)
    assert (task.study_uid, task.series_uid, task.expected) == ("1.2.3.1", "1.2.3.1.1", 120)
    retrieve_stage.record_failure(ledger, run_id, task.study_uid, task.series_uid, "incomplete", "118 of 120", 2)
    assert ledger.quarantined(run_id)["1.2.3.1"][:2] == ("retrieve", "incomplete")
    assert [t.series_uid for t in retrieve_stage.pending(ledger, run_id)] == ["1.2.3.1.1"]  # a rerun tries again
    staged = RetrievedSeries("1.2.3.1", "1.2.3.1.1", tmp_path, 120, 120, "c-get", 1.5, 1000)
    for _ in range(2):
        retrieve_stage.record(ledger, run_id, staged, T, "AcquisitionDateTime")
    assert retrieve_stage.pending(ledger, run_id) == []
    assert "1.2.3.1" not in ledger.quarantined(run_id)

    [clinical] = clinical_stage.pending(ledger, run_id)
    assert (clinical.fhir_patient_id, clinical.index_time) == ("pat-1", T)
    assert clinical_stage.record(ledger, run_id, "1.2.3.1", _clinical("pat-1"), {"crp": "mg/L"})
    assert not clinical_stage.record(ledger, run_id, "1.2.3.1", _clinical("pat-1"), {"crp": "mg/L"})
    assert clinical_stage.pending(ledger, run_id) == []
    with ledger.connection, ledger.connection.cursor() as cursor:
        cursor.execute("SELECT observation_id, code, value, unit FROM clinical_values ORDER BY observation_id")
        assert cursor.fetchall() == [("obs-1", "used", 12.0, "mg/L"), ("obs-2", "entered_in_error", None, None)]
    assert _count(ledger, "note_dispositions") == 1

    [vector] = harmonize_stage.pending(ledger, run_id)
    assert vector.vector.values == (12.0, 0.0) and vector.vector.observed == (True, False)
    harmonize_stage.record(ledger, run_id, "1.2.3.1", True, [])
    harmonize_stage.record(ledger, run_id, "1.2.3.1", False, ["no_image"])  # decided already: ignored
    [to_score] = score_stage.pending(ledger, run_id)
    assert to_score.series_dir == tmp_path and to_score.index_time == T
    for _ in range(2):
        score_stage.record(ledger, run_id, "1.2.3.1", "pat-1", ("fusion", "1.0", "ab" * 32), 0.42, 0.40, "high",
                            {"image": 0.5, "labs": 0.3, "notes": 0.2}, KEY, T)  # fmt: skip
    assert score_stage.pending(ledger, run_id) == []

    assert ledger.enqueue_writebacks(run_id) == 1
    assert ledger.enqueue_writebacks(run_id) == 0
    [open_score] = write_back_stage.open_scores(ledger, run_id)
    assert (open_score.study_uid, open_score.occurrence, open_score.observation_ids) == ("1.2.3.1", T, ("obs-1",))
    ledger.mark_writeback(KEY, "failed", error="HAPI-0000: refused")
    assert [w.status for w in ledger.writebacks(run_id)] == ["failed"]
    ledger.mark_writeback(KEY, "created", "ra-77")
    ledger.mark_writeback(KEY, "exists", "ra-78")  # already final: not overwritten
    [writeback] = ledger.writebacks(run_id)
    assert (writeback.status, writeback.attempts, writeback.fhir_id) == ("created", 2, "ra-77")
    assert write_back_stage.open_scores(ledger, run_id) == []

    ledger.record_timing(run_id, "retrieve", "chunk-a", 2.0, {"done": 1})
    ledger.record_timing(run_id, "retrieve", "chunk-a", 0.5, {})
    ledger.set_model(run_id, "fusion 1.0 abababababab")
    ledger.finish_run(run_id)
    summary = report_stage.run_summary(ledger, run_id, (0.1, 0.3))
    assert summary.stage_counts["discover"]["done"] == 3
    assert summary.stage_counts["match"] == {"done": 2, "skipped": 0, "quarantined": 1, "failed": 0}
    assert summary.stage_counts["select"] == {"done": 1, "skipped": 0, "quarantined": 1, "failed": 0}
    assert summary.stage_counts["write_back"]["done"] == 1
    assert summary.quarantine == {"identity_conflict": 1, "no_usable_series": 1}
    assert summary.scores == [("1.2.3.1", 0.42, "high")]
    assert summary.writebacks == {"created": 1}
    assert summary.stage_seconds == {"retrieve": 2.5}
    assert summary.model == "fusion 1.0 abababababab" and summary.status == "success"


def test_a_minimum_data_skip_is_quarantined_with_its_reason_code(ledger: Ledger, tmp_path: Path) -> None:
    run_id = ledger.start_run("backfill", "cli:skip", WINDOW)
    discover_stage.add_studies(ledger, run_id, [_study("1.2.4.1", "P1")])
    match_stage.record(ledger, run_id, "1.2.4.1", "matched", "pat-1", [])
    select_stage.record(ledger, run_id, StudySelection(_selection("1.2.4.1", True), {"1.2.4.1.1": 10}))
    retrieve_stage.record(
        ledger, run_id, RetrievedSeries("1.2.4.1", "1.2.4.1.1", tmp_path, 10, 10, "c-get", 1.0), T, "x"
    )
    clinical_stage.record(ledger, run_id, "1.2.4.1", _clinical("pat-1"), {})
    harmonize_stage.record(ledger, run_id, "1.2.4.1", False, ["missing_required:crp", "too_much_missing:0.60>0.50"])
    assert ledger.quarantined(run_id)["1.2.4.1"] == (
        "harmonize",
        "missing_required",
        "missing_required:crp; too_much_missing:0.60>0.50",
    )
    assert score_stage.pending(ledger, run_id) == []
    assert report_stage.stage_counts(ledger, run_id)["harmonize"] == {
        "done": 0,
        "skipped": 1,
        "quarantined": 0,
        "failed": 0,
    }
