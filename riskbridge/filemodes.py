"""Who may read what riskbridge writes: its files are its user's alone (0600, directories 0700).

Run reports, staged series, training tables, monitoring pages, airflow.cfg and the compose secret files can hold
PHI or credentials. Rather than a mode at every ``open``/``mkdir`` (and every library call that writes, such as
``np.save`` or matplotlib's ``savefig``), each entry point riskbridge owns calls :func:`use_private_umask` first:
the ``riskbridge`` command's callback and every Airflow task (``riskbridge.airflow.dagkit.task_settings``). Files
that hold a secret also get their mode explicitly (:func:`write_private_text`, :func:`create_private_file`), so
they stay private when riskbridge is used as a library from a process with a wider umask.

A umask only applies to files and directories created after it is set: a report directory that already exists
keeps its mode (docs/operations.md "Secrets and file modes").
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "PRIVATE_UMASK",
    "create_private_file",
    "use_private_umask",
    "write_private_text",
]

PRIVATE_UMASK = 0o077
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def use_private_umask() -> int:
    """Make every file and directory this process creates from now on private to its user; return the old umask.

    The new umask is the old one with group and other bits added, so a stricter site umask stays as it was.
    """
    previous = os.umask(PRIVATE_UMASK)
    os.umask(previous | PRIVATE_UMASK)
    return previous


def _write_temporary(directory: Path, name: str, text: str) -> str:
    """Write ``text`` to a new 0600 file next to ``name`` in ``directory``, flushed to disk; return its path."""
    # mkstemp creates the file 0600 whatever the umask: the text is never readable by others, not even briefly.
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def write_private_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically, leaving it mode 0600 (whatever mode an earlier file had)."""
    temporary = _write_temporary(path.parent, path.name, text)
    try:
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def create_private_file(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` with mode 0600, only if it does not exist; return False when it does.

    The file appears whole or not at all (a hard link to a finished temporary file), so an interrupted run never
    leaves an empty or half-written secret behind that a later run would keep.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _write_temporary(path.parent, path.name, text)
    try:
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        except OSError as exc:
            # Filesystems without hard links (some network and FUSE mounts): an exclusive create is the next best.
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return _create_exclusive(path, text)
        return True
    finally:
        os.unlink(temporary)


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` (0600) with ``text`` unless it exists; the fallback of :func:`create_private_file`."""
    try:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return False
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    return True
