"""What riskbridge writes is its user's alone: every entry point sets a 077 umask, and files that hold a secret
(airflow.cfg, the compose secrets) are 0600 whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from riskbridge.filemodes import PRIVATE_UMASK, create_private_file, use_private_umask, write_private_text

PERMISSIVE_UMASK = 0o022
STARTED = datetime(2024, 1, 15, 2, 0, tzinfo=UTC)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Start the test from a umask that would leave files world-readable; restore the session's afterwards."""
    previous = os.umask(PERMISSIVE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_private_tree(root: Path) -> int:
    """Every directory under ``root`` (itself included) is 0700 and every file 0600; return how many there are."""
    paths = [root, *root.rglob("*")]
    for path in paths:
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), f"{path}: {_mode(path):04o}"
    return len(paths)


def test_the_private_umask_keeps_new_files_and_directories_to_their_owner(
    permissive_umask: None, tmp_path: Path
) -> None:
    assert use_private_umask() == PERMISSIVE_UMASK
    (tmp_path / "reports" / "1").mkdir(parents=True)
    (tmp_path / "reports" / "1" / "index.html").write_text("<html></html>")
    assert _mode(tmp_path / "reports") == 0o700 and _mode(tmp_path / "reports" / "1" / "index.html") == 0o600


def test_a_stricter_site_umask_stays(tmp_path: Path) -> None:
    previous = os.umask(0o277)  # also no owner write on new files
    try:
        use_private_umask()
        assert _current_umask() == 0o277
    finally:
        os.umask(previous)


@pytest.fixture
def run_in_cli() -> Iterator[Callable[[Callable[[], None]], Result]]:
    """Run a function as a command of the real ``riskbridge`` app: after its callback, inside its context."""
    from riskbridge.cli import app

    work: list[Callable[[], None]] = []
    app.command("file-modes-probe")(lambda: work[-1]())
    probe = app.registered_commands[-1]

    def invoke(function: Callable[[], None]) -> Result:
        work.append(function)
        result = CliRunner().invoke(app, ["file-modes-probe"])
        assert result.exit_code == 0, result.output
        return result

    try:
        yield invoke
    finally:
        app.registered_commands.remove(probe)


def test_the_cli_sets_the_umask_for_the_command_and_gives_it_back(
    permissive_umask: None, run_in_cli: Callable[[Callable[[], None]], Result]
) -> None:
    seen: list[int] = []
    run_in_cli(lambda: seen.append(_current_umask()))
    assert seen == [PERMISSIVE_UMASK | PRIVATE_UMASK]
    assert _current_umask() == PERMISSIVE_UMASK, "an in-process caller gets its own umask back"


def test_the_sandbox_commands_keep_the_umask(monkeypatch: pytest.MonkeyPatch) -> None:
    # The sandbox's PostgreSQL runs as 'postgres' under root and must traverse the sandbox directory.
    from riskbridge import filemodes
    from riskbridge.cli import app

    calls: list[str] = []

    def recording_umask() -> int:
        calls.append("umask")
        return _current_umask()

    monkeypatch.setattr(filemodes, "use_private_umask", recording_umask)
    for command in (["sandbox", "--help"], ["demo", "--help"]):
        assert CliRunner().invoke(app, command).exit_code == 0
    assert calls == []
    assert CliRunner().invoke(app, ["version"]).exit_code == 0
    assert calls == ["umask"]


def test_what_a_cli_command_writes_through_riskbridge_writers_is_private(
    permissive_umask: None, tmp_path: Path, run_in_cli: Callable[[Callable[[], None]], Result]
) -> None:
    from riskbridge.connectors.staging import instance_path, write_atomic
    from riskbridge.harmonize.features import build_vector, load_default_feature_spec
    from riskbridge.model.data import TableRow, TableWriter
    from riskbridge.model.plots import write_page
    from riskbridge.model.preprocess import PreprocessConfig
    from riskbridge.stages.report import RunSummary, write_report

    def write_everything() -> None:
        # The staging writer (connectors/staging.py) sets no mode of its own: the umask makes series and dirs private.
        write_atomic(instance_path(tmp_path / "staging", "1.2.3", "1.2.3.4", "1.2.3.4.5"), [b"DICM"])

        scores = [(f"1.2.3.{i}", i / 4, "low") for i in range(4)]
        summary = RunSummary(
            run_id=1, run_key="cli:x", kind="nightly", status="success", window=None, started=STARTED,
            finished=None, stage_counts={"discover": {"done": 4}, "score": {"done": 4}},
            stage_seconds={"score": 1.0}, quarantine={}, scores=scores,
        )  # fmt: skip
        write_report(summary, tmp_path / "reports" / "1")

        spec = load_default_feature_spec()
        config = PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0), size=(4, 4, 4), hu_window=(-1000.0, 400.0))
        writer = TableWriter(tmp_path / "table", spec, config, {"kind": "site"})
        vector = build_vector(spec, {"wbc": 5.0}, None, {"age_years": 60.0, "sex_male": 1.0})
        writer.add(TableRow("k1", 1, vector, np.zeros((1, 4, 4, 4), dtype=np.float32)))
        writer.close()

        (tmp_path / "monitor").mkdir()
        write_page(tmp_path / "monitor" / "index.html", ["<html>", "</html>"])

    run_in_cli(write_everything)
    for root, at_least in (("staging", 4), ("reports", 3), ("table", 5), ("monitor", 2)):
        assert _assert_private_tree(tmp_path / root) >= at_least, root


def test_every_airflow_task_sets_the_umask(permissive_umask: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from riskbridge.airflow import dagkit, hooks

    for name in [name for name in os.environ if name.startswith("RISKBRIDGE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RISKBRIDGE_CONFIG", os.devnull)
    monkeypatch.setattr(hooks, "settings_with_connections", lambda settings: settings)
    dagkit.task_settings()
    assert _current_umask() & PRIVATE_UMASK == PRIVATE_UMASK


def test_airflow_cfg_written_by_airflow_init_is_private(permissive_umask: None, tmp_path: Path) -> None:
    from riskbridge.airflow.local import LocalAirflow

    home = tmp_path / "airflow"
    home.mkdir()
    config = home / "airflow.cfg"
    # As `airflow db migrate` leaves it from a process with a 022 umask: world-readable, with a Fernet key.
    config.write_text("[core]\nfernet_key = not-a-real-key\n")
    config.chmod(0o644)
    local = LocalAirflow(home, metadata_url="postgresql+psycopg2://airflow:pw@db.example/airflow")
    local.write_config()
    assert _mode(config) == 0o600
    text = config.read_text()
    assert "fernet_key = not-a-real-key" in text and "sql_alchemy_conn = postgresql+psycopg2://" in text
    assert [path.name for path in home.iterdir()] == ["airflow.cfg"], "no temporary file left behind"


def test_the_airflow_commands_riskbridge_runs_create_private_files(permissive_umask: None, tmp_path: Path) -> None:
    from riskbridge.airflow.local import LocalAirflow

    home = tmp_path / "airflow"
    home.mkdir(mode=0o700)
    LocalAirflow(home).airflow("version")
    assert _assert_private_tree(home) >= 2, "airflow version creates its logs folder"


def test_write_private_text_replaces_a_readable_file_with_a_private_one(permissive_umask: None, tmp_path: Path) -> None:
    path = tmp_path / "airflow.cfg"
    path.write_text("old")
    write_private_text(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o600


def test_create_private_file_never_overwrites(permissive_umask: None, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "secret.txt"
    assert create_private_file(path, "first\n")
    assert not create_private_file(path, "second\n")
    assert path.read_text() == "first\n" and _mode(path) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret.txt"], "no temporary file left behind"
