"""Training tables: the labelled, harmonized inputs the fusion model is trained on (format in docs/model.md).

A training table is a directory::

    manifest.json   format, version, feature_spec label, preprocess config, source, counts
    table.jsonl     one row per patient: key, label, feature_spec, names, values, observed, volume
    volumes/<key>.npy   the preprocessed image (float16, shape (1, *preprocess.size)); ``volume`` null: no image
    masks/<key>.npz     optional dense nodule label on the same grid (uint8, compressed); ``mask`` null: unlabelled

``mask`` (optional) is a training-only dense label: 1 where a nodule touches the voxel. An all-zero mask says "no
nodule" (a radiologist looked); a null mask says nothing, and the row takes no part in the segmenter's training.
A site derives it from its radiologists' DICOM SEG objects (:func:`series_row` with :mod:`riskbridge.model.seg`);
the synthetic builder renders it from the truth's nodules. Both go through :meth:`Preprocessor.mask_from_volume`,
the image's own spatial transforms.

``image_target`` (optional, null when unknown) is a number the image alone should predict, used as auxiliary
supervision of the image stage: the synthetic builder writes the truth's image term (the nodule burden); a
clinical cohort could carry a radiologist's nodule measurements.

``values``/``observed`` are a :class:`~riskbridge.harmonize.features.FeatureVector`'s (imputed values and the
missingness mask), so any cohort the pipeline exports (feature vectors and preprocessed volumes from its ledger)
trains the same way as the synthetic cohort. The synthetic cohort's table (what trained the reference model) is
written by :func:`riskbridge.dev.training_table.build_synthetic_table`, a development tool: this module, like the
rest of the model package, never imports the synthetic-data generator.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from riskbridge.errors import DataError
from riskbridge.harmonize.features import FeatureSpec, FeatureVector
from riskbridge.model.package import tabular_tensors
from riskbridge.model.preprocess import PreprocessConfig, Preprocessor

if TYPE_CHECKING:
    from torch import Tensor

TABLE_FORMAT = "riskbridge-training-table"
TABLE_VERSION = 1
# What the reference model sees: 288 x 216 x 84 mm around the scan centre at 3 mm (both lungs fit in x and y; a
# 3 mm nodule still lights a voxel, which at 5 mm it mostly did not).
DEFAULT_PREPROCESS = PreprocessConfig(spacing_mm=(3.0, 3.0, 3.0), size=(96, 72, 28), hu_window=(-1000.0, 400.0))


class TrainingTableError(DataError, ValueError):
    """A training table is missing, malformed or built for another feature spec / preprocessing."""


@dataclass(frozen=True)
class TableRow:
    """One patient of a training table: label, feature vector and preprocessed volume (None: no image)."""

    key: str
    label: int
    vector: FeatureVector
    volume: np.ndarray | None
    image_target: float | None = None
    mask: np.ndarray | None = None  # uint8 (1, *size): the dense nodule label, training only


@dataclass
class TrainingTable:
    """A loaded table as arrays: ``labs``/``notes`` are the network inputs, ``present`` is ``[N, 3]`` bool."""

    root: Path
    manifest: dict[str, Any]
    preprocess: PreprocessConfig
    keys: list[str]
    labels: np.ndarray
    labs: np.ndarray
    notes: np.ndarray
    present: np.ndarray
    volumes: np.ndarray
    image_target: np.ndarray  # NaN where the row has none
    masks: np.ndarray | None = None  # uint8 [N, 1, *size] when any row has a mask
    has_mask: np.ndarray | None = None  # bool [N]: which rows' masks are labels (the others are zeros, unknown)

    def __len__(self) -> int:
        """Number of patients."""
        return len(self.keys)

    def subset(self, index: np.ndarray) -> TrainingTable:
        """The rows ``index`` (copies of the small arrays, a fancy-indexed copy of the volumes)."""
        return TrainingTable(
            self.root,
            self.manifest,
            self.preprocess,
            [self.keys[i] for i in index],
            self.labels[index],
            self.labs[index],
            self.notes[index],
            self.present[index],
            self.volumes[index],
            self.image_target[index],
            None if self.masks is None else self.masks[index],
            None if self.has_mask is None else self.has_mask[index],
        )

    def encode_images(self, encode: Callable[[Tensor], Tensor], width: int, batch_size: int) -> Tensor:
        """``encode`` applied to the volumes of every row with an image, in batches -> ``[N, width]`` (zeros where
        a row has none). The caller sets eval mode and gradients."""
        import torch

        out = torch.zeros((len(self), width))
        rows = np.flatnonzero(self.present[:, 0])
        for start in range(0, len(rows), batch_size):
            index = rows[start : start + batch_size]
            out[index] = encode(torch.from_numpy(self.volumes[index].astype(np.float32)))
        return out

    @property
    def mask_rows(self) -> np.ndarray:
        """Indices of the rows with both an image and a dense label (the segmenter's training rows)."""
        if self.has_mask is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.has_mask & self.present[:, 0])


class TableWriter:
    """Write a training table row by row; :meth:`close` writes the manifest (a table without one is unfinished)."""

    def __init__(self, out_dir: Path, spec: FeatureSpec, preprocess: PreprocessConfig, source: dict[str, Any]):
        """Create ``out_dir`` (it must be empty or an earlier table, which is replaced)."""
        self.root = Path(out_dir)
        if self.root.exists() and any(self.root.iterdir()) and not (self.root / "table.jsonl").exists():
            raise TrainingTableError(f"{self.root}: exists and is not a training table; refusing to overwrite")
        for folder, pattern in (("volumes", "*.npy"), ("masks", "*.npz")):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
            for stale in (self.root / folder).glob(pattern):
                stale.unlink()
        (self.root / "manifest.json").unlink(missing_ok=True)
        self.spec, self.preprocess, self.source = spec, preprocess, source
        self._rows = (self.root / "table.jsonl").open("w", encoding="utf-8")
        self.count = 0
        self.with_volume = 0
        self.with_mask = 0
        self.positives = 0

    def add(self, row: TableRow) -> None:
        """Append one patient (its volume is stored as float16)."""
        if row.vector.spec != self.spec.label:
            raise TrainingTableError(f"row {row.key}: vector built by {row.vector.spec}, table is {self.spec.label}")
        if row.label not in (0, 1):
            raise TrainingTableError(f"row {row.key}: label must be 0 or 1, got {row.label!r}")
        volume_name = None
        if row.volume is not None:
            expected = (1, *self.preprocess.size)
            if row.volume.shape != expected:
                raise TrainingTableError(f"row {row.key}: volume shape {row.volume.shape}, expected {expected}")
            volume_name = f"volumes/{row.key}.npy"
            np.save(self.root / volume_name, row.volume.astype(np.float16), allow_pickle=False)
            self.with_volume += 1
        mask_name = None
        if row.mask is not None:
            if row.volume is None:
                raise TrainingTableError(f"row {row.key}: a mask without a volume")
            if row.mask.shape != row.volume.shape:
                raise TrainingTableError(f"row {row.key}: mask shape {row.mask.shape}, volume {row.volume.shape}")
            mask_name = f"masks/{row.key}.npz"
            np.savez_compressed(self.root / mask_name, mask=(row.mask > 0).astype(np.uint8))
            self.with_mask += 1
        record = {
            "key": row.key,
            "label": row.label,
            "feature_spec": row.vector.spec,
            "names": list(row.vector.names),
            "values": list(row.vector.values),
            "observed": list(row.vector.observed),
            "volume": volume_name,
            "image_target": row.image_target,
            "mask": mask_name,
        }
        self._rows.write(json.dumps(record, sort_keys=True) + "\n")
        self.count += 1
        self.positives += row.label

    def close(self, excluded: dict[str, int] | None = None) -> Path:
        """Finish the table: write manifest.json atomically and return the table directory."""
        self._rows.close()
        manifest = {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "feature_spec": self.spec.label,
            "preprocess": self.preprocess.to_dict(),
            "source": self.source,
            "rows": self.count,
            "with_volume": self.with_volume,
            "with_mask": self.with_mask,
            "positives": self.positives,
            "excluded": dict(sorted((excluded or {}).items())),
        }
        handle, temporary = tempfile.mkstemp(dir=self.root, prefix=".manifest.", suffix=".tmp")
        with os.fdopen(handle, "w") as stream:
            json.dump(manifest, stream, indent=2, sort_keys=True)
        os.replace(temporary, self.root / "manifest.json")
        return self.root


def read_manifest(root: Path) -> dict[str, Any]:
    """A table's manifest, checked for format and version."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise TrainingTableError(f"{root}: no manifest.json (not a training table, or its build did not finish)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != TABLE_FORMAT or manifest.get("version") != TABLE_VERSION:
        raise TrainingTableError(f"{root}: not a {TABLE_FORMAT} version {TABLE_VERSION}")
    return dict(manifest)


def _table_rows(root: Path, spec: FeatureSpec) -> Iterator[tuple[int, dict[str, Any], FeatureVector, int]]:
    """The table's rows, checked: (line number, row, feature vector, label), for a table built with ``spec``."""
    manifest = read_manifest(root)
    if manifest["feature_spec"] != spec.label:
        raise TrainingTableError(f"{root}: built with feature spec {manifest['feature_spec']}, not {spec.label}")
    with (root / "table.jsonl").open(encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            try:
                row = json.loads(line)
                vector = FeatureVector(
                    row["feature_spec"],
                    tuple(row["names"]),
                    tuple(float(v) for v in row["values"]),
                    tuple(bool(v) for v in row["observed"]),
                )
                label = int(row["label"])
            except (ValueError, KeyError, TypeError) as exc:
                raise TrainingTableError(f"{root}/table.jsonl line {number}: malformed row ({exc})") from None
            if label not in (0, 1):
                raise TrainingTableError(f"{root}/table.jsonl line {number}: label must be 0 or 1")
            if not all(math.isfinite(v) for v in vector.values):
                raise TrainingTableError(f"{root}/table.jsonl line {number}: non-finite feature value")
            yield number, row, vector, label


def table_vectors(root: Path, spec: FeatureSpec) -> list[tuple[FeatureVector, bool]]:
    """The feature vector of every row and whether the row has a volume, without reading any volume: what the
    monitor compares a site's recent patients with."""
    root = Path(root)
    found = [(vector, row.get("volume") is not None) for _, row, vector, _ in _table_rows(root, spec)]
    if not found:
        raise TrainingTableError(f"{root}: the table has no rows")
    return found


def load_table(root: Path, spec: FeatureSpec) -> TrainingTable:
    """Load a table built with ``spec``; every row's names must be the spec's and every volume must exist."""
    root = Path(root)
    manifest = read_manifest(root)
    preprocess = PreprocessConfig.from_dict(manifest["preprocess"])
    keys: list[str] = []
    labels, labs, notes, present, volume_files, image_targets, mask_files = [], [], [], [], [], [], []
    for number, row, vector, label in _table_rows(root, spec):
        try:
            lab_input, note_input, has_labs, has_notes = tabular_tensors(spec, vector)
        except ValueError as exc:
            raise TrainingTableError(f"{root}/table.jsonl line {number}: {exc}") from None
        keys.append(str(row["key"]))
        labels.append(label)
        labs.append(lab_input)
        notes.append(note_input)
        volume_files.append(row.get("volume"))
        mask_files.append(row.get("mask"))
        if row.get("mask") is not None and row.get("volume") is None:
            raise TrainingTableError(f"{root}/table.jsonl line {number}: a mask without a volume")
        target = row.get("image_target")
        image_targets.append(float(target) if target is not None else math.nan)
        present.append((row.get("volume") is not None, has_labs, has_notes))
    if not keys:
        raise TrainingTableError(f"{root}: the table has no rows")
    shape = (1, *preprocess.size)
    volumes = _row_arrays(root, keys, volume_files, shape, np.float16, _read_volume)
    has_mask = np.array([name is not None for name in mask_files], dtype=bool)
    masks = _row_arrays(root, keys, mask_files, shape, np.uint8, _read_mask) if has_mask.any() else None
    return TrainingTable(
        root,
        manifest,
        preprocess,
        keys,
        np.asarray(labels, dtype=np.int64),
        np.stack(labs),
        np.stack(notes),
        np.asarray(present, dtype=bool),
        volumes,
        np.asarray(image_targets, dtype=np.float64),
        masks,
        has_mask if masks is not None else None,
    )


def _read_volume(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _read_mask(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as stored:
        return stored["mask"] > 0


def _row_arrays(
    root: Path,
    keys: list[str],
    files: list[str | None],
    shape: tuple[int, ...],
    dtype: type[np.generic],
    read: Callable[[Path], np.ndarray],
) -> np.ndarray:
    """The rows' arrays (volumes or masks) stacked ``[N, *shape]``; zeros where a row names no file."""
    out = np.zeros((len(keys), *shape), dtype=dtype)
    for i, name in enumerate(files):
        if name is None:
            continue
        path = root / name
        if not path.is_file():
            raise TrainingTableError(f"{root}: row {keys[i]} names {name}, which does not exist")
        try:
            array = read(path)
        except (OSError, ValueError, KeyError) as exc:
            raise TrainingTableError(f"{root}: {name} is unreadable ({exc})") from None
        if array.shape != shape:
            raise TrainingTableError(f"{root}: {name} has shape {array.shape}, expected {shape}")
        out[i] = array
    return out


def series_row(
    key: str,
    label: int,
    vector: FeatureVector,
    series_dir: Path,
    preprocessor: Preprocessor,
    segmentation: Path | None = None,
    segments: Sequence[int] | None = None,
) -> TableRow:
    """A site patient's row: its staged CT series preprocessed and, when its radiologists segmented the nodules, the
    DICOM SEG ``segmentation`` (``segments`` of it; default all) as the dense mask on the same grid.

    Without a SEG the row has no mask (not "no nodule"). Raises the volume module's ``VolumeError`` for a series
    that is no trustworthy volume and :class:`~riskbridge.model.seg.SegmentationError` for a SEG that does not fit it.
    """
    from riskbridge.model.seg import seg_occupancy
    from riskbridge.model.volume_io import load_series_volume

    volume = load_series_volume(series_dir)
    affine = np.asarray(volume.affine, dtype=np.float64)
    image = preprocessor.from_volume(volume.array, affine, space="RAS")
    mask = None
    if segmentation is not None:
        occupancy = seg_occupancy(segmentation, series_dir, segments)
        mask = preprocessor.mask_from_volume(occupancy, affine, space="RAS")
    return TableRow(key, label, vector, image, None, mask)
