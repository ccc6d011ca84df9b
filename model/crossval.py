"""Cross-validation of the fusion strategies: stratified k-fold out-of-fold predictions, modality ablations and
missingness patterns, with bootstrap confidence intervals (docs/model.md).

Each fold fits every strategy with :func:`riskbridge.model.fitting.fit_strategies` on the other folds (its own
calibration split inside them) and predicts the held-out fold, also with one modality dropped (the ablations of
the fusion strategies) and with the inputs reduced to each missingness pattern.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from riskbridge.harmonize.features import FeatureSpec
from riskbridge.model.data import TrainingTable
from riskbridge.model.fitting import (
    FUSION_STRATEGIES,
    Progress,
    TrainOptions,
    fit_strategies,
    image_embeddings,
    predict,
)
from riskbridge.model.metrics import bootstrap_metrics, expected_calibration_error
from riskbridge.model.network import Strategy
from riskbridge.records import MODALITIES, all_patterns, pattern_name


@dataclass
class CrossValidation:
    """Out-of-fold predictions of every strategy (and ablation) over the whole table."""

    labels: np.ndarray
    folds: np.ndarray
    logits: dict[str, np.ndarray]  # key: strategy, or "strategy-without-modality" for ablations
    probabilities: dict[str, np.ndarray]
    raw_probabilities: dict[str, np.ndarray]
    thresholds: dict[str, list[float]]
    attention: dict[str, np.ndarray]

    def metrics(self, key: str, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
        """Metrics with bootstrap CIs of one strategy's pooled out-of-fold predictions (scored rows only)."""
        p = self.probabilities[key]
        scored = np.isfinite(p)
        threshold = float(np.mean(self.thresholds[base_strategy(key)]))
        estimates = bootstrap_metrics(self.labels[scored], p[scored], threshold, resamples, seed)
        raw = self.raw_probabilities[key][scored]
        return {
            "n": int(scored.sum()),
            "metrics": {k: v.to_dict() for k, v in estimates.items()},
            "ece_uncalibrated": round(expected_calibration_error(self.labels[scored], raw), 4),
            "threshold": round(threshold, 4),
        }

    def patterns(self, strategy: str, present: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
        """Per missingness pattern: AUROC (bootstrap CI) and ECE of ``strategy`` with each test patient's inputs
        reduced to the pattern (patients with at least its modalities: ``n``), and how many patients have exactly
        that pattern (``natural_n``). Patterns with fewer than 20 patients or one class are left out (no AUROC).
        """
        table: dict[str, Any] = {}
        for pattern in all_patterns():
            key = f"{strategy}@{pattern}"
            if key not in self.probabilities:
                continue
            p = self.probabilities[key]
            scored = np.isfinite(p)
            y = self.labels[scored]
            if scored.sum() < 20 or y.min() == y.max():
                continue
            auroc = bootstrap_metrics(y, p[scored], 0.5, resamples, seed)["auroc"]
            table[pattern] = {
                "n": int(scored.sum()),
                "natural_n": int(sum(pattern_name(row) == pattern for row in present)),
                "positives": int(y.sum()),
                "auroc": auroc.to_dict(),
                "ece": round(expected_calibration_error(y, p[scored]), 4),
            }
        return table


def base_strategy(key: str) -> str:
    """The strategy of a cross-validation key (``hybrid``, ``hybrid-without-notes``, ``hybrid@image+labs``)."""
    return key.split("-without-")[0].split("@")[0]


def cross_validate(
    spec: FeatureSpec,
    table: TrainingTable,
    strategies: Sequence[Strategy],
    options: TrainOptions,
    folds: int = 5,
    ablate: bool = True,
    progress: Progress | None = None,
) -> CrossValidation:
    """Stratified k-fold: fit every strategy on k-1 folds, predict the held-out fold (with modality ablations)."""
    if folds < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=options.seed)
    n = len(table)
    fold_of = np.zeros(n, dtype=int)
    keys: list[str] = list(strategies)
    if ablate:
        keys += [f"{s}-without-{m}" for s in strategies if s in FUSION_STRATEGIES for m in MODALITIES]
        keys += [f"{s}@{p}" for s in strategies for p in all_patterns()]
    logits = {k: np.full(n, np.nan) for k in keys}
    probabilities = {k: np.full(n, np.nan) for k in keys}
    raw = {k: np.full(n, np.nan) for k in keys}
    attention = {k: np.zeros((n, 3)) for k in keys}
    thresholds: dict[str, list[float]] = {s: [] for s in strategies}
    for fold, (train_index, test_index) in enumerate(splitter.split(np.zeros(n), table.labels)):
        fold_of[test_index] = fold
        fold_options = TrainOptions(**{**options.to_dict(), "seed": options.seed + 1000 * (fold + 1)})

        def step(stage: str, done: int, total: int, fold: int = fold) -> None:
            if progress:
                progress(f"fold {fold + 1}/{folds} {stage}", done, total)

        fitted = fit_strategies(spec, table.subset(train_index), strategies, fold_options, progress=step)
        test = table.subset(test_index)
        # every strategy of a fold shares one frozen image encoder: encode the test images once
        encoders = [m.network for m in fitted.values() if m.network.image_encoder is not None]
        test_embeddings = image_embeddings(encoders[0], test) if encoders else None
        for strategy, model in fitted.items():
            thresholds[strategy].append(model.threshold)
            variants: list[tuple[str, str | None, tuple[str, ...] | None]] = [(strategy, None, None)]
            if ablate and strategy in FUSION_STRATEGIES:
                variants += [(f"{strategy}-without-{m}", m, None) for m in MODALITIES]
            if ablate:
                variants += [(f"{strategy}@{p}", None, tuple(p.split("+"))) for p in all_patterns()]
            for key, drop, keep in variants:
                z, weights, scored = predict(model.network, test, drop=drop, keep=keep, embeddings=test_embeddings)
                if keep is not None:  # a pattern is validated on the patients who have at least its modalities
                    scored &= test.present[:, [m in keep for m in MODALITIES]].all(axis=1)
                rows = test_index[scored]
                logits[key][rows] = z[scored]
                probabilities[key][rows] = model.probabilities(z[scored])
                raw[key][rows] = 1.0 / (1.0 + np.exp(-z[scored]))
                attention[key][rows] = weights[scored]
    return CrossValidation(table.labels, fold_of, logits, probabilities, raw, thresholds, attention)
