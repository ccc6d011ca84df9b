"""No secret is committed under docker/; `riskbridge compose secrets` generates them (0600, never overwritten);
docker/check-secrets.sh keeps every compose service from starting with a default; riskbridge's settings refuse a
default secret for a server off loopback."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet
from pydantic import SecretStr
from typer.testing import CliRunner

from riskbridge.credentials import (
    COMPOSE_SECRETS,
    CONNECTIONS_FILE,
    CONNECTIONS_TEMPLATE,
    DEFAULT_WORDS,
    LEAKED_SHA256,
    default_secret_problems,
    generate_compose_secrets,
    is_default_secret,
    secret_file_problem,
)
from riskbridge.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
CHECK_SCRIPT = DOCKER / "check-secrets.sh"
# The files docker/ committed before the security review, with the secrets they held.
OLD_SECRET_FILES = (
    "docker/airflow/airflow_fernet_key.txt",
    "docker/airflow/airflow_jwt_secret.txt",
    "docker/airflow/airflow_db_password.txt",
    "docker/airflow/connections.json",
    "docker/postgres_password.txt",
)

# ------------------------------------------------------------------------------------------- committed files

FERNET_LIKE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}=(?![A-Za-z0-9_=-])")
# A key ending in a secret's name, a value on the same line (a YAML key with a block below it has none).
SECRET_ASSIGNMENT = re.compile(
    r"""(?P<key>[A-Za-z_.]*(?:password|passwd|secret|token|fernet_key))["']?[ \t]*[:=][ \t]*"""
    r"""(?P<value>"[^"\n]*"|'[^'\n]*'|[^\s,}#]+)""",
    re.IGNORECASE,
)
SECRET_FILE_NAME = re.compile(r"(password|secret|fernet|jwt|token)[^/]*\.txt$|\.(pem|key|p12|pfx)$", re.IGNORECASE)
URL_PASSWORD = re.compile(r"://[^/\s:@\"']+:(?P<password>[^@\s/\"']+)@")
REGISTERED_USERS = re.compile(r'"RegisteredUsers"\s*:\s*\{(?P<users>[^}]*)\}')


REFUSAL_SCRIPT = "docker/check-secrets.sh"  # holds the list of refused defaults (the old values only as hashes)


def _placeholder(value: str) -> bool:
    """A value filled in at start: an environment variable, a command substitution, a secret file reference."""
    return value == "" or value.startswith(("$", "{", "/run/secrets/"))


def scan_for_secrets(name: str, text: str) -> list[str]:
    """Findings (file and rule, never the value) of committed secrets in one file's text."""
    findings = []
    if SECRET_FILE_NAME.search(name):
        findings.append(f"{name}: a secret file by its name")
    if FERNET_LIKE.search(text):
        findings.append(f"{name}: a Fernet-key-like string")
    if "change-me" in text.lower():
        findings.append(f"{name}: a change-me placeholder")
    if text.strip() and is_default_secret(text.strip()):
        findings.append(f"{name}: the whole file is a known default secret")
    if any(is_default_secret(token) for token in re.split(r"[^A-Za-z0-9_=.~+-]+", text) if len(token) >= 40):
        findings.append(f"{name}: a leaked value")
    for match in SECRET_ASSIGNMENT.finditer(text):
        key, value = match.group("key"), match.group("value").strip("\"'")
        if key.upper().endswith(("_FILE", "_CMD")) or _placeholder(value):
            continue
        findings.append(f"{name}: a literal value for {key}")
    for match in URL_PASSWORD.finditer(text):
        if not _placeholder(match.group("password")):
            findings.append(f"{name}: a password inside a URL")
    for match in REGISTERED_USERS.finditer(text):
        passwords = re.findall(r'"[^"]*"\s*:\s*"([^"]*)"', match.group("users"))
        if any(not _placeholder(password) for password in passwords):
            findings.append(f"{name}: a literal Orthanc user password")
    return findings


def _git(*args: str) -> str:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout


def test_no_tracked_file_under_docker_holds_a_secret() -> None:
    findings = []
    for name in _git("ls-files", "-z", "docker").split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        found = scan_for_secrets(name, data.decode("utf-8", errors="replace"))
        if name == REFUSAL_SCRIPT:  # it names the refused words and its messages say "secret: ..." on purpose
            found = [f for f in found if f.endswith(("a Fernet-key-like string", "a leaked value"))]
        findings += found
    assert findings == []


def test_the_scan_finds_what_docker_committed_before_the_review() -> None:
    added = _git("log", "--diff-filter=A", "--format=%H", "--", "docker/airflow/airflow_fernet_key.txt").split()
    if not added:
        pytest.skip("the history holding the old docker/ secrets is not in this clone")
    old = added[-1]
    findings: dict[str, list[str]] = {}
    for name in _git("ls-tree", "-r", "--name-only", old, "docker").split():
        text = _git("show", f"{old}:{name}")
        if "\0" not in text:
            findings[name] = scan_for_secrets(name, text)
    for name in OLD_SECRET_FILES:
        assert findings.get(name), f"the scan misses the secret in {name}"
    assert findings["docker/orthanc/riskbridge-orthanc.json"], "the Orthanc user's literal password"


def test_every_compose_secret_file_is_generated_and_gitignored() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    files = {str(Path(secret["file"])) for secret in compose["secrets"].values()}
    generated = {secret.path for secret in COMPOSE_SECRETS} | {CONNECTIONS_FILE}
    assert files == generated
    ignored = _git("check-ignore", *(f"docker/{name}" for name in [*sorted(files), ".env"])).split()
    assert sorted(ignored) == sorted(f"docker/{name}" for name in [*files, ".env"])
    assert not set(_git("ls-files", "docker").split()) & {f"docker/{name}" for name in files}


# ---------------------------------------------------------------------------------------------- the generator


@pytest.fixture
def compose_dir(tmp_path: Path) -> Path:
    """A copy of what a checkout's docker/ holds before the generator runs."""
    directory = tmp_path / "docker"
    (directory / "airflow").mkdir(parents=True)
    shutil.copy(DOCKER / "docker-compose.yml", directory / "docker-compose.yml")
    shutil.copy(DOCKER / CONNECTIONS_TEMPLATE, directory / CONNECTIONS_TEMPLATE)
    return directory


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_generator_writes_private_random_secrets(compose_dir: Path) -> None:
    results = generate_compose_secrets(compose_dir)
    assert [result.status for result in results] == ["written"] * (len(COMPOSE_SECRETS) + 2)
    values = {}
    for secret in COMPOSE_SECRETS:
        path = compose_dir / secret.path
        assert _mode(path) == 0o600, secret.path
        value = path.read_text().strip()
        assert secret_file_problem(value) is None, secret.path
        values[secret.path] = value
    Fernet(values["airflow/airflow_fernet_key.txt"].encode())  # raises unless a valid key
    assert len(set(values.values())) == len(values), "every secret is its own"
    connections = json.loads((compose_dir / CONNECTIONS_FILE).read_text())
    assert _mode(compose_dir / CONNECTIONS_FILE) == 0o600
    assert connections["riskbridge_db"]["password"] == values["postgres_password.txt"]
    assert re.search(r"^AIRFLOW_UID=\d+$", (compose_dir / ".env").read_text(), flags=re.MULTILINE)
    shown = " ".join(f"{result.path} {result.what} {result.note}" for result in results)
    assert not any(value in shown for value in values.values())


def test_the_connections_file_loads_as_the_ledger_dsn(compose_dir: Path) -> None:
    from airflow.secrets.local_filesystem import load_connections_dict

    from riskbridge.airflow.hooks import postgres_dsn_from_connection

    generate_compose_secrets(compose_dir)
    password = (compose_dir / "postgres_password.txt").read_text().strip()
    connections = load_connections_dict(str(compose_dir / CONNECTIONS_FILE))
    dsn = postgres_dsn_from_connection(connections["riskbridge_db"])
    assert dsn == f"postgresql://riskbridge:{password}@postgres:5432/riskbridge"


def test_the_generator_never_overwrites(compose_dir: Path) -> None:
    own = compose_dir / "postgres_password.txt"
    own.write_text("a-site-chosen-password-0123\n")
    own.chmod(0o600)
    generate_compose_secrets(compose_dir)
    before = {path: path.read_bytes() for path in compose_dir.rglob("*") if path.is_file()}
    results = generate_compose_secrets(compose_dir)
    assert {result.status for result in results} == {"kept"}
    assert {path: path.read_bytes() for path in compose_dir.rglob("*") if path.is_file()} == before
    assert own.read_text() == "a-site-chosen-password-0123\n"
    assert json.loads((compose_dir / CONNECTIONS_FILE).read_text())["riskbridge_db"]["password"] == (
        "a-site-chosen-password-0123"
    )


def test_the_generator_refuses_a_default_it_finds_and_writes_no_connections_with_it(compose_dir: Path) -> None:
    (compose_dir / "postgres_password.txt").write_text("change-me-before-use\n")
    results = {result.path.name: result for result in generate_compose_secrets(compose_dir)}
    assert results["postgres_password.txt"].status == "refused"
    assert "change-me" not in results["postgres_password.txt"].note
    assert results["connections.json"].status == "refused"
    assert not (compose_dir / CONNECTIONS_FILE).exists()


def test_the_generator_refuses_a_connections_file_that_no_longer_matches(compose_dir: Path) -> None:
    generate_compose_secrets(compose_dir)
    (compose_dir / "postgres_password.txt").unlink()
    results = {result.path.name: result for result in generate_compose_secrets(compose_dir)}
    assert results["postgres_password.txt"].status == "written"
    assert results["connections.json"].status == "refused" and "differs" in results["connections.json"].note


def test_the_cli_names_the_files_and_never_a_value(compose_dir: Path) -> None:
    from riskbridge.cli import app

    result = CliRunner().invoke(app, ["compose", "secrets", "--dir", str(compose_dir)])
    assert result.exit_code == 0, result.output
    for secret in COMPOSE_SECRETS:
        assert str(compose_dir / secret.path) in result.output
        assert (compose_dir / secret.path).read_text().strip() not in result.output
    again = CliRunner().invoke(app, ["compose", "secrets", "--dir", str(compose_dir)])
    assert again.exit_code == 0 and "written" not in again.output
    (compose_dir / "orthanc" / "orthanc_password.txt").write_text("orthanc\n")
    refused = CliRunner().invoke(app, ["compose", "secrets", "--dir", str(compose_dir)])
    assert refused.exit_code == 2 and "orthanc_password.txt" in refused.output


def test_the_cli_refuses_a_directory_without_a_compose_file(tmp_path: Path) -> None:
    from riskbridge.cli import app

    result = CliRunner().invoke(app, ["compose", "secrets", "--dir", str(tmp_path)])
    assert result.exit_code == 2 and "docker-compose.yml" in result.output
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- the entrypoint check script


def _check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(CHECK_SCRIPT), *args], capture_output=True, text=True, env=env, check=False)


def _secret(tmp_path: Path, content: str, name: str = "secret") -> Path:
    path = tmp_path / name
    path.write_text(content)
    return path


def _leaked_values() -> list[str]:
    """The values docker/ once committed, from the history (so they need not be spelled out in this tree)."""
    try:
        added = _git("log", "--diff-filter=A", "--format=%H", "--", "docker/airflow/airflow_fernet_key.txt").split()
    except subprocess.CalledProcessError:
        return []
    if not added:
        return []
    names = ("docker/airflow/airflow_fernet_key.txt", "docker/airflow/airflow_jwt_secret.txt")
    return [_git("show", f"{added[-1]}:{name}").strip() for name in names]


def test_the_script_and_riskbridge_refuse_the_same_defaults() -> None:
    script = CHECK_SCRIPT.read_text()
    words = re.search(r'^DEFAULT_WORDS="([^"]*)"', script, flags=re.MULTILINE)
    digests = re.search(r'^LEAKED_SHA256="([^"]*)"', script, flags=re.MULTILINE)
    assert words and digests
    assert words.group(1).split() == list(DEFAULT_WORDS)
    assert digests.group(1).split() == list(LEAKED_SHA256)
    leaked = _leaked_values()
    assert [hashlib.sha256(value.encode()).hexdigest() for value in leaked] == list(LEAKED_SHA256[: len(leaked)])


@pytest.mark.parametrize(
    "content",
    [*DEFAULT_WORDS, "Change-Me-Before-Use\n", "AIRFLOW", "", "\n", "short-random", "has a space in it 0123456",
     'quote"inside-0123456789'],
)  # fmt: skip
def test_the_script_refuses_a_default_empty_short_or_unsafe_secret(tmp_path: Path, content: str) -> None:
    path = _secret(tmp_path, content)
    result = _check(str(path), "--", "echo", "started")
    assert result.returncode == 1 and "started" not in result.stdout
    assert str(path) in result.stderr
    if content.strip() and content.strip() not in CHECK_SCRIPT.read_text():  # "secret" is in every message
        assert content.strip() not in result.stderr, "the message names the file, never the value"
    assert secret_file_problem(content) is not None, "riskbridge's mirror of the rules agrees"


def test_the_script_refuses_the_values_docker_once_committed(tmp_path: Path) -> None:
    leaked = _leaked_values()
    if not leaked:
        pytest.skip("the history holding the old docker/ secrets is not in this clone")
    for index, value in enumerate(leaked):
        result = _check(str(_secret(tmp_path, value + "\n", f"leaked{index}")), "--", "true")
        assert result.returncode == 1 and "well-known default" in result.stderr
        assert value not in result.stderr


def test_the_script_refuses_a_missing_file_and_reports_every_problem(tmp_path: Path) -> None:
    result = _check(str(tmp_path / "absent"), str(_secret(tmp_path, "postgres")), "--", "true")
    assert result.returncode == 1
    assert "absent is missing" in result.stderr and "2 bad secret file(s)" in result.stderr


def test_the_script_starts_the_service_with_generated_secrets(compose_dir: Path) -> None:
    generate_compose_secrets(compose_dir)
    files = [str(compose_dir / secret.path) for secret in COMPOSE_SECRETS]
    orthanc = compose_dir / "orthanc" / "orthanc_password.txt"
    result = _check(
        *files, "--json", str(compose_dir / CONNECTIONS_FILE), "--env", f"ORTHANC_RISKBRIDGE_PASSWORD={orthanc}",
        "--", "sh", "-c", 'printf %s "$ORTHANC_RISKBRIDGE_PASSWORD"',
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == orthanc.read_text().strip(), "the service sees the password, without the newline"


def test_the_script_refuses_a_connections_file_with_a_default_password(tmp_path: Path) -> None:
    connections = {"riskbridge_db": {"conn_type": "riskbridge_db", "host": "postgres", "password": "change-me"}}
    path = _secret(tmp_path, json.dumps(connections), "connections.json")
    result = _check("--json", str(path), "--", "true")
    assert result.returncode == 1 and "connections.json" in result.stderr
    connections["riskbridge_db"]["password"] = "a-real-password-0123456789"
    path.write_text(json.dumps(connections, indent=2))
    assert _check("--json", str(path), "--", "true").returncode == 0


def test_every_compose_service_checks_each_secret_it_mounts_before_it_starts() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        mounted = set(service.get("secrets", []))
        if not mounted:
            continue
        entrypoint: list[str] = service["entrypoint"]
        script = entrypoint.index("/opt/riskbridge/check-secrets.sh")
        assert entrypoint[script - 1] == "/bin/sh", name
        checked = {match for arg in entrypoint for match in re.findall(r"/run/secrets/(\w+)", arg)}
        assert checked == mounted, name
        assert "./check-secrets.sh:/opt/riskbridge/check-secrets.sh:ro" in service["volumes"], name
        command = entrypoint[entrypoint.index("--") + 1 :] + _as_list(service.get("command"))
        assert command, f"{name}: an entrypoint clears the image's command; the service must name its own"


def _as_list(command: Any) -> list[str]:
    if command is None:
        return []
    return command if isinstance(command, list) else command.split()


def test_orthanc_reads_its_password_from_the_variable_the_check_exports() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    entrypoint = compose["services"]["orthanc"]["entrypoint"]
    exported = entrypoint[entrypoint.index("--env") + 1].split("=")[0]
    config = json.loads((DOCKER / "orthanc" / "riskbridge-orthanc.json").read_text())
    assert config["AuthenticationEnabled"] is True
    assert config["RegisteredUsers"] == {"riskbridge": "${" + exported + "}"}


# ------------------------------------------------------------------------------------------ riskbridge's settings


def _load(tmp_path: Path, toml: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in [name for name in os.environ if name.startswith("RISKBRIDGE_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "riskbridge.toml"
    config.write_text(toml)
    return load_settings(config)


FHIR_BASIC = """
[fhir]
base_url = "{url}"
[fhir.auth]
type = "basic"
username = "riskbridge"
password = "{password}"
"""


def test_a_default_fhir_password_for_a_remote_server_is_refused_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = FHIR_BASIC.format(url="https://ehr.hospital.example/fhir", password="Change-Me-Before-Use")
    with pytest.raises(SettingsError) as caught:
        _load(tmp_path, toml, monkeypatch)
    assert "fhir.auth.password" in str(caught.value)
    assert "change-me" not in str(caught.value).lower()


def test_the_loopback_sandbox_may_use_fixed_passwords(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for url in ("http://127.0.0.1:18080/fhir", "http://localhost:18080/fhir", "http://[::1]:18080/fhir"):
        settings = _load(tmp_path, FHIR_BASIC.format(url=url, password="change-me"), monkeypatch)
        assert settings.fhir.auth.password is not None
    assert _load(tmp_path, "", monkeypatch).database.dsn.get_secret_value().startswith("postgresql://riskbridge@127.")


@pytest.mark.parametrize(
    ("dsn", "refused"),
    [
        ("postgresql://riskbridge:postgres@db.hospital.example:5432/riskbridge", True),
        ("postgresql://riskbridge:change-me-before-use@10.0.0.5/riskbridge?sslmode=require", True),
        ("postgresql://riskbridge@db.hospital.example/riskbridge?password=airflow", True),
        ("host=db.hospital.example user=riskbridge password='change-me' dbname=riskbridge", True),
        ("postgresql://riskbridge:postgres@127.0.0.1:15432/riskbridge", False),
        ("postgresql://riskbridge:postgres@/riskbridge?host=/var/run/postgresql", False),
        ("host=localhost user=riskbridge password=postgres dbname=riskbridge", False),
        ("postgresql://riskbridge:s3cret-of-this-site@db.hospital.example/riskbridge", False),
    ],
)
def test_a_default_ledger_password_is_refused_off_loopback(dsn: str, refused: bool) -> None:
    settings = Settings.model_validate({"database": {"dsn": dsn}})
    problems = default_secret_problems(settings)
    assert bool(problems) is refused
    assert all("database.dsn" in problem for problem in problems)


def test_other_secrets_are_checked_too() -> None:
    oauth2 = {"type": "oauth2", "token_url": "https://ehr.hospital.example/token", "client_id": "rb"}
    settings = Settings.model_validate(
        {
            "pacs": {"host": "pacs.example", "dicomweb_url": "https://rb:orthanc@pacs.example/dicom-web"},
            "fhir": {"base_url": "https://ehr.hospital.example/fhir", "auth": {**oauth2, "client_secret": "secret"}},
            "export": {"pseudonym_secret": "change-me-before-use"},
        }
    )
    keys = sorted(problem.split(":")[0] for problem in default_secret_problems(settings))
    assert keys == ["export.pseudonym_secret", "fhir.auth.client_secret", "pacs.dicomweb_url"]


def test_an_airflow_task_refuses_a_default_from_its_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    from riskbridge.airflow import dagkit, hooks
    from riskbridge.settings import DatabaseSettings

    for name in [name for name in os.environ if name.startswith("RISKBRIDGE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RISKBRIDGE_CONFIG", os.devnull)
    # As the connections.json docker/ once committed gave it: the ledger on host "postgres", a placeholder password.
    old = DatabaseSettings(dsn=SecretStr("postgresql://riskbridge:change-me-before-use@postgres:5432/riskbridge"))
    monkeypatch.setattr(hooks, "settings_with_connections", lambda s: s.model_copy(update={"database": old}))
    umask = os.umask(0o022)
    try:
        with pytest.raises(SettingsError, match=r"database\.dsn"):
            dagkit.task_settings()
    finally:
        os.umask(umask)  # task_settings set the task process's 077 umask; this test process keeps its own
