"""Image preprocessing: RAS orientation and spacing checked with a marker voxel at a known patient position, the
output's shape, dtype and range, the per-series cache, and the errors for series that cannot be read.

Volumes are synthetic: a marker in air written as an array (from_volume) or as a DICOM series with pydicom
(from_series), and the synthetic cohort's chest phantom for a realistic volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from riskbridge.dev.synth.cohort import build_cohort
from riskbridge.dev.synth.phantom import render_study
from riskbridge.harmonize.volume import VolumeError
from riskbridge.model.preprocess import PreprocessConfig, Preprocessor

CONFIG = PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0), size=(16, 16, 16), hu_window=(-1000.0, 400.0))
# Input grid: 32 voxels of 2 mm per axis, so the output (16 voxels of 4 mm) covers the same 64 mm box and each
# output voxel centre falls exactly on an input voxel centre: values are exact, not interpolated.
N, STEP = 32, 2.0
ORIGIN_LPS = (-30.0, 10.0, 100.0)
MARKER_RAS_INDEX = (3, 10, 12)  # different on every axis, so a flipped or swapped axis moves it


def marker_volume() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A (z, y, x) HU array of air with one 400 HU voxel, its voxel->LPS affine, and the marker's LPS position.

    The marker sits where the RAS output voxel MARKER_RAS_INDEX has its centre: RAS x = -LPS x, so the RAS grid
    starts at the largest LPS x (likewise y); z is the same in both.
    """
    a, b, c = MARKER_RAS_INDEX
    x0, y0, z0 = ORIGIN_LPS
    extent = (N - 1) * STEP
    lps = (x0 + extent - 4.0 * a, y0 + extent - 4.0 * b, z0 + 4.0 * c)
    hu = np.full((N, N, N), -1000.0, dtype=np.float32)
    i, j, k = (round((lps[axis] - ORIGIN_LPS[axis]) / STEP) for axis in range(3))
    hu[k, j, i] = 400.0
    affine = np.eye(4)
    affine[:3, :3] = [[0, 0, STEP], [0, STEP, 0], [STEP, 0, 0]]  # index (k, j, i) -> (x, y, z)
    affine[:3, 3] = ORIGIN_LPS
    return hu, affine, lps


def write_series(directory: Path, hu_zyx: np.ndarray, *, flipped: bool = False) -> str:
    """Write a (z, y, x) LPS-gridded HU array as an axial CT series; return its SeriesInstanceUID.

    ``flipped`` stores the same anatomy with rows and columns running the other way (orientation -1, -1) and the
    slices numbered from the top, as some scanners do: the preprocessed output must not change.
    """
    uid = generate_uid()
    directory.mkdir(parents=True, exist_ok=True)
    x0, y0, z0 = ORIGIN_LPS
    extent = (N - 1) * STEP
    for k in range(hu_zyx.shape[0]):
        pixels = hu_zyx[k]
        orientation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        position = [x0, y0, z0 + STEP * k]
        if flipped:
            pixels = pixels[::-1, ::-1]
            orientation = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
            position = [x0 + extent, y0 + extent, z0 + STEP * k]
        ds = _ct_slice(uid, position, orientation, pixels, instance_number=hu_zyx.shape[0] - k)
        ds.save_as(directory / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return uid


def _ct_slice(
    series_uid: str, position: Sequence[float], orientation: Sequence[float], hu: np.ndarray, instance_number: int
) -> Dataset:
    """One CT Image Storage instance storing ``hu + 1024`` with intercept -1024."""
    ds = Dataset()
    sop = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", series_uid
    ds.Modality, ds.InstanceNumber = "CT", instance_number
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [STEP, STEP]
    ds.SliceThickness = STEP
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1.0, -1024.0, "HU"
    ds.PixelData = np.ascontiguousarray(np.round(hu + 1024.0).astype(np.int16)).tobytes()
    return ds


def test_marker_at_known_lps_position_lands_on_its_ras_voxel() -> None:
    hu, affine, _ = marker_volume()
    out = Preprocessor(CONFIG).from_volume(hu, affine)
    assert out.shape == (1, 16, 16, 16)
    assert out.dtype == np.float32
    assert [tuple(index) for index in np.argwhere(out[0] > 0.5)] == [MARKER_RAS_INDEX]
    assert out[(0, *MARKER_RAS_INDEX)] == pytest.approx(1.0)  # 400 HU is the window's top
    assert np.count_nonzero(out) == 1  # air is the window's bottom, 0


def test_ras_affine_gives_the_same_output_as_lps() -> None:
    hu, affine, _ = marker_volume()
    ras_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    lps = Preprocessor(CONFIG).from_volume(hu, affine)
    ras = Preprocessor(CONFIG).from_volume(hu, ras_affine, space="RAS")
    np.testing.assert_array_equal(lps, ras)


def test_memory_layout_does_not_change_the_output() -> None:
    # the same voxels stored x-fastest (C order of (z, y, x)) and z-fastest (Fortran order): same output
    hu, affine, _ = marker_volume()
    preprocessor = Preprocessor(CONFIG)
    np.testing.assert_array_equal(
        preprocessor.from_volume(np.asfortranarray(hu), affine), preprocessor.from_volume(hu, affine)
    )


def test_from_volume_leaves_the_input_unchanged() -> None:
    hu, affine, _ = marker_volume()
    before = hu.copy()
    Preprocessor(CONFIG).from_volume(hu, affine)
    np.testing.assert_array_equal(hu, before)


@pytest.mark.parametrize("flipped", [False, True])
def test_series_marker_lands_on_its_ras_voxel_whatever_the_stored_orientation(tmp_path: Path, flipped: bool) -> None:
    hu, affine, _ = marker_volume()
    uid = write_series(tmp_path / "series", hu, flipped=flipped)
    out = Preprocessor(CONFIG).from_series(tmp_path / "series", uid)
    assert [tuple(index) for index in np.argwhere(out[0] > 0.5)] == [MARKER_RAS_INDEX]
    np.testing.assert_allclose(out, Preprocessor(CONFIG).from_volume(hu, affine), atol=1e-6)


def test_spacing_resamples_a_cube_to_the_configured_voxel_size() -> None:
    # a 16 mm cube (8 input voxels of 2 mm) becomes 4 output voxels of 4 mm per axis: 64 bright voxels
    hu = np.full((N, N, N), -1000.0, dtype=np.float32)
    hu[8:16, 10:18, 4:12] = 400.0
    _, affine, _ = marker_volume()
    out = Preprocessor(CONFIG).from_volume(hu, affine)
    bright = np.argwhere(out[0] > 0.99)
    assert len(bright) == 64
    assert (bright.max(axis=0) - bright.min(axis=0) + 1).tolist() == [4, 4, 4]


def test_outside_the_field_of_view_is_air_and_values_are_clipped_to_the_window() -> None:
    # a small volume of dense bone (2000 HU) padded into a larger output: inside 1.0 (clipped), outside 0 (air)
    config = PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0), size=(24, 24, 24), hu_window=(-1000.0, 400.0))
    hu = np.full((N, N, N), 2000.0, dtype=np.float32)
    _, affine, _ = marker_volume()
    out = Preprocessor(config).from_volume(hu, affine)
    assert out.shape == (1, 24, 24, 24)
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[0, 0, 0, 0] == 0.0 and out[0, 12, 12, 12] == 1.0


def test_phantom_volume_is_float32_in_unit_range() -> None:
    patient = build_cohort(seed=7, patients=1).patients[0]
    study = patient.studies[0]
    volumes = render_study(study, patient.nodules)
    g = study.geometry
    affine = np.eye(4)  # (z, y, x) array, slice 0 the most superior
    affine[:3, :3] = [[0, 0, g.pixel_mm], [0, g.pixel_mm, 0], [-g.thin_mm, 0, 0]]
    affine[:3, 3] = [g.origin_xy, g.origin_xy, g.z_of(0)]
    config = PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0), size=(32, 32, 32), hu_window=(-1000.0, 400.0))
    out = Preprocessor(config).from_volume(volumes.thin_soft, affine)
    assert out.shape == (1, 32, 32, 32) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # air around the body and lungs (low), soft tissue and bone (high) are all present
    assert (out < 0.1).mean() > 0.1 and (out > 0.7).mean() > 0.1


def test_cache_hit_returns_the_same_array_without_reading_the_series(tmp_path: Path) -> None:
    hu, _, _ = marker_volume()
    series = tmp_path / "series"
    uid = write_series(series, hu)
    cache = tmp_path / "cache"
    first = Preprocessor(CONFIG, cache_dir=cache).from_series(series, uid)
    cached_files = list(cache.glob("*.npy"))
    assert len(cached_files) == 1 and uid not in cached_files[0].name  # the UID is hashed in the file name
    for path in series.iterdir():  # the series is gone: only the cache can answer
        path.unlink()
    again = Preprocessor(CONFIG, cache_dir=cache).from_series(series, uid)
    np.testing.assert_array_equal(first, again)
    assert again.dtype == np.float32
    # another config is another cache entry: it must read the series, which now fails
    other = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), size=(16, 16, 16), hu_window=(-1000.0, 400.0))
    with pytest.raises(VolumeError) as error:
        Preprocessor(other, cache_dir=cache).from_series(series, uid)
    assert error.value.code == "empty"


def test_damaged_cache_file_is_recomputed(tmp_path: Path) -> None:
    hu, _, _ = marker_volume()
    uid = write_series(tmp_path / "series", hu)
    preprocessor = Preprocessor(CONFIG, cache_dir=tmp_path / "cache")
    first = preprocessor.from_series(tmp_path / "series", uid)
    path = preprocessor.cache_path(uid)
    assert path is not None
    path.write_bytes(b"not an npy file")
    np.testing.assert_array_equal(preprocessor.from_series(tmp_path / "series", uid), first)
    np.testing.assert_array_equal(np.load(path), first)  # rewritten
    assert not list(path.parent.glob(".*.tmp"))  # no temporary left behind


def test_series_uid_is_read_from_the_files_when_not_given(tmp_path: Path) -> None:
    hu, _, _ = marker_volume()
    uid = write_series(tmp_path / "series", hu)
    preprocessor = Preprocessor(CONFIG, cache_dir=tmp_path / "cache")
    preprocessor.from_series(tmp_path / "series")
    path = preprocessor.cache_path(uid)
    assert path is not None and path.exists()


def test_unreadable_series_is_a_clear_error(tmp_path: Path) -> None:
    hu, _, _ = marker_volume()
    series = tmp_path / "series"
    uid = write_series(series, hu)
    victim = sorted(series.glob("*.dcm"))[3]
    victim.write_bytes(b"\0" * 64 + b"garbage")
    with pytest.raises(VolumeError) as error:
        Preprocessor(CONFIG).from_series(series, uid)
    assert error.value.code == "unreadable"
    assert "cannot parse" in str(error.value) and uid not in str(error.value)


def test_unreadable_first_file_without_uid_is_a_clear_error(tmp_path: Path) -> None:
    series = tmp_path / "1.2.3"
    series.mkdir()
    (series / "a.dcm").write_bytes(b"garbage")
    with pytest.raises(VolumeError) as error:
        Preprocessor(CONFIG).from_series(series)
    assert error.value.code == "unreadable"


def test_missing_series_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VolumeError) as error:
        Preprocessor(CONFIG).from_series(tmp_path / "1.2.3.4", "1.2.3.4")
    assert error.value.code == "empty" and "does not exist" in str(error.value)


def test_wrong_series_uid_is_rejected(tmp_path: Path) -> None:
    hu, _, _ = marker_volume()
    write_series(tmp_path / "series", hu)
    with pytest.raises(VolumeError) as error:
        Preprocessor(CONFIG).from_series(tmp_path / "series", "1.2.999")
    assert error.value.code == "mixed_series"


def test_bad_volume_and_affine_are_rejected() -> None:
    preprocessor = Preprocessor(CONFIG)
    with pytest.raises(ValueError, match="3-D volume"):
        preprocessor.from_volume(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(ValueError, match="invertible"):
        preprocessor.from_volume(np.zeros((4, 4, 4)), np.zeros((4, 4)))


def test_config_round_trips_and_validates() -> None:
    assert PreprocessConfig.from_dict(CONFIG.to_dict()) == CONFIG
    assert CONFIG.digest != PreprocessConfig(size=(16, 16, 8)).digest
    with pytest.raises(ValueError, match="hu_window"):
        PreprocessConfig(hu_window=(400.0, -1000.0))
    with pytest.raises(ValueError, match="exactly the keys"):
        PreprocessConfig.from_dict({"size": [1, 1, 1]})


def test_a_label_lands_on_the_voxel_its_image_lands_on() -> None:
    hu, affine, _ = marker_volume()
    occupancy = (hu > 0).astype(np.float32)
    mask = Preprocessor(CONFIG).mask_from_volume(occupancy, affine)
    assert mask.shape == (1, 16, 16, 16) and mask.dtype == np.uint8
    assert [tuple(index) for index in np.argwhere(mask[0])] == [MARKER_RAS_INDEX]
    ras = Preprocessor(CONFIG).mask_from_volume(occupancy, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, space="RAS")
    np.testing.assert_array_equal(mask, ras)


@pytest.mark.parametrize("offset_mm", [0.0, 0.9, 1.9, 2.6])
def test_a_nodule_smaller_than_a_model_voxel_still_marks_one(offset_mm: float) -> None:
    # a 3 mm sphere on a 0.5 mm grid, anywhere between two 4 mm voxel centres: sampled at centres alone it vanishes
    step, n = 0.5, 128
    centre = np.array([30.0 + offset_mm, 30.0 + offset_mm / 2, 30.0 - offset_mm])
    grid = np.indices((n, n, n)).astype(np.float32) * step
    occupancy = (np.sqrt(sum((grid[i] - centre[i]) ** 2 for i in range(3))) <= 1.5).astype(np.float32)
    affine = np.diag([step, step, step, 1.0])
    mask = Preprocessor(CONFIG).mask_from_volume(occupancy, affine, space="RAS")
    assert 1 <= int(mask.sum()) <= 8


def test_a_bad_label_volume_is_rejected() -> None:
    preprocessor = Preprocessor(CONFIG)
    with pytest.raises(ValueError, match="3-D"):
        preprocessor.mask_from_volume(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocessor.mask_from_volume(np.full((4, 4, 4), 2.0), np.eye(4))
    with pytest.raises(ValueError, match="invertible"):
        preprocessor.mask_from_volume(np.zeros((4, 4, 4)), np.zeros((4, 4)))
