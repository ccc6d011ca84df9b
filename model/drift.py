"""Drift and outcome performance of a deployed model: the statistics behind ``riskbridge monitor``.

Pure functions over arrays, no I/O: the monitor (riskbridge/monitor.py) reads the training table (the reference)
and the window's harmonized vectors, scores and labels (the current sample) and calls these; their results go to
:func:`riskbridge.model.drift_report.write_monitor_page` and to the alert messages of :func:`alerts`.

- **Value drift** of each feature (:func:`feature_drift`): the population stability index (:func:`psi`) of the
  *observed* values only (imputed values are the imputer's, not the site's: they would hide a shift), with the
  two-sample Kolmogorov-Smirnov statistic and p-value (scipy). An alert needs both: PSI past its threshold and a
  p-value below ``p_alert`` (:class:`DriftThresholds` says why).
- **Missingness drift** of each feature: the change of the share of rows in which the feature is missing (Fisher's
  exact test for its significance).
- **Pattern drift** (:func:`pattern_drift`): PSI over the modality/missingness pattern strings
  (``image+labs+notes``, ``image+labs``...), :func:`categorical_psi`, with the chi-square test.
- **Score drift** (:func:`score_drift`): PSI and KS of the calibrated probabilities.
- **Outcome performance** (:func:`outcome_performance`): AUROC with a bootstrap 95% CI and the expected calibration
  error (10 equal-width bins) of past scores against labels that arrived since, from
  :mod:`riskbridge.model.metrics`, against the AUROC the model was validated with.

PSI is ``sum_b (c_b - r_b) * ln(c_b / r_b)`` over bins ``b`` with reference shares ``r_b`` and current shares
``c_b``. The usual reading: below 0.1 no real shift, 0.1 to 0.25 a moderate shift worth a look, 0.25 and above a
shift large enough that the model's validation may no longer hold. Two samples of one distribution still give a
PSI of about ``(bins - 1) * (1 / n_reference + 1 / n_current)`` by chance (0.009 for ten bins and 2000 each, 0.3
for 30 current values), which is why an alert also needs a significance test, and a window of fewer than
:attr:`DriftThresholds.min_current` values is reported as ``too_few`` and never alerts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
from scipy.stats import chi2_contingency, fisher_exact, ks_2samp

from riskbridge.errors import DataError
from riskbridge.model.metrics import ECE_BINS, Estimate, bootstrap_metrics, expected_calibration_error, metric_value

DriftKind = Literal["value", "missing", "pattern", "score"]
DriftStatus = Literal["ok", "warn", "alert", "too_few"]
PerformanceStatus = Literal["ok", "alert", "too_few", "one_class"]
DRIFT_KINDS = ("value", "missing", "pattern", "score")
DRIFT_STATUSES = ("ok", "warn", "alert", "too_few")
PERFORMANCE_STATUSES = ("ok", "alert", "too_few", "one_class")

# The share an empty bin (or an absent category) counts with: not zero, whose logarithm is infinite. One empty bin
# next to a reference share of 0.1 adds (0.1 - 1e-4) * ln(0.1 / 1e-4) = 0.69 to the PSI: a bin the current sample
# left empty is a real shift, and it shows as one.
PSI_EPSILON = 1e-4
PSI_BINS = 10
# The names of the drifts that are not per feature (the score's is also its key in the report's histograms).
SCORE_NAME = "score"
PATTERN_NAME = "modality pattern"


class DriftError(DataError, ValueError):
    """The samples given cannot be compared as given (empty, mismatched shapes, values that are not finite)."""


@dataclass(frozen=True)
class DriftThresholds:
    """When a drift warns or alerts, and when a window is too small to judge.

    - ``psi_warn = 0.1``, ``psi_alert = 0.25``: the usual PSI conventions (below 0.1 no real shift, 0.1 to 0.25
      moderate, 0.25 and above major); a PSI at a threshold counts as reaching it.
    - ``p_alert = 0.001``: an alert also needs the shift to be unlikely by chance at the window's size: the KS
      two-sample test for values and scores, Fisher's exact test for a missing share, the chi-square test for the
      patterns, each below this p-value. Large (PSI, share change) and significant: with thousands of rows a shift
      too small to matter is already "significant", so the effect size gates; with a small site's week (30 to 100
      studies) PSI alone is mostly noise (two samples of one distribution give a PSI of about
      ``9 * (1/n_reference + 1/n_current)``: 0.3 at 30 studies), so the test gates. A large shift that is not
      significant is a ``warn``.
    - ``missing_share_alert = 0.15``: an absolute change of a feature's missing share (e.g. 10% to 25%) this large
      alerts: it usually means a feed, a code or a unit mapping changed, and the model then sees imputed values
      where it was trained on measured ones.
    - ``auroc_drop_alert = 0.10``: the current AUROC lower than the reference (validated) AUROC by this much or
      more alerts; smaller drops are within the bootstrap noise of a few hundred labelled patients.
    - ``ece_alert = 0.10``: an expected calibration error this large means the probabilities (and the qualitative
      risk levels cut from them) are off by about ten points on average.
    - ``min_current = 30``: fewer current values (or rows, or labelled patients) than this give status
      ``too_few`` and never alert: PSI over ten bins and AUROC from a handful of patients are mostly noise.
    """

    psi_warn: float = 0.1
    psi_alert: float = 0.25
    p_alert: float = 0.001
    missing_share_alert: float = 0.15
    auroc_drop_alert: float = 0.10
    ece_alert: float = 0.10
    min_current: int = 30

    def __post_init__(self) -> None:
        if not 0.0 < self.psi_warn <= self.psi_alert:
            raise ValueError(f"need 0 < psi_warn <= psi_alert, got {self.psi_warn} and {self.psi_alert}")
        if not 0.0 < self.p_alert < 1.0:
            raise ValueError(f"p_alert must be in (0, 1), got {self.p_alert}")
        for name in ("missing_share_alert", "auroc_drop_alert", "ece_alert"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.min_current < 1:
            raise ValueError(f"min_current must be at least 1, got {self.min_current}")


@dataclass(frozen=True)
class Drift:
    """One comparison of the current sample with the reference.

    ``kind``: ``value`` (a feature's observed values), ``missing`` (a feature's missing share), ``pattern`` (the
    modality patterns) or ``score`` (the calibrated probabilities). ``reference_n``/``current_n``: the values
    compared (observed values for ``value``, rows for ``missing``). ``psi`` is None for ``missing`` and when a side
    is empty; ``ks_statistic``/``ks_p`` are None for ``missing`` and ``pattern`` (categorical); the missing shares
    are set for ``missing`` only. ``detail``: a short human text of why the status is what it is.
    """

    name: str
    kind: DriftKind
    reference_n: int
    current_n: int
    psi: float | None
    ks_statistic: float | None
    ks_p: float | None
    reference_missing_share: float | None
    current_missing_share: float | None
    status: DriftStatus
    detail: str

    def __post_init__(self) -> None:
        if self.kind not in DRIFT_KINDS:
            raise ValueError(f"drift kind must be one of {', '.join(DRIFT_KINDS)}, got {self.kind!r}")
        if self.status not in DRIFT_STATUSES:
            raise ValueError(f"drift status must be one of {', '.join(DRIFT_STATUSES)}, got {self.status!r}")

    @property
    def message(self) -> str:
        """``value drift of creatinine: PSI 0.312 >= 0.25 ...``, as :func:`alerts` gives it."""
        return f"{self.kind} drift of {self.name}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form, every field."""
        return asdict(self)


class CalibrationBin(NamedTuple):
    """One non-empty equal-width probability bin: mean predicted probability, observed rate, patients."""

    mean_predicted: float
    observed_rate: float
    n: int


@dataclass(frozen=True)
class Performance:
    """Past scores against the outcomes that arrived since.

    ``n`` labelled patients, ``positives`` of them with the outcome; ``auroc`` with its bootstrap 95% CI (None with
    one class only); ``ece`` over 10 equal-width bins (None without patients); ``calibration`` the non-empty bins;
    ``reference_auroc`` the AUROC the model was validated with (None when unknown: no AUROC alert then);
    ``calibration_p`` Spiegelhalter's test of calibration (None without patients).
    """

    n: int
    positives: int
    auroc: Estimate | None
    ece: float | None
    calibration: tuple[CalibrationBin, ...]
    reference_auroc: float | None
    status: PerformanceStatus
    detail: str
    calibration_p: float | None = None

    def __post_init__(self) -> None:
        if self.status not in PERFORMANCE_STATUSES:
            raise ValueError(f"performance status must be one of {', '.join(PERFORMANCE_STATUSES)}")

    @property
    def message(self) -> str:
        """``outcome performance: AUROC 0.512 ...``, as :func:`alerts` gives it."""
        return f"outcome performance: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the AUROC as ``{"value", "low", "high"}``, the bins as ``[mean_predicted, rate, n]``."""
        return {
            "n": self.n,
            "positives": self.positives,
            "auroc": None if self.auroc is None else self.auroc.to_dict(),
            "ece": self.ece,
            "calibration": [list(b) for b in self.calibration],
            "reference_auroc": self.reference_auroc,
            "status": self.status,
            "detail": self.detail,
        }


def _finite_1d(values: Any, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise DriftError(f"{what}: no values to compare")
    if not np.all(np.isfinite(array)):
        raise DriftError(f"{what}: values must be finite (leave missing values out)")
    return array


def _shares(counts: np.ndarray) -> np.ndarray:
    return np.maximum(counts / max(float(counts.sum()), 1.0), PSI_EPSILON)


def _psi_of_shares(reference: np.ndarray, current: np.ndarray) -> float:
    return float(np.sum((current - reference) * np.log(current / reference)))


def psi(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of ``current`` against ``reference`` over the reference's quantile bins.

    The inner bin edges are the reference's ``1/bins ... (bins-1)/bins`` quantiles, duplicates dropped (a feature
    with many equal values gets fewer bins); the first bin is open to the left and the last to the right, so current
    values outside the reference's range still count. A bin holds the values from its lower edge up to, not
    including, the next. A share of zero counts as :data:`PSI_EPSILON`. DriftError for an empty sample or values
    that are not finite.
    """
    if bins < 2:
        raise ValueError(f"PSI needs at least 2 bins, got {bins}")
    ref = _finite_1d(reference, "PSI reference")
    cur = _finite_1d(current, "PSI current")
    edges = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    count = len(edges) + 1
    ref_counts = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=count).astype(np.float64)
    cur_counts = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=count).astype(np.float64)
    return _psi_of_shares(_shares(ref_counts), _shares(cur_counts))


def categorical_psi(reference: Sequence[str], current: Sequence[str]) -> float:
    """Population stability index over the union of the categories of both samples (one bin per category).

    A category absent from one sample counts there with share :data:`PSI_EPSILON`. DriftError for an empty sample.
    """
    if not len(reference) or not len(current):
        raise DriftError("categorical PSI: no values to compare")
    ref, cur = Counter(reference), Counter(current)
    categories = sorted(set(ref) | set(cur))
    ref_counts = np.array([ref[c] for c in categories], dtype=np.float64)
    cur_counts = np.array([cur[c] for c in categories], dtype=np.float64)
    return _psi_of_shares(_shares(ref_counts), _shares(cur_counts))


def _psi_status(value: float, p: float | None, test: str, thresholds: DriftThresholds) -> tuple[DriftStatus, str]:
    """Alert: PSI at least ``psi_alert`` and the test's p below ``p_alert``; warn: PSI at least ``psi_warn``."""
    significance = "" if p is None else f"; {test} p {p:.1e}"
    if value >= thresholds.psi_alert and p is not None and p < thresholds.p_alert:
        return "alert", f"PSI {value:.3f} >= {thresholds.psi_alert:g}{significance} < {thresholds.p_alert:g}"
    if value >= thresholds.psi_alert:
        return "warn", f"PSI {value:.3f} >= {thresholds.psi_alert:g}{significance}: not significant at this size"
    if value >= thresholds.psi_warn:
        return "warn", f"PSI {value:.3f} >= {thresholds.psi_warn:g}{significance}"
    return "ok", f"PSI {value:.3f} < {thresholds.psi_warn:g}"


def _too_few(current_n: int, thresholds: DriftThresholds, what: str) -> str:
    return f"{current_n} current {what} < {thresholds.min_current}: too few to judge"


def _numeric_drift(
    name: str, kind: DriftKind, reference: np.ndarray, current: np.ndarray, thresholds: DriftThresholds
) -> Drift:
    """PSI and KS of two finite 1-D samples (either may be empty), with the status PSI decides."""
    value: float | None = None
    ks_statistic: float | None = None
    ks_p: float | None = None
    if reference.size and current.size:
        value = psi(reference, current)
        ks = ks_2samp(reference, current)
        ks_statistic, ks_p = float(ks.statistic), float(ks.pvalue)
    status: DriftStatus
    if current.size < thresholds.min_current:
        status, detail = "too_few", _too_few(current.size, thresholds, "values")
    elif value is None:
        status, detail = "too_few", "no reference values to compare with"
    else:
        status, detail = _psi_status(value, ks_p, f"KS D {ks_statistic:.3f},", thresholds)
    return Drift(
        name=name,
        kind=kind,
        reference_n=int(reference.size),
        current_n=int(current.size),
        psi=value,
        ks_statistic=ks_statistic,
        ks_p=ks_p,
        reference_missing_share=None,
        current_missing_share=None,
        status=status,
        detail=detail,
    )


def _missing_drift(name: str, reference: np.ndarray, current: np.ndarray, thresholds: DriftThresholds) -> Drift:
    """The change of the missing share of one feature; ``reference``/``current`` are its observed flags."""
    ref_share = float(1.0 - reference.mean())
    cur_share = float(1.0 - current.mean()) if current.size else None
    status: DriftStatus
    if current.size < thresholds.min_current or cur_share is None:
        status, detail = "too_few", _too_few(current.size, thresholds, "rows")
    else:
        delta = cur_share - ref_share
        text = f"missing {ref_share:.0%} -> {cur_share:.0%} ({delta * 100:+.1f} points"
        table = [
            [int(reference.size - reference.sum()), int(reference.sum())],
            [int(current.size - current.sum()), int(current.sum())],
        ]
        p = float(fisher_exact(table).pvalue)
        # rounded, so that a change printed as exactly the threshold is one that reaches it
        if round(abs(delta), 12) >= thresholds.missing_share_alert and p < thresholds.p_alert:
            status, detail = "alert", f"{text}, |change| >= {thresholds.missing_share_alert * 100:g}; Fisher p {p:.1e})"
        elif round(abs(delta), 12) >= thresholds.missing_share_alert:
            status, detail = "warn", f"{text}; Fisher p {p:.1e}: not significant at this size)"
        else:
            status, detail = "ok", f"{text}, |change| < {thresholds.missing_share_alert * 100:g})"
    return Drift(
        name=name,
        kind="missing",
        reference_n=int(reference.size),
        current_n=int(current.size),
        psi=None,
        ks_statistic=None,
        ks_p=None,
        reference_missing_share=ref_share,
        current_missing_share=cur_share,
        status=status,
        detail=detail,
    )


def _matrix(values: Any, observed: Any, features: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(values, dtype=np.float64)
    mask = np.asarray(observed)
    if x.ndim != 2 or x.shape[1] != features:
        raise DriftError(f"{what} values must be 2-D (rows x {features} features), got shape {x.shape}")
    if mask.shape != x.shape:
        raise DriftError(f"{what} observed flags must have the values' shape {x.shape}, got {mask.shape}")
    if mask.dtype != np.bool_:
        raise DriftError(f"{what} observed flags must be bool, got {mask.dtype}")
    return x, mask


def feature_drift(
    names: Sequence[str],
    reference_values: np.ndarray,
    reference_observed: np.ndarray,
    current_values: np.ndarray,
    current_observed: np.ndarray,
    thresholds: DriftThresholds = DriftThresholds(),
) -> list[Drift]:
    """Per feature, its ``value`` drift then its ``missing`` drift, in the order of ``names``.

    ``*_values`` are 2-D float arrays (rows x features, the feature vectors as harmonized or as imputed: only
    the entries whose ``*_observed`` flag (a bool array of the same shape) is set are compared, so imputed values
    never count). The value drift is :func:`psi` and the KS test of the observed values, ``too_few`` when the current
    sample has fewer than ``min_current`` of them; the missing drift alerts when the missing share (unobserved rows
    over rows) moved by ``missing_share_alert`` or more either way and Fisher's exact test gives p below
    ``p_alert`` (warns when only the former), ``too_few`` with fewer current rows than
    ``min_current``. DriftError for mismatched shapes, no reference rows, or an observed value that is not finite.
    """
    ref, ref_mask = _matrix(reference_values, reference_observed, len(names), "reference")
    cur, cur_mask = _matrix(current_values, current_observed, len(names), "current")
    if ref.shape[0] == 0:
        raise DriftError("feature drift needs at least one reference row")
    drifts: list[Drift] = []
    for j, name in enumerate(names):
        ref_obs, cur_obs = ref[ref_mask[:, j], j], cur[cur_mask[:, j], j]
        if not (np.all(np.isfinite(ref_obs)) and np.all(np.isfinite(cur_obs))):
            raise DriftError(f"feature {name}: an observed value is not finite")
        drifts.append(_numeric_drift(name, "value", ref_obs, cur_obs, thresholds))
        drifts.append(_missing_drift(name, ref_mask[:, j], cur_mask[:, j], thresholds))
    return drifts


def pattern_drift(
    reference_patterns: Sequence[str], current_patterns: Sequence[str], thresholds: DriftThresholds = DriftThresholds()
) -> Drift:
    """Drift of the modality/missingness patterns (``image+labs+notes``...): :func:`categorical_psi`, no KS.

    Named :data:`PATTERN_NAME`; ``too_few`` with fewer current patterns than ``min_current``. DriftError without
    reference patterns.
    """
    if not len(reference_patterns):
        raise DriftError("pattern drift needs reference patterns")
    value = categorical_psi(reference_patterns, current_patterns) if len(current_patterns) else None
    status: DriftStatus
    if len(current_patterns) < thresholds.min_current or value is None:
        status, detail = "too_few", _too_few(len(current_patterns), thresholds, "patterns")
    else:
        status, detail = _psi_status(
            value, _chi_square_p(reference_patterns, current_patterns), "chi-square", thresholds
        )
        moved = _largest_share_change(reference_patterns, current_patterns)
        if moved:
            detail += f"; most changed: {moved}"
    return Drift(
        name=PATTERN_NAME,
        kind="pattern",
        reference_n=len(reference_patterns),
        current_n=len(current_patterns),
        psi=value,
        ks_statistic=None,
        ks_p=None,
        reference_missing_share=None,
        current_missing_share=None,
        status=status,
        detail=detail,
    )


def _chi_square_p(reference: Sequence[str], current: Sequence[str]) -> float | None:
    """The chi-square test's p of the two samples' pattern counts; None when only one pattern occurs at all."""
    ref, cur = Counter(reference), Counter(current)
    categories = sorted(set(ref) | set(cur))
    if len(categories) < 2:
        return None
    table = np.array([[ref[c] for c in categories], [cur[c] for c in categories]], dtype=np.float64)
    return float(chi2_contingency(table).pvalue)


def _largest_share_change(reference: Sequence[str], current: Sequence[str]) -> str:
    ref, cur = Counter(reference), Counter(current)
    changes = {c: cur[c] / len(current) - ref[c] / len(reference) for c in set(ref) | set(cur)}
    category = max(sorted(changes), key=lambda c: abs(changes[c]))
    if abs(changes[category]) < 0.005:
        return ""
    before, after = ref[category] / len(reference), cur[category] / len(current)
    return f"{category} {before:.0%} -> {after:.0%}"


def score_drift(
    reference_scores: Sequence[float] | np.ndarray,
    current_scores: Sequence[float] | np.ndarray,
    thresholds: DriftThresholds = DriftThresholds(),
) -> Drift:
    """Drift of the calibrated probabilities: :func:`psi` over the reference's score deciles and the KS test.

    Named :data:`SCORE_NAME`; ``too_few`` with fewer current scores than ``min_current``. DriftError without
    reference scores or for a score that is not finite.
    """
    ref = np.asarray(reference_scores, dtype=np.float64).ravel()
    cur = np.asarray(current_scores, dtype=np.float64).ravel()
    if ref.size == 0:
        raise DriftError("score drift needs reference scores")
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(cur))):
        raise DriftError("score drift: a score is not finite")
    return _numeric_drift(SCORE_NAME, "score", ref, cur, thresholds)


def calibration_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> tuple[CalibrationBin, ...]:
    """The non-empty equal-width bins of [0, 1] (the last includes 1.0), as :func:`~metrics.expected_calibration_error`
    bins them: mean predicted probability, observed rate and patients per bin."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    predicted = np.bincount(index, weights=p, minlength=bins)
    observed = np.bincount(index, weights=y, minlength=bins)
    return tuple(
        CalibrationBin(float(predicted[b] / counts[b]), float(observed[b] / counts[b]), int(counts[b]))
        for b in range(bins)
        if counts[b]
    )


def spiegelhalter_p(probabilities: np.ndarray, labels: np.ndarray) -> float | None:
    """Two-sided p-value of Spiegelhalter's z-test that the outcomes come from the probabilities (calibration as a
    whole, not bin by bin: a small sample's ECE is large by chance, this test says whether it is); None when every
    probability is 0, 1 or 0.5 (the test has no variance)."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    variance = float(np.sum((1.0 - 2.0 * p) ** 2 * p * (1.0 - p)))
    if variance <= 0.0:
        return None
    z = float(np.sum((y - p) * (1.0 - 2.0 * p))) / math.sqrt(variance)
    return float(math.erfc(abs(z) / math.sqrt(2.0)))


def outcome_performance(
    probabilities: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    reference_auroc: float | None,
    thresholds: DriftThresholds = DriftThresholds(),
    bootstrap: int = 200,
    seed: int = 0,
) -> Performance:
    """AUROC (bootstrap 95% CI over ``bootstrap`` seeded patient resamples) and ECE of scores against outcomes.

    ``probabilities`` are the calibrated probabilities the model gave, ``labels`` the 0/1 outcomes that arrived
    since, one per probability. Status, first that applies: ``too_few`` with fewer than ``min_current`` labelled
    patients (the numbers are still given, they never alert); ``alert`` when the AUROC is ``auroc_drop_alert`` or
    more below ``reference_auroc`` and the top of its 95% CI is below it too, or when the ECE reaches ``ece_alert``
    and Spiegelhalter's calibration test gives p below ``p_alert`` (both: large and not chance, as for drift);
    ``one_class`` when only one outcome is present
    (no AUROC); else ``ok``. DriftError for mismatched lengths, probabilities outside [0, 1] or labels not 0/1.
    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y_raw = np.asarray(labels).ravel()
    if p.shape != y_raw.shape:
        raise DriftError(f"outcome performance needs one label per probability, got {p.size} and {y_raw.size}")
    if p.size and not (np.all(np.isfinite(p)) and p.min() >= 0.0 and p.max() <= 1.0):
        raise DriftError("outcome performance needs probabilities in [0, 1]")
    if y_raw.size and not np.all(np.isin(y_raw, (0, 1))):
        raise DriftError("outcome performance needs 0/1 labels")
    if bootstrap < 0:
        raise ValueError(f"bootstrap resamples must be >= 0, got {bootstrap}")
    if reference_auroc is not None and not 0.0 <= reference_auroc <= 1.0:
        raise ValueError(f"reference AUROC must be in [0, 1], got {reference_auroc}")
    y = y_raw.astype(int)
    n, positives = int(y.size), int(y.sum())
    two_classes = 0 < positives < n
    auroc: Estimate | None = None
    if two_classes:
        if bootstrap:
            auroc = bootstrap_metrics(y, p, 0.5, resamples=bootstrap, seed=seed)["auroc"]
        else:
            auroc = Estimate(metric_value("auroc", y, p), math.nan, math.nan)
    ece = expected_calibration_error(y, p) if n else None
    calibration_p = spiegelhalter_p(p, y) if n else None
    facts = [f"{n} patients, {positives} with the outcome"]
    if auroc is not None:
        facts.append(f"AUROC {auroc.text()}")
        if reference_auroc is not None:
            facts.append(f"reference {reference_auroc:.3f}")
    if ece is not None:
        facts.append(f"ECE {ece:.3f}")
    reasons: list[str] = []
    if auroc is not None and reference_auroc is not None:
        drop = reference_auroc - auroc.value
        beyond_chance = math.isnan(auroc.high) or auroc.high < reference_auroc
        if round(drop, 12) >= thresholds.auroc_drop_alert and beyond_chance:
            reasons.append(f"AUROC {drop:.3f} below the reference (alert at {thresholds.auroc_drop_alert:g})")
    miscalibrated = calibration_p is not None and calibration_p < thresholds.p_alert
    if ece is not None and round(ece, 12) >= thresholds.ece_alert and miscalibrated:
        reasons.append(f"ECE {ece:.3f} >= {thresholds.ece_alert:g}, Spiegelhalter p {calibration_p:.1e}")
    status: PerformanceStatus
    if n < thresholds.min_current:
        status = "too_few"
        reasons = [_too_few(n, thresholds, "labelled patients")]
    elif reasons:
        status = "alert"
    elif not two_classes:
        status = "one_class"
        reasons = ["one outcome class only: no AUROC"]
    else:
        status = "ok"
    return Performance(
        n=n,
        positives=positives,
        auroc=auroc,
        ece=ece,
        calibration=calibration_bins(p, y) if n else (),
        reference_auroc=reference_auroc,
        status=status,
        detail="; ".join(reasons + facts),
        calibration_p=calibration_p,
    )


def alerts(drifts: Sequence[Drift], performance: Performance | None = None) -> list[str]:
    """The messages of every drift, and of the performance, whose status is ``alert``, in the order given
    (drifts first): ``value drift of creatinine: PSI 0.312 >= 0.25``, ``outcome performance: AUROC ...``."""
    found = [drift.message for drift in drifts if drift.status == "alert"]
    if performance is not None and performance.status == "alert":
        found.append(performance.message)
    return found
