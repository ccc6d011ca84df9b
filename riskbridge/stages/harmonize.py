"""The harmonize stage: the minimum-data policy decides, for every new feature vector, to score it or skip it.

:func:`riskbridge.harmonize.features.decide` judges each vector by the feature spec and by the model package's
validated AUROC for the vector's modality pattern (read from the package without torch); the decision, its reasons
and the pattern go to ``features``. A skipped study is quarantined with its first reason's code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from riskbridge.harmonize.features import FeatureSpecError, decide
from riskbridge.ledger import Ledger, reason_code, record_quarantine
from riskbridge.stages.base import Cursor, PipelineError, Progress, StageContext
from riskbridge.stages.clinical import StoredVector, stored_vector

NAME = "harmonize"


def pending(ledger: Ledger, run_id: int) -> list[StoredVector]:
    """Feature vectors of the run the minimum-data policy has not judged yet."""
    with ledger.transaction() as cursor:
        cursor.execute("SELECT * FROM features WHERE run_id = %s AND decision IS NULL ORDER BY study_uid", (run_id,))
        return [stored_vector(row) for row in cursor.fetchall()]


def record(
    ledger: Ledger,
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
    with ledger.transaction() as cursor:
        cursor.execute(
            """UPDATE features SET decision = %s, reasons = %s, pattern = %s, pattern_auroc = %s
               WHERE run_id = %s AND study_uid = %s AND decision IS NULL""",
            ("score" if score else "skip", list(reasons), pattern, pattern_auroc, run_id, study_uid),
        )
        if cursor.rowcount and not score:
            record_quarantine(
                cursor, run_id, study_uid, NAME, reason_code(reasons[0]) if reasons else "skipped", "; ".join(reasons)
            )


def work(context: StageContext, run_id: int, items: Sequence[str] | None, progress: Progress | None) -> Counter[str]:
    """Apply the minimum-data policy to every new feature vector: score it, or skip it with its reasons. The
    policy judges each vector's modality pattern by the model package's validated AUROC for it; the pattern is
    recorded with the decision."""
    counts: Counter[str] = Counter()
    ledger = context.ledger
    vectors = pending(ledger, run_id)
    if not vectors:
        return counts  # a rerun with nothing to decide does not read the package
    spec = context.spec
    package = context.package_info()
    if package.feature_spec != spec.label:  # its pattern table says nothing about this spec's vectors
        raise PipelineError(
            f"model package {package.label} was trained on feature spec {package.feature_spec}, "
            f"the pipeline builds {spec.label} (settings feature_spec, run.model_package)"
        )
    patterns = package.validated_patterns
    # The run names the package whose table decided, also when the policy lets nothing through to score.
    ledger.set_model(run_id, package.label)
    for done, stored in enumerate(vectors, start=1):
        try:
            # Only retrieved studies reach the clinical stage, so the image is there.
            decision = decide(spec, stored.vector, image_available=True, patterns=patterns)
        except FeatureSpecError:
            record(
                ledger, run_id, stored.study_uid, False, [f"feature_spec_mismatch:{stored.vector.spec}!={spec.label}"]
            )
            counts["skipped"] += 1
        else:
            record(
                ledger,
                run_id,
                stored.study_uid,
                decision.score,
                decision.reasons,
                pattern=decision.pattern,
                pattern_auroc=decision.pattern_auroc,
            )
            counts["done" if decision.score else "skipped"] += 1
        if progress:
            progress(done, len(vectors))
    return counts


def counts(cursor: Cursor, run_id: int) -> Counter[str]:
    """Vectors let through to scoring (done) and skipped by the policy (skipped)."""
    cursor.execute("SELECT decision, count(*) AS n FROM features WHERE run_id = %s GROUP BY 1", (run_id,))
    found: Counter[str] = Counter()
    for row in cursor.fetchall():
        if row["decision"] == "score":
            found["done"] += int(row["n"])
        elif row["decision"] == "skip":
            found["skipped"] += int(row["n"])
    return found
