"""The feature spec: loading and its errors, vector order, imputation and mask, modality patterns, and the
minimum-data policy (required features, missing fraction, the validated-pattern AUROC floor) with every reason."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from riskbridge.dev.synth.cohort import COMORBIDITIES, LAB_WINDOW, LABS, NOTE_LOOKBACK
from riskbridge.harmonize.features import (
    PATTERNS,
    FeatureSpecError,
    build_vector,
    decide,
    load_default_feature_spec,
    load_feature_spec,
    modality_pattern,
    parse_feature_spec,
    present_modalities,
    resolve_feature_spec,
)
from riskbridge.harmonize.windows import Policy
from riskbridge.ledger import reason_code
from riskbridge.records import pattern_name

SPEC = load_default_feature_spec()
ALL_VALIDATED = dict.fromkeys(PATTERNS, 0.9)


def test_the_shipped_spec_matches_what_the_synthetic_cohort_truth_assumes() -> None:
    assert SPEC.label == "chest_ct@1"
    assert {lab.name: lab.unit for lab in SPEC.labs} == {name: lab.canonical_unit for name, lab in LABS.items()}
    assert {lab.name: lab.loinc[0] for lab in SPEC.labs} == {name: lab.loinc for name, lab in LABS.items()}
    assert all(lab.window.before == LAB_WINDOW and lab.window.policy is Policy.LATEST_BEFORE for lab in SPEC.labs)
    assert set(SPEC.flags) == set(COMORBIDITIES) and SPEC.note_lookback == NOTE_LOOKBACK
    assert SPEC.lab_for_loinc("32693-4") is not None and SPEC.lab_for_loinc("32693-4").name == "lactate"  # type: ignore[union-attr]


def _all_observed() -> tuple[dict[str, float | None], dict[str, bool | None], dict[str, float | None]]:
    labs: dict[str, float | None] = {lab.name: 1.0 + index for index, lab in enumerate(SPEC.labs)}
    flags: dict[str, bool | None] = {flag: flag == "copd" for flag in SPEC.flags}
    return labs, flags, {"age_years": 71.0, "sex_male": 0.0}


def test_a_complete_patient_is_scored_with_values_in_spec_order() -> None:
    labs, flags, demographics = _all_observed()
    vector = build_vector(SPEC, labs, flags, demographics)
    assert vector.names == SPEC.names and all(vector.observed)
    assert vector.values[: len(SPEC.labs)] == tuple(1.0 + i for i in range(len(SPEC.labs)))
    assert vector.values[SPEC.names.index("copd")] == 1.0 and vector.values[SPEC.names.index("diabetes")] == 0.0
    decision = decide(SPEC, vector, image_available=True, patterns=ALL_VALIDATED)
    assert decision.score and decision.pattern == "image+labs+notes" and decision.pattern_auroc == 0.9


def test_missing_values_are_imputed_and_masked() -> None:
    labs, flags, demographics = _all_observed()
    labs["creatinine"] = None
    labs["crp"] = float("nan")
    vector = build_vector(SPEC, labs, flags, {**demographics, "age_years": None})
    assert vector.missing == ("crp", "creatinine", "age_years")
    assert vector.values[SPEC.names.index("creatinine")] == 0.9 and vector.values[SPEC.names.index("age_years")] == 65
    # No notes at all: every flag is missing, not "absent".
    no_notes = build_vector(SPEC, labs, None, demographics)
    assert set(SPEC.flags) <= set(no_notes.missing)


def test_the_minimum_data_policy_gives_every_reason() -> None:
    spec = parse_feature_spec(
        {**_raw(), "minimum_data": {"require_image": True, "required": ["creatinine"], "max_missing_fraction": 0.2}}
    )
    vector = build_vector(spec, {}, None, {})
    decision = decide(spec, vector, image_available=False, patterns=ALL_VALIDATED)
    assert not decision.score
    assert decision.reasons == (
        "no_image",
        "missing_required:creatinine",
        "too_much_missing:1.00>0.20",
        "pattern_not_validated:none",  # no modality at all is never validated
    )
    assert [reason_code(r) for r in decision.reasons] == [
        "no_image", "missing_required", "too_much_missing", "pattern_not_validated",
    ]  # fmt: skip


def _vector(labs: dict[str, float | None], notes: bool) -> Any:
    flags: dict[str, bool | None] | None = {"copd": True} if notes else None
    return build_vector(SPEC, labs, flags, {"age_years": 70.0, "sex_male": 1.0})


THIN_LABS: dict[str, float | None] = {"wbc": 11.2, "crp": 40.0, "creatinine": 1.3}


def test_patterns_are_named_in_image_labs_notes_order_and_listed_fullest_first() -> None:
    assert PATTERNS == ("image+labs+notes", "image+labs", "image+notes", "image", "labs+notes", "labs", "notes")
    assert pattern_name((True, False, True)) == "image+notes" and pattern_name((False, False, False)) == "none"
    with pytest.raises(ValueError, match="one flag per modality"):
        pattern_name((True, True))
    assert modality_pattern(SPEC, _vector(THIN_LABS, notes=True), image_available=True) == "image+labs+notes"
    assert modality_pattern(SPEC, _vector(THIN_LABS, notes=False), image_available=True) == "image+labs"
    assert modality_pattern(SPEC, _vector({}, notes=True), image_available=True) == "image+notes"
    assert modality_pattern(SPEC, _vector({"lactate": 2.0}, notes=False), image_available=False) == "labs"
    # Age and sex belong to the labs input but alone do not make the labs modality present.
    assert present_modalities(SPEC, _vector({}, notes=False), image_available=True) == (True, False, False)
    from dataclasses import replace

    with pytest.raises(FeatureSpecError, match="chest_ct@1, not chest_ct@2"):
        modality_pattern(replace(SPEC, version=2), _vector(THIN_LABS, notes=True), image_available=True)
    with pytest.raises(FeatureSpecError, match="not chest_ct@2"):
        decide(replace(SPEC, version=2), _vector(THIN_LABS, notes=True), True, patterns=ALL_VALIDATED)


def test_a_thin_ct_with_some_labs_and_no_note_is_scored_when_its_pattern_is_validated() -> None:
    # The cohort that motivated the pattern policy: 11 of 16 features missing, which the old default
    # (max_missing_fraction 0.5) quarantined as too_much_missing although the network scores image+labs.
    vector = _vector(THIN_LABS, notes=False)
    assert vector.missing_fraction > 0.5
    assert SPEC.minimum.pattern_auroc_floor == 0.70 and SPEC.minimum.max_missing_fraction == 1.0
    decision = decide(SPEC, vector, image_available=True, patterns={"image+labs+notes": 0.86, "image+labs": 0.81})
    assert decision.score and decision.reasons == () and decision.pattern == "image+labs"
    assert decision.pattern_auroc == 0.81


@pytest.mark.parametrize(
    ("patterns", "reasons"),
    [
        ({"image+labs": 0.64}, ("pattern_below_floor:image+labs:0.640<0.700",)),
        ({"image+labs": 0.6996}, ("pattern_below_floor:image+labs:0.6996<0.700",)),  # never "0.700<0.700"
        ({"image+labs": 0.70}, ()),  # at the floor is enough
        ({"image+labs+notes": 0.9}, ("pattern_not_validated:image+labs",)),  # another pattern's AUROC does not count
        (None, ("pattern_not_validated:image+labs",)),  # a model without a pattern table validates nothing
    ],
)
def test_the_pattern_floor_quarantines_below_it_and_what_was_never_validated(
    patterns: dict[str, float] | None, reasons: tuple[str, ...]
) -> None:
    decision = decide(SPEC, _vector(THIN_LABS, notes=False), image_available=True, patterns=patterns)
    assert decision.reasons == reasons and decision.score == (not reasons)
    assert decision.pattern == "image+labs"
    assert decision.pattern_auroc == (patterns or {}).get("image+labs")


def test_required_features_and_the_missing_fraction_still_apply_with_the_floor() -> None:
    minimum = {"required": ["creatinine"], "max_missing_fraction": 0.5, "pattern_auroc_floor": 0.8}
    spec = parse_feature_spec({**_raw(), "minimum_data": minimum})
    without_creatinine = _vector({"wbc": 11.2}, notes=False)
    decision = decide(spec, without_creatinine, image_available=True, patterns={"image+labs": 0.75})
    assert decision.reasons == (
        "missing_required:creatinine",
        "too_much_missing:0.81>0.50",  # 13 of 16
        "pattern_below_floor:image+labs:0.750<0.800",
    )
    complete = build_vector(spec, *_all_observed())
    assert decide(spec, complete, image_available=True, patterns={"image+labs+notes": 0.8}).score


def test_a_null_floor_switches_the_pattern_policy_off() -> None:
    spec = parse_feature_spec({**_raw(), "minimum_data": {"require_image": True, "pattern_auroc_floor": None}})
    assert spec.minimum.pattern_auroc_floor is None
    decision = decide(spec, _vector(THIN_LABS, notes=False), image_available=True, patterns=None)
    assert decision.score and decision.pattern == "image+labs" and decision.pattern_auroc is None


def test_minimum_data_defaults_when_a_site_spec_leaves_it_out() -> None:
    raw = _raw()
    del raw["minimum_data"]
    minimum = parse_feature_spec(raw).minimum
    assert (minimum.require_image, minimum.required, minimum.max_missing_fraction) == (True, (), 1.0)
    assert minimum.pattern_auroc_floor == 0.70
    partial = parse_feature_spec({**raw, "minimum_data": {"max_missing_fraction": 0.5}}).minimum
    assert partial.max_missing_fraction == 0.5 and partial.pattern_auroc_floor == 0.70


def test_unknown_feature_names_are_errors_not_missing_values() -> None:
    with pytest.raises(FeatureSpecError, match="no such feature"):
        build_vector(SPEC, {"creatinin": 1.0}, None, {})
    with pytest.raises(FeatureSpecError, match="no such note flag"):
        build_vector(SPEC, {}, {"diabetis": True}, {})


def _raw() -> dict[str, Any]:
    from importlib import resources

    text = resources.files("riskbridge.harmonize").joinpath("data", "features_chest_ct.yaml").read_text()
    return dict(yaml.safe_load(text))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 0}, "version must be a positive integer"),
        (
            {"labs": [{"name": "x", "loinc": [], "unit": "mg/dL", "window": {"before_hours": 1}, "impute": 1}]},
            "lab 'x': loinc must be a non-empty list",
        ),
        (
            {"labs": [{"name": "x", "loinc": ["1-8"], "unit": "mg/dL", "window": {"before_weeks": 1}, "impute": 1}]},
            "unknown window key",
        ),
        (
            {
                "labs": [
                    {
                        "name": "x",
                        "loinc": ["1-8"],
                        "unit": "mg/dL",
                        "window": {"before_hours": 1, "after_hours": 2},
                        "impute": 1,
                    }
                ]
            },
            "latest-before looks only before",
        ),
        (
            {
                "labs": [
                    {
                        "name": "x",
                        "loinc": ["1-8"],
                        "unit": "mg/dL",
                        "window": {"before_hours": 1},
                        "policy": "max",
                        "impute": 1,
                    }
                ]
            },
            "unknown policy 'max'",
        ),
        (
            {"labs": [{"name": "x", "loinc": ["1-8"], "unit": "mg/dL", "window": {"before_hours": 1}}]},
            "lab 'x': expected a number",
        ),
        ({"demographics": [{"name": "height", "impute": 1}]}, "demographic 'height' is not one of"),
        ({"minimum_data": {"required": ["bmi"]}}, "unknown feature"),
        ({"minimum_data": {"required": "creatinine"}}, r"minimum_data\.required: expected a list"),
        ({"minimum_data": {"pattern_auroc_floor": 1.5}}, r"minimum_data\.pattern_auroc_floor must lie in \[0, 1\]"),
        ({"minimum_data": {"pattern_auroc_floor": "high"}}, r"minimum_data\.pattern_auroc_floor: expected a number"),
        ({"minimum_data": {"pattern_auroc_floor": True}}, r"minimum_data\.pattern_auroc_floor: expected a number"),
        ({"minimum_data": {"max_missing_fraction": 2}}, r"minimum_data\.max_missing_fraction must lie in \[0, 1\]"),
        ({"minimum_data": {"require_image": "yes"}}, r"minimum_data\.require_image: expected true or false"),
        ({"minimum_data": {"pattern_floor": 0.7}}, "minimum_data: unknown key.*pattern_floor"),
        ({"minimum_data": [0.7]}, "minimum_data: must be a mapping"),
        ({"colour": "blue"}, "unknown key"),
    ],
)
def test_malformed_specs_name_the_entry(change: dict[str, Any], message: str) -> None:
    with pytest.raises(FeatureSpecError, match=message):
        parse_feature_spec({**_raw(), **change}, "site.yaml")


def test_a_spec_file_round_trips_and_keeps_its_windows(tmp_path: Any) -> None:
    raw = _raw()
    raw["labs"][0]["window"] = {"before_days": 2, "after_hours": 6}
    raw["labs"][0]["policy"] = "nearest"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_feature_spec(path)
    assert (spec.labs[0].window.before, spec.labs[0].window.after) == (timedelta(days=2), timedelta(hours=6))
    with pytest.raises(FeatureSpecError, match="not found"):
        load_feature_spec(tmp_path / "absent.yaml")


def test_resolve_feature_spec_takes_a_shipped_name_or_a_path(tmp_path: Path) -> None:
    assert resolve_feature_spec("chest_ct") == SPEC
    path = tmp_path / "site.yaml"
    path.write_text((Path(__file__).parents[2] / "harmonize/data/features_chest_ct.yaml").read_text())
    assert resolve_feature_spec(str(path)).label == SPEC.label
    with pytest.raises(FeatureSpecError, match="no shipped feature spec"):
        resolve_feature_spec("no_such_spec")
