"""Discrimination and calibration metrics with bootstrap 95% confidence intervals (scikit-learn underneath).

AUROC, AUPRC (average precision), F1 at a decision threshold, Brier score and the expected calibration error (ECE)
with ten equal-width probability bins (``sum_b n_b / N * |mean(y_b) - mean(p_b)|``). Confidence intervals are
percentile intervals over patient-level bootstrap resamples drawn from a seeded generator, so they repeat exactly;
:func:`paired_difference` resamples two models' predictions on the same patients together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

METRICS = ("auroc", "auprc", "f1", "brier", "ece")
ECE_BINS = 10


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap 95% interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        """``{"value", "low", "high"}`` rounded to 4 decimals."""
        return {"value": round(self.value, 4), "low": round(self.low, 4), "high": round(self.high, 4)}

    def text(self, digits: int = 3) -> str:
        """``0.812 (0.790 to 0.833)``."""
        return f"{self.value:.{digits}f} ({self.low:.{digits}f} to {self.high:.{digits}f})"


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over ``bins`` equal-width bins of [0, 1] (the last bin includes 1.0)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.size and not (np.all(np.isfinite(p)) and p.min() >= 0.0 and p.max() <= 1.0):
        raise ValueError("ECE needs probabilities in [0, 1]")
    index = np.minimum((p * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, weights=y, minlength=bins) - np.bincount(index, weights=p, minlength=bins))
    return float(gap.sum() / max(int(counts.sum()), 1))


def best_f1_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The probability threshold that maximises F1 on these predictions (fitted on a calibration split)."""
    y = np.asarray(labels).astype(int)
    p = np.asarray(probabilities, dtype=np.float64)
    candidates = np.unique(np.round(p, 4))
    if candidates.size > 200:
        candidates = np.quantile(p, np.linspace(0.01, 0.99, 199))
    scores = [f1_score(y, (p >= t).astype(int), zero_division=0.0) for t in candidates]
    return float(candidates[int(np.argmax(scores))])


def metric_value(name: str, labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> float:
    """One of :data:`METRICS` (AUROC/AUPRC are NaN when only one class is present)."""
    y = np.asarray(labels).astype(int)
    p = np.asarray(probabilities, dtype=np.float64)
    if name in ("auroc", "auprc"):
        if len(np.unique(y)) < 2:
            return float("nan")
        return float(roc_auc_score(y, p) if name == "auroc" else average_precision_score(y, p))
    if name == "f1":  # 2 TP / (2 TP + FP + FN), as sklearn's f1_score with zero_division=0, without its overhead
        predicted = p >= threshold
        true_positive = float(np.sum(predicted & (y == 1)))
        denominator = float(np.sum(predicted)) + float(np.sum(y == 1))
        return 2.0 * true_positive / denominator if denominator else 0.0
    if name == "brier":
        return float(np.mean((p - y) ** 2))
    if name == "ece":
        return expected_calibration_error(y, p)
    raise ValueError(f"unknown metric {name!r} (one of {', '.join(METRICS)})")


def metric_values(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, float]:
    """All of :data:`METRICS` for one set of predictions."""
    return {name: metric_value(name, labels, probabilities, threshold) for name in METRICS}


def _bootstrap(
    n: int, statistic: Callable[[np.ndarray], dict[str, float]], resamples: int, seed: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        for key, value in statistic(rng.integers(0, n, n)).items():
            draws.setdefault(key, []).append(value)
    return {key: np.asarray(values) for key, values in draws.items()}


def _interval(point: float, draws: np.ndarray) -> Estimate:
    finite = draws[np.isfinite(draws)]
    if finite.size == 0:
        return Estimate(point, float("nan"), float("nan"))
    low, high = np.percentile(finite, [2.5, 97.5])
    return Estimate(point, float(low), float(high))


def bootstrap_metrics(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, resamples: int = 1000, seed: int = 0
) -> dict[str, Estimate]:
    """Every metric with a percentile bootstrap 95% CI over ``resamples`` patient resamples."""
    y = np.asarray(labels).astype(int)
    p = np.asarray(probabilities, dtype=np.float64)
    point = metric_values(y, p, threshold)
    draws = _bootstrap(len(y), lambda idx: metric_values(y[idx], p[idx], threshold), resamples, seed)
    return {key: _interval(point[key], draws[key]) for key in METRICS}


def paired_difference(
    labels: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    metric: str = "auroc",
    resamples: int = 1000,
    seed: int = 0,
) -> Estimate:
    """``metric(first) - metric(second)`` on the same patients, with a paired bootstrap 95% CI."""
    y = np.asarray(labels).astype(int)
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)

    def delta(idx: np.ndarray) -> dict[str, float]:
        return {"d": metric_value(metric, y[idx], a[idx]) - metric_value(metric, y[idx], b[idx])}

    point = delta(np.arange(len(y)))["d"]
    return _interval(point, _bootstrap(len(y), delta, resamples, seed)["d"])
