"""The CLI's contract: version, and one clear line (exit 2, no traceback) for errors a person can fix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from riskbridge import __version__
from riskbridge.cli import app

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_bad_setting_is_one_line_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RISKBRIDGE_PACS__PORT", "not-a-port")
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 2
    assert "pacs.port" in result.output
    assert "Traceback" not in result.output


def test_doctor_reports_each_failure_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 on loopback: nothing listens there, so each check must fail on its own with a reason.
    monkeypatch.setenv("RISKBRIDGE_PACS__PORT", "9")
    monkeypatch.setenv("RISKBRIDGE_FHIR__BASE_URL", "http://127.0.0.1:9/fhir")
    monkeypatch.setenv("RISKBRIDGE_DATABASE__DSN", "postgresql://nobody@127.0.0.1:9/none")
    result = runner.invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert result.output.count("FAIL") == 3
    assert "Connection refused" in result.output


def test_sandbox_up_only_an_unknown_part_names_the_choices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RISKBRIDGE_SANDBOX__DIR", str(tmp_path / "sb"))
    result = runner.invoke(app, ["sandbox", "up", "--only", "pacs"])
    assert result.exit_code == 2
    assert "unknown sandbox part(s) pacs: choose from orthanc, hapi-fhir, postgres" in result.output


def test_output_off_a_terminal_is_never_wrapped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # rich wraps at 80 columns off a terminal by default: a message naming a long path then broke at a place that
    # depended on the path's length (and a test grepping it passed or failed with pytest's temp dir name)
    monkeypatch.delenv("COLUMNS", raising=False)
    missing = tmp_path / ("a-directory-with-a-long-name-" * 6) / "riskbridge.toml"
    result = runner.invoke(app, ["--config", str(missing), "doctor"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(missing) in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--nightly", "--window", "2026-01-01..2026-01-02"], "give one of --window"),
        (["run", "--window", "2026-01-01..2026-01-02", "--at", "2026-01-03T02:00"], "--at goes with --nightly"),
        (["run", "--nightly", "--at", "tonight"], "--at must be a time like"),
        (["run", "--nightly", "--kind", "backfill"], "--nightly runs are of kind nightly"),
        (["coverage", "--from", "2026-01-02", "--to", "2026-01-01"], "before it starts"),
        (["cohort", "export", "--out", "table"], "give either --window or --accessions"),
        (["cohort", "export", "--window", "2026-01-01..2026-01-02", "--accessions", "a.txt", "--out", "t"], "either"),
        (["cohort", "export", "--accessions", "/nonexistent/a.txt", "--out", "table"], "--accessions:"),
        (["monitor", "--window", "2026-01-02"], "--window must look like"),
    ],
)
def test_run_and_coverage_refuse_bad_options_in_one_line(
    monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.setenv("RISKBRIDGE_SITE__TIMEZONE", "Europe/Berlin")
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def test_every_help_text_is_shown_whole_with_its_default() -> None:
    """Help texts name settings in brackets ("default: [airflow] home"); rendered as markup they vanished and the
    help read "(default:  home)". Every command's and option's help must appear as written (rich markup escapes
    such a bracket as "\\[")."""
    import typer

    root = typer.main.get_command(app)
    checked = 0
    for path, command in _commands(root):
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        shown = " ".join(result.output.replace("│", " ").split())  # rich boxes the options
        texts = [p.help for p in command.params if getattr(p, "help", None)]
        if command.help:
            texts.append(command.help.split("\n\n")[0])
        for text in texts:
            written = text.replace("\\[", "[")  # "\\[" keeps a bracket literal in rich markup
            assert " ".join(written.split()) in shown, (path, written)
            checked += "[" in written
    assert checked >= 5, "help texts naming a [section] setting are covered"
