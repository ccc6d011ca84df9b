"""The README demo (``riskbridge demo``): everything on one machine, from the sandbox to RiskAssessments in HAPI.

It starts the sandbox, generates and loads the synthetic cohort, migrates the ledger, prepares a local Airflow and runs
the nightly DAG once (``airflow dags test``) over the cohort's index window, then redraws the run's report with the
cohort's known outcomes (so the calibration plot is drawn) and says where the RiskAssessments and the report are. The
synthetic hospital's site settings (zone, identity rules: :func:`riskbridge.dev.synth.site_environment`) are applied to
this process and to the DAG's tasks; everything else comes from the usual settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from riskbridge.errors import RiskbridgeError
from riskbridge.settings import load_settings

# The synthetic cohort's studies lie in 2024-01-01 .. 2024-01-14 (local, UTC-5); one nightly run at this logical
# date with a 16-day window covers them all.
LOGICAL_DATE = "2024-01-15T02:00:00-05:00"
WINDOW_HOURS = 24 * 16

Step = Callable[[str], None]


class DemoError(RiskbridgeError, RuntimeError):
    """A demo step failed; the message says which and where its output is."""


@dataclass(frozen=True)
class DemoResult:
    """Where to look after the demo."""

    ledger_run: int
    report: Path
    risk_assessments_url: str
    scored: int
    quarantined: dict[str, int]
    dag_seconds: float
    airflow_home: Path
    already_done: int = 0  # studies an earlier run (an earlier demo) scored and wrote with the same model


def demo_environment() -> dict[str, str]:
    """The ``RISKBRIDGE_*`` variables the demo adds: the synthetic site, and a nightly window over the cohort."""
    from riskbridge.dev.synth import site_environment

    return {**site_environment(), "RISKBRIDGE_AIRFLOW__NIGHTLY_WINDOW_HOURS": str(WINDOW_HOURS)}


def run_demo(
    config_file: Path | None = None,
    patients: int = 30,
    seed: int = 7,
    work_dir: Path = Path(".riskbridge/demo"),
    step: Step | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> DemoResult:
    """Set everything up, run ``riskbridge_nightly`` once, and return where its results are.

    ``step(message)`` announces each step; ``progress(stage, done, total)`` reports cohort generation and loading.
    Rerunning is safe: the cohort load, the ledger and the write-back are idempotent, so a second demo run creates no
    second RiskAssessment.
    """
    from riskbridge.airflow.dagkit import run_key
    from riskbridge.airflow.local import LocalAirflow
    from riskbridge.dev import synth
    from riskbridge.dev.sandbox import Sandbox
    from riskbridge.ledger import Ledger
    from riskbridge.pipeline import Pipeline
    from riskbridge.stages.report import write_report

    announce = step or (lambda message: None)
    extra = demo_environment()
    os.environ.update(extra)
    settings = load_settings(config_file)

    announce("starting the sandbox (Orthanc, HAPI FHIR, PostgreSQL)")
    Sandbox(settings).up()

    cohort = work_dir / "cohort"
    announce(f"generating a {patients}-patient synthetic cohort in {cohort}")
    synth.generate(cohort, patients=patients, seed=seed, progress=progress)
    announce("loading it into Orthanc and HAPI FHIR")
    synth.load(
        cohort,
        orthanc_url=f"http://127.0.0.1:{settings.sandbox.orthanc_http_port}",
        fhir_base_url=settings.fhir.base_url,
        progress=progress,
    )

    announce("migrating the ledger (riskbridge db upgrade)")
    with Ledger.connect(settings.database) as ledger:
        ledger.upgrade()

    local = LocalAirflow.from_settings(settings)
    announce(f"preparing Airflow in {local.home} (metadata database, pools, Connections)")
    local.init(settings)

    announce(f"running the nightly DAG once: airflow dags test riskbridge_nightly {LOGICAL_DATE}")
    env = dict(os.environ)  # holds the demo's variables already (updated above)
    if config_file is not None:
        env["RISKBRIDGE_CONFIG"] = str(config_file.resolve())
    result = local.dags_test("riskbridge_nightly", LOGICAL_DATE, env=env)
    if not result.succeeded:
        log = work_dir / "dags-test.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(result.output)
        failed = sorted(task for task, states in result.task_states.items() if set(states) - {"success", "skipped"})
        raise DemoError(f"the nightly DAG did not succeed (tasks: {', '.join(failed) or 'none ran'}); see {log}")

    airflow_run = local.latest_run_id("riskbridge_nightly", env=env)
    if airflow_run is None:
        raise DemoError("airflow dags test left no DAG run behind")
    with Pipeline.from_settings(settings) as pipeline:
        run_id = pipeline.ledger.run_by_key(run_key("riskbridge_nightly", airflow_run)).run_id
        summary = pipeline.summary(run_id)
    truth = synth.read_truth(cohort)
    labels = {record["index_study"]["study_uid"]: int(record["outcome"]["label"]) for record in truth}
    report = write_report(summary, settings.run.report_dir / str(run_id), labels=labels)
    quarantined = dict(summary.quarantine)
    system = quote(settings.writeback.identifier_system, safe=":/")
    url = f"{settings.fhir.base_url}/RiskAssessment?identifier={system}|"
    return DemoResult(
        ledger_run=run_id,
        report=report.resolve(),
        risk_assessments_url=url,
        scored=len(summary.scores),
        quarantined=quarantined,
        dag_seconds=result.seconds,
        airflow_home=local.home,
        already_done=summary.coverage.already_done if summary.coverage is not None else 0,
    )
