"""A riskbridge DAG run under Airflow's real scheduler, for benchmarks that measure what Airflow adds to a run.

:func:`scheduled_airflow` makes, for the length of a ``with`` block, an Airflow of the benchmark's own on this machine:
a metadata database of its own on the PostgreSQL cluster of ``settings.database`` (created on entry, dropped on exit),
an AIRFLOW_HOME under ``work`` prepared by :class:`riskbridge.airflow.local.LocalAirflow` (``airflow db migrate``,
riskbridge's pools and its three Connections from ``settings``), and Airflow's api-server, scheduler and dag-processor
as subprocesses with the LocalExecutor (``parallelism`` task processes at once). Each process's output goes to
``work/airflow-logs/<name>.log``; the tasks' own logs to ``work/airflow/logs``.

The tasks get the benchmark's riskbridge settings as ``RISKBRIDGE_*`` variables
(:func:`riskbridge.dev.processes.settings_environment`: every setting that differs from its default), with an empty
config file as ``RISKBRIDGE_CONFIG`` and none of this process's own ``RISKBRIDGE_*`` variables, so a riskbridge.toml
or a shell's variable cannot change what they run with; the Connections carry the same PACS, FHIR and ledger.

:meth:`ScheduledAirflow.trigger` unpauses a DAG and triggers a run through the REST API; :meth:`ScheduledAirflow.wait`
waits for it to finish and returns a :class:`DagRunTiming` read from the metadata database: the run's state and
timestamps and every task instance's start, end, duration and queued wait.

Run as a script it is its own smoke check (``.venv/bin/python bench/_airflow_scheduler.py``): a small synthetic cohort
loaded into the running sandbox, scored through ``riskbridge_on_demand`` with the shipped reference model; it prints
the timing summary and the ledger's counts.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psycopg2
import psycopg2.extensions
import requests

from riskbridge.airflow.dagkit import (
    BACKFILL_DAG_ID,
    COHORT_EXPORT_DAG_ID,
    MONITOR_DAG_ID,
    NIGHTLY_DAG_ID,
    ON_DEMAND_DAG_ID,
)
from riskbridge.airflow.local import LocalAirflow
from riskbridge.dev.pg import admin, query
from riskbridge.dev.processes import Processes, free_port, settings_environment, wait_for
from riskbridge.settings import Settings

ALL_DAG_IDS = (NIGHTLY_DAG_ID, BACKFILL_DAG_ID, ON_DEMAND_DAG_ID, COHORT_EXPORT_DAG_ID, MONITOR_DAG_ID)
FINISHED = ("success", "failed")
# Kept from this process's environment although it is RISKBRIDGE_*: not a setting, the site's pseudonym key itself,
# which the tasks must share with a `riskbridge run` of the same benchmark.
INHERITED_RISKBRIDGE = ("RISKBRIDGE_PSEUDONYM_KEY",)


@dataclass(frozen=True)
class TaskTiming:
    """One task instance of a DAG run (its last try; earlier tries are in ``task_instance_history``)."""

    task_id: str
    map_index: int  # -1: not mapped
    state: str | None
    try_number: int
    queued_at: datetime | None  # when the scheduler handed it to the executor (queued_dttm)
    start: datetime | None
    end: datetime | None
    duration_s: float | None
    pool: str
    queue: str

    @property
    def label(self) -> str:
        """``task_id`` or ``task_id[map_index]``."""
        return self.task_id if self.map_index < 0 else f"{self.task_id}[{self.map_index}]"

    @property
    def queued_wait_s(self) -> float | None:
        """Seconds from queued to started: the executor's and the task process's start-up."""
        if self.queued_at is None or self.start is None:
            return None
        return (self.start - self.queued_at).total_seconds()


@dataclass(frozen=True)
class DagRunTiming:
    """A finished (or timed-out) DAG run as the metadata database has it, and when :meth:`ScheduledAirflow.trigger`
    asked for it."""

    dag_id: str
    run_id: str
    state: str | None
    triggered_at: datetime  # just before the trigger request (UTC)
    queued_at: datetime | None
    start: datetime | None
    end: datetime | None
    tasks: tuple[TaskTiming, ...] = field(default=())

    @property
    def wall_s(self) -> float | None:
        """Seconds from the trigger request to the run's end (success or failure); None while it has not ended."""
        return None if self.end is None else (self.end - self.triggered_at).total_seconds()

    @property
    def task_s(self) -> float:
        """Total seconds the task instances ran (sum of their durations)."""
        return sum(task.duration_s or 0.0 for task in self.tasks)

    @property
    def queued_wait_s(self) -> float:
        """Total seconds the task instances waited between queued and started."""
        return sum(task.queued_wait_s or 0.0 for task in self.tasks)

    @property
    def critical_path_s(self) -> float:
        """The longest chain of task work, for riskbridge's pipeline DAGs: they are a chain of tasks in which only the
        instances of one mapped task run side by side, so it is the sum over task ids of the longest instance."""
        longest: dict[str, float] = {}
        for task in self.tasks:
            longest[task.task_id] = max(longest.get(task.task_id, 0.0), task.duration_s or 0.0)
        return sum(longest.values())

    @property
    def scheduler_overhead_s(self) -> float | None:
        """What Airflow added: :attr:`wall_s` less :attr:`critical_path_s` (creating the run, handing each task to
        the executor, starting its process, noticing it ended); None while the run has not ended."""
        wall = self.wall_s
        return None if wall is None else wall - self.critical_path_s

    def summary(self) -> dict[str, Any]:
        """The run's figures as JSON-ready values (seconds rounded to 0.01) with one row per task instance."""

        def seconds(value: float | None) -> float | None:
            return None if value is None else round(value, 2)

        started = None if self.start is None else (self.start - self.triggered_at).total_seconds()
        return {
            "dag_id": self.dag_id,
            "run_id": self.run_id,
            "state": self.state,
            "wall_s": seconds(self.wall_s),
            "trigger_to_start_s": seconds(started),
            "task_instances": len(self.tasks),
            "task_s": seconds(self.task_s),
            "queued_wait_s": seconds(self.queued_wait_s),
            "critical_path_s": seconds(self.critical_path_s),
            "scheduler_overhead_s": seconds(self.scheduler_overhead_s),
            "tasks": [
                {
                    "task": task.label,
                    "state": task.state,
                    "try": task.try_number,
                    "duration_s": seconds(task.duration_s),
                    "queued_wait_s": seconds(task.queued_wait_s),
                }
                for task in self.tasks
            ],
        }


@dataclass
class ScheduledAirflow:
    """The running Airflow of :func:`scheduled_airflow`: its home, metadata database, processes and API."""

    local: LocalAirflow
    metadata_dsn: str  # libpq DSN of the metadata database (for reading it directly)
    api_url: str  # http://127.0.0.1:<port>
    env: dict[str, str]  # what the Airflow processes (and so the tasks) run with: holds credentials, never log it
    processes: Processes
    triggered: dict[tuple[str, str], datetime] = field(default_factory=dict)

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of one SQL statement on the metadata database."""
        return query(self.metadata_dsn, sql, *args)

    def trigger(
        self,
        dag_id: str,
        conf: Mapping[str, Any],
        run_id: str,
        logical_date: datetime | None = None,
        data_interval: tuple[datetime, datetime] | None = None,
    ) -> str:
        """Unpause ``dag_id`` and trigger a run of it with ``conf`` through the REST API; return the run id.

        ``logical_date`` and ``data_interval`` are for the nightly DAG (its window); the other DAGs take their scope
        from ``conf`` and need neither.
        """
        self.processes.check_alive()
        answer = requests.patch(f"{self.api_url}/api/v2/dags/{dag_id}", json={"is_paused": False}, timeout=30)
        if not answer.ok:
            raise RuntimeError(f"unpausing {dag_id}: HTTP {answer.status_code}: {answer.text[:500]}")
        body: dict[str, Any] = {
            "dag_run_id": run_id,
            "logical_date": None if logical_date is None else logical_date.isoformat(),
            "conf": dict(conf),
        }
        if data_interval is not None:
            body["data_interval_start"], body["data_interval_end"] = (moment.isoformat() for moment in data_interval)
        triggered_at = datetime.now(UTC)
        answer = requests.post(f"{self.api_url}/api/v2/dags/{dag_id}/dagRuns", json=body, timeout=30)
        if not answer.ok:  # the answer may echo conf (accession numbers): say only what failed
            raise RuntimeError(f"triggering {dag_id} run {run_id}: HTTP {answer.status_code}")
        created = str(answer.json()["dag_run_id"])
        self.triggered[(dag_id, created)] = triggered_at
        return created

    def state(self, dag_id: str, run_id: str) -> str | None:
        """The DAG run's state now (queued, running, success, failed), None before it exists."""
        rows = self.query("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", dag_id, run_id)
        return str(rows[0][0]) if rows else None

    def wait(self, dag_id: str, run_id: str, timeout_s: float = 1800.0, interval_s: float = 0.5) -> DagRunTiming:
        """Wait until the run has succeeded or failed and return its timing; :class:`TimeoutError` after
        ``timeout_s`` (and :class:`RuntimeError` with its log's end when an Airflow process dies meanwhile)."""

        def finished() -> bool:
            self.processes.check_alive()
            return self.state(dag_id, run_id) in FINISHED

        wait_for(f"{dag_id} run {run_id} to finish", finished, timeout_s=timeout_s, interval_s=interval_s)
        return self.timing(dag_id, run_id)

    def timing(self, dag_id: str, run_id: str) -> DagRunTiming:
        """The run and its task instances as the metadata database has them now."""
        runs = self.query(
            "SELECT state, queued_at, start_date, end_date FROM dag_run WHERE dag_id = %s AND run_id = %s",
            dag_id,
            run_id,
        )
        if not runs:
            raise LookupError(f"no run {run_id} of {dag_id}")
        state, queued_at, start, end = runs[0]
        rows = self.query(
            "SELECT task_id, map_index, state, try_number, queued_dttm, start_date, end_date, duration, pool, queue "
            "FROM task_instance WHERE dag_id = %s AND run_id = %s ORDER BY start_date NULLS LAST, task_id, map_index",
            dag_id,
            run_id,
        )
        tasks = tuple(
            TaskTiming(str(t), int(m), s, int(n), q, b, e, None if d is None else float(d), str(p), str(u))
            for t, m, s, n, q, b, e, d, p, u in rows
        )
        # A run triggered elsewhere (the UI, a schedule): its creation stands in for the trigger.
        triggered_at = self.triggered.get((dag_id, run_id)) or queued_at or start
        return DagRunTiming(dag_id, run_id, state, triggered_at, queued_at, start, end, tasks)


def sqlalchemy_url(dsn: str) -> str:
    """The ``postgresql+psycopg2://`` URL Airflow's metadata setting takes for a libpq DSN (other libpq parameters,
    such as sslmode, as its query)."""
    parts = dict(psycopg2.extensions.parse_dsn(dsn))
    user = quote(parts.pop("user", ""), safe="")
    password = parts.pop("password", None)
    credentials = f"{user}:{quote(password, safe='')}@" if password else (f"{user}@" if user else "")
    host = parts.pop("host", "127.0.0.1")
    port = parts.pop("port", "5432")
    dbname = quote(parts.pop("dbname", ""), safe="")
    query = f"?{urlencode(sorted(parts.items()))}" if parts else ""
    return f"postgresql+psycopg2://{credentials}{host}:{port}/{dbname}{query}"


def child_environment(settings: Settings, config_file: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) without its ``RISKBRIDGE_*`` and ``AIRFLOW*`` variables, with
    ``settings`` as ``RISKBRIDGE_*`` variables and ``config_file`` (written empty here) as riskbridge's config file."""
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text("# empty: the tasks' settings come from RISKBRIDGE_* variables\n")
    source = os.environ if base is None else base
    env = {
        name: value
        for name, value in source.items()
        if name in INHERITED_RISKBRIDGE or not name.startswith(("RISKBRIDGE_", "AIRFLOW"))
    }
    return {**env, **settings_environment(settings), "RISKBRIDGE_CONFIG": str(config_file)}


@contextmanager
def scheduled_airflow(
    settings: Settings,
    work: Path,
    parallelism: int = 4,
    dag_ids: Sequence[str] = ALL_DAG_IDS,
    airflow_config: Mapping[str, str] | None = None,
    start_timeout_s: float = 300.0,
) -> Iterator[ScheduledAirflow]:
    """Start an Airflow of its own (module docstring) for ``settings``, yield it once ``dag_ids`` are parsed and the
    api-server answers, and stop its processes and drop its metadata database when the block ends, also on error.

    ``parallelism``: ``[core] parallelism``, the LocalExecutor's task processes at once (pools still apply: PACS and
    GPU slots from ``settings.airflow``). ``airflow_config``: further ``AIRFLOW__<SECTION>__<KEY>`` variables, e.g.
    scheduler tuning, on top of this function's.
    """
    work = work.resolve()
    admin_dsn = settings.database.dsn.get_secret_value()
    name = f"rb_airflow_{uuid.uuid4().hex[:8]}"
    metadata_dsn = psycopg2.extensions.make_dsn(admin_dsn, dbname=name)
    admin(admin_dsn, f'CREATE DATABASE "{name}"')
    processes = Processes(work / "airflow-logs")
    try:
        local = LocalAirflow(home=work / "airflow", metadata_url=sqlalchemy_url(metadata_dsn))
        api_port = free_port()
        airflow_env = {
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            # Fresh per Airflow: the api-server signs the tasks' tokens with it, the tasks' supervisors check them.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            # Only the runs the benchmark triggers: no scheduled night when the nightly DAG is unpaused.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",  # the REST API on loopback, without a token
            **(airflow_config or {}),
        }
        env = local.environment({**child_environment(settings, work / "riskbridge-empty.toml"), **airflow_env})
        local.init(settings)  # airflow db migrate, pools, the Connections (PACS, FHIR, this ledger)
        airflow = [sys.executable, "-m", "airflow"]
        api = [*airflow, "api-server", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "1"]
        processes.start("api-server", api, env)
        processes.start("scheduler", [*airflow, "scheduler"], env)
        processes.start("dag-processor", [*airflow, "dag-processor"], env)
        running = ScheduledAirflow(local, metadata_dsn, f"http://127.0.0.1:{api_port}", env, processes)

        def parsed() -> bool:
            processes.check_alive()
            errors = running.query("SELECT filename, stacktrace FROM import_error")
            if errors:
                raise RuntimeError(f"DAG import errors: {errors}")
            rows = running.query("SELECT dag_id FROM serialized_dag WHERE dag_id = ANY(%s)", list(dag_ids))
            return {row[0] for row in rows} == set(dag_ids)

        def api_up() -> bool:
            processes.check_alive()
            try:
                return requests.get(f"{running.api_url}/api/v2/monitor/health", timeout=2).ok
            except requests.RequestException:
                return False

        wait_for("the DAGs parsed by the dag-processor", parsed, timeout_s=start_timeout_s, interval_s=1.0)
        wait_for("the api-server", api_up, timeout_s=start_timeout_s, interval_s=1.0)
        yield running
    finally:
        processes.stop_all()
        with contextlib.suppress(psycopg2.Error):  # the drop must not hide the block's own error
            admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def ledger_counts(settings: Settings, dag_id: str, run_id: str) -> dict[str, Any]:
    """What the ledger of ``settings`` recorded for a DAG run: its status, the studies it scored, and the studies it
    quarantined by reason (``ledger_status`` None: the run never reached start_run)."""
    from riskbridge.airflow.dagkit import run_key

    connection = psycopg2.connect(settings.database.dsn.get_secret_value())
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute("SELECT run_id, status FROM runs WHERE run_key = %s", (run_key(dag_id, run_id),))
            ledger_run, status = cursor.fetchone() or (None, None)
            cursor.execute("SELECT count(*) FROM scores WHERE run_id = %s", (ledger_run,))
            scored = int(cursor.fetchone()[0])
            cursor.execute("SELECT reason, count(*) FROM quarantine WHERE run_id = %s GROUP BY reason", (ledger_run,))
            quarantined = {str(reason): int(count) for reason, count in cursor.fetchall()}
    finally:
        connection.close()
    return {"ledger_run": ledger_run, "ledger_status": status, "scored": scored, "quarantined": quarantined}


def _smoke(patients: int, seed: int, keep: bool) -> int:
    """The module's self-check on the running sandbox; return 0 when the run succeeded and its studies were scored."""
    import json
    import random
    import shutil
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _site import synthetic_site

    from riskbridge.dev.synth import EdgeCaseRates, generate, load, read_truth
    from riskbridge.settings import load_settings

    base = load_settings()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="rb-bench-airflow-"))
    try:
        cohort = work / "cohort"
        clean = EdgeCaseRates(shared_mrn=0, no_fhir_patient=0, no_usable_series=0, pacs_missing_issuer=0)
        generate(cohort, patients=patients, seed=seed or random.randint(10**6, 10**9), size="small", rates=clean)
        load(cohort, f"http://127.0.0.1:{base.sandbox.orthanc_http_port}", base.fhir.base_url)
        accessions = [record["index_study"]["accession"] for record in read_truth(cohort)]
        with synthetic_site(base, work, "rb_bench_airflow") as site:
            writeback = site.writeback.model_copy(
                update={"identifier_system": f"urn:riskbridge:bench-airflow-{uuid.uuid4().hex[:8]}"}
            )
            settings = site.model_copy(update={"writeback": writeback})
            prepared = time.monotonic()
            with scheduled_airflow(settings, work, dag_ids=(ON_DEMAND_DAG_ID,)) as airflow:
                up = time.monotonic()
                run_id = airflow.trigger(ON_DEMAND_DAG_ID, {"accessions": accessions}, f"smoke_{uuid.uuid4().hex[:8]}")
                timing = airflow.wait(ON_DEMAND_DAG_ID, run_id, timeout_s=600)
                done = time.monotonic()
                if timing.state != "success":  # the task logs say why; they stay (below), not printed (UIDs)
                    keep = True
                    failed = [task.label for task in timing.tasks if task.state != "success"]
                    print(f"run {timing.state}; tasks not successful: {failed}; logs: {airflow.local.home / 'logs'}")
            counts = ledger_counts(settings, ON_DEMAND_DAG_ID, run_id)
        figures = {
            **timing.summary(),
            "studies": len(accessions),
            **counts,
            "cohort_and_ledger_s": round(prepared - started, 1),
            "airflow_start_s": round(up - prepared, 1),
            "trigger_to_seen_finished_s": round(done - up, 1),
            "smoke_wall_s": round(time.monotonic() - started, 1),
        }
        print(json.dumps(figures, indent=1, default=str))
        return 0 if timing.state == "success" and counts["ledger_status"] == "success" and counts["scored"] else 1
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Smoke check: riskbridge_on_demand under the real scheduler.")
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="0: a random seed (accessions of their own)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) afterwards")
    arguments = parser.parse_args()
    raise SystemExit(_smoke(arguments.patients, arguments.seed, arguments.keep))
