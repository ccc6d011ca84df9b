"""The rules of series selection: what a rule, a rank key and a rule set are, and how they judge a series.

A :class:`Rule` is one named condition on one DICOM attribute; a :class:`RankKey` orders the accepted series; a
:class:`RuleSet` holds both and judges a :class:`~riskbridge.records.SeriesRef` (its C-FIND attributes, with
:func:`series_value` filling in from the SeriesRef's own fields). Rule files are read into a RuleSet by
:mod:`riskbridge.harmonize.series_rule_file`; :func:`riskbridge.harmonize.series.select_series` uses it to choose.

Rules match DICOM attributes by keyword with these operators: ``equals``, ``one_of``, ``matches`` /
``not_matches`` (regular expressions), ``min`` / ``max`` (numbers, inclusive), ``includes`` / ``excludes``
(multi-valued attributes such as ImageType), ``orientation`` / ``max_obliquity_deg`` (derived from
ImageOrientationPatient, :func:`slice_orientation`) and ``present``; ``missing`` says whether a missing attribute
rejects (default) or passes. docs/series-selection.md has the format.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from riskbridge.records import SeriesRef

ORIENTATIONS = ("axial", "coronal", "sagittal")
OBLIQUE = "oblique"  # no single dominant axis: the slice normal lies exactly between two axes

RULE_OPERATORS = (
    "equals",
    "one_of",
    "matches",
    "not_matches",
    "min",
    "max",
    "includes",
    "excludes",
    "orientation",
    "max_obliquity_deg",
)
ORIENTATION_ATTRIBUTE = "ImageOrientationPatient"

# SeriesRef fields that stand in for an attribute the C-FIND answer did not carry.
_FIELD_FALLBACKS = {
    "StudyInstanceUID": "study_uid",
    "SeriesInstanceUID": "series_uid",
    "Modality": "modality",
    "SeriesNumber": "series_number",
    "SeriesDescription": "description",
    "NumberOfSeriesRelatedInstances": "instance_count",
}


# --- attribute values ----------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, tuple | list):
        return not value or all(_is_missing(item) for item in value)
    return False


def series_value(series: SeriesRef, keyword: str) -> Any:
    """The value of ``keyword`` for a series (its C-FIND attributes, then the SeriesRef fields); None if missing."""
    value = series.attributes.get(keyword)
    if _is_missing(value) and keyword in _FIELD_FALLBACKS:
        value = getattr(series, _FIELD_FALLBACKS[keyword])
    if _is_missing(value):
        return None
    if isinstance(value, list):
        return tuple(value)
    return value


def show_value(value: Any) -> str:
    """A value as DICOM writes it (multiple values joined by a backslash), for reasons."""
    if value is None:
        return "(missing)"
    if isinstance(value, tuple | list):
        return "\\".join(show_value(item) for item in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _values(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def _numbers(value: Any) -> tuple[float, ...] | None:
    """Every value as a float, or None when one of them is not a number."""
    try:
        numbers = tuple(float(item) for item in _values(value))
    except (TypeError, ValueError):
        return None
    return None if any(math.isnan(n) for n in numbers) else numbers


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, list | tuple):
        actual_values = _values(actual)
        return len(actual_values) == len(expected) and all(
            _same(a, e) for a, e in zip(actual_values, expected, strict=True)
        )
    if isinstance(actual, tuple | list):
        return False
    if isinstance(expected, int | float):
        numbers = _numbers(actual)
        return numbers is not None and math.isclose(numbers[0], float(expected), rel_tol=1e-9, abs_tol=1e-9)
    return str(actual).strip() == str(expected)


def slice_orientation(image_orientation: Any) -> tuple[str, float]:
    """Classify ImageOrientationPatient as axial, coronal or sagittal by the dominant axis of the slice normal.

    Returns ``(plane, obliquity_deg)``: the angle between the normal (row x column direction) and that axis, 0 for
    a true axial/coronal/sagittal slice. A normal exactly between two axes (45 degrees) has no dominant axis and
    gives ``"oblique"``. Raises ValueError unless the value is six numbers with non-parallel directions.
    """
    numbers = _numbers(image_orientation) if image_orientation is not None else None
    if numbers is None or len(numbers) != 6:
        raise ValueError(f"ImageOrientationPatient {show_value(image_orientation)} is not six numbers")
    (rx, ry, rz), (cx, cy, cz) = numbers[:3], numbers[3:]
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    length = math.sqrt(sum(n * n for n in normal))
    if length < 1e-6:
        raise ValueError(f"ImageOrientationPatient {show_value(image_orientation)} has parallel or zero directions")
    share = [abs(n) / length for n in normal]
    order = sorted(range(3), key=lambda axis: share[axis], reverse=True)
    obliquity = math.degrees(math.acos(min(1.0, share[order[0]])))
    if share[order[0]] - share[order[1]] < 1e-9:
        return OBLIQUE, obliquity
    # The normal of an axial slice points along z (patient feet-head), coronal along y, sagittal along x.
    return ("sagittal", "coronal", "axial")[order[0]], obliquity


# --- rules ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One named condition on one DICOM attribute; every operator given must hold (see the module docstring)."""

    name: str
    attribute: str
    description: str = ""
    equals: Any = None
    one_of: tuple[Any, ...] | None = None
    matches: tuple[re.Pattern[str], ...] = ()
    not_matches: tuple[re.Pattern[str], ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    includes: frozenset[str] = frozenset()
    excludes: frozenset[str] = frozenset()
    orientation: frozenset[str] = frozenset()
    max_obliquity_deg: float | None = None
    present: bool | None = None
    missing: Literal["reject", "accept"] = "reject"

    @property
    def has_value_operator(self) -> bool:
        """True when the rule judges the value (any operator other than ``present``)."""
        return bool(
            self.equals is not None
            or self.one_of is not None
            or self.matches
            or self.not_matches
            or self.minimum is not None
            or self.maximum is not None
            or self.includes
            or self.excludes
            or self.orientation
            or self.max_obliquity_deg is not None
        )

    def check(self, value: Any) -> str | None:
        """Return None when ``value`` (None: missing) passes this rule, else why it fails."""
        attribute = self.attribute
        missing = _is_missing(value)
        if self.present is True and missing:
            return f"{attribute} is missing (must be present)"
        if self.present is False and not missing:
            return f"{attribute} is {show_value(value)} (must be absent)"
        if missing:
            if self.has_value_operator and self.missing == "reject":
                return f"{attribute} is missing"
            return None
        shown = show_value(value)
        if self.equals is not None and not _same(value, self.equals):
            return f"{attribute} {shown} is not {show_value(self.equals)}"
        if self.one_of is not None and not any(_same(value, option) for option in self.one_of):
            return f"{attribute} {shown} is not one of {', '.join(show_value(option) for option in self.one_of)}"
        if self.matches and not any(pattern.search(shown) for pattern in self.matches):
            if len(self.matches) > 1:
                return f"{attribute} {shown} matches none of the rule's {len(self.matches)} patterns"
            text = self.matches[0].pattern
            return f"{attribute} {shown} does not match {text if len(text) <= 60 else 'the rule pattern'}"
        for excluded in self.not_matches:
            if excluded.search(shown):
                return f"{attribute} {shown} matches {excluded.pattern}"
        if self.minimum is not None or self.maximum is not None:
            failure = self._check_range(value)
            if failure:
                return failure
        if self.includes or self.excludes:
            present_values = {str(item).strip() for item in _values(value)}
            lacking = sorted(self.includes - present_values)
            if lacking:
                return f"{attribute} {shown} lacks {', '.join(lacking)}"
            forbidden = sorted(self.excludes & present_values)
            if forbidden:
                return f"{attribute} {shown} contains {', '.join(forbidden)}"
        if self.orientation or self.max_obliquity_deg is not None:
            return self._check_orientation(value)
        return None

    def _check_range(self, value: Any) -> str | None:
        numbers = _numbers(value)
        if numbers is None:
            return f"{self.attribute} {show_value(value)} is not a number"
        for number in numbers:
            if self.minimum is not None and number < self.minimum:
                return f"{self.attribute} {show_value(value)} is below min {self.minimum:g}"
            if self.maximum is not None and number > self.maximum:
                return f"{self.attribute} {show_value(value)} is above max {self.maximum:g}"
        return None

    def _check_orientation(self, value: Any) -> str | None:
        try:
            plane, obliquity = slice_orientation(value)
        except ValueError as exc:
            return str(exc)
        if self.orientation and plane not in self.orientation:
            return f"orientation {plane} (from {show_value(value)}) is not {' or '.join(sorted(self.orientation))}"
        if self.max_obliquity_deg is not None and obliquity > self.max_obliquity_deg + 1e-9:
            return f"orientation {plane} is {obliquity:.1f} deg oblique (max {self.max_obliquity_deg:g})"
        return None


@dataclass(frozen=True)
class RankKey:
    """One ranking criterion among accepted series: a numeric order, or a list of preferred patterns."""

    attribute: str
    order: Literal["ascending", "descending"] | None = None
    prefer: tuple[re.Pattern[str], ...] = ()
    description: str = ""

    def sort_value(self, value: Any) -> tuple[int, float]:
        """Sort key of a value: lower sorts first; a missing or non-numeric value sorts after every other."""
        if self.prefer:
            if _is_missing(value):
                return (1, 0.0)
            text = show_value(value)
            index = next((i for i, pattern in enumerate(self.prefer) if pattern.search(text)), len(self.prefer))
            return (0, float(index))
        numbers = _numbers(value) if not _is_missing(value) else None
        if not numbers:
            return (1, 0.0)
        # A multi-valued attribute (PixelSpacing) ranks by its largest value, its coarsest direction.
        largest = max(numbers)
        return (0, largest if self.order == "ascending" else -largest)

    def describe(self, value: Any) -> str:
        """The value as this key judges it, e.g. ``ConvolutionKernel B70f (preference 1 of 2)``."""
        if self.prefer:
            missing, index = self.sort_value(value)
            if missing:
                return f"{self.attribute} (missing)"
            position = int(index)
            where = (
                f"preference {position + 1} of {len(self.prefer)}" if position < len(self.prefer) else "no preference"
            )
            return f"{self.attribute} {show_value(value)} ({where})"
        return f"{self.attribute} {show_value(value)}"


@dataclass(frozen=True)
class RuleSet:
    """A parsed rule file: the rules every acceptable series passes and the keys that rank accepted series."""

    name: str
    rules: tuple[Rule, ...]
    rank: tuple[RankKey, ...] = ()
    version: str | None = None
    description: str = ""
    source: str = ""

    @property
    def label(self) -> str:
        """``name@version`` (or the name alone), recorded as the rule behind accepted series."""
        return f"{self.name}@{self.version}" if self.version else self.name

    @property
    def keywords(self) -> tuple[str, ...]:
        """Every DICOM keyword the rules and the ranking read, in file order (request these in the C-FIND)."""
        ordered = [rule.attribute for rule in self.rules] + [key.attribute for key in self.rank]
        return tuple(dict.fromkeys(ordered))

    @property
    def derives_orientation(self) -> bool:
        """True when a rule judges the orientation derived from ImageOrientationPatient."""
        return any(rule.orientation or rule.max_obliquity_deg is not None for rule in self.rules)

    def failures(self, series: SeriesRef) -> list[tuple[Rule, str]]:
        """Every rule the series fails, in file order, with the reason; empty when the series is acceptable."""
        failed = []
        for rule in self.rules:
            reason = rule.check(series_value(series, rule.attribute))
            if reason is not None:
                failed.append((rule, reason))
        return failed

    def needed_attributes(self, series: SeriesRef) -> tuple[str, ...]:
        """Keywords this series lacks that a decision on it needs; empty when it can be judged as it is.

        A series already rejected by a rule whose attribute is present needs nothing more (so a dose SR costs no
        IMAGE-level query). NumberOfSeriesRelatedInstances is among the keywords when a rule or rank key reads it.
        """
        missing = [keyword for keyword in self.keywords if series_value(series, keyword) is None]
        if not missing:
            return ()
        for rule in self.rules:
            if rule.attribute not in missing and rule.check(series_value(series, rule.attribute)) is not None:
                return ()
        return tuple(missing)

    def judged(self, series: SeriesRef) -> dict[str, Any]:
        """The attribute values the rules and ranking judge (plus the derived orientation), for the decision."""
        values: dict[str, Any] = {keyword: series_value(series, keyword) for keyword in self.keywords}
        if self.derives_orientation:
            try:
                plane, obliquity = slice_orientation(values.get(ORIENTATION_ATTRIBUTE))
            except ValueError:
                values["orientation"] = None
            else:
                values["orientation"] = plane
                values["obliquity_deg"] = round(obliquity, 2)
        return values

    def sort_key(self, series: SeriesRef) -> tuple[Any, ...]:
        """Order of accepted series: the rank keys, then SeriesNumber, then SeriesInstanceUID (deterministic)."""
        keys: list[Any] = [key.sort_value(series_value(series, key.attribute)) for key in self.rank]
        number = series.series_number
        keys.append((number is None, number if number is not None else 0))
        keys.append(series.series_uid)
        return tuple(keys)
