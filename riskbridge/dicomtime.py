"""DICOM date, time and UTC-offset values (DA, TM, DT, TimezoneOffsetFromUTC) as Python dates and times.

One parser for the whole package: C-FIND answers (connectors/query.py) and index times (harmonize/windows.py)
read the same value representations the same way.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from typing import Any

_DICOM_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")


def parse_dicom_offset(text: str) -> timezone:
    """A DICOM UTC offset (TimezoneOffsetFromUTC or a DT suffix, "+HHMM"/"-HHMM") as a fixed timezone.

    Raises ValueError for anything else (DICOM allows -1200 to +1400).
    """
    found = _DICOM_OFFSET.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"not a DICOM UTC offset: {text!r}")
    sign, hours, minutes = found.group(1), int(found.group(2)), int(found.group(3))
    if minutes >= 60 or hours > 14:
        raise ValueError(f"not a DICOM UTC offset: {text!r}")
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if sign == "-" else delta)


def fraction_microseconds(text: str | None) -> int:
    """Microseconds of a fraction of a second written with its dot (".25" -> 250000); 0 when absent."""
    return int((text or ".0")[1:].ljust(6, "0")[:6])


_DICOM_DT = re.compile(r"(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?")
_DICOM_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?")


def parse_dicom_datetime(value: Any) -> tuple[datetime, tzinfo | None] | None:
    """A DICOM DT with at least the hour as (naive wall time, its own offset or None); None otherwise."""
    if isinstance(value, datetime):  # pydicom with datetime_conversion on
        return value.replace(tzinfo=None), value.tzinfo
    found = _DICOM_DT.fullmatch(str(value or "").strip())
    if found is None:
        return None
    year, month, day, hour = (int(found.group(k)) for k in range(1, 5))
    minute, second = int(found.group(5) or 0), int(found.group(6) or 0)
    try:
        naive = datetime(year, month, day, hour, minute, second, fraction_microseconds(found.group(7)))
        offset = parse_dicom_offset(found.group(8)) if found.group(8) else None
    except ValueError:
        return None
    return naive, offset


def parse_dicom_date(value: Any) -> date | None:
    """A DICOM DA (YYYYMMDD, or the old YYYY.MM.DD form); None when missing or invalid."""
    if isinstance(value, date):
        return value
    text = str(value or "").strip().replace(".", "")
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def parse_dicom_time(value: Any) -> time | None:
    """A DICOM TM (HH, HHMM, HHMMSS, with a fraction; the old HH:MM:SS form too); None when missing or invalid."""
    if isinstance(value, time):
        return value
    found = _DICOM_TM.fullmatch(str(value or "").strip().replace(":", ""))
    if found is None:
        return None
    try:
        return time(
            int(found.group(1)),
            int(found.group(2) or 0),
            int(found.group(3) or 0),
            fraction_microseconds(found.group(4)),
        )
    except ValueError:
        return None
