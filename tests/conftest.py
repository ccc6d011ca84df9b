"""Shared pytest fixtures: the sandbox servers, brought up once per test session for integration tests.

Unit tests (no marker) need no server; integration tests are marked ``integration`` and use ``sandbox``.
A sandbox that was already running before the session (a developer's) is reused and left running.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import psycopg2.extensions
import pytest
from pydantic import SecretStr

from riskbridge.dev.pg import admin
from riskbridge.dev.sandbox import Sandbox
from riskbridge.settings import DatabaseSettings, Settings, load_settings


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Settings]:
    """Start Orthanc, HAPI FHIR and PostgreSQL once per session; yield the settings that reach them."""
    settings = load_settings()
    box = Sandbox(settings)
    already_running = {part.name for part in box.parts if part.running_pid() is not None}
    box.up()
    yield settings
    for part in box.parts:
        if part.name not in already_running:
            part.stop()


@pytest.fixture
def scratch_database(sandbox: Settings) -> Iterator[Callable[[str], tuple[DatabaseSettings, str]]]:
    """Make empty databases in the sandbox's PostgreSQL cluster: ``make(prefix) -> (settings that reach it, name)``.

    Each is dropped when the test ends.
    """
    names: list[str] = []

    def make(prefix: str) -> tuple[DatabaseSettings, str]:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        admin(sandbox.database.dsn.get_secret_value(), f'CREATE DATABASE "{name}"')
        names.append(name)
        dsn = psycopg2.extensions.make_dsn(sandbox.database.dsn.get_secret_value(), dbname=name)
        return DatabaseSettings(dsn=SecretStr(dsn)), name

    yield make
    for name in names:
        admin(sandbox.database.dsn.get_secret_value(), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
