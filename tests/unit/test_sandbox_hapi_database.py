"""The sandbox HAPI's database choice (``sandbox.hapi_database``) without starting servers: the launcher's command
line for H2 and for PostgreSQL, the setting's validation, and the start order (PostgreSQL ready and HAPI's database
created before HAPI starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from riskbridge.dev.sandbox import HAPI_POSTGRES_DATABASE, Sandbox, SandboxError
from riskbridge.settings import Settings, SettingsError, load_settings


def _sandbox(tmp_path: Path, **sandbox: object) -> Sandbox:
    return Sandbox(Settings(sandbox={"dir": tmp_path / "sb", **sandbox}))


@pytest.fixture(autouse=True)
def _java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("riskbridge.dev.sandbox._require_binary", lambda name, package, search=(): Path(f"/bin/{name}"))


def test_h2_is_the_default_and_adds_no_datasource_option(tmp_path: Path) -> None:
    box = _sandbox(tmp_path, hapi_port=26101)
    assert box.settings.sandbox.hapi_database == "h2"
    argv, env, user = box.hapi.command()
    assert argv[0] == "/bin/java" and "-jar" in argv and str(box.hapi.server_jar) in argv
    assert "--server.port=26101" in argv and "--server.address=127.0.0.1" in argv
    assert not [arg for arg in argv if "datasource" in arg]  # the launcher's own H2 in memory
    assert env == {} and user is None
    assert box.hapi.database_arguments() == []


def test_postgresql_points_the_launcher_at_a_database_of_the_sandbox_cluster(tmp_path: Path) -> None:
    box = _sandbox(tmp_path, hapi_database="postgresql", hapi_port=26102, postgres_port=26103)
    argv, env, user = box.hapi.command()
    expected = [
        f"--spring.datasource.url=jdbc:postgresql://127.0.0.1:26103/{HAPI_POSTGRES_DATABASE}",
        f"--spring.datasource.username={box.postgres.role}",
    ]
    assert argv[-2:] == expected and box.hapi.database_arguments() == expected
    assert box.postgres.database != HAPI_POSTGRES_DATABASE  # never riskbridge's own ledger database
    assert not [arg for arg in argv if "password" in arg]  # the sandbox cluster trusts loopback: nothing secret
    assert env == {} and user is None
    assert box.hapi.on_postgres and not _sandbox(tmp_path).hapi.on_postgres


def test_the_setting_is_read_from_the_file_and_the_environment_and_validated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "riskbridge.toml"
    config.write_text('[sandbox]\nhapi_database = "postgresql"\n')
    assert load_settings(config).sandbox.hapi_database == "postgresql"
    monkeypatch.setenv("RISKBRIDGE_SANDBOX__HAPI_DATABASE", "h2")
    assert load_settings(config).sandbox.hapi_database == "h2"
    monkeypatch.setenv("RISKBRIDGE_SANDBOX__HAPI_DATABASE", "mysql")
    with pytest.raises(SettingsError, match=r"sandbox\.hapi_database"):
        load_settings(config)


def test_a_hapi_on_postgresql_brings_the_postgres_part_along(tmp_path: Path) -> None:
    on_h2 = _sandbox(tmp_path)
    assert [part.name for part in on_h2.select(["hapi-fhir"])] == ["hapi-fhir"]
    on_postgres = _sandbox(tmp_path, hapi_database="postgresql")
    assert [part.name for part in on_postgres.select(["hapi-fhir"])] == ["hapi-fhir", "postgres"]
    assert [part.name for part in on_postgres.select(["orthanc"])] == ["orthanc"]


def _stand_ins(box: Sandbox, monkeypatch: pytest.MonkeyPatch, ready: dict[str, bool]) -> list[str]:
    """Every part's checks, start, stop, readiness and after_ready replaced; returns the list of what happened."""
    calls: list[str] = []
    for part in box.parts:
        name = part.name
        monkeypatch.setattr(part, "check_prerequisites", lambda: None)
        monkeypatch.setattr(part, "check_ports", lambda: None)
        monkeypatch.setattr(part, "prepare", lambda progress: None)
        monkeypatch.setattr(part, "running_pid", lambda name=name: 1 if f"start {name}" in calls else None)

        def start(name: str = name) -> int:
            calls.append(f"start {name}")
            return 1

        def stop(timeout_s: float = 30.0, name: str = name) -> bool:
            calls.append(f"stop {name}")
            return True

        monkeypatch.setattr(part, "start", start)
        monkeypatch.setattr(part, "stop", stop)
        monkeypatch.setattr(part, "exited_early", lambda name=name: None if ready[name] else "refused")
        monkeypatch.setattr(part, "serving", lambda name=name: ready[name])
        monkeypatch.setattr(part, "after_ready", lambda progress, name=name: calls.append(f"after_ready {name}"))
    monkeypatch.setattr(
        box.postgres, "recreate_database", lambda name, progress: calls.append(f"recreate database {name}")
    )
    return calls


def test_hapi_on_postgresql_starts_once_its_database_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = _sandbox(tmp_path, hapi_database="postgresql")
    calls = _stand_ins(box, monkeypatch, dict.fromkeys([p.name for p in box.parts], True))
    box.up()
    assert calls == [
        "start orthanc",
        "start postgres",
        "start dcmqrscp",
        "after_ready postgres",  # riskbridge's database
        f"recreate database {HAPI_POSTGRES_DATABASE}",
        "start hapi-fhir",
        "after_ready orthanc",
        "after_ready hapi-fhir",
        "after_ready dcmqrscp",  # postgres's after_ready is not run twice
    ]


def test_hapi_on_h2_starts_with_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = _sandbox(tmp_path)
    calls = _stand_ins(box, monkeypatch, dict.fromkeys([p.name for p in box.parts], True))
    box.up(only=["hapi-fhir", "postgres"])
    assert calls == ["start hapi-fhir", "start postgres", "after_ready hapi-fhir", "after_ready postgres"]


def test_a_postgresql_that_never_answers_stops_what_was_started_and_never_starts_hapi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = _sandbox(tmp_path, hapi_database="postgresql")
    calls = _stand_ins(box, monkeypatch, {"orthanc": True, "hapi-fhir": True, "postgres": False, "dcmqrscp": True})
    with pytest.raises(SandboxError, match="postgres exited during start-up"):
        box.up(only=["hapi-fhir"])
    assert calls == ["start postgres", "stop postgres"]
