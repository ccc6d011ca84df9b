"""The records that flow between pipeline stages, defined once: plain frozen dataclasses, stored in the ledger.

Records may carry identifying values (names, birth dates) because matching needs them; they are never logged.
Log a record by its UIDs, hashed with :func:`riskbridge.records.uid_hash`, or by internal ids.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

# The model's modalities, in the one order every table, tensor and pattern name uses.
MODALITIES = ("image", "labs", "notes")


def uid_hash(uid: str) -> str:
    """Return a short, stable, non-reversible tag for a DICOM UID or identifier, for logs."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


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
