"""Series to volume: sorting, HU rescale, affine conventions, Enhanced CT, compressed syntaxes and every error code.

Synthetic series are written with pydicom into tmp_path with known geometry; pydicom's bundled test files (present
offline in pydicom 3.0.2's wheel) cover the transfer syntaxes; GDCM re-encodes CT_small.dcm where the wheel has no
monochrome example (JPEG baseline, JPEG lossless).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from riskbridge.harmonize.volume import ERROR_CODES, VolumeError, VolumeOptions, build_volume
from riskbridge.model.volume_io import load_series_volume, series_files
from riskbridge.records import uid_hash

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PATIENT_NAME = "Secret^Patient"
ROWS, COLUMNS = 6, 5


def bundled_file(name: str) -> Path:
    """A file of pydicom's bundled test data (shipped in the wheel: no download)."""
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), f"{name} is not in pydicom's bundled test files"
    return Path(path)


def stored_pattern(slice_index: int, rows: int = ROWS, columns: int = COLUMNS) -> np.ndarray:
    """Stored values that identify their voxel: 100 * slice + 10 * row + column."""
    row, column = np.mgrid[0:rows, 0:columns]
    return (100 * slice_index + 10 * row + column).astype(np.int16)


def ct_dataset(
    series_uid: str,
    position: Sequence[float],
    orientation: Sequence[float] = AXIAL,
    *,
    pixels: np.ndarray,
    slope: float = 1.0,
    intercept: float = -1024.0,
    instance_number: int = 1,
    pixel_spacing: tuple[float, float] = (0.5, 0.75),
) -> Dataset:
    """A CT Image Storage instance with the given geometry and stored pixels."""
    ds = Dataset()
    sop = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", series_uid
    ds.Modality, ds.PatientName, ds.PatientID = "CT", PATIENT_NAME, "P-SECRET"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [round(value, 6) for value in position]
    ds.ImageOrientationPatient = [round(value, 8) for value in orientation]
    ds.PixelSpacing = list(pixel_spacing)
    ds.SliceThickness = 2.5
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
    ds.PixelData = pixels.astype(np.int16).tobytes()
    return ds


def stage(directory: Path, datasets: Sequence[Dataset]) -> Path:
    """Write datasets as a staged series: <directory>/<SOPInstanceUID>.dcm."""
    directory.mkdir(parents=True, exist_ok=True)
    for ds in datasets:
        ds.save_as(directory / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return directory


def axial_series(
    count: int = 4,
    *,
    origin: Sequence[float] = (-10.0, 20.0, 30.0),
    step: float = 2.5,
    positions: Sequence[float] | None = None,
    series_uid: str | None = None,
) -> list[Dataset]:
    """An axial series; InstanceNumbers run opposite to position so sorting by them would be wrong."""
    uid = series_uid or generate_uid()
    heights = positions if positions is not None else [origin[2] + step * index for index in range(count)]
    return [
        ct_dataset(
            uid,
            (origin[0], origin[1], height),
            pixels=stored_pattern(index),
            instance_number=len(heights) - index,
        )
        for index, height in enumerate(heights)
    ]


def voxel_to_lps(ds: Dataset, column: int, row: int) -> np.ndarray:
    """The DICOM (LPS) position of pixel (column, row) of one slice, from its own attributes (PS3.3 C.7.6.2.1.1)."""
    orientation = np.array(ds.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(value) for value in ds.PixelSpacing)
    return (
        np.array(ds.ImagePositionPatient, dtype=float)
        + orientation[:3] * column_spacing * column
        + orientation[3:] * row_spacing * row
    )


def error_of_call(call: Callable[[], object], code: str) -> VolumeError:
    """Run ``call``, expect a VolumeError with ``code``; return it for further checks."""
    with pytest.raises(VolumeError) as caught:
        call()
    assert caught.value.code == code, str(caught.value)
    assert code in ERROR_CODES
    return caught.value


def error_of(source: Path | list[Path], code: str, options: VolumeOptions | None = None) -> VolumeError:
    """Load ``source``, expect a VolumeError with ``code``; return it for further checks."""
    return error_of_call(lambda: load_series_volume(source, options), code)


# --- ordering, values, layout ------------------------------------------------------------------------------------


def test_slices_are_ordered_by_position_along_the_normal_not_by_instance_number(tmp_path: Path) -> None:
    series = axial_series(5)
    directory = stage(tmp_path / "series", series)

    volume = load_series_volume(directory)

    assert volume.shape == (1, COLUMNS, ROWS, 5)  # channel, X (columns), Y (rows), Z (slices)
    assert volume.dtype == torch.float32
    for index in range(5):
        expected = stored_pattern(index).T.astype(np.float32) - 1024  # (rows, columns) -> (X, Y)
        np.testing.assert_array_equal(volume[0, :, :, index].numpy(), expected)
    assert volume[0, 3, 2, 4].item() == 100 * 4 + 10 * 2 + 3 - 1024  # voxel (i=column, j=row, k=slice)
    assert volume.meta["slice_count"] == 5
    assert volume.meta["series_uid"] == series[0].SeriesInstanceUID
    assert volume.meta["series_uid_hash"] == uid_hash(series[0].SeriesInstanceUID)
    np.testing.assert_allclose(volume.meta["spacing"], [0.75, 0.5, 2.5])
    np.testing.assert_array_equal(volume.meta["spatial_shape"], [COLUMNS, ROWS, 5])
    assert volume.meta["first_slice_position_mm"] == pytest.approx(30.0)
    assert volume.meta["transfer_syntaxes"] == ExplicitVRLittleEndian


def test_positions_descending_in_file_order_still_give_ascending_slices(tmp_path: Path) -> None:
    series = axial_series(positions=[40.0, 37.5, 35.0, 32.5])  # first written = highest
    volume = load_series_volume(stage(tmp_path / "series", series))
    # slice k of the volume is the dataset at the k-th lowest position: index 3 of the list first
    assert volume[0, 0, 0, 0].item() == 300 - 1024
    assert volume[0, 0, 0, 3].item() == 0 - 1024
    assert volume.affine[2, 2].item() == pytest.approx(2.5)


def test_rescale_is_applied_per_slice_in_float32(tmp_path: Path) -> None:
    uid = generate_uid()
    rescales = [(1.0, -1024.0), (2.0, -2048.0), (0.5, 0.0), (0.25, -10.5)]
    series = [
        ct_dataset(uid, (0, 0, 5.0 * index), pixels=stored_pattern(index), slope=slope, intercept=intercept)
        for index, (slope, intercept) in enumerate(rescales)
    ]
    volume = load_series_volume(stage(tmp_path / "series", series))
    for index, (slope, intercept) in enumerate(rescales):
        expected = (stored_pattern(index).T * slope + intercept).astype(np.float32)
        np.testing.assert_allclose(volume[0, :, :, index].numpy(), expected, rtol=0, atol=1e-4)
    assert volume.meta["rescale_type"] == "HU"


def test_channel_first_view_needs_no_copy_and_works_with_monai_lazy_transforms(tmp_path: Path) -> None:
    from monai.transforms import Compose, Orientation, Spacing

    volume = load_series_volume(stage(tmp_path / "series", axial_series(4)))
    assert volume.stride()[1:] == (1, COLUMNS, COLUMNS * ROWS)  # a view on the (Z, Y, X) buffer, not a copy
    # In an axial slice i runs to the patient's left and j to posterior, so the volume is "LPS" oriented and
    # Orientation("RAS") has to flip two axes: a real change of layout for the lazy pipeline to resample once.
    pipeline = Compose([Orientation(axcodes="RAS", labels=None), Spacing(pixdim=(0.75, 0.5, 2.5))], lazy=True)
    resampled = pipeline(volume)

    # A voxel keeps its value at the same world point: find voxel (i=3, j=2, k=1) after reorientation.
    world = volume.affine.numpy() @ np.array([3, 2, 1, 1.0])
    index = np.linalg.solve(resampled.affine.numpy(), world)[:3]
    i, j, k = (round(float(value)) for value in index)
    assert np.allclose(index, [i, j, k], atol=1e-6)
    assert (i, j, k) == (COLUMNS - 1 - 3, ROWS - 1 - 2, 1)  # x and y flipped to run towards R and A
    assert (np.diag(resampled.affine.numpy())[:3] > 0).all()
    assert resampled[0, i, j, k].item() == pytest.approx(volume[0, 3, 2, 1].item())
    assert tuple(resampled.shape) == (1, COLUMNS, ROWS, 4)


def test_volumes_of_different_series_batch_after_resizing(tmp_path: Path) -> None:
    """No meta value varies in length with the series, so MONAI's collate can stack two volumes' meta."""
    from monai.data import list_data_collate
    from monai.transforms import Resize

    plain = load_series_volume(stage(tmp_path / "a", axial_series(3)))
    compressed_series = axial_series(5)
    for ds in compressed_series:
        ds.compress(RLELossless)
    compressed = load_series_volume(stage(tmp_path / "b", compressed_series))
    resize = Resize((4, 4, 4))
    batch = list_data_collate([resize(plain), resize(compressed)])
    assert tuple(batch.shape) == (2, 1, 4, 4, 4)
    assert batch.meta["slice_count"].tolist() == [3, 5]
    assert batch.meta["transfer_syntaxes"] == [ExplicitVRLittleEndian, RLELossless]


def test_files_of_another_series_than_expected_are_rejected(tmp_path: Path) -> None:
    series = axial_series(3)
    directory = stage(tmp_path / "series", series)
    expected = generate_uid()
    error = error_of_call(lambda: load_series_volume(directory, series_uid=expected), "mixed_series")
    assert error.series == uid_hash(expected) and uid_hash(series[0].SeriesInstanceUID) in str(error)
    assert load_series_volume(directory, series_uid=series[0].SeriesInstanceUID).meta["slice_count"] == 3


# --- affine ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["RAS", "LPS"])
def test_affine_maps_voxels_to_patient_coordinates_axial(tmp_path: Path, space: Literal["RAS", "LPS"]) -> None:
    series = axial_series(3, origin=(-10.0, 20.0, 30.0), step=2.5)
    volume = load_series_volume(stage(tmp_path / "series", series), VolumeOptions(space=space))
    affine = volume.affine.numpy()
    to_space = np.diag([-1.0, -1.0, 1.0]) if space == "RAS" else np.eye(3)
    for k, ds in enumerate(series):
        for i, j in [(0, 0), (4, 0), (0, 5), (3, 2)]:
            expected = to_space @ voxel_to_lps(ds, column=i, row=j)
            np.testing.assert_allclose((affine @ [i, j, k, 1])[:3], expected, atol=1e-9)
    assert str(volume.meta["space"]) == space
    torch.testing.assert_close(volume.meta["original_affine"], volume.affine)
    if space == "RAS":
        # the corner voxel of an axial DICOM lies at patient right/anterior: RAS x = +10, y = -20
        np.testing.assert_allclose(affine[:3, 3], [10.0, -20.0, 30.0])


def test_affine_of_an_oblique_series_places_every_slice_exactly(tmp_path: Path) -> None:
    angle = math.radians(25)
    # rows tilted about the x axis, columns along them: an orthonormal oblique orientation
    row_dir = np.array([math.cos(angle), math.sin(angle), 0.0])
    col_dir = np.array([0.0, 0.0, -1.0])
    normal = np.cross(row_dir, col_dir)
    origin = np.array([5.0, -7.0, 12.0])
    uid = generate_uid()
    order = [2, 0, 3, 1]  # written out of order
    series = [
        ct_dataset(
            uid, origin + normal * 1.5 * k, (*row_dir, *col_dir), pixels=stored_pattern(k), instance_number=10 - k
        )
        for k in order
    ]
    volume = load_series_volume(stage(tmp_path / "series", series), VolumeOptions(space="LPS"))
    affine = volume.affine.numpy()
    for ds, k in zip(series, order, strict=True):
        np.testing.assert_allclose((affine @ [2, 3, k, 1])[:3], voxel_to_lps(ds, column=2, row=3), atol=1e-5)
        assert volume[0, 2, 3, k].item() == 100 * k + 32 - 1024
    assert volume.meta["gantry_tilt_deg"] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(volume.meta["spacing"], [0.75, 0.5, 1.5], atol=1e-6)


def test_gantry_tilt_gives_a_sheared_affine_that_still_fits_every_slice(tmp_path: Path) -> None:
    tilt = math.radians(15)
    heights = [0.0, 2.0, 4.0, 6.0]
    uid = generate_uid()
    # a tilted gantry shifts each axial slice's origin along y as it moves along z
    series = [
        ct_dataset(uid, (0.0, height * math.tan(tilt), height), pixels=stored_pattern(index))
        for index, height in enumerate(heights)
    ]
    volume = load_series_volume(stage(tmp_path / "series", series), VolumeOptions(space="LPS"))
    affine = volume.affine.numpy()
    for k, ds in enumerate(series):
        np.testing.assert_allclose((affine @ [1, 1, k, 1])[:3], voxel_to_lps(ds, column=1, row=1), atol=1e-5)
    assert volume.meta["gantry_tilt_deg"] == pytest.approx(15.0, abs=1e-3)


# --- single slice, staging layout ------------------------------------------------------------------------------------


def test_a_single_slice_needs_min_slices_1(tmp_path: Path) -> None:
    directory = stage(tmp_path / "series", axial_series(1))
    error = error_of(directory, "too_few_slices")
    assert "at least 2" in str(error)

    volume = load_series_volume(directory, VolumeOptions(min_slices=1))
    assert volume.shape == (1, COLUMNS, ROWS, 1)
    assert volume.affine[2, 2].item() == pytest.approx(2.5)  # SliceThickness stands in for the missing step


def test_a_series_directory_lists_only_complete_staged_files(tmp_path: Path) -> None:
    directory = stage(tmp_path / "series", axial_series(3))
    (directory / ".incoming-abc.part").write_bytes(b"half a file")
    assert len(series_files(directory)) == 3
    assert load_series_volume(directory).meta["slice_count"] == 3
    assert load_series_volume(series_files(directory)).meta["slice_count"] == 3  # a list of paths works too


def test_the_pure_builder_makes_the_same_volume_from_datasets_in_memory(tmp_path: Path) -> None:
    """harmonize.volume decides without I/O: datasets never written to disk give the volume the files give."""
    series = axial_series(4)
    from_files = load_series_volume(stage(tmp_path / "series", series))
    from_memory = build_volume(list(reversed(series)))
    assert torch.equal(from_memory.as_tensor(), from_files.as_tensor())
    assert torch.equal(from_memory.affine, from_files.affine)
    assert from_memory.meta["series_uid"] == series[0].SeriesInstanceUID

    error = error_of_call(lambda: build_volume([]), "empty")
    assert error.series == "unknown"
    other = axial_series(1, origin=(0.0, 0.0, 100.0))
    error = error_of_call(
        lambda: build_volume([*series, *other], series_uid=series[0].SeriesInstanceUID), "mixed_series"
    )
    assert error.series == uid_hash(series[0].SeriesInstanceUID)


# --- errors ----------------------------------------------------------------------------------------------------------


def assert_names_hashes_only(error: VolumeError, series_uid: str, instance_uid: str | None) -> None:
    """The message names the hashed series (and instance), never a raw UID or patient data."""
    message = str(error)
    assert uid_hash(series_uid) in message and error.series == uid_hash(series_uid)
    if instance_uid is not None:
        assert uid_hash(instance_uid) in message and error.instance and uid_hash(instance_uid) in error.instance
        assert instance_uid not in message
    assert series_uid not in message
    assert PATIENT_NAME not in message and "P-SECRET" not in message
    # no lower library's exception (and traceback) attached
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_a_missing_slice_is_a_gap(tmp_path: Path) -> None:
    series = axial_series(positions=[0.0, 2.5, 5.0, 10.0, 12.5])
    error = error_of(stage(tmp_path / "series", series), "gap")
    assert "about 1 slice(s) missing" in str(error)
    assert_names_hashes_only(error, series[0].SeriesInstanceUID, series[3].SOPInstanceUID)


def test_two_slices_at_one_position_are_duplicates(tmp_path: Path) -> None:
    series = axial_series(positions=[0.0, 2.5, 2.5, 5.0])
    error = error_of(stage(tmp_path / "series", series), "duplicate_position")
    assert_names_hashes_only(error, series[0].SeriesInstanceUID, None)
    assert error.instance in {uid_hash(series[1].SOPInstanceUID), uid_hash(series[2].SOPInstanceUID)}


def test_uneven_spacing_beyond_the_tolerance_is_rejected_and_within_it_accepted(tmp_path: Path) -> None:
    series = axial_series(positions=[0.0, 2.5, 5.0, 7.7, 10.0])  # 2.7 mm: 8 % off
    directory = stage(tmp_path / "series", series)
    error = error_of(directory, "nonuniform_spacing")
    assert_names_hashes_only(error, series[0].SeriesInstanceUID, series[3].SOPInstanceUID)
    assert load_series_volume(directory, VolumeOptions(spacing_tolerance=0.1)).meta["slice_count"] == 5


def test_a_slice_off_the_series_axis_is_rejected(tmp_path: Path) -> None:
    series = axial_series(4)
    series[2].ImagePositionPatient = [-10.0 + 3.0, 20.0, 35.0]  # right height, shifted sideways
    error = error_of(stage(tmp_path / "series", series), "off_axis")
    assert_names_hashes_only(error, series[0].SeriesInstanceUID, series[2].SOPInstanceUID)


def test_mixed_orientations_are_rejected(tmp_path: Path) -> None:
    series = axial_series(3)
    series[1].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice (a localizer) mixed in
    error = error_of(stage(tmp_path / "series", series), "mixed_orientation")
    assert_names_hashes_only(error, series[0].SeriesInstanceUID, series[1].SOPInstanceUID)


def test_mixed_rows_and_columns_are_rejected(tmp_path: Path) -> None:
    series = axial_series(3)
    uid = series[0].SeriesInstanceUID
    series[2] = ct_dataset(uid, (-10.0, 20.0, 35.0), pixels=np.zeros((ROWS + 2, COLUMNS), np.int16))
    error = error_of(stage(tmp_path / "series", series), "mixed_shape")
    assert_names_hashes_only(error, uid, series[2].SOPInstanceUID)


def test_mixed_pixel_spacing_is_rejected(tmp_path: Path) -> None:
    series = axial_series(3)
    series[1].PixelSpacing = [0.6, 0.75]
    error = error_of(stage(tmp_path / "series", series), "mixed_pixel_spacing")
    assert_names_hashes_only(error, series[0].SeriesInstanceUID, series[1].SOPInstanceUID)


def test_an_instance_without_pixel_data_is_rejected(tmp_path: Path) -> None:
    series = axial_series(3)
    del series[1].PixelData
    error = error_of(stage(tmp_path / "series", series), "missing_pixel_data")
    assert_names_hashes_only(error, series[0].SeriesInstanceUID, series[1].SOPInstanceUID)


def test_an_instance_without_geometry_is_rejected(tmp_path: Path) -> None:
    series = axial_series(3)
    del series[2].ImagePositionPatient
    error = error_of(stage(tmp_path / "series", series), "missing_geometry")
    assert "ImagePositionPatient" in str(error)
    assert_names_hashes_only(error, series[0].SeriesInstanceUID, series[2].SOPInstanceUID)


def test_unparsable_geometry_is_invalid_geometry(tmp_path: Path) -> None:
    series = axial_series(3)
    directory = stage(tmp_path / "series", series)
    path = directory / f"{series[1].SOPInstanceUID}.dcm"
    encoded = path.read_bytes()
    assert encoded.count(b"0.5\\0.75") == 1  # PixelSpacing as written; pydicom refuses to write a bad DS
    path.write_bytes(encoded.replace(b"0.5\\0.75", b"abc\\defg"))
    error = error_of(directory, "invalid_geometry")
    assert "abc" not in str(error)
    assert_names_hashes_only(error, series[0].SeriesInstanceUID, series[1].SOPInstanceUID)


def test_a_corrupt_file_is_unreadable_and_named_by_its_hashed_uid(tmp_path: Path) -> None:
    series = axial_series(3)
    directory = stage(tmp_path / series[0].SeriesInstanceUID, series)
    corrupt = directory / f"{series[1].SOPInstanceUID}.dcm"
    corrupt.write_bytes(b"this is not DICOM at all" * 20)
    error = error_of(directory, "unreadable")
    # the directory name is the series UID (staging layout), so the error names it before any file is parsed
    assert_names_hashes_only(error, series[0].SeriesInstanceUID, series[1].SOPInstanceUID)


def test_truncated_pixel_data_is_undecodable(tmp_path: Path) -> None:
    series = axial_series(3)
    series[0].PixelData = series[0].PixelData[:-20]
    directory = stage(tmp_path / "series", series)
    error = error_of(directory, "undecodable")
    assert_names_hashes_only(error, series[0].SeriesInstanceUID, series[0].SOPInstanceUID)


def test_corrupt_compressed_pixel_data_is_undecodable(tmp_path: Path) -> None:
    series = axial_series(3)
    for ds in series:
        ds.compress(RLELossless)
    fragment_data = bytearray(series[2].PixelData)
    fragment_data[24:40] = b"\xff" * 16  # inside the RLE header of the only fragment: segment offsets now nonsense
    series[2].PixelData = bytes(fragment_data)
    error = error_of(stage(tmp_path / "series", series), "undecodable")
    assert_names_hashes_only(error, series[0].SeriesInstanceUID, series[2].SOPInstanceUID)


def test_12_bit_jpeg_extended_has_no_decoder_here(tmp_path: Path) -> None:
    """pydicom's JPEG-lossy.dcm needs pylibjpeg-libjpeg (GPL, not installed): GDCM and Pillow refuse 12-bit."""
    ds = pydicom.dcmread(bundled_file("JPEG-lossy.dcm"))
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, 0], list(AXIAL), [1, 1]
    ds.save_as(tmp_path / "jpeg12.dcm")
    error = error_of([tmp_path / "jpeg12.dcm"], "undecodable", VolumeOptions(min_slices=1))
    assert "cannot be decoded" in str(error)


def test_files_of_two_series_are_rejected(tmp_path: Path) -> None:
    first, second = axial_series(2), axial_series(2, origin=(0.0, 0.0, 100.0))
    paths = series_files(stage(tmp_path / "a", first)) + series_files(stage(tmp_path / "b", second))
    error = error_of(paths, "mixed_series")
    assert uid_hash(second[0].SeriesInstanceUID) in str(error)


def test_an_empty_directory_is_empty(tmp_path: Path) -> None:
    (tmp_path / "series").mkdir()
    error_of(tmp_path / "series", "empty")


def test_colour_images_are_unsupported(tmp_path: Path) -> None:
    ds = pydicom.dcmread(bundled_file("SC_rgb_rle.dcm"))
    error = error_of([bundled_file("SC_rgb_rle.dcm")], "unsupported_pixels", VolumeOptions(min_slices=1))
    assert uid_hash(ds.SOPInstanceUID) in str(error)


def test_every_error_code_is_documented() -> None:
    documented = (Path(__file__).resolve().parents[2] / "docs" / "volume.md").read_text()
    for code in ERROR_CODES:
        assert f"`{code}`" in documented, code


# --- Enhanced CT multi-frame -----------------------------------------------------------------------------------------


def enhanced_ct(heights: Sequence[float], slopes: Sequence[float]) -> Dataset:
    """An Enhanced CT Image with per-frame positions and rescale, shared orientation and pixel measures."""
    ds = Dataset()
    sop = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3.4", generate_uid(), "CT"
    ds.PatientName = PATIENT_NAME
    ds.NumberOfFrames = len(heights)
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1

    orientation = Dataset()
    orientation.ImageOrientationPatient = list(AXIAL)
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.75], 3.0
    shared = Dataset()
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    frames = []
    for height, slope in zip(heights, slopes, strict=True):
        position, transformation, group = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [1.0, 2.0, height]
        transformation.RescaleSlope, transformation.RescaleIntercept, transformation.RescaleType = slope, -1000, "HU"
        group.PlanePositionSequence = DicomSequence([position])
        group.PixelValueTransformationSequence = DicomSequence([transformation])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = np.stack([stored_pattern(index) for index in range(len(heights))]).tobytes()
    return ds


def test_enhanced_ct_frames_are_sorted_and_rescaled_from_their_functional_groups(tmp_path: Path) -> None:
    heights, slopes = [9.0, 0.0, 6.0, 3.0], [1.0, 2.0, 1.0, 0.5]
    ds = enhanced_ct(heights, slopes)
    volume = load_series_volume(stage(tmp_path / "series", [ds]))

    assert volume.shape == (1, COLUMNS, ROWS, 4)
    assert volume.meta["first_slice_position_mm"] == pytest.approx(0.0)
    assert volume.affine[2, 2].item() == pytest.approx(3.0)
    for frame in range(4):
        k = sorted(heights).index(heights[frame])
        expected = stored_pattern(frame).T * slopes[frame] - 1000
        np.testing.assert_allclose(volume[0, :, :, k].numpy(), expected)
    np.testing.assert_allclose(volume.affine.numpy()[:3, 3], [-1.0, -2.0, 0.0])  # RAS of frame at height 0
    np.testing.assert_allclose(volume.meta["spacing"], [0.75, 0.5, 3.0])


def test_enhanced_ct_compressed_per_frame(tmp_path: Path) -> None:
    ds = enhanced_ct([0.0, 3.0, 6.0], [1.0, 1.0, 1.0])
    ds.compress(RLELossless)
    volume = load_series_volume(stage(tmp_path / "series", [ds]))
    assert volume[0, 4, 5, 2].item() == 200 + 54 - 1000


def test_enhanced_ct_without_plane_position_is_missing_geometry(tmp_path: Path) -> None:
    ds = enhanced_ct([0.0, 3.0], [1.0, 1.0])
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    error = error_of(stage(tmp_path / "series", [ds]), "missing_geometry")
    assert "frame 2" in str(error)


def test_legacy_multiframe_without_functional_groups_is_missing_geometry() -> None:
    error_of([bundled_file("rtdose.dcm")], "missing_geometry", VolumeOptions(min_slices=1))


# --- pydicom's bundled files: transfer syntaxes ----------------------------------------------------------------------


def reference_hu(name: str) -> np.ndarray:
    """HU of a bundled file by pydicom's pixel_array and apply_rescale-free arithmetic, as (X, Y)."""
    ds = pydicom.dcmread(bundled_file(name))
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    return (ds.pixel_array.astype(np.float64) * slope + intercept).T


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",  # explicit VR little endian
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_bundled_mr_small_encodings_all_decode_to_the_same_image(name: str) -> None:
    volume = load_series_volume([bundled_file(name)], VolumeOptions(min_slices=1))
    assert volume.shape == (1, 64, 64, 1)
    np.testing.assert_array_equal(volume[0, :, :, 0].numpy(), reference_hu("MR_small.dcm"))


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_bundled_ct_files_give_hu_and_their_geometry(name: str) -> None:
    path = bundled_file(name)
    ds = pydicom.dcmread(path)
    volume = load_series_volume([path], VolumeOptions(min_slices=1, space="LPS"))
    np.testing.assert_allclose(volume[0, :, :, 0].numpy(), reference_hu(name), atol=1e-3)
    np.testing.assert_allclose(volume.affine.numpy()[:3, 3], np.array(ds.ImagePositionPatient, dtype=float))
    np.testing.assert_allclose((volume.affine.numpy() @ [7, 9, 0, 1])[:3], voxel_to_lps(ds, column=7, row=9), atol=1e-4)


def gdcm_recode(source: Path, target: Path, transfer_syntax: str) -> Path:
    """Re-encode a file with GDCM (pydicom has no JPEG encoder); ``transfer_syntax`` names a gdcm.TransferSyntax."""
    gdcm = pytest.importorskip("gdcm")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, transfer_syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return target


def test_jpeg_lossless_ct(tmp_path: Path) -> None:
    path = gdcm_recode(bundled_file("CT_small.dcm"), tmp_path / "jpeg_ll.dcm", "JPEGLosslessProcess14_1")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    volume = load_series_volume([path], VolumeOptions(min_slices=1))
    np.testing.assert_array_equal(volume[0, :, :, 0].numpy(), reference_hu("CT_small.dcm"))


def test_jpeg_baseline_8_bit_ct(tmp_path: Path) -> None:
    ds = pydicom.dcmread(bundled_file("CT_small.dcm"))
    stored = (ds.pixel_array >> 4).astype(np.uint8)  # JPEG baseline is 8-bit: keep the top bits, rescale by 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RescaleSlope, ds.PixelData = 16, stored.tobytes()
    ds.save_as(tmp_path / "ct8.dcm")
    path = gdcm_recode(tmp_path / "ct8.dcm", tmp_path / "jpeg_baseline.dcm", "JPEGBaselineProcess1")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    volume = load_series_volume([path], VolumeOptions(min_slices=1))
    expected = (stored.astype(np.float64) * 16 + float(ds.RescaleIntercept)).T
    assert np.abs(volume[0, :, :, 0].numpy() - expected).max() <= 16 * 2  # lossy: within 2 stored levels


def test_a_compressed_multi_file_series(tmp_path: Path) -> None:
    series = axial_series(3)
    for ds in series:
        ds.compress(RLELossless)
    volume = load_series_volume(stage(tmp_path / "series", series))
    assert volume.meta["transfer_syntaxes"] == RLELossless
    assert volume[0, 1, 2, 2].item() == 221 - 1024


def test_bundled_ct_series_with_a_real_gap(tmp_path: Path) -> None:
    """pydicom's dicomdirtests CT2: one slice 200 mm below three contiguous 1.25 mm slices."""
    files = sorted((Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "77654033" / "CT2").iterdir())
    assert len(files) == 4
    directory = tmp_path / "ct2"
    directory.mkdir()
    for path in files:
        shutil.copy(path, directory / f"{path.name}.dcm")
    error = error_of(directory, "gap")
    assert "202.500 mm" in str(error) and "161 slice(s) missing" in str(error)  # 162 steps of 1.25 mm

    contiguous = [path for path in series_files(directory) if path.stem != "17106"]
    volume = load_series_volume(contiguous)
    np.testing.assert_allclose(volume.meta["spacing"][2], 1.25, atol=1e-4)
    assert volume.shape == (1, 16, 16, 3)
