"""The whole pipeline without Airflow against the sandbox (Orthanc, HAPI FHIR, PostgreSQL) on a synthetic cohort,
checked against its ground truth: every planted identity and series edge case quarantined with its expected reason,
one RiskAssessment per scored patient, a rerun that sends and writes nothing, a run interrupted after retrieve and
resumed by a new process (a new Pipeline) with the same result, ``riskbridge run`` on the same window, and two
overlapping runs writing back the same keys at once.

The model is a tiny real package with seeded random weights (the scores mean nothing; the plumbing is tested).
The cohort has an index window of its own (:data:`synthetic_site.COHORT_ANCHORS`); assertions are about this
cohort's studies all the same.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from synthetic_site import cohort_anchor, index_days, synthetic_site_settings
from tiny_model import tiny_package
from typer.testing import CliRunner

from riskbridge.connectors.fhir import FhirClient
from riskbridge.dev.synth import EdgeCaseRates, generate, load, read_truth
from riskbridge.ledger import Ledger
from riskbridge.pipeline import Pipeline, StageResult, window_of_days
from riskbridge.settings import DatabaseSettings, IdentitySettings, RunSettings, Settings
from riskbridge.stages import discover as discover_stage
from riskbridge.stages import report as report_stage
from riskbridge.stages import write_back as write_back_stage
from riskbridge.staging_retention import purge_old

pytestmark = pytest.mark.integration

ZONE = "America/New_York"  # the synthetic cohort's fixed -05:00 in January
ANCHOR = cohort_anchor("test_pipeline")
WINDOW: tuple[date, date] = index_days("test_pipeline")
CLI_WINDOW = f"{WINDOW[0]}..{WINDOW[1]}"
RATES = EdgeCaseRates(shared_mrn=0.1, no_fhir_patient=0.1, no_usable_series=0.1)
RUN_TABLES = (
    "studies", "identity_decisions", "selections", "series_decisions", "retrievals", "clinical_values",
    "note_dispositions", "note_findings", "features", "scores", "quarantine",
)  # fmt: skip


@pytest.fixture(scope="module")
def truth(sandbox: Settings, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("pipeline") / "cohort"
    generate(out, patients=16, seed=67, rates=RATES, anchor=ANCHOR)
    load(out, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", sandbox.fhir.base_url)
    return read_truth(out)


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A model version per test: its RiskAssessment keys and Provenance ids are the test's own."""
    # a version of its own: HAPI keeps what earlier tests wrote
    return tiny_package(tmp_path / "tiny", version=f"0.0.1-{uuid.uuid4().hex[:8]}", spacing_mm=8.0)


@pytest.fixture
def settings(
    sandbox: Settings,
    package: Path,
    tmp_path: Path,
    scratch_database: Callable[[str], tuple[DatabaseSettings, str]],
) -> Settings:
    """The sandbox's settings with the cohort's site rules, a fresh ledger, staging and report dirs of this test."""
    database = scratch_database("rb_pipeline")[0]
    with Ledger.connect(database) as ledger:
        ledger.upgrade()
    run = RunSettings(
        report_dir=tmp_path / "reports",
        retrieve_chunk_size=4,
        clinical_chunk_size=5,
        model_package=package,
        # The cohort plants identity and series cases on purpose; the alert is switched on where it is tested.
        quarantine_alert_fraction=1.0,
    )
    writeback = sandbox.writeback.model_copy(
        update={"identifier_system": f"urn:riskbridge:test-pipeline-{uuid.uuid4().hex[:12]}", "bundle_size": 4}
    )
    return synthetic_site_settings(sandbox, database, tmp_path, run).model_copy(update={"writeback": writeback})


def _mine(truth: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {record["index_study"]["study_uid"]: record for record in truth}


def _ledger_rows(ledger: Ledger, run_id: int) -> dict[str, int]:
    counts = {}
    with ledger.connection, ledger.connection.cursor() as cursor:
        for table in RUN_TABLES:
            cursor.execute(f"SELECT count(*) FROM {table} WHERE run_id = %s", (run_id,))
            row = cursor.fetchone()
            assert row is not None
            counts[table] = int(row[0])
        cursor.execute("SELECT count(*) FROM writebacks")
        row = cursor.fetchone()
        assert row is not None
        counts["writebacks"] = int(row[0])
    return counts


def _assessments(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """RiskAssessments of this test's identifier system, by subject Patient id."""
    found: dict[str, list[dict[str, Any]]] = {}
    with FhirClient(settings.fhir) as client:
        for resource in client.search("RiskAssessment", {"identifier": f"{settings.writeback.identifier_system}|"}):
            found.setdefault(resource["subject"]["reference"].removeprefix("Patient/"), []).append(resource)
    return found


def _check_against_truth(settings: Settings, run_id: int, truth: list[dict[str, Any]]) -> set[str]:
    """Every truth quarantine reproduced, every other study of the cohort scored or skipped by the minimum-data
    policy with a reason; one RiskAssessment per scored patient. Returns the scored studies."""
    mine = _mine(truth)
    with Ledger.connect(settings.database) as ledger:
        quarantined = ledger.quarantined(run_id)
        summary = report_stage.run_summary(ledger, run_id)
        writebacks = {w.study_uid: w for w in ledger.writebacks(run_id)}
    assert set(mine) <= set(ledger_study_uids(settings, run_id))
    reasons = {record["quarantine"] for record in truth if record["quarantine"]}
    assert reasons == {"identity_conflict", "identity_unmatched", "no_usable_series"}  # the cohort covers them all
    scored = {uid for uid, _, _ in summary.scores}
    for uid, record in mine.items():
        if record["quarantine"] is not None:
            assert quarantined.get(uid, ("", "", ""))[1] == record["quarantine"], record["patient_key"]
            assert uid not in scored
        elif uid in quarantined:  # only the minimum-data policy may stop an otherwise clean study, with reasons
            stage, reason, detail = quarantined[uid]
            policy_reasons = ("pattern_not_validated", "pattern_below_floor", "too_much_missing", "missing_required")
            assert stage == "harmonize" and reason in policy_reasons and detail, detail
        else:
            assert uid in scored, record["patient_key"]
    mine_scored = scored & set(mine)
    assert len(mine_scored) >= len(mine) // 2
    assessments = _assessments(settings)
    for uid in mine_scored:
        patient = mine[uid]["identity"]["fhir_patient_id"]
        assert len(assessments.get(patient, [])) == 1, mine[uid]["patient_key"]
        assert writebacks[uid].status in ("created", "exists") and writebacks[uid].fhir_id
        assert assessments[patient][0]["id"] == writebacks[uid].fhir_id
    return mine_scored


def ledger_study_uids(settings: Settings, run_id: int) -> list[str]:
    with Ledger.connect(settings.database) as ledger:
        return discover_stage.study_uids(ledger, run_id)


def test_a_run_quarantines_the_truths_cases_writes_once_and_a_rerun_does_nothing(
    settings: Settings, truth: list[dict[str, Any]]
) -> None:
    window = window_of_days(*WINDOW, ZONE)
    with Pipeline.from_settings(settings) as pipeline:
        run_id = pipeline.start_run("nightly", "test:pipeline:once", window)
        first = pipeline.run_stages(run_id)
        pipeline.finish_run(run_id)
        report = pipeline.report(run_id)
    assert report.is_file() and report.name == "index.html"
    assert sum(r.failed for r in first) == 0, first
    scored = _check_against_truth(settings, run_id, truth)
    write_back = next(r for r in first if r.stage == "write_back")
    assert write_back.done >= len(scored)
    with Ledger.connect(settings.database) as ledger:
        rows = _ledger_rows(ledger, run_id)
        assert {w.status for w in ledger.writebacks(run_id)} == {"created"}

    # A rerun of the same run key (a new process) resumes a finished run: nothing to do, nothing written.
    with Pipeline.from_settings(settings) as pipeline:
        assert pipeline.start_run("nightly", "test:pipeline:once", window) == run_id
        again = pipeline.run_stages(run_id)
    assert all(r.total == 0 for r in again), [r for r in again if r.total]
    with Ledger.connect(settings.database) as ledger:
        assert _ledger_rows(ledger, run_id) == rows
        assert {w.attempts for w in ledger.writebacks(run_id)} == {1}
    assert sum(len(v) for v in _assessments(settings).values()) == rows["writebacks"]

    # Another run over the same window skips every study scored and written with this model at discover: no
    # retrieval, no FHIR fetch, no score; quarantined studies are tried again.
    with Pipeline.from_settings(settings) as pipeline:
        other = pipeline.start_run("backfill", "test:pipeline:twice", window)
        second = pipeline.run_stages(other)
        discovered = next(r for r in second if r.stage == "discover")
        assert discovered.skipped == rows["scores"]
        assert set(discover_stage.study_uids(pipeline.ledger, other)) == set(pipeline.ledger.quarantined(run_id))
        assert all(r.done == 0 for r in second if r.stage in ("score", "write_back")), second
    # With rescore it scores again on purpose, and sends nothing new: the outbox key exists already.
    with Pipeline.from_settings(settings) as pipeline:
        forced = pipeline.start_run("backfill", "test:pipeline:rescore", window, rescore=True)
        third = pipeline.run_stages(forced)
        assert next(r for r in third if r.stage == "discover").skipped == 0
        assert next(r for r in third if r.stage == "score").done == rows["scores"]
        assert next(r for r in third if r.stage == "write_back").total == 0
        assert report_stage.run_summary(pipeline.ledger, forced).writebacks == {"created": rows["writebacks"]}
    assert sum(len(v) for v in _assessments(settings).values()) == rows["writebacks"]


def test_a_run_interrupted_after_retrieve_resumes_to_the_same_result(
    settings: Settings, truth: list[dict[str, Any]]
) -> None:
    window = window_of_days(*WINDOW, ZONE)
    with Pipeline.from_settings(settings) as pipeline:
        run_id = pipeline.start_run("nightly", "test:pipeline:interrupted", window)
        partial = pipeline.run_stages(run_id, until="retrieve")
        assert [r.stage for r in partial][-1] == "retrieve"
        assert pipeline.chunks("clinical", run_id, 100)  # clinical work is left
        assert pipeline.chunks("retrieve", run_id, 100) == []
    # The crash: the process is gone. A new one resumes the same run key from the ledger.
    with Pipeline.from_settings(settings) as pipeline:
        assert pipeline.start_run("nightly", "test:pipeline:interrupted", window) == run_id
        rest = pipeline.run_stages(run_id)
        pipeline.finish_run(run_id)
    assert {r.stage for r in rest if r.total} == {"clinical", "harmonize", "score", "write_back"}
    _check_against_truth(settings, run_id, truth)
    with Ledger.connect(settings.database) as ledger:
        assert ledger.run(run_id).status == "success"


def test_a_crash_between_send_and_mark_is_resolved_by_the_conditional_create(
    settings: Settings, truth: list[dict[str, Any]]
) -> None:
    window = window_of_days(*WINDOW, ZONE)
    with Pipeline.from_settings(settings) as pipeline:
        run_id = pipeline.start_run("nightly", "test:pipeline:crash", window)
        pipeline.run_stages(run_id, until="write_back")
        with pipeline.ledger.connection, pipeline.ledger.connection.cursor() as cursor:
            # As if the process died after the server answered and before the outbox was marked.
            cursor.execute("UPDATE writebacks SET status = 'pending', attempts = 0, fhir_id = NULL")
        resent = pipeline.run_stage("write_back", run_id)
    assert resent.failed == 0 and resent.done > 0
    with Ledger.connect(settings.database) as ledger:
        assert {w.status for w in ledger.writebacks(run_id)} == {"exists"}
    _check_against_truth(settings, run_id, truth)


def test_riskbridge_run_on_a_window_prints_the_stage_table_and_resumes(
    settings: Settings, truth: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from riskbridge import cli

    monkeypatch.setattr(cli, "_settings", lambda: settings)
    runner = CliRunner()
    stopped = runner.invoke(cli.app, ["run", "--window", CLI_WINDOW, "--until", "select"])
    assert stopped.exit_code == 0, stopped.output
    assert "stopped after select" in stopped.output
    done = runner.invoke(cli.app, ["run", "--window", CLI_WINDOW])
    assert done.exit_code == 0, done.output
    for word in ("discover", "write_back", "identity_conflict", "no_usable_series", "report:"):
        assert word in done.output, word
    with Ledger.connect(settings.database) as ledger:
        run = ledger.run_by_key(f"cli:backfill:{CLI_WINDOW}")
    assert run.status == "success"
    _check_against_truth(settings, run.run_id, truth)
    bad = runner.invoke(cli.app, ["run", "--window", f"{WINDOW[1]}..{WINDOW[0]}"])
    assert bad.exit_code == 2 and "before it starts" in bad.output


def test_stage_results_are_small_json_for_xcom() -> None:
    result = StageResult("retrieve", done=3, failed=1, seconds=1.25)
    assert result.to_dict() == {
        "stage": "retrieve",
        "done": 3,
        "skipped": 0,
        "quarantined": 0,
        "failed": 1,
        "seconds": 1.25,
    }
    assert result.total == 4


def test_a_bundle_the_server_never_answers_stays_open_and_the_next_call_sends_it(
    settings: Settings, truth: list[dict[str, Any]]
) -> None:
    window = window_of_days(*WINDOW, ZONE)
    # A real fault: the FHIR server is unreachable (nothing listens on port 9), and the client does not retry.
    down = settings.fhir.model_copy(
        update={
            "base_url": "http://127.0.0.1:9/fhir",
            "retry": settings.fhir.retry.model_copy(update={"max_attempts": 1}),
        }
    )
    with Pipeline.from_settings(settings) as pipeline:
        run_id = pipeline.start_run("nightly", "test:pipeline:fhir-down", window)
        pipeline.run_stages(run_id, until="score")
    with Pipeline.from_settings(settings.model_copy(update={"fhir": down})) as pipeline:
        refused = pipeline.run_stage("write_back", run_id)
        # The bundles in flight when the first one found the server unreachable failed; no later one was sent.
        size, workers = settings.writeback.bundle_size, settings.writeback.bundle_workers
        assert refused.done == 0 and refused.failed % size == 0 and size <= refused.failed <= size * workers
        before = {w.key: w for w in pipeline.ledger.writebacks(run_id)}
    failed = {key for key, w in before.items() if w.status == "failed"}
    assert len(failed) == refused.failed and {w.status for w in before.values()} == {"failed", "pending"}
    assert all(before[key].fhir_id is None for key in failed)
    with Pipeline.from_settings(settings) as pipeline:
        sent = pipeline.run_stage("write_back", run_id)
        assert sent.failed == 0 and sent.done == len(before)
        after = {w.key: w for w in pipeline.ledger.writebacks(run_id)}
    assert {w.status for w in after.values()} == {"created"}
    assert {key: w.attempts for key, w in after.items()} == {key: 2 if key in failed else 1 for key in before}
    _check_against_truth(settings, run_id, truth)


def test_an_on_demand_run_discovers_exactly_its_accessions_and_patients(
    settings: Settings, truth: list[dict[str, Any]]
) -> None:
    by_accession = next(r for r in truth if r["quarantine"] is None and not r["prior_studies"])
    by_patient = next(r for r in truth if r["prior_studies"] and r is not by_accession)
    expected = {by_accession["index_study"]["study_uid"]}
    expected |= {s["study_uid"] for s in [by_patient["index_study"], *by_patient["prior_studies"]]}
    with Pipeline.from_settings(settings) as pipeline:
        run_id = pipeline.start_run(
            "on_demand",
            "test:pipeline:on-demand",
            accessions=[by_accession["index_study"]["accession"]],
            patient_ids=[by_patient["pacs"]["patient_id"]],
        )
        found = pipeline.run_stage("discover", run_id)
        assert found.done == len(expected) == len(set(discover_stage.study_uids(pipeline.ledger, run_id)) & expected)
        assert set(discover_stage.study_uids(pipeline.ledger, run_id)) == expected


def test_a_run_whose_identity_map_matches_nothing_fails_with_the_quarantine_alert(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from riskbridge import cli

    # The site's PACS sends SYNTH_HOSP; this map knows only another issuer, so every study is identity_unmatched.
    wrong = settings.model_copy(
        update={
            "identity": IdentitySettings(issuer_systems={"OTHER_HOSP": "http://other.example/mrn"}),
            "run": settings.run.model_copy(update={"quarantine_alert_fraction": 0.8}),
        }
    )
    monkeypatch.setattr(cli, "_settings", lambda: wrong)
    result = CliRunner().invoke(cli.app, ["run", "--window", CLI_WINDOW])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "Most are identity_unmatched; likely cause:" in output and "[identity] issuer_systems" in output
    with Ledger.connect(settings.database) as ledger:
        run = ledger.run_by_key(f"cli:backfill:{CLI_WINDOW}")
        summary = report_stage.run_summary(ledger, run.run_id)
    assert run.status == "failed"
    discovered = summary.stage_counts["discover"]["done"]
    assert discovered >= wrong.run.quarantine_alert_min_studies
    assert summary.quarantine.get("identity_unmatched", 0) > 0.8 * discovered
    assert "score" not in summary.stage_counts or summary.stage_counts["score"].get("done", 0) == 0


def test_overlapping_runs_send_each_key_once_and_write_one_risk_assessment_per_key(
    settings: Settings, truth: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nightly and an on-demand run score the same studies with the same model and write back at once. The first
    claims its keys (whichever gets there first); the other waits, finds them answered and sends nothing. Without
    the claim both send
    the keys still open, and HAPI can create two RiskAssessments for one identifier (parallel conditional creates
    are not serialized there). The real client's transaction is wrapped to count the keys sent and to hold the
    first bundle until the second run has read the outbox, so the two write-backs overlap on every run."""
    one_at_a_time = settings.writeback.model_copy(update={"bundle_size": 1, "bundle_workers": 1})
    settings = settings.model_copy(update={"writeback": one_at_a_time})
    with Pipeline.from_settings(settings) as pipeline:
        # On demand, by the cohort's accession numbers.
        first = pipeline.start_run("on_demand", "test:pipeline:overlap-a", accessions=_accessions(truth))
        pipeline.run_stages(first, until="score")
        second = pipeline.start_run("on_demand", "test:pipeline:overlap-b", accessions=_accessions(truth))
        pipeline.run_stages(second, until="score")
    sent: list[str] = []
    sent_lock = threading.Lock()
    real_transaction = FhirClient.transaction

    real_open_scores = write_back_stage.open_scores
    second_read_the_outbox = threading.Event()

    def counted(self: FhirClient, entries: Any) -> Any:
        # The first bundle waits until the second run has read the outbox: both are then in write-back at once.
        second_read_the_outbox.wait(timeout=60)
        with sent_lock:
            sent.extend(e["request"]["ifNoneExist"] for e in entries if "ifNoneExist" in e["request"])
        return real_transaction(self, entries)

    def open_scores(ledger: Ledger, run_id: int) -> Any:
        scores = real_open_scores(ledger, run_id)
        if run_id == second:
            second_read_the_outbox.set()
        return scores

    monkeypatch.setattr(FhirClient, "transaction", counted)
    monkeypatch.setattr(write_back_stage, "open_scores", open_scores)
    results: dict[int, StageResult | BaseException] = {}

    def write_back(run_id: int) -> None:
        try:
            with Pipeline.from_settings(settings) as pipeline:
                results[run_id] = pipeline.run_stage("write_back", run_id)
        except BaseException as exc:  # reported by the assertions below, not lost in the thread
            results[run_id] = exc

    threads = {run_id: threading.Thread(target=write_back, args=(run_id,), name=f"run-{run_id}") for run_id in
               (first, second)}  # fmt: skip
    for thread in threads.values():
        thread.start()
    for thread in threads.values():
        thread.join(timeout=300)
    done = {run_id: result for run_id, result in results.items() if isinstance(result, StageResult)}
    assert set(done) == {first, second}, results
    assert sent and len(sent) == len(set(sent)), "a key was sent twice"
    # Whichever run claimed the keys first sent them all; the other waited and found them answered.
    assert sorted(result.done for result in done.values()) == [0, len(sent)]
    assert [result.failed for result in done.values()] == [0, 0]
    with Ledger.connect(settings.database) as ledger:
        for run_id in (first, second):
            assert {w.status for w in ledger.writebacks(run_id)} == {"created"}
    _check_against_truth(settings, first, truth)  # one RiskAssessment per scored patient on the server


def test_staging_keeps_a_running_runs_series_and_removes_scored_and_old_ones(
    settings: Settings, truth: list[dict[str, Any]]
) -> None:
    """While the run is running nothing of it is purged; once failed, an old series its study was not scored from
    is removed and marked for retrieval again, so resuming retrieves it anew; finishing removes the scored series
    (``[retention] staging_after_run = "remove-scored"``, the default)."""
    with Pipeline.from_settings(settings) as pipeline:
        run_id = pipeline.start_run("on_demand", "test:pipeline:staging-retention", accessions=_accessions(truth))
        pipeline.run_stages(run_id, until="retrieve")
        retrieved = {r.series_uid for r in ledger_retrievals(pipeline.ledger, run_id)}
        assert retrieved
        # What selection sampled headers from is staged too, and no run holds it: it goes, the chosen series stay.
        sampled = {d.name for d in settings.staging_dir.glob("*/*") if d.is_dir()} - retrieved
        running = purge_old(pipeline.ledger, settings.staging_dir, 0)
        assert (running.series, running.kept_running) == (len(sampled), len(retrieved))
        assert {d.name for d in settings.staging_dir.glob("*/*")} == retrieved
        pipeline.finish_run(run_id, "failed")  # as if a task failed for good; a clear resumes it later
        dry = purge_old(pipeline.ledger, settings.staging_dir, 0, dry_run=True)
        assert dry.series == len(retrieved) and {d.name for d in settings.staging_dir.glob("*/*")} == retrieved
        assert purge_old(pipeline.ledger, settings.staging_dir, 3650).series == 0  # nothing that old
        purged = purge_old(pipeline.ledger, settings.staging_dir, 0)
        assert purged.series == len(retrieved) and purged.bytes > 0
        assert not list(settings.staging_dir.glob("*/*"))
        assert {item for chunk in pipeline.chunks("retrieve", run_id, 100) for item in chunk} == retrieved
        assert pipeline.ledger.resume_run(run_id)
        pipeline.run_stages(run_id)
        assert pipeline.finish(run_id) is None
    scored = _check_against_truth(settings, run_id, truth)
    left = {d.name for d in settings.staging_dir.glob("*/*") if d.is_dir()}
    with Ledger.connect(settings.database) as ledger:
        scored_series = {r.series_uid for r in ledger_retrievals(ledger, run_id) if r.study_uid in scored}
    assert scored_series and not (left & scored_series), "the scored series left staging when the run finished"


def _accessions(truth: list[dict[str, Any]]) -> list[str]:
    """The accession numbers of the cohort's index studies (an on-demand run of exactly this cohort)."""
    return [record["index_study"]["accession"] for record in truth]


def ledger_retrievals(ledger: Ledger, run_id: int) -> list[Any]:
    with ledger.transaction() as cursor:
        cursor.execute("SELECT study_uid, series_uid FROM retrievals WHERE run_id = %s AND complete", (run_id,))
        return [_Retrieval(row["study_uid"], row["series_uid"]) for row in cursor.fetchall()]


class _Retrieval(NamedTuple):
    study_uid: str
    series_uid: str
