"""The discover stage: the run's CT studies, found by STUDY-level C-FIND over its window, accessions or patient ids.

Once per run (a mark in ``stage_marks``): a run's scope never changes, so a rerun finds nothing new to add. A window
is queried by the site days it touches, then each study is kept only when its time (with the site zone when the
PACS gives no offset) falls in the window; a study without a time is kept on its date. Each study is written to
``studies`` with its PACS patient, which the match stage needs and then clears.

Decided work is skipped: a study that an earlier run scored and wrote back with the same model (name and version,
which key its RiskAssessment) goes to ``already_done`` instead (counted as skipped), so no later stage retrieves,
fetches or scores it; ``--rescore`` (the run's ``rescore``) keeps it. Every other study is kept, a quarantined one
too (its labs or identity may have arrived since), marked with the latest earlier run that found it; a study new to
the ledger whose time lies before a nightly run's watermark is a late arrival (:func:`triage`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from riskbridge.connectors import query
from riskbridge.harmonize.windows import IndexTimeError, index_time_of_study, site_zone
from riskbridge.ledger import Ledger
from riskbridge.records import StudyRef
from riskbridge.stages.base import Cursor, Progress, StageContext

NAME = "discover"


def in_window(study: StudyRef, window: tuple[datetime, datetime], zone: str) -> bool:
    """True when the study's time falls in ``[start, end)``; a study without a time is kept (the PACS matched its
    StudyDate, and the day is all that is known)."""
    try:
        moment = index_time_of_study(study, zone).moment
    except IndexTimeError:
        return True
    return window[0] <= moment < window[1]


@dataclass(frozen=True)
class Prior:
    """What earlier runs decided about a study: the run whose score of the current model was written back (and the
    RiskAssessment key), and the latest earlier run that discovered it at all."""

    scored_run: int | None = None
    assessment_key: str | None = None
    earlier_run: int | None = None


@dataclass(frozen=True)
class Found:
    """A discovered study the run works on: the latest earlier run that found it, and whether it arrived late."""

    study: StudyRef
    earlier_run: int | None = None
    late_arrival: bool = False


@dataclass(frozen=True)
class Triage:
    """Discovered studies sorted out: those the run works on, and those already done (uid -> their Prior)."""

    work: list[Found] = field(default_factory=list)
    done: dict[str, Prior] = field(default_factory=dict)


def triage(
    studies: Iterable[StudyRef],
    priors: Mapping[str, Prior],
    watermark: datetime | None,
    zone: str,
    rescore: bool = False,
) -> Triage:
    """Sort discovered studies: already done (scored and written back with the current model by an earlier run,
    unless ``rescore``) or to work on; a study new to the ledger whose time is before ``watermark`` is a late
    arrival (a study without a usable time never is: its day is all that is known)."""
    sorted_out = Triage()
    for study in studies:
        prior = priors.get(study.study_uid, Prior())
        if prior.scored_run is not None and not rescore:
            sorted_out.done[study.study_uid] = prior
            continue
        late = False
        if watermark is not None and prior.earlier_run is None:
            try:
                late = index_time_of_study(study, zone).moment < watermark
            except IndexTimeError:
                late = False
        sorted_out.work.append(Found(study, prior.earlier_run, late))
    return sorted_out


def priors(cursor: Cursor, run_id: int, study_uids: Sequence[str], model: tuple[str, str] | None) -> dict[str, Prior]:
    """What runs other than ``run_id`` decided about these studies; ``model`` is the (name, version) whose written
    scores count as done (None: none do, e.g. ``--rescore``)."""
    scored: dict[str, tuple[int, str]] = {}
    if model is not None:
        cursor.execute(
            """SELECT DISTINCT ON (s.study_uid) s.study_uid, s.run_id, s.assessment_key
               FROM scores s JOIN writebacks w USING (assessment_key)
               WHERE s.study_uid = ANY(%s) AND s.model_name = %s AND s.model_version = %s AND s.run_id <> %s
                   AND w.status IN ('created', 'exists')
               ORDER BY s.study_uid, s.run_id DESC""",
            (list(study_uids), model[0], model[1], run_id),
        )
        scored = {r["study_uid"]: (int(r["run_id"]), r["assessment_key"]) for r in cursor.fetchall()}
    cursor.execute(
        """SELECT study_uid, max(run_id) AS run_id FROM studies WHERE study_uid = ANY(%s) AND run_id <> %s
           GROUP BY study_uid""",
        (list(study_uids), run_id),
    )
    earlier = {r["study_uid"]: int(r["run_id"]) for r in cursor.fetchall()}
    found: dict[str, Prior] = {}
    for uid in set(scored) | set(earlier):
        scored_run, key = scored.get(uid, (None, None))
        found[uid] = Prior(scored_run, key, earlier.get(uid))
    return found


def record_done(ledger: Ledger, run_id: int, done: Mapping[str, Prior], model: str) -> int:
    """Record studies already done by an earlier run (``model``: "name version"); return how many are new."""
    added = 0
    with ledger.transaction() as cursor:
        for study_uid, prior in sorted(done.items()):
            cursor.execute(
                """INSERT INTO already_done (run_id, study_uid, scored_run, assessment_key, model)
                   VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                (run_id, study_uid, prior.scored_run, prior.assessment_key, model),
            )
            added += cursor.rowcount
    return added


def add_studies(ledger: Ledger, run_id: int, studies: Iterable[StudyRef | Found]) -> int:
    """Record discovered studies (a study already recorded for the run is left as it is); return how many new."""
    added = 0
    with ledger.transaction() as cursor:
        for item in studies:
            found = item if isinstance(item, Found) else Found(item)
            study = found.study
            patient = study.patient
            cursor.execute(
                """INSERT INTO studies (run_id, study_uid, accession, patient_id, patient_issuer,
                       patient_other_ids, patient_name, patient_birth_date, patient_sex, study_datetime,
                       timezone_offset, modalities, description, instance_count, earlier_run, late_arrival)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
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
                    found.earlier_run,
                    found.late_arrival,
                ),
            )
            added += cursor.rowcount
    return added


def study_uids(ledger: Ledger, run_id: int) -> list[str]:
    """Every StudyInstanceUID discovered in the run."""
    with ledger.transaction() as cursor:
        cursor.execute("SELECT study_uid FROM studies WHERE run_id = %s ORDER BY study_uid", (run_id,))
        return [r["study_uid"] for r in cursor.fetchall()]


def work(context: StageContext, run_id: int, items: Sequence[str] | None, progress: Progress | None) -> Counter[str]:
    """Find the run's CT studies (STUDY-level C-FIND by window, accession or patient id), recording those an earlier
    run already scored and wrote back with the current model as done (skipped); once per run."""
    counts: Counter[str] = Counter()
    ledger = context.ledger
    if ledger.stage_marked(run_id, NAME):
        return counts
    run = ledger.run(run_id)
    pacs = context.settings.pacs
    found: dict[str, StudyRef] = {}
    queries: list[dict[str, Any]] = []
    if run.window is not None:
        tz = site_zone(context.zone)
        first = run.window[0].astimezone(tz).date()
        last = (run.window[1] - timedelta(microseconds=1)).astimezone(tz).date()
        queries.append({"study_date": (first, last)})
    queries += [{"accession": accession} for accession in run.accessions]
    queries += [{"patient_id": patient_id} for patient_id in run.patient_ids]
    for done, arguments in enumerate(queries, start=1):
        for study in query.find_studies(pacs, timeout_s=pacs.timeout_s, **arguments):
            if "study_date" in arguments and run.window is not None and not in_window(study, run.window, context.zone):
                continue
            found.setdefault(study.study_uid, study)
        if progress:
            progress(done, len(queries))
    model = None
    if found and not run.rescore:
        package = context.package_info()
        model = (package.name, package.version)
    with ledger.transaction() as cursor:
        known = priors(cursor, run_id, sorted(found), model) if found else {}
    zone = context.zone if run.watermark is not None else "UTC"  # only a nightly run's late arrivals need it
    sorted_out = triage(found.values(), known, run.watermark, zone, run.rescore)
    counts["skipped"] = record_done(ledger, run_id, sorted_out.done, " ".join(model or ()))
    counts["done"] = add_studies(ledger, run_id, sorted_out.work)
    ledger.mark_stage(run_id, NAME)
    return counts


def counts(cursor: Cursor, run_id: int) -> Counter[str]:
    """Studies discovered in the run (done) and studies an earlier run had already done (skipped)."""
    cursor.execute(
        """SELECT (SELECT count(*) FROM studies WHERE run_id = %s) AS done,
                  (SELECT count(*) FROM already_done WHERE run_id = %s) AS skipped""",
        (run_id, run_id),
    )
    row = cursor.fetchone()
    return Counter(done=int(row["done"]), skipped=int(row["skipped"]))
