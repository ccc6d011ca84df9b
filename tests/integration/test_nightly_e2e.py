"""End to end: the nightly DAG, run by a real Airflow (`airflow dags test`, SQLite metadata), over a 30-patient
synthetic cohort in the sandbox's Orthanc and HAPI FHIR, with the shipped reference model.

One story, in order (the tests share the module's Airflow home and ledger):
1. the first nightly run is interrupted after its retrieve stage: its FHIR Connection goes through a small proxy that
   answers 503 to every lab and note search (the one fault here that the real server cannot be made to produce on
   demand; Patient lookups pass through, so identity matching works), so the clinical task fails;
2. the failed tasks of that same DAG run are run again with the real FHIR server (what *Clear failed tasks* makes the
   scheduler do; here ``airflow tasks test`` per task, as there is no scheduler), so the same ledger run resumes:
   nothing is discovered or retrieved twice, and it completes with exactly one RiskAssessment per scorable patient of
   the cohort in HAPI and every planted edge case quarantined with the truth's reason;
3. rerunning creates nothing: the write-back task of that run again, and a whole new DAG run of the same night (a new
   ledger run: it continues the coverage, so it looks back only, and skips every study already scored and written),
   leave the same resources, still at version 1;
4. the same window through `riskbridge run` (interrupted with ``--until retrieve``, then resumed by its run key):
   the scored studies skipped as done, the quarantined ones tried again with the same decisions, and no new
   resource.

The cohort has an index window of its own (:data:`synthetic_site.COHORT_ANCHORS`); every assertion here is
restricted to it all the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from synthetic_site import cohort_anchor

from riskbridge.airflow.hooks import fhir_connection
from riskbridge.airflow.local import LocalAirflow, _json_output
from riskbridge.connectors import db
from riskbridge.connectors.fhir import FhirClient
from riskbridge.dev.synth import generate, load, read_truth, site_environment
from riskbridge.harmonize.features import load_default_feature_spec
from riskbridge.ledger import Ledger
from riskbridge.model.package import REFERENCE_VERSION, read_package_info, reference_package_path
from riskbridge.records import pattern_name
from riskbridge.settings import Settings
from riskbridge.stages.write_back import assessment_key

pytestmark = pytest.mark.integration

PATIENTS = 30
SEED = 6060
ANCHOR = cohort_anchor("test_nightly_e2e")
LOGICAL_DATE = f"{ANCHOR.isoformat()}T02:00:00-05:00"
WINDOW_HOURS = 24 * 16  # from 02:00 16 days before the anchor: the cohort's whole index window (the first night)
LOOKBACK_HOURS = 72
CLINICAL_RESOURCES = ("Observation", "DocumentReference", "DiagnosticReport", "Condition")
SPEC = load_default_feature_spec()
MAPPED_TASKS = ("retrieve", "clinical")
AFTER_RETRIEVE = ("clinical", "harmonize", "score", "write_back", "report", "finish_run")
EXPECTED_QUARANTINE = {"identity_conflict", "identity_unmatched", "no_usable_series"}


class _FailClinicalSearches(BaseHTTPRequestHandler):
    """Forwards to HAPI, except lab and note searches, which get 503 with an OperationOutcome."""

    upstream = ""

    def _relay(self) -> None:
        path = self.path.split("?", 1)[0]
        resource = path.removeprefix("/fhir/").split("/", 1)[0]
        if resource in CLINICAL_RESOURCES:
            body = json.dumps(
                {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "transient", "diagnostics": "injected by the e2e test"}],
                }
            ).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        length = int(self.headers.get("Content-Length") or 0)
        payload = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        answer = requests.request(
            self.command, self.upstream + self.path.removeprefix("/fhir"), headers=headers, data=payload, timeout=60
        )
        content = answer.content
        self.send_response(answer.status_code)
        for key, value in answer.headers.items():
            if key.lower() not in ("transfer-encoding", "content-length", "content-encoding", "connection"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_PUT = _relay

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture(scope="module")
def cohort(sandbox: Settings, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The module's cohort, generated and loaded into the sandbox; its ground truth."""
    out = tmp_path_factory.mktemp("e2e-cohort")
    generate(out, patients=PATIENTS, seed=SEED, anchor=ANCHOR)
    load(out, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", sandbox.fhir.base_url)
    return read_truth(out)


@pytest.fixture(scope="module")
def airflow(sandbox: Settings, tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalAirflow, dict[str, str]]:
    """A migrated local Airflow (SQLite) with pools and Connections, and the environment its tasks run with."""
    work = tmp_path_factory.mktemp("e2e-airflow")
    with Ledger.connect(sandbox.database) as ledger:
        ledger.upgrade()
        with ledger.transaction() as cursor:
            # The sandbox's ledger is shared: this module's nightly job starts as on a site's first night, with
            # the first window its data interval (later nights continue the coverage; test_coverage_nightly.py).
            cursor.execute("DELETE FROM coverage WHERE kind = 'nightly'")
    local = LocalAirflow(home=work / "airflow")
    local.init(sandbox)
    env = {
        **os.environ,
        **site_environment(),
        "RISKBRIDGE_AIRFLOW__RETRIES": "0",
        "RISKBRIDGE_AIRFLOW__NIGHTLY_WINDOW_HOURS": str(WINDOW_HOURS),
        "RISKBRIDGE_AIRFLOW__NIGHTLY_LOOKBACK_HOURS": str(LOOKBACK_HOURS),
        "RISKBRIDGE_STAGING_DIR": str(work / "staging"),
        "RISKBRIDGE_MODEL_DIR": str(work / "models"),
        "RISKBRIDGE_RUN__REPORT_DIR": str(work / "reports"),
        # The cohort plants identity and series cases; the alert itself is tested in test_pipeline.py.
        "RISKBRIDGE_RUN__QUARANTINE_ALERT_FRACTION": "1.0",
    }
    return local, env


@pytest.fixture(scope="module")
def failing_fhir(sandbox: Settings) -> Iterator[str]:
    """The base URL of the fault-injecting proxy in front of the sandbox's HAPI FHIR."""
    handler = type("Handler", (_FailClinicalSearches,), {"upstream": sandbox.fhir.base_url})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    server.shutdown()
    server.server_close()


def _latest_dag_run(local: LocalAirflow, env: Mapping[str, str]) -> str:
    run_id = local.latest_run_id("riskbridge_nightly", env=env)
    assert run_id is not None
    return run_id


def _rerun_tasks(local: LocalAirflow, airflow_run: str, tasks: tuple[str, ...], env: Mapping[str, str]) -> None:
    """Run these tasks of an existing DAG run again, in order, every map index of a mapped task."""
    listed = local.airflow("tasks", "states-for-dag-run", "riskbridge_nightly", airflow_run, "-o", "json", env=env)
    instances = _json_output(listed.stdout)
    for task in tasks:
        count = sum(1 for row in instances if row["task_id"] == task)
        indexes = [None] if task not in MAPPED_TASKS else list(range(count))
        for index in indexes:
            args = ["tasks", "test", "riskbridge_nightly", task, airflow_run]
            args += [] if index is None else ["--map-index", str(index)]
            result = local.airflow(*args, env=env, timeout_s=1200, check=False)
            assert result.returncode == 0, f"{task}[{index}]: {(result.stdout + result.stderr)[-3000:]}"


def _ledger_run(sandbox: Settings, prefix: str) -> tuple[int, str]:
    """The newest ledger run whose key starts with ``prefix``: (run_id, run_key)."""
    connection = db.connect(sandbox.database)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT run_id, run_key FROM runs WHERE run_key LIKE %s ORDER BY run_id DESC LIMIT 1", (prefix + "%",)
            )
            row = cursor.fetchone()
    finally:
        connection.close()
    assert row is not None, f"no ledger run with a key starting {prefix!r}"
    return int(row[0]), str(row[1])


def _study_uids(sandbox: Settings, table: str, run_id: int) -> set[str]:
    connection = db.connect(sandbox.database)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT study_uid FROM {table} WHERE run_id = %s", (run_id,))
            return {str(row[0]) for row in cursor.fetchall()}
    finally:
        connection.close()


def _count(sandbox: Settings, table: str, run_id: int) -> int:
    connection = db.connect(sandbox.database)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {table} WHERE run_id = %s", (run_id,))
            return int(cursor.fetchone()[0])
    finally:
        connection.close()


def _assessments(sandbox: Settings, truth: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """FHIR Patient id -> every RiskAssessment HAPI holds for it, for the cohort's patients with a FHIR Patient."""
    client = FhirClient(sandbox.fhir)
    patients = sorted({p["identity"]["fhir_patient_id"] for p in truth if p["identity"]["fhir_patient_id"]})
    found: dict[str, list[dict[str, Any]]] = {patient: [] for patient in patients}
    for resource in client.search("RiskAssessment", {"subject": ",".join(f"Patient/{p}" for p in patients)}):
        found[resource["subject"]["reference"].removeprefix("Patient/")].append(resource)
    return found


def _policy_reason(record: Mapping[str, Any]) -> str | None:
    """The reason code the feature spec's minimum-data policy must quarantine this patient with, or None.

    The truth says which modalities the patient has (every study that reaches the policy has its image); the
    reference package says which patterns were validated, and how well.
    """
    labs, flags = record["labs"], record["comorbidities"]
    pattern = pattern_name((True, any(labs.get(lab.name) is not None for lab in SPEC.labs), flags is not None))
    floor = SPEC.minimum.pattern_auroc_floor
    validated = read_package_info(reference_package_path()).validated_patterns or {}
    if floor is not None and pattern not in validated:
        return "pattern_not_validated"
    if floor is not None and validated[pattern] < floor:
        return "pattern_below_floor"
    return None


def _expected(truth: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, str]]:
    """(study UID -> FHIR patient id of every study to score, study UID -> the reason it must be quarantined)."""
    quarantined = {p["index_study"]["study_uid"]: p["quarantine"] for p in truth if p["quarantine"]}
    quarantined |= {
        p["index_study"]["study_uid"]: reason
        for p in truth
        if not p["quarantine"] and (reason := _policy_reason(p)) is not None
    }
    scorable = {
        p["index_study"]["study_uid"]: p["identity"]["fhir_patient_id"]
        for p in truth
        if p["index_study"]["study_uid"] not in quarantined
    }
    return scorable, quarantined


def _ids(found: Mapping[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
    return {patient: sorted(r["id"] for r in resources) for patient, resources in found.items()}


def _check_outcome(sandbox: Settings, truth: list[dict[str, Any]], run_id: int) -> dict[str, list[dict[str, Any]]]:
    scorable, quarantined = _expected(truth)
    assert {p["quarantine"] for p in truth if p["quarantine"]} == EXPECTED_QUARANTINE
    with Ledger.connect(sandbox.database) as ledger:
        in_ledger = ledger.quarantined(run_id)
    assert {uid: in_ledger[uid][1] for uid in quarantined if uid in in_ledger} == quarantined
    assert not set(scorable) & set(in_ledger), "a scorable study of the cohort was quarantined"
    found = _assessments(sandbox, truth)
    for study_uid, patient in scorable.items():
        resources = found[patient]
        assert len(resources) == 1, f"{len(resources)} RiskAssessments for a scorable patient"
        identifier = resources[0]["identifier"][0]["value"]
        assert identifier == assessment_key(REFERENCE_VERSION, patient, study_uid)
    quarantined_patients = {p["identity"]["fhir_patient_id"] for p in truth if p["quarantine"]} - {None}
    assert all(not found[patient] for patient in quarantined_patients - set(scorable.values()))
    return found


def test_nightly_interrupted_after_retrieve_then_resumed(
    sandbox: Settings, cohort: list[dict[str, Any]], airflow: tuple[LocalAirflow, dict[str, str]], failing_fhir: str
) -> None:
    local, env = airflow
    faulty = {**sandbox.fhir.model_dump(), "base_url": failing_fhir}
    faulty_connection = fhir_connection(type(sandbox.fhir).model_validate(faulty))
    interrupted_env = {**env, "AIRFLOW_CONN_FHIR_DEFAULT": json.dumps(faulty_connection)}

    already = _ids(_assessments(sandbox, cohort))  # empty on a fresh sandbox; a developer's may hold earlier runs'

    first = local.dags_test("riskbridge_nightly", LOGICAL_DATE, env=interrupted_env, timeout_s=1500)

    assert first.returncode != 0 or not first.succeeded
    assert first.task_states.get("retrieve") and set(first.task_states["retrieve"]) == {"success"}, first.output[-3000:]
    assert "failed" in first.task_states.get("clinical", []), first.task_states
    airflow_run = _latest_dag_run(local, env)
    run_id, run_key = _ledger_run(sandbox, f"airflow:riskbridge_nightly:{airflow_run}")
    retrieved = _count(sandbox, "retrievals", run_id)
    studies = _count(sandbox, "studies", run_id)
    assert retrieved >= len(_expected(cohort)[0])  # the cohort's matched studies with a usable series, and others'
    assert _ids(_assessments(sandbox, cohort)) == already, "nothing may be written before clinical data is in"

    _rerun_tasks(local, airflow_run, AFTER_RETRIEVE, env)

    assert _ledger_run(sandbox, "airflow:riskbridge_nightly:") == (run_id, run_key)
    assert _count(sandbox, "studies", run_id) == studies
    assert _count(sandbox, "retrievals", run_id) == retrieved
    _check_outcome(sandbox, cohort, run_id)
    with Ledger.connect(sandbox.database) as ledger:
        assert ledger.run(run_id).status == "success"
    report = Path(env["RISKBRIDGE_RUN__REPORT_DIR"]) / str(run_id) / "index.html"
    assert report.is_file(), "the report task writes <report_dir>/<ledger run id>/index.html"
    assert (report.parent / "risk_distribution.png").exists()


def test_nightly_rerun_creates_nothing(
    sandbox: Settings, cohort: list[dict[str, Any]], airflow: tuple[LocalAirflow, dict[str, str]]
) -> None:
    local, env = airflow
    airflow_run = _latest_dag_run(local, env)
    run_id, _ = _ledger_run(sandbox, f"airflow:riskbridge_nightly:{airflow_run}")
    before = _check_outcome(sandbox, cohort, run_id)
    tables = ("studies", "retrievals", "clinical_values", "features", "scores", "quarantine")
    rows = {table: _count(sandbox, table, run_id) for table in tables}

    _rerun_tasks(local, airflow_run, ("write_back", "finish_run"), env)
    again = local.dags_test("riskbridge_nightly", LOGICAL_DATE, env=env, timeout_s=1500)

    assert again.succeeded, again.output[-4000:]
    assert {table: _count(sandbox, table, run_id) for table in tables} == rows
    new_run, _ = _ledger_run(sandbox, "airflow:riskbridge_nightly:")
    assert new_run != run_id
    # The same night again continues the coverage: it has covered up to its trigger, so it only looks back, and
    # every study scored and written there is skipped at discover (nothing retrieved, fetched or scored again).
    trigger = datetime.fromisoformat(LOGICAL_DATE)
    with Ledger.connect(sandbox.database) as ledger:
        run = ledger.run(new_run)
        assert run.watermark == trigger
        assert run.window == (trigger - timedelta(hours=LOOKBACK_HOURS), trigger)
    scorable = set(_expected(cohort)[0])
    assert _count(sandbox, "already_done", new_run) > 0
    for table in ("studies", "retrievals", "scores"):
        assert not _study_uids(sandbox, table, new_run) & scorable, table
    after = _assessments(sandbox, cohort)
    assert _ids(after) == _ids(before)
    assert all(r["meta"]["versionId"] == "1" for rs in after.values() for r in rs)


def _cli(args: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("riskbridge")), *args]
    return subprocess.run(command, env=dict(env), capture_output=True, text=True, timeout=1500, check=False)


def test_cli_run_interrupted_and_resumed_matches_airflow(
    sandbox: Settings, cohort: list[dict[str, Any]], airflow: tuple[LocalAirflow, dict[str, str]]
) -> None:
    _, env = airflow
    airflow_run, _ = _ledger_run(sandbox, "airflow:riskbridge_nightly:")
    first_day = ANCHOR - timedelta(days=15)
    window = f"{first_day.isoformat()}..{(first_day + timedelta(days=15)).isoformat()}"
    key = f"cli:e2e:{datetime.now().isoformat()}"
    before = _assessments(sandbox, cohort)

    interrupted = _cli(["run", "--window", window, "--run-key", key, "--until", "retrieve"], env)
    assert interrupted.returncode == 0, interrupted.stderr[-3000:]
    resumed = _cli(["run", "--window", window, "--run-key", key], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    run_id, _ = _ledger_run(sandbox, key)
    assert run_id != airflow_run
    after = _check_outcome(sandbox, cohort, run_id)
    assert {p: [r["id"] for r in rs] for p, rs in after.items()} == {
        p: [r["id"] for r in rs] for p, rs in before.items()
    }
    with Ledger.connect(sandbox.database) as ledger:
        cli_quarantine = {uid: q[1] for uid, q in ledger.quarantined(run_id).items()}
    # The quarantined studies were tried again and decided as the Airflow run decided them (the truth's reasons);
    # the scored ones were skipped as done.
    quarantined, scorable = _expected(cohort)[1], set(_expected(cohort)[0])
    assert {uid: cli_quarantine.get(uid) for uid in quarantined} == quarantined
    assert _count(sandbox, "already_done", run_id) >= len(scorable)
    assert not _study_uids(sandbox, "retrievals", run_id) & scorable
    assert f"{run_id}" in resumed.stdout
