"""Outcome labels from FHIR: a versioned YAML label spec, and the label (1/0) or exclusion reason it gives a patient.

Training and validation need one outcome per (patient, scan). The spec says what the outcome is (Condition codes,
Observation thresholds), how long after the scan it counts, what shows that a patient without it was followed up,
and when a patient is excluded. :func:`label_patient` applies it to one patient's FHIR R4 resources (plain JSON
dicts); it does no I/O. Shipped specs live in ``harmonize/data/labels_<name>.yaml``; :func:`load_label_spec` takes
such a name (``chest_ct``) or the path of a site's YAML file. A malformed spec raises
:class:`~riskbridge.harmonize.rule_file.RuleFileError` naming the file and the entry.

The spec (unknown keys are errors; ``name``, ``version``, ``horizon_days`` and one outcome rule are required)::

    name: lung_cancer_365d
    version: 1
    description: Malignant tumor of lung diagnosed within 365 days after the scan
    horizon_days: 365
    outcome:
      conditions:                 # a Condition with a coding matching any rule: exact code or code prefix
        - {system: "http://snomed.info/sct", code: "363358000"}
        - {system: "http://hl7.org/fhir/sid/icd-10-cm", prefix: "C34"}
      verification_excluded: [refuted, entered-in-error]   # the default: such Conditions never count
      observations:               # an Observation meeting a threshold, in the rule's UCUM unit
        - {system: "http://loinc.org", code: "1988-5", comparator: ">=", value: 5.0, unit: "mg/L"}
    negative:
      follow_up_resources: [Encounter, Observation]       # the default
    exclude:
      outcome_before_scan: true                            # the default

An observation rule counts a final, amended or corrected Observation with a coding of its system and code whose
valueQuantity has the rule's unit as UCUM ``code``. Values are not converted: another unit never counts, and neither
does a value with a comparator (``<5``), which is a bound, not a measurement.

Times. Condition: onsetDateTime, else onsetPeriod.start, else recordedDate. Observation: effectiveDateTime (or
effectiveInstant), else effectivePeriod.start, else issued. Encounter: the later of period.start and period.end. A
malformed value counts as absent. A partial value (a date, month or year) is that interval in the site zone and
counts at its start, everywhere: a Condition dated the day of the scan is at or before the scan, since nothing
shows it was unknown at the scan. A planned, cancelled or entered-in-error Encounter and a registered, cancelled or
entered-in-error Observation show no follow-up.

Decision rules, in this order (H is the index time plus the horizon; outcome means matching outcome evidence):

1. ``outcome_before_scan`` (excluded; only with exclude.outcome_before_scan): an outcome at or before the index
   time. Otherwise outcomes before the scan are ignored.
2. ``positive`` (1): an outcome in (index time, H]; onset is the earliest.
3. ``outcome_time_unknown`` (excluded): an outcome without any time; it could lie anywhere.
4. ``negative`` (0): follow-up after H: a resource of a follow_up_resources type, or an outcome, timed after H.
5. ``no_follow_up`` (excluded): nothing after H, so the outcome may have happened unseen.

Evidence lists ``ResourceType/id`` of the resources behind the decision, sorted; onset (UTC) is the outcome's time
for ``positive`` and ``outcome_before_scan``, else None.
"""

from __future__ import annotations

import importlib.resources
import math
import operator
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, model_validator

from riskbridge.harmonize.rule_file import RuleFileError, read_rule_text
from riskbridge.harmonize.windows import parse_fhir_datetime, site_zone
from riskbridge.settings import names_a_file

POSITIVE = "positive"
NEGATIVE = "negative"
OUTCOME_BEFORE_SCAN = "outcome_before_scan"
NO_FOLLOW_UP = "no_follow_up"
OUTCOME_TIME_UNKNOWN = "outcome_time_unknown"
REASONS = (POSITIVE, NEGATIVE, OUTCOME_BEFORE_SCAN, NO_FOLLOW_UP, OUTCOME_TIME_UNKNOWN)

UCUM = "http://unitsofmeasure.org"
OUTCOME_OBSERVATION_STATUSES = ("final", "amended", "corrected")
_NOT_SEEN = {
    "Encounter": {"planned", "cancelled", "entered-in-error"},
    "Observation": {"registered", "cancelled", "entered-in-error"},
}
_COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
_CONDITION_TIMES = (("onsetDateTime",), ("onsetPeriod", "start"), ("recordedDate",))
_OBSERVATION_TIMES = (("effectiveDateTime",), ("effectiveInstant",), ("effectivePeriod", "start"), ("issued",))
_ENCOUNTER_TIMES = (("period", "start"), ("period", "end"))

_Text = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _codings(resource: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    concept = resource.get("code")
    codings = concept.get("coding") if isinstance(concept, Mapping) else None
    yield from (coding for coding in codings or () if isinstance(coding, Mapping))


class CodeRule(_Strict):
    """A coding that makes a Condition an outcome: ``system`` with an exact ``code`` or a code ``prefix``."""

    system: _Text
    code: _Text | None = None
    prefix: _Text | None = None

    @model_validator(mode="after")
    def _code_or_prefix(self) -> CodeRule:
        if (self.code is None) == (self.prefix is None):
            raise ValueError("needs exactly one of 'code' (exact match) or 'prefix' (code prefix)")
        return self

    def matches(self, coding: Mapping[str, Any]) -> bool:
        """True when a Coding has this system and the code, or a code starting with the prefix."""
        code = coding.get("code")
        if coding.get("system") != self.system or not isinstance(code, str):
            return False
        return code == self.code if self.prefix is None else code.startswith(self.prefix)


class ObservationRule(_Strict):
    """An Observation that makes an outcome: this code, and a value in ``unit`` (UCUM) meeting the threshold."""

    system: _Text
    code: _Text
    comparator: Literal[">", ">=", "<", "<="]
    value: Annotated[float, Field(strict=True, allow_inf_nan=False)]
    unit: _Text

    def matches(self, observation: Mapping[str, Any]) -> bool:
        """True for a final/amended/corrected Observation of this code whose value in the unit meets the threshold."""
        if observation.get("status") not in OUTCOME_OBSERVATION_STATUSES:
            return False
        if not any(c.get("system") == self.system and c.get("code") == self.code for c in _codings(observation)):
            return False
        quantity = observation.get("valueQuantity")
        if not isinstance(quantity, Mapping) or quantity.get("comparator") is not None:
            return False
        if quantity.get("code") != self.unit or quantity.get("system", UCUM) != UCUM:
            return False
        value = quantity.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        return _COMPARE[self.comparator](float(value), self.value)


class OutcomeRules(_Strict):
    """What counts as the outcome: Condition code rules and Observation threshold rules (at least one of them)."""

    conditions: tuple[CodeRule, ...] = ()
    verification_excluded: tuple[_Text, ...] = ("refuted", "entered-in-error")
    observations: tuple[ObservationRule, ...] = ()

    @model_validator(mode="after")
    def _some_rule(self) -> OutcomeRules:
        if not self.conditions and not self.observations:
            raise ValueError("needs at least one rule in 'conditions' or 'observations'")
        return self

    def condition_counts(self, condition: Mapping[str, Any]) -> bool:
        """True for a Condition with a matching coding that is not refuted, entered in error or otherwise excluded."""
        status = condition.get("verificationStatus")
        codes = {c.get("code") for c in _codings({"code": status})} if isinstance(status, Mapping) else set()
        if codes & set(self.verification_excluded):
            return False
        return any(rule.matches(coding) for coding in _codings(condition) for rule in self.conditions)


class NegativeRules(_Strict):
    """Which resource types dated after the horizon show that the patient was followed up."""

    follow_up_resources: Annotated[tuple[Literal["Encounter", "Observation"], ...], Field(min_length=1)] = (
        "Encounter",
        "Observation",
    )


class ExcludeRules(_Strict):
    """Which patients get no label: by default those whose outcome was already present at the scan."""

    outcome_before_scan: StrictBool = True


class LabelSpec(_Strict):
    """A versioned label spec (module docstring: the format); ``label`` names it as ``name@version``."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    version: Annotated[StrictInt, Field(ge=1)]
    description: str = ""
    horizon_days: Annotated[StrictInt, Field(gt=0)]
    outcome: OutcomeRules
    negative: NegativeRules = Field(default_factory=NegativeRules)
    exclude: ExcludeRules = Field(default_factory=ExcludeRules)

    @property
    def label(self) -> str:
        """``name@version``, as recorded with every label."""
        return f"{self.name}@{self.version}"

    @property
    def horizon(self) -> timedelta:
        """How long after the scan an outcome counts."""
        return timedelta(days=self.horizon_days)


# --- reading spec files ----------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _where(location: tuple[int | str, ...]) -> str:
    # Entries of a list are numbered from 1, as in the other rule files: "outcome.conditions #2.prefix".
    text = ""
    for part in location:
        text += f" #{part + 1}" if isinstance(part, int) else f"{'.' if text else ''}{part}"
    return text or "(top level)"


def parse_label_spec(data: Any, source: str = "<label spec>") -> LabelSpec:
    """A :class:`LabelSpec` from parsed YAML; :class:`RuleFileError` names the source and every bad entry."""
    if not isinstance(data, dict):
        raise RuleFileError(f"{source}: a label spec is a mapping with name, version, horizon_days and outcome")
    try:
        return LabelSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
            if error["type"] == "string_type" and isinstance(error["input"], int | float):
                message += " (YAML read a number: quote codes)"
            problems.append(f"{_where(error['loc'])}: {message.removeprefix('Value error, ')}")
        raise RuleFileError(f"{source}: {'; '.join(problems)}") from None


def _parse_text(text: str, source: str) -> LabelSpec:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # safe: _StrictLoader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RuleFileError(f"{source}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    return parse_label_spec(data, source)


def shipped_label_specs() -> tuple[str, ...]:
    """Names of the label specs shipped with riskbridge (``harmonize/data/labels_<name>.yaml``)."""
    folder = importlib.resources.files("riskbridge.harmonize").joinpath("data")
    names = (item.name for item in folder.iterdir() if item.name.startswith("labels_") and item.name.endswith(".yaml"))
    return tuple(sorted(name.removeprefix("labels_").removesuffix(".yaml") for name in names))


def load_label_spec(path_or_name: str | Path) -> LabelSpec:
    """Load a shipped spec by name (``chest_ct``) or a YAML file by path (a Path, or text ending .yaml/.yml or with
    a slash, as for the other name-or-path settings); :class:`RuleFileError` when missing, unreadable or malformed."""
    if isinstance(path_or_name, Path) or names_a_file(path_or_name):
        path = Path(path_or_name)
        return _parse_text(read_rule_text(path, "label spec"), str(path))
    resource = importlib.resources.files("riskbridge.harmonize").joinpath("data", f"labels_{path_or_name}.yaml")
    if not resource.is_file():
        shipped = ", ".join(shipped_label_specs()) or "none"
        raise RuleFileError(f"no shipped label spec {path_or_name!r} (shipped: {shipped})")
    return _parse_text(resource.read_text(encoding="utf-8"), f"riskbridge.harmonize/data/labels_{path_or_name}.yaml")


# --- labelling -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelDecision:
    """One patient's label: 1 (``positive``), 0 (``negative``) or None (excluded, ``reason`` says why).

    ``evidence``: ``ResourceType/id`` of the resources the decision rests on, sorted. ``onset``: the outcome's time
    (UTC) for ``positive`` and ``outcome_before_scan``, else None.
    """

    label: int | None
    reason: str
    evidence: tuple[str, ...] = ()
    onset: datetime | None = None

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown label reason {self.reason!r} (known: {', '.join(REASONS)})")
        if self.label != {POSITIVE: 1, NEGATIVE: 0}.get(self.reason):
            raise ValueError(f"label {self.label!r} contradicts reason {self.reason!r}")

    @property
    def excluded(self) -> bool:
        """True when the patient gets no label."""
        return self.label is None


def _time_at(resource: Mapping[str, Any], path: tuple[str, ...], zone: tzinfo) -> datetime | None:
    value: Any = resource
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return parse_fhir_datetime(value, zone).start
    except ValueError:
        return None  # a malformed element is treated as absent, so the next source can still date the resource


def _first_time(resource: Mapping[str, Any], paths: Iterable[tuple[str, ...]], zone: tzinfo) -> datetime | None:
    return next((t for path in paths if (t := _time_at(resource, path, zone)) is not None), None)


def _reference(resource: Mapping[str, Any]) -> str:
    identifier = resource.get("id")
    return f"{resource.get('resourceType')}/{identifier if isinstance(identifier, str) and identifier else '?'}"


def label_patient(
    spec: LabelSpec, index_time: datetime, resources: Iterable[Mapping[str, Any]], zone: str | tzinfo
) -> LabelDecision:
    """Label one patient from its FHIR resources (any types; those the spec does not use are ignored).

    ``index_time`` is the scan's time and must be aware (ValueError otherwise); ``zone`` is the site zone, in which
    partial dates and times without an offset are read. The rules, in order, are in the module docstring.
    """
    if index_time.tzinfo is None or index_time.utcoffset() is None:
        raise ValueError("the index time must be timezone-aware")
    local = site_zone(zone)
    index = index_time.astimezone(UTC)
    horizon_end = index + spec.horizon
    outcomes: list[tuple[datetime | None, str]] = []
    follow_up: set[str] = set()
    for resource in resources:
        kind = resource.get("resourceType")
        if kind == "Condition" and spec.outcome.condition_counts(resource):
            outcomes.append((_first_time(resource, _CONDITION_TIMES, local), _reference(resource)))
        elif kind == "Observation" and any(rule.matches(resource) for rule in spec.outcome.observations):
            outcomes.append((_first_time(resource, _OBSERVATION_TIMES, local), _reference(resource)))
        if kind in spec.negative.follow_up_resources and resource.get("status") not in _NOT_SEEN[str(kind)]:
            if kind == "Encounter":
                seen = max(
                    (t for p in _ENCOUNTER_TIMES if (t := _time_at(resource, p, local)) is not None), default=None
                )
            else:
                seen = _first_time(resource, _OBSERVATION_TIMES, local)
            if seen is not None and seen > horizon_end:
                follow_up.add(_reference(resource))
    timed: list[tuple[datetime, str]] = [(moment, ref) for moment, ref in outcomes if moment is not None]
    before = [(moment, ref) for moment, ref in timed if moment <= index]
    if spec.exclude.outcome_before_scan and before:
        return LabelDecision(None, OUTCOME_BEFORE_SCAN, _sorted(before), min(before)[0])
    within = [(moment, ref) for moment, ref in timed if index < moment <= horizon_end]
    if within:
        return LabelDecision(1, POSITIVE, _sorted(within), min(within)[0])
    untimed = [(moment, ref) for moment, ref in outcomes if moment is None]
    if untimed:
        return LabelDecision(None, OUTCOME_TIME_UNKNOWN, _sorted(untimed))
    follow_up.update(ref for moment, ref in timed if moment > horizon_end)
    if follow_up:
        return LabelDecision(0, NEGATIVE, tuple(sorted(follow_up)))
    return LabelDecision(None, NO_FOLLOW_UP)


def _sorted(found: Iterable[tuple[datetime | None, str]]) -> tuple[str, ...]:
    return tuple(sorted({ref for _, ref in found}))


def label_counts(decisions: Iterable[LabelDecision]) -> dict[str, int]:
    """How many decisions have each reason: every reason of :data:`REASONS`, in that order, zero included."""
    counts = dict.fromkeys(REASONS, 0)
    for decision in decisions:
        counts[decision.reason] += 1
    return counts
