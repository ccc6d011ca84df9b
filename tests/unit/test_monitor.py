"""riskbridge.monitor without servers: the thresholds from settings, the package's reference AUROC, the text lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from riskbridge.model.drift import DriftThresholds, feature_drift, outcome_performance
from riskbridge.monitor import MonitorResult, _reference_auroc, thresholds_of
from riskbridge.settings import MonitorSettings


def test_thresholds_come_from_the_monitor_settings() -> None:
    settings = MonitorSettings(psi_alert=0.3, p_alert=0.01, min_current=12)
    thresholds = thresholds_of(settings)
    assert isinstance(thresholds, DriftThresholds)
    assert (thresholds.psi_alert, thresholds.p_alert, thresholds.min_current) == (0.3, 0.01, 12)
    assert thresholds.psi_warn == settings.psi_warn == DriftThresholds().psi_warn


def test_the_reference_auroc_is_the_cross_validated_one_else_the_calibration_splits() -> None:
    block = {"metrics": {"auroc": {"value": 0.81, "low": 0.7, "high": 0.9}}}
    assert _reference_auroc({"cross_validation": block, "calibration_split": {"metrics": {}}}) == 0.81
    assert _reference_auroc({"calibration_split": block}) == 0.81
    assert _reference_auroc({}) is None


def test_the_lines_name_each_comparison_with_its_status_and_never_an_identifier(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(200, 1))
    current = rng.normal(3.0, 1.0, size=(40, 1))
    drifts = feature_drift(["crp"], reference, np.ones_like(reference, bool), current, np.ones_like(current, bool))
    labels = rng.integers(0, 2, size=40)
    performance = outcome_performance(rng.uniform(size=40), labels, 0.8)
    result = MonitorResult(tmp_path / "monitor.html", 40, 40, {"positive": 20, "no_follow_up": 3}, drifts,
                           performance, ["value drift of crp: ..."])  # fmt: skip
    lines = result.lines()
    assert lines[0] == "studies scored in the window: 40; labelled in the outcome window: 40"
    assert lines[1] == "labels: no_follow_up 3, positive 20"
    assert lines[2].split()[:3] == ["alert", "value", "crp"] and lines[3].split()[:3] == ["ok", "missing", "crp"]
    assert lines[4].startswith(f"{performance.status:8} outcomes n=40") and "AUROC" in lines[4]
    assert lines[-1] == f"page: {tmp_path / 'monitor.html'}"
