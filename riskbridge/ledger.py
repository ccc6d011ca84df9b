"""The PostgreSQL ledger: every decision of every pipeline run, with its reason, and what is left to do.

The schema lives in versioned SQL files (``riskbridge/migrations/NNNN_name.sql``) that :meth:`Ledger.upgrade`
(``riskbridge db upgrade``) applies in order, each in its own transaction together with its row in
``schema_migrations``; an applied file that changed since is an error, never silently re-run.

Every write is an ``INSERT ... ON CONFLICT`` on the key that makes a fact unique (run + study, run + series, the
RiskAssessment key), so a stage that runs twice writes nothing twice, and every ``pending_*`` query answers what a
stage still has to do, which is what makes a run resumable. :mod:`riskbridge.pipeline` drives the stages; this
module only reads and writes rows. Nothing here logs a patient identifier (see the migration's PHI note).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
from riskbridge.records import PacsPatient, RetrievedSeries, StudyRef, WriteBack
from riskbridge.settings import DatabaseSettings

RUN_KINDS = ("nightly", "backfill", "on_demand")
RUN_STATUSES = ("running", "success", "failed")
STAGES = ("discover", "match", "select", "retrieve", "clinical", "harmonize", "score", "write_back")
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Serializes concurrent `db upgrade`s (two Airflow workers starting at once); any constant works.
_MIGRATION_LOCK = 0x72_62_6C_65_64_67_65_72


class LedgerError(Exception):
    """The ledger cannot do what was asked: schema not migrated, a changed migration, a run key reused, ..."""


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


@dataclass(frozen=True)
class RetrievalTask:
    """A chosen series still to retrieve."""

    study_uid: str
    series_uid: str
    expected: int | None


@dataclass(frozen=True)
class ClinicalTask:
    """A retrieved study whose clinical data is still to fetch: the matched FHIR Patient and the index time."""

    study_uid: str
    fhir_patient_id: str
    index_time: datetime


@dataclass(frozen=True)
class StoredVector:
    """A feature vector as stored by the clinical stage, with the FHIR ids behind it."""

    study_uid: str
    fhir_patient_id: str
    spec: str
    names: tuple[str, ...]
    values: tuple[float, ...]
    observed: tuple[bool, ...]
    observation_ids: tuple[str, ...]
    document_ids: tuple[str, ...]


@dataclass(frozen=True)
class ScoreTask:
    """A study the minimum-data policy lets through, with its staged series and vector."""

    vector: StoredVector
    series_uid: str
    series_dir: Path
    index_time: datetime


@dataclass(frozen=True)
class StoredScore:
    """A score as stored, with what the write-back needs to rebuild the RiskAssessment exactly."""

    study_uid: str
    fhir_patient_id: str
    model_name: str
    model_version: str
    probability: float
    attention: dict[str, float]
    assessment_key: str
    scored_at: datetime
    occurrence: datetime
    observation_ids: tuple[str, ...]
    document_ids: tuple[str, ...]


def _window(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime] | None:
    return (start, end) if start is not None and end is not None else None


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
    def _tx(self) -> Iterator[psycopg2.extras.RealDictCursor]:
        """A cursor in a transaction: committed when the block ends, rolled back when it raises."""
        with self.connection, self.connection.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cursor:
            yield cursor

    # -- schema ----------------------------------------------------------------------------------------------------

    def applied_migrations(self) -> dict[int, str]:
        """Version -> checksum of every applied migration (empty for a fresh database)."""
        with self._tx() as cursor:
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
        with self._tx() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cursor.execute(_SCHEMA_MIGRATIONS)
        for migration in wanted:
            with self._tx() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
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
                    continue
                cursor.execute(migration.sql)
                cursor.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
                applied_now.append(migration)
        return applied_now

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
    ) -> int:
        """Create the run, or return the existing run of ``run_key`` (a rerun resumes it) when it asks the same."""
        if kind not in RUN_KINDS:
            raise LedgerError(f"run kind must be one of {', '.join(RUN_KINDS)}, not {kind!r}")
        if not run_key:
            raise LedgerError("a run needs a non-empty run_key")
        if window is not None:
            if window[0].tzinfo is None or window[1].tzinfo is None:
                raise LedgerError("a run window needs aware datetimes (with their offset)")
            if not window[0] < window[1]:
                raise LedgerError(f"a run window must end after it starts, got {window[0]} .. {window[1]}")
        with self._tx() as cursor:
            cursor.execute(
                """INSERT INTO runs (run_key, kind, window_start, window_end, accessions, patient_ids)
                   VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (run_key) DO NOTHING""",
                (
                    run_key,
                    kind,
                    window[0] if window else None,
                    window[1] if window else None,
                    list(accessions),
                    list(patient_ids),
                ),
            )
        run = self.run_by_key(run_key)
        asked = (kind, window, tuple(accessions), tuple(patient_ids))
        if (run.kind, run.window, run.accessions, run.patient_ids) != asked:
            raise LedgerError(f"run key {run_key!r} already names run {run.run_id} with another kind, window or list")
        return run.run_id

    def _run_where(self, clause: str, value: Any) -> RunInfo:
        with self._tx() as cursor:
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
        )

    def run(self, run_id: int) -> RunInfo:
        """The run with this id; :class:`LedgerError` when there is none."""
        return self._run_where("run_id", run_id)

    def run_by_key(self, run_key: str) -> RunInfo:
        """The run with this key; :class:`LedgerError` when there is none."""
        return self._run_where("run_key", run_key)

    def finish_run(self, run_id: int, status: str = "success") -> None:
        """Mark the run finished with ``status`` (success or failed); finishing again updates the status."""
        if status not in ("success", "failed"):
            raise LedgerError(f"a run finishes as 'success' or 'failed', not {status!r}")
        with self._tx() as cursor:
            cursor.execute("UPDATE runs SET status = %s, finished = now() WHERE run_id = %s", (status, run_id))
            if cursor.rowcount != 1:
                raise LedgerError(f"no run {run_id}")

    def resume_run(self, run_id: int) -> bool:
        """Mark a failed run running again (a stage of it is being resumed); True when it was failed."""
        with self._tx() as cursor:
            cursor.execute(
                "UPDATE runs SET status = 'running', finished = NULL WHERE run_id = %s AND status = 'failed'", (run_id,)
            )
            return cursor.rowcount == 1

    def set_model(self, run_id: int, model: str) -> None:
        """Record which model judged (its pattern table, in harmonize) and scored the run ("name version
        sha256[:12]")."""
        with self._tx() as cursor:
            cursor.execute("UPDATE runs SET model = %s WHERE run_id = %s", (model, run_id))

    def mark_stage(self, run_id: int, stage: str) -> None:
        """Record that a run-level stage (discover, match, ...) finished for the run."""
        with self._tx() as cursor:
            cursor.execute(
                "INSERT INTO stage_marks (run_id, stage) VALUES (%s, %s) ON CONFLICT DO NOTHING", (run_id, stage)
            )

    def stage_marked(self, run_id: int, stage: str) -> bool:
        """True when the run-level stage already finished for the run."""
        with self._tx() as cursor:
            cursor.execute("SELECT 1 FROM stage_marks WHERE run_id = %s AND stage = %s", (run_id, stage))
            return cursor.fetchone() is not None

    def record_timing(
        self, run_id: int, stage: str, chunk: str, seconds: float, counts: Mapping[str, int] | None = None
    ) -> None:
        """Add a stage invocation's wall seconds and counts to its (run, stage, chunk) row."""
        counts = counts or {}
        values = [counts.get(name, 0) for name in ("done", "skipped", "quarantined", "failed")]
        with self._tx() as cursor:
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

    @staticmethod
    def _quarantine(cursor: Any, run_id: int, study_uid: str, stage: str, reason: str, detail: str = "") -> None:
        cursor.execute(
            """INSERT INTO quarantine (run_id, study_uid, stage, reason, detail) VALUES (%s, %s, %s, %s, %s)
               ON CONFLICT (run_id, study_uid) DO UPDATE SET stage = EXCLUDED.stage, reason = EXCLUDED.reason,
                   detail = EXCLUDED.detail, recorded = now()""",
            (run_id, study_uid, stage, reason, detail),
        )

    def quarantine(self, run_id: int, study_uid: str, stage: str, reason: str, detail: str = "") -> None:
        """Take a study out of the run at ``stage`` with a stable ``reason`` code (and a detail without PHI)."""
        with self._tx() as cursor:
            self._quarantine(cursor, run_id, study_uid, stage, reason, detail)

    def quarantined(self, run_id: int) -> dict[str, tuple[str, str, str]]:
        """StudyInstanceUID -> (stage, reason, detail) of every quarantined study of the run."""
        with self._tx() as cursor:
            cursor.execute("SELECT study_uid, stage, reason, detail FROM quarantine WHERE run_id = %s", (run_id,))
            return {r["study_uid"]: (r["stage"], r["reason"], r["detail"]) for r in cursor.fetchall()}

    # -- discover --------------------------------------------------------------------------------------------------

    def add_studies(self, run_id: int, studies: Iterable[StudyRef]) -> int:
        """Record discovered studies (a study already recorded for the run is left as it is); return how many new."""
        added = 0
        with self._tx() as cursor:
            for study in studies:
                patient = study.patient
                cursor.execute(
                    """INSERT INTO studies (run_id, study_uid, accession, patient_id, patient_issuer,
                           patient_other_ids, patient_name, patient_birth_date, patient_sex, study_datetime,
                           timezone_offset, modalities, description, instance_count)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                    (
                        run_id,
                        study.study_uid,
                        study.accession,
                        patient.patient_id,
                        patient.issuer,
                        json.dumps([list(pair) for pair in patient.other_ids]),
                        patient.name,
                        patient.birth_date,
                        patient.sex,
                        study.study_datetime.isoformat() if study.study_datetime else None,
                        study.timezone_offset,
                        list(study.modalities),
                        study.description,
                        study.instance_count,
                    ),
                )
                added += cursor.rowcount
        return added

    def study_uids(self, run_id: int) -> list[str]:
        """Every StudyInstanceUID discovered in the run."""
        with self._tx() as cursor:
            cursor.execute("SELECT study_uid FROM studies WHERE run_id = %s ORDER BY study_uid", (run_id,))
            return [r["study_uid"] for r in cursor.fetchall()]

    # -- match -----------------------------------------------------------------------------------------------------

    def pending_match(self, run_id: int) -> list[StudyRef]:
        """Studies of the run without an identity decision, with the PACS patient (matching needs its PHI)."""
        with self._tx() as cursor:
            cursor.execute(
                """SELECT s.* FROM studies s
                   LEFT JOIN identity_decisions d USING (run_id, study_uid)
                   WHERE s.run_id = %s AND d.study_uid IS NULL ORDER BY s.study_uid""",
                (run_id,),
            )
            rows = cursor.fetchall()
        studies = []
        for row in rows:
            patient = PacsPatient(
                patient_id=row["patient_id"],
                issuer=row["patient_issuer"],
                other_ids=tuple((str(pair[0]), pair[1]) for pair in row["patient_other_ids"]),
                name=row["patient_name"] or "",
                birth_date=row["patient_birth_date"],
                sex=row["patient_sex"],
            )
            studies.append(
                StudyRef(
                    study_uid=row["study_uid"],
                    accession=row["accession"],
                    patient=patient,
                    study_datetime=datetime.fromisoformat(row["study_datetime"]) if row["study_datetime"] else None,
                    timezone_offset=row["timezone_offset"],
                    modalities=tuple(row["modalities"]),
                    description=row["description"],
                    instance_count=row["instance_count"],
                )
            )
        return studies

    def record_identity(
        self,
        run_id: int,
        study_uid: str,
        outcome: str,
        fhir_patient_id: str | None,
        reasons: Sequence[str],
        candidate_ids: Sequence[str] = (),
        score: float | None = None,
        quarantine_reason: str | None = None,
    ) -> None:
        """Record a study's identity decision (first one wins), quarantine it unless matched, and clear the PACS
        name and birth date, which nothing needs any more."""
        with self._tx() as cursor:
            cursor.execute(
                """INSERT INTO identity_decisions (run_id, study_uid, outcome, fhir_patient_id, reasons,
                       candidate_ids, score) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                (run_id, study_uid, outcome, fhir_patient_id, list(reasons), list(candidate_ids), score),
            )
            if cursor.rowcount and quarantine_reason is not None:
                self._quarantine(cursor, run_id, study_uid, "match", quarantine_reason, ", ".join(reasons))
            cursor.execute(
                """UPDATE studies SET patient_name = NULL, patient_birth_date = NULL
                   WHERE run_id = %s AND study_uid = %s""",
                (run_id, study_uid),
            )

    def identity(self, run_id: int) -> dict[str, tuple[str, str | None]]:
        """StudyInstanceUID -> (outcome, FHIR Patient id) for every decided study of the run."""
        with self._tx() as cursor:
            cursor.execute(
                "SELECT study_uid, outcome, fhir_patient_id FROM identity_decisions WHERE run_id = %s", (run_id,)
            )
            return {r["study_uid"]: (r["outcome"], r["fhir_patient_id"]) for r in cursor.fetchall()}

    # -- select ----------------------------------------------------------------------------------------------------

    def pending_select(self, run_id: int) -> list[str]:
        """Matched studies of the run without a selection."""
        with self._tx() as cursor:
            cursor.execute(
                """SELECT d.study_uid FROM identity_decisions d
                   LEFT JOIN selections s USING (run_id, study_uid)
                   WHERE d.run_id = %s AND d.outcome = 'matched' AND s.study_uid IS NULL ORDER BY d.study_uid""",
                (run_id,),
            )
            return [r["study_uid"] for r in cursor.fetchall()]

    def record_selection(self, run_id: int, selection: Any, expected: int | None) -> None:
        """Record a :class:`riskbridge.harmonize.series.SelectionResult` with every series decision; a study without
        a usable series is quarantined ``no_usable_series``. ``expected``: the chosen series' instance count."""
        chosen = selection.chosen
        with self._tx() as cursor:
            cursor.execute(
                """INSERT INTO selections (run_id, study_uid, rule_set, chosen_series_uid, expected_instances, reason)
                   VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                (
                    run_id,
                    selection.study_uid,
                    selection.rule_set,
                    chosen.series_uid if chosen else None,
                    expected,
                    selection.reason,
                ),
            )
            if not cursor.rowcount:
                return
            for decision in selection.decisions:
                cursor.execute(
                    """INSERT INTO series_decisions (run_id, study_uid, series_uid, chosen, rule, reason, rank, judged)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                    (
                        run_id,
                        selection.study_uid,
                        decision.series_uid,
                        decision.chosen,
                        decision.rule,
                        decision.reason,
                        decision.rank,
                        json.dumps(dict(decision.judged), default=str),
                    ),
                )
            if chosen is None:
                self._quarantine(cursor, run_id, selection.study_uid, "select", "no_usable_series", selection.reason)

    # -- retrieve --------------------------------------------------------------------------------------------------

    def pending_retrieval(self, run_id: int) -> list[RetrievalTask]:
        """Chosen series of the run not yet staged complete (failed ones are tried again), by study."""
        with self._tx() as cursor:
            cursor.execute(
                """SELECT s.study_uid, s.chosen_series_uid, s.expected_instances FROM selections s
                   LEFT JOIN retrievals r USING (run_id, study_uid)
                   WHERE s.run_id = %s AND s.chosen_series_uid IS NOT NULL AND (r.complete IS NOT TRUE)
                   ORDER BY s.study_uid""",
                (run_id,),
            )
            return [
                RetrievalTask(r["study_uid"], r["chosen_series_uid"], r["expected_instances"])
                for r in cursor.fetchall()
            ]

    def record_retrieval(
        self, run_id: int, retrieved: RetrievedSeries, index_time: datetime, index_time_source: str
    ) -> None:
        """Record a complete retrieval and the study's index time; lifts an earlier retrieval quarantine."""
        with self._tx() as cursor:
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
                    index_time,
                    index_time_source,
                ),
            )
            cursor.execute(
                "DELETE FROM quarantine WHERE run_id = %s AND study_uid = %s AND stage = 'retrieve'",
                (run_id, retrieved.study_uid),
            )

    def record_retrieval_failure(
        self, run_id: int, study_uid: str, series_uid: str, code: str, detail: str, missing: int = 0
    ) -> None:
        """Record a failed retrieval (tried again by a rerun) and quarantine the study with ``code``."""
        with self._tx() as cursor:
            cursor.execute(
                """INSERT INTO retrievals (run_id, study_uid, series_uid, complete, attempts, missing, failure_code,
                       failure_detail) VALUES (%s, %s, %s, FALSE, 1, %s, %s, %s)
                   ON CONFLICT (run_id, study_uid) DO UPDATE SET attempts = retrievals.attempts + 1,
                       missing = EXCLUDED.missing, failure_code = EXCLUDED.failure_code,
                       failure_detail = EXCLUDED.failure_detail, updated = now()
                   WHERE NOT retrievals.complete""",
                (run_id, study_uid, series_uid, missing, code, detail),
            )
            self._quarantine(cursor, run_id, study_uid, "retrieve", code, detail)

    # -- clinical --------------------------------------------------------------------------------------------------

    def pending_clinical(self, run_id: int) -> list[ClinicalTask]:
        """Retrieved studies of the run without a feature vector, with their patient and index time."""
        with self._tx() as cursor:
            cursor.execute(
                """SELECT r.study_uid, d.fhir_patient_id, r.index_time FROM retrievals r
                   JOIN identity_decisions d USING (run_id, study_uid)
                   LEFT JOIN features f USING (run_id, study_uid)
                   WHERE r.run_id = %s AND r.complete AND f.study_uid IS NULL ORDER BY r.study_uid""",
                (run_id,),
            )
            return [ClinicalTask(r["study_uid"], r["fhir_patient_id"], r["index_time"]) for r in cursor.fetchall()]

    def record_clinical(
        self, run_id: int, study_uid: str, fhir_patient_id: str, result: Any, units: Mapping[str, str]
    ) -> bool:
        """Record a :class:`riskbridge.clinical.ClinicalResult`: every Observation's disposition, every note's,
        every comorbidity mention, and the feature vector. ``units`` maps a lab feature to its canonical unit.
        Returns False when the study already had a vector (nothing is written then)."""
        vector = result.vector
        with self._tx() as cursor:
            cursor.execute(
                """INSERT INTO features (run_id, study_uid, fhir_patient_id, spec, names, feature_values, observed,
                       observation_ids, document_ids) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT DO NOTHING""",
                (
                    run_id,
                    study_uid,
                    fhir_patient_id,
                    vector.spec,
                    list(vector.names),
                    list(vector.values),
                    list(vector.observed),
                    list(result.observation_ids),
                    list(result.document_ids),
                ),
            )
            if not cursor.rowcount:
                return False
            rows = []
            for feature, selection in result.labs.items():
                for disposition in selection.dispositions:
                    used = str(disposition.code) == "used"
                    rows.append(
                        (
                            run_id,
                            study_uid,
                            feature,
                            disposition.observation_id,
                            str(disposition.code),
                            disposition.status,
                            disposition.time,
                            selection.value if used else None,
                            units.get(feature) if used else None,
                            disposition.detail,
                        )
                    )
            psycopg2.extras.execute_values(
                cursor,
                """INSERT INTO clinical_values (run_id, study_uid, feature, observation_id, code, status, effective,
                       value, unit, detail) VALUES %s ON CONFLICT DO NOTHING""",
                rows,
            )
            psycopg2.extras.execute_values(
                cursor,
                """INSERT INTO note_dispositions (run_id, study_uid, resource_type, resource_id, code) VALUES %s
                   ON CONFLICT DO NOTHING""",
                [(run_id, study_uid, n.resource_type, n.resource_id, n.code) for n in result.notes],
            )
            mentions = []
            if result.comorbidities is not None:
                for evidence in result.comorbidities.flags.values():
                    for mention in evidence.mentions:
                        mentions.append(
                            (
                                run_id,
                                study_uid,
                                mention.note_id,
                                mention.flag,
                                mention.start,
                                mention.end,
                                str(mention.assertion),
                                mention.counts,
                            )
                        )
            psycopg2.extras.execute_values(
                cursor,
                """INSERT INTO note_findings (run_id, study_uid, note_id, flag, span_start, span_end, assertion,
                       counts) VALUES %s ON CONFLICT DO NOTHING""",
                mentions,
            )
        return True

    # -- harmonize -------------------------------------------------------------------------------------------------

    @staticmethod
    def _vector(row: Mapping[str, Any]) -> StoredVector:
        return StoredVector(
            study_uid=row["study_uid"],
            fhir_patient_id=row["fhir_patient_id"],
            spec=row["spec"],
            names=tuple(row["names"]),
            values=tuple(float(v) for v in row["feature_values"]),
            observed=tuple(bool(v) for v in row["observed"]),
            observation_ids=tuple(row["observation_ids"]),
            document_ids=tuple(row["document_ids"]),
        )

    def pending_decision(self, run_id: int) -> list[StoredVector]:
        """Feature vectors of the run the minimum-data policy has not judged yet."""
        with self._tx() as cursor:
            cursor.execute(
                "SELECT * FROM features WHERE run_id = %s AND decision IS NULL ORDER BY study_uid", (run_id,)
            )
            return [self._vector(row) for row in cursor.fetchall()]

    def record_decision(
        self,
        run_id: int,
        study_uid: str,
        score: bool,
        reasons: Sequence[str],
        pattern: str | None = None,
        pattern_auroc: float | None = None,
    ) -> None:
        """Record the minimum-data decision with the vector's modality pattern and the model's validated AUROC for
        it (None: not validated; no pattern for a vector the policy could not read); a skipped study is quarantined
        with its first reason's code."""
        with self._tx() as cursor:
            cursor.execute(
                """UPDATE features SET decision = %s, reasons = %s, pattern = %s, pattern_auroc = %s
                   WHERE run_id = %s AND study_uid = %s AND decision IS NULL""",
                ("score" if score else "skip", list(reasons), pattern, pattern_auroc, run_id, study_uid),
            )
            if cursor.rowcount and not score:
                self._quarantine(
                    cursor, run_id, study_uid, "harmonize", reason_code(reasons[0]) if reasons else "skipped",
                    "; ".join(reasons),
                )  # fmt: skip

    # -- score -----------------------------------------------------------------------------------------------------

    def pending_score(self, run_id: int) -> list[ScoreTask]:
        """Studies to score (decision ``score``, not scored, not quarantined), with their series and vector."""
        with self._tx() as cursor:
            cursor.execute(
                """SELECT f.*, r.series_uid, r.path, r.index_time FROM features f
                   JOIN retrievals r USING (run_id, study_uid)
                   LEFT JOIN scores s USING (run_id, study_uid)
                   LEFT JOIN quarantine q USING (run_id, study_uid)
                   WHERE f.run_id = %s AND f.decision = 'score' AND s.study_uid IS NULL AND q.study_uid IS NULL
                   ORDER BY f.study_uid""",
                (run_id,),
            )
            return [
                ScoreTask(self._vector(row), row["series_uid"], Path(row["path"]), row["index_time"])
                for row in cursor.fetchall()
            ]

    def record_score(
        self,
        run_id: int,
        study_uid: str,
        fhir_patient_id: str,
        model: tuple[str, str, str],
        probability: float,
        raw_probability: float,
        risk: str,
        attention: Mapping[str, float],
        assessment_key: str,
        scored_at: datetime,
    ) -> None:
        """Record a study's score (first one wins); ``model`` is (name, version, sha256)."""
        with self._tx() as cursor:
            cursor.execute(
                """INSERT INTO scores (run_id, study_uid, fhir_patient_id, model_name, model_version, model_sha256,
                       probability, raw_probability, risk, attention, assessment_key, scored_at)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                (
                    run_id,
                    study_uid,
                    fhir_patient_id,
                    *model,
                    probability,
                    raw_probability,
                    risk,
                    json.dumps(dict(attention)),
                    assessment_key,
                    scored_at,
                ),
            )

    # -- write back (outbox) ---------------------------------------------------------------------------------------

    def enqueue_writebacks(self, run_id: int) -> int:
        """Put every score of the run into the outbox as pending (a key already there stays as it is)."""
        with self._tx() as cursor:
            cursor.execute(
                """INSERT INTO writebacks (assessment_key, run_id, study_uid)
                   SELECT assessment_key, run_id, study_uid FROM scores WHERE run_id = %s
                   ON CONFLICT (assessment_key) DO NOTHING""",
                (run_id,),
            )
            return int(cursor.rowcount)

    def open_writebacks(self, run_id: int) -> list[StoredScore]:
        """Scores of the run whose RiskAssessment is pending or failed, with everything the bundle needs."""
        with self._tx() as cursor:
            cursor.execute(
                """SELECT s.*, f.observation_ids, f.document_ids, r.index_time FROM scores s
                   JOIN writebacks w USING (assessment_key)
                   JOIN features f ON f.run_id = s.run_id AND f.study_uid = s.study_uid
                   JOIN retrievals r ON r.run_id = s.run_id AND r.study_uid = s.study_uid
                   WHERE s.run_id = %s AND w.status IN ('pending', 'failed') ORDER BY s.study_uid""",
                (run_id,),
            )
            return [
                StoredScore(
                    study_uid=row["study_uid"],
                    fhir_patient_id=row["fhir_patient_id"],
                    model_name=row["model_name"],
                    model_version=row["model_version"],
                    probability=float(row["probability"]),
                    attention={str(k): float(v) for k, v in row["attention"].items()},
                    assessment_key=row["assessment_key"],
                    scored_at=row["scored_at"],
                    occurrence=row["index_time"],
                    observation_ids=tuple(row["observation_ids"]),
                    document_ids=tuple(row["document_ids"]),
                )
                for row in cursor.fetchall()
            ]

    def mark_writeback(self, key: str, status: str, fhir_id: str | None = None, error: str | None = None) -> None:
        """Record the server's answer for one RiskAssessment key (created/exists) or the failure of an attempt."""
        if status not in ("created", "exists", "failed"):
            raise LedgerError(f"write-back status must be created, exists or failed, not {status!r}")
        with self._tx() as cursor:
            cursor.execute(
                """UPDATE writebacks SET status = %s, attempts = attempts + 1, fhir_id = COALESCE(%s, fhir_id),
                       last_error = %s, updated = now()
                   WHERE assessment_key = %s AND status IN ('pending', 'failed')""",
                (status, fhir_id, error, key),
            )

    def writebacks(self, run_id: int) -> list[WriteBack]:
        """The outbox rows of the run's scores (whichever run enqueued them)."""
        with self._tx() as cursor:
            cursor.execute(
                """SELECT w.* FROM writebacks w JOIN scores s USING (assessment_key)
                   WHERE s.run_id = %s ORDER BY w.assessment_key""",
                (run_id,),
            )
            return [
                WriteBack(r["assessment_key"], r["study_uid"], r["status"], r["attempts"], r["fhir_id"])
                for r in cursor.fetchall()
            ]

    # -- summary ---------------------------------------------------------------------------------------------------

    def stage_counts(self, run_id: int) -> dict[str, dict[str, int]]:
        """Studies per stage and outcome (done, skipped, quarantined, failed), from the ledger's rows."""

        def zero() -> dict[str, int]:
            return {"done": 0, "skipped": 0, "quarantined": 0, "failed": 0}

        counts = {stage: zero() for stage in STAGES}
        with self._tx() as cursor:
            cursor.execute("SELECT count(*) AS n FROM studies WHERE run_id = %s", (run_id,))
            counts["discover"]["done"] = int(cursor.fetchone()["n"])
            cursor.execute(
                "SELECT outcome, count(*) AS n FROM identity_decisions WHERE run_id = %s GROUP BY outcome", (run_id,)
            )
            for row in cursor.fetchall():
                counts["match"]["done" if row["outcome"] == "matched" else "quarantined"] += int(row["n"])
            cursor.execute(
                """SELECT chosen_series_uid IS NOT NULL AS chosen, count(*) AS n FROM selections WHERE run_id = %s
                   GROUP BY 1""",
                (run_id,),
            )
            for row in cursor.fetchall():
                counts["select"]["done" if row["chosen"] else "quarantined"] += int(row["n"])
            cursor.execute("SELECT complete, count(*) AS n FROM retrievals WHERE run_id = %s GROUP BY 1", (run_id,))
            for row in cursor.fetchall():
                counts["retrieve"]["done" if row["complete"] else "failed"] += int(row["n"])
            cursor.execute("SELECT decision, count(*) AS n FROM features WHERE run_id = %s GROUP BY 1", (run_id,))
            for row in cursor.fetchall():
                counts["clinical"]["done"] += int(row["n"])
                if row["decision"] == "score":
                    counts["harmonize"]["done"] += int(row["n"])
                elif row["decision"] == "skip":
                    counts["harmonize"]["skipped"] += int(row["n"])
            cursor.execute("SELECT count(*) AS n FROM scores WHERE run_id = %s", (run_id,))
            counts["score"]["done"] = int(cursor.fetchone()["n"])
            cursor.execute("SELECT count(*) AS n FROM quarantine WHERE run_id = %s AND stage = 'score'", (run_id,))
            counts["score"]["failed"] = int(cursor.fetchone()["n"])
        for writeback in self.writebacks(run_id):
            if writeback.status in ("created", "exists"):
                counts["write_back"]["done"] += 1
            elif writeback.status == "failed":
                counts["write_back"]["failed"] += 1
        return counts

    def run_summary(self, run_id: int, thresholds: tuple[float, float] | None = None) -> Any:
        """The run reduced to what its report shows (:class:`riskbridge.report.RunSummary`)."""
        from riskbridge.report import RunSummary

        run = self.run(run_id)
        with self._tx() as cursor:
            cursor.execute(
                "SELECT stage, sum(seconds) AS seconds FROM stage_timings WHERE run_id = %s GROUP BY stage", (run_id,)
            )
            seconds = {r["stage"]: float(r["seconds"]) for r in cursor.fetchall()}
            cursor.execute(
                "SELECT reason, count(*) AS n FROM quarantine WHERE run_id = %s GROUP BY reason ORDER BY reason",
                (run_id,),
            )
            quarantine = {r["reason"]: int(r["n"]) for r in cursor.fetchall()}
            cursor.execute(
                "SELECT study_uid, probability, risk, attention FROM scores WHERE run_id = %s ORDER BY study_uid",
                (run_id,),
            )
            scored = cursor.fetchall()
            patterns = self._pattern_counts(cursor, run_id)
        statuses = Counter(writeback.status for writeback in self.writebacks(run_id))
        return RunSummary(
            run_id=run.run_id,
            run_key=run.run_key,
            kind=run.kind,
            status=run.status,
            window=run.window,
            started=run.started,
            finished=run.finished,
            stage_counts=self.stage_counts(run_id),
            stage_seconds=seconds,
            quarantine=quarantine,
            scores=[(r["study_uid"], float(r["probability"]), r["risk"]) for r in scored],
            attention=[{str(k): float(v) for k, v in r["attention"].items()} for r in scored],
            writebacks=dict(statuses),
            model=run.model,
            thresholds=thresholds,
            patterns=patterns,
        )

    @staticmethod
    def _pattern_counts(cursor: Any, run_id: int) -> dict[str, Any]:
        """Decided vectors of the run per modality pattern: scored, quarantined by the policy, let through and not
        (yet) scored, and the validated AUROCs the decisions used (:class:`riskbridge.report.PatternCounts`)."""
        from riskbridge.report import UNKNOWN_PATTERN, PatternCounts

        cursor.execute(
            """SELECT f.pattern, f.decision, s.study_uid IS NOT NULL AS scored, count(*) AS n,
                      min(f.pattern_auroc) AS auroc_low, max(f.pattern_auroc) AS auroc_high
               FROM features f LEFT JOIN scores s USING (run_id, study_uid)
               WHERE f.run_id = %s AND f.decision IS NOT NULL GROUP BY 1, 2, 3""",
            (run_id,),
        )
        found: dict[str, dict[str, Any]] = {}
        for row in cursor.fetchall():
            counts = found.setdefault(row["pattern"] or UNKNOWN_PATTERN, {"aurocs": []})
            outcome = "quarantined" if row["decision"] == "skip" else "scored" if row["scored"] else "unscored"
            counts[outcome] = counts.get(outcome, 0) + int(row["n"])
            counts["aurocs"] += [float(v) for v in (row["auroc_low"], row["auroc_high"]) if v is not None]
        return {
            pattern: PatternCounts(
                scored=counts.get("scored", 0),
                quarantined=counts.get("quarantined", 0),
                unscored=counts.get("unscored", 0),
                auroc=(min(counts["aurocs"]), max(counts["aurocs"])) if counts["aurocs"] else None,
            )
            for pattern, counts in found.items()
        }
