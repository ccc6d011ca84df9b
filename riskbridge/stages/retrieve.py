"""The retrieve stage: each chosen series retrieved into staging, verified complete, and the study's index time.

The retrieval itself is :mod:`riskbridge.connectors.retrieval` (C-MOVE, C-GET or DICOMweb, several series at once,
completeness by SOP Instance UID). The stage runs over chunks of chosen series: each complete series is recorded in
``retrievals`` with the index time read from one staged header (acquisition time with its offset); a series that
fails, arrives short or would not fit on the staging filesystem (``staging_disk_full``, checked before any transfer)
quarantines its study with the reason, and the next call tries it again. A chunk claims its
series in the ledger while it retrieves them, so two overlapping runs never retrieve the same series at once (the
second waits, then finds the series staged). Also here:
:func:`select_and_retrieve`, the select-then-retrieve path of ``riskbridge imaging retrieve``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from riskbridge.connectors import staging
from riskbridge.connectors.retrieval import RetrievalFailure, retrieve_all
from riskbridge.connectors.sampling import HeaderSampler
from riskbridge.harmonize.series import RuleSet, SelectionResult
from riskbridge.harmonize.windows import IndexTimeError, index_time
from riskbridge.ledger import Ledger, record_quarantine
from riskbridge.records import RetrievedSeries
from riskbridge.settings import PacsSettings
from riskbridge.stages.base import Cursor, Progress, StageContext
from riskbridge.stages.select import select_study

LOG = logging.getLogger(__name__)

NAME = "retrieve"


# --- select, then retrieve: ``riskbridge imaging retrieve`` -----------------------------------------------------------


@dataclass(frozen=True)
class StudyImaging:
    """One study's imaging outcome: the selection and, when a series was chosen, its retrieval."""

    selection: SelectionResult
    retrieval: RetrievedSeries | RetrievalFailure | None  # None: skipped by selection

    @property
    def ready(self) -> bool:
        """True when the chosen series is staged complete."""
        return isinstance(self.retrieval, RetrievedSeries) and self.retrieval.complete


def select_and_retrieve(
    pacs: PacsSettings,
    staging_dir: Path,
    study_uids: Sequence[str],
    rule_set: RuleSet,
    transport: str | None = None,
    progress: Progress | None = None,
) -> list[StudyImaging]:
    """Select a series in each study (:func:`riskbridge.stages.select.select_study`, sampling headers as ``pacs``
    allows), then retrieve every chosen series (``pacs.workers`` at once); the SERIES-level instance counts set what
    each retrieval must deliver."""
    selections: list[SelectionResult] = []
    counts: dict[str, int] = {}
    with HeaderSampler(pacs, staging_dir, pacs.header_sampling, pacs.header_sample_limit, transport) as sampler:
        for study_uid in study_uids:
            study = select_study(pacs, study_uid, rule_set, sampler)
            selections.append(study.selection)
            counts.update(study.instance_counts)
    chosen = [(s.study_uid, s.chosen.series_uid) for s in selections if s.chosen is not None]
    retrieved = retrieve_all(pacs, staging_dir, chosen, transport, progress, counts) if chosen else []
    by_series = {(r.study_uid, r.series_uid): r for r in retrieved}
    return [
        StudyImaging(s, by_series[(s.study_uid, s.chosen.series_uid)] if s.chosen is not None else None)
        for s in selections
    ]


# --- the stage --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalTask:
    """A chosen series still to retrieve, with the instance count its selection saw."""

    study_uid: str
    series_uid: str
    expected: int | None


def pending(ledger: Ledger, run_id: int) -> list[RetrievalTask]:
    """Chosen series of the run not yet staged complete (failed ones are tried again), by study."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """SELECT s.study_uid, s.chosen_series_uid, s.expected_instances FROM selections s
               LEFT JOIN retrievals r USING (run_id, study_uid)
               WHERE s.run_id = %s AND s.chosen_series_uid IS NOT NULL AND (r.complete IS NOT TRUE)
               ORDER BY s.study_uid""",
            (run_id,),
        )
        return [
            RetrievalTask(r["study_uid"], r["chosen_series_uid"], r["expected_instances"]) for r in cursor.fetchall()
        ]


def record(ledger: Ledger, run_id: int, retrieved: RetrievedSeries, moment: datetime, moment_source: str) -> None:
    """Record a complete retrieval and the study's index time; lifts an earlier retrieval quarantine."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """INSERT INTO retrievals (run_id, study_uid, series_uid, complete, path, expected, received,
                   transport, seconds, bytes, attempts, missing, index_time, index_time_source)
               VALUES (%s, %s, %s, TRUE, %s, %s, %s, %s, %s, %s, 1, 0, %s, %s)
               ON CONFLICT (run_id, study_uid) DO UPDATE SET complete = TRUE, path = EXCLUDED.path,
                   expected = EXCLUDED.expected, received = EXCLUDED.received, transport = EXCLUDED.transport,
                   seconds = EXCLUDED.seconds, bytes = EXCLUDED.bytes, attempts = retrievals.attempts + 1,
                   missing = 0, failure_code = NULL, failure_detail = NULL, index_time = EXCLUDED.index_time,
                   index_time_source = EXCLUDED.index_time_source, updated = now()
               WHERE NOT retrievals.complete""",
            (
                run_id,
                retrieved.study_uid,
                retrieved.series_uid,
                str(retrieved.path),
                retrieved.expected,
                retrieved.received,
                retrieved.transport,
                retrieved.seconds,
                retrieved.bytes,
                moment,
                moment_source,
            ),
        )
        cursor.execute(
            "DELETE FROM quarantine WHERE run_id = %s AND study_uid = %s AND stage = %s",
            (run_id, retrieved.study_uid, NAME),
        )


def record_failure(
    ledger: Ledger, run_id: int, study_uid: str, series_uid: str, code: str, detail: str, missing: int = 0
) -> None:
    """Record a failed retrieval (tried again by a rerun) and quarantine the study with ``code``."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """INSERT INTO retrievals (run_id, study_uid, series_uid, complete, attempts, missing, failure_code,
                   failure_detail) VALUES (%s, %s, %s, FALSE, 1, %s, %s, %s)
               ON CONFLICT (run_id, study_uid) DO UPDATE SET attempts = retrievals.attempts + 1,
                   missing = EXCLUDED.missing, failure_code = EXCLUDED.failure_code,
                   failure_detail = EXCLUDED.failure_detail, updated = now()
               WHERE NOT retrievals.complete""",
            (run_id, study_uid, series_uid, missing, code, detail),
        )
        record_quarantine(cursor, run_id, study_uid, NAME, code, detail)


def staged_index_time(retrieved: RetrievedSeries, zone: str) -> tuple[datetime, str]:
    """The index time from the header of one staged instance (acquisition time with its offset) and its source."""
    found = index_time(staging.first_header(retrieved.path), zone)
    return found.moment, f"{found.source} ({found.offset_source})"


def pending_items(context: StageContext, run_id: int) -> list[str]:
    """SeriesInstanceUIDs still to retrieve (never staged complete): the items the stage is chunked over."""
    return [task.series_uid for task in pending(context.ledger, run_id)]


def work(context: StageContext, run_id: int, items: Sequence[str] | None, progress: Progress | None) -> Counter[str]:
    """Retrieve these chosen series verified complete; a failure quarantines its study (a rerun tries again)."""
    counts: Counter[str] = Counter()
    ledger = context.ledger
    wanted = set(items) if items is not None else None
    tasks = [task for task in pending(ledger, run_id) if wanted is None or task.series_uid in wanted]
    if not tasks:
        return counts
    expected = {task.series_uid: task.expected for task in tasks if task.expected}
    pairs = [(task.study_uid, task.series_uid) for task in tasks]
    settings = context.settings
    with ledger.claim_series([task.series_uid for task in tasks]):  # an overlapping run's retrieve task waits
        outcomes = retrieve_all(settings.pacs, settings.staging_dir, pairs, None, progress, expected)
    for outcome in outcomes:
        if isinstance(outcome, RetrievalFailure):
            record_failure(ledger, run_id, outcome.study_uid, outcome.series_uid, outcome.code, outcome.reason)
            counts["failed"] += 1
            continue
        if not outcome.complete:
            detail = f"{outcome.received} of {outcome.expected} instances staged"
            record_failure(
                ledger, run_id, outcome.study_uid, outcome.series_uid, "incomplete", detail, len(outcome.missing)
            )
            counts["failed"] += 1
            continue
        try:
            moment, source = staged_index_time(outcome, context.zone)
        except (IndexTimeError, staging.StagingError, OSError, ValueError) as exc:
            record_failure(ledger, run_id, outcome.study_uid, outcome.series_uid, "no_index_time", str(exc))
            counts["quarantined"] += 1
            continue
        record(ledger, run_id, outcome, moment, source)
        counts["done"] += 1
    return counts


def counts(cursor: Cursor, run_id: int) -> Counter[str]:
    """Series staged complete (done) and retrievals that failed (failed)."""
    cursor.execute("SELECT complete, count(*) AS n FROM retrievals WHERE run_id = %s GROUP BY 1", (run_id,))
    found: Counter[str] = Counter()
    for row in cursor.fetchall():
        found["done" if row["complete"] else "failed"] += int(row["n"])
    return found
