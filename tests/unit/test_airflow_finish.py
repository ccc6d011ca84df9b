"""The nightly DAG's last task: it finishes the ledger run, or fails the DAG run when the quarantine alert fires.

The pipeline here is a stand-in that records calls but finishes with the real :meth:`Pipeline.finish` (the task's
wiring and the one finishing path the CLI shares are what is tested; the alert's arithmetic is tested in
test_report.py and, against a real ledger and servers, in tests/integration/test_pipeline.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from airflow.sdk.exceptions import AirflowFailException

from riskbridge.airflow import dagkit
from riskbridge.pipeline import Pipeline
from riskbridge.settings import Settings
from riskbridge.stages.report import RunSummary


class _Pipeline:
    # Staging retention needs the ledger; it is tested in tests/integration/test_pipeline.py.
    settings = Settings(retention={"staging_after_run": "keep"})

    def __init__(self, alert: str | None) -> None:
        self.alert = alert
        self.finished: list[tuple[int, str]] = []

    def quarantine_alert(self, run_id: int, summary: RunSummary | None = None) -> str | None:
        return self.alert

    finish = Pipeline.finish

    def finish_run(self, run_id: int, status: str = "success") -> None:
        self.finished.append((run_id, status))


def _use(monkeypatch: pytest.MonkeyPatch, pipeline: _Pipeline) -> None:
    @contextmanager
    def open_pipeline() -> Iterator[_Pipeline]:
        yield pipeline

    monkeypatch.setattr(dagkit, "open_pipeline", open_pipeline)


def test_finish_marks_the_run_successful_when_no_alert_fires(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = _Pipeline(alert=None)
    _use(monkeypatch, pipeline)
    dagkit.finish_ledger_run(7)
    assert pipeline.finished == [(7, "success")]


def test_finish_marks_the_run_failed_and_fails_the_task_without_retries_when_the_alert_fires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = _Pipeline(alert="run 7 quarantined 30 of the 30 studies it discovered (100%)")
    _use(monkeypatch, pipeline)
    with pytest.raises(AirflowFailException, match="quarantined 30 of the 30"):
        dagkit.finish_ledger_run(7)
    assert pipeline.finished == [(7, "failed")]  # the failure callback marks it failed again: idempotent
