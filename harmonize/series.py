"""Declarative series selection: which series of a study the model reads, decided by rules in a YAML file.

A rule file names a rule set, lists **rules** every acceptable series must pass, and **rank** keys that order
the accepted ones (docs/series-selection.md has the format). :func:`select_series` is pure: it judges the
:class:`~riskbridge.records.SeriesRef` candidates a SERIES-level C-FIND returned and gives every candidate a
:class:`~riskbridge.records.SeriesDecision` (chosen, accepted runner-up, or rejected with the rule and the values
judged), in a :class:`SelectionResult` that explains a skipped study. Fetching what a PACS leaves out at SERIES
level is the connectors' job (:func:`riskbridge.connectors.query.find_complete_series`), guided by
:meth:`RuleSet.needed_attributes`.

Rules match DICOM attributes by keyword with these operators: ``equals``, ``one_of``, ``matches`` /
``not_matches`` (regular expressions), ``min`` / ``max`` (numbers, inclusive), ``includes`` / ``excludes``
(multi-valued attributes such as ImageType), ``orientation`` / ``max_obliquity_deg`` (derived from
ImageOrientationPatient) and ``present``; ``missing`` says whether a missing attribute rejects (default) or passes.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydicom.datadict import tag_for_keyword

from riskbridge.records import SeriesDecision, SeriesRef, uid_hash

LOG = logging.getLogger(__name__)

ORIENTATIONS = ("axial", "coronal", "sagittal")
OBLIQUE = "oblique"  # no single dominant axis: the slice normal lies exactly between two axes
DEFAULT_RULES = "chest_ct"

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
_RULE_KEYS = ("name", "description", "attribute", "present", "missing", *RULE_OPERATORS)
_RANK_KEYS = ("attribute", "order", "prefer", "description")
_TOP_KEYS = ("name", "version", "description", "rules", "rank")
_ORIENTATION_ATTRIBUTE = "ImageOrientationPatient"

# SeriesRef fields that stand in for an attribute the C-FIND answer did not carry.
_FIELD_FALLBACKS = {
    "StudyInstanceUID": "study_uid",
    "SeriesInstanceUID": "series_uid",
    "Modality": "modality",
    "SeriesNumber": "series_number",
    "SeriesDescription": "description",
    "NumberOfSeriesRelatedInstances": "instance_count",
}


class RuleFileError(ValueError):
    """A rule file cannot be read or is malformed; the message names the file and the rule."""


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


def _show(value: Any) -> str:
    """A value as DICOM writes it (multiple values joined by a backslash), for reasons."""
    if value is None:
        return "(missing)"
    if isinstance(value, tuple | list):
        return "\\".join(_show(item) for item in value)
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
        raise ValueError(f"ImageOrientationPatient {_show(image_orientation)} is not six numbers")
    (rx, ry, rz), (cx, cy, cz) = numbers[:3], numbers[3:]
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    length = math.sqrt(sum(n * n for n in normal))
    if length < 1e-6:
        raise ValueError(f"ImageOrientationPatient {_show(image_orientation)} has parallel or zero directions")
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
            return f"{attribute} is {_show(value)} (must be absent)"
        if missing:
            if self.has_value_operator and self.missing == "reject":
                return f"{attribute} is missing"
            return None
        shown = _show(value)
        if self.equals is not None and not _same(value, self.equals):
            return f"{attribute} {shown} is not {_show(self.equals)}"
        if self.one_of is not None and not any(_same(value, option) for option in self.one_of):
            return f"{attribute} {shown} is not one of {', '.join(_show(option) for option in self.one_of)}"
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
            return f"{self.attribute} {_show(value)} is not a number"
        for number in numbers:
            if self.minimum is not None and number < self.minimum:
                return f"{self.attribute} {_show(value)} is below min {self.minimum:g}"
            if self.maximum is not None and number > self.maximum:
                return f"{self.attribute} {_show(value)} is above max {self.maximum:g}"
        return None

    def _check_orientation(self, value: Any) -> str | None:
        try:
            plane, obliquity = slice_orientation(value)
        except ValueError as exc:
            return str(exc)
        if self.orientation and plane not in self.orientation:
            return f"orientation {plane} (from {_show(value)}) is not {' or '.join(sorted(self.orientation))}"
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
            text = _show(value)
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
            return f"{self.attribute} {_show(value)} ({where})"
        return f"{self.attribute} {_show(value)}"


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
                plane, obliquity = slice_orientation(values.get(_ORIENTATION_ATTRIBUTE))
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


# --- selection -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionResult:
    """The outcome of series selection for one study: a decision per candidate, and why, or why it is skipped."""

    study_uid: str
    rule_set: str
    decisions: tuple[SeriesDecision, ...]  # chosen, runners-up by rank, then rejected by SeriesNumber
    reason: str
    rejected_by: Mapping[str, int] = field(default_factory=dict)  # rule name -> series it rejected first

    @property
    def chosen(self) -> SeriesDecision | None:
        """The decision of the chosen series, or None when the study is skipped."""
        return next((decision for decision in self.decisions if decision.chosen), None)

    @property
    def skipped(self) -> bool:
        """True when no series is acceptable (``reason`` says why)."""
        return self.chosen is None

    @property
    def accepted(self) -> tuple[SeriesDecision, ...]:
        """Decisions of every acceptable series, best first (the chosen one, then runners-up)."""
        return tuple(decision for decision in self.decisions if decision.rank is not None)

    @property
    def rejected(self) -> tuple[SeriesDecision, ...]:
        """Decisions of the rejected series."""
        return tuple(decision for decision in self.decisions if decision.rank is None)

    def decision_for(self, series_uid: str) -> SeriesDecision:
        """The decision about one series; KeyError when it was no candidate."""
        for decision in self.decisions:
            if decision.series_uid == series_uid:
                return decision
        raise KeyError(f"series {uid_hash(series_uid)} was not a candidate")


def _runner_up_reason(rule_set: RuleSet, series: SeriesRef, chosen: SeriesRef, rank: int, total: int) -> str:
    for key in rule_set.rank:
        mine = series_value(series, key.attribute)
        theirs = series_value(chosen, key.attribute)
        if key.sort_value(mine) != key.sort_value(theirs):
            return (
                f"accepted, rank {rank} of {total}: behind the chosen series on {key.attribute} "
                f"({key.describe(mine)} vs {key.describe(theirs)})"
            )
    if series.series_number != chosen.series_number:
        decider = f"SeriesNumber {_show(series.series_number)} vs {_show(chosen.series_number)} decides"
    else:
        decider = "SeriesInstanceUID order decides"
    return f"accepted, rank {rank} of {total}: tied with the chosen series on every ranking key; {decider}"


def select_series(study_uid: str, candidates: Iterable[SeriesRef], rule_set: RuleSet) -> SelectionResult:
    """Judge every candidate series of one study by ``rule_set``; choose the best-ranked acceptable one.

    Pure: no I/O. Candidates of another study raise ValueError; a series UID listed twice is judged once.
    """
    unique: dict[str, SeriesRef] = {}
    for series in candidates:
        if series.study_uid and series.study_uid != study_uid:
            raise ValueError(
                f"series {uid_hash(series.series_uid)} belongs to another study, not {uid_hash(study_uid)}"
            )
        if series.series_uid in unique:
            LOG.warning(
                "study %s: series %s listed twice; judged once", uid_hash(study_uid), uid_hash(series.series_uid)
            )
            continue
        unique[series.series_uid] = series

    accepted: list[SeriesRef] = []
    rejected: list[SeriesDecision] = []
    rejected_by: Counter[str] = Counter()
    for series in unique.values():
        failures = rule_set.failures(series)
        if not failures:
            accepted.append(series)
            continue
        first_rule = failures[0][0].name
        rejected_by[first_rule] += 1
        rejected.append(
            SeriesDecision(
                study_uid=study_uid,
                series_uid=series.series_uid,
                chosen=False,
                rule=first_rule,
                reason="; ".join(f"{rule.name}: {why}" for rule, why in failures),
                rank=None,
                judged=rule_set.judged(series),
            )
        )
    accepted.sort(key=rule_set.sort_key)
    rejected.sort(key=lambda d: rule_set.sort_key(unique[d.series_uid])[-2:])

    decisions: list[SeriesDecision] = []
    for rank, series in enumerate(accepted, start=1):
        if rank == 1:
            shown = "; ".join(key.describe(series_value(series, key.attribute)) for key in rule_set.rank)
            reason = f"chosen: passes all {len(rule_set.rules)} rules, rank 1 of {len(accepted)}"
            reason += f" ({shown})" if shown else ""
        else:
            reason = _runner_up_reason(rule_set, series, accepted[0], rank, len(accepted))
        decisions.append(
            SeriesDecision(
                study_uid=study_uid,
                series_uid=series.series_uid,
                chosen=rank == 1,
                rule=rule_set.label,
                reason=reason,
                rank=rank,
                judged=rule_set.judged(series),
            )
        )
    decisions.extend(rejected)

    if accepted:
        summary = f"chose 1 of {len(unique)} series ({len(accepted) - 1} runner-up, {len(rejected)} rejected)"
    elif not unique:
        summary = f"skipped: the study has no series to judge by {rule_set.label}"
    else:
        counts = ", ".join(f"{rule} {count}" for rule, count in sorted(rejected_by.items()))
        summary = f"skipped: none of the {len(unique)} series passes {rule_set.label} (rejected first by: {counts})"
    LOG.info("study %s: %s", uid_hash(study_uid), summary)
    return SelectionResult(
        study_uid=study_uid,
        rule_set=rule_set.label,
        decisions=tuple(decisions),
        reason=summary,
        rejected_by=dict(rejected_by),
    )


# --- rule files ----------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor" merges may be overridden by explicit keys, as YAML intends
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Problem(Exception):
    """A rule-file problem whose location (rule, rank key) the caller adds."""


def _keyword(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Problem(f"'attribute' must be a DICOM keyword such as SliceThickness (got {value!r})")
    if tag_for_keyword(value) is None:
        raise _Problem(f"'attribute' {value!r} is not a DICOM keyword (keywords are CamelCase, e.g. SliceThickness)")
    return value


def _scalar(value: Any, key: str) -> str | int | float:
    if isinstance(value, bool):
        raise _Problem(f"'{key}' value {value!r} was read by YAML as a boolean (yes/no/on/off): quote it")
    if not isinstance(value, str | int | float):
        raise _Problem(f"'{key}' values must be text or numbers (got {value!r})")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Problem(f"'{key}' must be a number (got {value!r})")
    return float(value)


def _strings(value: Any, key: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, str) and item for item in items):
        raise _Problem(f"'{key}' must be a text or a non-empty list of texts (got {value!r})")
    return tuple(items)


def _patterns(value: Any, key: str) -> tuple[re.Pattern[str], ...]:
    compiled = []
    for text in _strings(value, key):
        try:
            compiled.append(re.compile(text))
        except re.error as exc:
            raise _Problem(f"'{key}' pattern {text!r} is not a valid regular expression: {exc}") from None
    return tuple(compiled)


def _parse_rule(raw: Any) -> Rule:
    if not isinstance(raw, dict):
        raise _Problem(f"must be a mapping with name, attribute and operators (got {raw!r})")
    unknown = sorted(set(raw) - set(_RULE_KEYS))
    if unknown:
        raise _Problem(f"unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(_RULE_KEYS)})")
    attribute = _keyword(raw.get("attribute"))
    if not any(key in raw for key in (*RULE_OPERATORS, "present")):
        raise _Problem(f"has no operator (one of {', '.join(RULE_OPERATORS)}, present)")
    present = raw.get("present")
    if present is not None and not isinstance(present, bool):
        raise _Problem(f"'present' must be true or false (got {present!r})")
    if present is False and any(key in raw for key in RULE_OPERATORS):
        raise _Problem("'present: false' cannot be combined with operators on the value")
    missing = raw.get("missing", "reject")
    if missing not in ("reject", "accept"):
        raise _Problem(f"'missing' must be reject or accept (got {missing!r})")

    equals = raw.get("equals")
    if equals is not None:
        equals = tuple(_scalar(v, "equals") for v in equals) if isinstance(equals, list) else _scalar(equals, "equals")
    one_of = raw.get("one_of")
    if one_of is not None:
        if not isinstance(one_of, list) or not one_of:
            raise _Problem(f"'one_of' must be a non-empty list (got {one_of!r})")
        one_of = tuple(_scalar(v, "one_of") for v in one_of)
    minimum = _number(raw["min"], "min") if "min" in raw else None
    maximum = _number(raw["max"], "max") if "max" in raw else None
    if minimum is not None and maximum is not None and minimum > maximum:
        raise _Problem(f"min {minimum:g} is greater than max {maximum:g}")
    orientation = frozenset(_strings(raw["orientation"], "orientation")) if "orientation" in raw else frozenset()
    if orientation - set(ORIENTATIONS):
        raise _Problem(f"'orientation' must be one or more of {', '.join(ORIENTATIONS)} (got {raw['orientation']!r})")
    max_obliquity = _number(raw["max_obliquity_deg"], "max_obliquity_deg") if "max_obliquity_deg" in raw else None
    if max_obliquity is not None and not 0.0 <= max_obliquity <= 90.0:
        raise _Problem(f"'max_obliquity_deg' must lie between 0 and 90 (got {max_obliquity:g})")
    if (orientation or max_obliquity is not None) and attribute != _ORIENTATION_ATTRIBUTE:
        raise _Problem(f"'orientation' and 'max_obliquity_deg' judge {_ORIENTATION_ATTRIBUTE}, not {attribute}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _Problem("'description' must be text")
    return Rule(
        name=str(raw["name"]),
        attribute=attribute,
        description=description,
        equals=equals,
        one_of=one_of,
        matches=_patterns(raw["matches"], "matches") if "matches" in raw else (),
        not_matches=_patterns(raw["not_matches"], "not_matches") if "not_matches" in raw else (),
        minimum=minimum,
        maximum=maximum,
        includes=frozenset(_strings(raw["includes"], "includes")) if "includes" in raw else frozenset(),
        excludes=frozenset(_strings(raw["excludes"], "excludes")) if "excludes" in raw else frozenset(),
        orientation=orientation,
        max_obliquity_deg=max_obliquity,
        present=present,
        missing=missing,
    )


def _parse_rank_key(raw: Any) -> RankKey:
    if not isinstance(raw, dict):
        raise _Problem(f"must be a mapping with attribute and order or prefer (got {raw!r})")
    unknown = sorted(set(raw) - set(_RANK_KEYS))
    if unknown:
        raise _Problem(f"unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(_RANK_KEYS)})")
    attribute = _keyword(raw.get("attribute"))
    if ("order" in raw) == ("prefer" in raw):
        raise _Problem("needs exactly one of 'order' (ascending/descending) or 'prefer' (list of patterns)")
    order = raw.get("order")
    if order is not None and order not in ("ascending", "descending"):
        raise _Problem(f"'order' must be ascending or descending (got {order!r})")
    prefer = _patterns(raw["prefer"], "prefer") if "prefer" in raw else ()
    return RankKey(attribute=attribute, order=order, prefer=prefer, description=str(raw.get("description", "")))


def parse_rules(data: Any, source: str = "<rules>") -> RuleSet:
    """Build a :class:`RuleSet` from the parsed YAML of a rule file; :class:`RuleFileError` names file and rule."""
    if not isinstance(data, dict):
        raise RuleFileError(f"{source}: a rule file is a mapping with name, rules and rank (got {type(data).__name__})")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise RuleFileError(
            f"{source}: unknown top-level key(s) {', '.join(map(str, unknown))} (known: {', '.join(_TOP_KEYS)})"
        )
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RuleFileError(f"{source}: 'name' (the rule set's name) is required")
    version = data.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, str | int | float)):
        raise RuleFileError(f"{source}: 'version' must be text or a number (got {version!r})")
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise RuleFileError(f"{source}: 'rules' must be a non-empty list of rules")
    rules: list[Rule] = []
    for number, raw in enumerate(raw_rules, start=1):
        rule_name = raw.get("name") if isinstance(raw, dict) else None
        where = f"{source}: rule #{number}" + (f" {rule_name!r}" if rule_name else "")
        if not isinstance(rule_name, str) or not rule_name.strip():
            raise RuleFileError(f"{where}: 'name' is required (a short identifier recorded with each rejection)")
        if any(rule.name == rule_name for rule in rules):
            raise RuleFileError(f"{where}: the name is used by an earlier rule; rule names must be unique")
        try:
            rules.append(_parse_rule(raw))
        except _Problem as problem:
            raise RuleFileError(f"{where}: {problem}") from None
    raw_rank = data.get("rank", [])
    if not isinstance(raw_rank, list):
        raise RuleFileError(f"{source}: 'rank' must be a list of ranking keys")
    rank: list[RankKey] = []
    for number, raw in enumerate(raw_rank, start=1):
        attribute = raw.get("attribute") if isinstance(raw, dict) else None
        where = f"{source}: rank key #{number}" + (f" ({attribute})" if isinstance(attribute, str) else "")
        try:
            rank.append(_parse_rank_key(raw))
        except _Problem as problem:
            raise RuleFileError(f"{where}: {problem}") from None
    description = data.get("description", "")
    return RuleSet(
        name=name.strip(),
        rules=tuple(rules),
        rank=tuple(rank),
        version=str(version) if version is not None else None,
        description=str(description).strip(),
        source=source,
    )


def parse_rules_text(text: str, source: str = "<rules>") -> RuleSet:
    """Parse the YAML text of a rule file; :class:`RuleFileError` names the source and the line of a YAML error."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # safe: _StrictLoader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RuleFileError(f"{source}: not valid YAML{where}: {problem}") from None
    return parse_rules(data, source)


def load_rules(path: str | Path) -> RuleSet:
    """Read and validate a rule file; :class:`RuleFileError` names the file and the offending rule."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleFileError(f"{path}: rule file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError(f"{path}: cannot read the rule file: {exc}") from None
    return parse_rules_text(text, str(path))


def shipped_rule_files() -> tuple[str, ...]:
    """Names of the rule files shipped with riskbridge (``harmonize/rules/<name>.yaml``)."""
    folder = resources.files("riskbridge.harmonize").joinpath("rules")
    return tuple(sorted(item.name.removesuffix(".yaml") for item in folder.iterdir() if item.name.endswith(".yaml")))


def load_default_rules(name: str = DEFAULT_RULES) -> RuleSet:
    """Load a rule file shipped with riskbridge by name (default ``chest_ct``)."""
    resource = resources.files("riskbridge.harmonize").joinpath("rules", f"{name}.yaml")
    if not resource.is_file():
        raise RuleFileError(f"no shipped rule file {name!r} (shipped: {', '.join(shipped_rule_files()) or 'none'})")
    return parse_rules_text(resource.read_text(encoding="utf-8"), f"riskbridge.harmonize/rules/{name}.yaml")
