"""The pipeline: a run in the ledger, and the stages of :data:`riskbridge.stages.STAGES` run over it in order.

What the Airflow DAGs and ``riskbridge run`` both call. A run is a row in the ledger (:meth:`Pipeline.start_run`,
keyed by ``run_key``: the same key resumes the same run). :meth:`Pipeline.run_stage` runs one stage's work for the
run (a chunk of it, for a chunked stage), times it and records the timing; each stage reads from the ledger what is
still to do and writes each decision back before it moves on, so a stage interrupted anywhere resumes with only the
rest, and a stage run again does nothing. Studies leave the run through the quarantine with a stable reason code.
:meth:`Pipeline.finish` writes nothing more: it checks the quarantine alert and marks the run finished.

A nightly run's window comes from the coverage (:meth:`Pipeline.start_nightly_run`, :mod:`riskbridge.coverage`):
from the watermark, less the lookback, to its trigger time; a run that finishes successfully adds its window to the
coverage (:meth:`riskbridge.ledger.Ledger.finish_run`).

Arguments and results are ids and counts (:class:`StageResult`), never records, so Airflow's XCom carries only
small JSON. No torch import here: the score stage loads the model when it has something to score.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path

from riskbridge.coverage import Interval, NightlyWindow, merged, plan_nightly, uncovered
from riskbridge.errors import RiskbridgeError
from riskbridge.harmonize.windows import site_zone
from riskbridge.ledger import CoveredRun, Ledger, LedgerError
from riskbridge.records import configure_pseudonyms
from riskbridge.settings import Settings
from riskbridge.stages import STAGES, Stage, stage
from riskbridge.stages.base import PipelineError, Progress, StageContext, StageResult, chunk_key, chunked
from riskbridge.stages.report import RunSummary, quarantine_alert, run_summary, write_report
from riskbridge.staging_retention import remove_scored

__all__ = ["Pipeline", "PipelineError", "StageResult", "window_of_days"]

LOG = logging.getLogger(__name__)


def window_of_days(first: date, last: date, zone: str) -> tuple[datetime, datetime]:
    """The window from ``first`` 00:00 to the end of ``last`` (exclusive: ``last`` + 1 day 00:00) in the site zone."""
    if last < first:
        raise PipelineError(f"the window ends ({last}) before it starts ({first})")
    tz = site_zone(zone)
    start = datetime.combine(first, datetime.min.time()).replace(tzinfo=tz)
    end = datetime.combine(last + timedelta(days=1), datetime.min.time()).replace(tzinfo=tz)
    return start, end


class Pipeline:
    """The stages of a run over one ledger connection; FHIR client, rules, spec and model are opened when needed."""

    def __init__(self, settings: Settings, ledger: Ledger | None = None) -> None:
        configure_pseudonyms(settings)  # every run's logs, its worker processes' included, tag UIDs with one key
        self.context = StageContext(settings, ledger)

    @classmethod
    def from_settings(cls, settings: Settings) -> Pipeline:
        """A pipeline for these settings; the ledger and the servers are reached on first use."""
        return cls(settings)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the ledger connection and the FHIR client."""
        self.context.close()

    @property
    def settings(self) -> Settings:
        """The settings the pipeline was built with."""
        return self.context.settings

    @property
    def ledger(self) -> Ledger:
        """The ledger, opened and checked against the shipped migrations on first use."""
        return self.context.ledger

    # -- runs ----------------------------------------------------------------------------------------------------------

    def start_run(
        self,
        kind: str,
        run_key: str,
        window: tuple[datetime, datetime] | None = None,
        accessions: Sequence[str] = (),
        patient_ids: Sequence[str] = (),
        rescore: bool = False,
    ) -> int:
        """Create the run (or return the run of ``run_key`` to resume it). A run needs a window or a list;
        ``rescore`` does again what an earlier run already scored and wrote back with the same model."""
        if window is None and not accessions and not patient_ids:
            raise PipelineError("a run needs a window, accession numbers or patient ids")
        return self.ledger.start_run(kind, run_key, window, accessions, patient_ids, rescore=rescore)

    def plan_nightly(self, trigger: datetime, first_start: datetime) -> NightlyWindow:
        """The window of a nightly run triggered at ``trigger`` (:func:`riskbridge.coverage.plan_nightly` over the
        ledger's coverage and ``[airflow]`` nightly_lookback_hours and nightly_max_catchup_hours); ``first_start``
        begins the job's first window. Raises :class:`riskbridge.coverage.CoverageGapError` past the catch-up."""
        config = self.settings.airflow
        covered = [run.interval for run in self.ledger.coverage()]
        return plan_nightly(
            trigger,
            covered,
            self.ledger.last_nightly_end(trigger),
            first_start,
            timedelta(hours=config.nightly_lookback_hours),
            timedelta(hours=config.nightly_max_catchup_hours),
            self.context.zone,
        )

    def start_nightly_run(self, run_key: str, trigger: datetime, first_start: datetime, rescore: bool = False) -> int:
        """Create the nightly run triggered at ``trigger``, its window planned from the coverage
        (:meth:`plan_nightly`), or return the run of ``run_key`` as it was planned (a retried task resumes it)."""
        try:
            existing = self.ledger.run_by_key(run_key)
        except LedgerError:
            existing = None
        if existing is not None:
            if existing.kind != "nightly" or existing.rescore != rescore:
                raise PipelineError(f"run key {run_key!r} already names run {existing.run_id} of another kind")
            return existing.run_id
        plan = self.plan_nightly(trigger, first_start)
        window = (plan.window.start, plan.window.end)
        return self.ledger.start_run("nightly", run_key, window, watermark=plan.watermark, rescore=rescore)

    def finish_run(self, run_id: int, status: str = "success") -> None:
        """Mark the run finished (success or failed)."""
        self.ledger.finish_run(run_id, status)

    def summary(self, run_id: int) -> RunSummary:
        """What the ledger knows about the run, as its report shows it (with the qualitative risk thresholds)."""
        writeback = self.settings.writeback
        return run_summary(self.ledger, run_id, (writeback.low_below, writeback.high_from))

    def coverage(self, span: Interval) -> tuple[list[tuple[Interval, list[CoveredRun]]], list[Interval]]:
        """The covered parts of ``span`` (each with the runs that covered it) and the uncovered parts, each in time
        order (``riskbridge coverage``)."""
        runs = self.ledger.coverage(span)
        covered = []
        for part in merged(run.interval for run in runs):
            inside = Interval(max(part.start, span.start), min(part.end, span.end))
            by = [run for run in runs if run.interval.start < part.end and run.interval.end > part.start]
            covered.append((inside, by))
        return covered, uncovered([run.interval for run in runs], span)

    def quarantine_alert(self, run_id: int, summary: RunSummary | None = None) -> str | None:
        """The alert message when the run quarantined more than ``[run] quarantine_alert_fraction`` of its studies
        (see :func:`riskbridge.stages.report.quarantine_alert`); None when it did not. Pass the run's ``summary``
        when it is at hand, so the ledger is not read for it again."""
        run = self.settings.run
        summary = summary if summary is not None else self.summary(run_id)
        return quarantine_alert(summary, run.quarantine_alert_fraction, run.quarantine_alert_min_studies)

    def finish(self, run_id: int, summary: RunSummary | None = None) -> str | None:
        """Finish the run: failed with the quarantine alert's message when it raises one (returned), else success.
        Either way the series it scored leave staging when ``[retention] staging_after_run`` says so."""
        alert = self.quarantine_alert(run_id, summary)
        self.finish_run(run_id, "failed" if alert else "success")
        if self.settings.retention.staging_after_run == "remove-scored":
            remove_scored(self.ledger, run_id, self.settings.staging_dir)
        return alert

    def report(self, run_id: int) -> Path:
        """Write the run's HTML report into ``<run.report_dir>/<run_id>/``; return the index.html path."""
        return write_report(self.summary(run_id), self.settings.run.report_dir / str(run_id))

    # -- stages --------------------------------------------------------------------------------------------------------

    def chunks(self, name: str, run_id: int, size: int | None = None) -> list[list[str]]:
        """The items a chunked stage still has to do for the run, in chunks of ``size`` (default: its ``[run]``
        chunk setting); each chunk is one :meth:`run_stage` call (one mapped Airflow task)."""
        found = stage(name)
        if not found.chunked:
            raise ValueError(f"stage {name} is not chunked")
        size = size if size is not None else found.chunk_size(self.settings.run)
        return chunked(found.module.pending_items(self.context, run_id), size)

    def run_stage(
        self, name: str, run_id: int, items: Sequence[str] | None = None, progress: Progress | None = None
    ) -> StageResult:
        """Run one stage's work for the run (for a chunked stage, only ``items``; None: everything pending),
        record its wall time and counts, and return them."""
        found = stage(name)
        if items is not None and not found.chunked:
            raise ValueError(f"stage {name} is not chunked: it takes no items")
        if self.ledger.resume_run(run_id):  # a failed run whose stages run again is running, not failed
            LOG.info("run %d resumed at %s", run_id, name)
        started = time.perf_counter()
        counts = found.module.work(self.context, run_id, items, progress)
        seconds = time.perf_counter() - started
        result = StageResult(
            name, counts["done"], counts["skipped"], counts["quarantined"], counts["failed"], round(seconds, 3)
        )
        self.ledger.record_timing(run_id, name, chunk_key(items), seconds, counts)
        LOG.info(
            "run %d %s: %d done, %d skipped, %d quarantined, %d failed in %.1f s",
            run_id, name, result.done, result.skipped, result.quarantined, result.failed, seconds,
        )  # fmt: skip
        return result

    def run_stages(
        self, run_id: int, progress: Callable[[str, int, int], None] | None = None, until: str | None = None
    ) -> list[StageResult]:
        """Run every stage in order for the run (resuming whatever is left), chunked stages in their chunks.

        ``progress(stage, done, total)`` reports each stage; ``until`` stops after that stage (e.g. "retrieve").
        Chunked stages give one result per chunk. The run is not finished here (:meth:`finish`).
        """
        if until is not None:
            stage(until)  # an unknown name fails before any work
        results: list[StageResult] = []
        for index, current in enumerate(STAGES):
            following = STAGES[index + 1] if index + 1 < len(STAGES) and until != current.name else None
            warming = self._warm_up(following) if following is not None else None
            try:
                results += self._run_whole_stage(current, run_id, progress)
            finally:
                if warming is not None:
                    warming.join()  # the next stage never meets a half-built pipeline of its own
            if until == current.name:
                break
        return results

    def _warm_up(self, following: Stage) -> threading.Thread | None:
        """Start ``following``'s ``warm_up`` (see :mod:`riskbridge.stages`) on a thread while the stage before it
        runs; a failure there is logged and left to the stage's own work to meet again and report."""
        warm_up = getattr(following.module, "warm_up", None)
        if not callable(warm_up):
            return None

        def warm() -> None:
            started = time.perf_counter()
            try:
                warm_up(self.context)
            except (RiskbridgeError, ImportError, OSError, ValueError, RuntimeError):
                LOG.warning("warming up the %s stage failed; the stage loads what it needs itself", following.name,
                            exc_info=True)  # fmt: skip
                return
            LOG.info("%s stage warmed up in %.1f s", following.name, time.perf_counter() - started)

        thread = threading.Thread(target=warm, name=f"warm-{following.name}", daemon=True)
        thread.start()
        return thread

    def _run_whole_stage(
        self, current: Stage, run_id: int, progress: Callable[[str, int, int], None] | None
    ) -> list[StageResult]:
        name = current.name
        if not current.chunked:
            report = None if progress is None else (lambda done, total: progress(name, done, total))
            return [self.run_stage(name, run_id, progress=report)]
        chunks = self.chunks(name, run_id)
        total, handled = sum(len(chunk) for chunk in chunks), 0
        if progress is not None:
            progress(name, 0, total)
        results = []
        for items in chunks:
            base = handled
            report = None if progress is None else (lambda done, _count, base=base: progress(name, base + done, total))
            results.append(self.run_stage(name, run_id, items, progress=report))
            handled += len(items)
        return results
