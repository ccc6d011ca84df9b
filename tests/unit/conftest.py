"""Unit-test isolation: no RISKBRIDGE_* variable from the calling shell (CI sets some) reaches a unit test."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _no_riskbridge_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests build their settings explicitly; the environment overrides config, so clear it."""
    for name in list(os.environ):
        if name.startswith("RISKBRIDGE_"):
            monkeypatch.delenv(name)
