"""Processes for tests/integration/test_celery_run.py: a real Redis and real Airflow components started as
subprocesses, each in a session of its own with its output in a log file, and stopped (or SIGKILLed with every
process below them) by the test.

``worker_name`` is the ``[core] hostname_callable`` of that test: every Airflow process there runs on this one
machine, so each gets the name in ``RISKBRIDGE_TEST_HOSTNAME`` and a task instance's ``hostname`` says which worker
ran it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil


def worker_name() -> str:
    """The host name Airflow records for this process: ``RISKBRIDGE_TEST_HOSTNAME``, else the machine's."""
    return os.environ.get("RISKBRIDGE_TEST_HOSTNAME") or socket.getfqdn()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, interval_s: float = 0.5) -> float:
    """Poll ``check`` until it is true; return the seconds it took, fail after ``timeout_s``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(interval_s)
    return time.monotonic() - started


@dataclass
class Processes:
    """Named subprocesses, each the leader of its own session (so a kill reaches its children), logging to files."""

    log_dir: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                list(argv), env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.running[name] = process
        return process

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.is_file() else ""

    def check_alive(self) -> None:
        """Fail with the end of its log when a process has exited."""
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
