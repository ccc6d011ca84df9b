"""The ``riskbridge`` command line: sandbox, doctor, imaging (query, select, retrieve), synthetic cohort, version.

Errors a person can fix (settings, missing packages, busy ports, unreachable servers) end in one line on stderr
and exit status 2, never a stack trace.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from riskbridge import __version__
from riskbridge.settings import Settings, SettingsError, load_settings

app = typer.Typer(help="riskbridge: nightly imaging + EHR risk scoring.", no_args_is_help=True)
sandbox_app = typer.Typer(help="Loopback Orthanc, HAPI FHIR and PostgreSQL servers for tests and demos.")
app.add_typer(sandbox_app, name="sandbox")
imaging_app = typer.Typer(help="Query the PACS, select each study's series by the rules, retrieve it verified.")
app.add_typer(imaging_app, name="imaging")

# Off a terminal (a pipe, a log file, a test runner) rich would hard-wrap at 80 columns, breaking paths and
# messages at places that depend on their length; there, lines are written whole and tables take their own width.
UNWRAPPED_WIDTH = 10_000


class _Console(Console):
    """A rich Console that never wraps when its output is not a terminal (unless COLUMNS says otherwise)."""

    @property
    def size(self) -> ConsoleDimensions:
        """The terminal's size; off a terminal, a width no line reaches."""
        size = super().size
        if self.is_terminal or os.environ.get("COLUMNS"):
            return size
        return ConsoleDimensions(UNWRAPPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


console = _Console(soft_wrap=True)
err_console = _Console(stderr=True, soft_wrap=True)


class _State:
    config: Path | None = None


def _fail(message: str) -> typer.Exit:
    # escape(): messages quote settings sections such as "[identity]", which rich would take for markup and drop.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code=2)


def _settings() -> Settings:
    try:
        return load_settings(_State.config)
    except SettingsError as exc:
        raise _fail(str(exc)) from None


@app.callback()
def main(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML config file (default: $RISKBRIDGE_CONFIG, else ./riskbridge.toml)."
    ),
) -> None:
    """riskbridge: DICOM and FHIR in, RiskAssessment out."""
    _State.config = config


@app.command()
def version() -> None:
    """Print the riskbridge version."""
    console.print(f"riskbridge {__version__}")


@contextmanager
def _part_progress() -> Iterator[Callable[[str, str], None]]:
    """Yield a sandbox progress callback that shows one spinner line per server."""
    columns = (SpinnerColumn(), TextColumn("[bold]{task.fields[part]:<10}"), TextColumn("{task.description}"))
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=False) as progress:
        tasks: dict[str, Any] = {}

        def report(part: str, message: str) -> None:
            if part not in tasks:
                tasks[part] = progress.add_task(message, total=1, part=part)
            done = message in ("ready", "stopped", "already running")
            progress.update(tasks[part], description=message, completed=1 if done else 0)

        yield report


def _status_table(statuses: list[Any]) -> Table:
    table = Table(title="riskbridge sandbox")
    for column in ("part", "state", "pid", "endpoints"):
        table.add_column(column)
    colours = {"ready": "green", "starting": "yellow"}
    for status in statuses:
        colour = colours.get(status.state, "red")
        table.add_row(status.name, f"[{colour}]{status.state}[/]", str(status.pid or "-"), "\n".join(status.endpoints))
    return table


@sandbox_app.command("up")
def sandbox_up(
    only: list[str] | None = typer.Option(
        None, "--only", help="Start only this part (orthanc, hapi-fhir, postgres); repeatable."
    ),
) -> None:
    """Start Orthanc, HAPI FHIR and PostgreSQL on 127.0.0.1 (idempotent) and wait until they answer."""
    from riskbridge.sandbox import Sandbox, SandboxError

    settings = _settings()
    sandbox = Sandbox(settings)
    try:
        with _part_progress() as report:
            statuses = sandbox.up(report, only=only or None)
    except SandboxError as exc:
        raise _fail(str(exc)) from None
    console.print(_status_table(statuses))
    console.print(f"state and logs: {sandbox.root}")


@sandbox_app.command("down")
def sandbox_down() -> None:
    """Stop exactly the processes 'sandbox up' started."""
    from riskbridge.sandbox import Sandbox, SandboxError

    try:
        stopped = Sandbox(_settings()).down()
    except SandboxError as exc:
        raise _fail(str(exc)) from None
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@sandbox_app.command("status")
def sandbox_status() -> None:
    """Report each sandbox server; exit 1 unless all are ready."""
    from riskbridge.sandbox import Sandbox

    statuses = Sandbox(_settings()).status()
    console.print(_status_table(statuses))
    if any(status.state != "ready" for status in statuses):
        raise typer.Exit(code=1)


@app.command()
def doctor() -> None:
    """Check the PACS (C-ECHO), the FHIR server (/metadata) and the ledger database; exit 1 on any FAIL."""
    from riskbridge.doctor import run_checks

    results = run_checks(_settings())
    table = Table(title="riskbridge doctor")
    for column in ("check", "target", "result", "detail"):
        table.add_column(column)
    for result in results:
        verdict = "[green]OK[/]" if result.ok else "[red]FAIL[/]"
        table.add_row(result.name, result.target, verdict, result.detail)
    console.print(table)
    if not all(result.ok for result in results):
        raise typer.Exit(code=1)


fhir_app = typer.Typer(help="The FHIR server riskbridge writes to.")
app.add_typer(fhir_app, name="fhir")


@fhir_app.command("install-definitions")
def fhir_install_definitions() -> None:
    """Load riskbridge's extension definitions into the FHIR server (idempotent); docs/writeback.md."""
    from riskbridge.connectors.fhir import FhirClient, FhirError
    from riskbridge.writeback import WritebackError, install_definitions

    try:
        with FhirClient(_settings().fhir) as client:
            statuses = install_definitions(client)
    except (FhirError, WritebackError) as exc:
        raise _fail(str(exc)) from None
    for url, status in statuses.items():
        console.print(f"{'created' if status == 201 else 'up to date'}: {url}")


airflow_app = typer.Typer(help="A local Airflow for riskbridge's DAGs: metadata database, pools, Connections.")
app.add_typer(airflow_app, name="airflow")


@airflow_app.command("init")
def airflow_init(
    home: Path | None = typer.Option(None, "--home", help="AIRFLOW_HOME to prepare (default: [airflow] home)."),
    metadata_url: str | None = typer.Option(
        None, "--metadata-url", help="Airflow metadata database URL (default: SQLite in the home)."
    ),
    dags_folder: Path | None = typer.Option(None, "--dags-folder", help="DAG folder (default: this checkout's dags/)."),
) -> None:
    """Migrate Airflow's metadata database, create the pools and the Connections from riskbridge's settings."""
    from dataclasses import replace

    from riskbridge.airflow.local import AirflowCommandError, LocalAirflow

    settings = _settings()
    local = LocalAirflow.from_settings(settings, home, metadata_url)
    if dags_folder is not None:
        local = replace(local, dags_folder=dags_folder.resolve())
    try:
        with console.status("airflow db migrate"):
            local.migrate()
        pools = local.set_pools(settings)
        connections = local.set_connections(settings)
    except (AirflowCommandError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"metadata database: {local.database_url.split('@')[-1]}")
    console.print("pools: " + ", ".join(f"{name} ({slots} slots)" for name, slots in pools.items()))
    console.print("connections: " + ", ".join(connections))
    console.print(f"DAG folder: {local.dags_folder}\nuse it with: export AIRFLOW_HOME={local.home}")


@contextmanager
def _count_progress() -> Iterator[Callable[[str, int, int], None]]:
    """Yield a ``progress(stage, done, total)`` callback that shows one bar per stage."""
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield report


@app.command()
def synth(
    patients: int = typer.Option(30, "--patients", "-n", min=1, help="Number of patients."),
    seed: int = typer.Option(7, "--seed", "-s", help="Random seed; the same seed gives the same cohort."),
    out: Path = typer.Option(Path(".riskbridge/cohort"), "--out", "-o", help="Output directory."),
    size: str = typer.Option("small", "--size", help="small (128x128 slices) or full (512x512)."),
    load: bool = typer.Option(False, "--load", help="Upload to the configured Orthanc and FHIR server."),
) -> None:
    """Generate a deterministic synthetic cohort with ground truth (and optionally load it)."""
    from riskbridge import synth as synthetic

    if size not in ("small", "full"):
        raise _fail(f"--size must be 'small' or 'full', not {size!r}")
    settings = _settings()
    try:
        with _count_progress() as report:
            summary = synthetic.generate(out, patients=patients, seed=seed, size=size, progress=report)
    except synthetic.CohortError as exc:
        raise _fail(str(exc)) from None
    console.print(summary.describe())
    if not load:
        return
    orthanc_url = f"http://127.0.0.1:{settings.sandbox.orthanc_http_port}"
    try:
        with _count_progress() as report:
            loaded = synthetic.load(out, orthanc_url=orthanc_url, fhir_base_url=settings.fhir.base_url, progress=report)
    except synthetic.LoadError as exc:
        raise _fail(str(exc)) from None
    console.print(loaded.describe())


@app.command()
def train(
    out: Path = typer.Option(Path(".riskbridge/models/chest-ct-fusion"), "--out", "-o", help="Package directory."),
    table: Path = typer.Option(
        Path(".riskbridge/training-table"),
        "--table",
        help="Training table directory (docs/model.md); built from the synthetic cohort when it holds none.",
    ),
    patients: int = typer.Option(3000, "--patients", "-n", min=20, help="Synthetic cohort size (table build)."),
    seed: int = typer.Option(20240501, "--seed", "-s", help="Synthetic cohort seed (table build)."),
    strategy: str = typer.Option("hybrid", "--strategy", help="image, tabular, early, late or hybrid."),
    folds: int = typer.Option(5, "--folds", min=0, max=20, help="Stratified k-fold for the metrics; 0 skips it."),
    image_encoder: str = typer.Option(
        "detector", "--image-encoder", help="detector (U-Net on dense nodule masks) or resnet (end to end)."
    ),
    dense_iterations: int = typer.Option(
        4000, "--dense-iterations", min=1, help="Batches of the detector's segmenter training."
    ),
    epochs: int = typer.Option(6, "--epochs", min=1, help="Epochs of the resnet image encoder stage."),
    fusion_epochs: int = typer.Option(40, "--fusion-epochs", min=1, help="Epochs of the fusion stage."),
    train_seed: int = typer.Option(0, "--train-seed", help="Seed of splits, initialisation and batches."),
    calibration: str = typer.Option("temperature", "--calibration", help="temperature, platt or none."),
    version: str = typer.Option("0.1.0", "--version", help="Model version written into the package."),
    workers: int = typer.Option(1, "--workers", min=1, max=32, help="Processes for the table build."),
    threads: int = typer.Option(1, "--threads", min=1, max=64, help="torch threads for training."),
) -> None:
    """Train the fusion model (stratified k-fold metrics, calibration) and write a checksummed model package."""
    from riskbridge.harmonize.features import FeatureSpecError, resolve_feature_spec
    from riskbridge.model import data as training_data
    from riskbridge.model.network import STRATEGIES
    from riskbridge.model.package import ModelPackageError
    from riskbridge.model.train import TrainOptions, train_package

    if strategy not in STRATEGIES:
        raise _fail(f"--strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if calibration not in ("temperature", "platt", "none"):
        raise _fail(f"--calibration must be temperature, platt or none, not {calibration!r}")
    if image_encoder not in ("detector", "resnet"):
        raise _fail(f"--image-encoder must be detector or resnet, not {image_encoder!r}")
    try:
        spec = resolve_feature_spec(_settings().feature_spec)
    except FeatureSpecError as exc:
        raise _fail(str(exc)) from None
    options = TrainOptions(
        image_encoder=image_encoder,
        dense_iterations=dense_iterations,
        image_epochs=epochs,
        fusion_epochs=fusion_epochs,
        seed=train_seed,
        calibration=calibration,
        threads=threads,
    )
    try:
        with _count_progress() as report:
            if not (table / "manifest.json").is_file():
                training_data.build_synthetic_table(
                    table, spec, patients=patients, seed=seed, workers=workers,
                    progress=lambda done, total: report("table", done, total),
                )  # fmt: skip
            rows = training_data.load_table(table, spec)
            sha256, metrics = train_package(
                spec, rows, out, strategy, options, folds=folds, version=version,
                progress=report,
            )  # fmt: skip
    except (training_data.TrainingTableError, ModelPackageError, ValueError) as exc:
        raise _fail(str(exc)) from None
    result = Table(title=f"{strategy} model {version}")
    result.add_column("metric")
    for column in ("cross-validation", "calibration split"):
        result.add_column(column)
    for name in ("auroc", "auprc", "f1", "brier", "ece"):
        cells = []
        for block in ("cross_validation", "calibration_split"):
            entry = metrics.get(block, {}).get("metrics", {}).get(name)
            cells.append(f"{entry['value']:.3f} ({entry['low']:.3f} to {entry['high']:.3f})" if entry else "-")
        result.add_row(name, *cells)
    console.print(result)
    console.print(f"package {out} sha256 {sha256}")


@app.command()
def score(
    requests_file: Path = typer.Argument(..., help="JSONL of requests: key, series_dir, series_uid, vector."),
    out: Path = typer.Option(..., "--out", "-o", help="JSONL of results, one line per request."),
    package: Path | None = typer.Option(
        None, "--package", help="Model package directory (default: run.model_package, else the shipped reference)."
    ),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Default: 8 on CPU, probed on CUDA."),
    workers: int | None = typer.Option(None, "--workers", min=0, max=32, help="Loader processes (default: cores-1)."),
    cache_dir: Path = typer.Option(
        Path(".riskbridge/cache/preprocess"), "--cache-dir", help="Preprocessed volumes, per series UID."
    ),
) -> None:
    """Score patients with a verified model package: calibrated probability, risk and attention per modality.

    Each result line has key, probability, raw_probability, risk, attention and the model's name, version and
    sha256; a request that cannot be scored gets a line with its error instead, and the exit status is 1.
    """
    import json

    from riskbridge.harmonize.features import FeatureSpecError, resolve_feature_spec
    from riskbridge.model.package import ModelPackageError, reference_package_path
    from riskbridge.model.scoring import Scorer, ScoreRequest, default_workers
    from riskbridge.writeback import qualitative_risk

    settings = _settings()
    requests: list[ScoreRequest] = []
    try:
        with requests_file.open(encoding="utf-8") as stream:
            for number, line in enumerate(stream, start=1):
                if line.strip():
                    try:
                        requests.append(ScoreRequest.from_json(json.loads(line)))
                    except ValueError as exc:  # json.JSONDecodeError is a ValueError
                        raise _fail(f"{requests_file} line {number}: {exc}") from None
    except OSError as exc:
        raise _fail(f"cannot read {requests_file}: {exc.strerror}") from None
    try:
        spec = resolve_feature_spec(settings.feature_spec)
        package_path = package or settings.run.model_package or reference_package_path()
        scorer = Scorer.from_package(
            package_path,
            spec,
            device=device,
            cache_dir=cache_dir,
            batch_size=batch_size,
            workers=default_workers() if workers is None else workers,
        )
        with _count_progress() as report:
            results, failures = scorer.score_with_failures(requests, lambda done, total: report("scored", done, total))
    except (ModelPackageError, FeatureSpecError) as exc:
        raise _fail(str(exc)) from None
    except ValueError as exc:  # bad --device, duplicate keys
        raise _fail(str(exc)) from None
    thresholds = (settings.writeback.low_below, settings.writeback.high_from)
    model = {"model": scorer.model_name, "model_version": scorer.model_version, "package_sha256": scorer.sha256}
    by_key = {result.key: result for result in results}
    lines = []
    for request in requests:
        result = by_key.get(request.key)
        if result is None:
            lines.append({"key": request.key, "error": failures[request.key], **model})
            continue
        risk, _ = qualitative_risk(result.probability, thresholds)
        lines.append({"key": result.key, "probability": result.probability, "raw_probability": result.raw_probability,
                      "risk": risk, "attention": result.attention, **model})  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines), encoding="utf-8")
    partial.replace(out)
    console.print(
        f"scored {len(results)} of {len(requests)} with {scorer.model_name} {scorer.model_version} "
        f"on {scorer.device} -> {out}"
        + (f"; [red]{len(failures)} not scored[/] (see their error lines)" if failures else "")
    )
    if failures:
        raise typer.Exit(code=1)


def _parse_day(value: str | None, option: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise _fail(f"{option} must be a date like 2026-11-23, not {value!r}") from None


@imaging_app.command("studies")
def imaging_studies(
    date_from: str | None = typer.Option(None, "--from", help="First study date (YYYY-MM-DD), inclusive."),
    date_to: str | None = typer.Option(None, "--to", help="Last study date (YYYY-MM-DD), inclusive."),
    modality: str = typer.Option("CT", "--modality", help="ModalitiesInStudy to match; '' for any."),
) -> None:
    """List the PACS's studies in a date range (STUDY-level C-FIND); identifiers shown are UIDs only."""
    from riskbridge.connectors import dicom, query

    settings = _settings()
    study_date = (_parse_day(date_from, "--from"), _parse_day(date_to, "--to"))
    table = Table("study UID", "date/time", "modalities", "description", "instances")
    try:
        for study in query.find_studies(settings.pacs, study_date=study_date, modality=modality or None):
            when = study.study_datetime.isoformat(sep=" ") if study.study_datetime else "-"
            count = str(study.instance_count) if study.instance_count is not None else "-"
            table.add_row(study.study_uid, when, "/".join(study.modalities), study.description, count)
    except dicom.DicomError as exc:
        raise _fail(str(exc)) from None
    console.print(table)


def _rule_set(settings: Settings, rules: str | None) -> Any:
    from riskbridge.harmonize.series import RuleFileError
    from riskbridge.imaging import load_rule_set

    try:
        return load_rule_set(rules or settings.series_rules)
    except RuleFileError as exc:
        raise _fail(str(exc)) from None


def _decision_table(selection: Any) -> Table:
    table = Table("#", "series UID", "decision", "rule", "reason", title=f"study {selection.study_uid}")
    for decision in selection.decisions:
        if decision.chosen:
            verdict = "[bold green]chosen[/]"
        elif decision.rank is not None:
            verdict = f"[yellow]runner-up {decision.rank}[/]"
        else:
            verdict = "[red]rejected[/]"
        number = decision.judged.get("SeriesNumber", "")
        table.add_row(str(number if number is not None else ""), decision.series_uid, verdict, decision.rule,
                      decision.reason)  # fmt: skip
    table.caption = selection.reason
    return table


@imaging_app.command("select")
def imaging_select(
    study_uids: list[str] = typer.Argument(..., help="StudyInstanceUID(s)."),
    rules: str | None = typer.Option(None, "--rules", help="Rule set name or YAML file (default: series_rules)."),
) -> None:
    """Decide each study's series by the rules and show every decision with its reason; nothing is retrieved."""
    from riskbridge.connectors import dicom
    from riskbridge.imaging import select_study

    settings = _settings()
    rule_set = _rule_set(settings, rules)
    for study_uid in study_uids:
        try:
            console.print(_decision_table(select_study(settings, study_uid, rule_set)))
        except dicom.DicomError as exc:
            raise _fail(str(exc)) from None


@imaging_app.command("retrieve")
def imaging_retrieve(
    study_uids: list[str] = typer.Argument(..., help="StudyInstanceUID(s)."),
    rules: str | None = typer.Option(None, "--rules", help="Rule set name or YAML file (default: series_rules)."),
    transport: str | None = typer.Option(None, "--transport", help="auto, c-move, c-get or dicomweb."),
    workers: int | None = typer.Option(None, "--workers", min=1, max=16, help="Series retrieved at once."),
) -> None:
    """Select each study's series and retrieve the chosen ones into staging, verified complete.

    Exit status 1 when a chosen series could not be retrieved completely (each failure is listed with its reason).
    """
    from riskbridge.connectors import dicom
    from riskbridge.imaging import select_and_retrieve
    from riskbridge.records import RetrievedSeries
    from riskbridge.retrieve import RetrievalFailure, resolve_transport

    settings = _settings()
    if transport is not None and transport not in ("auto", "c-move", "c-get", "dicomweb"):
        raise _fail(f"--transport must be auto, c-move, c-get or dicomweb, not {transport!r}")
    if workers is not None:
        settings = settings.model_copy(update={"pacs": settings.pacs.model_copy(update={"workers": workers})})
    if transport is not None:
        settings = settings.model_copy(update={"pacs": settings.pacs.model_copy(update={"transport": transport})})
    rule_set = _rule_set(settings, rules)
    try:
        chosen_transport = resolve_transport(settings)
        with _count_progress() as report:
            outcomes = select_and_retrieve(
                settings, study_uids, rule_set, chosen_transport, lambda done, total: report("series", done, total)
            )
    except dicom.DicomError as exc:
        raise _fail(str(exc)) from None
    table = Table("study UID", "series UID", "outcome", "instances", "MB", "seconds", "attempts",
                  title=f"retrieval over {chosen_transport} into {settings.staging_dir}")  # fmt: skip
    failed = 0
    for outcome in outcomes:
        selection, retrieval = outcome.selection, outcome.retrieval
        if retrieval is None:
            table.add_row(selection.study_uid, "-", f"[yellow]{selection.reason}[/]", "", "", "", "")
        elif isinstance(retrieval, RetrievedSeries) and outcome.ready:
            table.add_row(selection.study_uid, retrieval.series_uid, "[green]staged[/]",
                          f"{retrieval.received}/{retrieval.expected}", f"{retrieval.bytes / 1e6:.1f}",
                          f"{retrieval.seconds:.2f}", str(retrieval.attempts))  # fmt: skip
        else:
            failed += 1
            reason = retrieval.reason if isinstance(retrieval, RetrievalFailure) else "incomplete"
            table.add_row(selection.study_uid, retrieval.series_uid, f"[red]failed[/]: {reason}", "", "", "", "")
    console.print(table)
    if failed:
        raise typer.Exit(code=1)


# --- the ledger and whole runs (riskbridge db ..., riskbridge run) ---------------------------------------------

db_app = typer.Typer(help="The PostgreSQL ledger: schema migrations.")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the ledger's SQL migrations that are not applied yet, in order (idempotent)."""
    from riskbridge.connectors.db import DatabaseError, safe_dsn
    from riskbridge.ledger import Ledger, LedgerError

    settings = _settings()
    try:
        with Ledger.connect(settings.database) as ledger:
            applied = ledger.upgrade()
            version = max(ledger.applied_migrations(), default=0)
    except (DatabaseError, LedgerError) as exc:
        raise _fail(str(exc)) from None
    for migration in applied:
        console.print(f"applied {migration.version:04d}_{migration.name}.sql")
    where = safe_dsn(settings.database.dsn.get_secret_value())
    console.print(f"ledger {where}: schema version {version}" + ("" if applied else " (already up to date)"))


def _run_window(window: str, zone: str | None) -> tuple[Any, Any]:
    from riskbridge.pipeline import PipelineError, window_of_days

    first, sep, last = window.partition("..")
    if not sep:
        raise _fail(f"--window must look like 2024-01-01..2024-01-14, not {window!r}")
    if zone is None:
        raise _fail("set site.timezone (RISKBRIDGE_SITE__TIMEZONE): the window's dates are days in the site's zone")
    start, end = _parse_day(first, "--window start"), _parse_day(last, "--window end")
    assert start is not None and end is not None
    try:
        return window_of_days(start, end, zone)
    except PipelineError as exc:
        raise _fail(str(exc)) from None


def _run_table(counts: dict[str, dict[str, int]], seconds: dict[str, float], title: str) -> Table:
    table = Table("stage", "done", "skipped", "quarantined", "failed", "seconds", title=title)
    for stage, row in counts.items():
        table.add_row(stage, *(str(row[k]) for k in ("done", "skipped", "quarantined", "failed")),
                      f"{seconds.get(stage, 0.0):.1f}")  # fmt: skip
    return table


@app.command()
def demo(
    patients: int = typer.Option(30, "--patients", "-n", min=10, help="Synthetic cohort size."),
    seed: int = typer.Option(7, "--seed", "-s", help="Synthetic cohort seed."),
    work_dir: Path = typer.Option(Path(".riskbridge/demo"), "--dir", help="Where the cohort and logs go."),
) -> None:
    """Set up everything (sandbox, synthetic cohort, ledger, Airflow) and run the nightly DAG once."""
    from riskbridge.airflow.local import AirflowCommandError
    from riskbridge.demo import DemoError, run_demo
    from riskbridge.sandbox import SandboxError
    from riskbridge.synth import CohortError, LoadError

    def step(message: str) -> None:
        console.print(f"[bold]>[/] {message}")

    try:
        with _count_progress() as report:
            result = run_demo(_State.config, patients, seed, work_dir, step=step, progress=report)
    except (DemoError, SandboxError, CohortError, LoadError, AirflowCommandError, SettingsError) as exc:
        raise _fail(str(exc)) from None
    quarantined = ", ".join(f"{reason} {count}" for reason, count in sorted(result.quarantined.items())) or "none"
    console.print(
        f"\nnightly DAG: ledger run {result.ledger_run}, {result.scored} studies scored in {result.dag_seconds:.0f} s; "
        f"quarantined: {quarantined}"
    )
    console.print(f"RiskAssessments: {result.risk_assessments_url}")
    console.print(f"run report:      {result.report.as_uri()}")
    console.print(f"Airflow home:    {result.airflow_home} (export AIRFLOW_HOME=... to look at the run)")


@app.command("run")
def run_pipeline(
    window: str | None = typer.Option(None, "--window", help="START..END: study dates (inclusive) in the site zone."),
    accessions: list[str] | None = typer.Option(None, "--accession", help="On demand: an AccessionNumber; repeatable."),
    patients: list[str] | None = typer.Option(None, "--patient", help="On demand: a PACS PatientID; repeatable."),
    kind: str | None = typer.Option(None, "--kind", help="nightly, backfill or on_demand (default from the options)."),
    run_key: str | None = typer.Option(None, "--run-key", help="Names the run; the same key resumes it."),
    until: str | None = typer.Option(None, "--until", help="Stop after this stage; rerun to resume."),
) -> None:
    """Run the pipeline's stages without Airflow: discover, match, select, retrieve, clinical, harmonize, score,
    write back, report. The same window (or --run-key) resumes the same run and redoes nothing."""
    import hashlib

    from riskbridge.connectors.db import DatabaseError
    from riskbridge.connectors.dicom import DicomError
    from riskbridge.connectors.fhir import FhirError
    from riskbridge.ledger import STAGES, LedgerError
    from riskbridge.pipeline import Pipeline, PipelineError

    settings = _settings()
    if until is not None and until not in STAGES:
        raise _fail(f"--until must be one of {', '.join(STAGES)}, not {until!r}")
    if (window is None) == (not accessions and not patients):
        raise _fail("give either --window or --accession/--patient")
    bounds = _run_window(window, settings.site.timezone) if window is not None else None
    kind = kind or ("backfill" if bounds is not None else "on_demand")
    if run_key is None:
        if bounds is not None:
            run_key = f"cli:{kind}:{window}"
        else:
            listed = "\n".join([*sorted(accessions or []), "--", *sorted(patients or [])])
            run_key = f"cli:{kind}:{hashlib.sha256(listed.encode()).hexdigest()[:16]}"
    expected_errors = (DatabaseError, DicomError, FhirError, LedgerError, PipelineError, OSError, ValueError)
    with Pipeline.from_settings(settings) as pipeline:
        try:
            run_id = pipeline.start_run(kind, run_key, bounds, accessions or (), patients or ())
        except expected_errors as exc:
            raise _fail(str(exc)) from None
        console.print(f"run {run_id} ({run_key})")
        try:
            with _count_progress() as report:
                pipeline.run_stages(run_id, report, until)
        except expected_errors as exc:
            pipeline.finish_run(run_id, "failed")
            message = f"run {run_id} failed ({type(exc).__name__}): {exc}; rerun the same command to resume"
            raise _fail(message) from None
        summary = pipeline.ledger.run_summary(run_id)
        console.print(_run_table(dict(summary.stage_counts), dict(summary.stage_seconds), f"run {run_id}"))
        if summary.quarantine:
            console.print("quarantined: " + ", ".join(f"{reason} {n}" for reason, n in summary.quarantine.items()))
        if until is not None:
            console.print(f"stopped after {until}; rerun the same command to resume")
            return
        failed = sum(row["failed"] for row in summary.stage_counts.values())
        alert = pipeline.quarantine_alert(run_id, summary)
        pipeline.finish_run(run_id, "failed" if alert else "success")
        console.print(f"report: {pipeline.report(run_id)}")
    if alert:
        raise _fail(alert)
    if failed:
        console.print(f"[yellow]{failed} item(s) failed (retrieval or write-back); rerun the same command to retry[/]")
        raise typer.Exit(code=1)
