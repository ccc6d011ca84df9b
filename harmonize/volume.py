"""Series to volume: build one CT volume (a MONAI MetaTensor in Hounsfield units) from a series' read datasets.

Pure decisions, no I/O: :func:`build_volume` takes the series' pydicom datasets, already read completely (header
and pixel data), checks that they make one trustworthy volume and assembles it. Reading a staged series directory
(``<staging>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``, see :mod:`riskbridge.connectors.staging`) is
:func:`riskbridge.model.volume_io.load_series_volume`'s job. Classic single-frame series and Enhanced CT
multi-frame instances (geometry and rescale from the per-frame / shared functional groups) are both accepted; the
pixel data of every transfer syntax pydicom has a decoder for is decoded in memory (native little/big endian, RLE,
JPEG baseline/lossless, JPEG-LS, JPEG 2000 via the installed pylibjpeg and GDCM plugins).

The slice description and consistency checks (:class:`VolumeSlice`, :func:`describe_slices`,
:func:`check_consistent` and the attribute parsers) are public so that readers of the same series (the SEG reader,
:mod:`riskbridge.model.seg`) order and check slices exactly as the volume does.

Conventions (see docs/volume.md):

* **Slice order** is by position along the slice normal (row direction x column direction, dotted with
  ImagePositionPatient), never by InstanceNumber.
* **Array layout** is MONAI's: channel first, ``(1, X, Y, Z)`` where X runs along a row (column index), Y down the
  columns (row index) and Z along the sorted slices, the same layout as MONAI's ITKReader and PydicomReader. The
  tensor is a strided view over a slice-contiguous buffer (no copy); call ``.contiguous()`` if a consumer needs it.
* **Affine** maps ``(i, j, k, 1)`` voxel indices to millimetres in RAS by default (MONAI's convention), with
  ``meta["space"]`` saying which; ``space="LPS"`` gives DICOM's own patient coordinates instead. The third column
  is the measured step between slice origins, so a gantry-tilted series gets a sheared affine that places every
  slice exactly (``meta["gantry_tilt_deg"]`` reports the tilt).
* **Values** are float32 ``stored * RescaleSlope + RescaleIntercept``, applied per slice (per frame for Enhanced CT)
  because they may differ between slices.

A series that cannot be turned into a trustworthy volume raises :class:`VolumeError` with a stable ``code`` and a
message naming the hashed series UID and the offending instance (hashed), never a value from the files.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import MetaKeys, SpaceKeys
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder

from riskbridge.errors import DataError
from riskbridge.records import uid_hash

# Every code VolumeError can carry, with what it means; docs/volume.md lists the same table.
ERROR_CODES: dict[str, str] = {
    "empty": "no DICOM file was given or found",
    "unreadable": "a file is not DICOM or cannot be parsed",
    "mixed_series": "the files belong to more than one SeriesInstanceUID",
    "missing_pixel_data": "an instance has no PixelData (or FloatPixelData)",
    "unsupported_pixels": "more than one sample per pixel (colour)",
    "undecodable": "pixel data is present but no installed decoder could decode it (or it is truncated)",
    "missing_geometry": "ImagePositionPatient, ImageOrientationPatient or PixelSpacing is absent",
    "invalid_geometry": "geometry values are unparsable, non-finite, or the orientation is not orthonormal",
    "mixed_orientation": "slices have different ImageOrientationPatient",
    "mixed_shape": "slices have different Rows/Columns",
    "mixed_pixel_spacing": "slices have different PixelSpacing",
    "too_few_slices": "fewer slices than the caller's min_slices",
    "duplicate_position": "two slices at the same position along the normal",
    "gap": "one or more slices missing (a step is a whole multiple of the nominal spacing)",
    "nonuniform_spacing": "a step between slices differs from the nominal spacing beyond the tolerance",
    "off_axis": "a slice origin lies off the line through the first and last slice origins",
}

# Two slices closer than this along the normal are the same position (scanners write positions to 1e-3 mm or
# better, and no CT reconstructs slices this thin).
DUPLICATE_DISTANCE_MM = 0.01
# Direction cosines are written with about 6 decimals; a difference above this is a real orientation change.
ORIENTATION_TOLERANCE = 1e-4


class VolumeError(DataError):
    """A series that cannot become a trustworthy volume; ``code`` is one of :data:`ERROR_CODES`.

    A :class:`~riskbridge.errors.DataError`: the pipeline quarantines the study and goes on.

    ``series`` and ``instance`` are hashed UIDs (:func:`riskbridge.records.uid_hash`), safe to log.
    """

    def __init__(self, code: str, detail: str, *, series: str, instance: str | None = None) -> None:
        self.code = code
        self.detail = detail
        self.series = series
        self.instance = instance
        where = f"series {series}" + (f", instance {instance}" if instance else "")
        super().__init__(f"{code}: {where}: {detail}")


@dataclass(frozen=True)
class VolumeOptions:
    """How strict the builder is.

    ``spacing_tolerance`` is relative: a step between slices may differ from the nominal (median) step by this
    fraction of it. ``min_slices=1`` accepts a single slice (its Z spacing then comes from SpacingBetweenSlices,
    else SliceThickness, else 1 mm). ``space`` is the patient coordinate system of the affine.
    """

    min_slices: int = 2
    spacing_tolerance: float = 0.02
    space: Literal["RAS", "LPS"] = "RAS"


@dataclass
class VolumeSlice:
    """One 2-D image of the series: where it is, how to rescale it, and where its pixels come from."""

    source: int  # index into the list of datasets
    frame: int | None  # frame number within a multi-frame file, None for a single-frame file
    instance: str  # hashed SOPInstanceUID, with the frame number for multi-frame files
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    orientation: np.ndarray  # ImageOrientationPatient: row direction cosines, then column direction cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as DICOM orders PixelSpacing
    shape: tuple[int, int]  # (rows, columns)
    slope: float
    intercept: float


def build_volume(
    datasets: Iterable[Dataset],
    options: VolumeOptions | None = None,
    *,
    series_uid: str | None = None,
    series: str | None = None,
    names: Sequence[str] | None = None,
) -> MetaTensor:
    """Build the HU volume of one series from its read datasets; return a float32 ``(1, X, Y, Z)`` MetaTensor.

    ``datasets`` are the series' instances, complete (header and pixel data), in any order. ``series_uid``, when
    given, is the series they must belong to (``mixed_series`` otherwise). ``series`` is the hashed label errors
    use until the datasets' own SeriesInstanceUID is known (default: the hash of ``series_uid``, else
    ``"unknown"``); ``names`` (one per dataset, e.g. the file stems) name an instance without a SOPInstanceUID.
    Raises :class:`VolumeError` for anything that would make the volume wrong.

    The datasets are collected into a list of this function's own, whose entries are dropped as each is decoded:
    a caller that passes an iterator (as :func:`riskbridge.model.volume_io.load_series_volume` does) and keeps no
    other reference lets each file's encoded bytes be freed as soon as its pixels are in the volume.
    """
    options = options or VolumeOptions()
    series = series or (uid_hash(series_uid) if series_uid else "unknown")
    read = list(datasets)
    if not read:
        raise VolumeError("empty", "no DICOM files", series=series)
    uid = single_series_uid(read, names if names is not None else [str(index) for index in range(len(read))], series)
    if series_uid and uid != series_uid:
        raise VolumeError("mixed_series", f"the files belong to series {uid_hash(uid)}", series=series)
    series = uid_hash(uid)
    slices = [item for index, ds in enumerate(read) for item in describe_slices(ds, index, series)]
    if len(slices) < options.min_slices:
        raise VolumeError(
            "too_few_slices", f"{len(slices)} slice(s), at least {options.min_slices} required", series=series
        )
    check_consistent(slices, series)

    row_dir, col_dir, normal = slice_directions(slices[0].orientation)
    slices.sort(key=lambda item: float(normal @ item.position))
    distances = np.array([float(normal @ item.position) for item in slices])
    step = _slice_step(slices, distances, normal, read, options, series)

    first = read[slices[0].source]
    modality = str(first.get("Modality", ""))
    header_meta: dict[str, Any] = {
        "study_uid": str(first.get("StudyInstanceUID", "")),
        "modality": modality,
        "rescale_type": str(first.get("RescaleType", "HU" if modality == "CT" else "")),
        # one string, not a list: MONAI's collate stacks meta values and fails on lists of different lengths
        "transfer_syntaxes": ",".join(sorted({str(ds.file_meta.get("TransferSyntaxUID", "")) for ds in read})),
    }
    volume = np.empty((len(slices), *slices[0].shape), dtype=np.float32)
    pending: list[Dataset | None] = list(read)
    del read, first  # _fill releases each file's encoded bytes once decoded
    _fill(volume, slices, pending, series)

    row_spacing, column_spacing = slices[0].pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = row_dir * column_spacing  # i runs along a row: next column
    affine[:3, 1] = col_dir * row_spacing  # j runs down a column: next row
    affine[:3, 2] = step
    affine[:3, 3] = slices[0].position
    if options.space == "RAS":
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # DICOM patient space is LPS

    # (Z, Y, X) buffer -> (1, X, Y, Z) view: MONAI's reader layout without copying 4 bytes per voxel.
    tensor = torch.from_numpy(volume).permute(2, 1, 0).unsqueeze(0)
    spacing = np.array([column_spacing, row_spacing, float(np.linalg.norm(step))])
    tilt = math.degrees(math.acos(min(1.0, abs(float(normal @ step)) / float(np.linalg.norm(step)))))
    meta: dict[str, Any] = {
        MetaKeys.SPACE: SpaceKeys.RAS if options.space == "RAS" else SpaceKeys.LPS,
        MetaKeys.ORIGINAL_AFFINE: torch.as_tensor(affine, dtype=torch.float64),
        MetaKeys.SPATIAL_SHAPE: np.array(tensor.shape[1:]),
        MetaKeys.ORIGINAL_CHANNEL_DIM: 0,
        "filename_or_obj": series,  # hashed: MONAI puts this in saved file names and in its messages
        "series_uid": uid,
        "series_uid_hash": series,
        **header_meta,
        "spacing": spacing,
        "slice_count": len(slices),
        "first_slice_position_mm": float(distances[0]),  # along the normal; the last is first + (count - 1) * step
        "gantry_tilt_deg": tilt,
    }
    return MetaTensor(tensor, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


def single_series_uid(datasets: Sequence[Dataset], names: Sequence[str], series: str) -> str:
    """Return the one SeriesInstanceUID of the datasets; mixing series is an error.

    ``names`` (one per dataset, e.g. the file stems) stand in for a missing SOPInstanceUID in the error.
    """
    first = str(datasets[0].get("SeriesInstanceUID", ""))
    for ds, name in zip(datasets, names, strict=True):
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid != first:
            raise VolumeError(
                "mixed_series",
                f"files of series {uid_hash(first)} and {uid_hash(uid)}",
                series=series,
                instance=uid_hash(str(ds.get("SOPInstanceUID", name))),
            )
    return first


def describe_slices(ds: Dataset, source: int, series: str) -> list[VolumeSlice]:
    """Describe the slices of one file: one for a classic image, one per frame for an Enhanced multi-frame image."""
    instance = uid_hash(str(ds.get("SOPInstanceUID", "")))
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise VolumeError("missing_pixel_data", "no pixel data element", series=series, instance=instance)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeError(
            "unsupported_pixels",
            f"{ds.SamplesPerPixel} samples per pixel, expected 1",
            series=series,
            instance=instance,
        )
    try:
        shape = (int(ds.Rows), int(ds.Columns))
        frames = int(ds.get("NumberOfFrames") or 1)
        if "PerFrameFunctionalGroupsSequence" in ds:
            return [_enhanced_frame(ds, source, frame, frames, shape, instance, series) for frame in range(frames)]
        if frames > 1:
            raise VolumeError(
                "missing_geometry",
                f"{frames} frames without per-frame functional groups (legacy multi-frame is not supported)",
                series=series,
                instance=instance,
            )
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if keyword not in ds:
                raise VolumeError("missing_geometry", f"no {keyword}", series=series, instance=instance)
        return [
            VolumeSlice(
                source=source,
                frame=None,
                instance=instance,
                position=parse_vector(ds.ImagePositionPatient, 3),
                orientation=parse_vector(ds.ImageOrientationPatient, 6),
                pixel_spacing=parse_pixel_spacing(ds.PixelSpacing),
                shape=shape,
                slope=_number(ds, "RescaleSlope", 1.0),
                intercept=_number(ds, "RescaleIntercept", 0.0),
            )
        ]
    except VolumeError:
        raise
    except (AttributeError, TypeError, ValueError, IndexError, KeyError) as error:
        raise VolumeError(
            "invalid_geometry",
            f"unparsable image attributes ({type(error).__name__})",
            series=series,
            instance=instance,
        ) from None


def functional_group(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """Return one functional group macro for a frame: the per-frame one if present, else the shared one."""
    per_frame = ds.PerFrameFunctionalGroupsSequence[frame]
    if sequence in per_frame and len(per_frame[sequence].value):
        return per_frame[sequence].value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0] and len(shared[0][sequence].value):
        return shared[0][sequence].value[0]
    return None


def _enhanced_frame(
    ds: Dataset, source: int, frame: int, frames: int, shape: tuple[int, int], instance: str, series: str
) -> VolumeSlice:
    """Describe one frame of an Enhanced multi-frame image from its functional groups."""
    if len(ds.PerFrameFunctionalGroupsSequence) != frames:
        raise VolumeError(
            "missing_geometry",
            f"{len(ds.PerFrameFunctionalGroupsSequence)} per-frame functional groups for {frames} frames",
            series=series,
            instance=instance,
        )
    where = f"{instance} frame {frame + 1}"
    position = functional_group(ds, frame, "PlanePositionSequence")
    orientation = functional_group(ds, frame, "PlaneOrientationSequence")
    measures = functional_group(ds, frame, "PixelMeasuresSequence")
    if position is None or orientation is None or measures is None or "PixelSpacing" not in measures:
        raise VolumeError(
            "missing_geometry", "plane position, orientation or pixel measures missing", series=series, instance=where
        )
    transformation = functional_group(ds, frame, "PixelValueTransformationSequence")
    rescale = transformation if transformation is not None else ds  # some writers keep rescale at the top level
    return VolumeSlice(
        source=source,
        frame=frame,
        instance=where,
        position=parse_vector(position.ImagePositionPatient, 3),
        orientation=parse_vector(orientation.ImageOrientationPatient, 6),
        pixel_spacing=parse_pixel_spacing(measures.PixelSpacing),
        shape=shape,
        slope=_number(rescale, "RescaleSlope", 1.0),
        intercept=_number(rescale, "RescaleIntercept", 0.0),
    )


def _number(ds: Dataset, keyword: str, default: float) -> float:
    """Return a numeric attribute, or ``default`` when it is absent or empty (type 1C/3 attributes often are)."""
    value = ds.get(keyword)
    return default if value is None or value == "" else float(value)


def parse_vector(value: Any, length: int) -> np.ndarray:
    """Convert a multi-valued DS element to a float vector of the expected length."""
    vector = np.array([float(item) for item in value], dtype=np.float64)
    if vector.shape != (length,) or not np.all(np.isfinite(vector)):
        raise ValueError(f"expected {length} finite numbers")
    return vector


def parse_pixel_spacing(value: Any) -> tuple[float, float]:
    """Return PixelSpacing as (between rows, between columns), both positive."""
    row_spacing, column_spacing = parse_vector(value, 2)
    if row_spacing <= 0 or column_spacing <= 0:
        raise ValueError("PixelSpacing must be positive")
    return float(row_spacing), float(column_spacing)


def slice_directions(orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the row direction, the column direction and the slice normal (their cross product)."""
    row_dir, col_dir = orientation[:3], orientation[3:]
    return row_dir, col_dir, np.cross(row_dir, col_dir)


def _most_common(slices: Sequence[VolumeSlice], key: Callable[[VolumeSlice], Hashable]) -> VolumeSlice:
    """Return a slice with the most common value of ``key`` (the first on a tie), so the stray slice gets named."""
    value = Counter(key(item) for item in slices).most_common(1)[0][0]
    return next(item for item in slices if key(item) == value)


def check_consistent(slices: Sequence[VolumeSlice], series: str) -> None:
    """Every slice must share the series' (most common) orientation, size and pixel spacing, and it must be valid."""
    typical = _most_common(slices, lambda item: tuple(np.round(item.orientation, 4)))
    row_dir, col_dir, _ = slice_directions(typical.orientation)
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(float(row_dir @ col_dir)) > 1e-3
    ):
        raise VolumeError(
            "invalid_geometry", "orientation vectors are not orthonormal", series=series, instance=typical.instance
        )
    for item in slices:
        if not np.allclose(item.orientation, typical.orientation, atol=ORIENTATION_TOLERANCE, rtol=0):
            raise VolumeError(
                "mixed_orientation", "orientation differs from the series'", series=series, instance=item.instance
            )
    typical = _most_common(slices, lambda item: item.shape)
    for item in slices:
        if item.shape != typical.shape:
            raise VolumeError(
                "mixed_shape",
                f"{item.shape[0]}x{item.shape[1]} pixels where the series has {typical.shape[0]}x{typical.shape[1]}",
                series=series,
                instance=item.instance,
            )
    typical = _most_common(slices, lambda item: tuple(np.round(item.pixel_spacing, 4)))
    for item in slices:
        if not np.allclose(item.pixel_spacing, typical.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise VolumeError(
                "mixed_pixel_spacing", "pixel spacing differs from the series'", series=series, instance=item.instance
            )


def _slice_step(
    slices: Sequence[VolumeSlice],
    distances: np.ndarray,
    normal: np.ndarray,
    datasets: Sequence[Dataset],
    options: VolumeOptions,
    series: str,
) -> np.ndarray:
    """Check the sorted slices are evenly spaced and collinear; return the step between slice origins (LPS, mm)."""
    if len(slices) == 1:
        ds = datasets[slices[0].source]
        thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0
        return normal * abs(float(thickness))

    steps = np.diff(distances)
    for index in np.flatnonzero(steps < DUPLICATE_DISTANCE_MM):
        raise VolumeError(
            "duplicate_position",
            f"same position as instance {slices[index].instance}",
            series=series,
            instance=slices[index + 1].instance,
        )
    nominal = float(np.median(steps))
    tolerance = options.spacing_tolerance
    for index, step in enumerate(steps):
        ratio = step / nominal
        if abs(ratio - 1) <= tolerance:
            continue
        missing = round(ratio) - 1
        if missing >= 1 and abs(ratio - round(ratio)) <= tolerance * round(ratio):
            raise VolumeError(
                "gap",
                f"{step:.3f} mm after instance {slices[index].instance} where {nominal:.3f} mm is nominal: "
                f"about {missing} slice(s) missing",
                series=series,
                instance=slices[index + 1].instance,
            )
        raise VolumeError(
            "nonuniform_spacing",
            f"{step:.3f} mm after instance {slices[index].instance}, nominal {nominal:.3f} mm "
            f"(tolerance {tolerance:.1%})",
            series=series,
            instance=slices[index + 1].instance,
        )

    # The origins must lie on one line (straight, or tilted for a gantry-tilted series) for one affine to fit.
    origins = np.stack([item.position for item in slices])
    step_vector = (origins[-1] - origins[0]) / (len(slices) - 1)
    expected = origins[0] + np.outer(np.arange(len(slices)), step_vector)
    deviation = np.linalg.norm(origins - expected, axis=1)
    worst = int(np.argmax(deviation))
    if deviation[worst] > tolerance * nominal:
        raise VolumeError(
            "off_axis",
            f"origin {deviation[worst]:.3f} mm off the series axis (tolerance {tolerance * nominal:.3f} mm)",
            series=series,
            instance=slices[worst].instance,
        )
    return step_vector


def _fill(volume: np.ndarray, slices: Sequence[VolumeSlice], datasets: list[Dataset | None], series: str) -> None:
    """Decode every file once and write each of its frames, rescaled to float32, into its sorted slot."""
    slot_of = {(item.source, item.frame): (index, item) for index, item in enumerate(slices)}
    frames_of: dict[int, list[int | None]] = {}
    for item in slices:
        frames_of.setdefault(item.source, []).append(item.frame)
    for source, frames in frames_of.items():
        ds = datasets[source]
        assert ds is not None  # each source is decoded once, then released
        pixels = _decode(ds, series, slices[slot_of[(source, frames[0])][0]].instance)
        datasets[source] = None  # drop the encoded bytes as soon as they are decoded: lower peak memory
        for frame in frames:
            index, item = slot_of[(source, frame)]
            # pydicom returns (rows, columns) for a one-frame file, (frames, rows, columns) otherwise
            image = pixels if pixels.ndim == 2 else pixels[frame or 0]
            if image.shape != item.shape:
                raise VolumeError(
                    "undecodable",
                    f"decoded {image.shape}, expected {item.shape}",
                    series=series,
                    instance=item.instance,
                )
            _rescale_into(volume[index], image, item.slope, item.intercept)


def _decode(ds: Dataset, series: str, instance: str) -> np.ndarray:
    """Decode all frames of one dataset with pydicom's decoders: a read-only view for native data, no copy."""
    try:
        decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    except Exception as error:  # unknown or missing transfer syntax
        raise VolumeError(
            "undecodable",
            f"no decoder for the transfer syntax ({type(error).__name__})",
            series=series,
            instance=instance,
        ) from None
    try:
        if decoder.is_native:
            # pydicom annotates **kwargs as DecodeOptions (a TypedDict) where it means Unpack[DecodeOptions]
            pixels, _ = decoder.as_array(ds, view_only=True)  # type: ignore[arg-type]
        else:
            # pydicom tries the installed plugins in its own order (GDCM first). For JPEG 2000 that is also the
            # faster one on CT-like lossless slices: GDCM's OpenJPEG decodes with several threads (docs/volume.md).
            pixels, _ = decoder.as_array(ds)
    except Exception as error:  # decoder plugins raise RuntimeError, ValueError, struct.error...; keep only the type
        raise VolumeError(
            "undecodable", f"pixel data cannot be decoded ({type(error).__name__})", series=series, instance=instance
        ) from None
    return pixels


def _rescale_into(out: np.ndarray, stored: np.ndarray, slope: float, intercept: float) -> None:
    """Write ``stored * slope + intercept`` into the float32 slice ``out`` without temporaries."""
    if slope == 1.0:
        np.add(stored, np.float32(intercept), out=out, dtype=np.float32, casting="unsafe")
    else:
        np.multiply(stored, np.float32(slope), out=out, dtype=np.float32, casting="unsafe")
        if intercept:
            np.add(out, np.float32(intercept), out=out)
