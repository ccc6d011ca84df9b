"""Benchmark: series to volume. riskbridge's builder against SimpleITK, a plain pydicom stack and MONAI's reader.

A synthetic 200-slice 512x512 CT series (int16 with a -1024 intercept, a realistic header, shuffled InstanceNumbers)
is written with pydicom into a temporary directory, uncompressed and optionally RLE / JPEG 2000 lossless. Every
reader loads the same directory in the same run, with a warm page cache (one untimed read first), best of N.
The volumes are checked to agree (HU values and RAS affine) before any figure is reported; the table goes to
docs/benchmarks.md (section "volume").

Run: ``python bench/volume.py [--slices 200] [--size 512] [--repeat 7] [--compressed-repeat 3] [--compressed rle,j2k]
[--no-write]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_section

from riskbridge.model.volume_io import load_series_volume


class Loaded(NamedTuple):
    """What a reader returns: (Z, Y, X) HU values, the RAS affine of (i, j, k), and the object owning the values."""

    values: np.ndarray
    affine: np.ndarray
    owner: Any = None  # SimpleITK's array view dangles (and segfaults) once its Image is collected


COMPRESSIONS = {"rle": RLELossless, "j2k": JPEG2000Lossless}
PIXEL_SPACING = 0.78125
SLICE_SPACING = 1.25
ORIGIN = (-200.0, -180.0, -310.0)


def phantom_slice(rng: np.random.Generator, size: int, index: int, slices: int) -> np.ndarray:
    """Return one slice of an abdomen-like phantom in HU: air, a body ellipse with noise, two lungs, a spine."""
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    z = index / max(slices - 1, 1) - 0.5
    hu = np.full((size, size), -1000.0)
    body = (x / 0.42) ** 2 + (y / 0.32) ** 2 < 1
    hu[body] = 40.0
    lungs = ((np.abs(x) - 0.18) / 0.12) ** 2 + (y / (0.2 - 0.1 * abs(z))) ** 2 < 1
    hu[lungs & body] = -850.0
    hu[(x / 0.05) ** 2 + ((y - 0.22) / 0.05) ** 2 < 1] = 700.0
    hu[body] += rng.normal(0.0, 15.0, size=int(body.sum()))
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def write_series(root: Path, slices: int, size: int, seed: int = 7) -> Path:
    """Write the uncompressed series into ``root`` as staged files named by SOPInstanceUID; return ``root``."""
    rng = np.random.default_rng(seed)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    numbers = rng.permutation(slices) + 1  # InstanceNumber deliberately unrelated to position
    root.mkdir(parents=True, exist_ok=True)
    for index in range(slices):
        ds = Dataset()
        sop = generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        # A header of roughly the size a scanner writes, so parsing costs what it costs in production.
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240102"
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "101500"
        ds.AccessionNumber, ds.Modality, ds.Manufacturer = "BENCH0001", "CT", "Synthetic"
        ds.InstitutionName, ds.ReferringPhysicianName, ds.StationName = "Bench Hospital", "Doe^Ref", "CT01"
        ds.StudyDescription, ds.SeriesDescription = "CT ABDOMEN", "Abdomen 1.25 mm"
        ds.ManufacturerModelName, ds.SoftwareVersions = "Phantom 1", "1.0"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Patient", "B0001", "19600101", "O"
        ds.PatientAge, ds.PatientWeight = "064Y", 70
        ds.BodyPartExamined, ds.ScanOptions = "ABDOMEN", "HELICAL MODE"
        ds.SliceThickness, ds.KVP, ds.DataCollectionDiameter = SLICE_SPACING, 120, 500
        ds.ReconstructionDiameter, ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = 400, 1085.6, 595
        ds.GantryDetectorTilt, ds.TableHeight, ds.RotationDirection = 0, 160, "CW"
        ds.ExposureTime, ds.XRayTubeCurrent, ds.Exposure = 500, 250, 125
        ds.FilterType, ds.GeneratorPower, ds.FocalSpots = "BODY FILTER", 30, 1.2
        ds.ConvolutionKernel, ds.PatientPosition = "STANDARD", "FFS"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber = "1", 3, 1
        ds.InstanceNumber = int(numbers[index])
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + SLICE_SPACING * index]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.SliceLocation = ORIGIN[2] + SLICE_SPACING * index
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [PIXEL_SPACING, PIXEL_SPACING]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        reference = Dataset()
        reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = CTImageStorage, generate_uid()
        ds.ReferencedImageSequence = Sequence([reference])
        ds.PixelData = (phantom_slice(rng, size, index, slices) + 1024).astype(np.int16).tobytes()
        ds.save_as(root / f"{sop}.dcm", enforce_file_format=True)
    return root


def compress_series(source: Path, target: Path, transfer_syntax: str) -> Path:
    """Write a compressed copy of every file of ``source`` into ``target`` with pydicom's encoders."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.compress(transfer_syntax)
        ds.save_as(target / path.name, enforce_file_format=True)
    return target


def read_riskbridge(directory: Path) -> Loaded:
    """riskbridge's builder; returns (Z, Y, X) HU and the RAS affine of (i, j, k)."""
    volume = load_series_volume(directory)
    return Loaded(volume[0].numpy().transpose(2, 1, 0), volume.affine.numpy())


def read_simpleitk(directory: Path) -> Loaded:
    """SimpleITK's ImageSeriesReader (GDCM), file order from GDCM's own position sort; default pixel type."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory)))
    image = reader.Execute()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK is LPS
    return Loaded(sitk.GetArrayViewFromImage(image), ras, owner=image)


def read_pydicom_stack(directory: Path) -> Loaded:
    """The plain way: dcmread every file, sort by position along the normal, stack pixel_array, rescale."""
    datasets = [pydicom.dcmread(path) for path in directory.glob("*.dcm")]
    orientation = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    datasets.sort(key=lambda ds: float(normal @ np.array(ds.ImagePositionPatient, dtype=float)))
    stack = np.stack([ds.pixel_array for ds in datasets]).astype(np.float32)
    for plane, ds in zip(stack, datasets, strict=True):
        plane *= np.float32(ds.RescaleSlope)
        plane += np.float32(ds.RescaleIntercept)
    first, last = (np.array(ds.ImagePositionPatient, dtype=float) for ds in (datasets[0], datasets[-1]))
    rows, columns = (float(value) for value in datasets[0].PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = orientation[:3] * columns, orientation[3:] * rows
    affine[:3, 2], affine[:3, 3] = (last - first) / (len(datasets) - 1), first
    return Loaded(stack, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine)


def read_monai(directory: Path) -> Loaded:
    """MONAI's LoadImage with PydicomReader (channel added by EnsureChannelFirst is not needed here)."""
    from monai.transforms import LoadImage

    image = LoadImage(reader="PydicomReader", image_only=True)(str(directory))
    return Loaded(np.asarray(image).transpose(2, 1, 0), np.asarray(image.affine))


READERS: dict[str, Callable[[Path], Loaded]] = {
    "riskbridge load_series_volume": read_riskbridge,
    "SimpleITK ImageSeriesReader": read_simpleitk,
    "pydicom stack (dcmread + pixel_array)": read_pydicom_stack,
    "MONAI LoadImage(PydicomReader)": read_monai,
}


def best_times(directory: Path, repeat: int) -> dict[str, float]:
    """Return each reader's fastest of ``repeat`` timed reads; rounds interleave the readers, so a burst of load
    from elsewhere on the machine hits all of them alike. The agreement check before is the untimed warm-up."""
    best = dict.fromkeys(READERS, float("inf"))
    for _ in range(repeat):
        for name, reader in READERS.items():
            start = time.perf_counter()
            reader(directory)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def agreement(directory: Path) -> dict[str, tuple[float, float]]:
    """Compare every reader's HU array and RAS affine with riskbridge's: (max HU difference, max affine difference)."""
    reference, reference_affine, _ = read_riskbridge(directory)
    differences = {}
    for name, reader in READERS.items():
        loaded = reader(directory)
        values = np.asarray(loaded.values, dtype=np.float32)
        if values.shape != reference.shape:
            differences[name] = (float("inf"), float("inf"))
            continue
        differences[name] = (
            float(np.abs(values - reference).max()),
            float(np.abs(loaded.affine - reference_affine).max()),
        )
    return differences


def run(slices: int, size: int, repeat: int, compressed_repeat: int, compressions: list[str]) -> str:
    """Run every reader on every encoding of the series; return the markdown body of the report section."""
    rows: list[list[str]] = []
    notes: list[str] = []
    disagreeing: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="riskbridge-bench-volume-") as temporary:
        native = write_series(Path(temporary) / "native", slices, size)
        cases = [("uncompressed", native, repeat)]
        for name in compressions:
            compressed = compress_series(native, Path(temporary) / name, COMPRESSIONS[name])
            cases.append((name, compressed, compressed_repeat))
        for label, directory, times in cases:
            megabytes = sum(path.stat().st_size for path in directory.glob("*.dcm")) / 1e6
            differences = agreement(directory)
            timings = best_times(directory, times)
            reference = timings["SimpleITK ImageSeriesReader"]
            for name, seconds in timings.items():
                hu, affine = differences[name]
                if hu or affine > 1e-6:
                    disagreeing.add(name)
                rows.append(
                    [
                        label,
                        name,
                        f"{seconds:.3f}",
                        f"{1000 * seconds / slices:.2f}",
                        f"{seconds / reference:.2f}x",
                        f"{hu:g} HU, {affine:.2g} mm",
                    ]
                )
            notes.append(f"{label} {megabytes:.0f} MB on disk, best of {times}")
            print(f"{label}: done", flush=True)
    header = ["encoding", "reader", "seconds", "ms/slice", "vs SimpleITK", "max difference to riskbridge"]
    text = (
        f"{slices} slices of {size}x{size} int16 CT (RescaleIntercept -1024, realistic header, shuffled "
        "InstanceNumber), written with pydicom into a temporary directory; warm page cache; timed rounds interleave "
        "the readers. The difference column compares each reader's HU array and RAS affine with riskbridge's, in "
        "the same run. SimpleITK is timed with its default output pixel type (int16 here); riskbridge, the pydicom "
        "stack and MONAI produce float32.\n\n"
        f"{markdown_table(header, rows)}\n\n" + "; ".join(notes) + "."
    )
    if "MONAI LoadImage(PydicomReader)" in disagreeing:
        text += (
            "\n\nMONAI 1.6.1's PydicomReader stacks the files of a series by InstanceNumber and builds its affine "
            "from the first and last file in that order, so with InstanceNumbers that do not follow position its "
            "slices come out shuffled and its affine is wrong; riskbridge sorts along the slice normal."
        )
    return text + "\n\nRun `python bench/volume.py` to refresh."


def main() -> None:
    """Parse the arguments, run the benchmark, print the table and write docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds per reader, uncompressed")
    parser.add_argument("--compressed-repeat", type=int, default=3, help="timed rounds per reader, compressed")
    parser.add_argument("--compressed", default="rle,j2k", help="comma-separated subset of rle,j2k; empty for none")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md as it is")
    arguments = parser.parse_args()
    compressions = [name for name in arguments.compressed.split(",") if name]
    unknown = set(compressions) - set(COMPRESSIONS)
    if unknown:
        parser.error(f"unknown compression(s): {', '.join(sorted(unknown))}")
    body = run(arguments.slices, arguments.size, arguments.repeat, arguments.compressed_repeat, compressions)
    print(body)
    if not arguments.no_write:
        print(f"written to {write_section('volume', 'Series to volume', body)}")


if __name__ == "__main__":
    main()
