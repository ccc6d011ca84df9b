"""riskbridge's services as child processes, for integration tests and benchmarks on one machine.

:class:`Processes` starts named subprocesses (Airflow's api-server, scheduler, dag-processor, Celery workers, Redis),
each the leader of a session of its own with its output in a log file, and stops them (or SIGKILLs a process with
every process below it, a machine lost). :func:`free_port` and :func:`wait_for` are what starting them needs.

:func:`settings_environment` turns a :class:`~riskbridge.settings.Settings` into the ``RISKBRIDGE_*`` variables that
make a child process (an Airflow task, ``riskbridge run``) load the same settings: how a test or benchmark hands the
site it built in Python to the processes it starts.

Nothing here is for a site's production deployment: a site runs these services under its own service manager.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# psutil comes with Airflow (its supervisors use it); it finds a process's children, which a kill must reach.
import psutil
from pydantic import BaseModel, SecretStr

from riskbridge.settings import ENV_PREFIX, Settings


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, interval_s: float = 0.5) -> float:
    """Poll ``check`` until it is true; return the seconds it took, raise :class:`TimeoutError` after ``timeout_s``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(interval_s)
    return time.monotonic() - started


@dataclass
class Processes:
    """Named subprocesses, each the leader of its own session (so a kill reaches its children), logging to files
    ``<log_dir>/<name>.log``."""

    log_dir: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` under ``name`` with exactly the environment ``env``; return its Popen."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                list(argv), env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.running[name] = process
        return process

    def log(self, name: str, tail: int = 3000) -> str:
        """The last ``tail`` characters of the named process's log ("" before it wrote any)."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.is_file() else ""

    def check_alive(self) -> None:
        """Raise :class:`RuntimeError` with the end of its log when a process has exited."""
        for name, process in self.running.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log(name)}")

    def kill_tree(self, name: str) -> list[int]:
        """SIGKILL a process and every process below it at once (a machine lost); return the pids killed."""
        process = self.running.pop(name)
        try:
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for member in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        return [member.pid for member in tree]

    def stop_all(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every process at once, give them ``timeout_s`` together, then SIGKILL what is left of each tree."""
        trees: list[psutil.Process] = []
        for process in self.running.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                trees += [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout_s
        for process in self.running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for member in trees:  # what outlived the SIGTERM: celery pool children, task supervisors
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        for process in self.running.values():
            process.wait(timeout=10)
        self.running.clear()


class UnrepresentableSettingError(ValueError):
    """A setting's value cannot be given as an environment variable (None where the default is not None)."""


def settings_environment(settings: Settings) -> dict[str, str]:
    """The ``RISKBRIDGE_*`` variables that make :func:`riskbridge.settings.load_settings` in a child process return
    ``settings``: one per setting whose value differs from its default, secrets in clear (the result is for a child's
    environment only: never log it).

    Scalars are written as text, lists, mappings and sections that default to None (``pacs.tls``) as JSON, the way
    pydantic-settings reads them. Relative paths stay relative: the child resolves them against its own working
    directory. The child must not read a config file that sets other keys (``RISKBRIDGE_CONFIG``, ./riskbridge.toml),
    nor inherit other ``RISKBRIDGE_*`` variables: the defaults these variables leave alone would lose to them.
    Raises :class:`UnrepresentableSettingError` for None where the default is not None (the environment has no None).
    """
    env: dict[str, str] = {}
    _section_environment(settings, ENV_PREFIX, env)
    return env


def _section_environment(section: BaseModel, prefix: str, env: dict[str, str]) -> None:
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        default = info.get_default(call_default_factory=True)
        key = f"{prefix}{name.upper()}"
        if isinstance(value, BaseModel) and type(default) is type(value):
            # A section with its own defaults: only the keys inside it that differ, as RISKBRIDGE_<SECTION>__<KEY>.
            _section_environment(value, f"{key}__", env)
        elif value != default:
            if value is None:
                raise UnrepresentableSettingError(f"{key}: None (the default is {default!r}) has no environment form")
            env[key] = _env_text(value)


def _env_text(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, str | int | float | Path):
        return str(value)
    return json.dumps(_plain(value))


def _plain(value: Any) -> Any:
    """``value`` as JSON types, secrets revealed (pydantic's own JSON dump masks them)."""
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(item) for item in value]
    return value
