"""A tiny fusion-model package with seeded random weights, for tests of scoring plumbing (its scores mean nothing)."""

from __future__ import annotations

from pathlib import Path

import torch

from riskbridge.harmonize.features import load_default_feature_spec
from riskbridge.model.calibration import Calibrator
from riskbridge.model.network import FusionNet, ModelConfig, Strategy
from riskbridge.model.package import lab_feature_names, save_package
from riskbridge.model.preprocess import PreprocessConfig

CALIBRATOR = Calibrator("platt", scale=0.5, bias=-0.2)


def tiny_package(
    directory: Path, strategy: Strategy = "hybrid", version: str = "0.0.1", spacing_mm: float = 4.0
) -> Path:
    """Save a small package (16³ input at ``spacing_mm``, 8-wide embeddings) into ``directory``; return it."""
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
    )
    torch.manual_seed(0)
    save_package(directory, config, FusionNet(config), CALIBRATOR, {"training": {"synthetic": True}, "threshold": 0.5})
    return directory
