"""PHI retention in the ledger: which columns can name a patient, when each is cleared, and ``riskbridge db purge``.

The ledger keeps what identifies a patient only as long as the pipeline needs it:

- The PACS name and birth date of a study are needed by identity matching only; the match stage clears them in the
  transaction that records the study's identity decision, whatever the outcome (a study quarantined
  ``identity_unmatched`` loses them at once too). Retrying such a study needs nothing of the old row: a later run
  finds it again by C-FIND with its PACS attributes as they are then, and the already-done skip and the retry mark
  read only the StudyInstanceUID and the run.
- A study whose run stopped before its identity was decided (a failed or abandoned run) keeps them, because resuming
  the run must still be able to match it; :func:`purge_phi` clears them once the run has had no activity for
  ``[retention] undecided_days``.
- The PACS PatientID and other ids (MRNs), the accession number, sex and the study description stay after matching,
  for the reviewer of an ``identity_needs_review`` or ``identity_conflict`` decision; :func:`purge_phi` clears them,
  and the accession numbers and PatientIDs an on-demand or export run was asked for, once the run has had no
  activity for ``[retention] phi_days``. The run is marked ``phi_purged`` and is never resumed again.

A run's activity is its start, its finish and its last stage call (``stage_timings``): a run that failed or was
abandoned while ``running`` is purged like a finished one. UIDs, identity decisions (with the EHR's Patient id),
selections, retrievals, clinical values, features, scores, the write-back outbox, ``already_done`` and ``coverage``
stay, so the audit trail, the already-done skip and the coverage work as before. Nothing here reads a cleared value
or prints one: a purge answers counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import psycopg2

from riskbridge.errors import LedgerError

if TYPE_CHECKING:
    from riskbridge.ledger import Ledger
    from riskbridge.settings import RetentionSettings


@dataclass(frozen=True)
class PhiColumn:
    """A ledger column that can name a patient, and what retention does with it: the SQL value a purge writes
    (None: kept) and why."""

    table: str
    column: str
    cleared_to: str | None
    why: str
    undecided: bool = False  # also cleared after undecided_days from studies never matched

    @property
    def kept(self) -> bool:
        """True for a column no purge touches."""
        return self.cleared_to is None


# Cleared by `riskbridge db purge` (the name and birth date of a decided study already by the match stage).
PHI_COLUMNS: tuple[PhiColumn, ...] = (
    PhiColumn("studies", "patient_name", "NULL", "DICOM PatientName, for fallback matching only", undecided=True),
    PhiColumn("studies", "patient_birth_date", "NULL", "for fallback matching only", undecided=True),
    PhiColumn("studies", "patient_id", "NULL", "the PACS PatientID, an MRN: a reviewer's key until phi_days"),
    PhiColumn("studies", "patient_other_ids", "'[]'", "OtherPatientIDsSequence: more MRNs"),
    PhiColumn("studies", "accession", "NULL", "AccessionNumber: names the patient's order in the RIS"),
    PhiColumn("studies", "patient_sex", "NULL", "a demographic only identity matching reads"),
    PhiColumn("studies", "description", "''", "StudyDescription: free text from the PACS that can carry a name"),
    PhiColumn("runs", "accessions", "'{}'", "the accession numbers an on-demand or export run was asked for"),
    PhiColumn("runs", "patient_ids", "'{}'", "the PACS PatientIDs an on-demand run was asked for"),
)

# Kept: each names no patient outside the EHR or the PACS, and something after the purge reads it.
KEPT_COLUMNS: tuple[PhiColumn, ...] = (
    PhiColumn("studies", "patient_issuer", None, "IssuerOfPatientID names the assigning authority, not the patient"),
    PhiColumn("studies", "study_datetime", None, "the study's time: explains window and late-arrival decisions"),
    PhiColumn("identity_decisions", "fhir_patient_id", None, "the EHR's internal Patient id the study was linked to"),
    PhiColumn("identity_decisions", "candidate_ids", None, "EHR Patient ids a needs-review or conflict weighed"),
    PhiColumn("features", "fhir_patient_id", None, "whose clinical values the vector holds (cohort export, monitor)"),
    PhiColumn("scores", "fhir_patient_id", None, "the RiskAssessment's subject; the outbox checks its key with it"),
)


def cutoff(now: datetime, days: int) -> datetime:
    """The instant ``days`` before ``now`` (aware): runs without activity since then are purged."""
    if now.tzinfo is None:
        raise ValueError("a retention cutoff needs an aware time (with its offset)")
    if days < 1:
        raise ValueError(f"a retention period is at least 1 day, not {days}")
    return now - timedelta(days=days)


# Runs whose latest activity (start, finish, last stage call) is before the cutoff parameter named by {cutoff}.
_QUIET_RUNS = """SELECT r.run_id FROM runs r
    WHERE GREATEST(r.started, r.finished,
                   (SELECT max(t.updated) FROM stage_timings t WHERE t.run_id = r.run_id)) < %({cutoff})s"""


def _columns(table: str, undecided: bool = False) -> list[PhiColumn]:
    return [c for c in PHI_COLUMNS if c.table == table and (c.undecided or not undecided)]


def _left(columns: list[PhiColumn], alias: str) -> str:
    """SQL: some column still holds a value a purge would clear."""
    return " OR ".join(f"{alias}.{c.column} IS DISTINCT FROM {c.cleared_to}" for c in columns)


def _assignments(columns: list[PhiColumn]) -> str:
    return ", ".join(f"{c.column} = {c.cleared_to}" for c in columns)


@dataclass(frozen=True)
class PurgeStep:
    """One UPDATE of a purge: the rows of ``table`` it clears (``where``, over the alias ``t``) and how (``set``)."""

    name: str
    table: str
    set: str
    where: str

    def update_sql(self) -> str:
        """The UPDATE that clears the step's rows."""
        return f"UPDATE {self.table} AS t SET {self.set} WHERE {self.where}"

    def count_sql(self) -> str:
        """The count of the rows :meth:`update_sql` would clear (a dry run)."""
        return f"SELECT count(*) AS n FROM {self.table} AS t WHERE {self.where}"


def purge_steps() -> list[PurgeStep]:
    """The purge's UPDATEs, in order, built from :data:`PHI_COLUMNS`; their rows never overlap, so a dry run's
    counts are the purge's. Parameters: ``phi_cutoff``, ``undecided_cutoff`` and ``now``."""
    studies, runs = _columns("studies"), _columns("runs")
    undecided = _columns("studies", undecided=True)
    phi_runs = _QUIET_RUNS.format(cutoff="phi_cutoff")
    undecided_runs = _QUIET_RUNS.format(cutoff="undecided_cutoff")
    return [
        PurgeStep(
            "identifiers", "studies", _assignments(studies), f"t.run_id IN ({phi_runs}) AND ({_left(studies, 't')})"
        ),
        PurgeStep(
            "runs",
            "runs",
            _assignments(runs) + ", phi_purged = %(now)s",
            f"t.run_id IN ({phi_runs}) AND t.phi_purged IS NULL",
        ),
        PurgeStep(
            "undecided",
            "studies",
            _assignments(undecided),
            f"""t.run_id IN ({undecided_runs}) AND t.run_id NOT IN ({phi_runs}) AND ({_left(undecided, "t")})
                AND NOT EXISTS (SELECT 1 FROM identity_decisions d
                                WHERE d.run_id = t.run_id AND d.study_uid = t.study_uid)""",
        ),
    ]


@dataclass(frozen=True)
class PurgeCounts:
    """What a purge cleared (on a dry run: would clear), in rows; counts and cutoffs only, never a value."""

    phi_cutoff: datetime  # runs without activity since then lost their identifiers
    undecided_cutoff: datetime  # ... since then, their undecided studies' names and birth dates
    identifiers: int  # studies whose identifiers were cleared
    undecided: int  # studies never matched whose names and birth dates were cleared
    runs: int  # runs marked phi_purged (their lists cleared)
    dry_run: bool = False

    def per_table(self) -> dict[str, int]:
        """Rows per table: ``studies`` and ``runs``."""
        return {"studies": self.identifiers + self.undecided, "runs": self.runs}


def purge_phi(
    ledger: Ledger, retention: RetentionSettings, now: datetime | None = None, dry_run: bool = False
) -> PurgeCounts:
    """Clear the patient identifiers the ledger no longer needs (the module docstring says which, and when), in one
    transaction; with ``dry_run`` count the rows instead and change nothing. Idempotent: a second purge counts 0.
    :class:`LedgerError` when the ledger lacks migration 0008 or the database fails."""
    now = now if now is not None else datetime.now(UTC)
    params = {
        "phi_cutoff": cutoff(now, retention.phi_days),
        "undecided_cutoff": cutoff(now, retention.undecided_days),
        "now": now,
    }
    ledger.check_schema()
    counted: dict[str, int] = {}
    try:
        with ledger.transaction() as cursor:
            for step in purge_steps():
                if dry_run:
                    cursor.execute(step.count_sql(), params)
                    row = cursor.fetchone()
                    counted[step.name] = int(row["n"]) if row else 0
                else:
                    cursor.execute(step.update_sql(), params)
                    counted[step.name] = int(cursor.rowcount)
    except psycopg2.Error as exc:
        # The first line only: a DETAIL line can quote the row, and the row is what is being purged.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LedgerError(f"purge failed, nothing was cleared: {first}") from None
    return PurgeCounts(
        params["phi_cutoff"],
        params["undecided_cutoff"],
        counted["identifiers"],
        counted["undecided"],
        counted["runs"],
        dry_run,
    )
