"""Airflow with its metadata in PostgreSQL (the sandbox cluster, a database of its own): `riskbridge airflow init`
migrates it, and a real `airflow dags test` of the on-demand DAG runs through every task.

The run asks for an accession number no PACS study has, so every stage finds nothing to do: the mapped retrieve and
clinical tasks expand to zero and are skipped, and the tasks after them still run (their trigger rules). The full
nightly run over the synthetic cohort is the end-to-end test's job.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from riskbridge.airflow.local import LocalAirflow
from riskbridge.ledger import Ledger
from riskbridge.settings import DatabaseSettings, Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def metadata_url(sandbox: Settings, scratch_database: Callable[[str], tuple[DatabaseSettings, str]]) -> str:
    """A fresh, empty database for Airflow's metadata in the sandbox cluster; dropped afterwards."""
    name = scratch_database("airflow")[1]
    return f"postgresql+psycopg2://riskbridge@127.0.0.1:{sandbox.sandbox.postgres_port}/{name}"


def test_on_demand_dag_on_postgres_metadata(sandbox: Settings, metadata_url: str, tmp_path: Path) -> None:
    with Ledger.connect(sandbox.database) as ledger:
        ledger.upgrade()
    local = LocalAirflow(home=tmp_path / "airflow", metadata_url=metadata_url)
    local.init(sandbox)
    env = {
        **os.environ,
        "RISKBRIDGE_SITE__TIMEZONE": sandbox.site.timezone or "America/New_York",
        "RISKBRIDGE_AIRFLOW__RETRIES": "0",
        "RISKBRIDGE_STAGING_DIR": str(tmp_path / "staging"),
        "RISKBRIDGE_RUN__REPORT_DIR": str(tmp_path / "reports"),
    }
    accession = f"NOSUCH{uuid.uuid4().hex[:8].upper()}"

    result = local.dags_test("riskbridge_on_demand", conf={"accessions": [accession]}, env=env, timeout_s=900)

    assert result.returncode == 0, result.output[-4000:]
    assert result.task_states["retrieve"] == ["skipped"]
    assert result.task_states["clinical"] == ["skipped"]
    ran = {task: states for task, states in result.task_states.items() if task not in ("retrieve", "clinical")}
    assert all(states == ["success"] for states in ran.values()), ran
    assert result.succeeded
    exported = tmp_path / "connections.json"
    local.airflow("connections", "export", str(exported))
    assert set(json.loads(exported.read_text())) == {"pacs_default", "fhir_default", "riskbridge_db"}
    report_line = next(line for line in result.output.splitlines() if "run report: file://" in line)
    assert (tmp_path / "reports").as_uri() in report_line
