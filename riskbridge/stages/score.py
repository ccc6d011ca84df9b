"""The score stage: every study the policy let through is scored by the model package, in batches.

The :class:`riskbridge.model.scoring.Scorer` (loaded and verified once per pipeline; torch is imported only when
there is something to score) turns each staged series and feature vector into a calibrated probability and the
per-modality attention. Each score is recorded with its model (name, version, sha256), its qualitative risk and the
key of the RiskAssessment the write-back will create; a study the model cannot score is quarantined
``scoring_error``. Scores are recorded per chunk of :data:`SCORE_CHUNK`, so a crash loses at most one chunk's work.

Shadow scoring: with ``[run] shadow_package``, every study the active model scored is scored again by the candidate
(:func:`score_shadow`) into ``shadow_scores``, which the write-back never reads; the report compares the two.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from riskbridge.ledger import Ledger
from riskbridge.stages.base import Cursor, Progress, StageContext
from riskbridge.stages.clinical import StoredVector, stored_vector
from riskbridge.stages.write_back import assessment_key, qualitative_risk

NAME = "score"
# Scores recorded per scoring call: a crash loses at most this many studies' work.
SCORE_CHUNK = 64


@dataclass(frozen=True)
class ScoreTask:
    """A study the minimum-data policy lets through, with its staged series and vector."""

    stored: StoredVector
    series_uid: str
    series_dir: Path
    index_time: datetime


def pending(ledger: Ledger, run_id: int) -> list[ScoreTask]:
    """Studies to score (decision ``score``, not scored, not quarantined), with their series and vector."""
    with ledger.transaction() as cursor:
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
            ScoreTask(stored_vector(row), row["series_uid"], Path(row["path"]), row["index_time"])
            for row in cursor.fetchall()
        ]


def record(
    ledger: Ledger,
    run_id: int,
    study_uid: str,
    fhir_patient_id: str,
    model: tuple[str, str, str],
    probability: float,
    raw_probability: float,
    risk: str,
    attention: Mapping[str, float],
    key: str,
    scored_at: datetime,
) -> None:
    """Record a study's score (first one wins); ``model`` is (name, version, sha256), ``key`` the RiskAssessment's
    identifier."""
    with ledger.transaction() as cursor:
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
                key,
                scored_at,
            ),
        )


def shadow_pending(ledger: Ledger, run_id: int, sha256: str) -> list[ScoreTask]:
    """Studies of the run the active model scored and the candidate ``sha256`` has not, with series and vector."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """SELECT f.*, r.series_uid, r.path, r.index_time FROM scores s
               JOIN features f USING (run_id, study_uid) JOIN retrievals r USING (run_id, study_uid)
               LEFT JOIN shadow_scores h ON h.run_id = s.run_id AND h.study_uid = s.study_uid AND h.model_sha256 = %s
               WHERE s.run_id = %s AND h.study_uid IS NULL ORDER BY s.study_uid""",
            (sha256, run_id),
        )
        return [
            ScoreTask(stored_vector(row), row["series_uid"], Path(row["path"]), row["index_time"])
            for row in cursor.fetchall()
        ]


def record_shadow(
    ledger: Ledger,
    run_id: int,
    study_uid: str,
    model: tuple[str, str, str],
    probability: float | None,
    raw_probability: float | None,
    risk: str | None,
    error: str | None = None,
) -> None:
    """Record the candidate's score of a study (or why it could not score it); first one wins."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """INSERT INTO shadow_scores (run_id, study_uid, model_name, model_version, model_sha256, probability,
                   raw_probability, risk, error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
            (run_id, study_uid, *model, probability, raw_probability, risk, error),
        )


def score_shadow(context: StageContext, run_id: int) -> int:
    """Score with the candidate (``[run] shadow_package``) every study of the run the active model scored and the
    candidate has not; return how many it handled (0 without a candidate). Its failures are recorded, never
    quarantined: the active model's score stands."""
    package = context.settings.run.shadow_package
    if package is None:
        return 0
    from riskbridge.model.package import read_package_info

    sha256 = read_package_info(package, context.settings.run.shadow_sha256).sha256
    tasks = shadow_pending(context.ledger, run_id, sha256)
    if not tasks:
        return 0
    from riskbridge.model.scoring import ScoreRequest

    scorer = context.shadow_scorer()
    assert scorer is not None  # a package is set
    model = (scorer.model_name, scorer.model_version, scorer.sha256)
    writeback = context.settings.writeback
    thresholds = (writeback.low_below, writeback.high_from)
    for start in range(0, len(tasks), SCORE_CHUNK):
        chunk = tasks[start : start + SCORE_CHUNK]
        requests = [
            ScoreRequest(
                key=t.stored.study_uid, series_dir=t.series_dir, series_uid=t.series_uid, vector=t.stored.vector
            )
            for t in chunk
        ]
        results, failures = scorer.score_with_failures(requests)
        for result in results:
            risk = qualitative_risk(result.probability, thresholds)[0]
            record_shadow(context.ledger, run_id, result.key, model, result.probability, result.raw_probability, risk)
        for key, reason in failures.items():
            record_shadow(context.ledger, run_id, key, model, None, None, None, reason)
    return len(tasks)


def work(context: StageContext, run_id: int, items: Sequence[str] | None, progress: Progress | None) -> Counter[str]:
    """Score every study the policy let through, in batches; a study the model cannot score is quarantined. Then
    the candidate in shadow, when one is set."""
    counts = _score_active(context, run_id, progress)
    score_shadow(context, run_id)
    return counts


def _score_active(context: StageContext, run_id: int, progress: Progress | None) -> Counter[str]:
    counts: Counter[str] = Counter()
    ledger = context.ledger
    tasks = pending(ledger, run_id)
    if not tasks:
        return counts  # before importing torch: a rerun with nothing to score stays fast
    from riskbridge.model.scoring import ScoreRequest

    scorer = context.scorer()
    model = (scorer.model_name, scorer.model_version, scorer.sha256)
    ledger.set_model(run_id, f"{scorer.model_name} {scorer.model_version} {scorer.sha256[:12]}")
    writeback = context.settings.writeback
    thresholds = (writeback.low_below, writeback.high_from)
    done = 0
    for start in range(0, len(tasks), SCORE_CHUNK):
        chunk = {task.stored.study_uid: task for task in tasks[start : start + SCORE_CHUNK]}
        requests = [
            ScoreRequest(key=uid, series_dir=task.series_dir, series_uid=task.series_uid, vector=task.stored.vector)
            for uid, task in chunk.items()
        ]
        results, failures = scorer.score_with_failures(requests)
        scored_at = datetime.now(UTC).replace(microsecond=0)
        for result in results:
            patient = chunk[result.key].stored.fhir_patient_id
            record(
                ledger,
                run_id,
                result.key,
                patient,
                model,
                result.probability,
                result.raw_probability,
                qualitative_risk(result.probability, thresholds)[0],
                result.attention,
                assessment_key(scorer.model_version, patient, result.key),
                scored_at,
            )
            counts["done"] += 1
        for key, reason in failures.items():
            ledger.quarantine(run_id, key, NAME, "scoring_error", reason)
            counts["failed"] += 1
        done += len(chunk)
        if progress:
            progress(done, len(tasks))
    return counts


def counts(cursor: Cursor, run_id: int) -> Counter[str]:
    """Studies scored (done) and those the model could not score (failed)."""
    cursor.execute("SELECT count(*) AS n FROM scores WHERE run_id = %s", (run_id,))
    found = Counter(done=int(cursor.fetchone()["n"]))
    cursor.execute("SELECT count(*) AS n FROM quarantine WHERE run_id = %s AND stage = %s", (run_id, NAME))
    found["failed"] = int(cursor.fetchone()["n"])
    return found
