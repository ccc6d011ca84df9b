"""The discover stage: the run's CT studies, found by STUDY-level C-FIND over its window, accessions or patient ids.

Once per run (a mark in ``stage_marks``): a run's scope never changes, so a rerun finds nothing new to add. A window
is queried by the site days it touches, then each study is kept only when its time (with the site zone when the
PACS gives no offset) falls in the window; a study without a time is kept on its date. Each study is written to
``studies`` with its PACS patient, which the match stage needs and then clears.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
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


def add_studies(ledger: Ledger, run_id: int, studies: Iterable[StudyRef]) -> int:
    """Record discovered studies (a study already recorded for the run is left as it is); return how many new."""
    added = 0
    with ledger.transaction() as cursor:
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


def study_uids(ledger: Ledger, run_id: int) -> list[str]:
    """Every StudyInstanceUID discovered in the run."""
    with ledger.transaction() as cursor:
        cursor.execute("SELECT study_uid FROM studies WHERE run_id = %s ORDER BY study_uid", (run_id,))
        return [r["study_uid"] for r in cursor.fetchall()]


def work(context: StageContext, run_id: int, items: Sequence[str] | None, progress: Progress | None) -> Counter[str]:
    """Find the run's CT studies (STUDY-level C-FIND by window, accession or patient id); once per run."""
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
    counts["done"] = add_studies(ledger, run_id, found.values())
    ledger.mark_stage(run_id, NAME)
    return counts


def counts(cursor: Cursor, run_id: int) -> Counter[str]:
    """Studies discovered in the run."""
    cursor.execute("SELECT count(*) AS n FROM studies WHERE run_id = %s", (run_id,))
    return Counter(done=int(cursor.fetchone()["n"]))
