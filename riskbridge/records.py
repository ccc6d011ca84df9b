"""The records that flow between pipeline stages, defined once: plain frozen dataclasses, stored in the ledger.

Records may carry identifying values (names, birth dates) because matching needs them; they are never logged.
Log a record by its UIDs, hashed with :func:`riskbridge.records.uid_hash`, or by internal ids. The hash is keyed
with the site's pseudonym key (:func:`configure_pseudonyms`): a tag names the same UID or MRN in every process
of the site, and nobody without the key can find which MRN a tag stands for by hashing candidate MRNs.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import itertools
import os
import secrets
import stat
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from riskbridge.errors import ConfigurationError

if TYPE_CHECKING:
    from riskbridge.settings import Settings

# The model's modalities, in the one order every table, tensor and pattern name uses.
MODALITIES = ("image", "labs", "notes")


# The pseudonym key itself (text, at least 16 characters): wins over any key file, in this process and its children.
PSEUDONYM_KEY_ENV = "RISKBRIDGE_PSEUDONYM_KEY"
# The key file's absolute path, exported by configure_pseudonyms: a spawned child process (retrieval workers) never
# sees the parent's settings, only its environment, and must key its tags the same.
PSEUDONYM_KEY_FILE_ENV = "RISKBRIDGE_PSEUDONYM_KEY_FILE"
DEFAULT_PSEUDONYM_KEY_FILE = Path(".riskbridge/pseudonym.key")  # the default of [run] pseudonym_key_file
_NEW_KEY_BYTES = 32
_MIN_KEY_BYTES = 16

_pseudonym_lock = threading.Lock()
_pseudonym_mac: hmac.HMAC | None = None  # keyed once per process; each tag starts from a copy


def _new_lock_in_child() -> None:
    global _pseudonym_lock
    _pseudonym_lock = threading.Lock()  # a fork while another thread held the lock would leave it held for good


os.register_at_fork(after_in_child=_new_lock_in_child)


def uid_hash(uid: str) -> str:
    """Return a short, stable pseudonym of a DICOM UID or identifier (an MRN, an accession number), for logs: the
    first 12 hex digits of its HMAC-SHA256 under the site's pseudonym key (:func:`configure_pseudonyms`; without
    it, ``RISKBRIDGE_PSEUDONYM_KEY`` or the default key file). :class:`ConfigurationError` when no key can be read."""
    return keyed_digest(uid, 12)


def keyed_digest(text: str, length: int = 16) -> str:
    """Return the first ``length`` hex digits of the HMAC-SHA256 of ``text`` under the site's pseudonym key: what a
    run key holds of the accession numbers or PatientIDs it was started for (an unkeyed hash of an MRN list can be
    reversed by trying every MRN)."""
    keyed = _pseudonym_mac if _pseudonym_mac is not None else _keyed_mac(None)
    mac = keyed.copy()
    mac.update(text.encode())
    return mac.hexdigest()[:length]


def configure_pseudonyms(settings: Settings) -> None:
    """Key :func:`uid_hash` for this process and the processes it starts: with ``RISKBRIDGE_PSEUDONYM_KEY`` when it
    is set, else with the key file ``[run] pseudonym_key_file``, which is made (32 random bytes, mode 0600) when
    missing. The key is read now, so a key that cannot be read stops the caller here rather than in a log line; the
    file's absolute path is exported as ``RISKBRIDGE_PSEUDONYM_KEY_FILE`` for spawned child processes.
    :class:`ConfigurationError` when the key is unreadable, too short or readable by every user."""
    _keyed_mac(Path(settings.run.pseudonym_key_file).expanduser().absolute())


def _keyed_mac(path: Path | None) -> hmac.HMAC:
    """The keyed HMAC every tag is copied from, (re)keyed from ``path`` (None: the environment's key file or the
    default), unless the environment holds the key itself; the key file used is exported to the environment, so
    child processes read the same one whatever their working directory."""
    global _pseudonym_mac
    with _pseudonym_lock:
        if path is None and _pseudonym_mac is not None:
            return _pseudonym_mac  # another thread keyed it while this one waited
        from_env = os.environ.get(PSEUDONYM_KEY_ENV)
        if from_env:
            if len(from_env) < _MIN_KEY_BYTES:
                raise ConfigurationError(f"{PSEUDONYM_KEY_ENV} needs at least {_MIN_KEY_BYTES} characters")
            key = from_env.encode()
        else:
            if path is None:
                path = Path(os.environ.get(PSEUDONYM_KEY_FILE_ENV) or DEFAULT_PSEUDONYM_KEY_FILE).absolute()
            key = _read_or_create_key(path)
            os.environ[PSEUDONYM_KEY_FILE_ENV] = str(path)
        _pseudonym_mac = hmac.new(key, digestmod=hashlib.sha256)
        return _pseudonym_mac


def _read_or_create_key(path: Path) -> bytes:
    """The key in ``path``, made first when the file is missing; ConfigurationError when it cannot be used."""
    try:
        try:
            with path.open("rb") as handle:
                mode, key = os.fstat(handle.fileno()).st_mode, handle.read()
        except FileNotFoundError:
            return _create_key(path)
    except OSError as exc:
        raise ConfigurationError(f"pseudonym key file {path}: {exc.strerror or exc}") from None
    if mode & stat.S_IRWXO:
        raise ConfigurationError(f"pseudonym key file {path} is open to every user: chmod 600 it")
    if len(key) < _MIN_KEY_BYTES:
        raise ConfigurationError(
            f"pseudonym key file {path} holds {len(key)} bytes, fewer than {_MIN_KEY_BYTES}: write a longer key "
            "(every earlier tag changes with it)"
        )
    return key


def _create_key(path: Path) -> bytes:
    """Make the key file with fresh random bytes; when another process made it first, its key is the key."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(_NEW_KEY_BYTES)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            # A link appears complete or not at all, and never replaces a key another process linked first: every
            # process that races here ends up reading the one file that won.
            os.link(temporary, path)
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            _create_exclusive(path, key)  # a filesystem without hard links (some network and FUSE mounts)
    finally:
        os.unlink(temporary)
    return _read_or_create_key(path)


def _create_exclusive(path: Path, key: bytes) -> None:
    """Write ``key`` to ``path`` (mode 0600) unless the file exists."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
        handle.flush()
        os.fsync(handle.fileno())


def pattern_name(present: Sequence[bool]) -> str:
    """The missingness pattern of ``present`` (one flag per :data:`MODALITIES`): ``"image+labs"``, ``"none"``."""
    if len(present) != len(MODALITIES):
        raise ValueError(f"a pattern has one flag per modality ({', '.join(MODALITIES)}), got {len(present)}")
    return "+".join(m for m, here in zip(MODALITIES, present, strict=True) if here) or "none"


def all_patterns() -> list[str]:
    """Every non-empty pattern, most complete first (image+labs+notes, image+labs, ..., notes)."""
    flags = [tuple(bool(bit) for bit in row) for row in itertools.product((True, False), repeat=len(MODALITIES))]
    return [pattern_name(row) for row in flags if any(row)]


@dataclass(frozen=True)
class PacsPatient:
    """The patient as the PACS knows it (from a STUDY-level C-FIND)."""

    patient_id: str
    issuer: str | None = None
    other_ids: tuple[tuple[str, str | None], ...] = ()  # (id, issuer) from OtherPatientIDsSequence
    name: str = ""  # DICOM PN, FAMILY^GIVEN
    birth_date: str | None = None  # YYYYMMDD
    sex: str | None = None


@dataclass(frozen=True)
class StudyRef:
    """A candidate study found in the PACS."""

    study_uid: str
    accession: str | None
    patient: PacsPatient
    study_datetime: datetime | None  # local wall time from StudyDate/StudyTime; aware when the offset is known
    timezone_offset: str | None  # TimezoneOffsetFromUTC, e.g. "-0500"
    modalities: tuple[str, ...] = ()
    description: str = ""
    instance_count: int | None = None


@dataclass(frozen=True)
class SeriesRef:
    """A series of a study as the PACS describes it; ``attributes`` holds every returned attribute by keyword, and
    ``sources`` where each non-empty one came from: :data:`ATTRIBUTE_SOURCES` (SERIES-level C-FIND, IMAGE-level
    C-FIND, or the header of a sampled instance)."""

    study_uid: str
    series_uid: str
    modality: str
    series_number: int | None = None
    description: str = ""
    instance_count: int | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)


# Where a series attribute came from: the SERIES-level C-FIND, an IMAGE-level C-FIND, a sampled instance's header.
ATTRIBUTE_SOURCES = ("series", "image", "header")


@dataclass(frozen=True)
class SeriesDecision:
    """Why a series was chosen or rejected: the rule behind it and the attribute values judged."""

    study_uid: str
    series_uid: str
    chosen: bool
    rule: str  # the rule that rejected it, or the rule set that accepted it
    reason: str
    rank: int | None = None  # 1 for the chosen series, 2.. for accepted runners-up, None when rejected
    judged: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RetrievedSeries:
    """A series staged on disk, with the evidence that it is complete."""

    study_uid: str
    series_uid: str
    path: Path
    expected: int
    received: int
    transport: str  # "c-move", "c-get" or "dicomweb"
    seconds: float
    bytes: int = 0
    attempts: int = 1
    missing: tuple[str, ...] = ()  # SOPInstanceUIDs still missing (empty when complete)
    unlisted: int = 0  # staged instances the PACS does not list for the series, removed before counting

    @property
    def complete(self) -> bool:
        """True when every expected instance is staged."""
        return not self.missing and self.received >= self.expected


@dataclass(frozen=True)
class WriteBack:
    """A RiskAssessment in the write-back outbox: its identifier value, the server's id once known, and its state."""

    key: str  # riskbridge.stages.write_back.assessment_key(model version, patient, study)
    study_uid: str
    status: str  # pending, created, exists or failed
    attempts: int = 0
    fhir_id: str | None = None
