"""docker/docker-compose.yml is valid Compose, checked by the docker compose client (no engine needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker" / "docker-compose.yml"


def _compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.skip("no docker compose client on this machine (scripts/bootstrap.sh installs Debian's docker-compose)")


def test_compose_file_validates() -> None:
    result = subprocess.run(
        [*_compose_command(), "-f", str(COMPOSE_FILE), "config"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == {"orthanc", "hapi-fhir", "postgres"}


def test_compose_publishes_on_loopback_only() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published and all(str(port).startswith("127.0.0.1:") for port in published)
