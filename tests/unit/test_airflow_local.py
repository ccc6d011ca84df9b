"""`riskbridge airflow init`: a real Airflow metadata database (SQLite file), pools and Connections from settings."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from riskbridge.airflow.hooks import connections_from_settings
from riskbridge.airflow.local import LocalAirflow, _json_output, _set_option
from riskbridge.cli import app
from riskbridge.settings import Settings

CONFIG = """
[pacs]
host = "pacs.hospital.example"
port = 11112
called_ae = "MAIN_PACS"

[fhir]
base_url = "https://ehr.hospital.example/fhir"

[fhir.auth]
type = "basic"
username = "svc"
password = "pw-from-the-config"

[database]
dsn = "postgresql://rb:dbpw@db.hospital.example:5433/ledger"

[airflow]
pacs_pool_slots = 3
"""


@dataclass(frozen=True)
class Initialized:
    home: Path
    output: str


@pytest.fixture(scope="module")
def initialized(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Initialized]:
    """One `riskbridge airflow init` for the module (about 15 s), with no RISKBRIDGE_* variable from the shell."""
    root = tmp_path_factory.mktemp("airflow-local")
    config = root / "riskbridge.toml"
    config.write_text(CONFIG)
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("RISKBRIDGE_")]:
            patch.delenv(name)
        result = CliRunner().invoke(app, ["--config", str(config), "airflow", "init", "--home", str(root / "airflow")])
    assert result.exit_code == 0, result.output
    yield Initialized(root / "airflow", result.output)


def test_init_migrates_and_seeds_pools_and_connections(initialized: Initialized, tmp_path: Path) -> None:
    home = initialized.home

    assert "pacs_associations (3 slots), gpu (1 slots)" in initialized.output
    local = LocalAirflow(home=home)
    pools = {
        row["pool"]: int(row["slots"]) for row in _json_output(local.airflow("pools", "list", "-o", "json").stdout)
    }
    assert pools["pacs_associations"] == 3 and pools["gpu"] == 1
    expected = connections_from_settings(Settings(**tomllib.loads(CONFIG)))
    export = tmp_path / "exported.json"
    local.airflow("connections", "export", str(export))
    exported = json.loads(export.read_text())
    for conn_id, wanted in expected.items():
        stored = exported[conn_id]
        assert {key: stored[key] for key in wanted if key != "extra"} == {
            k: v for k, v in wanted.items() if k != "extra"
        }
        assert json.loads(stored["extra"]) == wanted["extra"]
    # The secrets went into Airflow's store encrypted with the home's Fernet key; the import file is gone.
    fhir = _json_output(local.airflow("connections", "get", "fhir_default", "-o", "json").stdout)[0]
    assert fhir["is_encrypted"] == "True"
    assert not list(home.glob("riskbridge-*.json"))
    cfg = (home / "airflow.cfg").read_text()
    assert f"dags_folder = {local.dags_folder}" in cfg and "load_examples = False" in cfg


def test_a_failing_dag_run_reports_through_the_failure_callback(initialized: Initialized) -> None:
    """Real Airflow runs the on-demand DAG without identifiers: start_run fails before any server is needed."""
    local = LocalAirflow(home=initialized.home)
    env = {**os.environ, "RISKBRIDGE_AIRFLOW__RETRIES": "0"}

    result = local.dags_test("riskbridge_on_demand", conf={"accessions": [], "patient_ids": []}, env=env)

    assert result.returncode != 0 and not result.succeeded
    assert result.task_states["start_run"] == ["failed"]
    assert {state for task, states in result.task_states.items() if task != "start_run" for state in states} == {
        "upstream_failed"
    }
    assert "an on-demand run needs accession numbers or patient IDs" in result.output
    assert "riskbridge task start_run (map index -1) failed with ValueError; ledger run None" in result.output
    assert "no ledger run to mark failed" in result.output


def test_init_reports_a_bad_metadata_url(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["airflow", "init", "--home", str(tmp_path), "--metadata-url", "nosuchdb://x"], catch_exceptions=False
    )
    assert result.exit_code == 2
    assert "airflow db migrate exited" in result.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[core]\n# comment\ndags_folder = /old\nx = 1\n[database]\n",
            "[core]\n# comment\ndags_folder = /new\nx = 1\n[database]\n",
        ),
        ("[core]\nx = 1\n", "[core]\ndags_folder = /new\nx = 1\n"),
        ("[database]\ndags_folder = /other\n", "[database]\ndags_folder = /other\n\n[core]\ndags_folder = /new\n"),
    ],
)
def test_set_option_changes_one_line_of_its_section(text: str, expected: str) -> None:
    assert _set_option(text, "core", "dags_folder", "/new") == expected
