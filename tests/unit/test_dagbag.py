"""The DAG files parse without errors, fast and without torch/MONAI, into the task graph the pipeline needs."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk import CronTriggerTimetable, TriggerRule

from riskbridge.airflow import dagkit
from riskbridge.settings import Settings

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
DAG_IDS = {"riskbridge_nightly", "riskbridge_backfill", "riskbridge_on_demand", "riskbridge_cohort_export"}
MONITOR = "riskbridge_monitor"  # not a pipeline run: one task, no ledger run
STAGE_ORDER = [
    "start_run",
    "discover",
    "match",
    "select",
    "plan_retrieve",
    "retrieve",
    "plan_clinical",
    "clinical",
    "harmonize",
    "score",
    "write_back",
    "report",
    "finish_run",
]

# Run in a fresh interpreter: Airflow's SDK is imported first (the DAG processor has it loaded), then only the DAG
# file's own import is timed.
_IMPORT_PROBE = """
import importlib.util, json, sys, time
from airflow.sdk import DAG, Param, CronTriggerTimetable, TriggerRule, chain, task
path = sys.argv[1]
spec = importlib.util.spec_from_file_location("probe_dag", path)
module = importlib.util.module_from_spec(spec)
started = time.perf_counter()
spec.loader.exec_module(module)
seconds = time.perf_counter() - started
heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "monai"))
print(json.dumps({"seconds": seconds, "heavy": heavy, "dag_id": module.dag.dag_id}))
"""


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    """The DAG folder parsed once, with riskbridge's defaults (no RISKBRIDGE_* variable from the shell)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("RISKBRIDGE_")]:
            patch.delenv(name)
        return DagBag(dag_folder=DAGS_FOLDER)


def test_dag_files_import_without_errors(dagbag: DagBag) -> None:
    assert dagbag.import_errors == {}
    assert set(dagbag.dags) == DAG_IDS | {MONITOR}


@pytest.mark.parametrize("dag_file", sorted(DAGS_FOLDER.glob("*.py")), ids=lambda path: path.name)
def test_dag_file_imports_fast_and_without_torch(dag_file: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, str(dag_file)],
        capture_output=True,
        text=True,
        check=False,
        env={**_clean_environment(), "AIRFLOW_HOME": str(tmp_path)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["dag_id"] == dag_file.stem
    assert probe["heavy"] == []
    assert probe["seconds"] < 1.0, f"{dag_file.name} took {probe['seconds']:.2f} s to import"


def _clean_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith(("RISKBRIDGE_", "AIRFLOW_"))}


EXPORT_ORDER = [*STAGE_ORDER[: STAGE_ORDER.index("harmonize") + 1], "export_table"]


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
def test_every_dag_runs_the_stages_in_order(dagbag: DagBag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    order = EXPORT_ORDER if dag_id == "riskbridge_cohort_export" else STAGE_ORDER
    assert {task.task_id for task in dag.tasks} == set(order)
    for upstream, downstream in itertools.pairwise(order):
        assert upstream in dag.get_task(downstream).upstream_task_ids, f"{upstream} -> {downstream}"
    # Every stage knows its ledger run: start_run feeds each task directly.
    assert all("start_run" in dag.get_task(task_id).upstream_task_ids for task_id in order[1:])


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
def test_tasks_retry_with_backoff_time_out_and_report_failures(dagbag: DagBag, dag_id: str) -> None:
    defaults = Settings().airflow
    for task in dagbag.dags[dag_id].tasks:
        assert task.retries == defaults.retries
        assert task.retry_exponential_backoff == defaults.retry_backoff > 1
        assert task.retry_delay == timedelta(seconds=defaults.retry_delay_s)
        assert task.max_retry_delay == timedelta(seconds=defaults.max_retry_delay_s)
        assert task.execution_timeout == timedelta(minutes=defaults.task_timeout_min)
        callbacks = task.on_failure_callback
        assert dagkit.on_task_failure in (callbacks if isinstance(callbacks, list) else [callbacks])


def test_pools_mapping_and_trigger_rules(dagbag: DagBag) -> None:
    dag = dagbag.dags["riskbridge_nightly"]
    mapped = {task.task_id for task in dag.tasks if type(task).__name__ == "DecoratedMappedOperator"}
    assert mapped == {"retrieve", "clinical"}
    # The stages that hold PACS associations share the PACS pool (riskbridge.stages.STAGES: resource "pacs").
    in_pacs_pool = {task.task_id for task in dag.tasks if task.pool == "pacs_associations"}
    assert in_pacs_pool == {"discover", "select", "retrieve"}
    assert dag.get_task("score").pool == "gpu"
    assert dag.get_task("clinical").max_active_tis_per_dagrun == Settings().airflow.clinical_parallelism
    # A resumed run may have nothing left to retrieve or fetch: the mapped task is skipped, the run goes on.
    assert dag.get_task("plan_clinical").trigger_rule == TriggerRule.NONE_FAILED
    assert dag.get_task("harmonize").trigger_rule == TriggerRule.NONE_FAILED
    assert dag.get_task("score").trigger_rule == TriggerRule.ALL_SUCCESS


def test_schedules_and_params(dagbag: DagBag) -> None:
    nightly = dagbag.dags["riskbridge_nightly"]
    assert isinstance(nightly.timetable, CronTriggerTimetable)
    assert (nightly.timetable.expression, nightly.timetable.interval) == ("0 2 * * *", timedelta(hours=24))
    assert nightly.catchup is False and nightly.max_active_runs == 1
    assert dagbag.dags["riskbridge_backfill"].schedule is None
    assert dagbag.dags["riskbridge_on_demand"].schedule is None
    assert set(dagbag.dags["riskbridge_backfill"].params) == {"start", "end", "rescore"}
    assert dagbag.dags["riskbridge_on_demand"].params.validate() == {
        "accessions": [],
        "patient_ids": [],
        "rescore": False,
    }
    assert nightly.params.validate() == {"rescore": False}


def test_settings_shape_the_nightly_dag() -> None:
    settings = Settings(
        site={"timezone": "Europe/Berlin"},
        airflow={"schedule": "30 1 * * 1-5", "nightly_window_hours": 72, "retries": 1, "score_queue": "gpu"},
    )
    dag = dagkit.nightly_dag(settings)
    timetable = dag.timetable
    assert isinstance(timetable, CronTriggerTimetable)
    assert (timetable.expression, timetable.interval) == ("30 1 * * 1-5", timedelta(hours=72))
    assert timetable.timezone == "Europe/Berlin"
    assert dag.get_task("score").queue == "gpu"
    assert dag.get_task("discover").retries == 1


def test_run_key_ties_an_airflow_run_to_one_ledger_run() -> None:
    assert dagkit.run_key("riskbridge_nightly", "scheduled__2026-03-10T02:00:00+00:00") == (
        "airflow:riskbridge_nightly:scheduled__2026-03-10T02:00:00+00:00"
    )


def test_backfill_window_covers_both_days_in_the_site_zone() -> None:
    settings = Settings(site={"timezone": "Europe/Berlin"})
    window, accessions, patient_ids = dagkit.run_scope(
        "backfill", {"params": {"start": "2026-03-28", "end": "2026-03-29"}}, settings
    )
    # 2026-03-29 is the spring-forward day in Berlin: 23 hours long.
    assert window is not None and (accessions, patient_ids) == ((), ())
    assert (window[0].astimezone(UTC), window[1].astimezone(UTC)) == (
        datetime(2026, 3, 27, 23, tzinfo=UTC),
        datetime(2026, 3, 29, 22, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("start", "end", "timezone", "message"),
    [
        ("2026-03-02", "2026-03-01", "UTC", "before it starts"),
        ("yesterday", "2026-03-01", "UTC", "must be dates"),
        ("2026-03-01", "2026-03-01", None, "set site.timezone"),
    ],
)
def test_bad_backfill_dates_are_refused(start: str, end: str, timezone: str | None, message: str) -> None:
    settings = Settings(site={"timezone": timezone})
    with pytest.raises(Exception, match=message):
        dagkit.run_scope("backfill", {"params": {"start": start, "end": end}}, settings)


def test_on_demand_scope_needs_an_identifier() -> None:
    assert dagkit.run_scope("on_demand", {"params": {"accessions": [" A1 ", ""], "patient_ids": []}}, Settings()) == (
        None,
        ("A1",),
        (),
    )
    with pytest.raises(ValueError, match="needs accession numbers or patient IDs"):
        dagkit.run_scope("on_demand", {"params": {"accessions": [], "patient_ids": []}}, Settings())


def test_the_cohort_export_dag_stops_at_harmonize_and_writes_the_table(dagbag: DagBag) -> None:
    dag = dagbag.dags["riskbridge_cohort_export"]
    assert dag.schedule is None and set(dag.params) == {"start", "end", "out", "labels"}
    assert {"score", "write_back", "report", "finish_run"}.isdisjoint(dag.task_ids)
    assert dag.get_task("export_table").trigger_rule == TriggerRule.NONE_FAILED
    assert dagkit.stages_of("export")[-1].name == "harmonize"


def test_the_monitor_dag_runs_weekly_in_the_site_zone_and_fails_on_an_alert_without_retries(dagbag: DagBag) -> None:
    dag = dagbag.dags[MONITOR]
    assert dag.task_ids == ["monitor"] and set(dag.params) == {"start", "end", "table"}
    timetable = dag.timetable
    assert isinstance(timetable, CronTriggerTimetable)
    assert (timetable.expression, timetable.interval) == (Settings().monitor.schedule, timedelta(days=7))
    (task,) = dag.tasks
    assert task.retries == 0 and not task.on_failure_callback

    zone = "America/New_York"
    settings = Settings(site={"timezone": zone})
    start, end = datetime(2026, 11, 2, 11, tzinfo=UTC), datetime(2026, 11, 9, 11, tzinfo=UTC)
    context = {"params": {"start": "", "end": ""}, "data_interval_start": start, "data_interval_end": end}
    window, outcomes = dagkit.monitor_windows(context, settings)
    assert window == (start, end)
    assert outcomes == (start - timedelta(days=455), end - timedelta(days=455))
    given = {"params": {"start": "2026-03-01", "end": "2026-03-07"}, **{k: context[k] for k in list(context)[1:]}}
    window, _ = dagkit.monitor_windows(given, settings)
    assert window == (datetime(2026, 3, 1, 5, tzinfo=UTC), datetime(2026, 3, 8, 5, tzinfo=UTC))
