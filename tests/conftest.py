"""Shared pytest fixtures: the sandbox servers, brought up once per test session for integration tests.

Unit tests (no marker) need no server; integration tests are marked ``integration`` and use ``sandbox``.
A sandbox that was already running before the session (a developer's) is reused and left running.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from riskbridge.sandbox import Sandbox
from riskbridge.settings import Settings, load_settings


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
