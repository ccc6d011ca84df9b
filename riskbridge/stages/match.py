"""The match stage: each discovered study's PACS patient linked to one FHIR Patient, or quarantined with the reason.

:func:`riskbridge.harmonize.identity.match_studies` decides (a PACS patient with several studies is matched once)
against the FHIR server's Patients, reached through :func:`fhir_patient_directory`. A patient left unmatched whose
STUDY-level C-FIND gave no other identifiers (a strict PACS returns no OtherPatientIDsSequence) is matched again
with the identifiers of a sampled instance's header, as ``[pacs] header_sampling`` allows
(:class:`riskbridge.connectors.sampling.HeaderSampler`). The decision, its reasons and candidates, and whether a
sampled header gave the identifiers, are recorded in ``identity_decisions``; a conflict, no match or a match that
needs review takes the study out of the run. Once decided, the study's PACS name and birth date are cleared from
the ledger.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from riskbridge.connectors.fhir import FhirClient, FhirError
from riskbridge.connectors.sampling import HeaderSampler
from riskbridge.harmonize.identity import (
    IdentityConfig,
    IdentityMatch,
    Outcome,
    PatientDirectory,
    PatientResource,
    match_patient,
    match_studies,
)
from riskbridge.ledger import Ledger, record_quarantine
from riskbridge.records import PacsPatient, StudyRef
from riskbridge.stages.base import Cursor, Progress, StageContext

NAME = "match"
IDENTITY_QUARANTINE = {
    Outcome.CONFLICT: "identity_conflict",
    Outcome.UNMATCHED: "identity_unmatched",
    Outcome.NEEDS_REVIEW: "identity_needs_review",
}


def fhir_patient_directory(client: FhirClient, birth_date_search: bool = False) -> PatientDirectory:
    """The identity module's view of a FHIR server: Patients by identifier, by id (None when gone), by birth date."""

    def by_identifier(system: str, value: str) -> list[PatientResource]:
        return list(client.search("Patient", {"identifier": f"{system}|{value}"}))

    def read(patient_id: str) -> PatientResource | None:
        try:
            return client.read("Patient", patient_id)
        except FhirError as exc:
            if exc.status in (404, 410):
                return None
            raise

    def by_birth_date(day: str) -> list[PatientResource]:
        return list(client.search("Patient", {"birthdate": day}))

    return PatientDirectory(by_identifier, read, by_birth_date if birth_date_search else None)


def pending(ledger: Ledger, run_id: int) -> list[StudyRef]:
    """Studies of the run without an identity decision, with the PACS patient (matching needs its PHI)."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """SELECT s.* FROM studies s
               LEFT JOIN identity_decisions d USING (run_id, study_uid)
               WHERE s.run_id = %s AND d.study_uid IS NULL ORDER BY s.study_uid""",
            (run_id,),
        )
        rows = cursor.fetchall()
    return [study_ref(row) for row in rows]


def study_ref(row: Mapping[str, Any]) -> StudyRef:
    """The :class:`StudyRef` of a ``studies`` row of the ledger, with its PACS patient."""
    patient = PacsPatient(
        patient_id=row["patient_id"],
        issuer=row["patient_issuer"],
        other_ids=tuple((str(pair[0]), pair[1]) for pair in row["patient_other_ids"]),
        name=row["patient_name"] or "",
        birth_date=row["patient_birth_date"],
        sex=row["patient_sex"],
    )
    return StudyRef(
        study_uid=row["study_uid"],
        accession=row["accession"],
        patient=patient,
        study_datetime=datetime.fromisoformat(row["study_datetime"]) if row["study_datetime"] else None,
        timezone_offset=row["timezone_offset"],
        modalities=tuple(row["modalities"]),
        description=row["description"],
        instance_count=row["instance_count"],
    )


def record(
    ledger: Ledger,
    run_id: int,
    study_uid: str,
    outcome: str,
    fhir_patient_id: str | None,
    reasons: Sequence[str],
    candidate_ids: Sequence[str] = (),
    score: float | None = None,
    quarantine_reason: str | None = None,
    from_sampled_header: bool = False,
) -> None:
    """Record a study's identity decision (first one wins), quarantine it unless matched, and clear the PACS
    name and birth date, which nothing needs any more."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """INSERT INTO identity_decisions (run_id, study_uid, outcome, fhir_patient_id, reasons,
                   candidate_ids, score, from_sampled_header) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT DO NOTHING""",
            (run_id, study_uid, outcome, fhir_patient_id, list(reasons), list(candidate_ids), score,
             from_sampled_header),
        )  # fmt: skip
        if cursor.rowcount and quarantine_reason is not None:
            record_quarantine(cursor, run_id, study_uid, NAME, quarantine_reason, ", ".join(reasons))
        cursor.execute(
            """UPDATE studies SET patient_name = NULL, patient_birth_date = NULL
               WHERE run_id = %s AND study_uid = %s""",
            (run_id, study_uid),
        )


def identities(ledger: Ledger, run_id: int) -> dict[str, tuple[str, str | None]]:
    """StudyInstanceUID -> (outcome, FHIR Patient id) for every decided study of the run."""
    with ledger.transaction() as cursor:
        cursor.execute(
            "SELECT study_uid, outcome, fhir_patient_id FROM identity_decisions WHERE run_id = %s", (run_id,)
        )
        return {r["study_uid"]: (r["outcome"], r["fhir_patient_id"]) for r in cursor.fetchall()}


def _from_sampled_header(
    sampler: HeaderSampler, study: StudyRef, directory: PatientDirectory, config: IdentityConfig
) -> IdentityMatch | None:
    """The match with the identifiers of a sampled header of the study, when the STUDY-level C-FIND gave no other
    identifiers and the header adds some; None when sampling is not allowed or adds nothing."""
    if study.patient.other_ids:
        return None
    sampled = sampler.study_patient(study.study_uid)
    if sampled is None or sampled.patient_id != study.patient.patient_id:
        return None  # the header names another patient: the C-FIND's identity stands
    if not sampled.other_ids and (sampled.issuer is None or study.patient.issuer is not None):
        return None
    patient = replace(study.patient, other_ids=sampled.other_ids, issuer=study.patient.issuer or sampled.issuer)
    return match_patient(patient, directory, config)


def work(context: StageContext, run_id: int, items: Sequence[str] | None, progress: Progress | None) -> Counter[str]:
    """Link each undecided study's PACS patient to a FHIR Patient (again with a sampled header's identifiers when
    the C-FIND gave none and nothing matched); quarantine conflict/unmatched/needs-review."""
    counts: Counter[str] = Counter()
    ledger = context.ledger
    studies = pending(ledger, run_id)
    if not studies:
        return counts
    settings = context.settings
    config = IdentityConfig.from_settings(settings.identity)
    directory = fhir_patient_directory(context.fhir(), config.fallback.enabled)
    by_patient: dict[PacsPatient, list[StudyRef]] = defaultdict(list)
    for study in studies:
        by_patient[study.patient].append(study)
    by_uid = {study.study_uid: study for study in studies}
    done = 0
    pacs = settings.pacs
    with HeaderSampler(pacs, settings.staging_dir, pacs.header_sampling, pacs.header_sample_limit) as sampler:
        for patient_studies in by_patient.values():
            for study_uid, decision in match_studies(patient_studies, directory, config).items():
                sampled = None
                if decision.outcome == Outcome.UNMATCHED and pacs.header_sampling != "off":
                    sampled = _from_sampled_header(sampler, by_uid[study_uid], directory, config)
                final = sampled if sampled is not None else decision
                quarantine = IDENTITY_QUARANTINE.get(final.outcome)
                record(
                    ledger,
                    run_id,
                    study_uid,
                    final.outcome.value,
                    final.fhir_patient_id,
                    [reason.value for reason in final.reasons],
                    final.candidate_ids,
                    final.score,
                    quarantine,
                    from_sampled_header=sampled is not None,
                )
                counts["quarantined" if quarantine else "done"] += 1
                done += 1
                if progress:
                    progress(done, len(studies))
    return counts


def counts(cursor: Cursor, run_id: int) -> Counter[str]:
    """Studies matched (done) and quarantined by their identity decision."""
    cursor.execute(
        "SELECT outcome, count(*) AS n FROM identity_decisions WHERE run_id = %s GROUP BY outcome", (run_id,)
    )
    found: Counter[str] = Counter()
    for row in cursor.fetchall():
        found["done" if row["outcome"] == "matched" else "quarantined"] += int(row["n"])
    return found
