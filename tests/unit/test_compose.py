"""docker/docker-compose.yml is valid Compose (checked by the docker compose client, no engine needed), and its
Airflow part holds together: one image, CeleryExecutor, a gpu-queue worker, secrets and settings that load.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from riskbridge.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
AIRFLOW_DIR = ROOT / "docker" / "airflow"
AIRFLOW_SERVICES = {
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-worker-gpu",
}


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
    assert set(services) == {"orthanc", "hapi-fhir", "postgres", *AIRFLOW_SERVICES, "airflow-postgres", "redis"}


def test_compose_publishes_on_loopback_only() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published and all(str(port).startswith("127.0.0.1:") for port in published)


def _services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return services


def test_airflow_services_share_one_image_with_the_celery_executor() -> None:
    services = _services()
    for name in AIRFLOW_SERVICES:
        service = services[name]
        assert service["image"] == "riskbridge/airflow:0.1.0", name
        assert service["build"] == {"context": "..", "dockerfile": "docker/airflow/Dockerfile"}, name
        assert service["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert service["environment"]["RISKBRIDGE_CONFIG"] == "/opt/riskbridge/riskbridge.toml", name
    commands = {name: services[name].get("command") for name in AIRFLOW_SERVICES}
    assert commands["airflow-apiserver"] == "api-server"
    assert commands["airflow-scheduler"] == "scheduler"
    assert commands["airflow-dag-processor"] == "dag-processor"
    assert commands["airflow-triggerer"] == "triggerer"
    assert "airflow pools set pacs_associations" in commands["airflow-init"][0]
    assert "airflow pools set gpu" in commands["airflow-init"][0]


def test_only_the_gpu_worker_consumes_the_gpu_queue_and_reserves_a_gpu() -> None:
    services = _services()
    gpu, default = services["airflow-worker-gpu"], services["airflow-worker"]
    assert gpu["command"].split()[:4] == ["celery", "worker", "--queues", "gpu"]
    assert default["command"] == "celery worker --queues default"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in default


def test_airflow_settings_file_loads_and_sends_scoring_to_the_gpu_queue() -> None:
    settings = load_settings(AIRFLOW_DIR / "riskbridge.toml")
    assert settings.airflow.score_queue == "gpu"
    assert settings.site.timezone is not None


def test_connections_file_becomes_riskbridge_settings(tmp_path: Path) -> None:
    """The connections file `riskbridge compose secrets` renders from the committed template (no secret is
    committed; test_compose_secrets.py checks the generator itself)."""
    from airflow.secrets.local_filesystem import load_connections_dict

    from riskbridge.airflow.hooks import (
        fhir_settings_from_connection,
        pacs_settings_from_connection,
        postgres_dsn_from_connection,
    )
    from riskbridge.credentials import generate_compose_secrets

    compose = tmp_path / "docker"
    (compose / "airflow").mkdir(parents=True)
    shutil.copy(COMPOSE_FILE, compose / "docker-compose.yml")
    shutil.copy(AIRFLOW_DIR / "connections.template.json", compose / "airflow" / "connections.template.json")
    generate_compose_secrets(compose)
    connections = load_connections_dict(str(compose / "airflow" / "connections.json"))
    assert set(connections) == {"pacs_default", "fhir_default", "riskbridge_db"}
    base = Settings()
    pacs = pacs_settings_from_connection(connections["pacs_default"], base.pacs)
    assert (pacs.host, pacs.port, pacs.transport) == ("orthanc", 4242, "c-get")
    assert (
        fhir_settings_from_connection(connections["fhir_default"], base.fhir).base_url == "http://hapi-fhir:8080/fhir"
    )
    dsn = postgres_dsn_from_connection(connections["riskbridge_db"])
    password = (compose / "postgres_password.txt").read_text().strip()
    assert dsn == f"postgresql://riskbridge:{password}@postgres:5432/riskbridge"


def test_image_pins_agree_with_the_project_constraints() -> None:
    def pins(path: Path) -> dict[str, str]:
        lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
        return {
            name.lower().replace("_", "-"): version for name, version in (line.split("==") for line in lines if line)
        }

    project, celery = pins(ROOT / "constraints.txt"), pins(AIRFLOW_DIR / "constraints-celery.txt")
    assert {name: version for name, version in celery.items() if project.get(name, version) != version} == {}
    assert "apache-airflow-providers-celery" in celery and "celery" in celery
    dockerfile = (AIRFLOW_DIR / "Dockerfile").read_text()
    assert "-c constraints.txt -c docker/airflow/constraints-celery.txt" in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            *sources, _ = [token for token in line.split()[1:] if not token.startswith("--")]
            assert all((ROOT / source).exists() for source in sources), line
