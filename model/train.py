"""Training the fusion model: cross-validate a strategy, fit it on the whole table, write the model package.

:func:`train_package` is the entry point (``riskbridge train``). The pieces are
:mod:`riskbridge.model.fitting` (seeded splits, two-stage fitting, calibration: :func:`fit_strategies`, with the
determinism it guarantees) and :mod:`riskbridge.model.crossval` (stratified k-fold metrics, ablations and
missingness patterns: :func:`cross_validate`); their entry points are importable from here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from riskbridge.harmonize.features import FeatureSpec
from riskbridge.model.crossval import CrossValidation, cross_validate
from riskbridge.model.data import TrainingTable
from riskbridge.model.fitting import FittedModel, Progress, TrainOptions, fit_strategies
from riskbridge.model.metrics import bootstrap_metrics, expected_calibration_error
from riskbridge.model.network import Strategy
from riskbridge.model.package import save_package

__all__ = [
    "CrossValidation",
    "FittedModel",
    "Progress",
    "TrainOptions",
    "cross_validate",
    "fit_strategies",
    "train_package",
]


def train_package(
    spec: FeatureSpec,
    table: TrainingTable,
    out_dir: Path,
    strategy: Strategy = "hybrid",
    options: TrainOptions | None = None,
    folds: int = 5,
    name: str = "chest-ct-fusion",
    version: str = "0.1.0",
    progress: Progress | None = None,
) -> tuple[str, dict[str, Any]]:
    """Cross-validate ``strategy`` (``folds`` >= 2; 0 skips it), fit it on the whole table, write the package.

    Returns ``(sha256, metrics)``. The model card says "not for clinical use" when the table is synthetic.
    """
    options = options or TrainOptions()
    metrics: dict[str, Any] = {}
    if folds:
        cv = cross_validate(spec, table, [strategy], options, folds, progress=progress)
        block = cv.metrics(strategy, options.bootstrap, options.seed)
        block["description"] = f"pooled out-of-fold predictions, {folds}-fold stratified, bootstrap 95% CI"
        block["ablation_auroc"] = {
            key.split("-without-")[1]: cv.metrics(key, options.bootstrap, options.seed)["metrics"]["auroc"]
            for key in cv.probabilities
            if "-without-" in key
        }
        metrics["cross_validation"] = block
        metrics["patterns"] = {
            "description": f"{folds}-fold out-of-fold predictions with each test patient's inputs reduced to the "
            "pattern (n: patients with at least its modalities; natural_n: with exactly them); AUROC with "
            "bootstrap 95% CI, ECE with 10 equal-width bins",
            "table": cv.patterns(strategy, table.present, options.bootstrap, options.seed),
        }
    fitted = fit_strategies(spec, table, [strategy], options, name=name, version=version, progress=progress)[strategy]
    calibrated = fitted.probabilities(fitted.calibration_logits)
    estimates = bootstrap_metrics(
        fitted.calibration_labels, calibrated, fitted.threshold, options.bootstrap, options.seed
    )
    raw = 1.0 / (1.0 + np.exp(-fitted.calibration_logits))
    metrics["calibration_split"] = {
        "description": "the final model's own calibration split (also used to fit calibration: optimistic)",
        "n": len(fitted.calibration_labels),
        "metrics": {k: v.to_dict() for k, v in estimates.items()},
        "ece_uncalibrated": round(expected_calibration_error(fitted.calibration_labels, raw), 4),
    }
    metrics["score_reference"] = {
        "description": "calibrated probabilities of the final model on its calibration split, sorted: the score "
        "distribution riskbridge monitor compares a site's scores with",
        "probabilities": sorted(round(float(p), 4) for p in calibrated),
    }
    source = table.manifest.get("source", {})
    metrics["threshold"] = round(fitted.threshold, 4)
    metrics["training"] = {
        "synthetic": source.get("kind") == "synthetic",
        "source": ", ".join(f"{k}={v}" for k, v in sorted(source.items())),
        "rows": len(table),
        "positives": int(table.labels.sum()),
        "with_image": int(table.present[:, 0].sum()),
        "with_labs": int(table.present[:, 1].sum()),
        "with_notes": int(table.present[:, 2].sum()),
        "feature_spec": spec.label,
        "options": options.to_dict(),
        "history": fitted.history,
    }
    sha256 = save_package(out_dir, fitted.network.config, fitted.network, fitted.calibrator, metrics)
    return sha256, metrics
