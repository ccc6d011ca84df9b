"""A tiny fusion-model package with seeded random weights, for tests of scoring plumbing (its scores mean nothing).

Its metrics carry a modality-pattern table (``patterns``, in the format training writes) so the minimum-data policy
lets every pattern through by default; a test passes its own AUROCs, or ``patterns=None`` for a package without one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from riskbridge.harmonize.features import PATTERNS, load_default_feature_spec
from riskbridge.model.calibration import Calibrator
from riskbridge.model.network import FusionNet, ModelConfig, Strategy
from riskbridge.model.package import lab_feature_names, save_package
from riskbridge.model.preprocess import PreprocessConfig

CALIBRATOR = Calibrator("platt", scale=0.5, bias=-0.2)
# Every pattern validated well above the shipped spec's floor.
ALL_VALIDATED: Mapping[str, float] = dict.fromkeys(PATTERNS, 0.9)


def pattern_table(aurocs: Mapping[str, float | None]) -> dict[str, Any]:
    """A ``patterns`` block for a package's metrics with these AUROCs (None: a row without one); the other columns
    are made-up but plausible."""
    table: dict[str, Any] = {}
    for index, (pattern, auroc) in enumerate(aurocs.items()):
        n = 400 - 40 * index
        table[pattern] = {
            "n": n,
            "natural_n": n // 2,
            "positives": n // 4,
            "auroc": None if auroc is None else {"value": auroc, "low": auroc - 0.05, "high": min(1.0, auroc + 0.05)},
            "ece": 0.03,
        }
    return {"description": "tiny test package: made-up numbers", "table": table}


def tiny_package(
    directory: Path,
    strategy: Strategy = "hybrid",
    version: str = "0.0.1",
    spacing_mm: float = 4.0,
    patterns: Mapping[str, float | None] | None = ALL_VALIDATED,
    image_encoder: Literal["resnet", "detector"] = "resnet",
) -> Path:
    """Save a small package (16³ input at ``spacing_mm``, 8-wide embeddings) into ``directory``; return it.

    ``patterns`` maps modality patterns to the AUROC its metrics claim; None leaves the ``patterns`` block out.
    """
    spec = load_default_feature_spec()
    config = ModelConfig(
        name="tiny",
        version=version,
        strategy=strategy,
        feature_spec=spec.label,
        lab_features=lab_feature_names(spec),
        note_features=spec.flags,
        preprocess=PreprocessConfig(spacing_mm=(spacing_mm,) * 3, size=(16, 16, 16), hu_window=(-1000.0, 400.0)),
        embed_dim=8,
        hidden_dim=8,
        image_channels=(4, 4, 4, 4),
        image_encoder=image_encoder,
        detector_channels=(4, 8),
    )
    metrics: dict[str, Any] = {"training": {"synthetic": True}, "threshold": 0.5}
    if patterns is not None:
        metrics["patterns"] = pattern_table(patterns)
    torch.manual_seed(0)
    save_package(directory, config, FusionNet(config), CALIBRATOR, metrics)
    return directory
