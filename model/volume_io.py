"""Reading a staged CT series: its files, read once, into the HU volume :mod:`riskbridge.harmonize.volume` builds.

The input is a staged series directory (``<staging>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``, see
:mod:`riskbridge.connectors.staging`) or a list of files. This module does the file I/O (listing the staged files,
``pydicom.dcmread``); every decision about the volume (slice order, geometry checks, rescale, the affine, every
:class:`~riskbridge.harmonize.volume.VolumeError` but ``empty`` and ``unreadable``) is
:func:`riskbridge.harmonize.volume.build_volume`'s. Conventions and error codes: docs/volume.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pydicom
from monai.data import MetaTensor
from pydicom.dataset import Dataset

from riskbridge.harmonize.volume import VolumeError, VolumeOptions, build_volume
from riskbridge.records import uid_hash

__all__ = ["load_series_volume", "read_dataset", "series_files"]


def series_files(source: Path | str | Iterable[Path | str]) -> list[Path]:
    """Return the files of a series: a staged series directory's ``*.dcm`` files (sorted by name), or the given list.

    Hidden files are skipped, so the staging area's ``.incoming-*.part`` temporaries never count.
    """
    if isinstance(source, str | os.PathLike):
        directory = Path(source)
        if directory.is_dir():
            return sorted(path for path in directory.glob("*.dcm") if not path.name.startswith("."))
        return [directory]
    return [Path(path) for path in source]


def load_series_volume(
    source: Path | str | Iterable[Path | str],
    options: VolumeOptions | None = None,
    *,
    series_uid: str | None = None,
) -> MetaTensor:
    """Build the HU volume of one series; return a float32 MetaTensor shaped ``(1, X, Y, Z)`` with its affine.

    ``source`` is a staged series directory or the series' files. ``series_uid``, when given, is the series the
    files must belong to (``mixed_series`` otherwise); it also names the series in errors raised before any file
    could be read, where a staged directory's name (the SeriesInstanceUID) stands in for it. Every file is read once.
    Raises :class:`~riskbridge.harmonize.volume.VolumeError` for anything that would make the volume wrong.
    """
    paths = series_files(source)
    staged_dir = Path(source) if isinstance(source, str | os.PathLike) and Path(source).is_dir() else None
    expected_uid = series_uid or (staged_dir.name if staged_dir else None)
    series = uid_hash(expected_uid) if expected_uid else "unknown"
    if not paths:
        raise VolumeError("empty", "no DICOM files", series=series)
    # A generator, not a list: build_volume then holds the only reference to each dataset and drops it as soon as
    # its pixels are decoded (lower peak memory).
    return build_volume(
        (read_dataset(path, series) for path in paths),
        options,
        series_uid=series_uid,
        series=series,
        names=[path.stem for path in paths],
    )


def read_dataset(path: Path, series: str) -> Dataset:
    """Read one file completely (header and pixel bytes: one pass over the file).

    Raises :class:`~riskbridge.harmonize.volume.VolumeError` ``unreadable`` (naming ``series``, a hashed UID, and
    the hashed file stem) for a file that is not DICOM or cannot be parsed.
    """
    try:
        return pydicom.dcmread(path)
    except Exception as error:  # pydicom raises many types for damaged files; all mean "unreadable"
        # The lower library's message may quote file contents, so only its type is kept; `from None` keeps its
        # traceback out of logs too.
        raise VolumeError(
            "unreadable", f"cannot parse ({type(error).__name__})", series=series, instance=uid_hash(path.stem)
        ) from None
