"""Drift statistics and the monitoring page (riskbridge.model.drift, riskbridge.model.drift_report)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from riskbridge.model.drift import (
    PATTERN_NAME,
    SCORE_NAME,
    Drift,
    DriftError,
    DriftThresholds,
    alerts,
    categorical_psi,
    feature_drift,
    outcome_performance,
    pattern_drift,
    psi,
    score_drift,
)
from riskbridge.model.drift_report import write_monitor_page

THRESHOLDS = DriftThresholds()


def test_psi_of_two_samples_of_one_distribution_is_near_zero() -> None:
    rng = np.random.default_rng(1)
    value = psi(rng.normal(size=2000), rng.normal(size=2000))
    # chance level is about (bins - 1) * (1/2000 + 1/2000) = 0.009
    assert 0.0 < value < 0.03
    same = rng.normal(size=500)
    assert psi(same, same) == pytest.approx(0.0, abs=1e-12)


def test_psi_of_a_mean_shifted_by_one_sd_is_major() -> None:
    rng = np.random.default_rng(2)
    value = psi(rng.normal(size=2000), rng.normal(loc=1.0, size=2000))
    assert value > 0.25
    assert value < 3.0  # about 1 for a one-SD shift, not an epsilon blow-up


def test_psi_bins_are_open_ended_and_collapse_on_ties() -> None:
    rng = np.random.default_rng(3)
    reference = rng.uniform(0.0, 1.0, size=1000)
    # everything beyond the reference's maximum falls into the last (open) bin: share 1 against 0.1
    assert psi(reference, np.full(100, 5.0)) > 2.0
    # a feature of two values gets two bins, not ten: PSI from those two shares only
    binary_ref = np.array([0.0] * 80 + [1.0] * 20)
    binary_cur = np.array([0.0] * 50 + [1.0] * 50)
    expected = (0.5 - 0.8) * math.log(0.5 / 0.8) + (0.5 - 0.2) * math.log(0.5 / 0.2)
    assert psi(binary_ref, binary_cur) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(DriftError):
        psi(reference, [])
    with pytest.raises(DriftError):
        psi(reference, [0.5, float("nan")])


def test_categorical_psi_over_the_union_of_categories() -> None:
    reference = ["image+labs+notes"] * 50 + ["image+labs"] * 50
    current = ["image+labs+notes"] * 80 + ["image+labs"] * 20
    expected = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert categorical_psi(reference, current) == pytest.approx(expected, rel=1e-9)
    assert categorical_psi(reference, list(reversed(reference))) == pytest.approx(0.0, abs=1e-12)
    # a category new in the current sample counts against an epsilon share in the reference
    with_new = ["image+labs+notes"] * 50 + ["image+labs"] * 30 + ["labs"] * 20
    new_only = (0.2 - 1e-4) * math.log(0.2 / 1e-4) + (0.3 - 0.5) * math.log(0.3 / 0.5)
    assert categorical_psi(reference, with_new) == pytest.approx(new_only, rel=1e-9)


def _features(
    rng: np.random.Generator, rows: int, observed_share: float, shift: float
) -> tuple[np.ndarray, np.ndarray]:
    """Two features: 'creatinine' (fixed values, ``observed_share`` observed) and 'hemoglobin' (shifted by
    ``shift``, always observed); unobserved entries hold an extreme imputed value."""
    observed = np.ones((rows, 2), dtype=bool)
    observed[int(rows * observed_share) :, 0] = False
    values = np.empty((rows, 2))
    base = np.linspace(0.5, 2.5, 100)
    values[:, 0] = np.resize(base, rows)
    values[~observed[:, 0], 0] = 999.0  # imputed: must never count
    values[:, 1] = rng.normal(loc=13.0 + shift, scale=1.5, size=rows)
    return values, observed


def test_feature_drift_excludes_imputed_values_and_alerts_on_missing_share() -> None:
    rng = np.random.default_rng(4)
    ref_values, ref_observed = _features(rng, 1000, observed_share=0.9, shift=0.0)
    cur_values, cur_observed = _features(rng, 400, observed_share=0.5, shift=1.5)
    drifts = feature_drift(["creatinine", "hemoglobin"], ref_values, ref_observed, cur_values, cur_observed)
    by_key = {(d.name, d.kind): d for d in drifts}
    assert [(d.name, d.kind) for d in drifts] == [
        ("creatinine", "value"),
        ("creatinine", "missing"),
        ("hemoglobin", "value"),
        ("hemoglobin", "missing"),
    ]

    creatinine = by_key[("creatinine", "value")]
    assert (creatinine.reference_n, creatinine.current_n) == (900, 200)
    assert creatinine.psi is not None and creatinine.psi < 0.01  # the observed values are the same; 999s left out
    assert creatinine.status == "ok"
    assert creatinine.ks_p is not None and creatinine.ks_p > 0.5

    missing = by_key[("creatinine", "missing")]
    assert missing.reference_missing_share == pytest.approx(0.1)
    assert missing.current_missing_share == pytest.approx(0.5)
    assert missing.status == "alert" and missing.psi is None and missing.ks_p is None
    assert missing.detail.startswith("missing 10% -> 50% (+40.0 points, |change| >= 15; Fisher p ")
    assert (missing.reference_n, missing.current_n) == (1000, 400)

    hemoglobin = by_key[("hemoglobin", "value")]
    assert hemoglobin.psi is not None and hemoglobin.psi >= 0.25
    assert hemoglobin.status == "alert"
    assert hemoglobin.detail.startswith(f"PSI {hemoglobin.psi:.3f} >= 0.25")
    assert "KS D" in hemoglobin.detail  # p far below 0.001 is named in the detail
    assert by_key[("hemoglobin", "missing")].status == "ok"

    assert alerts(drifts) == [
        f"missing drift of creatinine: {missing.detail}",
        f"value drift of hemoglobin: {hemoglobin.detail}",
    ]


def test_a_moderate_shift_warns_and_does_not_alert() -> None:
    rng = np.random.default_rng(5)
    drift = score_drift(rng.beta(2, 8, size=3000), rng.beta(2.0, 6.0, size=3000))
    assert drift.name == SCORE_NAME and drift.kind == "score"
    assert drift.psi is not None and 0.1 <= drift.psi < 0.25, drift.psi
    assert drift.status == "warn"
    assert alerts([drift]) == []


def test_too_few_current_values_never_alert() -> None:
    rng = np.random.default_rng(6)
    ref_values, ref_observed = _features(rng, 1000, observed_share=0.9, shift=0.0)
    cur_values, cur_observed = _features(rng, 20, observed_share=0.2, shift=5.0)  # large shifts, 20 rows
    drifts = feature_drift(["creatinine", "hemoglobin"], ref_values, ref_observed, cur_values, cur_observed)
    assert [d.status for d in drifts] == ["too_few"] * 4
    shifted = drifts[2]
    assert shifted.psi is not None and shifted.psi > 1.0  # still computed and shown
    assert "20 current values < 30" in shifted.detail
    assert alerts(drifts) == []
    # no current rows at all
    empty = feature_drift(["creatinine", "hemoglobin"], ref_values, ref_observed, cur_values[:0], cur_observed[:0])
    assert [d.status for d in empty] == ["too_few"] * 4
    assert empty[0].psi is None and empty[1].current_missing_share is None
    # a lower minimum judges the same 20 rows
    judged = feature_drift(
        ["creatinine", "hemoglobin"], ref_values, ref_observed, cur_values, cur_observed, DriftThresholds(min_current=4)
    )
    assert judged[2].status == "alert" and judged[1].status == "alert"


def test_feature_drift_rejects_mismatched_input() -> None:
    values = np.zeros((10, 2))
    observed = np.ones((10, 2), dtype=bool)
    with pytest.raises(DriftError):
        feature_drift(["a"], values, observed, values, observed)
    with pytest.raises(DriftError):
        feature_drift(["a", "b"], values, observed[:, :1], values, observed)
    with pytest.raises(DriftError):
        feature_drift(["a", "b"], values, observed.astype(int), values, observed)
    bad = values.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DriftError, match="feature a"):
        feature_drift(["a", "b"], bad, observed, values, observed)


def test_pattern_drift() -> None:
    reference = ["image+labs+notes"] * 600 + ["image+labs"] * 300 + ["labs+notes"] * 100
    current = ["image+labs+notes"] * 10 + ["image+labs"] * 40 + ["labs+notes"] * 50
    drift = pattern_drift(reference, current)
    assert drift.name == PATTERN_NAME and drift.kind == "pattern"
    assert drift.psi == pytest.approx(categorical_psi(reference, current))
    assert drift.status == "alert" and drift.ks_statistic is None and drift.ks_p is None
    assert "most changed: image+labs+notes 60% -> 10%" in drift.detail
    assert pattern_drift(reference, reference[::10]).status == "ok"
    assert pattern_drift(reference, current[:10]).status == "too_few"


def _separated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    probabilities = np.where(labels == 1, 0.95, 0.05) + rng.uniform(-0.02, 0.02, size=n)
    return probabilities, labels


def test_outcome_performance_of_a_perfectly_separating_predictor() -> None:
    probabilities, labels = _separated(300, seed=7)
    performance = outcome_performance(probabilities, labels, reference_auroc=0.8)
    assert performance.auroc is not None
    assert performance.auroc.value == pytest.approx(1.0)
    assert performance.auroc.low == pytest.approx(1.0) and performance.auroc.high == pytest.approx(1.0)
    assert performance.n == 300 and performance.positives == int(labels.sum())
    assert performance.ece is not None and performance.ece < 0.06
    assert performance.status == "ok"
    # two bins hold everyone: [0, 0.1) with observed rate 0 and [0.9, 1] with observed rate 1
    assert [(b.observed_rate, b.n) for b in performance.calibration] == [
        (0.0, 300 - performance.positives),
        (1.0, performance.positives),
    ]
    assert alerts([], performance) == []


def test_outcome_performance_of_a_random_predictor_alerts_against_the_reference() -> None:
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 2, size=2000)
    probabilities = rng.uniform(0.45, 0.55, size=2000)  # calibrated on average, no discrimination
    performance = outcome_performance(probabilities, labels, reference_auroc=0.8)
    assert performance.auroc is not None and performance.auroc.value == pytest.approx(0.5, abs=0.04)
    assert performance.auroc.low < 0.5 < performance.auroc.high
    assert performance.ece is not None and performance.ece < 0.05
    assert performance.status == "alert"
    assert "below the reference" in performance.detail
    assert alerts([], performance) == [f"outcome performance: {performance.detail}"]
    assert performance.detail.startswith(f"AUROC {0.8 - performance.auroc.value:.3f} below the reference")
    # without a reference AUROC nothing to compare: ok
    assert outcome_performance(probabilities, labels, reference_auroc=None).status == "ok"
    # the bootstrap is seeded: the same CI twice
    again = outcome_performance(probabilities, labels, reference_auroc=0.8)
    assert again.auroc == performance.auroc


def test_outcome_performance_alerts_on_calibration() -> None:
    probabilities, labels = _separated(300, seed=9)
    shrunk = 0.5 + (probabilities - 0.5) * 0.5  # 0.275 / 0.725: still separating, 0.25 off
    performance = outcome_performance(shrunk, labels, reference_auroc=0.8)
    assert performance.auroc is not None and performance.auroc.value == pytest.approx(1.0)
    assert performance.ece == pytest.approx(0.275, abs=0.01)
    assert performance.status == "alert" and "ECE" in performance.detail


def test_outcome_performance_too_few_and_one_class() -> None:
    probabilities, labels = _separated(20, seed=10)
    performance = outcome_performance(probabilities, labels, reference_auroc=0.99)
    assert performance.status == "too_few" and performance.n == 20
    one_class = outcome_performance(np.full(50, 0.04), np.zeros(50, dtype=int), reference_auroc=0.8)
    assert one_class.status == "one_class" and one_class.auroc is None and one_class.positives == 0
    assert one_class.ece == pytest.approx(0.04)
    empty = outcome_performance([], [], reference_auroc=0.8)
    assert empty.status == "too_few" and empty.ece is None and empty.calibration == ()
    with pytest.raises(DriftError):
        outcome_performance([0.2, 1.2], [0, 1], reference_auroc=None)
    with pytest.raises(DriftError):
        outcome_performance([0.2, 0.4], [0, 2], reference_auroc=None)


def test_thresholds_are_validated() -> None:
    with pytest.raises(ValueError):
        DriftThresholds(psi_warn=0.3, psi_alert=0.25)
    with pytest.raises(ValueError):
        DriftThresholds(min_current=0)
    with pytest.raises(ValueError):
        Drift("x", "nonsense", 1, 1, None, None, None, None, None, "ok", "")  # type: ignore[arg-type]


def test_write_monitor_page(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    ref_values, ref_observed = _features(rng, 1000, observed_share=0.9, shift=0.0)
    cur_values, cur_observed = _features(rng, 400, observed_share=0.5, shift=1.5)
    names = ["creatinine", "hb<a1c>"]
    drifts = feature_drift(names, ref_values, ref_observed, cur_values, cur_observed)
    ref_scores, cur_scores = rng.beta(2, 8, size=1000), rng.beta(3, 5, size=400)
    drifts.append(score_drift(ref_scores, cur_scores))
    drifts.append(pattern_drift(["image+labs"] * 100, ["image+labs"] * 60 + ["labs"] * 40))
    probabilities, labels = _separated(200, seed=12)
    performance = outcome_performance(probabilities, labels, reference_auroc=0.8, bootstrap=50)
    histograms = {
        name: (ref_values[ref_observed[:, j], j], cur_values[cur_observed[:, j], j]) for j, name in enumerate(names)
    }
    histograms[SCORE_NAME] = (ref_scores, cur_scores)
    context = {"window": "2025-01-01..2025-01-31", "model": "chest-ct-fusion 1.0.0", "training table": "2024h2"}

    page = write_monitor_page(tmp_path / "monitor", "Monitor <January>", drifts, performance, histograms, context)

    assert page == tmp_path / "monitor" / "monitor.html"
    text = page.read_text(encoding="utf-8")
    assert "creatinine" in text and "hb&lt;a1c&gt;" in text and "hb<a1c>" not in text
    assert "Monitor &lt;January&gt;" in text and PATTERN_NAME in text
    assert "2025-01-01..2025-01-31" in text and "training table" in text
    for message in alerts(drifts, performance):
        assert message.replace("<", "&lt;").replace(">", "&gt;") in text
    images = re.findall(r"<img src='([^']+)'", text)
    # one histogram per value feature and the score, the missing shares, the calibration
    assert len(images) == 5
    assert {"missing_share.png", "calibration.png"} <= set(images)
    for name in images:
        path = page.parent / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    without = write_monitor_page(tmp_path / "bare", "Monitor", drifts[:2], None, {}, {})
    bare = without.read_text(encoding="utf-8")
    assert "No outcomes have arrived" in bare
    assert re.findall(r"<img src='([^']+)'", bare) == ["missing_share.png"]


def test_a_small_window_alerts_only_on_a_shift_that_is_significant_at_its_size() -> None:
    rng = np.random.default_rng(12)
    reference = rng.lognormal(np.log(8.0), 0.7, size=150)
    thresholds = DriftThresholds(min_current=10)
    # Thirty values of the same distribution: PSI over ten bins is large by chance, KS says it is chance.
    noisy = [score_drift(reference, rng.lognormal(np.log(8.0), 0.7, size=30), thresholds) for _ in range(40)]
    assert any(d.psi is not None and d.psi >= 0.25 for d in noisy), "PSI alone would have alerted"
    assert all(d.status != "alert" for d in noisy)
    assert any(d.status == "warn" and "not significant at this size" in d.detail for d in noisy)
    # Thirty values four times as high: large and significant.
    shifted = score_drift(reference, rng.lognormal(np.log(32.0), 0.7, size=30), thresholds)
    assert shifted.status == "alert" and shifted.ks_p is not None and shifted.ks_p < 1e-6

    # A missing share that moved 20 points in 20 rows: not significant, a warning; in 2000 rows: an alert.
    def missing(current_rows: int, seed: int) -> Drift:
        local = np.random.default_rng(seed)
        ref_obs = local.random((1000, 1)) < 0.9
        cur_obs = np.arange(current_rows)[:, None] % 10 >= 3  # 30% missing
        values = np.ones((1000, 1)), np.ones((current_rows, 1))
        return feature_drift(["crp"], values[0], ref_obs, values[1], cur_obs, thresholds)[1]

    assert missing(20, 1).status == "warn"
    assert missing(2000, 1).status == "alert"


def test_outcome_performance_of_a_small_window_alerts_only_beyond_chance() -> None:
    # 40 patients scored by a model that is what its reference says (AUROC ~0.8, calibrated): whatever their AUROC
    # and ECE came out as, the CI reaches the reference and Spiegelhalter's test finds no miscalibration.
    rng = np.random.default_rng(13)
    found = []
    for _ in range(30):
        logits = rng.normal(-1.0, 1.5, size=40)
        probabilities = 1.0 / (1.0 + np.exp(-logits))
        labels = (rng.random(40) < probabilities).astype(int)
        found.append(outcome_performance(probabilities, labels, 0.8, DriftThresholds(min_current=10)))
    assert any(p.ece is not None and p.ece >= 0.10 for p in found), "ECE alone would have alerted"
    assert sum(p.status == "alert" for p in found) <= 1
    # The same patients' outcomes drawn at twice the odds the model says: miscalibrated beyond chance.
    logits = rng.normal(-1.0, 1.5, size=400)
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    labels = (rng.random(400) < 1.0 / (1.0 + np.exp(-(logits + 1.5)))).astype(int)
    shifted = outcome_performance(probabilities, labels, None, DriftThresholds(min_current=10))
    assert shifted.status == "alert" and "Spiegelhalter p" in shifted.detail
    assert shifted.calibration_p is not None and shifted.calibration_p < 1e-6
