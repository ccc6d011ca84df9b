"""The ``riskbridge`` command line: sandbox, doctor, imaging (query, select, retrieve), synthetic cohort, version.

Errors a person can fix (settings, missing packages, busy ports, unreachable servers) end in one line on stderr
and exit status 2, never a stack trace. Listings (``doctor``, ``imaging studies|select|retrieve``) take
``--format table|json|tsv``; :func:`riskbridge.console.emit` prints them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast
from zoneinfo import ZoneInfo

import typer
from rich.table import Table

from riskbridge import __version__
from riskbridge.cli_pacs import doctor, imaging_app, parse_day
from riskbridge.console import CliState as _State
from riskbridge.console import Column, OutputFormat, console, emit, format_option
from riskbridge.console import cli_settings as _settings
from riskbridge.console import count_progress as _count_progress
from riskbridge.console import fail as _fail
from riskbridge.dev.cli import demo, sandbox_app, synth
from riskbridge.errors import RiskbridgeError

if TYPE_CHECKING:
    pass

app = typer.Typer(help="riskbridge: nightly imaging + EHR risk scoring.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(imaging_app, name="imaging")


# The sandbox's servers run as other accounts (PostgreSQL as 'postgres' when riskbridge runs as root) that must
# reach its directory, and it holds synthetic data only: these commands (the demo starts the sandbox) keep the umask.
_SHARED_DIRECTORY_COMMANDS = ("sandbox", "demo")


@app.callback()
def main(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML config file (default: $RISKBRIDGE_CONFIG, else ./riskbridge.toml)."
    ),
) -> None:
    """riskbridge: DICOM and FHIR in, RiskAssessment out."""
    import os

    from riskbridge.filemodes import use_private_umask

    # Before any command writes: reports, staged series, tables and airflow.cfg may hold PHI or secrets.
    if ctx.invoked_subcommand not in _SHARED_DIRECTORY_COMMANDS:
        previous = use_private_umask()
        # For the command's duration: a caller running commands in its own process (tests) gets its umask back.
        ctx.call_on_close(lambda: os.umask(previous))
    _State.config = config


@app.command()
def version() -> None:
    """Print the riskbridge version."""
    console.print(f"riskbridge {__version__}")


app.command()(doctor)

fhir_app = typer.Typer(help="The FHIR server riskbridge writes to.")
app.add_typer(fhir_app, name="fhir")


@fhir_app.command("install-definitions")
def fhir_install_definitions() -> None:
    """Load riskbridge's extension definitions into the FHIR server (idempotent); docs/writeback.md."""
    from riskbridge.connectors.fhir import FhirClient
    from riskbridge.stages.write_back import install_definitions

    try:
        with FhirClient(_settings().fhir) as client:
            statuses = install_definitions(client)
    except RiskbridgeError as exc:
        raise _fail(str(exc)) from None
    for url, status in statuses.items():
        console.print(f"{'created' if status == 201 else 'up to date'}: {url}")


airflow_app = typer.Typer(help="A local Airflow for riskbridge's DAGs: metadata database, pools, Connections.")
app.add_typer(airflow_app, name="airflow")


@airflow_app.command("init")
def airflow_init(
    home: Path | None = typer.Option(None, "--home", help="AIRFLOW_HOME to prepare (default: \\[airflow] home)."),
    metadata_url: str | None = typer.Option(
        None, "--metadata-url", help="Airflow metadata database URL (default: SQLite in the home)."
    ),
    dags_folder: Path | None = typer.Option(None, "--dags-folder", help="DAG folder (default: this checkout's dags/)."),
) -> None:
    """Migrate Airflow's metadata database, create the pools and the Connections from riskbridge's settings."""
    from dataclasses import replace

    from riskbridge.airflow.local import LocalAirflow

    settings = _settings()
    local = LocalAirflow.from_settings(settings, home, metadata_url)
    if dags_folder is not None:
        local = replace(local, dags_folder=dags_folder.resolve())
    try:
        with console.status("airflow db migrate"):
            local.migrate()
        pools = local.set_pools(settings.airflow)
        connections = local.set_connections(settings)
    except (RiskbridgeError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"metadata database: {local.database_url.split('@')[-1]}")
    console.print("pools: " + ", ".join(f"{name} ({slots} slots)" for name, slots in pools.items()))
    console.print("connections: " + ", ".join(connections))
    console.print(f"DAG folder: {local.dags_folder}\nuse it with: export AIRFLOW_HOME={local.home}")


compose_app = typer.Typer(help='The Docker Compose deployment in docker/ (docs/operations.md "Docker").')
app.add_typer(compose_app, name="compose")


@compose_app.command("secrets")
def compose_secrets(
    directory: Path = typer.Option(Path("docker"), "--dir", help="The directory of docker-compose.yml."),
) -> None:
    """Write each missing secret file of the compose deployment (random, mode 0600); never overwrite one."""
    from riskbridge.credentials import generate_compose_secrets

    try:
        results = generate_compose_secrets(directory)
    except (RiskbridgeError, OSError) as exc:
        raise _fail(str(exc)) from None
    for result in results:
        note = f": {result.note}" if result.note else ""
        console.print(f"{result.status:<8} {result.path} ({result.what}){note}", highlight=False, markup=False)
    refused = [str(result.path) for result in results if result.status == "refused"]
    if refused:
        raise _fail(f"{len(refused)} secret file(s) would not start the services: {', '.join(refused)}")


app.command()(synth)


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
        "auto",
        "--image-encoder",
        help="detector (U-Net on dense nodule masks), resnet (end to end) or auto: detector when the table has "
        "masks (the synthetic table), resnet when not (a site's export).",
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
    from riskbridge.harmonize.features import resolve_feature_spec
    from riskbridge.model.data import load_table
    from riskbridge.model.network import STRATEGIES, Strategy
    from riskbridge.model.train import TrainOptions, train_package

    if strategy not in STRATEGIES:
        raise _fail(f"--strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if calibration not in ("temperature", "platt", "none"):
        raise _fail(f"--calibration must be temperature, platt or none, not {calibration!r}")
    if image_encoder not in ("auto", "detector", "resnet"):
        raise _fail(f"--image-encoder must be auto, detector or resnet, not {image_encoder!r}")
    try:
        spec = resolve_feature_spec(_settings().feature_spec)
    except RiskbridgeError as exc:
        raise _fail(str(exc)) from None
    options = TrainOptions(
        dense_iterations=dense_iterations,
        image_epochs=epochs,
        fusion_epochs=fusion_epochs,
        seed=train_seed,
        calibration=cast(Literal["temperature", "platt", "none"], calibration),  # checked above
        threads=threads,
    )
    try:
        with _count_progress() as report:
            if not (table / "manifest.json").is_file():
                from riskbridge.dev.training_table import build_synthetic_table

                build_synthetic_table(
                    table, spec, patients=patients, seed=seed, workers=workers,
                    progress=lambda done, total: report("table", done, total),
                )  # fmt: skip
            rows = load_table(table, spec)
            encoder = image_encoder if image_encoder != "auto" else "detector" if rows.mask_rows.size else "resnet"
            options = replace(options, image_encoder=cast(Literal["resnet", "detector"], encoder))  # checked above
            console.print(f"image encoder: {encoder}", highlight=False)
            sha256, metrics = train_package(
                spec, rows, out, cast(Strategy, strategy), options, folds=folds, version=version,
                progress=report,
            )  # fmt: skip
    except (RiskbridgeError, ValueError) as exc:
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

    from riskbridge.harmonize.features import resolve_feature_spec
    from riskbridge.model.package import reference_package_path
    from riskbridge.model.scoring import Scorer, ScoreRequest, default_workers
    from riskbridge.stages.write_back import qualitative_risk

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
    except (RiskbridgeError, ValueError) as exc:  # ValueError: bad --device, duplicate keys
        raise _fail(str(exc)) from None
    thresholds = (settings.writeback.low_below, settings.writeback.high_from)
    model = {"model": scorer.model_name, "model_version": scorer.model_version, "package_sha256": scorer.sha256}
    by_key = {result.key: result for result in results}
    lines: list[dict[str, Any]] = []
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


db_app = typer.Typer(help="The PostgreSQL ledger: schema migrations, PHI retention.")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the ledger's SQL migrations that are not applied yet, in order (idempotent)."""
    from riskbridge.connectors.db import safe_dsn
    from riskbridge.ledger import Ledger

    settings = _settings()
    try:
        with Ledger.connect(settings.database) as ledger:
            applied = ledger.upgrade()
            version = max(ledger.applied_migrations(), default=0)
    except RiskbridgeError as exc:
        raise _fail(str(exc)) from None
    for migration in applied:
        console.print(f"applied {migration.version:04d}_{migration.name}.sql")
    where = safe_dsn(settings.database.dsn.get_secret_value())
    console.print(f"ledger {where}: schema version {version}" + ("" if applied else " (already up to date)"))


@db_app.command("purge")
def db_purge(
    dry_run: bool = typer.Option(False, "--dry-run", help="Count the rows a purge would clear; change nothing."),
) -> None:
    """Clear the patient identifiers the ledger no longer needs (\\[retention] phi_days, undecided_days; docs/ledger.md
    "PHI and retention"). Prints counts per table, never a value."""
    from riskbridge.connectors.db import safe_dsn
    from riskbridge.ledger import Ledger
    from riskbridge.retention import purge_phi

    settings = _settings()
    try:
        with Ledger.connect(settings.database) as ledger:
            counts = purge_phi(ledger, settings.retention, dry_run=dry_run)
    except RiskbridgeError as exc:
        raise _fail(str(exc)) from None
    where = safe_dsn(settings.database.dsn.get_secret_value())
    verb = "would clear (dry run, nothing changed)" if dry_run else "cleared"
    console.print(
        f"ledger {where}: {verb} the identifiers of runs without activity since "
        f"{counts.phi_cutoff:%Y-%m-%d %H:%M} UTC, the names and birth dates of undecided studies of runs without "
        f"activity since {counts.undecided_cutoff:%Y-%m-%d %H:%M} UTC"
    )
    console.print(
        f"studies: {counts.identifiers + counts.undecided} row(s) ({counts.identifiers} identifiers, "
        f"{counts.undecided} undecided names and birth dates)"
    )
    console.print(f"runs: {counts.runs} row(s) (lists cleared, closed for resuming)")


staging_app = typer.Typer(help="The staging area of retrieved images: retention.")
app.add_typer(staging_app, name="staging")


@staging_app.command("purge")
def staging_purge(
    older_than_days: float | None = typer.Option(
        None,
        "--older-than-days",
        min=0,
        show_default="[retention] staging_days",
        help="Remove staged series whose newest file is older than this many days.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what a purge would remove; remove nothing."),
) -> None:
    """Remove staged series older than the retention (docs/retrieval.md "Staging retention"): never one a running
    run retrieved; one whose study is not scored yet is marked for retrieval again. Prints counts, never a UID."""
    from riskbridge.ledger import Ledger
    from riskbridge.staging_retention import purge_old

    settings = _settings()
    days = older_than_days if older_than_days is not None else settings.retention.staging_days
    try:
        with Ledger.connect(settings.database) as ledger:
            purged = purge_old(ledger, settings.staging_dir, days, dry_run=dry_run)
    except RiskbridgeError as exc:
        raise _fail(str(exc)) from None
    console.print(f"staging {settings.staging_dir}: {purged.line()} (older than {days:g} days)")


def _run_window(window: str, zone: str | None) -> tuple[Any, Any]:
    from riskbridge.pipeline import window_of_days

    first, sep, last = window.partition("..")
    if not sep:
        raise _fail(f"--window must look like 2024-01-01..2024-01-14, not {window!r}")
    if zone is None:
        raise _fail("set site.timezone (RISKBRIDGE_SITE__TIMEZONE): the window's dates are days in the site's zone")
    start, end = parse_day(first, "--window start"), parse_day(last, "--window end")
    assert start is not None and end is not None
    try:
        return window_of_days(start, end, zone)
    except RiskbridgeError as exc:
        raise _fail(str(exc)) from None


def _run_table(counts: Mapping[str, Mapping[str, int]], seconds: Mapping[str, float], title: str) -> Table:
    table = Table("stage", "done", "skipped", "quarantined", "failed", "seconds", title=title)
    for stage, row in counts.items():
        table.add_row(stage, *(str(row[k]) for k in ("done", "skipped", "quarantined", "failed")),
                      f"{seconds.get(stage, 0.0):.1f}")  # fmt: skip
    return table


app.command()(demo)


def _trigger(at: str | None, zone: str | None) -> datetime:
    """A nightly run's trigger time: ``--at`` (ISO 8601; without an offset, in the site zone) or now."""
    if at is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(at)
    except ValueError:
        raise _fail(f"--at must be a time like 2026-11-01T02:00 or 2026-11-01T02:00-05:00, not {at!r}") from None
    if moment.tzinfo is None:
        if zone is None:
            raise _fail("--at has no offset: set site.timezone (RISKBRIDGE_SITE__TIMEZONE) or give one")
        moment = moment.replace(tzinfo=ZoneInfo(zone))
    return moment.astimezone(UTC)


@app.command("run")
def run_pipeline(
    window: str | None = typer.Option(None, "--window", help="START..END: study dates (inclusive) in the site zone."),
    accessions: list[str] | None = typer.Option(None, "--accession", help="On demand: an AccessionNumber; repeatable."),
    patients: list[str] | None = typer.Option(None, "--patient", help="On demand: a PACS PatientID; repeatable."),
    nightly: bool = typer.Option(
        False, "--nightly", help="The nightly run: from where the coverage ends (less the lookback) to --at."
    ),
    at: str | None = typer.Option(None, "--at", help="With --nightly: its trigger time (default: now)."),
    kind: str | None = typer.Option(None, "--kind", help="nightly, backfill or on_demand (default from the options)."),
    run_key: str | None = typer.Option(None, "--run-key", help="Names the run; the same key resumes it."),
    until: str | None = typer.Option(None, "--until", help="Stop after this stage; rerun to resume."),
    rescore: bool = typer.Option(
        False, "--rescore", help="Score again what an earlier run scored and wrote back with this model."
    ),
) -> None:
    """Run the pipeline's stages without Airflow: discover, match, select, retrieve, clinical, harmonize, score,
    write back, report. The same window (or --run-key) resumes the same run and redoes nothing; studies an earlier
    run already scored and wrote back with the same model are skipped unless --rescore."""
    from riskbridge.pipeline import Pipeline
    from riskbridge.records import keyed_digest
    from riskbridge.stages import STAGE_NAMES

    settings = _settings()
    if until is not None and until not in STAGE_NAMES:
        raise _fail(f"--until must be one of {', '.join(STAGE_NAMES)}, not {until!r}")
    if sum((window is not None, bool(accessions or patients), nightly)) != 1:
        raise _fail("give one of --window, --accession/--patient or --nightly")
    if at is not None and not nightly:
        raise _fail("--at goes with --nightly")
    if nightly and kind not in (None, "nightly"):
        raise _fail("--nightly runs are of kind nightly")
    bounds = _run_window(window, settings.site.timezone) if window is not None else None
    trigger = _trigger(at, settings.site.timezone) if nightly else None
    kind = "nightly" if nightly else kind or ("backfill" if bounds is not None else "on_demand")
    if run_key is None:
        if trigger is not None:
            run_key = f"cli:nightly:{trigger:%Y-%m-%dT%H:%MZ}"
        elif bounds is not None:
            run_key = f"cli:{kind}:{window}"
        else:
            listed = "\n".join([*sorted(accessions or []), "--", *sorted(patients or [])])
            run_key = f"cli:{kind}:{keyed_digest(listed)}"  # keyed: the run key holds no reversible MRN hash
        run_key += ":rescore" if rescore else ""
    expected_errors = (RiskbridgeError, OSError, ValueError)
    with Pipeline.from_settings(settings) as pipeline:
        try:
            if trigger is not None:
                first_start = trigger - timedelta(hours=settings.airflow.nightly_window_hours)
                run_id = pipeline.start_nightly_run(run_key, trigger, first_start, rescore)
            else:
                run_id = pipeline.start_run(kind, run_key, bounds, accessions or (), patients or (), rescore)
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
        summary = pipeline.summary(run_id)
        console.print(_run_table(summary.stage_counts, summary.stage_seconds, f"run {run_id}"))
        if summary.quarantine:
            console.print("quarantined: " + ", ".join(f"{reason} {n}" for reason, n in summary.quarantine.items()))
        if summary.coverage is not None:
            for label, text in summary.coverage.lines():
                console.print(f"{label}: {text}", highlight=False)
        sampling = summary.sampling
        if sampling is not None and (sampling.series or sampling.identities):
            console.print(
                f"header sampling: {sampling.series} series in {sampling.seconds:.1f} s, "
                f"{sampling.identities} identities from sampled headers"
            )
        if until is not None:
            console.print(f"stopped after {until}; rerun the same command to resume")
            return
        failed = sum(row["failed"] for row in summary.stage_counts.values())
        alert = pipeline.finish(run_id, summary)
        console.print(f"report: {pipeline.report(run_id)}")
    if alert:
        raise _fail(alert)
    if failed:
        console.print(f"[yellow]{failed} item(s) failed (retrieval or write-back); rerun the same command to retry[/]")
        raise typer.Exit(code=1)


COVERAGE_COLUMNS = (
    Column("status", "status", style=lambda value: "red" if value == "uncovered" else None),
    Column("start", "start (UTC)", identifier=True),
    Column("end", "end (UTC)", identifier=True),
    Column("hours", "hours", spec=".1f"),
    Column("runs", "runs"),
)


@app.command("coverage")
def coverage(
    date_from: str = typer.Option(..., "--from", help="First site day (YYYY-MM-DD), included."),
    date_to: str = typer.Option(..., "--to", help="Last site day (YYYY-MM-DD), included."),
    fmt: OutputFormat = format_option(),
) -> None:
    """List the covered and uncovered intervals of these site days from the ledger: what finished nightly and
    backfill runs covered (by run), and what none did. Exit 1 when any part is uncovered."""
    from riskbridge.coverage import Interval
    from riskbridge.pipeline import Pipeline

    settings = _settings()
    span = Interval(*_run_window(f"{date_from}..{date_to}", settings.site.timezone))
    try:
        with Pipeline.from_settings(settings) as pipeline:
            covered, gaps = pipeline.coverage(span)
    except RiskbridgeError as exc:
        raise _fail(str(exc)) from None
    rows: list[dict[str, Any]] = [
        {"status": "covered", "interval": part, "runs": ", ".join(f"{run.kind} {run.run_id}" for run in runs)}
        for part, runs in covered
    ]
    rows += [{"status": "uncovered", "interval": gap, "runs": ""} for gap in gaps]
    rows.sort(key=lambda row: row["interval"].start)
    for row in rows:
        part = row.pop("interval")
        row.update(start=part.start, end=part.end, hours=part.duration.total_seconds() / 3600)
    uncovered_hours = sum(row["hours"] for row in rows if row["status"] == "uncovered")
    emit(rows, COVERAGE_COLUMNS, fmt, title=f"coverage {span}: {uncovered_hours:.1f} h uncovered")
    if gaps:
        raise typer.Exit(code=1)


cohort_app = typer.Typer(help="The site's own cohort: labelled, pseudonymized training tables (docs/site-training.md).")
app.add_typer(cohort_app, name="cohort")


@cohort_app.command("export")
def cohort_export(
    window: str | None = typer.Option(None, "--window", help="START..END: study dates (inclusive) in the site zone."),
    accessions: Path | None = typer.Option(
        None, "--accessions", help="Instead of --window: a file of accession numbers, one per line (a chosen cohort)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Training table directory (empty, or an earlier table)."),
    labels: str | None = typer.Option(
        None, "--labels", help="Label spec: a shipped name or a YAML file (default: \\[export] label_spec)."
    ),
    run_key: str | None = typer.Option(None, "--run-key", help="Names the export run; the same key resumes it."),
) -> None:
    """Run the stages up to harmonize over a past window (no score, nothing written to FHIR), label every patient
    from the FHIR server and write a pseudonymized training table for ``riskbridge train --table``."""
    from riskbridge.cohort import export_cohort

    settings = _settings()
    if labels is not None:
        settings = settings.model_copy(update={"export": settings.export.model_copy(update={"label_spec": labels})})
    if (window is None) == (accessions is None):
        raise _fail("give either --window or --accessions")
    bounds = _run_window(window, settings.site.timezone) if window else None
    listed: list[str] = []
    if accessions is not None:
        try:
            listed = [line.strip() for line in accessions.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as exc:
            raise _fail(f"--accessions: {exc}") from None
        if not listed:
            raise _fail(f"--accessions: {accessions} lists no accession number")
    try:
        with _count_progress() as report:
            result = export_cohort(settings, bounds, out, run_key, report, listed)
    except (RiskbridgeError, OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    excluded = ", ".join(f"{reason} {n}" for reason, n in sorted(result.excluded.items())) or "none"
    console.print(
        f"export run {result.run_id}: {result.rows} rows ({result.positives} positive) -> {result.table}\n"
        f"left out: {excluded}",
        highlight=False,
    )


model_app = typer.Typer(help="The active model: promotion of a candidate after its shadow record.")
app.add_typer(model_app, name="model")

PROMOTION_COLUMNS = (
    Column("check", "check"),
    Column("result", "result", style=lambda value: "green" if value == "OK" else "red"),
    Column("detail", "detail"),
)


@model_app.command("promote")
def model_promote(
    package: Path = typer.Argument(..., help="The candidate model package directory."),
    min_runs: int = typer.Option(3, "--min-runs", min=1, help="Finished runs that scored it in shadow."),
    min_studies: int = typer.Option(50, "--min-studies", min=1, help="Studies it scored in shadow."),
    max_failed_share: float = typer.Option(0.01, "--max-failed-share", min=0.0, max=1.0, help="Of its shadow scores."),
    fmt: OutputFormat = format_option(),
) -> None:
    """Make a candidate package the active model after its checks: the package verifies, it was trained on the
    pipeline's feature spec, and it scored enough studies in shadow. Then record the promotion and pin the package
    and its sha256 in the config file (\\[run] model_package, model_sha256; the shadow settings removed), or print the
    settings to set when there is no config file. Exit 1 when a check fails (nothing changes)."""
    from riskbridge.ledger import Ledger
    from riskbridge.promotion import check_candidate, pin_in_config, record_promotion
    from riskbridge.settings import config_file_path

    settings = _settings()
    try:
        with Ledger.connect(settings.database) as ledger:
            ledger.check_schema()
            promotion = check_candidate(settings, ledger, package, min_runs, min_studies, max_failed_share)
            rows = [
                {"check": c.name, "result": "OK" if c.passed else "FAIL", "detail": c.detail} for c in promotion.checks
            ]
            emit(rows, PROMOTION_COLUMNS, fmt, title=f"promote {package}")
            if not promotion.passed:
                raise typer.Exit(code=1)
            config = config_file_path(_State.config)
            if config is not None:
                pin_in_config(config, package, promotion.sha256)
            number = record_promotion(ledger, promotion)
    except RiskbridgeError as exc:
        raise _fail(str(exc)) from None
    if fmt != OutputFormat.table:
        return
    pins = f'model_package = "{package.resolve().as_posix()}"\nmodel_sha256 = "{promotion.sha256}"'
    if config is not None:
        console.print(f"promotion {number}: {promotion.name} {promotion.version} is the active model in {config}")
    else:
        console.print(f"promotion {number} recorded; no config file: set in [run] (and drop shadow_package):\n{pins}")


@app.command()
def monitor(
    window: str = typer.Option(..., "--window", help="START..END: study dates (inclusive) in the site zone."),
    outcome_window: str | None = typer.Option(
        None, "--outcome-window", help="START..END of the scans judged against their outcomes (default: --window)."
    ),
    table: Path | None = typer.Option(
        None, "--table", help="The active model's training table (default: \\[monitor] training_table)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Page directory (default: under \\[run] report_dir)."),
) -> None:
    """Drift of the active model's inputs and scores in a window against its training table, and its AUROC and
    calibration on the outcomes that arrived since; an HTML page with plots. Exit 1 on an alert
    (docs/site-training.md "Monitoring")."""
    from riskbridge.monitor import monitor as run_monitor

    settings = _settings()
    bounds = _run_window(window, settings.site.timezone)
    outcomes = _run_window(outcome_window, settings.site.timezone) if outcome_window else None
    where = out or settings.run.report_dir / f"monitor-{window.replace('..', '_')}"
    try:
        result = run_monitor(settings, bounds, where, outcomes, table)
    except (RiskbridgeError, OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    for line in result.lines():
        console.print(line, highlight=False, markup=False)
    if result.alerts:
        console.print("ALERT: " + "; ".join(result.alerts), highlight=False, markup=False)
        raise typer.Exit(code=1)


@app.command()
def survey(
    window: str = typer.Option(..., "--window", help="START..END: study dates (inclusive) in the site zone."),
    sample: int = typer.Option(200, "--sample", min=1, help="Matched patients whose feeds are read."),
    run_key: str | None = typer.Option(None, "--run-key", help="Names the survey run; the same key resumes it."),
    fmt: str = typer.Option("text", "--format", help="text (lines to read) or json (one document on stdout)."),
) -> None:
    """Before a site's first night: what its lab and note feeds send for the window's CT patients, judged as a
    night would judge it: per feature the LOINC codes and units seen, the share converted, rejected (and why) and
    outside the window; the codes no feature reads; the notes (docs/units.md "Surveying a site's feeds")."""
    import json

    from riskbridge.survey import survey_window

    if fmt not in ("text", "json"):
        raise _fail(f"--format must be text or json, not {fmt!r}")
    settings = _settings()
    bounds = _run_window(window, settings.site.timezone)
    try:
        if fmt == "json":  # one document on stdout, no progress bars in it
            result, scope = survey_window(settings, bounds, sample, run_key)
        else:
            with _count_progress() as report:
                result, scope = survey_window(settings, bounds, sample, run_key, report)
    except (RiskbridgeError, OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if fmt == "json":
        print(json.dumps({"run_id": scope.run_id, "studies": scope.studies, "matched_patients":
                          scope.matched_patients, **result.to_dict()}, indent=2))  # fmt: skip
        return
    console.print(
        f"survey run {scope.run_id}: {scope.studies} CT studies in the window, {scope.matched_patients} matched "
        f"patients, {scope.sampled} sampled",
        highlight=False,
        markup=False,
    )
    for line in result.lines():
        console.print(line, highlight=False, markup=False)
