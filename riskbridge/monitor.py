"""Monitoring: does the active model still fit the site's patients? (docs/site-training.md "Monitoring").

``riskbridge monitor --window A..B`` and the weekly ``riskbridge_monitor`` DAG compare the studies the active model
scored with an index time in the window against what the model was trained on, and judge its past scores against
the outcomes that have arrived since:

- **drift**: each lab's observed values (PSI and KS against the training table's), each feature's missing share,
  the modality patterns (image+labs+notes, ...) and the score distribution (against the calibration split's scores
  the package carries, :mod:`riskbridge.model.train`);
- **outcomes**: the studies of the outcome window (by default the same) are labelled from the FHIR server with the
  export's label spec (:mod:`riskbridge.harmonize.labels`, resources through Bulk Data ``$export`` or searches, as
  :func:`riskbridge.cohort.fetch_label_resources` reads them); AUROC and calibration of the model's scores on the
  labelled ones, against the package's own cross-validated AUROC.

The statistics and their thresholds (``[monitor]`` settings) are :mod:`riskbridge.model.drift`; the HTML page with
its plots is :mod:`riskbridge.model.drift_report`. Anything above an alert threshold is an alert: the CLI exits 1 and
the DAG's task fails with the alerts as its message. Nothing identifying is logged or shown: counts, codes, values.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from riskbridge.cohort import fetch_label_resources, label_resource_types
from riskbridge.coverage import Interval
from riskbridge.errors import ConfigurationError
from riskbridge.harmonize.features import FeatureSpec, FeatureVector, modality_pattern
from riskbridge.harmonize.labels import label_patient, load_label_spec
from riskbridge.ledger import Ledger
from riskbridge.pipeline import Pipeline
from riskbridge.settings import MonitorSettings, Settings
from riskbridge.stages.clinical import feature_vector_of

__all__ = ["MonitorResult", "ScoredStudy", "monitor", "scored_studies", "thresholds_of"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredStudy:
    """A study the model scored: its latest score of that model, its feature vector and its index time."""

    study_uid: str
    fhir_patient_id: str
    index_time: datetime
    probability: float
    vector: FeatureVector


@dataclass(frozen=True)
class MonitorResult:
    """What a monitoring run found: the page, the drifts, the outcome performance (None: no labelled study) and
    the alerts (empty: all within thresholds)."""

    page: Path
    scored: int
    labelled: int
    label_reasons: Mapping[str, int]
    drifts: Sequence[Any]  # riskbridge.model.drift.Drift
    performance: Any | None  # riskbridge.model.drift.Performance
    alerts: Sequence[str]

    def lines(self) -> list[str]:
        """The result as text lines for a terminal or a task log (statuses and numbers, nothing identifying)."""
        out = [f"studies scored in the window: {self.scored}; labelled in the outcome window: {self.labelled}"]
        if self.label_reasons:
            out.append("labels: " + ", ".join(f"{k} {v}" for k, v in sorted(self.label_reasons.items())))
        for drift in self.drifts:
            psi = "-" if drift.psi is None else f"{drift.psi:.3f}"
            out.append(f"{drift.status:8} {drift.kind:8} {drift.name:24} PSI {psi:>6}  {drift.detail}")
        if self.performance is not None:
            perf = self.performance
            auroc = "-" if perf.auroc is None else f"{perf.auroc.value:.3f}"
            ece = "-" if perf.ece is None else f"{perf.ece:.3f}"
            out.append(f"{perf.status:8} outcomes n={perf.n} positives={perf.positives} AUROC {auroc} ECE {ece}")
        out.append(f"page: {self.page}")
        return out


def thresholds_of(settings: MonitorSettings) -> Any:
    """The drift thresholds of the ``[monitor]`` settings (a :class:`riskbridge.model.drift.DriftThresholds`)."""
    from riskbridge.model.drift import DriftThresholds

    return DriftThresholds(
        psi_warn=settings.psi_warn,
        psi_alert=settings.psi_alert,
        p_alert=settings.p_alert,
        missing_share_alert=settings.missing_share_alert,
        auroc_drop_alert=settings.auroc_drop_alert,
        ece_alert=settings.ece_alert,
        min_current=settings.min_current,
    )


def scored_studies(ledger: Ledger, window: tuple[datetime, datetime], model_sha256: str) -> list[ScoredStudy]:
    """The studies with an index time in ``window`` that the model ``model_sha256`` scored, each with its latest
    score (a study scored by several runs counts once), by index time."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """SELECT DISTINCT ON (s.study_uid) s.study_uid, s.fhir_patient_id, s.probability, r.index_time,
                      f.spec, f.names, f.feature_values, f.observed
               FROM scores s JOIN features f USING (run_id, study_uid) JOIN retrievals r USING (run_id, study_uid)
               WHERE s.model_sha256 = %s AND r.index_time >= %s AND r.index_time < %s
               ORDER BY s.study_uid, s.scored_at DESC, s.run_id DESC""",
            (model_sha256, window[0], window[1]),
        )
        rows = cursor.fetchall()
    found = [
        ScoredStudy(
            row["study_uid"],
            row["fhir_patient_id"],
            row["index_time"],
            float(row["probability"]),
            feature_vector_of(row),
        )
        for row in rows
    ]
    return sorted(found, key=lambda study: (study.index_time, study.study_uid))


def _arrays(vectors: Sequence[FeatureVector], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([v.values for v in vectors], dtype=np.float64).reshape(len(vectors), len(names))
    observed = np.array([v.observed for v in vectors], dtype=bool).reshape(len(vectors), len(names))
    return values, observed


def _reference_auroc(metrics: Mapping[str, Any]) -> float | None:
    """The package's own AUROC: cross-validated when it has one, else its calibration split's."""
    for block in ("cross_validation", "calibration_split"):
        value = metrics.get(block, {}).get("metrics", {}).get("auroc", {}).get("value")
        if isinstance(value, int | float):
            return float(value)
    return None


def _label_studies(
    pipeline: Pipeline, studies: Sequence[ScoredStudy], job: str
) -> tuple[list[tuple[float, int]], Counter[str]]:
    """(probability, label) of the studies whose patient has a label now, and how many got each label reason.
    One study per patient (the first of the window), as the training table has."""
    settings = pipeline.settings
    zone = settings.site.timezone
    if zone is None:
        raise ConfigurationError("set site.timezone (RISKBRIDGE_SITE__TIMEZONE): labels are judged in site time")
    spec = load_label_spec(settings.export.label_spec)
    first: dict[str, ScoredStudy] = {}
    for study in studies:
        first.setdefault(study.fhir_patient_id, study)
    resources, _ = fetch_label_resources(pipeline, job, first, label_resource_types(spec))
    reasons: Counter[str] = Counter()
    pairs: list[tuple[float, int]] = []
    for patient, study in first.items():
        decision = label_patient(spec, study.index_time, resources.get(patient, []), zone)
        reasons[decision.reason] += 1
        if not decision.excluded and decision.label is not None:
            pairs.append((study.probability, decision.label))
    return pairs, reasons


def monitor(
    settings: Settings,
    window: tuple[datetime, datetime],
    out_dir: Path,
    outcome_window: tuple[datetime, datetime] | None = None,
    table: Path | None = None,
) -> MonitorResult:
    """Compare the active model's scored studies of ``window`` with its training table (``table``, default
    ``[monitor] training_table``) and judge its scores of ``outcome_window`` (default ``window``) against the
    labels that have arrived; write the page into ``out_dir``. See the module docstring.

    Raises :class:`riskbridge.errors.ConfigurationError` without a training table or a site zone, and the training
    table's error for a table of another feature spec.
    """
    from riskbridge.model.data import table_vectors
    from riskbridge.model.drift import alerts, feature_drift, outcome_performance, pattern_drift, score_drift
    from riskbridge.model.drift_report import write_monitor_page

    table = table or settings.monitor.training_table
    if table is None:
        raise ConfigurationError(
            "set [monitor] training_table (RISKBRIDGE_MONITOR__TRAINING_TABLE) or pass --table: the active model's "
            "training table is the reference the site's patients are compared with"
        )
    thresholds = thresholds_of(settings.monitor)
    with Pipeline.from_settings(settings) as pipeline:
        spec: FeatureSpec = pipeline.context.spec
        package = pipeline.context.package_info()
        reference = table_vectors(Path(table), spec)
        current = [s for s in scored_studies(pipeline.ledger, window, package.sha256) if s.vector.spec == spec.label]
        names = spec.names
        ref_values, ref_observed = _arrays([v for v, _ in reference], names)
        cur_values, cur_observed = _arrays([s.vector for s in current], names)
        drifts = list(feature_drift(names, ref_values, ref_observed, cur_values, cur_observed, thresholds))
        drifts.append(
            pattern_drift(
                [modality_pattern(spec, vector, image) for vector, image in reference],
                [modality_pattern(spec, s.vector, True) for s in current],  # scored: the series was retrieved
                thresholds,
            )
        )
        score_reference = package.metrics.get("score_reference", {}).get("probabilities")
        probabilities = np.array([s.probability for s in current], dtype=np.float64)
        histograms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if score_reference:
            reference_scores = np.asarray(score_reference, dtype=np.float64)
            drifts.append(score_drift(reference_scores, probabilities, thresholds))
            histograms["score"] = (reference_scores, probabilities)
        for i, name in enumerate(names):
            if any(lab.name == name for lab in spec.labs):
                histograms[name] = (ref_values[ref_observed[:, i], i], cur_values[cur_observed[:, i], i])

        outcome_studies = (
            current
            if outcome_window is None or outcome_window == window
            else scored_studies(pipeline.ledger, outcome_window, package.sha256)
        )
        pairs, reasons = _label_studies(pipeline, outcome_studies, f"monitor-{Interval(*window).start:%Y%m%d}")
    performance = None
    if pairs:
        scores, labels = (np.array(column) for column in zip(*pairs, strict=True))
        performance = outcome_performance(scores, labels.astype(int), _reference_auroc(package.metrics), thresholds)
    found = alerts(drifts, performance)
    context = {
        "window (index time)": str(Interval(*window)),
        "outcome window": str(Interval(*(outcome_window or window))),
        "model": f"{package.name} {package.version} sha256 {package.sha256[:12]}",
        "training table": f"{Path(table).name} ({len(reference)} rows)",
        "studies scored": str(len(current)),
        "labelled": f"{len(pairs)} ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items())) or 'none'})",
        "score reference": "the package's calibration split" if score_reference else "none in the package",
    }
    page = write_monitor_page(
        Path(out_dir), f"riskbridge monitor {Interval(*window)}", drifts, performance, histograms, context
    )
    LOG.info("monitor %s: %d scored, %d labelled, %d alerts", Interval(*window), len(current), len(pairs), len(found))
    return MonitorResult(page, len(current), len(pairs), dict(reasons), drifts, performance, found)
