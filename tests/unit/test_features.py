"""The feature spec: loading and its errors, vector order, imputation and mask, and the minimum-data policy."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from riskbridge.harmonize.features import (
    FeatureSpecError,
    build_vector,
    decide,
    load_default_feature_spec,
    load_feature_spec,
    parse_feature_spec,
    resolve_feature_spec,
)
from riskbridge.harmonize.windows import Policy
from riskbridge.synth.cohort import COMORBIDITIES, LAB_WINDOW, LABS, NOTE_LOOKBACK

SPEC = load_default_feature_spec()


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
    assert decide(SPEC, vector, image_available=True).score


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
    decision = decide(spec, vector, image_available=False)
    assert not decision.score
    assert decision.reasons == ("no_image", "missing_required:creatinine", "too_much_missing:1.00>0.20")


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
