"""Outcome labels from FHIR: the shipped chest CT spec, every decision rule and reason, the code and threshold
rules, partial dates in the site zone, and malformed spec files naming their problem."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from riskbridge.harmonize.labels import (
    NEGATIVE,
    NO_FOLLOW_UP,
    OUTCOME_BEFORE_SCAN,
    OUTCOME_TIME_UNKNOWN,
    POSITIVE,
    REASONS,
    LabelDecision,
    label_counts,
    label_patient,
    load_label_spec,
    parse_label_spec,
)
from riskbridge.harmonize.rule_file import RuleFileError

SPEC = load_label_spec("chest_ct")
ZONE = "America/New_York"
SCAN = datetime(2024, 3, 1, 15, 0, tzinfo=UTC)  # 10:00 in New York
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"


def condition(
    ident: str, onset: str | None = None, *, code: str = "363358000", system: str = SNOMED, **extra: Any
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": ident,
        "code": {"coding": [{"system": system, "code": code}]},
    }
    if onset is not None:
        resource["onsetDateTime"] = onset
    return {**resource, **extra}


def encounter(ident: str, start: str, end: str | None = None, status: str = "finished") -> dict[str, Any]:
    period = {"start": start} | ({"end": end} if end else {})
    return {"resourceType": "Encounter", "id": ident, "status": status, "period": period}


def observation(ident: str, when: str, value: float = 1.0, unit: str = "mg/L", status: str = "final") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": ident,
        "status": status,
        "code": {"coding": [{"system": LOINC, "code": "1988-5"}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }


def verification(code: str) -> dict[str, Any]:
    system = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
    return {"coding": [{"system": system, "code": code}]}


def label(*resources: dict[str, Any], spec: Any = SPEC, index: datetime = SCAN, zone: str = ZONE) -> LabelDecision:
    return label_patient(spec, index, resources, zone)


def test_the_shipped_chest_ct_spec() -> None:
    assert SPEC.label == "lung_cancer_365d@1"
    assert SPEC.horizon == timedelta(days=365)
    assert [(rule.system, rule.code, rule.prefix) for rule in SPEC.outcome.conditions] == [
        (SNOMED, "363358000", None),
        (ICD10, None, "C34"),
    ]
    assert SPEC.negative.follow_up_resources == ("Encounter", "Observation")
    assert SPEC.exclude.outcome_before_scan and not SPEC.outcome.observations
    assert load_label_spec(Path(__file__).parents[2] / "harmonize" / "data" / "labels_chest_ct.yaml") == SPEC


def test_an_outcome_within_the_horizon_is_positive_with_its_onset() -> None:
    decision = label(condition("c1", "2024-09-01T12:00:00Z"), condition("c2", "2024-11-01T12:00:00Z"))
    assert (decision.label, decision.reason, decision.excluded) == (1, POSITIVE, False)
    assert decision.evidence == ("Condition/c1", "Condition/c2")
    assert decision.onset == datetime(2024, 9, 1, 12, tzinfo=UTC)


def test_the_horizon_end_is_inclusive_and_onset_falls_back_to_period_start_then_recorded_date() -> None:
    at_end = (SCAN + timedelta(days=365)).isoformat()
    assert label(condition("c1", at_end)).reason == POSITIVE
    by_period = condition("c2", onsetPeriod={"start": "2024-05-01T00:00:00Z"}, recordedDate="2025-06-01")
    assert label(by_period).onset == datetime(2024, 5, 1, tzinfo=UTC)
    assert label(condition("c3", recordedDate="2024-05-02T00:00:00Z")).onset == datetime(2024, 5, 2, tzinfo=UTC)


def test_an_onset_after_the_horizon_is_its_own_follow_up_and_negative() -> None:
    decision = label(condition("c1", "2025-06-01T00:00:00Z"))
    assert (decision.label, decision.reason, decision.onset) == (0, NEGATIVE, None)
    assert decision.evidence == ("Condition/c1",)


def test_no_outcome_with_follow_up_after_the_horizon_is_negative() -> None:
    decision = label(
        encounter("e1", "2024-06-01T10:00:00Z"),  # inside the horizon: not follow-up beyond it
        encounter("e2", "2025-01-01T10:00:00Z", "2025-04-01T10:00:00Z"),  # its end is after the horizon
        observation("o1", "2025-05-01T10:00:00Z"),
    )
    assert (decision.label, decision.reason) == (0, NEGATIVE)
    assert decision.evidence == ("Encounter/e2", "Observation/o1")


def test_no_outcome_and_no_follow_up_beyond_the_horizon_is_excluded() -> None:
    decision = label(
        encounter("e1", "2024-06-01T10:00:00Z", "2024-06-02T10:00:00Z"),
        encounter("e2", "2025-06-01T10:00:00Z", status="planned"),  # booked, not seen
        encounter("e3", "2025-06-01T10:00:00Z", status="entered-in-error"),
        observation("o1", "2025-06-01T10:00:00Z", status="cancelled"),
        {"resourceType": "Procedure", "id": "p1", "performedDateTime": "2025-06-01"},  # not a follow-up type here
    )
    assert (decision.label, decision.reason, decision.excluded, decision.evidence) == (None, NO_FOLLOW_UP, True, ())
    assert label().reason == NO_FOLLOW_UP


def test_an_outcome_at_or_before_the_scan_excludes_first() -> None:
    decision = label(
        condition("c1", "2023-01-01T00:00:00Z"),
        condition("c2", SCAN.isoformat()),  # at the index time counts as before
        condition("c3", "2024-06-01T00:00:00Z"),
        encounter("e1", "2025-06-01T10:00:00Z"),
    )
    assert (decision.label, decision.reason) == (None, OUTCOME_BEFORE_SCAN)
    assert decision.evidence == ("Condition/c1", "Condition/c2")
    assert decision.onset == datetime(2023, 1, 1, tzinfo=UTC)


def test_without_the_exclusion_earlier_outcomes_are_ignored() -> None:
    spec = SPEC.model_copy(update={"exclude": SPEC.exclude.model_copy(update={"outcome_before_scan": False})})
    prior = condition("c1", "2023-01-01T00:00:00Z")
    assert label(prior, condition("c2", "2024-06-01T00:00:00Z"), spec=spec).reason == POSITIVE
    assert label(prior, encounter("e1", "2025-06-01T10:00:00Z"), spec=spec).reason == NEGATIVE


def test_refuted_and_entered_in_error_conditions_are_ignored() -> None:
    refuted = condition("c1", "2024-06-01T00:00:00Z", verificationStatus=verification("refuted"))
    erroneous = condition("c2", "2023-06-01T00:00:00Z", verificationStatus=verification("entered-in-error"))
    confirmed = condition("c3", "2024-07-01T00:00:00Z", verificationStatus=verification("confirmed"))
    assert label(refuted, erroneous).reason == NO_FOLLOW_UP
    decision = label(refuted, erroneous, confirmed)
    assert (decision.reason, decision.evidence) == (POSITIVE, ("Condition/c3",))


def test_an_untimed_outcome_is_time_unknown_unless_a_timed_one_decides() -> None:
    untimed = condition("c1")
    decision = label(untimed, encounter("e1", "2025-06-01T10:00:00Z"))
    assert (decision.label, decision.reason, decision.evidence, decision.onset) == (
        None,
        OUTCOME_TIME_UNKNOWN,
        ("Condition/c1",),
        None,
    )
    assert label(untimed, condition("c2", "2024-06-01T00:00:00Z")).reason == POSITIVE
    assert label(untimed, condition("c3", "2023-06-01T00:00:00Z")).reason == OUTCOME_BEFORE_SCAN
    assert label(condition("c4", "not a date")).reason == OUTCOME_TIME_UNKNOWN  # malformed counts as absent


def test_icd10_codes_match_by_prefix_and_other_codes_do_not_count() -> None:
    assert label(condition("c1", "2024-06-01", code="C34.90", system=ICD10)).reason == POSITIVE
    assert label(condition("c2", "2024-06-01", code="C34", system=ICD10)).reason == POSITIVE
    assert label(condition("c3", "2024-06-01", code="C33", system=ICD10)).reason == NO_FOLLOW_UP  # trachea
    assert label(condition("c4", "2024-06-01", code="C34.90", system=SNOMED)).reason == NO_FOLLOW_UP
    assert label(condition("c5", "2024-06-01", code="254637007")).reason == NO_FOLLOW_UP  # another SNOMED code


CRP_SPEC = parse_label_spec(
    {
        "name": "crp_high_30d",
        "version": 2,
        "horizon_days": 30,
        "outcome": {
            "observations": [{"system": LOINC, "code": "1988-5", "comparator": ">=", "value": 5, "unit": "mg/L"}]
        },
        "negative": {"follow_up_resources": ["Observation"]},
    }
)


def test_an_observation_threshold_outcome() -> None:
    assert CRP_SPEC.label == "crp_high_30d@2" and CRP_SPEC.outcome.observations[0].value == 5.0
    decision = label(observation("o1", "2024-03-10T10:00:00Z", 5.0), spec=CRP_SPEC)
    assert (decision.reason, decision.evidence) == (POSITIVE, ("Observation/o1",))
    below = observation("o2", "2024-03-10T10:00:00Z", 4.9)
    assert label(below, spec=CRP_SPEC).reason == NO_FOLLOW_UP
    assert label(below, observation("o3", "2024-05-01T10:00:00Z", 1.0), spec=CRP_SPEC).reason == NEGATIVE
    assert label(observation("o4", "2024-02-01T10:00:00Z", 9.0), spec=CRP_SPEC).reason == OUTCOME_BEFORE_SCAN


def test_threshold_rules_count_only_resulted_values_in_the_same_ucum_unit() -> None:
    when = "2024-03-10T10:00:00Z"
    other_unit = observation("o1", when, 50.0, unit="mg/dL")  # 500 mg/L, but units are not converted
    preliminary = observation("o2", when, 9.0, status="preliminary")
    bounded = observation("o3", when, 9.0)
    bounded["valueQuantity"]["comparator"] = ">"
    for resource in (other_unit, preliminary, bounded):
        assert label(resource, spec=CRP_SPEC).reason == NO_FOLLOW_UP, resource["id"]
    for status in ("amended", "corrected"):
        assert label(observation("o4", when, 9.0, status=status), spec=CRP_SPEC).reason == POSITIVE
    by_issued = observation("o5", when, 9.0)
    del by_issued["effectiveDateTime"]
    by_issued["issued"] = "2024-03-11T08:00:00Z"
    assert label(by_issued, spec=CRP_SPEC).onset == datetime(2024, 3, 11, 8, tzinfo=UTC)


def test_date_only_onsets_are_days_in_the_site_zone() -> None:
    # 02:00 UTC on 10 March is still 9 March in New York: a 10 March onset there begins after the scan.
    late_evening = datetime(2024, 3, 10, 2, 0, tzinfo=UTC)
    onset = condition("c1", "2024-03-10")
    decision = label(onset, index=late_evening)
    assert decision.reason == POSITIVE and decision.onset == datetime(2024, 3, 10, 5, tzinfo=UTC)
    assert label(onset, index=late_evening, zone="UTC").reason == OUTCOME_BEFORE_SCAN
    # A date-only onset on the scan's own day counts from its midnight: at or before the scan.
    assert label(condition("c2", "2024-03-01")).reason == OUTCOME_BEFORE_SCAN
    # The index time's own offset does not matter, only the instant.
    assert label(onset, index=late_evening.astimezone(timezone(timedelta(hours=9)))).reason == POSITIVE


def test_a_naive_index_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        label_patient(SPEC, datetime(2024, 3, 1, 10), [], ZONE)


def test_decisions_are_deterministic_and_counted() -> None:
    resources = [condition("b", "2024-06-01T00:00:00Z"), condition("a", "2024-07-01T00:00:00Z")]
    assert label(*resources) == label(*reversed(resources))
    decisions = [label(*resources), label(), label(condition("c1"))]
    assert label_counts(decisions) == {
        POSITIVE: 1,
        NEGATIVE: 0,
        OUTCOME_BEFORE_SCAN: 0,
        NO_FOLLOW_UP: 1,
        OUTCOME_TIME_UNKNOWN: 1,
    }
    assert tuple(label_counts([])) == REASONS
    with pytest.raises(ValueError, match="contradicts"):
        LabelDecision(0, POSITIVE)
    with pytest.raises(ValueError, match="unknown label reason"):
        LabelDecision(None, "maybe")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.yaml"
    path.write_text(text, encoding="utf-8")
    return path


VALID = """\
name: test
version: 1
horizon_days: 90
outcome:
  conditions:
    - {system: "http://snomed.info/sct", code: "363358000"}
"""


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (VALID.replace("version: 1\n", ""), "version: Field required"),
        (VALID + "horizon: 3\n", "horizon: unknown key"),
        (VALID.replace("90", "0"), "horizon_days: Input should be greater than 0"),
        (VALID.replace("version: 1", "version: true"), "version: Input should be a valid integer"),
        (VALID.replace('code: "363358000"', "code: 363358000"), "conditions #1.code: Input should be a valid string"),
        (VALID.replace('code: "363358000"', 'code: "1", prefix: "C"'), "conditions #1: needs exactly one of"),
        (VALID.replace("  conditions:\n    - {", "  conditions: []\n  x: {"), "outcome.x: unknown key"),
        (VALID.split("outcome:")[0] + "outcome: {conditions: []}\n", "outcome: needs at least one rule"),
        (VALID + "negative: {follow_up_resources: [Procedure]}\n", "follow_up_resources #1: Input should be"),
        (VALID + "exclude: {outcome_before_scan: maybe}\n", "outcome_before_scan: Input should be a valid boolean"),
        (VALID + "name: again\n", "not valid YAML at line 7, column 1: key 'name' given twice"),
        ("- a list\n", "a label spec is a mapping"),
        ("", "a label spec is a mapping"),
    ],
)
def test_malformed_spec_files_name_the_file_and_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RuleFileError) as caught:
        load_label_spec(path)
    assert str(caught.value).startswith(f"{path}: ") and problem in str(caught.value)


def test_a_spec_is_loaded_by_path_or_shipped_name(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    assert load_label_spec(str(path)).label == load_label_spec(path).label == "test@1"
    with pytest.raises(RuleFileError, match=r"no shipped label spec 'nope' \(shipped: .*chest_ct"):
        load_label_spec("nope")
    with pytest.raises(RuleFileError, match="label spec not found"):
        load_label_spec(tmp_path / "missing.yaml")
    with pytest.raises(RuleFileError, match=r"observations #1\.unit: Field required"):
        parse_label_spec(
            {
                "name": "x",
                "version": 1,
                "horizon_days": 1,
                "outcome": {"observations": [{"system": LOINC, "code": "1", "comparator": ">", "value": 1.0}]},
            }
        )
