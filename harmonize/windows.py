"""Time windows: which lab values belong to the clinical moment of a CT scan, and why the others do not.

The **index time** is the CT acquisition time with its UTC offset (:func:`index_time`): AcquisitionDateTime,
else AcquisitionDate + AcquisitionTime, else StudyDate + StudyTime; the offset comes from the DateTime's own
suffix, else TimezoneOffsetFromUTC, else the site's configured zone (zoneinfo). Each feature has a
:class:`FeatureWindow`: how far before (and after) the index time values count, and a :class:`Policy` that turns
the values in the window into one (``latest-before``, ``nearest`` or ``mean``).

Interface with unit normalization (harmonize/units.py, kept independent of this module): the caller normalizes
every Observation of a feature first and passes :class:`Measurement` pairs of (Observation dict, canonical value
or None, the units module's reason when None). :func:`select_value` then gives every Observation exactly one
:class:`Disposition`: ``used``, or a stable :class:`WindowReason` code. Checks run in the order duplicate,
status, time, window, value, so an entered-in-error result is reported as such even when its unit was unknown.

Observation times come from effectiveDateTime, effectiveInstant or effectivePeriod (its end, else its start),
else ``issued``. A FHIR dateTime may be partial (YYYY, YYYY-MM, YYYY-MM-DD): by default such a value is excluded
as ``time_imprecise``; with :attr:`PartialTimes.CONTAINED` it counts only when the whole year, month or day
(in the site zone) lies inside the window. docs/windows.md states every rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from enum import StrEnum
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from riskbridge.dicomtime import (
    fraction_microseconds,
    parse_dicom_date,
    parse_dicom_datetime,
    parse_dicom_offset,
    parse_dicom_time,
)
from riskbridge.errors import DataError
from riskbridge.records import StudyRef

ObservationResource = Mapping[str, Any]


class IndexTimeError(DataError, ValueError):
    """No usable index time: the DICOM attributes hold no acquisition or study date with a time."""


class Policy(StrEnum):
    """How the values inside a feature's window become one value."""

    LATEST_BEFORE = "latest-before"  # the latest value at or before the index time
    NEAREST = "nearest"  # the value closest in time to the index time, on either side within the window
    MEAN = "mean"  # the mean of every value in the window


class PartialTimes(StrEnum):
    """What happens to an Observation whose time is only a year, a month or a day."""

    EXCLUDE = "exclude"  # excluded as time_imprecise
    CONTAINED = "contained"  # used when the whole interval lies in the window; ordered by its midpoint


class WindowReason(StrEnum):
    """The disposition codes of :func:`select_value` (stable; recorded in the ledger)."""

    USED = "used"
    SUPERSEDED = "superseded"  # usable and in the window, but the policy chose another value
    STATUS_OUTRANKED = "status_outranked"  # preliminary while a final/amended/corrected value is in the window
    DUPLICATE = "duplicate"  # the same Observation id was passed twice
    ENTERED_IN_ERROR = "entered_in_error"
    CANCELLED = "cancelled"
    NOT_RESULTED = "not_resulted"  # status registered: ordered, no result yet
    STATUS_UNKNOWN = "status_unknown"  # status missing, "unknown" or not an Observation status
    PRELIMINARY_NOT_ACCEPTED = "preliminary_not_accepted"
    NO_TIME = "no_time"  # no effective[x] and no issued
    TIME_UNPARSEABLE = "time_unparseable"
    TIME_IMPRECISE = "time_imprecise"  # partial date (policy EXCLUDE) or an interval not inside the window
    BEFORE_WINDOW = "before_window"
    AFTER_WINDOW = "after_window"  # after the window's end (the index time itself for latest-before)
    VALUE_UNUSABLE = "value_unusable"  # no canonical value (the units module's reason is the detail)


PREFERRED_STATUSES = ("final", "amended", "corrected")
_STATUS_EXCLUSIONS = {
    "entered-in-error": WindowReason.ENTERED_IN_ERROR,
    "cancelled": WindowReason.CANCELLED,
    "registered": WindowReason.NOT_RESULTED,
}


# --- zones and DICOM times ------------------------------------------------------------------------------------


def site_zone(zone: str | tzinfo) -> tzinfo:
    """A tzinfo from an IANA zone name ("America/New_York") or a tzinfo (returned as is)."""
    return ZoneInfo(zone) if isinstance(zone, str) else zone


def _localize(naive: datetime, zone: tzinfo) -> datetime:
    # An ambiguous wall time (the repeated hour when clocks go back) takes its first occurrence (fold=0).
    return naive.replace(tzinfo=zone)


class AttributeSource(Protocol):
    """Anything with ``get(keyword, default)`` over DICOM keywords: a dict of C-FIND values or a pydicom Dataset."""

    def get(self, key: str, default: Any = None, /) -> Any:
        """The value of a DICOM keyword, or ``default``."""
        ...


@dataclass(frozen=True)
class IndexTime:
    """The index time of a study: an aware datetime, where it came from and where its offset came from.

    ``source``: "AcquisitionDateTime", "AcquisitionDate+AcquisitionTime" or "StudyDate+StudyTime".
    ``offset_source``: "AcquisitionDateTime" (its own suffix), "TimezoneOffsetFromUTC" or "site_zone".
    """

    moment: datetime
    source: str
    offset_source: str


def index_time(attributes: AttributeSource, zone: str | tzinfo) -> IndexTime:
    """The index time from DICOM attributes of the chosen series (one instance's header or a C-FIND answer).

    Order: AcquisitionDateTime (with at least the hour), AcquisitionDate + AcquisitionTime, StudyDate + StudyTime.
    The offset is the DateTime's own suffix, else TimezoneOffsetFromUTC, else ``zone`` (the site's zone, applied
    to the wall time, so daylight saving time is right). Raises :class:`IndexTimeError` when no source has a date
    and a time, or when TimezoneOffsetFromUTC is malformed.
    """
    offset_text = str(attributes.get("TimezoneOffsetFromUTC") or "").strip()
    try:
        dataset_offset = parse_dicom_offset(offset_text) if offset_text else None
    except ValueError as error:
        raise IndexTimeError(f"TimezoneOffsetFromUTC: {error}") from None
    candidates: list[tuple[str, datetime, tzinfo | None]] = []
    parsed = parse_dicom_datetime(attributes.get("AcquisitionDateTime"))
    if parsed is not None:
        candidates.append(("AcquisitionDateTime", parsed[0], parsed[1]))
    for date_key, time_key in (("AcquisitionDate", "AcquisitionTime"), ("StudyDate", "StudyTime")):
        day, clock = parse_dicom_date(attributes.get(date_key)), parse_dicom_time(attributes.get(time_key))
        if day is not None and clock is not None:
            candidates.append((f"{date_key}+{time_key}", datetime.combine(day, clock), None))
    if not candidates:
        raise IndexTimeError("no AcquisitionDateTime, AcquisitionDate+AcquisitionTime or StudyDate+StudyTime")
    source, wall, own_offset = candidates[0]
    if own_offset is not None:
        return IndexTime(wall.replace(tzinfo=own_offset), source, "AcquisitionDateTime")
    if dataset_offset is not None:
        return IndexTime(wall.replace(tzinfo=dataset_offset), source, "TimezoneOffsetFromUTC")
    return IndexTime(_localize(wall, site_zone(zone)), source, "site_zone")


def index_time_of_study(study: StudyRef, zone: str | tzinfo) -> IndexTime:
    """The index time from a STUDY-level record alone (StudyDate + StudyTime), when no series header is at hand.

    Raises :class:`IndexTimeError` when the study has no date and time or a malformed offset.
    """
    if study.study_datetime is None:
        raise IndexTimeError("the study has no StudyDate+StudyTime")
    moment = study.study_datetime
    if moment.tzinfo is not None:
        return IndexTime(moment, "StudyDate+StudyTime", "TimezoneOffsetFromUTC")
    if study.timezone_offset:
        try:
            offset = parse_dicom_offset(study.timezone_offset)
        except ValueError as error:
            raise IndexTimeError(f"TimezoneOffsetFromUTC: {error}") from None
        return IndexTime(moment.replace(tzinfo=offset), "StudyDate+StudyTime", "TimezoneOffsetFromUTC")
    return IndexTime(_localize(moment, site_zone(zone)), "StudyDate+StudyTime", "site_zone")


# --- FHIR times -----------------------------------------------------------------------------------------------

_FHIR_DATETIME = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?"
)


@dataclass(frozen=True)
class TimeSpan:
    """A FHIR time as the interval it denotes: ``start == end`` for an instant, else a whole year, month or day.

    Both ends are in UTC: Python compares and subtracts datetimes that share a tzinfo by wall clock, which is
    wrong across a daylight-saving change, so all arithmetic here happens in UTC.
    """

    start: datetime
    end: datetime
    precision: str  # "year", "month", "day" or "instant"

    @property
    def exact(self) -> bool:
        """True for a point in time (a dateTime with a time of day)."""
        return self.precision == "instant"

    @property
    def midpoint(self) -> datetime:
        """The middle of the interval (the instant itself when exact)."""
        return self.start + (self.end - self.start) / 2


def parse_fhir_datetime(text: str, zone: str | tzinfo) -> TimeSpan:
    """A FHIR date, dateTime or instant as a :class:`TimeSpan`.

    Partial values (YYYY, YYYY-MM, YYYY-MM-DD) become the whole year, month or day in ``zone``, ending just before
    the next one. A time without an offset (not valid FHIR, seen in feeds) is read in ``zone``. The span is in
    UTC. Raises ValueError for anything else.
    """
    found = _FHIR_DATETIME.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"not a FHIR dateTime: {text!r}")
    year, month, day, hour, minute, second, fraction, offset = found.groups()
    local = site_zone(zone)
    if hour is not None:
        assert month is not None and day is not None  # the pattern nests them
        naive = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second or 0), fraction_microseconds(fraction)
        )
        if offset is None:
            moment = _localize(naive, local)
        elif offset == "Z":
            moment = naive.replace(tzinfo=UTC)
        else:
            moment = naive.replace(tzinfo=parse_dicom_offset(offset.replace(":", "")))
        moment = moment.astimezone(UTC)
        return TimeSpan(moment, moment, "instant")
    if day is not None:
        assert month is not None
        start = date(int(year), int(month), int(day))
        following, precision = start + timedelta(days=1), "day"
    elif month is not None:
        start = date(int(year), int(month), 1)
        following = date(start.year + start.month // 12, start.month % 12 + 1, 1)
        precision = "month"
    else:
        start, following, precision = date(int(year), 1, 1), date(int(year) + 1, 1, 1), "year"
    begin = _localize(datetime.combine(start, time()), local).astimezone(UTC)
    end = _localize(datetime.combine(following, time()), local).astimezone(UTC) - timedelta(microseconds=1)
    return TimeSpan(begin, end, precision)


@dataclass(frozen=True)
class ObservationTime:
    """When an Observation happened, and which element said so."""

    span: TimeSpan
    source: str  # "effectiveDateTime", "effectiveInstant", "effectivePeriod.end", "effectivePeriod.start", "issued"


def observation_time(observation: ObservationResource, zone: str | tzinfo) -> ObservationTime | None:
    """The time of an Observation: effectiveDateTime, effectiveInstant, effectivePeriod (end, else start), else issued.

    A period counts at its end (a collection is complete then; a period reaching past the index time is after
    it). Returns None when there is no time at all; raises ValueError when the chosen element is malformed.
    """
    for key in ("effectiveDateTime", "effectiveInstant"):
        value = observation.get(key)
        if isinstance(value, str) and value.strip():
            return ObservationTime(parse_fhir_datetime(value, zone), key)
    period = observation.get("effectivePeriod")
    if isinstance(period, Mapping):
        for part in ("end", "start"):
            value = period.get(part)
            if isinstance(value, str) and value.strip():
                return ObservationTime(parse_fhir_datetime(value, zone), f"effectivePeriod.{part}")
    issued = observation.get("issued")
    if isinstance(issued, str) and issued.strip():
        return ObservationTime(parse_fhir_datetime(issued, zone), "issued")
    return None


# --- windows and selection ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureWindow:
    """The window and policy of one feature: values from ``index - before`` to ``index + after`` (inclusive).

    ``latest-before`` needs ``after == 0`` (it never looks past the index time). ``accept_preliminary`` False
    excludes preliminary results; True lets them count only when no final/amended/corrected result is in the
    window. ``use_issued`` allows ``issued`` as the time of an Observation without effective[x].
    """

    feature: str
    before: timedelta
    after: timedelta = timedelta(0)
    policy: Policy = Policy.LATEST_BEFORE
    partial_times: PartialTimes = PartialTimes.EXCLUDE
    accept_preliminary: bool = True
    use_issued: bool = True

    def __post_init__(self) -> None:
        if self.before < timedelta(0) or self.after < timedelta(0):
            raise ValueError(f"{self.feature}: before and after must not be negative")
        if self.policy is Policy.LATEST_BEFORE and self.after != timedelta(0):
            raise ValueError(f"{self.feature}: latest-before looks only before the index time (after must be 0)")


@dataclass(frozen=True)
class Measurement:
    """An Observation with its value already normalized by the units module (None when it could not be)."""

    observation: ObservationResource
    value: float | None
    value_reason: str | None = None  # the units module's reason code when value is None

    @property
    def observation_id(self) -> str:
        """The Observation's id ("" when it has none)."""
        value = self.observation.get("id")
        return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class Disposition:
    """What became of one Observation: ``code`` is ``used`` or a :class:`WindowReason`; ``detail`` explains more."""

    observation_id: str
    code: WindowReason
    status: str | None
    time: datetime | None  # the time used for the window (UTC; the midpoint of a partial time), None when unknown
    detail: str = ""


@dataclass(frozen=True)
class WindowSelection:
    """The value of one feature for one index time, and the disposition of every Observation considered.

    ``index`` and every time are in UTC. ``value`` is None when nothing usable is in the window (the feature is
    missing). ``time`` is the time of the chosen value (the latest of the values averaged for ``mean``); ``used``
    lists the Observation ids behind it.
    """

    feature: str
    index: datetime
    value: float | None
    time: datetime | None
    used: tuple[str, ...]
    dispositions: tuple[Disposition, ...]

    @property
    def excluded(self) -> tuple[Disposition, ...]:
        """Every Observation not used, with its reason."""
        return tuple(d for d in self.dispositions if d.code is not WindowReason.USED)

    def disposition_of(self, observation_id: str) -> Disposition | None:
        """The disposition of one Observation (the first, for a duplicated id), or None if it was not given."""
        return next((d for d in self.dispositions if d.observation_id == observation_id), None)


@dataclass(frozen=True)
class _Candidate:
    """A usable Observation inside the window."""

    measurement: Measurement
    value: float
    time: datetime
    status: str
    issued: datetime | None


def _status_exclusion(status: str | None, window: FeatureWindow) -> WindowReason | None:
    if status in PREFERRED_STATUSES:
        return None
    if status == "preliminary":
        return None if window.accept_preliminary else WindowReason.PRELIMINARY_NOT_ACCEPTED
    if status is not None and status in _STATUS_EXCLUSIONS:
        return _STATUS_EXCLUSIONS[status]
    return WindowReason.STATUS_UNKNOWN


def _issued(observation: ObservationResource, zone: tzinfo) -> datetime | None:
    issued = observation.get("issued")
    if not isinstance(issued, str):
        return None
    try:
        return parse_fhir_datetime(issued, zone).end
    except ValueError:
        return None


def _screen(
    item: Measurement, window: FeatureWindow, first: datetime, last: datetime, zone: tzinfo
) -> Disposition | _Candidate:
    """One Observation's exclusion (status, time, window, value, in that order), or the usable candidate."""
    observation = item.observation
    status = observation.get("status") if isinstance(observation.get("status"), str) else None
    try:
        when = observation_time(observation, zone)
        time_error = ""
    except ValueError as error:
        when, time_error = None, str(error)
    if when is not None and when.source == "issued" and not window.use_issued:
        when = None
    moment = when.span.midpoint if when is not None else None

    def excluded(code: WindowReason, detail: str) -> Disposition:
        return Disposition(item.observation_id, code, status, moment, detail)

    status_reason = _status_exclusion(status, window)
    if status_reason is not None:
        return excluded(status_reason, status or "(no status)")
    if time_error:
        return excluded(WindowReason.TIME_UNPARSEABLE, time_error)
    if when is None or moment is None:
        return excluded(WindowReason.NO_TIME, "no effective[x]" + ("" if window.use_issued else " (issued not used)"))
    span = when.span
    if not span.exact and window.partial_times is PartialTimes.EXCLUDE:
        return excluded(WindowReason.TIME_IMPRECISE, f"{when.source} has {span.precision} precision")
    if span.end < first:
        return excluded(WindowReason.BEFORE_WINDOW, when.source)
    if span.start > last:
        return excluded(WindowReason.AFTER_WINDOW, when.source)
    if span.start < first or span.end > last:
        return excluded(WindowReason.TIME_IMPRECISE, f"{when.source}: the {span.precision} straddles the window")
    if item.value is None or not math.isfinite(item.value):
        return excluded(WindowReason.VALUE_UNUSABLE, item.value_reason or "no value")
    assert status is not None  # _status_exclusion passes only known statuses
    return _Candidate(item, float(item.value), moment, status, _issued(observation, zone))


def select_value(
    window: FeatureWindow, index: datetime, measurements: Iterable[Measurement], zone: str | tzinfo
) -> WindowSelection:
    """Apply ``window`` around ``index`` (aware) to one feature's measurements; every one gets a disposition.

    ``zone`` is the site zone for FHIR times without an offset and for partial dates. Ties are broken towards
    the earlier time (``nearest``: a value before the scan beats one equally far after it), then the later
    ``issued``, then the Observation id, so the choice is deterministic. Raises ValueError for a naive ``index``.
    """
    if index.tzinfo is None or index.utcoffset() is None:
        raise ValueError("the index time must be timezone-aware")
    local = site_zone(zone)
    index = index.astimezone(UTC)
    first, last = index - window.before, index + window.after
    items = list(measurements)
    dispositions: dict[int, Disposition] = {}
    candidates: list[tuple[int, _Candidate]] = []
    seen_ids: set[str] = set()
    for position, item in enumerate(items):
        if item.observation_id and item.observation_id in seen_ids:
            status = item.observation.get("status")
            dispositions[position] = Disposition(
                item.observation_id, WindowReason.DUPLICATE, status if isinstance(status, str) else None, None
            )
            continue
        seen_ids.add(item.observation_id)
        screened = _screen(item, window, first, last, local)
        if isinstance(screened, Disposition):
            dispositions[position] = screened
        else:
            candidates.append((position, screened))
    preferred = [(p, c) for p, c in candidates if c.status in PREFERRED_STATUSES]
    if preferred:
        for position, candidate in candidates:
            if candidate.status not in PREFERRED_STATUSES:
                dispositions[position] = Disposition(
                    candidate.measurement.observation_id,
                    WindowReason.STATUS_OUTRANKED,
                    candidate.status,
                    candidate.time,
                    "a final/amended/corrected value is in the window",
                )
        candidates = preferred
    chosen = _apply_policy(window.policy, index, [c for _, c in candidates])
    chosen_ids = {id(c) for c in chosen}
    for position, candidate in candidates:
        used = id(candidate) in chosen_ids
        dispositions[position] = Disposition(
            candidate.measurement.observation_id,
            WindowReason.USED if used else WindowReason.SUPERSEDED,
            candidate.status,
            candidate.time,
            "" if used else f"{window.policy.value} chose another value",
        )
    return WindowSelection(
        feature=window.feature,
        index=index,
        value=sum(c.value for c in chosen) / len(chosen) if chosen else None,
        time=max(c.time for c in chosen) if chosen else None,
        used=tuple(c.measurement.observation_id for c in sorted(chosen, key=lambda c: c.time)),
        dispositions=tuple(dispositions[position] for position in range(len(items))),
    )


_NEVER = datetime.min.replace(tzinfo=UTC)


def _apply_policy(policy: Policy, index: datetime, candidates: list[_Candidate]) -> list[_Candidate]:
    """The candidates the policy uses (one, or all for ``mean``); empty when there are none."""
    if not candidates or policy is Policy.MEAN:
        return list(candidates)

    def later_issued_then_id(candidate: _Candidate) -> tuple[float, str]:
        issued = candidate.issued or _NEVER
        return (-issued.timestamp(), candidate.measurement.observation_id)

    if policy is Policy.LATEST_BEFORE:
        best = min(candidates, key=lambda c: (-c.time.timestamp(), *later_issued_then_id(c)))
    else:
        best = min(
            candidates,
            key=lambda c: (abs((c.time - index).total_seconds()), c.time.timestamp(), *later_issued_then_id(c)),
        )
    return [best]
