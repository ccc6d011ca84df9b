"""``riskbridge sandbox up`` / ``status`` / ``doctor`` / ``down`` as a person runs them, in a sandbox of its own.

It uses its own state directory and ports, so it runs beside the session's shared sandbox.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from riskbridge.cli import app
from riskbridge.dev.sandbox import Sandbox
from riskbridge.settings import load_settings

pytestmark = pytest.mark.integration

PORTS = {
    "RISKBRIDGE_PACS__PORT": "14342",
    "RISKBRIDGE_PACS__SCP_PORT": "11213",
    "RISKBRIDGE_SANDBOX__ORTHANC_HTTP_PORT": "18142",
    "RISKBRIDGE_SANDBOX__HAPI_PORT": "18180",
    "RISKBRIDGE_SANDBOX__POSTGRES_PORT": "15532",
    "RISKBRIDGE_SANDBOX__DCMQRSCP_PORT": "14343",
    "RISKBRIDGE_FHIR__BASE_URL": "http://127.0.0.1:18180/fhir",
    "RISKBRIDGE_DATABASE__DSN": "postgresql://riskbridge@127.0.0.1:15532/riskbridge",
}


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


@pytest.fixture()
def state_dir() -> Iterator[Path]:
    """A state directory the 'postgres' account can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="riskbridge-lifecycle-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_up_doctor_down_leaves_no_process(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path = state_dir
    for name, value in {**PORTS, "RISKBRIDGE_SANDBOX__DIR": str(tmp_path / "sandbox")}.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    env = {"COLUMNS": "200"}
    pids: dict[str, int | None] = {}
    try:
        up = runner.invoke(app, ["sandbox", "up"], env=env)
        assert up.exit_code == 0, up.output
        assert "127.0.0.1:18180/fhir" in up.output
        pids = {status.name: status.pid for status in Sandbox(load_settings()).status()}
        assert all(pids.values()), pids

        again = runner.invoke(app, ["sandbox", "up"], env=env)
        assert again.exit_code == 0, again.output
        assert {status.name: status.pid for status in Sandbox(load_settings()).status()} == pids

        status = runner.invoke(app, ["sandbox", "status"], env=env)
        assert status.exit_code == 0 and status.output.count("ready") == 4, status.output
        doctor = runner.invoke(app, ["doctor"], env=env)
        assert doctor.exit_code == 0, doctor.output
        assert doctor.output.count("OK") == 3

        busy = runner.invoke(app, ["sandbox", "up"], env={**env, "RISKBRIDGE_SANDBOX__DIR": str(tmp_path / "other")})
        assert busy.exit_code == 2
        assert "already in use" in busy.output and "Traceback" not in busy.output
    finally:
        down = runner.invoke(app, ["sandbox", "down"], env=env)
    assert down.exit_code == 0, down.output
    assert "stopped: orthanc, hapi-fhir, postgres" in down.output
    assert not [pid for pid in pids.values() if pid is not None and _alive(pid)]
    assert os.listdir(tmp_path / "sandbox" / "postgres" / "data")  # state kept for the next 'up'
    final = runner.invoke(app, ["sandbox", "status"], env=env)
    assert final.exit_code == 1 and final.output.count("stopped") == 4
