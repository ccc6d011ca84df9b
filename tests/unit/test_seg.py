"""DICOM SEG to a mask on the volume grid: placement, segment selection, SEG types and every error code.

Small CT series are written with test_volume's helpers and their SEG objects with highdicom, as a site's tools
would write them; error cases then edit the SEG with pydicom. Each mask is checked against the HU volume that
load_series_volume builds from the same files, whose bright voxels are exactly the segmented ones.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from test_volume import AXIAL, PATIENT_NAME, ct_dataset, enhanced_ct, stage

from riskbridge.harmonize.volume import VolumeError
from riskbridge.model.seg import ERROR_CODES, SegmentationError, find_segmentations, seg_occupancy
from riskbridge.model.volume_io import load_series_volume
from riskbridge.records import uid_hash

SIZE = 32
SLICES = 14
STEP = 2.5
BRIGHT, DARK = 2000, 0  # stored values; the helper's intercept makes them 976 and -1024 HU


def blobs(count: int, seed: int) -> np.ndarray:
    """A few boxes of varying size in each slice: (count, rows, columns) bool, some slices left empty."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, SIZE, SIZE), dtype=bool)
    for index in range(count):
        if index % 4 == 3:
            continue
        for _ in range(2):
            row, column = rng.integers(0, SIZE - 6, size=2)
            height, width = rng.integers(1, 6, size=2)
            masks[index, row : row + height, column : column + width] = True
    return masks


def ct_series(
    heights: Sequence[float],
    masks: np.ndarray,
    *,
    orientation: Sequence[float] = AXIAL,
    tilt_deg: float = 0.0,
    frame_of_reference: str | None = None,
) -> list[Dataset]:
    """A CT series, one dataset per height, bright exactly where ``masks`` is set; InstanceNumbers run backwards."""
    uid = generate_uid()
    frame_of_reference = frame_of_reference or generate_uid()
    normal = np.cross(orientation[:3], orientation[3:])
    shear = math.tan(math.radians(tilt_deg))
    datasets = []
    for index, (height, mask) in enumerate(zip(heights, masks, strict=True)):
        position = normal * height + np.array([-8.0, 3.0 + height * shear, 0.0])
        ds = ct_dataset(
            uid,
            position,
            orientation,
            pixels=np.where(mask, BRIGHT, DARK),
            instance_number=len(heights) - index,
        )
        datasets.append(with_seg_attributes(ds, frame_of_reference))
    return datasets


def with_seg_attributes(ds: Dataset, frame_of_reference: str) -> Dataset:
    """Add what a real CT has and highdicom copies into a SEG: frame of reference, patient and study attributes."""
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PatientID = "P-SECRET"
    ds.PatientBirthDate = ds.PatientSex = ds.StudyDate = ds.StudyTime = ""  # type 2: present, may be empty
    ds.AccessionNumber = ds.ReferringPhysicianName = ds.StudyID = ""
    return ds


def descriptions(count: int) -> list[hd.seg.SegmentDescription]:
    """Segment descriptions numbered 1..count, as a radiologist's nodule segmentation would label them."""
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"nodule {number}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number in range(1, count + 1)
    ]


def make_seg(
    source: Sequence[Dataset],
    pixels: np.ndarray,
    kind: str = "BINARY",
    segments: int = 1,
    fractional_type: str = "PROBABILITY",  # highdicom's default; used only by FRACTIONAL
) -> hd.seg.Segmentation:
    """A highdicom SEG of ``source`` (pixels in the order of ``source``, a last axis per segment if several)."""
    return hd.seg.Segmentation(
        source_images=list(source),
        pixel_array=pixels,
        segmentation_type=kind,
        segment_descriptions=descriptions(segments),
        series_instance_uid=generate_uid(),
        series_number=100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="riskbridge tests",
        manufacturer_model_name="test_seg",
        software_versions="1",
        device_serial_number="0",
        fractional_type=fractional_type,
    )


def save(seg: Dataset, directory: Path) -> Path:
    """Write a SEG as a site exports it, named by its SOPInstanceUID."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{seg.SOPInstanceUID}.dcm"
    seg.save_as(path, enforce_file_format=True)
    return path


def shuffled(series: Sequence[Dataset], pixels: np.ndarray, seed: int = 7) -> tuple[list[Dataset], np.ndarray]:
    """The datasets and their SEG pixels (first axis) in one fixed random order: frames then follow no slice order."""
    order = list(range(len(series)))
    random.Random(seed).shuffle(order)
    return [series[index] for index in order], pixels[order]


def series_and_seg(
    tmp_path: Path, heights: Sequence[float] | None = None, **series_options: Any
) -> tuple[Path, list[Dataset], hd.seg.Segmentation, np.ndarray]:
    """A staged series with blobs, a BINARY SEG of them written from the files in random order, and the masks."""
    heights = heights if heights is not None else [STEP * index for index in range(SLICES)]
    masks = blobs(len(heights), seed=len(heights))
    series = ct_series(heights, masks, **series_options)
    directory = stage(tmp_path / series[0].SeriesInstanceUID, series)
    seg = make_seg(*shuffled(series, masks))
    return directory, series, seg, masks


def expected_from_volume(directory: Path) -> np.ndarray:
    """The segmented voxels as the HU volume shows them: (1, X, Y, Z), True where bright."""
    return load_series_volume(directory).numpy() > 0


def error_of(code: str, seg_path: Path, series_dir: Path, segments: Sequence[int] | None = None) -> SegmentationError:
    """Call seg_occupancy, expect a SegmentationError with ``code``; check it names hashes only."""
    with pytest.raises(SegmentationError) as caught:
        seg_occupancy(seg_path, series_dir, segments)
    error = caught.value
    assert error.code == code, str(error)
    assert code in ERROR_CODES
    message = str(error)
    assert error.seg == uid_hash(seg_path.stem) and error.seg in message and error.path == seg_path
    assert seg_path.stem not in message and series_dir.name not in message and PATIENT_NAME not in message
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return error


# --- placement -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "heights", "series_options"),
    [
        ("top-down: InstanceNumber 1 is the highest slice", [STEP * index for index in range(SLICES)], {}),
        ("bottom-up: InstanceNumber 1 is the lowest slice", [STEP * (SLICES - index) for index in range(SLICES)], {}),
        (
            "normal pointing to the feet",
            [STEP * index for index in range(SLICES)],
            {"orientation": (-1, 0, 0, 0, 1, 0)},
        ),
        ("gantry tilt", [STEP * index for index in range(SLICES)], {"tilt_deg": 12.0}),
    ],
)
def test_the_mask_covers_exactly_the_segmented_voxels_of_the_volume(
    tmp_path: Path, layout: str, heights: list[float], series_options: dict[str, object]
) -> None:
    directory, series, seg, masks = series_and_seg(tmp_path, heights, **series_options)
    mask = seg_occupancy(save(seg, tmp_path / "seg"), directory)

    expected = expected_from_volume(directory)
    assert mask.shape == expected.shape == (1, SIZE, SIZE, len(heights)), layout
    assert mask.dtype == np.float32
    np.testing.assert_array_equal(mask, expected.astype(np.float32))
    assert 0 < mask.sum() < mask.size
    # and from the files alone: slice k is the k-th along the normal, index i the column, j the row
    normal = np.cross(series[0].ImageOrientationPatient[:3], series[0].ImageOrientationPatient[3:])
    rank = np.argsort(np.argsort([float(normal @ np.array(ds.ImagePositionPatient)) for ds in series]))
    for index, k in enumerate(rank):
        np.testing.assert_array_equal(mask[0, :, :, k], masks[index].T.astype(np.float32))


def test_segment_selection_and_the_union_of_segments(tmp_path: Path) -> None:
    heights = [STEP * index for index in range(SLICES)]
    first, second = blobs(SLICES, seed=1), blobs(SLICES, seed=2)
    series = ct_series(heights, first | second)
    directory = stage(tmp_path / series[0].SeriesInstanceUID, series)
    seg_path = save(make_seg(*shuffled(series, np.stack([first, second], axis=-1)), segments=2), tmp_path / "seg")

    union = seg_occupancy(seg_path, directory)
    np.testing.assert_array_equal(union, expected_from_volume(directory).astype(np.float32))
    only_first = seg_occupancy(seg_path, directory, [1])
    only_second = seg_occupancy(seg_path, directory, segments=(2,))
    # slices ascend with the heights here, so the volume's (X, Y, Z) is the masks' (Z, Y, X) transposed
    np.testing.assert_array_equal(only_first[0], first.transpose(2, 1, 0).astype(np.float32))
    np.testing.assert_array_equal(only_second[0], second.transpose(2, 1, 0).astype(np.float32))
    np.testing.assert_array_equal(seg_occupancy(seg_path, directory, [1, 2]), union)

    error = error_of("unknown_segment", seg_path, directory, [2, 3])
    assert "[3]" in str(error) and "[1, 2]" in str(error)
    with pytest.raises(ValueError, match="segments is empty"):
        seg_occupancy(seg_path, directory, [])


def test_a_fractional_seg_gives_its_fractions(tmp_path: Path) -> None:
    heights = [STEP * index for index in range(SLICES)]
    masks = blobs(SLICES, seed=3)
    series = ct_series(heights, masks)
    directory = stage(tmp_path / series[0].SeriesInstanceUID, series)
    fractions = masks * np.float32(0.5)
    fractions[4, 0, 0] = 1.0  # a full voxel outside the blobs
    seg_path = save(make_seg(series, fractions, "FRACTIONAL", fractional_type="OCCUPANCY"), tmp_path / "seg")

    mask = seg_occupancy(seg_path, directory)
    expected = np.where(masks, 128 / 255, 0.0).transpose(2, 1, 0)  # 0.5 stored as round(0.5 * 255) of 255
    expected[0, 0, 4] = 1.0
    np.testing.assert_allclose(mask[0], expected, rtol=0, atol=1e-6)
    assert mask.dtype == np.float32 and mask.min() >= 0.0 and mask.max() == 1.0


def test_a_label_map_seg_selects_by_label(tmp_path: Path) -> None:
    heights = [STEP * index for index in range(SLICES)]
    first, second = blobs(SLICES, seed=4), blobs(SLICES, seed=5)
    second &= ~first  # a label map has one label per voxel
    series = ct_series(heights, first | second)
    directory = stage(tmp_path / series[0].SeriesInstanceUID, series)
    labels = (first * 1 + second * 2).astype(np.uint8)
    seg_path = save(make_seg(*shuffled(series, labels), "LABELMAP", segments=2), tmp_path / "seg")

    np.testing.assert_array_equal(
        seg_occupancy(seg_path, directory), expected_from_volume(directory).astype(np.float32)
    )
    np.testing.assert_array_equal(seg_occupancy(seg_path, directory, [2])[0], second.transpose(2, 1, 0))
    # highdicom defines label 0 as Background (DCM 125040): left out by default, selectable by number
    background = seg_occupancy(seg_path, directory, [0])[0]
    np.testing.assert_array_equal(background, ~(first | second).transpose(2, 1, 0))


def test_an_empty_seg_and_an_empty_segment_give_zeros(tmp_path: Path) -> None:
    heights = [STEP * index for index in range(SLICES)]
    masks = blobs(SLICES, seed=6)
    series = ct_series(heights, masks)
    directory = stage(tmp_path / series[0].SeriesInstanceUID, series)
    nothing = np.zeros((SLICES, SIZE, SIZE), dtype=bool)

    empty = seg_occupancy(save(make_seg(series, nothing), tmp_path / "empty"), directory)
    assert empty.shape == (1, SIZE, SIZE, SLICES) and not empty.any()
    # segment 2 has no frame at all (highdicom omits empty frames)
    two = save(make_seg(series, np.stack([masks, nothing], axis=-1), segments=2), tmp_path / "two")
    assert not seg_occupancy(two, directory, [2]).any()
    assert seg_occupancy(two, directory, [1]).sum() == masks.sum()


@pytest.mark.parametrize("dropped", ["DerivationImageSequence", "PlanePositionSequence"])
def test_frames_are_placed_by_position_alone_or_by_reference_alone(tmp_path: Path, dropped: str) -> None:
    directory, _, seg, _ = series_and_seg(tmp_path)
    for group in seg.PerFrameFunctionalGroupsSequence:
        delattr(group, dropped)
    mask = seg_occupancy(save(seg, tmp_path / "seg"), directory)
    np.testing.assert_array_equal(mask, expected_from_volume(directory).astype(np.float32))


def test_an_enhanced_ct_source_is_placed_by_frame(tmp_path: Path) -> None:
    heights = [9.0, 0.0, 6.0, 3.0]
    ds = with_seg_attributes(enhanced_ct(heights, [1.0] * 4), generate_uid())  # 6 x 5 frames, unsorted heights
    directory = stage(tmp_path / ds.SeriesInstanceUID, [ds])
    pixels = np.zeros((4, ds.Rows, ds.Columns), dtype=bool)
    pixels[2, 1, 2] = True  # frame 3 of the source, at height 6.0: the SEG's only frame
    seg = make_seg([ds], pixels)
    assert seg.NumberOfFrames == 1

    mask = seg_occupancy(save(seg, tmp_path / "seg"), directory)
    assert mask.shape == (1, ds.Columns, ds.Rows, 4)
    assert mask.sum() == 1 and mask[0, 2, 1, sorted(heights).index(6.0)] == 1.0


# --- errors ----------------------------------------------------------------------------------------------------------


def test_a_seg_of_another_series_is_rejected(tmp_path: Path) -> None:
    directory, series, _, masks = series_and_seg(tmp_path)
    # the same geometry and frame of reference, another series (a second reconstruction of the scan)
    other = ct_series(
        [float(ds.ImagePositionPatient[2]) for ds in series], masks, frame_of_reference=series[0].FrameOfReferenceUID
    )
    seg_path = save(make_seg(other, masks), tmp_path / "seg")
    error = error_of("other_series", seg_path, directory)
    assert uid_hash(other[0].SeriesInstanceUID) in str(error) and uid_hash(series[0].SeriesInstanceUID) in str(error)
    assert other[0].SeriesInstanceUID not in str(error) and error.series == uid_hash(series[0].SeriesInstanceUID)


def test_a_seg_in_another_frame_of_reference_is_rejected(tmp_path: Path) -> None:
    directory, _, seg, _ = series_and_seg(tmp_path)
    seg.FrameOfReferenceUID = generate_uid()
    error = error_of("other_frame_of_reference", save(seg, tmp_path / "seg"), directory)
    assert uid_hash(seg.FrameOfReferenceUID) in str(error) and seg.FrameOfReferenceUID not in str(error)


def test_a_seg_of_another_matrix_size_is_rejected(tmp_path: Path) -> None:
    directory, series, _, _ = series_and_seg(tmp_path)
    half = [ds.copy() for ds in series]
    for ds in half:
        ds.Rows = ds.Columns = SIZE // 2
        ds.PixelData = np.zeros((SIZE // 2, SIZE // 2), dtype=np.int16).tobytes()
    seg_path = save(make_seg(half, np.ones((SLICES, SIZE // 2, SIZE // 2), dtype=bool)), tmp_path / "seg")
    error = error_of("matrix_size", seg_path, directory)
    assert "16x16" in str(error) and "32x32" in str(error)


def test_a_frame_between_slices_or_shifted_in_plane_matches_no_slice(tmp_path: Path) -> None:
    directory, _, seg, _ = series_and_seg(tmp_path)
    position = seg.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0]
    original = [float(value) for value in position.ImagePositionPatient]
    position.ImagePositionPatient = [original[0], original[1], original[2] + STEP / 2]
    error = error_of("unmatched_frame", save(seg, tmp_path / "between"), directory)
    assert "frame 2" in str(error) and "1.250 mm along the normal" in str(error)

    position.ImagePositionPatient = [original[0] + 0.75, original[1], original[2]]  # one column off
    error = error_of("unmatched_frame", save(seg, tmp_path / "shifted"), directory)
    assert "0.000 mm along the normal and 0.750 mm in-plane" in str(error)


def test_a_position_and_a_reference_naming_different_slices_are_inconsistent(tmp_path: Path) -> None:
    directory, _, seg, _ = series_and_seg(tmp_path)
    # one segment: each frame lies on its own slice
    first, second = (group.PlanePositionSequence[0] for group in seg.PerFrameFunctionalGroupsSequence[:2])
    first.ImagePositionPatient, second.ImagePositionPatient = second.ImagePositionPatient, first.ImagePositionPatient
    error_of("inconsistent_reference", save(seg, tmp_path / "seg"), directory)


def test_a_frame_without_position_referencing_no_image_of_the_series_is_unmatched(tmp_path: Path) -> None:
    directory, _, seg, _ = series_and_seg(tmp_path)
    group = seg.PerFrameFunctionalGroupsSequence[0]
    del group.PlanePositionSequence
    group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID = generate_uid()
    error = error_of("unmatched_frame", save(seg, tmp_path / "seg"), directory)
    assert "frame 1 has no plane position" in str(error)


@pytest.mark.parametrize(
    ("code", "edit"),
    [
        ("pixel_spacing", lambda group: setattr(group.PixelMeasuresSequence[0], "PixelSpacing", [0.5, 0.5])),
        (
            "orientation",
            lambda group: setattr(group.PlaneOrientationSequence[0], "ImageOrientationPatient", [0, 1, 0, 1, 0, 0]),
        ),
    ],
)
def test_a_seg_with_other_pixel_spacing_or_orientation_is_rejected(
    tmp_path: Path, code: str, edit: Callable[[Dataset], None]
) -> None:
    directory, _, seg, _ = series_and_seg(tmp_path)
    edit(seg.SharedFunctionalGroupsSequence[0])
    error_of(code, save(seg, tmp_path / "seg"), directory)


def test_a_file_that_is_no_seg_or_no_dicom_is_rejected(tmp_path: Path) -> None:
    directory, series, _, _ = series_and_seg(tmp_path)
    error = error_of("not_segmentation", directory / f"{series[0].SOPInstanceUID}.dcm", directory)
    assert "CT Image Storage" in str(error)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 64)
    error_of("unreadable", garbage, directory)


def test_a_broken_source_series_raises_the_volume_error(tmp_path: Path) -> None:
    directory, series, seg, _ = series_and_seg(tmp_path)
    seg_path = save(seg, tmp_path / "seg")
    with pytest.raises(VolumeError) as caught:
        seg_occupancy(seg_path, tmp_path / series[0].StudyInstanceUID)  # no such directory
    assert caught.value.code == "empty"
    stray = ct_series([100.0], blobs(1, seed=0))[0]  # a file of another series in the directory
    stage(directory, [stray])
    with pytest.raises(VolumeError) as caught:
        seg_occupancy(seg_path, directory)
    assert caught.value.code == "mixed_series" and series[0].SeriesInstanceUID not in str(caught.value)


def test_every_error_code_is_documented() -> None:
    text = (Path(__file__).parents[2] / "docs" / "model.md").read_text()
    for code in ERROR_CODES:
        assert f"`{code}`" in text, code


# --- finding SEG files -----------------------------------------------------------------------------------------------


def test_find_segmentations_maps_each_referenced_series_to_its_seg_files(tmp_path: Path) -> None:
    study = tmp_path / "study"
    directory, series, seg, _ = series_and_seg(study)
    first = save(seg, study / "seg-a")
    second = save(make_seg(series[:2], np.zeros((2, SIZE, SIZE), dtype=bool)), study / "seg-b")
    (study / "notes.txt").write_text("not DICOM")
    (study / ".hidden.dcm").write_bytes(first.read_bytes())

    found = find_segmentations(tmp_path)
    assert found == {series[0].SeriesInstanceUID: sorted([first, second])}
    assert find_segmentations(directory) == {}  # CT slices only
    with pytest.raises(NotADirectoryError):
        find_segmentations(tmp_path / "missing")


def test_a_seg_labelled_training_table_trains_the_detector(tmp_path: Path) -> None:
    # a site's cohort: staged series with their radiologists' SEG objects -> a table with masks -> a detector model
    from riskbridge.harmonize.features import build_vector, load_default_feature_spec
    from riskbridge.model.data import TableWriter, load_table, series_row
    from riskbridge.model.preprocess import PreprocessConfig, Preprocessor
    from riskbridge.model.train import TrainOptions, fit_strategies

    spec = load_default_feature_spec()
    config = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.5), size=(16, 16, 12), hu_window=(-1000.0, 400.0))
    preprocessor = Preprocessor(config)
    writer = TableWriter(tmp_path / "table", spec, config, {"kind": "site"})
    for index in range(10):
        directory, _, seg, _ = series_and_seg(tmp_path / f"p{index}")
        path = save(seg, tmp_path / f"seg{index}") if index < 8 else None  # two patients not segmented
        vector = build_vector(spec, {"wbc": 5.0 + index}, None, {"age_years": 60.0, "sex_male": 1.0})
        row = series_row(f"p{index}", index % 2, vector, directory, preprocessor, path)
        assert (row.mask is None) == (path is None)
        if row.mask is not None and row.volume is not None:
            assert row.mask.shape == row.volume.shape
            # every bright voxel of the preprocessed image is a segmented one, and the mask marks it
            assert row.mask.any() and row.mask[row.volume > 0.9].all()
        writer.add(row)
    writer.close()
    table = load_table(tmp_path / "table", spec)
    assert table.has_mask is not None and table.has_mask.tolist() == [True] * 8 + [False] * 2
    assert table.mask_rows.tolist() == list(range(8))
    options = TrainOptions(
        readout_epochs=2, fusion_epochs=2, dense_iterations=4, dense_batch_size=2, batch_size=4,
        embed_dim=4, hidden_dim=4, calibration_fraction=0.4,
    )  # fmt: skip
    fitted = fit_strategies(spec, table, ["hybrid"], options)
    assert fitted["hybrid"].network.config.image_encoder == "detector"
