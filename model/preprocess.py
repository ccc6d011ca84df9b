"""Image preprocessing for the fusion model: a CT series or HU volume -> the float32 ``(1, *size)`` input tensor.

One MONAI pipeline, applied lazily (``Compose(..., lazy=True)``) so that orientation to RAS, resampling to the
configured spacing and the centre crop/pad fold into a single resample of the volume; the HU window is applied
last, on the small output. The series is read by :func:`riskbridge.model.volume_io.load_series_volume` (slice
order along the normal, per-slice rescale, gantry tilt in the affine), so its errors (:class:`VolumeError`, with
a stable ``code``) are the errors of this module too.

Outside the scanned field of view the output is air: before resampling the volume is shifted so that the window
minimum is 0, which is what the resampler pads with.

Outputs are cached per series: ``<cache_dir>/<hashed SeriesInstanceUID>-<config hash>.npy``, written atomically.
A series UID names immutable content in DICOM, so a cached array stays valid while the configuration (and
:data:`PREPROCESS_VERSION`) is the same. See docs/model-scoring.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Orientation, ResizeWithPadOrCrop, ScaleIntensityRange, Spacing
from monai.utils import MetaKeys, SpaceKeys
from scipy import ndimage

from riskbridge.harmonize.volume import VolumeError
from riskbridge.model.volume_io import load_series_volume, series_files
from riskbridge.records import uid_hash

log = logging.getLogger(__name__)

# Bumped whenever the pipeline below changes what it outputs for the same config: invalidates every cached array.
PREPROCESS_VERSION = 1
# LPS (DICOM patient space) -> RAS (MONAI's default): x and y change sign.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Orientation's axis labels given explicitly: RAS, the same as MONAI's historical default (avoids its warning).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class PreprocessConfig:
    """What the image encoder sees: voxel spacing and grid size in RAS (x, y, z) and the HU window scaled to [0, 1].

    Stored inside a model package's config, so scoring preprocesses exactly as training did.
    """

    spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    size: tuple[int, int, int] = (64, 64, 64)
    hu_window: tuple[float, float] = (-1000.0, 400.0)

    def __post_init__(self) -> None:
        if len(self.spacing_mm) != 3 or not all(np.isfinite(v) and v > 0 for v in self.spacing_mm):
            raise ValueError(f"spacing_mm must be three positive numbers, got {self.spacing_mm!r}")
        if len(self.size) != 3 or not all(isinstance(v, int) and v > 0 for v in self.size):
            raise ValueError(f"size must be three positive integers, got {self.size!r}")
        low, high = self.hu_window
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise ValueError(f"hu_window must be (low, high) with low < high, got {self.hu_window!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON types (lists for the tuples)."""
        return {"spacing_mm": list(self.spacing_mm), "size": list(self.size), "hu_window": list(self.hu_window)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Rebuild a config from :meth:`to_dict`'s output; unknown or missing keys are an error."""
        keys = {"spacing_mm", "size", "hu_window"}
        if set(data) != keys:
            raise ValueError(f"a preprocess config has exactly the keys {sorted(keys)}, got {sorted(data)}")
        spacing = tuple(float(v) for v in data["spacing_mm"])
        size = tuple(int(v) for v in data["size"])
        window = tuple(float(v) for v in data["hu_window"])
        if len(spacing) != 3 or len(size) != 3 or len(window) != 2:
            raise ValueError("spacing_mm and size need three values, hu_window two")
        return cls(spacing_mm=spacing, size=size, hu_window=window)

    @property
    def digest(self) -> str:
        """A short hash of the config and :data:`PREPROCESS_VERSION`: the cache key's second half."""
        text = json.dumps({**self.to_dict(), "version": PREPROCESS_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Preprocessor:
    """Turn a staged series or an HU volume into the model's image input, optionally caching per series UID."""

    def __init__(self, config: PreprocessConfig, cache_dir: Path | None = None, *, lazy: bool = True) -> None:
        """``lazy=False`` runs the same transforms eagerly (one resample per transform): the benchmark's reference."""
        self.config = config
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        low, high = config.hu_window
        self._transform = Compose(
            [
                Orientation(axcodes="RAS", labels=RAS_LABELS),
                Spacing(pixdim=config.spacing_mm, mode="bilinear", padding_mode="zeros"),
                ResizeWithPadOrCrop(spatial_size=config.size),
                # the input was shifted so that `low` is 0 (see _run)
                ScaleIntensityRange(a_min=0.0, a_max=high - low, b_min=0.0, b_max=1.0, clip=True),
            ],
            lazy=lazy,
            # the lazy resample otherwise pads with the border value (the eager ResizeWithPadOrCrop pads with 0)
            overrides={"mode": "bilinear", "padding_mode": "zeros"},
        )

        self._spatial = Compose(
            [
                Orientation(axcodes="RAS", labels=RAS_LABELS),
                Spacing(pixdim=config.spacing_mm, mode="bilinear", padding_mode="zeros"),
                ResizeWithPadOrCrop(spatial_size=config.size),
            ],
            lazy=lazy,
            overrides={"mode": "bilinear", "padding_mode": "zeros"},
        )

    def cache_path(self, series_uid: str) -> Path | None:
        """Where the cached array of a series lives (``None`` without a cache directory)."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{uid_hash(series_uid)}-{self.config.digest}.npy"

    def from_series(self, series_dir: Path, series_uid: str | None = None) -> np.ndarray:
        """Preprocess a staged series directory; return float32 ``(1, *size)`` in [0, 1].

        ``series_uid`` is checked against every file (``mixed_series`` otherwise); without it the first file's
        SeriesInstanceUID is used. A cached array for the UID and config is returned without reading the series.
        Raises :class:`VolumeError` when the series cannot become a trustworthy volume.
        """
        series_dir = Path(series_dir)
        if not series_dir.is_dir():
            where = uid_hash(series_uid or series_dir.name)
            raise VolumeError("empty", "the staged series directory does not exist", series=where)
        uid = series_uid or _first_series_uid(series_dir)
        cached = self._load_cached(uid)
        if cached is not None:
            return cached
        volume = load_series_volume(series_dir, series_uid=uid)  # RAS affine, a fresh buffer we may modify
        result = self._run(volume)
        self._store(uid, result)
        return result

    def from_volume(self, hu: np.ndarray, affine: np.ndarray, space: Literal["LPS", "RAS"] = "LPS") -> np.ndarray:
        """Preprocess an HU array; return float32 ``(1, *size)`` in [0, 1]. Never cached, never modifies ``hu``.

        ``hu`` is 3-D (or 4-D with one leading channel) and ``affine`` (4x4) maps its indices ``(i, j, k, 1)`` to
        patient millimetres in ``space`` (DICOM's LPS by default): the array layout is whatever the affine says,
        e.g. harmonize.volume's ``(X, Y, Z)`` with its affine, or a ``(z, y, x)`` array with the columns permuted.
        """
        array = np.asarray(hu)
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 3 or min(array.shape) < 1:
            raise ValueError(f"hu must be a 3-D volume (optionally with one channel), got shape {np.shape(hu)}")
        matrix = np.asarray(affine, dtype=np.float64)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
            raise ValueError("affine must be a finite, invertible 4x4 matrix")
        if space == "LPS":
            matrix = LPS_TO_RAS @ matrix
        tensor = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))[None]
        ras = torch.as_tensor(matrix)
        volume = MetaTensor(tensor, affine=ras, meta={MetaKeys.SPACE: SpaceKeys.RAS, MetaKeys.ORIGINAL_AFFINE: ras})
        return self._run(volume)

    def mask_from_volume(
        self, occupancy: np.ndarray, affine: np.ndarray, space: Literal["LPS", "RAS"] = "LPS"
    ) -> np.ndarray:
        """A label volume (nodule occupancy in [0, 1], on the same grid as an image ``from_volume`` would read)
        -> the model grid's uint8 ``(1, *size)`` mask, through the image's own orientation, spacing and crop.

        A model voxel is labelled when its cell touches the label: the occupancy is first dilated by one model
        voxel's extent in source voxels, so a 3 mm nodule still marks a voxel of a 3 mm grid (sampling the label
        at voxel centres alone would miss it about half the time).
        """
        array = np.asarray(occupancy, dtype=np.float32)
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 3:
            raise ValueError(f"occupancy must be a 3-D volume, got shape {np.shape(occupancy)}")
        if array.min(initial=0.0) < 0.0 or array.max(initial=0.0) > 1.0:
            raise ValueError("occupancy values must lie in [0, 1]")
        matrix = np.asarray(affine, dtype=np.float64)
        if matrix.shape != (4, 4) or abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
            raise ValueError("affine must be an invertible 4x4 matrix")
        source_mm = np.linalg.norm(matrix[:3, :3], axis=0)
        # the model's spacing, as source voxels along each array axis (orientation-independent: the extent of the
        # model voxel's box along the direction that axis points to)
        directions = matrix[:3, :3] / source_mm
        extent = np.abs(directions.T) @ np.asarray(self.config.spacing_mm)
        # symmetric: a source voxel within half a model voxel of a model voxel's centre marks it
        footprint = tuple(2 * int(e / (2 * s) + 1e-6) + 1 for e, s in zip(extent, source_mm, strict=True))
        touched = ndimage.maximum_filter(array >= 0.5, size=footprint)
        if space == "LPS":
            matrix = LPS_TO_RAS @ matrix
        tensor = torch.from_numpy(np.asarray(touched, dtype=np.float32))[None]
        ras = torch.as_tensor(matrix)
        volume = MetaTensor(tensor, affine=ras, meta={MetaKeys.SPACE: SpaceKeys.RAS, MetaKeys.ORIGINAL_AFFINE: ras})
        output = self._spatial(_in_storage_order(volume))
        resampled = output.as_tensor().numpy() if isinstance(output, MetaTensor) else np.asarray(output)
        return (resampled >= 0.5).astype(np.uint8)

    def _run(self, volume: MetaTensor) -> np.ndarray:
        """Shift the window minimum to 0 in place (so padding is air), then apply the transforms."""
        volume = _in_storage_order(volume)
        volume.sub_(self.config.hu_window[0])
        output = self._transform(volume)
        array = np.ascontiguousarray(output.as_tensor().numpy() if isinstance(output, MetaTensor) else output)
        return array.astype(np.float32, copy=False)

    def _load_cached(self, series_uid: str) -> np.ndarray | None:
        """Return the cached array of the series, or ``None`` (no cache, no file, or a damaged file)."""
        path = self.cache_path(series_uid)
        if path is None or not path.exists():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            log.warning("preprocess cache: unreadable %s (%s); recomputing", path.name, type(error).__name__)
            return None
        if array.dtype != np.float32 or array.shape != (1, *self.config.size):
            log.warning("preprocess cache: %s has %s %s; recomputing", path.name, array.dtype, array.shape)
            return None
        return array

    def _store(self, series_uid: str, array: np.ndarray) -> None:
        """Write the array atomically (temporary file in the same directory, then rename)."""
        path = self.cache_path(series_uid)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.save(stream, array, allow_pickle=False)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _in_storage_order(volume: MetaTensor) -> MetaTensor:
    """The same voxels, no copy, with the spatial axes in memory order and the affine's columns permuted to match.

    harmonize.volume returns ``(1, X, Y, Z)`` as a view of a slice-contiguous ``(Z, Y, X)`` buffer; resampling that
    view reads memory with a large stride (measured 3-4x slower). In storage order the one lazy resample reads it
    sequentially, and the axis swap back to RAS costs nothing: Orientation folds it into the same resample.
    """
    strides = volume.stride()[1:]
    order = sorted(range(3), key=lambda axis: -strides[axis])
    if order == [0, 1, 2]:
        return volume
    tensor = volume.as_tensor().permute(0, *(axis + 1 for axis in order))
    affine = volume.affine[:, [*order, 3]]
    return MetaTensor(tensor, affine=affine, meta={MetaKeys.SPACE: SpaceKeys.RAS, MetaKeys.ORIGINAL_AFFINE: affine})


def _first_series_uid(series_dir: Path) -> str:
    """Read the SeriesInstanceUID from the first file's header (no pixel data); VolumeError if there is none."""
    files = series_files(series_dir)
    series = uid_hash(series_dir.name)
    if not files:
        raise VolumeError("empty", "no DICOM files", series=series)
    try:
        header = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        uid = str(header.SeriesInstanceUID)
    except Exception as error:  # pydicom raises many types for damaged files; all mean "unreadable"
        raise VolumeError(
            "unreadable", f"cannot parse ({type(error).__name__})", series=series, instance=uid_hash(files[0].stem)
        ) from None
    if not uid:
        raise VolumeError("unreadable", "no SeriesInstanceUID", series=series, instance=uid_hash(files[0].stem))
    return uid
