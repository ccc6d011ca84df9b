"""The fusion model: MONAI image encoder + tabular encoder, training, calibration and batch scoring.

Installed as :mod:`riskbridge.model`. Import torch and MONAI only inside this package, never from DAG files.

The public API, importable from here (``from riskbridge.model import Scorer``) or from its module:

- scoring (:mod:`~riskbridge.model.scoring`): :class:`Scorer`, :class:`ScoreRequest`, :class:`ScoreResult`,
  :class:`ScoringError`, :func:`default_workers`;
- model packages (:mod:`~riskbridge.model.package`, no torch): :class:`ModelPackage`, :class:`PackageInfo`,
  :class:`ModelPackageError`, :func:`load_package`, :func:`save_package`, :func:`read_package_info`,
  :func:`reference_package_path`, :data:`REFERENCE_VERSION`;
- training (:mod:`~riskbridge.model.train`, :mod:`~riskbridge.model.fitting`, :mod:`~riskbridge.model.crossval`):
  :func:`train_package`, :func:`fit_strategies`, :func:`cross_validate`, :class:`TrainOptions`,
  :class:`FittedModel`, :class:`CrossValidation`;
- training tables (:mod:`~riskbridge.model.data`): :class:`TrainingTable`, :class:`TableRow`,
  :class:`TableWriter`, :class:`TrainingTableError`, :func:`load_table`, :func:`series_row`,
  :data:`DEFAULT_PREPROCESS`;
- the network and its input (:mod:`~riskbridge.model.network`, :mod:`~riskbridge.model.preprocess`,
  :mod:`~riskbridge.model.calibration`): :class:`FusionNet`, :class:`ModelConfig`, :data:`STRATEGIES`,
  :data:`Strategy`, :class:`PreprocessConfig`, :class:`Preprocessor`, :class:`Calibrator`;
- reading staged series (:mod:`~riskbridge.model.volume_io`, :mod:`~riskbridge.model.seg`):
  :func:`load_series_volume`, :func:`series_files`, :func:`seg_occupancy`, :func:`find_segmentations`,
  :class:`SegmentationError`.

Every name is imported lazily, on first use (PEP 562): importing this package, or a light module of it such as
:mod:`riskbridge.model.package`, never imports torch or MONAI (Airflow parses the DAG files with it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from riskbridge.lazy import lazy_exports

if TYPE_CHECKING:
    from riskbridge.model.calibration import Calibrator
    from riskbridge.model.crossval import CrossValidation, cross_validate
    from riskbridge.model.data import (
        DEFAULT_PREPROCESS,
        TableRow,
        TableWriter,
        TrainingTable,
        TrainingTableError,
        load_table,
        series_row,
    )
    from riskbridge.model.fitting import FittedModel, TrainOptions, fit_strategies
    from riskbridge.model.network import STRATEGIES, FusionNet, ModelConfig, Strategy
    from riskbridge.model.package import (
        REFERENCE_VERSION,
        ModelPackage,
        ModelPackageError,
        PackageInfo,
        load_package,
        read_package_info,
        reference_package_path,
        save_package,
    )
    from riskbridge.model.preprocess import PreprocessConfig, Preprocessor
    from riskbridge.model.scoring import Scorer, ScoreRequest, ScoreResult, ScoringError, default_workers
    from riskbridge.model.seg import SegmentationError, find_segmentations, seg_occupancy
    from riskbridge.model.train import train_package
    from riskbridge.model.volume_io import load_series_volume, series_files

# Each public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "Calibrator": "calibration",
    "CrossValidation": "crossval",
    "cross_validate": "crossval",
    "DEFAULT_PREPROCESS": "data",
    "TableRow": "data",
    "TableWriter": "data",
    "TrainingTable": "data",
    "TrainingTableError": "data",
    "load_table": "data",
    "series_row": "data",
    "FittedModel": "fitting",
    "TrainOptions": "fitting",
    "fit_strategies": "fitting",
    "STRATEGIES": "network",
    "FusionNet": "network",
    "ModelConfig": "network",
    "Strategy": "network",
    "REFERENCE_VERSION": "package",
    "ModelPackage": "package",
    "ModelPackageError": "package",
    "PackageInfo": "package",
    "load_package": "package",
    "read_package_info": "package",
    "reference_package_path": "package",
    "save_package": "package",
    "PreprocessConfig": "preprocess",
    "Preprocessor": "preprocess",
    "ScoreRequest": "scoring",
    "ScoreResult": "scoring",
    "Scorer": "scoring",
    "ScoringError": "scoring",
    "default_workers": "scoring",
    "SegmentationError": "seg",
    "find_segmentations": "seg",
    "seg_occupancy": "seg",
    "train_package": "train",
    "load_series_volume": "volume_io",
    "series_files": "volume_io",
}

__all__ = [
    "DEFAULT_PREPROCESS",
    "REFERENCE_VERSION",
    "STRATEGIES",
    "Calibrator",
    "CrossValidation",
    "FittedModel",
    "FusionNet",
    "ModelConfig",
    "ModelPackage",
    "ModelPackageError",
    "PackageInfo",
    "PreprocessConfig",
    "Preprocessor",
    "ScoreRequest",
    "ScoreResult",
    "Scorer",
    "ScoringError",
    "SegmentationError",
    "Strategy",
    "TableRow",
    "TableWriter",
    "TrainOptions",
    "TrainingTable",
    "TrainingTableError",
    "cross_validate",
    "default_workers",
    "find_segmentations",
    "fit_strategies",
    "load_package",
    "load_series_volume",
    "load_table",
    "read_package_info",
    "reference_package_path",
    "save_package",
    "seg_occupancy",
    "series_files",
    "series_row",
    "train_package",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
