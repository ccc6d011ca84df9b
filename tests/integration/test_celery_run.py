"""A real distributed run: the nightly DAG under Airflow's CeleryExecutor, one worker SIGKILLed mid-retrieve.

Started by the test, as processes on this machine: Redis (Debian ``redis-server``) as the Celery broker, Airflow's
api-server, scheduler and dag-processor with their metadata in a database of their own on the sandbox PostgreSQL
(also the Celery result backend), and two ``airflow celery worker`` processes: ``worker-default`` on the queue
``default`` and ``worker-gpu`` on ``gpu,default`` (scoring goes to ``gpu``: ``[airflow] score_queue``). The nightly
DAG is unpaused and triggered through the CLI over a small synthetic cohort loaded into the sandbox at a date of its
own (so the night's window holds only this cohort, not the other tests' cohorts).

While a retrieve task is running and its first instances have reached staging, the worker running it is SIGKILLed
with every process below it (the Celery pool and the task's supervisor: a host lost). Nothing tells the scheduler;
it finds the task instance by its missing heartbeat (``task_instance_heartbeat_timeout``, 20 s here), fails that try
and the task's retries run it again on a worker still alive (the killed worker is restarted under a new name, as a
site's service manager would). The run must complete: DAG run and ledger run success, every series staged complete
exactly once, every study of the cohort scored (or quarantined by the minimum-data policy with its reason), one
RiskAssessment per key in HAPI, each task on its queue and pool, scoring on the gpu worker.

The figures (detection time, wall time, which worker ran what) are printed at the end and recorded in
docs/reliability.md "A real distributed run".
"""

from __future__ import annotations

import json
import os
import random
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
import requests
from synthetic_site import synthetic_site_settings
from tiny_model import tiny_package

from riskbridge.airflow.local import LocalAirflow
from riskbridge.connectors.fhir import FhirClient
from riskbridge.dev.pg import query
from riskbridge.dev.processes import Processes, free_port, wait_for
from riskbridge.dev.synth import EdgeCaseRates, generate, load, read_truth, site_environment
from riskbridge.dev.synth import cohort as synth_cohort
from riskbridge.ledger import Ledger
from riskbridge.settings import DatabaseSettings, RunSettings, Settings

pytestmark = pytest.mark.integration


PATIENTS = 8
RETRIEVE_CHUNK = 3  # chosen series per retrieve task: three mapped retrieve tasks
HEARTBEAT_TIMEOUT_S = 20
DAG_ID = "riskbridge_nightly"
RUN_ID = "celery_kill_test"
TESTS_DIR = Path(__file__).resolve().parents[1]
# No identity or series edge cases: every study of the cohort is to be scored (or stopped by the minimum-data policy).
RATES = EdgeCaseRates(shared_mrn=0.0, no_fhir_patient=0.0, no_usable_series=0.0, pacs_missing_issuer=0.0)
POLICY_REASONS = ("pattern_not_validated", "pattern_below_floor", "too_much_missing", "missing_required")
PACS_STAGES = ("discover", "select", "retrieve")


def _orthanc_has_studies(base: str, first: date, last: date) -> bool:
    query = {"Level": "Study", "Query": {"StudyDate": f"{first:%Y%m%d}-{last:%Y%m%d}"}, "Limit": 1}
    answer = requests.post(f"{base}/tools/find", json=query, timeout=30)
    answer.raise_for_status()
    return bool(answer.json())


def _free_anchor(base: str) -> datetime:
    """A midnight (the cohort's fixed -05:00, in winter so the site zone agrees) whose 16-day index window, with a
    margin, holds no study in the sandbox's Orthanc yet."""
    rng = random.Random()
    for _ in range(50):
        day = date(rng.randint(2002, 2022), 1, 20) + timedelta(days=rng.randint(0, 38))
        window = synth_cohort.INDEX_WINDOW_DAYS
        if not _orthanc_has_studies(base, day - timedelta(days=window + 4), day + timedelta(days=2)):
            return datetime(day.year, day.month, day.day, tzinfo=synth_cohort.SITE_TZ)
    raise RuntimeError("no free winter window left in the sandbox's Orthanc")


@pytest.fixture
def cohort(sandbox: Settings, tmp_path: Path) -> tuple[datetime, list[dict[str, Any]]]:
    """A small cohort of its own (random seed) at a date of its own, loaded into the sandbox: (anchor, truth)."""
    orthanc = f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}"
    anchor = _free_anchor(orthanc)
    out = tmp_path / "cohort"
    seed = random.randint(10**6, 10**9)
    generate(out, patients=PATIENTS, seed=seed, rates=RATES, workers=1, anchor=anchor.date())
    load(out, orthanc, sandbox.fhir.base_url)
    return anchor, read_truth(out)


@pytest.fixture
def metadata_dsn(sandbox: Settings, scratch_database: Callable[[str], tuple[DatabaseSettings, str]]) -> str:
    """libpq DSN of a fresh database for Airflow's metadata (and Celery's results) in the sandbox cluster."""
    return scratch_database("airflow_celery")[0].dsn.get_secret_value()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    running = Processes(tmp_path / "logs")
    yield running
    running.stop_all()


def _task_instances(dsn: str) -> list[dict[str, Any]]:
    rows = query(
        dsn,
        "SELECT task_id, map_index, state, try_number, queue, pool, hostname, start_date, end_date "
        "FROM task_instance WHERE dag_id = %s AND run_id = %s ORDER BY start_date NULLS LAST",
        DAG_ID,
        RUN_ID,
    )
    keys = ("task_id", "map_index", "state", "try_number", "queue", "pool", "hostname", "start_date", "end_date")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def _plan(dsn: str) -> list[list[str]]:
    """The retrieve chunks (series UIDs) plan_retrieve handed to the mapped retrieve tasks (its XCom)."""
    rows = query(dsn, "SELECT value FROM xcom WHERE dag_id = %s AND run_id = %s AND task_id = 'plan_retrieve'",
                  DAG_ID, RUN_ID)  # fmt: skip
    value: Any = rows[0][0] if rows else []
    while isinstance(value, str | bytes):
        value = json.loads(value)
    return [[str(item) for item in chunk] for chunk in value]


def test_nightly_run_on_celery_survives_a_worker_killed_mid_retrieve(
    sandbox: Settings,
    cohort: tuple[datetime, list[dict[str, Any]]],
    metadata_dsn: str,
    scratch_database: Callable[[str], tuple[DatabaseSettings, str]],
    processes: Processes,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    anchor, truth = cohort
    ledger_db = scratch_database("rb_celery")[0]
    with Ledger.connect(ledger_db) as ledger:
        ledger.upgrade()
    package = tiny_package(tmp_path / "tiny", version=f"0.0.1-{uuid.uuid4().hex[:8]}", spacing_mm=8.0)
    run = RunSettings(
        report_dir=tmp_path / "reports", retrieve_chunk_size=RETRIEVE_CHUNK, model_package=package,
        quarantine_alert_fraction=1.0,
    )  # fmt: skip
    settings = synthetic_site_settings(sandbox, ledger_db, tmp_path, run)
    # One DICOMweb stream per retrieve task: a chunk takes long enough to be caught mid-transfer.
    settings = settings.model_copy(update={"pacs": settings.pacs.model_copy(update={"workers": 1})})
    identifier_system = f"urn:riskbridge:test-celery-{uuid.uuid4().hex[:12]}"
    settings = settings.model_copy(
        update={"writeback": settings.writeback.model_copy(update={"identifier_system": identifier_system})}
    )
    parts = psycopg2.extensions.parse_dsn(metadata_dsn)
    metadata_url = f"postgresql+psycopg2://{parts['user']}@{parts['host']}:{parts['port']}/{parts['dbname']}"
    local = LocalAirflow(home=tmp_path / "airflow", metadata_url=metadata_url)
    local.init(settings)  # airflow db migrate, pools, the Connections (this test's ledger, workers=1)

    redis_port, api_port = free_port(), free_port()
    # The night: 02:00 site time after the cohort's index window, the data interval that whole window (a manual run's
    # interval would otherwise end at the trigger's wall-clock time, far from the cohort's dates).
    night_end = anchor + timedelta(hours=2)
    night_start = anchor - timedelta(days=synth_cohort.INDEX_WINDOW_DAYS + 1)
    riskbridge_env = {
        **site_environment(),
        "RISKBRIDGE_DATABASE__DSN": ledger_db.dsn.get_secret_value(),
        "RISKBRIDGE_AIRFLOW__SCORE_QUEUE": "gpu",
        "RISKBRIDGE_AIRFLOW__RETRIES": "2",
        "RISKBRIDGE_AIRFLOW__RETRY_DELAY_S": "1",
        "RISKBRIDGE_AIRFLOW__RETRY_BACKOFF": "0",
        "RISKBRIDGE_STAGING_DIR": str(tmp_path / "staging"),
        "RISKBRIDGE_MODEL_DIR": str(tmp_path / "models"),
        "RISKBRIDGE_RUN__REPORT_DIR": str(tmp_path / "reports"),
        "RISKBRIDGE_RUN__RETRIEVE_CHUNK_SIZE": str(RETRIEVE_CHUNK),
        "RISKBRIDGE_RUN__MODEL_PACKAGE": str(package),
        "RISKBRIDGE_RUN__QUARANTINE_ALERT_FRACTION": "1.0",
        "RISKBRIDGE_WRITEBACK__IDENTIFIER_SYSTEM": identifier_system,
        "RISKBRIDGE_RETENTION__STAGING_AFTER_RUN": "keep",  # the staged series are counted after the run
    }
    airflow_env = {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "celery_cluster_support.worker_name",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + metadata_url.replace("+psycopg2", ""),
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        # Only the run the test triggers: no scheduled night (its cron's latest night) when the DAG is unpaused.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",  # the REST API on loopback, for the trigger
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
    }
    env = local.environment({**os.environ, **riskbridge_env, **airflow_env})
    airflow = [sys.executable, "-m", "airflow"]

    def start_worker(name: str, queues: str) -> None:
        argv = [*airflow, "celery", "worker", "--queues", queues, "--celery-hostname", f"{name}@%h",
                "--skip-serve-logs", "--without-gossip", "--without-mingle"]  # fmt: skip
        processes.start(name, argv, {**env, "RISKBRIDGE_TEST_HOSTNAME": name})

    redis_argv = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    processes.start("redis", redis_argv, env)
    processes.start("api-server", [*airflow, "api-server", "--host", "127.0.0.1", "--port", str(api_port),
                                   "--workers", "1"], {**env, "RISKBRIDGE_TEST_HOSTNAME": "api-server"})  # fmt: skip
    processes.start("scheduler", [*airflow, "scheduler"], {**env, "RISKBRIDGE_TEST_HOSTNAME": "scheduler"})
    processes.start("dag-processor", [*airflow, "dag-processor"], {**env, "RISKBRIDGE_TEST_HOSTNAME": "dag-processor"})
    start_worker("worker-default", "default")
    start_worker("worker-gpu", "gpu,default")

    def parsed() -> bool:
        processes.check_alive()
        return bool(query(metadata_dsn, "SELECT 1 FROM serialized_dag WHERE dag_id = %s", DAG_ID))

    def api_up() -> bool:
        processes.check_alive()
        try:
            return requests.get(f"http://127.0.0.1:{api_port}/api/v2/monitor/health", timeout=2).ok
        except requests.RequestException:
            return False

    wait_for("the nightly DAG parsed by the dag-processor", parsed, timeout_s=120)
    wait_for("the api-server", api_up, timeout_s=120)
    local.airflow("dags", "unpause", DAG_ID, env=env)
    triggered_at = time.monotonic()
    body = {
        "dag_run_id": RUN_ID,
        "logical_date": night_end.isoformat(),
        "data_interval_start": night_start.isoformat(),
        "data_interval_end": night_end.isoformat(),
        "conf": {},
    }
    answer = requests.post(f"http://127.0.0.1:{api_port}/api/v2/dags/{DAG_ID}/dagRuns", json=body, timeout=30)
    assert answer.status_code == 200, answer.text

    # A retrieve task running, and instances of it arriving in staging: kill the worker that runs it.
    staging = tmp_path / "staging"
    victim: dict[str, Any] = {}

    def retrieving() -> bool:
        processes.check_alive()
        running = [
            ti for ti in _task_instances(metadata_dsn) if ti["task_id"] == "retrieve" and ti["state"] == "running"
        ]
        if not running or not staging.is_dir():
            return False
        chunks = _plan(metadata_dsn)
        staged = {part for path in staging.rglob("*.dcm") for part in path.parts}
        for ti in running:
            if ti["hostname"] and staged & set(chunks[ti["map_index"]]):  # its own series are arriving
                victim.update(ti)
                return True
        return False

    wait_for("a retrieve task with instances arriving in staging", retrieving, timeout_s=240, interval_s=0.05)
    killed_worker = str(victim["hostname"])
    assert killed_worker in ("worker-default", "worker-gpu")
    killed_pids = processes.kill_tree(killed_worker)
    killed_at = time.monotonic()
    # A site's service manager restarts a lost worker; this one comes back under a new name.
    restarted = f"{killed_worker}-restarted"
    start_worker(restarted, "default" if killed_worker == "worker-default" else "gpu,default")

    def detected() -> bool:
        processes.check_alive()
        rows = [
            ti
            for ti in _task_instances(metadata_dsn)
            if ti["task_id"] == "retrieve" and ti["map_index"] == victim["map_index"]
        ]
        return bool(rows) and (rows[0]["state"] != "running" or rows[0]["try_number"] > victim["try_number"])

    detect_s = wait_for("the killed task instance found by the scheduler", detected, timeout_s=120, interval_s=0.2)

    def finished() -> bool:
        processes.check_alive()
        rows = query(metadata_dsn, "SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", DAG_ID, RUN_ID)
        return bool(rows) and rows[0][0] in ("success", "failed")

    wait_for("the DAG run to finish", finished, timeout_s=300, interval_s=1.0)
    run_s = time.monotonic() - triggered_at

    # --- Airflow: the run, each task on its queue and pool, the killed try and its retry ---
    state = query(metadata_dsn, "SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", DAG_ID, RUN_ID)[0][0]
    instances = _task_instances(metadata_dsn)
    assert state == "success", json.dumps(instances, default=str, indent=1) + processes.log("scheduler")
    assert all(ti["state"] == "success" for ti in instances), instances
    for ti in instances:
        expected_queue = "gpu" if ti["task_id"] == "score" else "default"
        expected_pool = {"score": "gpu"}.get(ti["task_id"], "pacs_associations" if ti["task_id"] in PACS_STAGES
                                             else "default_pool")  # fmt: skip
        assert (ti["queue"], ti["pool"]) == (expected_queue, expected_pool), ti
    gpu_workers = {"worker-gpu", "worker-gpu-restarted"}
    score = next(ti for ti in instances if ti["task_id"] == "score")
    assert score["hostname"] in gpu_workers, score
    retried = next(ti for ti in instances if ti["task_id"] == "retrieve" and ti["map_index"] == victim["map_index"])
    assert retried["try_number"] == victim["try_number"] + 1 and retried["hostname"] != killed_worker, retried
    history = query(
        metadata_dsn,
        "SELECT try_number, state, hostname FROM task_instance_history "
        "WHERE dag_id = %s AND run_id = %s AND task_id = 'retrieve' AND map_index = %s",
        DAG_ID,
        RUN_ID,
        victim["map_index"],
    )
    assert (victim["try_number"], "failed", killed_worker) in history, history
    retried_tasks = [ti for ti in instances if ti["try_number"] > 1]
    assert all(ti["task_id"] == "retrieve" for ti in retried_tasks), retried_tasks  # only what the kill hit

    # --- the ledger: run success; every chosen series staged complete, once ---
    rows = query(ledger_db.dsn.get_secret_value(), "SELECT run_id, status FROM runs WHERE run_key = %s",
                  f"airflow:{DAG_ID}:{RUN_ID}")  # fmt: skip
    assert len(rows) == 1 and rows[0][1] == "success", rows
    ledger_run = int(rows[0][0])
    mine = {record["index_study"]["study_uid"]: record for record in truth}
    ledger_dsn = ledger_db.dsn.get_secret_value()
    discovered = {r[0] for r in query(ledger_dsn, "SELECT study_uid FROM studies WHERE run_id = %s", ledger_run)}
    assert set(mine) <= discovered
    retrievals = query(
        ledger_dsn,
        "SELECT study_uid, complete, expected, received, path, attempts FROM retrievals WHERE run_id = %s",
        ledger_run,
    )
    assert {r[0] for r in retrievals} == set(mine)
    for study_uid, complete, expected, received, path, _attempts in retrievals:
        assert complete and expected == received, (study_uid, expected, received)
        staged = list(Path(path).glob("*.dcm"))  # complete instances, one file per SOP Instance UID
        assert len(staged) == expected, (path, len(staged), expected)  # nothing missing, nothing twice
    quarantined = dict(query(ledger_dsn, "SELECT study_uid, reason FROM quarantine WHERE run_id = %s", ledger_run))
    scored = {r[0]: r[1] for r in query(ledger_dsn, "SELECT study_uid, assessment_key FROM scores WHERE run_id = %s",
                                          ledger_run)}  # fmt: skip
    for uid in mine:
        assert (uid in scored) != (uid in quarantined), uid
        assert uid in scored or quarantined[uid] in POLICY_REASONS, quarantined[uid]
    assert len(scored) >= len(mine) // 2
    writebacks = query(
        ledger_dsn, "SELECT assessment_key, status, attempts, fhir_id FROM writebacks WHERE run_id = %s", ledger_run
    )
    assert sorted(w[0] for w in writebacks) == sorted(scored.values())
    assert all(w[1] == "created" and w[2] == 1 for w in writebacks), writebacks

    # --- HAPI: one RiskAssessment per key, each the one the outbox recorded ---
    by_patient: dict[str, list[str]] = {}
    with FhirClient(sandbox.fhir) as client:
        for resource in client.search("RiskAssessment", {"identifier": f"{identifier_system}|"}):
            by_patient.setdefault(resource["subject"]["reference"].removeprefix("Patient/"), []).append(resource["id"])
    expected_patients = {mine[uid]["identity"]["fhir_patient_id"] for uid in scored}
    assert set(by_patient) == expected_patients
    assert all(len(ids) == 1 for ids in by_patient.values()), by_patient
    assert sorted(i for ids in by_patient.values() for i in ids) == sorted(w[3] for w in writebacks)

    ran_on: dict[str, list[str]] = {}
    for ti in instances:
        label = ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['map_index']}]"
        ran_on.setdefault(str(ti["hostname"]), []).append(label)
    figures = {
        "patients": PATIENTS,
        "studies_scored": len(scored),
        "killed_worker": killed_worker,
        "killed_task": f"retrieve[{victim['map_index']}] try {victim['try_number']}",
        "killed_pids": len(killed_pids),
        "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
        "detect_s": round(detect_s, 1),
        "kill_to_retry_start_s": round((retried["start_date"] - _kill_time(killed_at)).total_seconds(), 1),
        "retried_on": retried["hostname"],
        "dag_run_s": round(run_s, 1),
        "test_wall_s": round(time.monotonic() - started, 1),
        "ran_on": ran_on,
    }
    print("\ncelery run figures: " + json.dumps(figures, default=str))


def _kill_time(monotonic_at: float) -> datetime:
    """The wall-clock instant (UTC, aware) of a ``time.monotonic()`` reading."""
    from datetime import UTC

    return datetime.now(UTC) - timedelta(seconds=time.monotonic() - monotonic_at)
