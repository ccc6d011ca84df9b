"""The comorbidity rule file (riskbridge.harmonize.notes_rule_file): invalid documents are refused, and the packaged
file defines every flag the issue and the synthetic cohort need, and codes map to flags."""

from __future__ import annotations

from typing import Any

import pytest

from riskbridge.harmonize.notes_rule_file import RuleFileError, load_rules, parse_rules


def minimal_rules(**overrides: Any) -> dict[str, Any]:
    """A valid one-flag rule document, with top-level keys replaced by ``overrides``."""
    document: dict[str, Any] = {
        "version": 1,
        "flags": {"copd": {"historical_counts": True, "targets": ["copd"]}},
        "context_rules": [],
    }
    document.update(overrides)
    return document


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"version": 2}, "version 2"),
        ({"flags": {}}, "at least one flag"),
        ({"flags": {"copd": {"historical_counts": True}}}, "missing 'targets'"),
        ({"flags": {"copd": {"historical_counts": True, "targets": ["copd"], "colour": 1}}}, "unknown keys"),
        ({"context_rules": [{"literal": "x", "category": "MAYBE", "direction": "FORWARD"}]}, "category"),
        ({"context_rules": [{"literal": "x", "category": "FAMILY", "direction": "SIDEWAYS"}]}, "direction"),
        (
            {"context_rules": [{"literal": "x", "category": "FAMILY", "direction": "FORWARD", "allowed_types": ["y"]}]},
            "allowed_types",
        ),
    ],
)
def test_invalid_rule_documents_are_rejected(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(RuleFileError, match=message):
        parse_rules(minimal_rules(**overrides))


def test_packaged_rules_cover_the_cohort_and_the_issue() -> None:
    names = set(load_rules().flag_names)
    issue_flags = {"diabetes", "copd", "heart_failure", "ckd", "smoking", "immunosuppression", "prior_malignancy"}
    cohort_flags = {"hypertension", "prior_mi"}
    assert issue_flags | cohort_flags <= names


def test_a_code_matches_its_flag_by_snomed_or_icd10_prefix() -> None:
    copd = load_rules().flag("copd")
    assert copd.matches_code("icd10cm", "j44.9") and copd.matches_code("icd10cm", "J449")
    assert copd.matches_code("snomed", "13645005") and not copd.matches_code("snomed", "1364500")
    assert not copd.matches_code("icd10cm", "E11.9")
