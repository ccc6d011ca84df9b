"""Celery-specific help for tests/integration/test_celery_run.py (its processes, Redis, Airflow's components and the
Celery workers, are started with :class:`riskbridge.dev.processes.Processes`).

``worker_name`` is the ``[core] hostname_callable`` of that test: every Airflow process there runs on this one
machine, so each gets the name in ``RISKBRIDGE_TEST_HOSTNAME`` and a task instance's ``hostname`` says which worker
ran it.
"""

from __future__ import annotations

import os
import socket


def worker_name() -> str:
    """The host name Airflow records for this process: ``RISKBRIDGE_TEST_HOSTNAME``, else the machine's."""
    return os.environ.get("RISKBRIDGE_TEST_HOSTNAME") or socket.getfqdn()
