"""The development commands of the ``riskbridge`` command line: ``sandbox up|down|status``, ``synth`` and ``demo``.

:mod:`riskbridge.cli` registers them (``sandbox_app`` as the ``sandbox`` group, :func:`synth` and :func:`demo` as
commands); each imports its tool only when it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from riskbridge.console import CliState, cli_settings, console, count_progress, fail
from riskbridge.errors import RiskbridgeError

__all__ = ["demo", "sandbox_app", "synth"]

sandbox_app = typer.Typer(help="Loopback Orthanc, HAPI FHIR, PostgreSQL and dcmqrscp servers for tests and demos.")


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
        None, "--only", help="Start only this part (orthanc, hapi-fhir, postgres, dcmqrscp); repeatable."
    ),
) -> None:
    """Start Orthanc, HAPI FHIR, PostgreSQL and dcmqrscp on 127.0.0.1 (idempotent) and wait until they answer."""
    from riskbridge.dev.sandbox import Sandbox, SandboxError

    settings = cli_settings()
    sandbox = Sandbox(settings)
    try:
        with _part_progress() as report:
            statuses = sandbox.up(report, only=only or None)
    except SandboxError as exc:
        raise fail(str(exc)) from None
    console.print(_status_table(statuses))
    console.print(f"state and logs: {sandbox.root}")


@sandbox_app.command("down")
def sandbox_down() -> None:
    """Stop exactly the processes 'sandbox up' started."""
    from riskbridge.dev.sandbox import Sandbox, SandboxError

    try:
        stopped = Sandbox(cli_settings()).down()
    except SandboxError as exc:
        raise fail(str(exc)) from None
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@sandbox_app.command("status")
def sandbox_status() -> None:
    """Report each sandbox server; exit 1 unless all are ready."""
    from riskbridge.dev.sandbox import Sandbox

    statuses = Sandbox(cli_settings()).status()
    console.print(_status_table(statuses))
    if any(status.state != "ready" for status in statuses):
        raise typer.Exit(code=1)


def synth(
    patients: int = typer.Option(30, "--patients", "-n", min=1, help="Number of patients."),
    seed: int = typer.Option(7, "--seed", "-s", help="Random seed; the same seed gives the same cohort."),
    out: Path = typer.Option(Path(".riskbridge/cohort"), "--out", "-o", help="Output directory."),
    size: str = typer.Option("small", "--size", help="small (128x128 slices) or full (512x512)."),
    load: bool = typer.Option(False, "--load", help="Upload to the configured Orthanc and FHIR server."),
    pacs: str = typer.Option(
        "orthanc", "--pacs", help="With --load, where the DICOM files go: orthanc (REST) or dcmqrscp (C-STORE)."
    ),
    lab_shift: list[str] = typer.Option(
        [], "--lab-shift", help="LAB=FACTOR: multiply a lab's true values (a shifted population); repeatable."
    ),
    anchor: str | None = typer.Option(
        None,
        "--anchor",
        help="YYYY-MM-DD in January or February: index CTs fall in the 14 days before it (default 2024-01-15); "
        "a cohort of its own dates and UIDs, apart from others in the same servers.",
    ),
) -> None:
    """Generate a deterministic synthetic cohort with ground truth (and optionally load it)."""
    from riskbridge.dev import synth as synthetic

    shift: dict[str, float] = {}
    for item in lab_shift:
        name, _, factor = item.partition("=")
        try:
            shift[name.strip()] = float(factor)
        except ValueError:
            raise fail(f"--lab-shift takes LAB=FACTOR (e.g. crp=3), not {item!r}") from None

    try:
        anchor_day = date.fromisoformat(anchor) if anchor is not None else None
    except ValueError:
        raise fail(f"--anchor takes a date YYYY-MM-DD, not {anchor!r}") from None
    if size not in ("small", "full"):
        raise fail(f"--size must be 'small' or 'full', not {size!r}")
    if pacs not in ("orthanc", "dcmqrscp"):
        raise fail(f"--pacs must be 'orthanc' or 'dcmqrscp', not {pacs!r}")
    settings = cli_settings()
    try:
        with count_progress() as report:
            summary = synthetic.generate(
                out, patients=patients, seed=seed, size=size, progress=report, lab_shift=shift, anchor=anchor_day
            )
    except synthetic.CohortError as exc:
        raise fail(str(exc)) from None
    console.print(summary.describe())
    if not load:
        return
    orthanc_url = f"http://127.0.0.1:{settings.sandbox.orthanc_http_port}"
    target = None
    if pacs == "dcmqrscp":
        from riskbridge.dev.sandbox import dcmqrscp_pacs

        target = dcmqrscp_pacs(settings)
    try:
        with count_progress() as report:
            loaded = synthetic.load(
                out, orthanc_url=orthanc_url, fhir_base_url=settings.fhir.base_url, progress=report, pacs=target
            )
    except synthetic.LoadError as exc:
        raise fail(str(exc)) from None
    console.print(loaded.describe())


def demo(
    patients: int = typer.Option(30, "--patients", "-n", min=10, help="Synthetic cohort size."),
    seed: int = typer.Option(7, "--seed", "-s", help="Synthetic cohort seed."),
    work_dir: Path = typer.Option(Path(".riskbridge/demo"), "--dir", help="Where the cohort and logs go."),
) -> None:
    """Set up everything (sandbox, synthetic cohort, ledger, Airflow) and run the nightly DAG once."""
    from riskbridge.dev.demo import run_demo

    def step(message: str) -> None:
        console.print(f"[bold]>[/] {message}")

    try:
        with count_progress() as report:
            result = run_demo(CliState.config, patients, seed, work_dir, step=step, progress=report)
    except RiskbridgeError as exc:
        raise fail(str(exc)) from None
    quarantined = ", ".join(f"{reason} {count}" for reason, count in sorted(result.quarantined.items())) or "none"
    console.print(
        f"\nnightly DAG: ledger run {result.ledger_run}, {result.scored} studies scored in {result.dag_seconds:.0f} s; "
        f"quarantined: {quarantined}"
        + (f"; already done by an earlier run: {result.already_done}" if result.already_done else "")
    )
    console.print(f"RiskAssessments: {result.risk_assessments_url}")
    console.print(f"run report:      {result.report.as_uri()}")
    console.print(f"Airflow home:    {result.airflow_home} (export AIRFLOW_HOME=... to look at the run)")
