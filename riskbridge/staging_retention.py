"""How long retrieved images stay in the staging area: a run's scored series are removed when it finishes, and
everything else once it is older than ``[retention] staging_days`` (``riskbridge staging purge``).

Staged instances are whole DICOM files, patient names and birth dates included, so they are kept only while a run
may still need them. When a run finishes (:meth:`riskbridge.pipeline.Pipeline.finish`) the series it scored are
removed if ``[retention] staging_after_run`` is ``remove-scored``: a score is never computed again from them (a
rescore retrieves again). Quarantined studies keep their series for investigation until the age limit. A series is
old when its newest file is; one that the ledger records as retrieved for a run still ``running`` is never removed.
A series removed while its run has not scored its study is marked not retrieved in the ledger (``staging_purged``),
so a resumed run retrieves it again instead of failing on missing files.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from riskbridge.connectors import staging
from riskbridge.ledger import Ledger

LOG = logging.getLogger(__name__)

PURGED = "staging_purged"  # the failure code of a retrieval whose files the purge removed before its study was scored


@dataclass(frozen=True)
class StagingPurge:
    """What a purge removed (or, dry, would remove): series directories and their bytes, and what it kept."""

    series: int
    bytes: int
    kept_running: int = 0
    dry_run: bool = False

    def line(self) -> str:
        """One line for the CLI and logs (counts only: no UID, no path under a study)."""
        verb = "would remove" if self.dry_run else "removed"
        kept = f"; kept {self.kept_running} series of running runs" if self.kept_running else ""
        return f"{verb} {self.series} staged series, {self.bytes / 1e6:.1f} MB{kept}"


def _series_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(series for study in root.iterdir() if study.is_dir() for series in study.iterdir() if series.is_dir())


def _newest_mtime(directory: Path) -> float:
    return max((entry.stat().st_mtime for entry in directory.iterdir()), default=directory.stat().st_mtime)


def _size(directory: Path) -> int:
    return sum(entry.stat().st_size for entry in directory.iterdir() if entry.is_file())


def _remove(directory: Path) -> int:
    size = _size(directory)
    shutil.rmtree(directory)
    with contextlib.suppress(OSError):  # the study directory, when this was its last series
        directory.parent.rmdir()
    return size


def _running_series(ledger: Ledger) -> set[str]:
    """SeriesInstanceUIDs a run still running has retrieved or is retrieving."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """SELECT DISTINCT r.series_uid FROM retrievals r JOIN runs USING (run_id) WHERE runs.status = 'running'"""
        )
        return {row["series_uid"] for row in cursor.fetchall()}


def _mark_purged(ledger: Ledger, series_uids: list[str]) -> int:
    """Mark the retrievals of these series not retrieved where their run has not scored the study; return how many."""
    if not series_uids:
        return 0
    with ledger.transaction() as cursor:
        cursor.execute(
            """UPDATE retrievals r SET complete = FALSE, failure_code = %s,
                   failure_detail = 'staged files removed by the staging retention before the study was scored',
                   updated = now()
               WHERE r.series_uid = ANY(%s) AND r.complete
                 AND NOT EXISTS (SELECT 1 FROM scores s WHERE s.run_id = r.run_id AND s.study_uid = r.study_uid)""",
            (PURGED, series_uids),
        )
        return cursor.rowcount


def purge_old(ledger: Ledger, staging_root: Path, older_than_days: float, dry_run: bool = False) -> StagingPurge:
    """Remove the staged series whose newest file is older than ``older_than_days`` days, except those of runs
    still running; a removed series its run has not scored yet is marked for retrieval again."""
    cutoff = time.time() - older_than_days * 86400
    running = _running_series(ledger)
    removed, size, kept = [], 0, 0
    for directory in _series_dirs(staging_root):
        if _newest_mtime(directory) > cutoff:
            continue
        if directory.name in running:
            kept += 1
            continue
        size += _size(directory) if dry_run else _remove(directory)
        removed.append(directory.name)
    if not dry_run:
        marked = _mark_purged(ledger, removed)
        if marked:
            LOG.info("staging purge: %d unscored retrieval(s) marked for retrieval again", marked)
    return StagingPurge(len(removed), size, kept, dry_run)


def remove_scored(ledger: Ledger, run_id: int, staging_root: Path) -> StagingPurge:
    """Remove the staged series the run scored (``[retention] staging_after_run = "remove-scored"``), except one
    that another run still running has retrieved too (an overlapping run scores it from the same files)."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """SELECT r.study_uid, r.series_uid FROM retrievals r
               JOIN scores s ON s.run_id = r.run_id AND s.study_uid = r.study_uid
               WHERE r.run_id = %s AND r.complete""",
            (run_id,),
        )
        scored = [(row["study_uid"], row["series_uid"]) for row in cursor.fetchall()]
        cursor.execute(
            """SELECT DISTINCT r.series_uid FROM retrievals r JOIN runs USING (run_id)
               WHERE runs.status = 'running' AND r.run_id <> %s""",
            (run_id,),
        )
        shared = {row["series_uid"] for row in cursor.fetchall()}
    removed, size, kept = 0, 0, 0
    for study_uid, series_uid in scored:
        if series_uid in shared:
            kept += 1
            continue
        directory = staging.series_dir(staging_root, study_uid, series_uid)
        if directory.is_dir():
            size += _remove(directory)
            removed += 1
    if removed or kept:
        LOG.info("run %d: removed %d scored series from staging (%.1f MB), kept %d another run is using", run_id,
                 removed, size / 1e6, kept)  # fmt: skip
    return StagingPurge(removed, size, kept)
