"""Typed, streamed C-FIND queries (Study Root) at STUDY, SERIES and IMAGE level, answered as pipeline records.

Built on :func:`riskbridge.connectors.dicom.find`, which opens the association (TCP_NODELAY set) and turns
failure statuses into :class:`~riskbridge.connectors.dicom.DicomError`. This module only builds identifiers and
converts the answers:

- :func:`find_studies` -> :class:`~riskbridge.records.StudyRef` (patient, study date/time with its UTC offset,
  modalities), matched by patient, accession, StudyInstanceUID, a DICOM date range and a modality;
- :func:`find_series` -> :class:`~riskbridge.records.SeriesRef` with every returned attribute by keyword, so
  series selection (:mod:`riskbridge.harmonize.series`) can judge them;
- :func:`find_instances` -> :class:`InstanceRef` (SOPInstanceUID, InstanceNumber, requested keywords);
- :func:`complete_series` fills the attributes a PACS leaves empty at SERIES level (ConvolutionKernel,
  ImageOrientationPatient, ...) from one IMAGE-level C-FIND of that series.

Answers stream as the PACS sends them. Exhaust the iterators: :func:`~riskbridge.connectors.dicom.find` releases
the association when closed early, and Orthanc 1.10 then keeps sending pending answers into the release (one such
release took the full 30 s timeout here). Nothing identifying is logged: studies and series appear by
:func:`~riskbridge.records.uid_hash` only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timezone
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName

from riskbridge.connectors.dicom import find
from riskbridge.dicomtime import parse_dicom_date, parse_dicom_offset, parse_dicom_time
from riskbridge.records import PacsPatient, SeriesRef, StudyRef, uid_hash
from riskbridge.settings import PacsSettings

LOG = logging.getLogger(__name__)

# Return keys of each level. Orthanc answers all of them; other PACS may leave some empty at SERIES level, which
# is why complete_series exists.
STUDY_RETURN_KEYS: tuple[str, ...] = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "TimezoneOffsetFromUTC",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
)
SERIES_RETURN_KEYS: tuple[str, ...] = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "NumberOfSeriesRelatedInstances",
    "SeriesDate",
    "SeriesTime",
    "ImageType",
    "ConvolutionKernel",
    "SliceThickness",
    "SpacingBetweenSlices",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ContrastBolusAgent",
    "BodyPartExamined",
    "Manufacturer",
    "ManufacturerModelName",
    "ProtocolName",
)
INSTANCE_RETURN_KEYS: tuple[str, ...] = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")

# Elements of the C-FIND protocol itself, not attributes of the matched object.
_PROTOCOL_KEYWORDS = frozenset({"QueryRetrieveLevel", "RetrieveAETitle", "SpecificCharacterSet"})
_INSTANCE_COUNT = "NumberOfSeriesRelatedInstances"


@dataclass(frozen=True)
class InstanceRef:
    """One SOP instance of a series as an IMAGE-level C-FIND describes it."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str | None = None
    instance_number: int | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)


# --- identifiers ---------------------------------------------------------------------------------------------


def dicom_date_range(date_from: date | None, date_to: date | None) -> str:
    """Return a DICOM DA range matching value: ``YYYYMMDD-YYYYMMDD``, ``YYYYMMDD-`` or ``-YYYYMMDD`` (open ends).

    Both ends are inclusive; both None gives ``""`` (universal match). Raises ValueError when ``date_from`` is
    after ``date_to``.
    """
    if date_from is not None and date_to is not None and date_from > date_to:
        raise ValueError(f"study date range: {date_from.isoformat()} is after {date_to.isoformat()}")
    if date_from is None and date_to is None:
        return ""
    start = date_from.strftime("%Y%m%d") if date_from is not None else ""
    end = date_to.strftime("%Y%m%d") if date_to is not None else ""
    return f"{start}-{end}"


def _require_keyword(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword!r} is not a DICOM keyword (pydicom's data dictionary does not know it)")
    return int(tag)


def _add_return_key(identifier: Dataset, keyword: str) -> None:
    """Add ``keyword`` as an empty (universal) return key unless it is already a matching key."""
    tag = _require_keyword(keyword)
    if tag in identifier:
        return
    vr = dictionary_VR(tag).split(" or ")[0]  # "US or SS": either is right for an empty value
    identifier.add(DataElement(tag, vr, [] if vr == "SQ" else None))


def _identifier(matching: Mapping[str, Any], return_keys: Iterable[str]) -> Dataset:
    identifier = Dataset()
    for keyword, value in matching.items():
        if value is not None:
            _require_keyword(keyword)
            setattr(identifier, keyword, value)
    for keyword in return_keys:
        _add_return_key(identifier, keyword)
    return identifier


# --- answers -------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A pydicom value as plain Python: str, int, float or a tuple of them; None for an empty value."""
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        items = tuple(_plain(item) for item in value)
        return items or None
    if isinstance(value, PersonName):
        return str(value) or None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)  # IS is an int subclass
    if isinstance(value, float):
        return float(value)  # DSfloat is a float subclass
    if isinstance(value, bytes):
        return None  # binary values are never judged
    if isinstance(value, str):
        return value.strip() or None
    try:
        return float(value)  # DSdecimal
    except (TypeError, ValueError):
        return str(value).strip() or None


def answer_attributes(answer: Dataset) -> dict[str, Any]:
    """Every attribute of a C-FIND answer by keyword, as plain Python values (None when the PACS left it empty).

    Sequences and private or unknown elements are left out; so are the C-FIND protocol elements
    (QueryRetrieveLevel, RetrieveAETitle, SpecificCharacterSet).
    """
    attributes: dict[str, Any] = {}
    for tag in list(answer.keys()):
        try:
            element = answer[tag]
        except (ValueError, TypeError, KeyError) as exc:
            LOG.debug("skipping undecodable element %s in a C-FIND answer: %s", tag, type(exc).__name__)
            continue
        keyword = element.keyword
        if not keyword or keyword in _PROTOCOL_KEYWORDS or element.VR == "SQ":
            continue
        try:
            value = element.value
        except (ValueError, TypeError):
            value = None  # a malformed number: judged as missing rather than failing the whole query
        attributes[keyword] = _plain(value)
    return attributes


def _text(attributes: Mapping[str, Any], keyword: str) -> str | None:
    value = attributes.get(keyword)
    if value is None:
        return None
    if isinstance(value, tuple):
        return "\\".join(str(item) for item in value)
    return str(value)


def _integer(attributes: Mapping[str, Any], keyword: str) -> int | None:
    value = attributes.get(keyword)
    if isinstance(value, tuple):
        value = value[0] if value else None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def parse_timezone_offset(offset: str | None) -> timezone | None:
    """Parse TimezoneOffsetFromUTC (``-0500``, ``+0130``) into a timezone; None when absent or malformed."""
    try:
        return parse_dicom_offset(offset) if offset and offset.strip() else None
    except ValueError:
        return None


def parse_study_datetime(
    study_date: str | None, study_time: str | None, timezone_offset: str | None = None
) -> datetime | None:
    """Combine StudyDate, StudyTime and TimezoneOffsetFromUTC into a datetime.

    The result is aware when the offset is valid, naive (local wall time) otherwise; a missing StudyTime gives
    midnight of StudyDate. Accepts the DICOM forms ``HHMMSS.FFFFFF``, ``HHMMSS``, ``HHMM``, ``HH`` and the old
    ``HH:MM:SS``. Returns None when StudyDate is missing or any part is malformed.
    """
    day = parse_dicom_date(study_date)
    if day is None:
        return None
    clock = parse_dicom_time(study_time) if (study_time or "").strip() else time()
    if clock is None:
        return None
    moment = datetime.combine(day, clock)
    tz = parse_timezone_offset(timezone_offset)
    return moment.replace(tzinfo=tz) if tz is not None else moment


def _other_patient_ids(answer: Dataset) -> tuple[tuple[str, str | None], ...]:
    sequence = answer.get("OtherPatientIDsSequence")
    if not isinstance(sequence, Sequence):
        return ()
    found: list[tuple[str, str | None]] = []
    for item in sequence:
        patient_id = str(item.get("PatientID", "") or "").strip()
        if patient_id:
            found.append((patient_id, str(item.get("IssuerOfPatientID", "") or "").strip() or None))
    return tuple(found)


def study_from_answer(answer: Dataset) -> StudyRef:
    """Build a :class:`StudyRef` from one STUDY-level C-FIND answer."""
    attributes = answer_attributes(answer)
    offset = _text(attributes, "TimezoneOffsetFromUTC")
    modalities = attributes.get("ModalitiesInStudy")
    if isinstance(modalities, str):
        modalities = (modalities,)
    patient = PacsPatient(
        patient_id=_text(attributes, "PatientID") or "",
        issuer=_text(attributes, "IssuerOfPatientID"),
        other_ids=_other_patient_ids(answer),
        name=_text(attributes, "PatientName") or "",
        birth_date=_text(attributes, "PatientBirthDate"),
        sex=_text(attributes, "PatientSex"),
    )
    return StudyRef(
        study_uid=_text(attributes, "StudyInstanceUID") or "",
        accession=_text(attributes, "AccessionNumber"),
        patient=patient,
        study_datetime=parse_study_datetime(_text(attributes, "StudyDate"), _text(attributes, "StudyTime"), offset),
        timezone_offset=offset,
        modalities=tuple(str(m) for m in modalities or ()),
        description=_text(attributes, "StudyDescription") or "",
        instance_count=_integer(attributes, "NumberOfStudyRelatedInstances"),
    )


def series_from_answer(answer: Dataset, study_uid: str | None = None) -> SeriesRef:
    """Build a :class:`SeriesRef` from one SERIES-level C-FIND answer; ``attributes`` keeps every returned value."""
    attributes = answer_attributes(answer)
    return SeriesRef(
        study_uid=_text(attributes, "StudyInstanceUID") or study_uid or "",
        series_uid=_text(attributes, "SeriesInstanceUID") or "",
        modality=_text(attributes, "Modality") or "",
        series_number=_integer(attributes, "SeriesNumber"),
        description=_text(attributes, "SeriesDescription") or "",
        instance_count=_integer(attributes, _INSTANCE_COUNT),
        attributes=attributes,
        sources={keyword: "series" for keyword, value in attributes.items() if value is not None},
    )


def instance_from_answer(answer: Dataset, study_uid: str, series_uid: str) -> InstanceRef:
    """Build an :class:`InstanceRef` from one IMAGE-level C-FIND answer."""
    attributes = answer_attributes(answer)
    return InstanceRef(
        study_uid=_text(attributes, "StudyInstanceUID") or study_uid,
        series_uid=_text(attributes, "SeriesInstanceUID") or series_uid,
        sop_instance_uid=_text(attributes, "SOPInstanceUID") or "",
        sop_class_uid=_text(attributes, "SOPClassUID"),
        instance_number=_integer(attributes, "InstanceNumber"),
        attributes=attributes,
    )


# --- queries -------------------------------------------------------------------------------------------------


def find_studies(
    pacs: PacsSettings,
    *,
    patient_id: str | None = None,
    issuer: str | None = None,
    study_date: tuple[date | None, date | None] | None = None,
    modality: str | None = "CT",
    accession: str | None = None,
    study_uid: str | None = None,
    timeout_s: float | None = None,
) -> Iterator[StudyRef]:
    """C-FIND at STUDY level, yielding a :class:`StudyRef` per matching study as the PACS streams them.

    Every given argument is a matching key: ``study_date`` is an inclusive ``(from, to)`` range where either end
    may be None (open), ``modality`` matches ModalitiesInStudy (None: any), ``issuer`` IssuerOfPatientID.
    Raises :class:`~riskbridge.connectors.dicom.DicomError` when the PACS refuses or fails the query.
    """
    date_range = dicom_date_range(*study_date) if study_date is not None else None
    identifier = _identifier(
        {
            "PatientID": patient_id,
            "IssuerOfPatientID": issuer,
            "StudyDate": date_range or None,
            "ModalitiesInStudy": modality,
            "AccessionNumber": accession,
            "StudyInstanceUID": study_uid,
        },
        STUDY_RETURN_KEYS,
    )
    other_ids = Dataset()
    other_ids.PatientID = None
    other_ids.IssuerOfPatientID = None
    identifier.OtherPatientIDsSequence = Sequence([other_ids])
    count = 0
    for answer in find(pacs, "STUDY", identifier, timeout_s or pacs.timeout_s):
        count += 1
        yield study_from_answer(answer)
    LOG.debug("C-FIND STUDY (date range %s, modality %s): %d studies", date_range or "any", modality or "any", count)


def find_series(
    pacs: PacsSettings,
    study_uid: str,
    modality: str | None = None,
    *,
    keywords: Iterable[str] = (),
    timeout_s: float | None = None,
) -> Iterator[SeriesRef]:
    """C-FIND at SERIES level within one study, yielding a :class:`SeriesRef` per series.

    Requests :data:`SERIES_RETURN_KEYS` plus ``keywords`` (e.g. what a rule set judges); ``modality`` (e.g.
    ``"CT"``) is a matching key. Attributes the PACS leaves empty are None in ``SeriesRef.attributes``.
    """
    return_keys = dict.fromkeys([*SERIES_RETURN_KEYS, *keywords])
    identifier = _identifier({"StudyInstanceUID": study_uid, "Modality": modality}, return_keys)
    count = 0
    for answer in find(pacs, "SERIES", identifier, timeout_s or pacs.timeout_s):
        count += 1
        yield series_from_answer(answer, study_uid)
    LOG.debug("C-FIND SERIES study %s: %d series", uid_hash(study_uid), count)


def find_instances(
    pacs: PacsSettings,
    study_uid: str,
    series_uid: str,
    *,
    keywords: Iterable[str] = (),
    instance_number: int | None = None,
    timeout_s: float | None = None,
) -> Iterator[InstanceRef]:
    """C-FIND at IMAGE level within one series, yielding an :class:`InstanceRef` per instance (PACS order).

    Requests SOPInstanceUID, SOPClassUID, InstanceNumber plus ``keywords``; ``instance_number`` narrows the
    answer to instances with that InstanceNumber (a required matching key at IMAGE level).
    """
    return_keys = dict.fromkeys([*INSTANCE_RETURN_KEYS, *keywords])
    identifier = _identifier(
        {
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": series_uid,
            "InstanceNumber": str(instance_number) if instance_number is not None else None,
        },
        return_keys,
    )
    count = 0
    for answer in find(pacs, "IMAGE", identifier, timeout_s or pacs.timeout_s):
        count += 1
        yield instance_from_answer(answer, study_uid, series_uid)
    LOG.debug("C-FIND IMAGE series %s: %d instances", uid_hash(series_uid), count)


# --- completion ----------------------------------------------------------------------------------------------


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == ()


def _first_instance(instances: Iterable[InstanceRef]) -> InstanceRef | None:
    """The instance with the lowest InstanceNumber (unnumbered last, then by SOPInstanceUID): stable across PACS."""
    ordered = sorted(
        instances,
        key=lambda i: (i.instance_number is None, i.instance_number or 0, i.sop_instance_uid),
    )
    return ordered[0] if ordered else None


def complete_series(
    pacs: PacsSettings,
    series: SeriesRef,
    keywords: Collection[str],
    *,
    timeout_s: float | None = None,
) -> SeriesRef:
    """Return ``series`` with those ``keywords`` it lacks filled from the first instance of one IMAGE-level C-FIND.

    Many PACS answer ConvolutionKernel, ImageOrientationPatient or SliceThickness only at IMAGE level. Values
    already present are kept. When NumberOfSeriesRelatedInstances is wanted and missing, the one C-FIND lists
    the whole series (the count of its answers fills it); otherwise it matches InstanceNumber 1 only, and lists
    the whole series only when no instance has number 1. Keywords the instance lacks stay missing: rules decide
    what that means. The C-FIND is always read to the end (see the module docstring).
    """
    missing = [keyword for keyword in dict.fromkeys(keywords) if _is_empty(series.attributes.get(keyword))]
    if series.instance_count is not None and _INSTANCE_COUNT in missing:
        missing.remove(_INSTANCE_COUNT)  # the SeriesRef field already holds the count
    if not missing:
        return series
    wanted = [keyword for keyword in missing if keyword != _INSTANCE_COUNT]
    count_needed = _INSTANCE_COUNT in missing
    instances: list[InstanceRef] = []
    if not count_needed:
        instances = list(
            find_instances(
                pacs, series.study_uid, series.series_uid, keywords=wanted, instance_number=1, timeout_s=timeout_s
            )
        )
    if not instances:
        instances = list(
            find_instances(pacs, series.study_uid, series.series_uid, keywords=wanted, timeout_s=timeout_s)
        )
    attributes = dict(series.attributes)
    sources = dict(series.sources)
    first = _first_instance(instances)
    filled = []
    if first is not None:
        for keyword in wanted:
            value = first.attributes.get(keyword)
            if not _is_empty(value):
                attributes[keyword] = value
                sources[keyword] = "image"
                filled.append(keyword)
    instance_count = series.instance_count
    if count_needed:
        instance_count = len(instances)
        attributes[_INSTANCE_COUNT] = instance_count
        sources[_INSTANCE_COUNT] = "image"
        filled.append(_INSTANCE_COUNT)
    LOG.debug(
        "series %s: completed %s from IMAGE level (still missing: %s)",
        uid_hash(series.series_uid),
        ", ".join(filled) or "nothing",
        ", ".join(k for k in missing if k not in filled) or "none",
    )
    return replace(series, attributes=attributes, sources=sources, instance_count=instance_count)


def find_complete_series(
    pacs: PacsSettings,
    study_uid: str,
    needed: Callable[[SeriesRef], Collection[str]],
    *,
    modality: str | None = None,
    keywords: Iterable[str] = (),
    timeout_s: float | None = None,
) -> list[SeriesRef]:
    """List a study's series (SERIES-level C-FIND), then complete each with the attributes ``needed`` names.

    ``needed`` is typically :meth:`riskbridge.harmonize.series.RuleSet.needed_attributes`: it names what a series
    still lacks for a decision, so series already rejected on what the PACS returned cost no extra query. The
    SERIES answer is read to the end before any IMAGE-level C-FIND, so only one association is open at a time.
    """
    listed = list(find_series(pacs, study_uid, modality, keywords=keywords, timeout_s=timeout_s))
    completed = []
    for series in listed:
        wanted = needed(series)
        completed.append(complete_series(pacs, series, wanted, timeout_s=timeout_s) if wanted else series)
    return completed
