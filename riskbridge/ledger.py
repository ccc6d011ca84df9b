"""The PostgreSQL ledger: every decision of every pipeline run, with its reason, and what is left to do.

The schema lives in versioned SQL files (``riskbridge/migrations/NNNN_name.sql``) that :meth:`Ledger.upgrade`
(``riskbridge db upgrade``) applies in order, each in its own transaction together with its row in
``schema_migrations``; an applied file that changed since is an error, never silently re-run.

This module keeps what every stage shares: the connection and its transactions, the schema, runs (start, resume,
finish, the model that judged them), run-level stage marks and timings, the quarantine, and the write-back outbox
(keyed by RiskAssessment key across runs). Each stage's own tables are read and written by its module in
:mod:`riskbridge.stages` through :meth:`Ledger.transaction`.

Every write is an ``INSERT ... ON CONFLICT`` on the key that makes a fact unique (run + study, run + series, the
RiskAssessment key), so a stage that runs twice writes nothing twice, and each stage's ``pending`` query answers
what it still has to do, which is what makes a run resumable. Nothing here logs a patient identifier (see the
migration's PHI note).
"""

from __future__ import annotations

import hashlib
import logging
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from riskbridge.connectors import db
from riskbridge.coverage import Interval
from riskbridge.errors import LedgerError
from riskbridge.records import WriteBack
from riskbridge.settings import DatabaseSettings

LOG = logging.getLogger(__name__)

RUN_KINDS = ("nightly", "backfill", "on_demand", "export", "survey")
RUN_STATUSES = ("running", "success", "failed")
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Serializes concurrent `db upgrade`s (two Airflow workers starting at once); any constant works.
_MIGRATION_LOCK = 0x72_62_6C_65_64_67_65_72
# The first key of the (int, int) advisory locks that claim a series for retrieval (a key space of its own).
_SERIES_LOCK_CLASS = 0x7262_7365
# ... and of those that claim a RiskAssessment key for sending.
_WRITEBACK_LOCK_CLASS = 0x7262_7762
COVERING_KINDS = ("nightly", "backfill")  # runs with a window whose success adds to the coverage


# --- migrations -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One versioned SQL file of the schema."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text: an applied migration must never change."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """The migrations shipped in ``riskbridge/migrations`` (or ``directory``), by version; versions 1, 2, ... n."""
    root: Any = directory if directory is not None else resources.files("riskbridge").joinpath("migrations")
    found: list[Migration] = []
    for entry in root.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            if entry.name.endswith(".sql"):
                raise LedgerError(f"migration file {entry.name!r} is not named NNNN_name.sql")
            continue
        found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if versions != list(range(1, len(found) + 1)):
        raise LedgerError(f"migration versions must run 1, 2, 3, ... without gaps or repeats, found {versions}")
    return found


_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version   integer PRIMARY KEY,
    name      text NOT NULL,
    checksum  text NOT NULL,
    applied   timestamptz NOT NULL DEFAULT now()
)"""


# --- rows the pipeline reads back -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """A run as the ledger holds it."""

    run_id: int
    run_key: str
    kind: str
    status: str
    window: tuple[datetime, datetime] | None
    accessions: tuple[str, ...]
    patient_ids: tuple[str, ...]
    started: datetime
    finished: datetime | None
    model: str | None
    watermark: datetime | None = None  # a nightly run: where its new coverage begins (before it: the lookback)
    rescore: bool = False  # decided work is done again (``--rescore``)
    phi_purged: datetime | None = None  # when `riskbridge db purge` cleared its identifiers: never resumed after


@dataclass(frozen=True)
class CoveredRun:
    """The interval a finished windowed run covered (a row of ``coverage``)."""

    run_id: int
    kind: str
    interval: Interval


def _window(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime] | None:
    return (start, end) if start is not None and end is not None else None


def record_quarantine(
    cursor: psycopg2.extras.RealDictCursor, run_id: int, study_uid: str, stage: str, reason: str, detail: str = ""
) -> None:
    """Take a study out of the run, inside the caller's transaction (a stage records its decision and the
    quarantine together); a study quarantined again keeps only the latest stage and reason."""
    cursor.execute(
        """INSERT INTO quarantine (run_id, study_uid, stage, reason, detail) VALUES (%s, %s, %s, %s, %s)
           ON CONFLICT (run_id, study_uid) DO UPDATE SET stage = EXCLUDED.stage, reason = EXCLUDED.reason,
               detail = EXCLUDED.detail, recorded = now()""",
        (run_id, study_uid, stage, reason, detail),
    )


def _purged_message(run_id: int, purged: datetime, prefix: str = "") -> str:
    return (
        f"{prefix}run {run_id}, whose patient identifiers were purged on {purged:%Y-%m-%d} ([retention] phi_days): "
        "it cannot be resumed; start a new run under another run key"
    )


def reason_code(reason: str) -> str:
    """The stable code of a reason with details (``missing_required:egfr`` -> ``missing_required``)."""
    return reason.split(":", 1)[0]


class Ledger:
    """One connection to the ledger database; each method is one transaction (committed when it returns)."""

    def __init__(self, connection: psycopg2.extensions.connection) -> None:
        self.connection = connection

    @classmethod
    def connect(cls, database: DatabaseSettings) -> Ledger:
        """Open the ledger the settings name; :class:`riskbridge.connectors.db.DatabaseError` when unreachable."""
        return cls(db.connect(database))

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[psycopg2.extras.RealDictCursor]:
        """A cursor in a transaction: committed when the block ends, rolled back when it raises. Stage modules
        read and write their own tables through it."""
        with self.connection, self.connection.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cursor:
            yield cursor

    # -- schema ----------------------------------------------------------------------------------------------------

    def applied_migrations(self) -> dict[int, str]:
        """Version -> checksum of every applied migration (empty for a fresh database)."""
        with self.transaction() as cursor:
            cursor.execute("SELECT to_regclass('schema_migrations') IS NOT NULL AS present")
            row = cursor.fetchone()
            if not row or not row["present"]:
                return {}
            cursor.execute("SELECT version, checksum FROM schema_migrations")
            return {int(r["version"]): str(r["checksum"]) for r in cursor.fetchall()}

    def upgrade(self, migrations: Sequence[Migration] | None = None) -> list[Migration]:
        """Apply the migrations not yet applied, in order, each in its own transaction; return those applied.

        Idempotent. Raises :class:`LedgerError` when an applied migration's file changed, or when the database has
        a migration this riskbridge does not know (a newer version wrote it).
        """
        wanted = list(migrations) if migrations is not None else load_migrations()
        known = {migration.version for migration in wanted}
        applied_now: list[Migration] = []
        # Held for the whole upgrade (a lock per migration's transaction would let two upgrades take turns): the
        # first upgrade applies every migration, the others wait and find them applied.
        with self.transaction() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            with self.transaction() as cursor:
                cursor.execute(_SCHEMA_MIGRATIONS)
            for migration in wanted:
                if self._apply(migration, known):
                    applied_now.append(migration)
        finally:
            if not self.connection.closed:
                with self.transaction() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
        return applied_now

    def _apply(self, migration: Migration, known: set[int]) -> bool:
        """Apply one migration in its own transaction unless it is applied; True when this call applied it."""
        with self.transaction() as cursor:
            cursor.execute("SELECT version, checksum FROM schema_migrations")
            applied = {int(r["version"]): str(r["checksum"]) for r in cursor.fetchall()}
            unknown = sorted(set(applied) - known)
            if unknown:
                raise LedgerError(f"the ledger has migration(s) {unknown} this riskbridge does not know (newer?)")
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise LedgerError(
                        f"migration {migration.version:04d}_{migration.name}.sql changed after it was applied; "
                        "add a new migration instead of editing an applied one"
                    )
                return False
            cursor.execute(migration.sql)
            cursor.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            return True

    def check_schema(self) -> None:
        """Raise :class:`LedgerError` unless every shipped migration is applied (``riskbridge db upgrade``)."""
        applied = self.applied_migrations()
        missing = [m for m in load_migrations() if m.version not in applied]
        if missing:
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in missing)
            raise LedgerError(f"the ledger database lacks migration(s) {names}: run 'riskbridge db upgrade'")

    # -- runs ------------------------------------------------------------------------------------------------------

    def start_run(
        self,
        kind: str,
        run_key: str,
        window: tuple[datetime, datetime] | None = None,
        accessions: Sequence[str] = (),
        patient_ids: Sequence[str] = (),
        *,
        watermark: datetime | None = None,
        rescore: bool = False,
    ) -> int:
        """Create the run, or return the existing run of ``run_key`` (a rerun resumes it) when it asks the same.

        ``watermark`` (a nightly run) is where its new coverage begins inside its window; ``rescore`` makes its
        discover stage keep studies an earlier run already scored and wrote back with the same model."""
        if kind not in RUN_KINDS:
            raise LedgerError(f"run kind must be one of {', '.join(RUN_KINDS)}, not {kind!r}")
        if not run_key:
            raise LedgerError("a run needs a non-empty run_key")
        if window is not None:
            if window[0].tzinfo is None or window[1].tzinfo is None:
                raise LedgerError("a run window needs aware datetimes (with their offset)")
            if not window[0] < window[1]:
                raise LedgerError(f"a run window must end after it starts, got {window[0]} .. {window[1]}")
        if watermark is not None and (window is None or not window[0] <= watermark <= window[1]):
            raise LedgerError("a run's watermark must lie inside its window")
        with self.transaction() as cursor:
            cursor.execute(
                """INSERT INTO runs (run_key, kind, window_start, window_end, accessions, patient_ids, watermark,
                       rescore)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (run_key) DO NOTHING""",
                (
                    run_key,
                    kind,
                    window[0] if window else None,
                    window[1] if window else None,
                    list(accessions),
                    list(patient_ids),
                    watermark,
                    rescore,
                ),
            )
        run = self.run_by_key(run_key)
        if run.phi_purged is not None:
            raise LedgerError(_purged_message(run.run_id, run.phi_purged, f"run key {run_key!r} names "))
        asked = (kind, window, tuple(accessions), tuple(patient_ids), watermark, rescore)
        if (run.kind, run.window, run.accessions, run.patient_ids, run.watermark, run.rescore) != asked:
            raise LedgerError(
                f"run key {run_key!r} already names run {run.run_id} with another kind, window, list or --rescore"
            )
        return run.run_id

    def _run_where(self, clause: str, value: Any) -> RunInfo:
        with self.transaction() as cursor:
            cursor.execute(f"SELECT * FROM runs WHERE {clause} = %s", (value,))
            row = cursor.fetchone()
        if row is None:
            raise LedgerError(f"no run with {clause} {value!r}")
        return RunInfo(
            run_id=int(row["run_id"]),
            run_key=row["run_key"],
            kind=row["kind"],
            status=row["status"],
            window=_window(row["window_start"], row["window_end"]),
            accessions=tuple(row["accessions"]),
            patient_ids=tuple(row["patient_ids"]),
            started=row["started"],
            finished=row["finished"],
            model=row["model"],
            watermark=row["watermark"],
            rescore=bool(row["rescore"]),
            phi_purged=row.get("phi_purged"),
        )

    def run(self, run_id: int) -> RunInfo:
        """The run with this id; :class:`LedgerError` when there is none."""
        return self._run_where("run_id", run_id)

    def run_by_key(self, run_key: str) -> RunInfo:
        """The run with this key; :class:`LedgerError` when there is none."""
        return self._run_where("run_key", run_key)

    def finish_run(self, run_id: int, status: str = "success") -> None:
        """Mark the run finished with ``status`` (success or failed); finishing again updates the status.

        A nightly or backfill run that finishes successfully adds its window to the coverage; one marked failed
        covers nothing (the next nightly run covers its window again)."""
        if status not in ("success", "failed"):
            raise LedgerError(f"a run finishes as 'success' or 'failed', not {status!r}")
        with self.transaction() as cursor:
            cursor.execute("UPDATE runs SET status = %s, finished = now() WHERE run_id = %s", (status, run_id))
            if cursor.rowcount != 1:
                raise LedgerError(f"no run {run_id}")
            if status == "success":
                cursor.execute(
                    """INSERT INTO coverage (run_id, kind, covered_start, covered_end)
                       SELECT run_id, kind, window_start, window_end FROM runs
                       WHERE run_id = %s AND window_start IS NOT NULL AND kind = ANY(%s)
                       ON CONFLICT (run_id) DO NOTHING""",
                    (run_id, list(COVERING_KINDS)),
                )
            else:
                cursor.execute("DELETE FROM coverage WHERE run_id = %s", (run_id,))

    # -- coverage --------------------------------------------------------------------------------------------------

    def coverage(self, span: Interval | None = None, kind: str | None = None) -> list[CoveredRun]:
        """The intervals finished runs covered (of ``kind`` only, when given) that overlap ``span`` (all when None),
        in time order."""
        clauses: list[str] = ["TRUE"]
        values: list[Any] = []
        if span is not None:
            clauses.append("covered_end > %s AND covered_start < %s")
            values += [span.start, span.end]
        if kind is not None:
            clauses.append("kind = %s")
            values.append(kind)
        with self.transaction() as cursor:
            cursor.execute(
                f"""SELECT run_id, kind, covered_start, covered_end FROM coverage WHERE {" AND ".join(clauses)}
                    ORDER BY covered_start, covered_end, run_id""",
                values,
            )
            return [
                CoveredRun(int(r["run_id"]), r["kind"], Interval(r["covered_start"], r["covered_end"]))
                for r in cursor.fetchall()
            ]

    def last_nightly_end(self, before: datetime) -> datetime | None:
        """The latest end of a nightly run's coverage at or before ``before`` (None when the job covered nothing)."""
        with self.transaction() as cursor:
            cursor.execute(
                "SELECT max(covered_end) AS last FROM coverage WHERE kind = 'nightly' AND covered_end <= %s", (before,)
            )
            row = cursor.fetchone()
        return row["last"] if row else None

    def first_covered(self) -> datetime | None:
        """The earliest instant any run covered (None when nothing is covered yet)."""
        with self.transaction() as cursor:
            cursor.execute("SELECT min(covered_start) AS first FROM coverage")
            row = cursor.fetchone()
        return row["first"] if row else None

    @contextmanager
    def claim_series(self, series_uids: Sequence[str]) -> Iterator[None]:
        """Hold these series for retrieval while the block runs: a run that claims one of them meanwhile (an
        overlapping run's retrieve task) waits until this block ends, so no series is retrieved by two runs at
        once. Session-level advisory locks, taken in one order (no deadlock) and released by the block's end or
        by the connection's end (a killed task)."""
        with self._claim(_SERIES_LOCK_CLASS, series_uids, "series"):
            yield

    @contextmanager
    def claim_writebacks(self, keys: Sequence[str]) -> Iterator[None]:
        """Hold these RiskAssessment keys for sending while the block runs, as :meth:`claim_series` holds series: an
        overlapping run that claims one of them waits until this block ends, then reads the outbox again and finds
        it answered. No key is ever in flight twice; two conditional creates of one identifier sent at once can
        both create (HAPI does not serialize them)."""
        with self._claim(_WRITEBACK_LOCK_CLASS, keys, "write-back keys"):
            yield

    @contextmanager
    def _claim(self, lock_class: int, names: Sequence[str], what: str) -> Iterator[None]:
        """Session-level advisory locks on ``names`` (by CRC-32: a collision only makes one run wait longer),
        taken in sorted order; the first one another session holds is logged once, then waited for."""
        keys = sorted({zlib.crc32(name.encode()) - 2**31 for name in names})
        taken: list[int] = []
        waited = False
        try:
            for key in keys:
                with self.transaction() as cursor:
                    cursor.execute("SELECT pg_try_advisory_lock(%s, %s) AS got", (lock_class, key))
                    row = cursor.fetchone()
                    if not (row and row["got"]):
                        if not waited:
                            LOG.info("waiting for %s another run holds", what)
                            waited = True
                        cursor.execute("SELECT pg_advisory_lock(%s, %s)", (lock_class, key))
                taken.append(key)
            yield
        finally:
            for key in reversed(taken):
                with self.transaction() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s, %s)", (lock_class, key))

    def resume_run(self, run_id: int) -> bool:
        """Mark a failed run running again (a stage of it is being resumed); True when it was failed.

        :class:`LedgerError` for a run whose identifiers ``riskbridge db purge`` cleared: its undecided studies can
        no longer be matched, so none of its stages runs again."""
        with self.transaction() as cursor:
            cursor.execute("SELECT phi_purged FROM runs WHERE run_id = %s", (run_id,))
            row = cursor.fetchone()
            if row is not None and row["phi_purged"] is not None:
                raise LedgerError(_purged_message(run_id, row["phi_purged"]))
            cursor.execute(
                "UPDATE runs SET status = 'running', finished = NULL WHERE run_id = %s AND status = 'failed'", (run_id,)
            )
            return cursor.rowcount == 1

    def set_model(self, run_id: int, model: str) -> None:
        """Record which model judged (its pattern table, in harmonize) and scored the run ("name version
        sha256[:12]")."""
        with self.transaction() as cursor:
            cursor.execute("UPDATE runs SET model = %s WHERE run_id = %s", (model, run_id))

    def mark_stage(self, run_id: int, stage: str) -> None:
        """Record that a run-level stage (discover, match, ...) finished for the run."""
        with self.transaction() as cursor:
            cursor.execute(
                "INSERT INTO stage_marks (run_id, stage) VALUES (%s, %s) ON CONFLICT DO NOTHING", (run_id, stage)
            )

    def stage_marked(self, run_id: int, stage: str) -> bool:
        """True when the run-level stage already finished for the run."""
        with self.transaction() as cursor:
            cursor.execute("SELECT 1 FROM stage_marks WHERE run_id = %s AND stage = %s", (run_id, stage))
            return cursor.fetchone() is not None

    def record_timing(
        self, run_id: int, stage: str, chunk: str, seconds: float, counts: Mapping[str, int] | None = None
    ) -> None:
        """Add a stage invocation's wall seconds and counts to its (run, stage, chunk) row."""
        counts = counts or {}
        values = [counts.get(name, 0) for name in ("done", "skipped", "quarantined", "failed")]
        with self.transaction() as cursor:
            cursor.execute(
                """INSERT INTO stage_timings (run_id, stage, chunk, seconds, done, skipped, quarantined, failed)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (run_id, stage, chunk) DO UPDATE SET
                       seconds = stage_timings.seconds + EXCLUDED.seconds,
                       invocations = stage_timings.invocations + 1,
                       done = stage_timings.done + EXCLUDED.done,
                       skipped = stage_timings.skipped + EXCLUDED.skipped,
                       quarantined = stage_timings.quarantined + EXCLUDED.quarantined,
                       failed = stage_timings.failed + EXCLUDED.failed,
                       updated = now()""",
                (run_id, stage, chunk, max(seconds, 0.0), *values),
            )

    # -- quarantine ------------------------------------------------------------------------------------------------

    def quarantine(self, run_id: int, study_uid: str, stage: str, reason: str, detail: str = "") -> None:
        """Take a study out of the run at ``stage`` with a stable ``reason`` code (and a detail without PHI)."""
        with self.transaction() as cursor:
            record_quarantine(cursor, run_id, study_uid, stage, reason, detail)

    def quarantined(self, run_id: int) -> dict[str, tuple[str, str, str]]:
        """StudyInstanceUID -> (stage, reason, detail) of every quarantined study of the run."""
        with self.transaction() as cursor:
            cursor.execute("SELECT study_uid, stage, reason, detail FROM quarantine WHERE run_id = %s", (run_id,))
            return {r["study_uid"]: (r["stage"], r["reason"], r["detail"]) for r in cursor.fetchall()}

    # -- write back (outbox) ---------------------------------------------------------------------------------------

    def enqueue_writebacks(self, run_id: int) -> int:
        """Put every score of the run into the outbox as pending (a key already there stays as it is)."""
        with self.transaction() as cursor:
            cursor.execute(
                """INSERT INTO writebacks (assessment_key, run_id, study_uid)
                   SELECT assessment_key, run_id, study_uid FROM scores WHERE run_id = %s
                   ON CONFLICT (assessment_key) DO NOTHING""",
                (run_id,),
            )
            return int(cursor.rowcount)

    def mark_writeback(self, key: str, status: str, fhir_id: str | None = None, error: str | None = None) -> None:
        """Record the server's answer for one RiskAssessment key (created/exists) or the failure of an attempt."""
        if status not in ("created", "exists", "failed"):
            raise LedgerError(f"write-back status must be created, exists or failed, not {status!r}")
        with self.transaction() as cursor:
            cursor.execute(
                """UPDATE writebacks SET status = %s, attempts = attempts + 1, fhir_id = COALESCE(%s, fhir_id),
                       last_error = %s, updated = now()
                   WHERE assessment_key = %s AND status IN ('pending', 'failed')""",
                (status, fhir_id, error, key),
            )

    def writebacks(self, run_id: int) -> list[WriteBack]:
        """The outbox rows of the run's scores (whichever run enqueued them)."""
        with self.transaction() as cursor:
            cursor.execute(
                """SELECT w.* FROM writebacks w JOIN scores s USING (assessment_key)
                   WHERE s.run_id = %s ORDER BY w.assessment_key""",
                (run_id,),
            )
            return [
                WriteBack(r["assessment_key"], r["study_uid"], r["status"], r["attempts"], r["fhir_id"])
                for r in cursor.fetchall()
            ]
