"""A local Airflow for tests and the demo: an AIRFLOW_HOME with a migrated metadata database, riskbridge's pools and
its three Connections seeded from riskbridge's settings, and ``airflow dags test`` runs against it.

Everything goes through Airflow's own CLI in a subprocess (``python -m airflow``), the way an operator would do it;
this module imports no Airflow code itself. The metadata database is SQLite in the home directory unless a
``postgresql+psycopg2://`` URL is given (Airflow then needs ``apache-airflow[postgres]``, which riskbridge installs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from riskbridge.errors import RiskbridgeError
from riskbridge.filemodes import PRIVATE_DIR_MODE, PRIVATE_UMASK, write_private_text
from riskbridge.settings import AirflowSettings, Settings

# The repository's dags/ folder (an editable install or a source checkout); a site passes its own.
DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"


class AirflowCommandError(RiskbridgeError, RuntimeError):
    """An ``airflow`` command failed; the message has the command and the end of its output."""


@dataclass(frozen=True)
class DagTestResult:
    """What ``airflow dags test`` did: exit status, output, wall seconds, and each task's final state."""

    dag_id: str
    returncode: int
    output: str
    seconds: float
    task_states: dict[str, list[str]]

    @property
    def succeeded(self) -> bool:
        """True when the command exited 0 and every task instance ended in success or skipped."""
        states = [state for per_task in self.task_states.values() for state in per_task]
        return self.returncode == 0 and bool(states) and all(state in ("success", "skipped") for state in states)


@dataclass(frozen=True)
class LocalAirflow:
    """One AIRFLOW_HOME: where its config, metadata database and logs live, and which DAG folder it parses."""

    home: Path
    dags_folder: Path = DAGS_FOLDER
    metadata_url: str | None = None  # None: SQLite file <home>/airflow.db

    @classmethod
    def from_settings(
        cls, settings: Settings, home: Path | None = None, metadata_url: str | None = None
    ) -> LocalAirflow:
        """Return the local Airflow at ``home`` (default: [airflow] home), absolute paths throughout."""
        return cls(home=(home or settings.airflow.home).resolve(), metadata_url=metadata_url)

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL of the metadata database."""
        return self.metadata_url or f"sqlite:///{self.home / 'airflow.db'}"

    def config_values(self) -> dict[tuple[str, str], str]:
        """The airflow.cfg options this home sets: DAG folder, no example DAGs, the metadata database."""
        return {
            ("core", "dags_folder"): str(self.dags_folder.resolve()),
            ("core", "load_examples"): "False",
            ("database", "sql_alchemy_conn"): self.database_url,
        }

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return ``base`` (default: this process's environment) with the variables that select this Airflow."""
        env = dict(os.environ if base is None else base)
        env["AIRFLOW_HOME"] = str(self.home)
        for (section, key), value in self.config_values().items():
            env[f"AIRFLOW__{section.upper()}__{key.upper()}"] = value
        return env

    def airflow(
        self, *args: str, timeout_s: float = 600.0, env: Mapping[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``airflow <args>`` against this home; raise :class:`AirflowCommandError` on failure if ``check``."""
        command = [sys.executable, "-m", "airflow", *args]
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                env=self.environment(env),
                timeout=timeout_s,
                check=False,
                # Airflow writes airflow.cfg (with a Fernet key), the SQLite metadata and task logs: this user's only.
                umask=PRIVATE_UMASK,
            )
        except subprocess.TimeoutExpired as exc:
            raise AirflowCommandError(f"airflow {' '.join(args)}: no answer within {timeout_s:.0f} s") from exc
        if check and result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise AirflowCommandError(f"airflow {' '.join(args)} exited {result.returncode}:\n{output[-4000:]}")
        return result

    def migrate(self) -> None:
        """Create or upgrade the metadata database (``airflow db migrate``) and write airflow.cfg."""
        self.home.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        self.airflow("db", "migrate")
        self.write_config()

    def write_config(self) -> None:
        """Put :meth:`config_values` into airflow.cfg, so ``AIRFLOW_HOME=<home> airflow ...`` alone finds them.

        The file holds the metadata URL (with its password) and Airflow's Fernet key: it is left mode 0600, also when
        an earlier airflow.cfg was readable by others.
        """
        path = self.home / "airflow.cfg"
        text = path.read_text() if path.is_file() else ""
        for (section, key), value in self.config_values().items():
            text = _set_option(text, section, key, value)
        write_private_text(path, text)

    def set_pools(self, config: AirflowSettings) -> dict[str, int]:
        """Create or resize the pools the DAGs use ([airflow] pacs_pool and gpu_pool); return name -> slots."""
        pools: dict[str, dict[str, Any]] = {
            config.pacs_pool: {
                "slots": config.pacs_pool_slots,
                "description": "riskbridge PACS tasks at once (discover and select hold one association, "
                "retrieve up to pacs.workers)",
            },
            config.gpu_pool: {"slots": config.gpu_pool_slots, "description": "riskbridge scoring tasks per GPU"},
        }
        self._import("pools", pools)
        return {name: int(pool["slots"]) for name, pool in pools.items()}

    def set_connections(self, settings: Settings) -> list[str]:
        """Create or replace the Connections [airflow] names from riskbridge's [pacs], [fhir], [database]."""
        from riskbridge.airflow.hooks import connections_from_settings

        connections = connections_from_settings(settings)
        # Airflow's import reads "extra" as a JSON string.
        rows = {
            conn_id: {**value, "extra": json.dumps(value.get("extra", {}))} for conn_id, value in connections.items()
        }
        self._import("connections", rows, "--overwrite")
        return sorted(connections)

    def _import(self, kind: str, content: Mapping[str, Any], *options: str) -> None:
        # The file may hold credentials: private to this user, and gone after the import.
        self.home.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f"riskbridge-{kind}-", suffix=".json", dir=self.home)
        try:
            with os.fdopen(handle, "w") as file:
                json.dump(content, file)
            self.airflow(kind, "import", name, *options)
        finally:
            Path(name).unlink(missing_ok=True)

    def init(self, settings: Settings) -> None:
        """Prepare this home for riskbridge: metadata database, airflow.cfg, pools and Connections."""
        self.migrate()
        self.set_pools(settings.airflow)
        self.set_connections(settings)

    def dags_test(
        self,
        dag_id: str,
        logical_date: date | datetime | str | None = None,
        conf: Mapping[str, Any] | None = None,
        timeout_s: float = 1800.0,
        env: Mapping[str, str] | None = None,
    ) -> DagTestResult:
        """Run ``airflow dags test <dag_id> [<logical_date>] [-c conf]`` and collect the final task states.

        ``env`` (default: this process's environment) is what the tasks see: RISKBRIDGE_* settings included.
        """
        args = ["dags", "test", dag_id]
        if logical_date is not None:
            args.append(logical_date if isinstance(logical_date, str) else logical_date.isoformat())
        if conf is not None:
            args += ["-c", json.dumps(dict(conf))]
        started = time.monotonic()
        result = self.airflow(*args, timeout_s=timeout_s, env=env, check=False)
        seconds = time.monotonic() - started
        return DagTestResult(
            dag_id=dag_id,
            returncode=result.returncode,
            output=result.stdout + result.stderr,
            seconds=seconds,
            task_states=self.latest_task_states(dag_id, env=env),
        )

    def latest_run_id(self, dag_id: str, env: Mapping[str, str] | None = None) -> str | None:
        """Return the run id of the DAG's most recent run (by run_after), or None when it has none."""
        runs = _json_output(self.airflow("dags", "list-runs", dag_id, "-o", "json", env=env).stdout)
        if not runs:
            return None
        return str(max(runs, key=lambda run: str(run.get("run_after") or run.get("logical_date") or ""))["run_id"])

    def latest_task_states(self, dag_id: str, env: Mapping[str, str] | None = None) -> dict[str, list[str]]:
        """Return task id -> states (one per map index) of the DAG's most recent run; {} when it has none."""
        run_id = self.latest_run_id(dag_id, env=env)
        if run_id is None:
            return {}
        listed = self.airflow("tasks", "states-for-dag-run", dag_id, run_id, "-o", "json", env=env)
        states: dict[str, list[str]] = {}
        for row in _json_output(listed.stdout):
            states.setdefault(row["task_id"], []).append(str(row["state"]))
        return states


def _json_output(stdout: str) -> Any:
    """Return the JSON answer of an ``-o json`` command; Airflow may print log and warning lines before it."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(("[", "{")):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise AirflowCommandError(f"expected JSON from airflow, got: {stdout[-500:]!r}")


def _set_option(text: str, section: str, key: str, value: str) -> str:
    """Set ``key = value`` in ``[section]`` of an ini text, keeping every other line and comment as it was."""
    header = re.search(rf"^\[{re.escape(section)}\][ \t]*$", text, flags=re.MULTILINE)
    if header is None:
        return f"{text.rstrip()}\n\n[{section}]\n{key} = {value}\n".lstrip()
    next_header = re.search(r"^\[", text[header.end() :], flags=re.MULTILINE)
    body_end = header.end() + next_header.start() if next_header else len(text)
    body = text[header.end() : body_end]
    line = re.compile(rf"^{re.escape(key)}[ \t]*=.*$", flags=re.MULTILINE)
    replaced, count = line.subn(lambda _: f"{key} = {value}", body, count=1)
    body = replaced if count else f"\n{key} = {value}{body}"
    return text[: header.end()] + body + text[body_end:]
