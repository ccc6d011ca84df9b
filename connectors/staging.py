"""The staging area for retrieved DICOM: ``<root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``.

Every instance is written atomically (a temporary file in the same directory, then ``os.replace``), from the bytes
as received, so a crash never leaves a partial file under a final name, and receiving an instance twice is harmless.
The write is durable: the file is fsynced before its rename (and the series directory once the series is
complete), so a crash (power loss included) never leaves a renamed-but-empty file. Temporary files a crashed
writer left behind never count as staged (only ``*.dcm`` does) and are swept by :func:`sweep_partial` when a
series' retrieval starts.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from riskbridge.errors import DataError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# Matched with fullmatch: "$" would also accept a trailing newline, which then becomes part of a path.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")

# What write_atomic names its temporary files; anything so named is a write in progress or a crashed one's leftover.
_PARTIAL_PREFIX = ".incoming-"
_PARTIAL_SUFFIX = ".part"

# A temporary file untouched this long belongs to no live writer (every writer writes an instance's bytes as they
# arrive, and a transfer that stalls longer than pacs.timeout_s fails), so sweeping it cannot race a write.
PARTIAL_GRACE_S = 300.0


class StagingError(DataError):
    """A UID cannot be used as a path component, or the staging area cannot be written."""


def _checked(uid: str, what: str) -> str:
    if not _UID.fullmatch(uid) or len(uid) > 64:
        raise StagingError(f"{what} {uid!r} is not a valid DICOM UID; refusing to use it as a path")
    return uid


def series_dir(root: Path, study_uid: str, series_uid: str) -> Path:
    """Return the directory of one series in the staging area (not created)."""
    return root / _checked(study_uid, "StudyInstanceUID") / _checked(series_uid, "SeriesInstanceUID")


def instance_path(root: Path, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """Return the staged file of one instance."""
    return series_dir(root, study_uid, series_uid) / f"{_checked(sop_instance_uid, 'SOPInstanceUID')}.dcm"


def write_atomic(path: Path, chunks: Iterable[bytes]) -> int:
    """Write ``chunks`` to ``path`` atomically and durably; return the number of bytes written.

    The bytes go to a temporary file in the same directory, which is fsynced and then renamed into place: without
    the fsync a crash after the rename can leave the final name on an empty or short file (the rename reaches the
    journal before the data), which would count as staged. The directory (the renames) is fsynced once per series
    by the retriever (:func:`fsync_directory`): a rename lost to a crash only leaves an instance missing, which the
    next attempt fetches, and a directory fsync per instance doubled the cost of a write (4 to 8 ms instead of 2.4
    to 4.4 ms per 520 KiB instance on the development VM's ext4).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=_PARTIAL_PREFIX, suffix=_PARTIAL_SUFFIX)
    written = 0
    try:
        with os.fdopen(handle, "wb") as stream:
            for chunk in chunks:
                stream.write(chunk)
                written += len(chunk)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return written


def fsync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename into it) durable; a no-op where the OS cannot open a directory
    (Windows, which has no ``O_DIRECTORY``) or the filesystem cannot fsync one."""
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:
        return
    handle = os.open(directory, os.O_RDONLY | flags)
    try:
        os.fsync(handle)
    except OSError as exc:
        # Some filesystems (certain network and FUSE ones) refuse fsync on a directory; the file itself is synced.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(handle)


def sweep_partial(directory: Path, older_than_s: float = PARTIAL_GRACE_S) -> int:
    """Remove the temporary files a crashed write left in a series directory; return how many were removed.

    Only files named as :func:`write_atomic` names them (``.incoming-*``, ``*.part``) and untouched for
    ``older_than_s`` seconds are removed: a younger one may be a write in progress of another process (header
    sampling of an overlapping run). Such files never count as staged either way; sweeping keeps them from piling up.
    """
    if not directory.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    for entry in directory.iterdir():
        if not (entry.name.startswith(_PARTIAL_PREFIX) or entry.name.endswith(_PARTIAL_SUFFIX)):
            continue
        try:
            if not entry.is_file() or entry.stat().st_mtime > cutoff:
                continue
            entry.unlink()
        except FileNotFoundError:  # renamed into place or removed by its writer meanwhile
            continue
        removed += 1
    return removed


def free_bytes(root: Path) -> int:
    """Return the bytes free to this user on the filesystem that holds the staging area ``root`` (which need not
    exist yet: its nearest existing parent is asked)."""
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def staged_instances(root: Path, study_uid: str, series_uid: str) -> set[str]:
    """Return the SOPInstanceUIDs staged for a series (complete files only)."""
    directory = series_dir(root, study_uid, series_uid)
    if not directory.is_dir():
        return set()
    return {path.stem for path in directory.glob("*.dcm")}


def remove_instances(root: Path, study_uid: str, series_uid: str, sop_instance_uids: Iterable[str]) -> int:
    """Remove these staged instances of a series (those the PACS does not list for it); return how many were there.

    The directory is fsynced afterwards, so a removed instance cannot come back after a power loss and be counted
    as staged.
    """
    directory = series_dir(root, study_uid, series_uid)
    removed = 0
    for sop_instance_uid in sop_instance_uids:
        try:
            instance_path(root, study_uid, series_uid, sop_instance_uid).unlink()
        except FileNotFoundError:
            continue
        removed += 1
    if removed:
        fsync_directory(directory)
    return removed


def first_header(directory: Path) -> Dataset:
    """The header (no pixel data) of the first staged instance of a series directory, by file name; StagingError
    when the directory holds none."""
    import pydicom

    first = min(directory.glob("*.dcm"), default=None)
    if first is None:
        raise StagingError(f"no staged instance in {directory.name}")
    return pydicom.dcmread(first, stop_before_pixels=True)
