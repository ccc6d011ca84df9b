"""Dense labels from DICOM SEG: a radiologist's segmentation of a CT series as a mask on that series' volume grid.

Sites keep such labels (nodule segmentations) as DICOM Segmentation objects in the PACS and export them next to
the series they segment. :func:`seg_occupancy` reads one SEG (BINARY, FRACTIONAL or LABELMAP) and returns the
selected segments on the grid of :func:`riskbridge.model.volume_io.load_series_volume`'s volume of the source
series: the same ``(1, X, Y, Z)`` shape and voxel order (X along a row, Y down the columns, Z along the slices
sorted by position along the normal), so the mask goes through the same MONAI transforms as the image with the
volume's affine. :func:`find_segmentations` lists the SEG files under a directory by the series they reference.

The source series is read header-only, with harmonize.volume's own slice description and consistency checks, so
the slice order cannot drift from the volume's; problems of the series itself raise its
:class:`~riskbridge.harmonize.volume.VolumeError` with the same codes. Each SEG frame is placed on a source slice
by geometry (its ImagePositionPatient within :data:`POSITION_TOLERANCE_MM` of a slice origin) and by its
derivation reference (ReferencedSOPInstanceUID, with ReferencedFrameNumber for multi-frame sources); with both,
they must agree. The SEG must reference the series and share its frame of reference, rows, columns, pixel spacing
and orientation. Every mismatch raises :class:`SegmentationError` with a stable ``code``; messages name the SEG by
its hashed file stem and UIDs only hashed (:func:`riskbridge.records.uid_hash`), never a value from the files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, SegmentationStorage

from riskbridge.errors import DataError
from riskbridge.harmonize.volume import (
    DUPLICATE_DISTANCE_MM,
    ORIENTATION_TOLERANCE,
    VolumeError,
    VolumeSlice,
    check_consistent,
    describe_slices,
    functional_group,
    parse_pixel_spacing,
    parse_vector,
    single_series_uid,
    slice_directions,
)
from riskbridge.model.volume_io import series_files
from riskbridge.records import uid_hash

# Every code SegmentationError can carry, with what it means; docs/model.md lists the same table.
ERROR_CODES: dict[str, str] = {
    "unreadable": "the SEG file is not DICOM, cannot be parsed, or its pixel data cannot be decoded",
    "not_segmentation": "the file is not a Segmentation or Label Map Segmentation Storage instance",
    "unsupported": "a segmentation type or frame layout this module does not read (e.g. TILED_FULL)",
    "invalid": "a required SEG attribute is missing or malformed (segments, frame geometry, fractional values)",
    "other_series": "the SEG does not reference the source series",
    "other_frame_of_reference": "the SEG's FrameOfReferenceUID is not the source series'",
    "matrix_size": "the SEG's Rows/Columns differ from the source slices'",
    "pixel_spacing": "a SEG frame's PixelSpacing differs from the source slices'",
    "orientation": "a SEG frame's ImageOrientationPatient differs from the source slices'",
    "unknown_segment": "a selected segment number is not defined in the SEG",
    "unmatched_frame": "a SEG frame lies on no source slice, or references no image of the series and has no position",
    "inconsistent_reference": "a frame's position and its derivation reference name different source slices",
}

# Label Map Segmentation Storage (DICOM 2024b); pydicom 3.0.2 predates it.
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
# A label map's segment coded as this (DCM "Background") marks unlabelled voxels: never in the default selection.
BACKGROUND_CODE = "125040"
# A SEG frame within this distance of a slice origin lies on that slice. Writers copy the source positions or
# round them to DS's 16 characters (about 1e-4 mm); CT slices are at least ~0.5 mm apart, so this cannot pick a
# neighbour, and a SEG on a shifted or resampled grid is rejected rather than snapped.
POSITION_TOLERANCE_MM = 0.05
# Pixel spacings agree when within this relative difference (the volume builder's own tolerance between slices).
PIXEL_SPACING_TOLERANCE = 1e-4
# Only the header matters for the source slices: values above this size (a CT slice's pixel data is 512 KB) are
# left on disk; the rare larger header element (an Enhanced CT's per-frame groups) is read when first used.
_HEADER_ONLY = "64 KB"


class SegmentationError(DataError, ValueError):
    """A DICOM SEG that cannot be placed on its source series' volume; ``code`` is one of :data:`ERROR_CODES`.

    ``seg`` is the hashed stem of the SEG's file name (staged files are named by SOPInstanceUID, so it is the hashed
    UID) and ``series`` the hashed source SeriesInstanceUID, both safe to log. ``path`` is the file itself; it is
    kept out of the message because a site's file names may carry patient data.
    """

    def __init__(self, code: str, detail: str, *, path: Path, series: str | None = None) -> None:
        self.code = code
        self.detail = detail
        self.path = path
        self.seg = uid_hash(path.stem)
        self.series = series
        where = f"SEG {self.seg}" + (f", series {series}" if series else "")
        super().__init__(f"{code}: {where}: {detail}")


# Builds the error for one SEG and series from (code, detail); the helpers below raise what it returns.
_Fail = Callable[[str, str], SegmentationError]


@dataclass(frozen=True)
class _SourceGrid:
    """The source series' slices in the volume's order, with what a SEG is checked against."""

    series_uid: str
    series: str  # hashed series_uid
    frame_of_reference: str
    slices: list[VolumeSlice]  # sorted along the normal: index = Z of the volume
    keys: dict[tuple[str, int | None], int]  # (SOPInstanceUID, 1-based frame or None) -> Z
    normal: np.ndarray
    distances: np.ndarray  # each slice's position along the normal (mm), ascending


@dataclass(frozen=True)
class _SegFrame:
    """Where one SEG frame goes: the volume slice and the segment it carries (None for a LABELMAP frame)."""

    slice_index: int
    segment: int | None


def seg_occupancy(seg_path: Path, series_dir: Path, segments: Sequence[int] | None = None) -> np.ndarray:
    """Return the SEG's selected segments on the source series' volume grid: float32 ``(1, X, Y, Z)``.

    The shape and voxel order are those of ``load_series_volume(series_dir)``: index ``[0, i, j, k]`` is column
    ``i``, row ``j`` of the ``k``-th slice along the normal, so the volume's affine places the mask too. A voxel is
    1.0 where any selected segment covers it and 0.0 elsewhere; a FRACTIONAL SEG gives its fraction (stored value
    / MaximumFractionalValue, in [0, 1]; PROBABILITY and OCCUPANCY alike) and overlapping segments their maximum.
    ``segments`` are SegmentNumbers (default: all the SEG defines but a label map's Background, DCM 125040). A SEG
    whose segments cover no voxel is valid and gives zeros. Like the volume, the result is a strided view over a
    slice-contiguous buffer. Raises :class:`SegmentationError` for a SEG that does not fit the series,
    :class:`VolumeError` for a series that cannot be read, and ValueError for an empty ``segments``.
    """
    seg_path, series_dir = Path(seg_path), Path(series_dir)
    if segments is not None and len(segments) == 0:
        raise ValueError("segments is empty: pass None for all segments, or at least one SegmentNumber")
    grid = _source_grid(series_dir)
    ds = _read_seg(seg_path, grid.series)

    def fail(code: str, detail: str) -> SegmentationError:
        return SegmentationError(code, detail, path=seg_path, series=grid.series)

    kind, selected = _check_header(ds, grid, segments, fail)
    frames = _place_frames(ds, grid, kind, fail)
    pixels = _decode(ds, fail)
    rows, columns = grid.slices[0].shape
    buffer = np.zeros((len(grid.slices), rows, columns), dtype=np.float32)
    maximum = _maximum_fraction(ds, pixels, fail) if kind == "FRACTIONAL" else 1
    labels = np.array(sorted(selected))
    for index, frame in enumerate(frames):
        if kind == "LABELMAP":
            values = np.isin(pixels[index], labels).astype(np.float32)
        elif frame.segment not in selected:
            continue
        elif kind == "FRACTIONAL":
            values = pixels[index].astype(np.float32) / np.float32(maximum)
        else:
            values = (pixels[index] != 0).astype(np.float32)
        # two frames on one slice (two segments, or a writer's duplicate) combine as the union
        np.maximum(buffer[frame.slice_index], values, out=buffer[frame.slice_index])
    if kind == "LABELMAP" and 0 in selected:
        # a label map leaves out slices with no label at all (writers omit empty frames): they are all label 0
        uncovered = np.setdiff1d(np.arange(len(grid.slices)), [frame.slice_index for frame in frames])
        buffer[uncovered] = 1.0
    # (Z, Y, X) buffer -> (1, X, Y, Z) view, as load_series_volume lays out the HU volume
    return buffer.transpose(2, 1, 0)[None]


def find_segmentations(directory: Path) -> dict[str, list[Path]]:
    """Map each SeriesInstanceUID that SEG files under ``directory`` reference to those files (sorted paths).

    The directory is searched recursively; hidden files and files without DICOM's Part 10 marker are skipped, and
    only the header elements needed are read, so CT slices next to the SEGs cost little. A SEG referencing several
    series is listed under each; one referencing none is not listed. Raises :class:`SegmentationError`
    (``unreadable``) for a DICOM file that cannot be parsed, NotADirectoryError when ``directory`` is not one.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError("find_segmentations needs an existing directory")
    found: dict[str, list[Path]] = {}
    for path in sorted(directory.rglob("*")):
        if path.name.startswith(".") or not path.is_file() or not _has_part10_marker(path):
            continue
        try:
            ds = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=[
                    "SOPClassUID",
                    "ReferencedSeriesSequence",
                    "StudiesContainingOtherReferencedInstancesSequence",
                ],
            )
        except Exception as error:  # pydicom raises many types for damaged files; keep only the type
            raise SegmentationError("unreadable", f"cannot parse ({type(error).__name__})", path=path) from None
        if str(ds.get("SOPClassUID", "")) not in (SegmentationStorage, LABEL_MAP_SEGMENTATION_STORAGE):
            continue
        for series_uid in sorted(_referenced_series(ds)):
            found.setdefault(series_uid, []).append(path)
    return found


def _has_part10_marker(path: Path) -> bool:
    """Whether the file has the 128-byte preamble followed by ``DICM`` (every Part 10 file written by a PACS)."""
    with path.open("rb") as stream:
        return stream.read(132)[128:] == b"DICM"


def _source_grid(series_dir: Path) -> _SourceGrid:
    """Read the series' headers and order its slices exactly as load_series_volume does."""
    series = uid_hash(series_dir.name)  # a staged directory is named by its SeriesInstanceUID
    if not series_dir.is_dir():
        raise VolumeError("empty", "the staged series directory does not exist", series=series)
    paths = series_files(series_dir)
    if not paths:
        raise VolumeError("empty", "no DICOM files", series=series)
    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path, defer_size=_HEADER_ONLY))
        except Exception as error:  # same policy as the volume builder: the message keeps only the type
            raise VolumeError(
                "unreadable", f"cannot parse ({type(error).__name__})", series=series, instance=uid_hash(path.stem)
            ) from None
    series_uid = single_series_uid(datasets, [path.stem for path in paths], series)
    series = uid_hash(series_uid)
    slices = [item for index, ds in enumerate(datasets) for item in describe_slices(ds, index, series)]
    check_consistent(slices, series)
    _, _, normal = slice_directions(slices[0].orientation)
    slices.sort(key=lambda item: float(normal @ item.position))
    distances = np.array([float(normal @ item.position) for item in slices])
    for index in np.flatnonzero(np.diff(distances) < DUPLICATE_DISTANCE_MM):
        raise VolumeError(
            "duplicate_position",
            f"same position as instance {slices[index].instance}",
            series=series,
            instance=slices[index + 1].instance,
        )
    keys: dict[tuple[str, int | None], int] = {}
    for index, item in enumerate(slices):
        sop = str(datasets[item.source].get("SOPInstanceUID", ""))
        if item.frame is None:
            keys[(sop, None)] = index
            keys[(sop, 1)] = index  # some writers name frame 1 of a single-frame image
        else:
            keys[(sop, item.frame + 1)] = index
    return _SourceGrid(
        series_uid=series_uid,
        series=series,
        frame_of_reference=str(datasets[0].get("FrameOfReferenceUID", "")),
        slices=slices,
        keys=keys,
        normal=normal,
        distances=distances,
    )


def _read_seg(path: Path, series: str) -> Dataset:
    """Read the SEG file completely; anything but a Segmentation instance is an error."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as error:  # the lower library's message may quote file contents: keep only its type
        raise SegmentationError(
            "unreadable", f"cannot parse ({type(error).__name__})", path=path, series=series
        ) from None
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in (SegmentationStorage, LABEL_MAP_SEGMENTATION_STORAGE):
        name = UID(sop_class).name if sop_class else "none"
        raise SegmentationError(
            "not_segmentation", f"SOP class {name}, not a Segmentation Storage", path=path, series=series
        )
    return ds


def _referenced_series(ds: Dataset) -> set[str]:
    """The SeriesInstanceUIDs a SEG references, in its own study and in others (Common Instance Reference)."""
    items = list(ds.get("ReferencedSeriesSequence", []))
    for study in ds.get("StudiesContainingOtherReferencedInstancesSequence", []):
        items.extend(study.get("ReferencedSeriesSequence", []))
    return {str(item.get("SeriesInstanceUID", "")) for item in items} - {""}


def _check_header(ds: Dataset, grid: _SourceGrid, segments: Sequence[int] | None, fail: _Fail) -> tuple[str, set[int]]:
    """Check the SEG's type, segments, series, frame of reference and matrix; return the type and chosen segments."""
    kind = str(ds.get("SegmentationType", ""))
    if kind not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise fail("unsupported", f"SegmentationType {kind or 'missing'}")
    defined: set[int] = set()
    background: set[int] = set()
    for item in ds.get("SegmentSequence", []):
        if "SegmentNumber" not in item:
            raise fail("invalid", "a SegmentSequence item has no SegmentNumber")
        defined.add(int(item.SegmentNumber))
        if any(_is_background(code) for code in item.get("SegmentedPropertyTypeCodeSequence", [])):
            background.add(int(item.SegmentNumber))
    if not defined - background:
        raise fail("invalid", "no segment other than background is defined")
    selected = defined - background if segments is None else {int(number) for number in segments}
    if unknown := selected - defined:
        raise fail(
            "unknown_segment",
            f"segment(s) {sorted(unknown)} not defined; the SEG defines {sorted(defined)}",
        )

    referenced = _referenced_series(ds)
    if grid.series_uid not in referenced:
        named = ", ".join(sorted(uid_hash(uid) for uid in referenced)) or "none"
        raise fail("other_series", f"references series {named}, not the source series {grid.series}")
    frame_of_reference = str(ds.get("FrameOfReferenceUID", ""))
    if not grid.frame_of_reference or frame_of_reference != grid.frame_of_reference:
        raise fail(
            "other_frame_of_reference",
            f"FrameOfReferenceUID {uid_hash(frame_of_reference) if frame_of_reference else 'missing'} where the "
            f"series has {uid_hash(grid.frame_of_reference) if grid.frame_of_reference else 'none'}",
        )
    try:
        matrix = (int(ds.Rows), int(ds.Columns))
    except (AttributeError, TypeError, ValueError):
        raise fail("invalid", "Rows or Columns missing or unparsable") from None
    if matrix != grid.slices[0].shape:
        source_rows, source_columns = grid.slices[0].shape
        raise fail(
            "matrix_size",
            f"{matrix[0]}x{matrix[1]} pixels (rows x columns) where the series has {source_rows}x{source_columns}",
        )
    return kind, selected


def _is_background(code: Dataset) -> bool:
    """Whether a segmented property type is DICOM's Background (DCM 125040), the label map's segment for "none"."""
    return str(code.get("CodeValue", "")) == BACKGROUND_CODE and str(code.get("CodingSchemeDesignator", "")) == "DCM"


def _place_frames(ds: Dataset, grid: _SourceGrid, kind: str, fail: _Fail) -> list[_SegFrame]:
    """Check every frame's geometry against the series and find its slice (and segment)."""
    try:
        count = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise fail("invalid", "NumberOfFrames is unparsable") from None
    if "PerFrameFunctionalGroupsSequence" not in ds:
        organization = str(ds.get("DimensionOrganizationType", "")) or "no per-frame functional groups"
        raise fail("unsupported", f"frames without per-frame functional groups ({organization})")
    if len(ds.PerFrameFunctionalGroupsSequence) != count:
        raise fail(
            "invalid", f"{len(ds.PerFrameFunctionalGroupsSequence)} per-frame functional groups for {count} frames"
        )
    source = grid.slices[0]
    frames: list[_SegFrame] = []
    for frame in range(count):
        where = f"frame {frame + 1}"
        try:
            orientation = functional_group(ds, frame, "PlaneOrientationSequence")
            measures = functional_group(ds, frame, "PixelMeasuresSequence")
            if orientation is None or measures is None or "PixelSpacing" not in measures:
                raise fail("invalid", f"{where} has no plane orientation or pixel spacing")
            if not np.allclose(
                parse_vector(orientation.ImageOrientationPatient, 6),
                source.orientation,
                atol=ORIENTATION_TOLERANCE,
                rtol=0,
            ):
                raise fail("orientation", f"{where}'s ImageOrientationPatient differs from the series'")
            if not np.allclose(
                parse_pixel_spacing(measures.PixelSpacing), source.pixel_spacing, rtol=PIXEL_SPACING_TOLERANCE, atol=0
            ):
                raise fail("pixel_spacing", f"{where}'s PixelSpacing differs from the series'")
            plane = functional_group(ds, frame, "PlanePositionSequence")
            position = None if plane is None else parse_vector(plane.ImagePositionPatient, 3)
            segment = None if kind == "LABELMAP" else _frame_segment(ds, frame, fail)
        except SegmentationError:
            raise
        except (AttributeError, TypeError, ValueError, IndexError, KeyError) as error:
            raise fail("invalid", f"{where}: unparsable functional groups ({type(error).__name__})") from None
        frames.append(_SegFrame(_frame_slice(ds, frame, position, grid, fail), segment))
    return frames


def _frame_segment(ds: Dataset, frame: int, fail: _Fail) -> int:
    """The SegmentNumber a BINARY or FRACTIONAL frame carries."""
    identification = functional_group(ds, frame, "SegmentIdentificationSequence")
    if identification is None or "ReferencedSegmentNumber" not in identification:
        raise fail("invalid", f"frame {frame + 1} has no segment identification")
    return int(identification.ReferencedSegmentNumber)


def _frame_slice(ds: Dataset, frame: int, position: np.ndarray | None, grid: _SourceGrid, fail: _Fail) -> int:
    """The volume slice (Z index) of one SEG frame, from its position and its derivation references."""
    where = f"frame {frame + 1}"
    by_position: int | None = None
    if position is not None:
        along = float(grid.normal @ position)
        nearest = int(np.argmin(np.abs(grid.distances - along)))
        offset = float(np.linalg.norm(position - grid.slices[nearest].position))
        if offset > POSITION_TOLERANCE_MM:
            normal_part = abs(along - float(grid.distances[nearest]))
            in_plane = float(np.sqrt(max(offset**2 - normal_part**2, 0.0)))
            raise fail(
                "unmatched_frame",
                f"{where} lies on no slice of the series: {normal_part:.3f} mm along the normal and "
                f"{in_plane:.3f} mm in-plane from the nearest slice origin (tolerance {POSITION_TOLERANCE_MM} mm)",
            )
        by_position = nearest

    by_reference = {grid.keys[key] for key in _derivation_sources(ds, frame) if key in grid.keys}
    if len(by_reference) > 1:
        raise fail("inconsistent_reference", f"{where} is derived from {len(by_reference)} slices of the series")
    if by_reference:
        referenced = by_reference.pop()
        if by_position is not None and by_position != referenced:
            raise fail(
                "inconsistent_reference",
                f"{where}'s position lies on slice {by_position} of the volume but it is derived from slice "
                f"{referenced}",
            )
        return referenced
    if by_position is None:
        # without a position, references to other series' images cannot place the frame on this one
        raise fail("unmatched_frame", f"{where} has no plane position and references no image of the series")
    return by_position


def _derivation_sources(ds: Dataset, frame: int) -> list[tuple[str, int | None]]:
    """The (SOPInstanceUID, frame number or None) source images a frame is derived from; empty if none are named."""
    derivation = ds.PerFrameFunctionalGroupsSequence[frame].get("DerivationImageSequence")
    if not derivation:
        shared = ds.get("SharedFunctionalGroupsSequence")
        derivation = shared[0].get("DerivationImageSequence") if shared else None
    sources: list[tuple[str, int | None]] = []
    for item in derivation or []:
        for image in item.get("SourceImageSequence", []):
            uid = str(image.get("ReferencedSOPInstanceUID", ""))
            numbers = image.get("ReferencedFrameNumber")
            if numbers is None or numbers == "":
                sources.append((uid, None))
            else:
                # a multi-valued element lists several frames; one value reads as a plain int
                values = numbers if isinstance(numbers, MultiValue) else [numbers]
                sources.extend((uid, int(number)) for number in values)
    return sources


def _decode(ds: Dataset, fail: _Fail) -> np.ndarray:
    """Decode every frame with pydicom (BINARY's 1-bit pixels come unpacked to 0/1); return (frames, rows, cols)."""
    try:
        pixels = ds.pixel_array
    except Exception as error:  # decoder plugins raise many types; keep only the type
        raise fail("unreadable", f"pixel data cannot be decoded ({type(error).__name__})") from None
    frames = int(ds.get("NumberOfFrames") or 1)
    if pixels.size != frames * int(ds.Rows) * int(ds.Columns):
        raise fail("unreadable", f"decoded {pixels.shape}, expected {frames} frames of {ds.Rows}x{ds.Columns}")
    return pixels.reshape(frames, int(ds.Rows), int(ds.Columns))


def _maximum_fraction(ds: Dataset, pixels: np.ndarray, fail: _Fail) -> int:
    """A FRACTIONAL SEG's MaximumFractionalValue (the stored value meaning 1.0); no pixel may exceed it."""
    try:
        maximum = int(ds.MaximumFractionalValue)
    except (AttributeError, TypeError, ValueError):
        raise fail("invalid", "FRACTIONAL without a usable MaximumFractionalValue") from None
    if maximum <= 0:
        raise fail("invalid", f"MaximumFractionalValue {maximum} is not positive")
    if pixels.size and int(pixels.max()) > maximum:
        raise fail("invalid", f"a stored fraction {int(pixels.max())} exceeds MaximumFractionalValue {maximum}")
    return maximum
