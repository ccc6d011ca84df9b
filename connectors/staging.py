"""The staging area for retrieved DICOM: ``<root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``.

Every instance is written atomically (a temporary file in the same directory, then ``os.replace``), from the bytes
as received, so a crash never leaves a partial file under a final name, and receiving an instance twice is harmless.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from riskbridge.errors import DataError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class StagingError(DataError):
    """A UID cannot be used as a path component, or the staging area cannot be written."""


def _checked(uid: str, what: str) -> str:
    if not _UID.match(uid) or len(uid) > 64:
        raise StagingError(f"{what} {uid!r} is not a valid DICOM UID; refusing to use it as a path")
    return uid


def series_dir(root: Path, study_uid: str, series_uid: str) -> Path:
    """Return the directory of one series in the staging area (not created)."""
    return root / _checked(study_uid, "StudyInstanceUID") / _checked(series_uid, "SeriesInstanceUID")


def instance_path(root: Path, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """Return the staged file of one instance."""
    return series_dir(root, study_uid, series_uid) / f"{_checked(sop_instance_uid, 'SOPInstanceUID')}.dcm"


def write_atomic(path: Path, chunks: Iterable[bytes]) -> int:
    """Write ``chunks`` to ``path`` atomically; return the number of bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".incoming-", suffix=".part")
    written = 0
    try:
        with os.fdopen(handle, "wb") as stream:
            for chunk in chunks:
                stream.write(chunk)
                written += len(chunk)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return written


def staged_instances(root: Path, study_uid: str, series_uid: str) -> set[str]:
    """Return the SOPInstanceUIDs staged for a series (complete files only)."""
    directory = series_dir(root, study_uid, series_uid)
    if not directory.is_dir():
        return set()
    return {path.stem for path in directory.glob("*.dcm")}


def first_header(directory: Path) -> Dataset:
    """The header (no pixel data) of the first staged instance of a series directory, by file name; StagingError
    when the directory holds none."""
    import pydicom

    first = min(directory.glob("*.dcm"), default=None)
    if first is None:
        raise StagingError(f"no staged instance in {directory.name}")
    return pydicom.dcmread(first, stop_before_pixels=True)
