"""Secrets everybody knows are refused; the Docker deployment's secrets are generated on each host.

Two guards against a deployment that runs with a secret anyone can look up:

- :func:`default_secret_problems` names every configured secret (the FHIR password, token and client secret, the
  ledger DSN's password, a password inside a URL setting, the export's pseudonym key) whose value is a well-known
  default: a word of :data:`DEFAULT_WORDS` (in any case) or a value this repository once committed
  (:data:`LEAKED_SHA256`). :func:`riskbridge.settings.load_settings` and every Airflow task (whose Connections bring
  their own credentials) refuse such settings, naming the setting and never its value. A secret whose section names
  only loopback servers is let through: the sandbox and the compose services published on 127.0.0.1 may use fixed
  passwords. The sandbox itself uses none (trust authentication, Orthanc without authentication).
- :func:`generate_compose_secrets` writes the secret files ``docker/docker-compose.yml`` reads (random values,
  mode 0600, never over an existing file) and ``docker/airflow/connections.json`` from its committed template.
  ``docker/check-secrets.sh`` runs first in each compose service and refuses a secret file that is missing, empty,
  a default, too short, or has characters the services put unescaped into URLs and JSON. It holds the same two
  lists; tests/unit/test_compose_secrets.py keeps them equal to the ones here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import BaseModel, SecretStr

from riskbridge.errors import ConfigurationError
from riskbridge.filemodes import create_private_file
from riskbridge.hosts import is_loopback_host

if TYPE_CHECKING:
    from riskbridge.settings import Settings

__all__ = [
    "AIRFLOW_IMAGE_UID",
    "COMPOSE_SECRETS",
    "CONNECTIONS_FILE",
    "CONNECTIONS_TEMPLATE",
    "DEFAULT_WORDS",
    "LEAKED_SHA256",
    "MIN_SECRET_LENGTH",
    "ComposeSecret",
    "ComposeSecretsError",
    "SecretFileResult",
    "default_secret_problems",
    "generate_compose_secrets",
    "is_default_secret",
    "is_loopback",
    "secret_file_problem",
]

# Placeholders and service names that end up as passwords when nobody changes them.
DEFAULT_WORDS = (
    "change-me",
    "change-me-before-use",
    "changeme",
    "airflow",
    "postgres",
    "orthanc",
    "riskbridge",
    "admin",
    "password",
    "secret",
)
# SHA-256 of the Fernet key and the JWT secret docker/airflow/ committed until the security review: public for
# good, so refused wherever they show up. Digests, so the values themselves appear nowhere in the tree.
LEAKED_SHA256 = (
    "1190f1cd297c4a9d04958ca401798b40b933be99ed1560ba067622d3f9b6ac54",
    "b4a7b78c678ecb335e7efe07f2c1da083d19cc95bc96243b228a5aa40254b089",
)
# The compose secrets go unescaped into SQLAlchemy URLs (Airflow's *_CMD options) and Orthanc's JSON: characters
# that are safe in both, which every generated value (token_urlsafe, a Fernet key) uses.
_SECRET_FILE_CHARS = re.compile(r"[A-Za-z0-9._~=+-]+")
MIN_SECRET_LENGTH = 16
# The uid of the airflow user in docker/airflow/Dockerfile (ARG AIRFLOW_UID); the Airflow services run as
# ${AIRFLOW_UID} from docker/.env, so that they can read the 0600 secret files of the user who generated them.
AIRFLOW_IMAGE_UID = 50000


class ComposeSecretsError(ConfigurationError):
    """The compose directory or the connections template cannot be used to generate the secret files."""


def is_default_secret(value: str) -> bool:
    """True when ``value`` is a well-known default: a word of :data:`DEFAULT_WORDS` or a leaked value."""
    stripped = value.strip()
    if stripped.lower() in DEFAULT_WORDS:
        return True
    return hashlib.sha256(stripped.encode("utf-8")).hexdigest() in LEAKED_SHA256


def is_loopback(host: str) -> bool:
    """True for a host that only this machine reaches: localhost, a loopback address, a Unix socket directory."""
    host = unquote(host).strip().strip("[]")
    # libpq takes an absolute path (or no host at all) as the directory of a Unix-domain socket.
    return not host or host.startswith("/") or is_loopback_host(host)


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _dsn_parts(dsn: str) -> tuple[str | None, list[str]]:
    """Return the password and the hosts of a libpq DSN, URL (``postgresql://``) or key=value form."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        password = unquote(userinfo.partition(":")[2]) if ":" in userinfo else None
        hosts = [_strip_port(host) for host in hostlist.split(",")]
        query = parse_qs(parts.query)
        if "password" in query:
            password = query["password"][-1]
        for key in ("host", "hostaddr"):
            if key in query:
                hosts = [host for value in query[key] for host in value.split(",")]
        return password, hosts
    params: dict[str, str] = {}
    for match in re.finditer(r"(\w+)\s*=\s*('(?:\\.|[^'\\])*'|\S*)", dsn):
        value = match.group(2)
        # libpq: a quoted value may hold spaces; a backslash escapes the next character.
        params[match.group(1)] = re.sub(r"\\(.)", r"\1", value[1:-1]) if value.startswith("'") else value
    hosts = [host for key in ("host", "hostaddr") if key in params for host in params[key].split(",")]
    return params.get("password"), hosts or [""]


def _url_parts(url: str) -> tuple[str | None, list[str]]:
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password else None
    return password, [parts.hostname] if parts.hostname else []


def _walk(model: BaseModel, path: str) -> Iterator[tuple[str, str, Any]]:
    """Yield ``(dotted key, field name, value)`` of every field of ``model`` and its nested sections."""
    for name, value in model:
        key = f"{path}.{name}" if path else name
        if isinstance(value, BaseModel):
            yield from _walk(value, key)
        else:
            yield key, name, value


def _secrets_and_hosts(section: BaseModel, path: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The secrets of one settings section (key, value) and every server host it names."""
    found: list[tuple[str, str]] = []
    hosts: list[str] = []
    for key, name, value in _walk(section, path):
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
            if name == "dsn":
                password, dsn_hosts = _dsn_parts(text)
                hosts += dsn_hosts
                if password:
                    found.append((key, password))
            else:
                found.append((key, text))
        elif isinstance(value, str) and "://" in value:
            password, url_hosts = _url_parts(value)
            hosts += url_hosts
            if password:
                found.append((key, password))
        elif name == "host" and isinstance(value, str):
            hosts.append(value)
    return found, hosts


def default_secret_problems(settings: Settings) -> list[str]:
    """One message per configured secret that is a well-known default and may travel beyond this machine.

    A secret counts as local when every server its top-level section names (hosts, URLs, DSN hosts) is on loopback;
    a section that names no server (such as [export]) is never local. Messages name the setting, never the value.
    """
    problems: list[str] = []
    for section_name, section in settings:
        if not isinstance(section, BaseModel):
            continue
        found, hosts = _secrets_and_hosts(section, section_name)
        local = bool(hosts) and all(is_loopback(host) for host in hosts)
        for key, value in found:
            if value and not local and is_default_secret(value):
                problems.append(
                    f"{key}: a well-known default secret (a placeholder, a service name or a value once committed "
                    "to riskbridge) for a server that is not on loopback; set this site's own"
                )
    return problems


def secret_file_problem(value: str) -> str | None:
    """Why ``value`` (a secret file's content) may not start a compose service, or None; the rules of
    docker/check-secrets.sh."""
    # As the services read it: $(cat FILE) in check-secrets.sh and Airflow's *_CMD drops trailing newlines only.
    stripped = value.rstrip("\n")
    if not stripped:
        return "empty"
    if is_default_secret(stripped):
        return "a well-known default"
    if len(stripped) < MIN_SECRET_LENGTH:
        return f"shorter than {MIN_SECRET_LENGTH} characters"
    if not _SECRET_FILE_CHARS.fullmatch(stripped):
        return "has characters other than letters, digits and . _ ~ = + -"
    return None


@dataclass(frozen=True)
class ComposeSecret:
    """One secret file of docker/docker-compose.yml: where it lives, what it is, how a value is made."""

    path: str  # relative to the compose directory
    what: str
    kind: Literal["password", "token", "fernet"]
    airflow_reads: bool  # read by the Airflow services (which run as ${AIRFLOW_UID}, not as root)


COMPOSE_SECRETS = (
    ComposeSecret("postgres_password.txt", "password of the ledger's PostgreSQL user riskbridge", "password", False),
    ComposeSecret("airflow/airflow_db_password.txt", "Airflow metadata database password", "password", True),
    ComposeSecret("airflow/airflow_fernet_key.txt", "Airflow Fernet key", "fernet", True),
    ComposeSecret("airflow/airflow_jwt_secret.txt", "Airflow API JWT secret", "token", True),
    ComposeSecret("orthanc/orthanc_password.txt", "password of Orthanc's REST user riskbridge", "password", False),
)
CONNECTIONS_FILE = "airflow/connections.json"
CONNECTIONS_TEMPLATE = "airflow/connections.template.json"
ENV_FILE = ".env"


@dataclass(frozen=True)
class SecretFileResult:
    """What :func:`generate_compose_secrets` did with one file; ``note`` never holds a secret."""

    path: Path
    what: str
    status: Literal["written", "kept", "refused"]
    note: str = ""


def _new_value(kind: str) -> str:
    if kind == "fernet":
        from cryptography.fernet import Fernet

        return Fernet.generate_key().decode("ascii")
    import secrets

    # 32 bytes (43 characters) for a signing key; 24 bytes (32 characters) for a password.
    return secrets.token_urlsafe(32 if kind == "token" else 24)


def _loose_mode_note(path: Path) -> str:
    mode = path.stat().st_mode & 0o777
    return f"readable by others (mode {mode:04o}): chmod 600 it" if mode & 0o077 else ""


def _rendered_connections(directory: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """The connections of the template with each ``{"secret_file": F}`` password replaced by F's content; and which
    connection took its password from which file."""
    template_path = directory / CONNECTIONS_TEMPLATE
    try:
        connections = json.loads(template_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ComposeSecretsError(f"cannot read the connections template {template_path}: {exc}") from None
    sources: dict[str, Path] = {}
    for conn_id, connection in connections.items():
        reference = connection.get("password")
        if isinstance(reference, dict):
            source = directory / str(reference.get("secret_file", ""))
            if not source.is_file():
                raise ComposeSecretsError(f"{template_path}: {conn_id}'s password file {source} does not exist")
            connection["password"] = source.read_text(encoding="utf-8").strip()
            sources[conn_id] = source
    return connections, sources


def _existing_connections_note(path: Path, directory: Path) -> tuple[Literal["kept", "refused"], str]:
    """Check a connections file that is already there: defaults, and passwords its template takes from a file."""
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "refused", "not readable JSON: fix or delete it and run again"
    passwords = {
        conn_id: str(connection.get("password") or "")
        for conn_id, connection in existing.items()
        if isinstance(connection, dict)
    }
    defaults = sorted(conn_id for conn_id, password in passwords.items() if password and is_default_secret(password))
    if defaults:
        return "refused", f"the password of {', '.join(defaults)} is a well-known default: delete it and run again"
    expected, sources = _rendered_connections(directory)
    stale = sorted(conn_id for conn_id in sources if passwords.get(conn_id) != expected[conn_id]["password"])
    if stale:
        files = ", ".join(str(sources[conn_id]) for conn_id in stale)
        return "refused", f"the password of {', '.join(stale)} differs from {files}: delete it and run again"
    return "kept", _loose_mode_note(path)


def generate_compose_secrets(directory: Path, airflow_uid: int | None = None) -> list[SecretFileResult]:
    """Write each missing secret file of the compose deployment in ``directory`` (mode 0600); return what was done.

    Files: the five of :data:`COMPOSE_SECRETS` (a Fernet key from ``Fernet.generate_key``, the JWT secret and the
    passwords from ``secrets.token_urlsafe``), ``airflow/connections.json`` rendered from its template with those
    passwords, and ``.env`` with ``AIRFLOW_UID``, the uid the Airflow services run as: this user's, so they can read
    the secret files; for root, the image's airflow uid (:data:`AIRFLOW_IMAGE_UID`), and the files Airflow reads are
    handed to it. ``airflow_uid`` overrides that choice. An existing file is never overwritten: it is kept, or
    refused (with the reason) when it is empty, a default, or a connections file that no longer matches the
    passwords. Nothing returned holds a secret.
    """
    if not (directory / "docker-compose.yml").is_file():
        raise ComposeSecretsError(f"{directory} has no docker-compose.yml: pass the compose directory (--dir)")
    running_as_root = os.geteuid() == 0
    uid = airflow_uid if airflow_uid is not None else AIRFLOW_IMAGE_UID if running_as_root else os.geteuid()
    results: list[SecretFileResult] = []

    def hand_to_airflow(path: Path) -> None:
        # Only root can give a file away; anyone else runs the Airflow services as their own uid (.env).
        if running_as_root and uid != 0:
            os.chown(path, uid, 0)

    for secret in COMPOSE_SECRETS:
        path = directory / secret.path
        if create_private_file(path, _new_value(secret.kind) + "\n"):
            if secret.airflow_reads:
                hand_to_airflow(path)
            results.append(SecretFileResult(path, secret.what, "written"))
            continue
        problem = secret_file_problem(path.read_text(encoding="utf-8")) if path.is_file() else "not a file"
        if problem:
            results.append(SecretFileResult(path, secret.what, "refused", f"{problem}: delete it and run again"))
        else:
            results.append(SecretFileResult(path, secret.what, "kept", _loose_mode_note(path)))

    what = "Airflow Connections, with the ledger password"
    path = directory / CONNECTIONS_FILE
    if path.exists():
        status, note = _existing_connections_note(path, directory)
        results.append(SecretFileResult(path, what, status, note))
    elif any(result.status == "refused" for result in results):
        results.append(SecretFileResult(path, what, "refused", "not written: a password file it needs was refused"))
    else:
        connections, _ = _rendered_connections(directory)
        # Airflow's local-filesystem backend reads a connection's extra as a JSON string, as in the template.
        create_private_file(path, json.dumps(connections, indent=2) + "\n")
        hand_to_airflow(path)
        results.append(SecretFileResult(path, what, "written"))

    what = "compose environment"
    path = directory / ENV_FILE
    env = f"# The uid the Airflow services run as: the owner of the secret files they read.\nAIRFLOW_UID={uid}\n"
    if create_private_file(path, env):
        results.append(SecretFileResult(path, what, "written", f"AIRFLOW_UID={uid}"))
    elif not re.search(r"^AIRFLOW_UID=", path.read_text(encoding="utf-8"), flags=re.MULTILINE):
        results.append(SecretFileResult(path, what, "kept", f"has no AIRFLOW_UID: add AIRFLOW_UID={uid}"))
    else:
        results.append(SecretFileResult(path, what, "kept"))
    return results
