"""The wiring the three DAG files in dags/ share: one Airflow task per pipeline stage, thin over riskbridge.pipeline.

The tasks come from the stage list (:data:`riskbridge.stages.STAGES`): start_run, then one task per stage, a chunked
stage as a ``plan_<stage>`` task and the stage's task mapped over its chunks, then report and finish_run. Today:
start_run -> discover -> match -> select -> plan_retrieve -> retrieve (mapped over series chunks) -> plan_clinical
-> clinical (mapped over study chunks) -> harmonize -> score -> write_back -> report -> finish_run. Stages that hold
PACS associations run in the pool ``pacs_associations``, scoring in the pool ``gpu`` (and ``[airflow] score_queue``).

The ledger run is keyed ``airflow:<dag_id>:<run_id>``, so a retried task or a cleared DAG run resumes the same
ledger run, and every stage only does what the ledger says is left. XCom carries the ledger run id, the UID chunks
the mapped tasks work on and each stage's counts; the data itself lives in staging and the ledger. Credentials come
from the Airflow Connections named in [airflow] (riskbridge.airflow.hooks).

Parsing a DAG file imports this module, riskbridge.settings and Airflow only: the pipeline (and with it torch and
MONAI) is imported inside the tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from riskbridge.settings import Settings, SettingsError, load_settings
from riskbridge.stages import STAGE_NAMES, STAGES, Stage

if TYPE_CHECKING:
    from airflow.sdk import DAG

    from riskbridge.pipeline import Pipeline

log = logging.getLogger(__name__)

NIGHTLY_DAG_ID = "riskbridge_nightly"
BACKFILL_DAG_ID = "riskbridge_backfill"
ON_DEMAND_DAG_ID = "riskbridge_on_demand"
COHORT_EXPORT_DAG_ID = "riskbridge_cohort_export"
MONITOR_DAG_ID = "riskbridge_monitor"
# Airflow creates no task for a logical date before a task's start_date: early, so past windows can run by hand
# (airflow dags test, a cleared old run). catchup is off, so the scheduler never fills the years in between.
START_DATE = datetime(2000, 1, 1, tzinfo=UTC)


def run_key(dag_id: str, airflow_run_id: str) -> str:
    """Return the ledger run key of an Airflow DAG run: retries and cleared runs map to the same ledger run."""
    return f"airflow:{dag_id}:{airflow_run_id}"


def task_settings() -> Settings:
    """Load riskbridge's settings as a task sees them: config file and environment, then the Airflow Connections.

    Every task starts here, so this is where a task makes what it writes private (reports, staging, tables:
    :func:`riskbridge.filemodes.use_private_umask`) and refuses Connections with a well-known default secret.
    """
    from riskbridge.airflow.hooks import settings_with_connections
    from riskbridge.credentials import default_secret_problems
    from riskbridge.filemodes import use_private_umask

    use_private_umask()
    settings = settings_with_connections(load_settings())
    # load_settings checked the config file and environment; the Connections bring credentials it never saw.
    defaults = default_secret_problems(settings)
    if defaults:
        raise SettingsError(f"invalid settings from the Airflow Connections: {'; '.join(defaults)}")
    return settings


@contextmanager
def open_pipeline(settings: Settings | None = None) -> Iterator[Pipeline]:
    """Yield a Pipeline built from ``settings`` (default: :func:`task_settings`) and close it afterwards."""
    from riskbridge.pipeline import Pipeline  # its DICOM connector keeps pynetdicom's identifier dumps out of logs

    pipeline = Pipeline.from_settings(settings if settings is not None else task_settings())
    try:
        yield pipeline
    finally:
        pipeline.close()


def _progress_logger(stage: str) -> Callable[[int, int], None]:
    """Return a ``progress(done, total)`` callback that logs each quarter of the stage once (the counts follow)."""
    logged: set[int] = set()

    def report(done: int, total: int) -> None:
        quarter = 4 if total <= 0 else (4 * done) // total
        if quarter and quarter < 4 and quarter not in logged:
            logged.add(quarter)
            log.info("%s: %d/%d", stage, done, total)

    return report


def _log_counts(counts: Mapping[str, Any], run_id: int) -> None:
    log.info(
        "%s: done=%d skipped=%d quarantined=%d failed=%d in %.1f s (ledger run %d)",
        counts["stage"],
        counts["done"],
        counts["skipped"],
        counts["quarantined"],
        counts["failed"],
        counts["seconds"],
        run_id,
    )


def run_stage(stage: str, run_id: int, items: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one pipeline stage (a chunk of it: ``items``) for the ledger run, log its counts and return them (the
    task's XCom)."""
    with open_pipeline() as pipeline:
        result = pipeline.run_stage(stage, run_id, items, progress=_progress_logger(stage))
    counts: dict[str, Any] = result.to_dict()
    _log_counts(counts, run_id)
    return counts


def _as_datetime(value: datetime) -> datetime:
    """Airflow hands out pendulum datetimes; the ledger gets plain, timezone-aware ones."""
    return datetime.fromtimestamp(value.timestamp(), tz=UTC)


def backfill_window(start: str, end: str, settings: Settings) -> tuple[datetime, datetime]:
    """Return the window from ``start`` 00:00 to the end of ``end`` (ISO dates, both included) in the site zone."""
    from riskbridge.pipeline import PipelineError, window_of_days

    try:
        first, last = date.fromisoformat(start), date.fromisoformat(end)
    except (TypeError, ValueError):
        raise ValueError(f"backfill start and end must be dates like 2026-01-31 (got {start!r}, {end!r})") from None
    if settings.site.timezone is None:
        raise PipelineError("a backfill's days are site days: set site.timezone (RISKBRIDGE_SITE__TIMEZONE)")
    return window_of_days(first, last, settings.site.timezone)


def _identifiers(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"on-demand param {name!r} must be a list of strings")
    return tuple(item.strip() for item in value if item.strip())


def run_scope(
    kind: str, context: Mapping[str, Any], settings: Settings
) -> tuple[tuple[datetime, datetime] | None, tuple[str, ...], tuple[str, ...]]:
    """Return (window, accessions, patient IDs) of a DAG run: the data interval, the backfill dates or the params."""
    params = context["params"]
    if kind == "nightly":  # the first night's window; later nights continue the coverage (start_ledger_run)
        return (_as_datetime(context["data_interval_start"]), _as_datetime(context["data_interval_end"])), (), ()
    if kind in ("backfill", "export"):
        return backfill_window(params["start"], params["end"], settings), (), ()
    if kind == "on_demand":
        accessions = _identifiers(params.get("accessions"), "accessions")
        patient_ids = _identifiers(params.get("patient_ids"), "patient_ids")
        if not accessions and not patient_ids:
            raise ValueError("an on-demand run needs accession numbers or patient IDs (params accessions, patient_ids)")
        return None, accessions, patient_ids
    raise ValueError(f"unknown run kind {kind!r}")


def start_ledger_run(kind: str, context: Mapping[str, Any]) -> int:
    """Open (or resume) the ledger run of this DAG run and return its id; the scope comes from the kind.

    A nightly run continues the coverage from its watermark to its trigger (the data interval's end; its start
    only begins the job's first window); one further behind than the maximum catch-up fails without retries,
    naming the gap and the backfill. The param ``rescore`` does decided work again."""
    from airflow.sdk.exceptions import AirflowFailException

    from riskbridge.coverage import CoverageGapError

    window, accessions, patient_ids = run_scope(kind, context, load_settings())
    rescore = bool(context["params"].get("rescore", False))
    key = run_key(context["dag"].dag_id, context["run_id"])
    with open_pipeline() as pipeline:
        if kind == "export" and window is not None:
            from riskbridge.cohort import start_export_run

            ledger_run = start_export_run(pipeline, window, key)
        elif kind == "nightly" and window is not None:
            try:
                ledger_run = pipeline.start_nightly_run(key, trigger=window[1], first_start=window[0], rescore=rescore)
            except CoverageGapError as exc:
                log.error("%s", exc)
                raise AirflowFailException(str(exc)) from None
            run = pipeline.ledger.run(ledger_run)
            window = run.window
            if run.watermark is not None:
                log.info("nightly coverage continues from %s", run.watermark.isoformat())
        else:
            ledger_run = pipeline.start_run(kind, key, window, accessions, patient_ids, rescore=rescore)
    scope = (
        f"window {window[0].isoformat()} .. {window[1].isoformat()}"
        if window
        else f"{len(accessions)} accession(s), {len(patient_ids)} patient ID(s)"
    )
    log.info("ledger run %d (%s) for %s, %s%s", ledger_run, kind, key, scope, " (rescore)" if rescore else "")
    return ledger_run


def plan_chunks(stage: str, run_id: int) -> list[list[str]]:
    """Return the UID chunks a chunked stage (``retrieve``, ``clinical``) still has to do; each chunk becomes one
    mapped task."""
    with open_pipeline() as pipeline:
        chunks = pipeline.chunks(stage, run_id)
    log.info("%s: %d item(s) left in %d chunk(s) (ledger run %d)", stage, sum(map(len, chunks)), len(chunks), run_id)
    return chunks


def _stage_results(value: Any) -> list[Mapping[str, Any]]:
    """Normalize an xcom_pull of one task: None (skipped), one dict, or a list of dicts (mapped)."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [value]
    return [item for item in value if isinstance(item, Mapping)]


def write_report(run_id: int, context: Mapping[str, Any]) -> str:
    """Write the run's HTML report, log every stage's summed counts and the report's location; return its path."""
    task_instance = context["ti"]
    header = f"{'stage':<11}{'tasks':>6}{'done':>8}{'skipped':>9}{'quarantined':>13}{'failed':>8}{'seconds':>9}"
    lines = [header]
    for stage in STAGE_NAMES:
        results = _stage_results(task_instance.xcom_pull(task_ids=stage))
        totals = {
            name: sum(result[name] for result in results) for name in ("done", "skipped", "quarantined", "failed")
        }
        seconds = sum(float(result["seconds"]) for result in results)
        lines.append(
            f"{stage:<11}{len(results):>6}{totals['done']:>8}{totals['skipped']:>9}{totals['quarantined']:>13}"
            f"{totals['failed']:>8}{seconds:>9.1f}"
        )
    log.info("ledger run %d, stage counts:\n%s", run_id, "\n".join(lines))
    with open_pipeline() as pipeline:
        path = pipeline.report(run_id).resolve()
    log.info("run report: %s", path.as_uri())
    return str(path)


def write_export_table(run_id: int, params: Mapping[str, Any]) -> str:
    """Label the export run's patients and write its training table to the param ``out`` (the label spec: param
    ``labels``, else ``[export] label_spec``); return the table's path."""
    from riskbridge.cohort import write_table

    settings = task_settings()
    if params.get("labels"):
        settings = settings.model_copy(
            update={"export": settings.export.model_copy(update={"label_spec": params["labels"]})}
        )
    with open_pipeline(settings) as pipeline:
        result = write_table(pipeline, run_id, Path(params["out"]))
    excluded = ", ".join(f"{reason} {n}" for reason, n in sorted(result.excluded.items())) or "none"
    log.info("export run %d: %d rows (%d positive) in %s; left out: %s", run_id, result.rows, result.positives,
             result.table, excluded)  # fmt: skip
    return str(result.table)


def finish_ledger_run(run_id: int) -> None:
    """Mark the ledger run successful, unless it quarantined so much that a site setting is likely wrong: then the
    task fails without retries (the failure callback marks the run failed) and the DAG run shows red."""
    from airflow.sdk.exceptions import AirflowFailException

    with open_pipeline() as pipeline:
        alert = pipeline.finish(run_id)
    if alert is not None:
        log.error("%s", alert)
        raise AirflowFailException(alert)
    log.info("ledger run %d finished", run_id)


def on_task_failure(context: Mapping[str, Any]) -> None:
    """Failure callback: log the ledger run and task, and mark the ledger run failed (a cleared run resumes it)."""
    task_instance = context["ti"]
    key = run_key(task_instance.dag_id, task_instance.run_id)
    exception = context.get("exception")
    ledger_run = task_instance.xcom_pull(task_ids="start_run", map_indexes=-1)
    log.error(
        "riskbridge task %s (map index %s) failed with %s; ledger run %s, %s",
        task_instance.task_id,
        task_instance.map_index,
        type(exception).__name__ if exception is not None else "an unknown error",
        ledger_run,
        key,
    )
    if ledger_run is None:
        log.error("no ledger run to mark failed: start_run did not finish for %s", key)
        return
    try:
        with open_pipeline() as pipeline:
            pipeline.finish_run(int(ledger_run), status="failed")
    except Exception:  # the callback must not hide the task's own failure behind its own
        log.exception("could not mark ledger run %s failed", ledger_run)


def default_args(settings: Settings) -> dict[str, Any]:
    """Return the retry, backoff, timeout and callback arguments every riskbridge task gets."""
    config = settings.airflow
    return {
        "owner": "riskbridge",
        "retries": config.retries,
        "retry_delay": timedelta(seconds=config.retry_delay_s),
        "retry_exponential_backoff": config.retry_backoff,
        "max_retry_delay": timedelta(seconds=config.max_retry_delay_s),
        "execution_timeout": timedelta(minutes=config.task_timeout_min),
        "on_failure_callback": on_task_failure,
    }


def stages_of(kind: str) -> tuple[Stage, ...]:
    """The stages a run of ``kind`` takes: all of them, or for an export those up to harmonize (no score, nothing
    written to FHIR)."""
    if kind != "export":
        return STAGES
    last = STAGE_NAMES.index("harmonize")
    return STAGES[: last + 1]


def _placement(stage: Stage, settings: Settings) -> dict[str, Any]:
    """Where a stage's task runs: PACS stages in the PACS pool, scoring in the GPU pool (and queue), chunked FHIR
    stages at most ``clinical_parallelism`` at once per DAG run (the FHIR server's load)."""
    config = settings.airflow
    if stage.resource == "pacs":
        return {"pool": config.pacs_pool}
    if stage.resource == "gpu":
        return {"pool": config.gpu_pool, **({"queue": config.score_queue} if config.score_queue else {})}
    if stage.resource == "fhir" and stage.chunked:
        return {"max_active_tis_per_dagrun": config.clinical_parallelism}
    return {}


def _stage_task(task: Any, stage: Stage, settings: Settings, trigger_rule: Any) -> Any:
    """The Airflow task of one stage: takes the ledger run (and, when chunked, the chunk's ``items``)."""
    name = stage.name
    options = {"task_id": name, "trigger_rule": trigger_rule, **_placement(stage, settings)}
    if stage.chunked:

        @task(**options)
        def run_chunk(ledger_run: int, items: list[str]) -> dict[str, Any]:
            return run_stage(name, ledger_run, items)

        return run_chunk

    @task(**options)
    def run_whole(ledger_run: int) -> dict[str, Any]:
        return run_stage(name, ledger_run)

    return run_whole


def _plan_task(task: Any, name: str, trigger_rule: Any) -> Any:
    """The task that lists a chunked stage's chunks (UIDs: kept out of the task log; XCom and the mapped tasks'
    inputs still carry them)."""

    @task(task_id=f"plan_{name}", show_return_value_in_logs=False, trigger_rule=trigger_rule)
    def plan(ledger_run: int) -> list[list[str]]:
        return plan_chunks(name, ledger_run)

    return plan


def build_pipeline_dag(
    dag_id: str,
    kind: str,
    *,
    settings: Settings,
    schedule: Any,
    params: Mapping[str, Any],
    doc_md: str,
    max_active_runs: int = 1,
) -> DAG:
    """Return a DAG running the pipeline stages of one ledger run of ``kind`` (nightly, backfill, on_demand, or
    export: the stages up to harmonize, then ``export_table`` instead of report and finish_run)."""
    from airflow.sdk import DAG, Param, TriggerRule, chain, get_current_context, task

    rescore = Param(
        False, type="boolean", description="Score again what an earlier run scored and wrote with this model."
    )
    with DAG(
        dag_id=dag_id,
        description=doc_md.strip().splitlines()[0],
        doc_md=doc_md,
        schedule=schedule,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=max_active_runs,
        params={**params, "rescore": rescore} if kind != "export" else dict(params),  # an export redoes all
        default_args=default_args(settings),
        tags=["riskbridge", kind],
    ) as dag:

        @task(task_id="start_run")
        def start_run() -> int:
            return start_ledger_run(kind, get_current_context())

        @task(task_id="report")
        def report(ledger_run: int) -> str:
            return write_report(ledger_run, get_current_context())

        @task(task_id="finish_run")
        def finish_run(ledger_run: int) -> None:
            finish_ledger_run(ledger_run)

        @task(task_id="export_table")
        def export_table(ledger_run: int) -> str:
            return write_export_table(ledger_run, get_current_context()["params"])

        # The ledger run id as an XComArg (Airflow's own run_id names the DAG run); Any: the tasks declare int.
        ledger_run: Any = start_run()
        steps: list[Any] = [ledger_run]
        after_mapped = False  # a mapped task with no chunks is skipped: the task after it must still run
        for stage in stages_of(kind):
            trigger = TriggerRule.NONE_FAILED if after_mapped else TriggerRule.ALL_SUCCESS
            if stage.chunked:
                plan = _plan_task(task, stage.name, trigger)(ledger_run)
                mapped = _stage_task(task, stage, settings, TriggerRule.ALL_SUCCESS)
                steps += [plan, mapped.partial(ledger_run=ledger_run).expand(items=plan)]
            else:
                steps.append(_stage_task(task, stage, settings, trigger)(ledger_run))
            after_mapped = stage.chunked
        if kind == "export":
            steps.append(export_table.override(trigger_rule=TriggerRule.NONE_FAILED)(ledger_run))
        else:
            steps += [report(ledger_run), finish_run(ledger_run)]
        chain(*steps)
    return dag


NIGHTLY_DOC = """Every night: find, match, retrieve, harmonize and score the CT studies not covered yet.

The cron (`[airflow] schedule`, in `[site] timezone`) comes from riskbridge's settings; no catch-up is needed: each
run covers from where the last one ended (the watermark) to its trigger, DST nights and missed nights included, plus
a lookback (`nightly_lookback_hours`) for studies that reached the PACS late. Studies already scored and written
with the same model are skipped; param `rescore` does them again. A retried task or a cleared run resumes the same
ledger run. See docs/operations.md "Coverage".
"""

BACKFILL_DOC = """Score the CT studies of a date range (params `start`, `end`: both days included, site time zone).

Trigger it with `{"start": "2026-01-01", "end": "2026-01-31"}`. Studies already scored and written by another run
with the same model are skipped at discover (`"rescore": true` does them again; the write-back's conditional create
still writes nothing twice). A finished backfill adds its window to the coverage the nightly runs continue.
"""

ON_DEMAND_DOC = """Score the studies of given accession numbers and/or all CT studies of given PACS patient IDs.

Trigger it with `{"accessions": ["ACC123"], "patient_ids": []}`; at least one list must hold an identifier.
Studies already scored and written with the same model are skipped unless `"rescore": true`.
"""


def nightly_dag(settings: Settings | None = None) -> DAG:
    """Return ``riskbridge_nightly``: cron from [airflow] schedule; each run covers from the coverage's watermark
    (less the lookback) to its trigger, the data interval (``nightly_window_hours``) only on the job's first night."""
    from airflow.sdk import CronTriggerTimetable

    settings = settings if settings is not None else load_settings()
    zone = settings.site.timezone or "UTC"
    timetable = CronTriggerTimetable(
        settings.airflow.schedule, timezone=zone, interval=timedelta(hours=settings.airflow.nightly_window_hours)
    )
    return build_pipeline_dag(
        NIGHTLY_DAG_ID, "nightly", settings=settings, schedule=timetable, params={}, doc_md=NIGHTLY_DOC
    )


def backfill_dag(settings: Settings | None = None) -> DAG:
    """Return ``riskbridge_backfill``: triggered by hand with a ``start`` and ``end`` date."""
    from airflow.sdk import Param

    settings = settings if settings is not None else load_settings()
    params = {
        "start": Param(type="string", format="date", description="First study day (YYYY-MM-DD), included."),
        "end": Param(type="string", format="date", description="Last study day (YYYY-MM-DD), included."),
    }
    return build_pipeline_dag(
        BACKFILL_DAG_ID, "backfill", settings=settings, schedule=None, params=params, doc_md=BACKFILL_DOC
    )


def on_demand_dag(settings: Settings | None = None) -> DAG:
    """Return ``riskbridge_on_demand``: triggered with accession numbers and/or PACS patient IDs."""
    from airflow.sdk import Param

    settings = settings if settings is not None else load_settings()
    item = {"type": "string", "minLength": 1}
    params = {
        "accessions": Param([], type="array", items=item, description="Accession numbers of the studies to score."),
        "patient_ids": Param([], type="array", items=item, description="PACS patient IDs: all their CT studies."),
    }
    return build_pipeline_dag(
        ON_DEMAND_DAG_ID,
        "on_demand",
        settings=settings,
        schedule=None,
        params=params,
        doc_md=ON_DEMAND_DOC,
        max_active_runs=4,
    )


COHORT_EXPORT_DOC = """Export a labelled, pseudonymized training table of a past window (docs/site-training.md).

Trigger it with `{"start": "2025-01-01", "end": "2025-06-30", "out": "/data/riskbridge/tables/2025h1"}` (and
optionally `"labels"`: a label spec name or file). The stages up to harmonize run as an export run (no score,
nothing written to FHIR); `export_table` labels every patient from the FHIR server and writes the table.
"""


def cohort_export_dag(settings: Settings | None = None) -> DAG:
    """Return ``riskbridge_cohort_export``: triggered with ``start``, ``end``, ``out`` and optionally ``labels``."""
    from airflow.sdk import Param

    settings = settings if settings is not None else load_settings()
    params = {
        "start": Param(type="string", format="date", description="First study day (YYYY-MM-DD), included."),
        "end": Param(type="string", format="date", description="Last study day (YYYY-MM-DD), included."),
        "out": Param(type="string", minLength=1, description="Directory of the training table (workers see it)."),
        "labels": Param("", type="string", description="Label spec name or file; empty: [export] label_spec."),
    }
    return build_pipeline_dag(
        COHORT_EXPORT_DAG_ID, "export", settings=settings, schedule=None, params=params, doc_md=COHORT_EXPORT_DOC
    )


MONITOR_DOC = """Every week: drift of the active model's inputs and scores against its training table, and its AUROC and
calibration on the outcomes that have arrived (docs/site-training.md "Monitoring").

The cron is `[monitor] schedule` in `[site] timezone`. Drift covers the scans of the week before the trigger (params
`start`/`end`, ISO days both included, override it); outcomes cover the same week `[monitor] outcome_lag_days` earlier,
whose labels can be known by now. The task writes an HTML page with plots under `[run] report_dir` and fails, without
retries, when anything is above an alert threshold: its log names each alert.
"""


def monitor_windows(
    context: Mapping[str, Any], settings: Settings
) -> tuple[tuple[datetime, datetime], tuple[datetime, datetime]]:
    """The drift window of a monitor run (params ``start``/``end`` when given, else its data interval: the week
    before the trigger) and its outcome window (the same, ``[monitor] outcome_lag_days`` earlier)."""
    params = context["params"]
    if params.get("start") or params.get("end"):
        window = backfill_window(str(params.get("start") or ""), str(params.get("end") or ""), settings)
    else:
        window = (_as_datetime(context["data_interval_start"]), _as_datetime(context["data_interval_end"]))
    lag = timedelta(days=settings.monitor.outcome_lag_days)
    return window, (window[0] - lag, window[1] - lag)


def run_monitor(context: Mapping[str, Any]) -> str:
    """The monitor task: compare, write the page, log the result; fail (no retries) with the alerts as message."""
    from airflow.sdk.exceptions import AirflowFailException

    from riskbridge.monitor import monitor

    settings = task_settings()
    window, outcome_window = monitor_windows(context, settings)
    params = context["params"]
    table = Path(params["table"]) if params.get("table") else None
    out = settings.run.report_dir / f"monitor-{window[0]:%Y%m%dT%H%M}"
    result = monitor(settings, window, out, outcome_window, table)
    log.info("monitor:\n%s", "\n".join(result.lines()))
    if result.alerts:
        message = "monitoring alerts: " + "; ".join(result.alerts) + f" (page {result.page})"
        log.error("%s", message)
        raise AirflowFailException(message)
    return str(result.page)


def monitor_dag(settings: Settings | None = None) -> DAG:
    """Return ``riskbridge_monitor``: weekly by ``[monitor] schedule``, one task (see :data:`MONITOR_DOC`)."""
    from airflow.sdk import DAG, CronTriggerTimetable, Param, get_current_context, task

    settings = settings if settings is not None else load_settings()
    zone = settings.site.timezone or "UTC"
    timetable = CronTriggerTimetable(settings.monitor.schedule, timezone=zone, interval=timedelta(days=7))
    params = {
        "start": Param("", type="string", description="First scan day (YYYY-MM-DD); empty: the week before."),
        "end": Param("", type="string", description="Last scan day (YYYY-MM-DD), included."),
        "table": Param("", type="string", description="Training table directory; empty: [monitor] training_table."),
    }
    args = {**default_args(settings), "retries": 0}  # an alert is a finding, not a transient failure
    del args["on_failure_callback"]  # no ledger run to mark failed
    with DAG(
        dag_id=MONITOR_DAG_ID,
        description=MONITOR_DOC.strip().splitlines()[0],
        doc_md=MONITOR_DOC,
        schedule=timetable,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        params=params,
        default_args=args,
        tags=["riskbridge", "monitor"],
    ) as dag:

        @task(task_id="monitor")
        def monitor_task() -> str:
            return run_monitor(get_current_context())

        monitor_task()
    return dag
