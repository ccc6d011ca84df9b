"""Unit normalization (riskbridge.harmonize.units): UCUM parsing, rewrites, conversions with hand-checked factors,
censored values, plausibility, the conversion cache, site tables, and the synthetic cohort's ground truth."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from riskbridge.dev.synth import generate, read_truth
from riskbridge.dev.synth.cohort import LABS
from riskbridge.harmonize.units import (
    Conversion,
    Exclusion,
    ExclusionReason,
    NormalizedValue,
    NormalizePolicy,
    UnitTable,
    convert,
    default_table,
    load_table,
    normalize,
    parse_ucum_unit,
)

UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
COHORT_PATIENTS = 20
COHORT_SEED = 11

# Molar masses the hand-checked factors below are derived from (g/mol).
CREATININE = 113.12
GLUCOSE = 180.156
UREA_N2 = 28.0134
BILIRUBIN = 584.67
CHOLESTEROL = 386.66
CALCIUM = 40.078
MAGNESIUM = 24.305


def observation(
    loinc: str,
    value: Any = None,
    unit: str | None = None,
    code: str | None = None,
    *,
    comparator: str | None = None,
    value_string: str | None = None,
    reference_unit: str | None = None,
    observation_id: str = "obs-1",
) -> dict[str, Any]:
    """A FHIR Observation dict as a feed sends it."""
    body: dict[str, Any] = {
        "resourceType": "Observation",
        "id": observation_id,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": loinc}]},
    }
    if value_string is not None:
        body["valueString"] = value_string
    elif value is not None or unit is not None or code is not None:
        quantity: dict[str, Any] = {}
        if value is not None:
            quantity["value"] = value
        if comparator is not None:
            quantity["comparator"] = comparator
        if unit is not None:
            quantity["unit"] = unit
        if code is not None:
            quantity["system"] = UCUM
            quantity["code"] = code
        body["valueQuantity"] = quantity
    if reference_unit is not None:
        body["referenceRange"] = [
            {"high": {"value": 5, "unit": reference_unit, "system": UCUM, "code": reference_unit}}
        ]
    return body


def converted(value: float, unit: str | None, loinc: str, target: str | None = None) -> NormalizedValue:
    result = convert(value, unit, loinc, target=target)
    assert isinstance(result, NormalizedValue), result
    return result


def excluded(result: NormalizedValue | Exclusion) -> Exclusion:
    assert isinstance(result, Exclusion), result
    return result


# --- UCUM parsing ---------------------------------------------------------------------------------------------


def test_k_per_microliter_is_kelvin_in_ucum_so_it_is_rewritten_before_parsing() -> None:
    assert "[temperature]" in parse_ucum_unit("K/uL").dimensionality
    assert default_table().rewrite("K/uL") == "10*3/uL"
    assert converted(6.8, "K/uL", "6690-2").value == pytest.approx(6.8)


# --- conversions with hand-checked factors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "unit", "loinc", "target", "expected"),
    [
        # creatinine mg/dL <-> umol/L: 10 dL/L x 1000 umol/mmol / 113.12 = 88.40 (handbooks: 88.4)
        (1.0, "mg/dL", "2160-0", "umol/L", 1e4 / CREATININE),
        (88.4, "umol/L", "2160-0", None, 88.4 * CREATININE / 1e4),
        (88.4, "\u00b5mol/L", "2160-0", None, 88.4 * CREATININE / 1e4),  # micro sign
        (88.4, "\u03bcmol/L", "2160-0", None, 88.4 * CREATININE / 1e4),  # Greek mu
        (1.2, "mg/dl", "2160-0", None, 1.2),
        (1.2, "mg%", "2160-0", None, 1.2),  # legacy "milligram percent" = mg/dL (ucumvert reads mg x %)
        # glucose mg/dL -> mmol/L: / 18.016
        (100.0, "mg/dL", "2345-7", "mmol/L", 100.0 / 18.0156),
        (5.5, "mmol/L", "2345-7", None, 5.5 * GLUCOSE / 10),
        (5.5, "mmol/L", "2339-0", None, 5.5 * GLUCOSE / 10),
        # BUN mg/dL (as urea nitrogen, 2 N per urea) -> mmol/L urea: x 0.357
        (10.0, "mg/dL", "3094-0", "mmol/L", 10.0 * 10 / UREA_N2),
        # counts: K/uL, x10^9/L, 10^3/uL, /uL, thou/cmm, x10E3/uL are all 10*3/uL
        (6.8, "10*3/uL", "6690-2", None, 6.8),
        (6.8, "x10^9/L", "6690-2", None, 6.8),
        (6.8, "10^3/uL", "6690-2", None, 6.8),
        (6800, "/uL", "6690-2", None, 6.8),
        (6.8, "thou/cmm", "6690-2", None, 6.8),
        (6.8, "x10E3/uL", "6690-2", None, 6.8),
        (250, "K/uL", "777-3", None, 250.0),
        (4.5, "M/uL", "789-8", None, 4.5),
        # equivalents through the valence: Na (1) x 1, Ca (2) x 0.5, Mg (2)
        (140, "mEq/L", "2951-2", None, 140.0),
        (140, "meq/L", "2951-2", None, 140.0),
        (4.2, "mEq/L", "2823-3", None, 4.2),
        (4.6, "mEq/L", "2000-8", None, 2.3),
        (2.3, "mmol/L", "2000-8", "meq/L", 4.6),
        (2.0, "mEq/L", "19123-9", None, 1.0 * MAGNESIUM / 10),  # 1 mmol/L = 24.305 mg/L = 2.4305 mg/dL
        # mass <-> molar for calcium: mg/dL -> mmol/L x 0.2495
        (10.0, "mg/dL", "17861-6", "mmol/L", 10.0 * 10 / CALCIUM),
        (2.5, "mmol/L", "17861-6", None, 2.5 * CALCIUM / 10),
        # hemoglobin
        (138, "g/L", "718-7", None, 13.8),
        (13.8, "g/dl", "718-7", None, 13.8),
        # CRP
        (1.2, "mg/dL", "1988-5", None, 12.0),
        (1.2, "mg/dl", "1988-5", None, 12.0),
        # bilirubin umol/L -> mg/dL: / 17.10
        (17.1, "umol/L", "1975-2", None, 17.1 * BILIRUBIN / 1e4),
        # LDL cholesterol mg/dL -> mmol/L: / 38.67
        (130, "mg/dL", "13457-7", "mmol/L", 130 * 10 / CHOLESTEROL),
        # troponin: ng/mL and pg/mL -> ng/L
        (0.04, "ng/mL", "10839-9", None, 40.0),
        (14, "pg/mL", "67151-1", None, 14.0),
        (450, "pg/mL", "33762-6", None, 450.0),
        # enzymes: 1 ukat/L = 60 U/L; IU/L means U/L for an enzyme
        (0.5, "ukat/L", "1742-6", None, 30.0),
        (40, "IU/L", "1920-8", None, 40.0),
        # fractions: a hematocrit of 0.45 L/L is 45 %
        (0.45, "L/L", "4544-3", None, 45.0),
        # eGFR per 1.73 m2 as labs write it
        (72, "mL/min/1.73m2", "62238-1", None, 72.0),
        (72, "mL/min/{1.73_m2}", "98979-8", None, 72.0),
        # lactate: mEq/L with valence 1; mg/dL through lactic acid (90.08)
        (2.1, "mEq/L", "2524-7", None, 2.1),
        (18.0, "mg/dL", "32693-4", None, 18.0 * 10 / 90.08),
        # HbA1c stays in its own scale
        (6.5, "%", "4548-4", None, 6.5),
        (48, "mmol/mol", "59261-8", None, 48.0),
    ],
)
def test_conversion_factors(value: float, unit: str, loinc: str, target: str | None, expected: float) -> None:
    result = converted(value, unit, loinc, target)
    assert result.value == pytest.approx(expected, rel=1e-9)
    assert result.unit == (target or default_table().codes[loinc].unit)


def test_handbook_factors_agree_with_the_molar_masses() -> None:
    assert converted(1.0, "mg/dL", "2160-0", "umol/L").value == pytest.approx(88.42, rel=1e-3)
    assert converted(100.0, "mg/dL", "2345-7", "mmol/L").value * 18.016 == pytest.approx(100.0, rel=1e-4)
    assert converted(1.0, "mg/dL", "3094-0", "mmol/L").value == pytest.approx(0.357, rel=1e-3)
    assert converted(10.0, "mg/dL", "17861-6", "mmol/L").value == pytest.approx(2.495, rel=1e-3)
    assert converted(1.0, "mg/dL", "1975-2", "umol/L").value == pytest.approx(17.1, rel=1e-3)
    assert converted(1.0, "g/dL", "718-7", "mmol/L").value == pytest.approx(0.6206, rel=1e-3)


def test_conversion_records_what_the_factor_relies_on() -> None:
    table = default_table()

    def via(unit: str, loinc: str, target: str | None = None) -> str:
        conversion = table.conversion(unit, loinc, target)
        assert isinstance(conversion, Conversion), conversion
        return conversion.via

    assert via("mg/dL", "2160-0") == "same"
    assert via("g/L", "718-7") == "scale"
    assert via("umol/L", "2160-0") == "molar_mass"
    assert via("mEq/L", "2000-8") == "valence"
    assert via("mg/dL", "17861-6", "meq/L") == "molar_mass+valence"


def test_the_synthetic_cohorts_codes_and_spellings_convert_with_its_factors() -> None:
    table = default_table()
    for spec in LABS.values():
        for loinc in (spec.loinc, *(code for code, _ in spec.alt_loinc)):
            assert table.codes[loinc].unit == spec.canonical_unit, loinc
            for spelling in spec.spellings:
                for unit in (spelling.unit, spelling.code):
                    if unit is None:
                        continue
                    conversion = table.conversion(unit, loinc)
                    assert isinstance(conversion, Conversion), (loinc, unit, conversion)
                    assert conversion.factor == pytest.approx(spelling.factor, rel=1e-9), (loinc, unit)


# --- policies: HbA1c, unknown and incompatible units --------------------------------------------------------------


def test_hba1c_ngsp_and_ifcc_are_different_scales_not_units() -> None:
    ngsp_as_ifcc = excluded(convert(48, "mmol/mol", "4548-4"))
    assert ngsp_as_ifcc.reason is ExclusionReason.UNIT_INCOMPATIBLE
    assert excluded(convert(6.5, "%", "59261-8")).reason is ExclusionReason.UNIT_INCOMPATIBLE


def test_unknown_unit_is_excluded_never_guessed() -> None:
    for unit in ("furlong", "mmol//L", "units", "mg/dL?", "10x3/uL"):
        result = excluded(convert(5.0, unit, "2160-0"))
        assert result.reason is ExclusionReason.UNIT_UNKNOWN, unit
        assert result.raw_unit == unit and result.loinc == "2160-0"
        assert unit in result.detail


def test_incompatible_units_are_excluded() -> None:
    assert excluded(convert(5.0, "mg/dL", "6690-2")).reason is ExclusionReason.UNIT_INCOMPATIBLE
    assert excluded(convert(6.8, "K/uL", "2160-0")).reason is ExclusionReason.UNIT_INCOMPATIBLE
    assert excluded(convert(1.0, "mg", "2345-7")).reason is ExclusionReason.UNIT_INCOMPATIBLE
    assert excluded(convert(1.0, "mEq", "2951-2")).reason is ExclusionReason.UNIT_INCOMPATIBLE
    # pint sees [IU] as a plain number; it must not pass for a cell count
    iu = excluded(convert(5.0, "[IU]/L", "6690-2"))
    assert iu.reason is ExclusionReason.UNIT_INCOMPATIBLE and "arbitrary" in iu.detail
    # the enzyme alias is scoped to enzymes: IU/L for CRP is not UCUM
    assert excluded(convert(5.0, "IU/L", "1988-5")).reason is ExclusionReason.UNIT_UNKNOWN


def test_missing_molar_mass_is_named_in_the_reason(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "analytes:\n  myoglobin: {}\ncodes:\n  '2639-9': {analyte: myoglobin, unit: ng/mL, plausible: [0, 100000]}\n",
        encoding="utf-8",
    )
    table = load_table(site)
    result = excluded(table.convert(3.0, "nmol/L", "2639-9"))
    assert result.reason is ExclusionReason.UNIT_INCOMPATIBLE and "molar_mass" in result.detail


def test_unknown_loinc() -> None:
    assert excluded(convert(1.0, "mg/dL", "0000-0")).reason is ExclusionReason.LOINC_UNKNOWN
    no_loinc = {"resourceType": "Observation", "code": {"coding": [{"system": "http://local", "code": "CREA"}]}}
    assert excluded(normalize(no_loinc)).reason is ExclusionReason.LOINC_UNKNOWN


def test_unit_missing_and_unit_when_missing() -> None:
    assert excluded(convert(1.0, None, "2160-0")).reason is ExclusionReason.UNIT_MISSING
    assert excluded(convert(1.0, "  ", "2160-0")).reason is ExclusionReason.UNIT_MISSING
    inr = converted(1.3, None, "6301-6")
    assert inr.value == pytest.approx(1.3) and inr.unit == "{INR}"
    assert converted(1.3, "INR", "6301-6").value == pytest.approx(1.3)


# --- rewrite table ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "ucum"),
    [
        ("K/uL", "10*3/uL"),
        ("  K/uL ", "10*3/uL"),
        ("K/\u00b5L", "10*3/uL"),  # pattern (micro sign), then exact again
        ("x10^9/L", "10*9/L"),
        ("x10E3/uL", "10*3/uL"),
        ("\u00d710^9/L", "10*9/L"),
        ("10E9/L", "10*9/L"),
        ("thou/cmm", "10*3/mm3"),
        ("mEq/L", "meq/L"),
        ("uEq/L", "ueq/L"),
        ("\u00b5mol/L", "umol/L"),
        ("mcg/L", "ug/L"),
        ("mg / dL", "mg/dL"),
        ("MG/DL", "mg/dL"),
        ("mL/min/1.73 m2", "mL/min/{1.73_m2}"),
        ("percent", "%"),
        ("mg/dL", "mg/dL"),  # valid UCUM passes unchanged
        ("%", "%"),
    ],
)
def test_rewrites(spelling: str, ucum: str) -> None:
    assert default_table().rewrite(spelling) == ucum


def test_every_rewrite_target_is_ucum() -> None:
    table = default_table()
    for spelling, ucum in table.exact_rewrites.items():
        parse_ucum_unit(ucum)  # raises on a typo in the table
        assert table.rewrite(spelling) == ucum


def test_analyte_aliases_apply_only_to_their_analyte() -> None:
    table = default_table()
    assert table.rewrite("IU/L", table.codes["1742-6"].analyte) == "U/L"
    assert table.rewrite("IU/L", table.codes["1988-5"].analyte) == "IU/L"


# --- Observations: value forms, comparators, unit sources ----------------------------------------------------------


def test_normalize_a_value_quantity() -> None:
    result = normalize(observation("2160-0", 97, "\u00b5mol/L", "umol/L", observation_id="obs-7"))
    assert isinstance(result, NormalizedValue)
    assert result.value == pytest.approx(97 * CREATININE / 1e4)
    assert (result.unit, result.loinc, result.analyte, result.observation_id) == (
        "mg/dL",
        "2160-0",
        "creatinine",
        "obs-7",
    )
    assert (result.raw_value, result.raw_unit, result.censored) == (97, "umol/L", None)


def test_a_ucum_code_that_is_really_k_per_microliter_is_rewritten_too() -> None:
    result = normalize(observation("6690-2", 7.1, "K/uL", "K/uL"))
    assert isinstance(result, NormalizedValue) and result.value == pytest.approx(7.1)


def test_comparator_less_than_uses_the_limit_by_default() -> None:
    result = normalize(observation("2524-7", 0.5, "mmol/L", "mmol/L", comparator="<"))
    assert isinstance(result, NormalizedValue)
    assert (result.value, result.censored) == (pytest.approx(0.5), "<")
    above = normalize(observation("62238-1", 90, "mL/min/1.73m2", comparator=">="))
    assert isinstance(above, NormalizedValue) and above.censored == ">="


def test_comparator_exclude_policy_and_ad() -> None:
    exclude = NormalizePolicy(censored="exclude")
    censored = excluded(normalize(observation("2524-7", 0.5, "mmol/L", "mmol/L", comparator="<"), policy=exclude))
    assert censored.reason is ExclusionReason.COMPARATOR and censored.observation_id == "obs-1"
    ad = excluded(normalize(observation("2524-7", 0.5, "mmol/L", "mmol/L", comparator="ad")))
    assert ad.reason is ExclusionReason.COMPARATOR


def test_value_string_with_comparator_takes_the_reference_range_unit() -> None:
    result = normalize(observation("1988-5", value_string="<5", reference_unit="mg/L"))
    assert isinstance(result, NormalizedValue)
    assert (result.value, result.unit, result.censored, result.raw_unit) == (pytest.approx(5.0), "mg/L", "<", "mg/L")
    # the range in mg/dL: the value is read in mg/dL
    in_mg_dl = normalize(observation("1988-5", value_string="<0.5", reference_unit="mg/dL"))
    assert isinstance(in_mg_dl, NormalizedValue) and in_mg_dl.value == pytest.approx(5.0)


def test_value_string_without_any_unit_is_excluded() -> None:
    assert excluded(normalize(observation("1988-5", value_string="<5"))).reason is ExclusionReason.UNIT_MISSING
    no_range_unit = NormalizePolicy(unit_from_reference_range=False)
    with_range = observation("1988-5", value_string="<5", reference_unit="mg/L")
    assert excluded(normalize(with_range, policy=no_range_unit)).reason is ExclusionReason.UNIT_MISSING


def test_value_string_forms() -> None:
    glucose = normalize(observation("2345-7", value_string="7.2 mmol/L"))
    assert isinstance(glucose, NormalizedValue) and glucose.value == pytest.approx(7.2 * GLUCOSE / 10)
    egfr = normalize(observation("62238-1", value_string="\u2265 60 mL/min/1.73m2"))
    assert isinstance(egfr, NormalizedValue) and (egfr.value, egfr.censored) == (pytest.approx(60.0), ">=")
    for text in ("negative", "1,200", "see note", "", "5..2"):
        result = excluded(normalize(observation("1988-5", value_string=text, reference_unit="mg/L")))
        assert result.reason is ExclusionReason.VALUE_UNPARSEABLE, text


def test_no_value() -> None:
    assert excluded(normalize(observation("2160-0"))).reason is ExclusionReason.NO_VALUE
    assert excluded(normalize(observation("2160-0", None, "mg/dL", "mg/dL"))).reason is ExclusionReason.NO_VALUE
    absent = observation("2160-0")
    absent["dataAbsentReason"] = {"coding": [{"code": "error"}]}
    result = excluded(normalize(absent))
    assert result.reason is ExclusionReason.NO_VALUE and "error" in result.detail
    coded = observation("2160-0")
    coded["valueCodeableConcept"] = {"text": "hemolyzed"}
    assert excluded(normalize(coded)).reason is ExclusionReason.NO_VALUE
    assert excluded(normalize(observation("2160-0", "1.2", "mg/dL"))).reason is ExclusionReason.VALUE_UNPARSEABLE


def test_the_first_loinc_coding_the_table_knows_is_used() -> None:
    body = observation("2160-0", 1.1, "mg/dL", "mg/dL")
    body["code"]["coding"] = [
        {"system": "http://local", "code": "2345-7"},
        {"system": LOINC, "code": "9999-9"},
        {"system": LOINC, "code": "2160-0"},
    ]
    result = normalize(body)
    assert isinstance(result, NormalizedValue) and result.loinc == "2160-0"


def test_code_and_text_that_disagree_are_a_conflict() -> None:
    result = excluded(normalize(observation("2345-7", 5.5, "mmol/L", "mg/dL")))
    assert result.reason is ExclusionReason.UNIT_CONFLICT
    incompatible_text = excluded(normalize(observation("6690-2", 6.8, "mg/dL", "10*3/uL")))
    assert incompatible_text.reason is ExclusionReason.UNIT_CONFLICT


def test_free_display_text_does_not_override_the_code() -> None:
    result = normalize(observation("6690-2", 6.8, "thousand per microliter", "10*3/uL"))
    assert isinstance(result, NormalizedValue) and result.raw_unit == "10*3/uL"


def test_unreadable_code_falls_back_to_the_text_and_non_ucum_systems_are_ignored() -> None:
    unreadable = normalize(observation("6690-2", 6.8, "x10^9/L", "GIGA/L"))
    assert isinstance(unreadable, NormalizedValue) and unreadable.raw_unit == "x10^9/L"
    local = observation("2160-0", 1.1, "mg/dL")
    local["valueQuantity"].update(system="http://local-units", code="XYZ")
    result = normalize(local)
    assert isinstance(result, NormalizedValue) and result.raw_unit == "mg/dL"


# --- plausibility -------------------------------------------------------------------------------------------------


def test_implausible_values_are_excluded_with_the_range() -> None:
    sodium_typo = excluded(convert(14, "mmol/L", "2951-2"))
    assert sodium_typo.reason is ExclusionReason.IMPLAUSIBLE and "[80, 200]" in sodium_typo.detail
    # a count sent per uL under a 10*3/uL label: 1000x off
    assert excluded(convert(6800, "10*3/uL", "6690-2")).reason is ExclusionReason.IMPLAUSIBLE
    assert excluded(convert(-1.0, "mg/dL", "2160-0")).reason is ExclusionReason.IMPLAUSIBLE
    # judged in the canonical unit even when another target is asked for
    assert excluded(convert(5000, "umol/L", "2160-0", target="umol/L")).reason is ExclusionReason.IMPLAUSIBLE


def test_plausibility_bounds_are_inclusive() -> None:
    assert converted(80, "mmol/L", "2951-2").value == 80
    assert converted(200, "mmol/L", "2951-2").value == 200
    assert excluded(convert(200.001, "mmol/L", "2951-2")).reason is ExclusionReason.IMPLAUSIBLE


def test_non_finite_values_are_unparseable() -> None:
    for value in (math.nan, math.inf):
        assert excluded(convert(value, "mg/dL", "2160-0")).reason is ExclusionReason.VALUE_UNPARSEABLE


# --- cache --------------------------------------------------------------------------------------------------------


def test_conversions_are_cached_per_unit_target_and_analyte() -> None:
    table = UnitTable.from_files()
    assert table.cached_conversions() == 0
    first = table.conversion("mmol/L", "2345-7")
    assert table.conversion("mmol/L", "2345-7") is first
    # another LOINC code of the same analyte and canonical unit shares the conversion
    assert table.conversion("mmol/L", "2339-0") is first
    assert table.cached_conversions() == 1
    # another target is another conversion
    other_target = table.conversion("mmol/L", "2345-7", "g/L")
    assert other_target is not first and table.cached_conversions() == 2
    # failures are cached too
    unknown = table.conversion("furlong", "2345-7")
    assert isinstance(unknown, Exclusion) and table.conversion("furlong", "2345-7") is unknown
    # another analyte with the same unit pair is another entry (its molar mass differs)
    creatinine = table.conversion("mmol/L", "2160-0")
    assert isinstance(creatinine, Conversion) and isinstance(first, Conversion)
    assert creatinine.factor != first.factor


def test_default_table_is_loaded_once() -> None:
    assert default_table() is default_table()


# --- table files ---------------------------------------------------------------------------------------------------


def test_a_site_table_adds_and_overrides(tmp_path: Path) -> None:
    site = tmp_path / "site_units.yaml"
    site.write_text(
        """
analytes:
  urate: {molar_mass: 168.11}
codes:
  "3084-1": {analyte: urate, unit: mg/dL, plausible: [0.5, 30], display: "Urate [Mass/volume] in Serum or Plasma"}
  "2951-2": {analyte: sodium, unit: mmol/L, plausible: [100, 180]}
exact:
  "mmol/Ltr": "mmol/L"
patterns:
  - {match: "^umol/lit$", replace: "umol/L"}
""",
        encoding="utf-8",
    )
    table = load_table(site)
    urate = table.convert(357, "umol/lit", "3084-1")
    assert isinstance(urate, NormalizedValue) and urate.value == pytest.approx(357 * 168.11 / 1e4)
    assert excluded(table.convert(95, "mmol/L", "2951-2")).reason is ExclusionReason.IMPLAUSIBLE
    assert isinstance(table.convert(140, "mmol/Ltr", "2951-2"), NormalizedValue)
    assert isinstance(table.convert(1.0, "mg/dL", "2160-0"), NormalizedValue)  # defaults still there
    assert table.sources[-1] == str(site)
    assert isinstance(default_table().convert(95, "mmol/L", "2951-2"), NormalizedValue)


# --- ground truth: the synthetic cohort -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """(Observation resources by id from the cohort's FHIR bundles, ground-truth records)."""
    out = tmp_path_factory.mktemp("units") / "cohort"
    generate(out, patients=COHORT_PATIENTS, seed=COHORT_SEED, workers=1)
    resources: dict[str, dict[str, Any]] = {}
    for path in sorted((out / "fhir").glob("p*.json")):
        bundle = json.loads(path.read_text(encoding="utf-8"))
        for entry in bundle["entry"]:
            if entry["resource"]["resourceType"] == "Observation":
                resources[entry["resource"]["id"]] = entry["resource"]
    return resources, read_truth(out)


def test_every_expected_canonical_value_is_reproduced(
    cohort: tuple[dict[str, dict[str, Any]], list[dict[str, Any]]],
) -> None:
    observations, truth = cohort
    table = default_table()
    checked = censored = implausible = 0
    spellings: set[str | None] = set()
    for record in truth:
        for expected in record["lab_observations"]:
            result = normalize(observations[expected["id"]])
            spellings.add(expected["raw"]["unit"])
            checked += 1
            if isinstance(result, Exclusion):
                # The generator's multiplicative noise puts some unused sodium results beyond any analyzer's range
                # (e.g. 211 mmol/L): their exclusion must be for exactly that reason, and never hit a used value.
                assert result.reason is ExclusionReason.IMPLAUSIBLE, (expected, result)
                assert expected["disposition"] != "used", expected
                assert not table.codes[expected["loinc"]].is_plausible(expected["canonical_value"]), expected
                implausible += 1
                continue
            # the table's molar masses are the generator's, so only float rounding separates the two
            assert result.value == pytest.approx(expected["canonical_value"], rel=1e-6, abs=1e-6), expected
            assert result.unit == LABS[expected["feature"]].canonical_unit
            assert result.observation_id == expected["id"]
        for feature, used in record["labs"].items():
            if used is None:
                continue
            result = normalize(observations[used["observation_id"]])
            assert isinstance(result, NormalizedValue)
            assert result.value == pytest.approx(used["value"], rel=1e-6, abs=1e-6), feature
            assert result.censored == used["censored"]
            censored += used["censored"] is not None
    # the check is not vacuous: the cohort mixes spellings and plants censored values
    assert checked > 100 and implausible <= checked // 50
    assert censored >= 1
    assert {"K/uL", "/uL", "umol/L", "\u00b5mol/L", "mEq/L", "meq/L", "mmol/l", "mg/dl", None} <= spellings


def test_planted_bad_values_are_excluded_with_reasons(
    cohort: tuple[dict[str, dict[str, Any]], list[dict[str, Any]]],
) -> None:
    # The cohort's feed has no bad units (its traps are status and time); plant them in copies of its Observations.
    observations, _ = cohort
    quantities = [o for o in observations.values() if "valueQuantity" in o and "comparator" not in o["valueQuantity"]]
    assert quantities
    plants = {
        ExclusionReason.UNIT_UNKNOWN: lambda q: q.update(unit="furlongs", code="furlongs"),
        ExclusionReason.UNIT_INCOMPATIBLE: lambda q: q.update(unit="s", code="s", system=UCUM),
        ExclusionReason.UNIT_CONFLICT: lambda q: q.update(unit="[IU]/L", system=UCUM),
        ExclusionReason.IMPLAUSIBLE: lambda q: q.update(value=q["value"] * 1e6),
        ExclusionReason.NO_VALUE: lambda q: q.pop("value"),
        ExclusionReason.UNIT_MISSING: lambda q: [q.pop(key, None) for key in ("unit", "code", "system")],
    }
    for reason, plant in plants.items():
        for original in quantities:
            corrupted = json.loads(json.dumps(original))
            if reason is ExclusionReason.UNIT_CONFLICT:  # a valid UCUM code, and a text that says otherwise
                corrupted["valueQuantity"]["code"] = default_table().codes[corrupted["code"]["coding"][0]["code"]].unit
            plant(corrupted["valueQuantity"])
            result = normalize(corrupted)
            assert isinstance(result, Exclusion), (reason, corrupted)
            assert result.reason is reason, (reason, result)
            assert result.observation_id == original["id"]
            assert result.loinc is not None and result.detail


# --- site variants of the feature spec's analytes ------------------------------------------------------------------

# Every LOINC variant the table carries for an analyte of the chest CT feature spec besides the spec's own codes:
# (code, the spec feature it is a variant of, a typical value in a typical site unit, the value in the feature's unit).
LACTIC_ACID = 90.08
HEMOGLOBIN_HAEM = 16114.5
SPEC_VARIANTS = [
    # leukocytes: manual count and estimate, reported per uL or as x10^9/L
    ("804-5", "wbc", 7.2, "x10^9/L", 7.2),
    ("49498-9", "wbc", 6500, "/uL", 6.5),
    # CRP: high-sensitivity in blood (mg/dL from some analyzers), capillary point of care
    ("71426-1", "crp", 0.45, "mg/dL", 4.5),
    ("48421-2", "crp", 12, "mg/L", 12.0),
    # creatinine: blood and arterial (mass), blood, venous and any specimen (molar)
    ("38483-4", "creatinine", 97, "umol/L", 97 * CREATININE / 1e4),
    ("21232-4", "creatinine", 1.1, "mg/dL", 1.1),
    ("59826-8", "creatinine", 88.4, "\u00b5mol/L", 88.4 * CREATININE / 1e4),
    ("101475-2", "creatinine", 0.11, "mmol/L", 110 * CREATININE / 1e4),
    ("77140-2", "creatinine", 1.0, "mg/dL", 1.0),
    # glucose: point of care, capillary, arterial, venous, any specimen, fasting; mmol/L and mg/dL
    ("41653-7", "glucose", 5.5, "mmol/L", 5.5 * GLUCOSE / 10),
    ("14743-9", "glucose", 5.5, "mmol/L", 5.5 * GLUCOSE / 10),
    ("32016-8", "glucose", 99, "mg/dL", 99.0),
    ("51596-5", "glucose", 7.2, "mmol/l", 7.2 * GLUCOSE / 10),
    ("2340-8", "glucose", 120, "mg/dl", 120.0),
    ("2341-6", "glucose", 6.1, "mmol/L", 6.1 * GLUCOSE / 10),
    ("72516-8", "glucose", 4.8, "mmol/L", 4.8 * GLUCOSE / 10),
    ("41651-1", "glucose", 140, "mg/dL", 140.0),
    ("39481-7", "glucose", 8.0, "mmol/L", 8.0 * GLUCOSE / 10),
    ("41652-9", "glucose", 1.05, "g/L", 105.0),
    ("39480-9", "glucose", 5.0, "mmol/L", 5.0 * GLUCOSE / 10),
    ("74774-1", "glucose", 95, "mg/dL", 95.0),
    ("77135-2", "glucose", 5.5, "mmol/L", 5.5 * GLUCOSE / 10),
    ("1558-6", "glucose", 92, "mg/dL", 92.0),
    ("14771-0", "glucose", 5.1, "mmol/L", 5.1 * GLUCOSE / 10),
    # hemoglobin: blood gas and oximetry in g/L, molar (per haem) in mmol/L
    ("20509-6", "hemoglobin", 13.2, "g/dL", 13.2),
    ("55782-7", "hemoglobin", 128, "g/L", 12.8),
    ("30313-1", "hemoglobin", 135, "g/L", 13.5),
    ("30350-3", "hemoglobin", 12.9, "g/dL", 12.9),
    ("30351-1", "hemoglobin", 11.8, "g/dL", 11.8),
    ("30352-9", "hemoglobin", 14.1, "g/dL", 14.1),
    ("59260-0", "hemoglobin", 8.4, "mmol/L", 8.4 * HEMOGLOBIN_HAEM / 1e4),
    ("75928-2", "hemoglobin", 8.0, "mmol/L", 8.0 * HEMOGLOBIN_HAEM / 1e4),
    ("93846-4", "hemoglobin", 7.6, "mmol/L", 7.6 * HEMOGLOBIN_HAEM / 1e4),
    # lactate: blood gas specimens in mmol/L or mEq/L, mass codes in mg/dL
    ("2518-9", "lactate", 1.4, "mmol/L", 1.4),
    ("2519-7", "lactate", 2.2, "mEq/L", 2.2),
    ("19240-1", "lactate", 1.8, "mmol/L", 1.8),
    ("19239-3", "lactate", 18, "mg/dL", 18 * 10 / LACTIC_ACID),
    ("14118-4", "lactate", 13.5, "mg/dL", 13.5 * 10 / LACTIC_ACID),
    ("59032-3", "lactate", 2.0, "mmol/L", 2.0),
    # sodium: blood gas and point-of-care analyzers, mEq/L (valence 1)
    ("32717-1", "sodium", 138, "mmol/L", 138.0),
    ("39791-9", "sodium", 141, "mEq/L", 141.0),
    ("41657-8", "sodium", 137, "mmol/L", 137.0),
    ("39792-7", "sodium", 139, "meq/L", 139.0),
    ("77139-4", "sodium", 140, "mmol/L", 140.0),
]


@pytest.mark.parametrize(("loinc", "feature", "value", "unit", "expected"), SPEC_VARIANTS)
def test_spec_analyte_variants_load_and_convert_to_the_features_unit(
    loinc: str, feature: str, value: float, unit: str, expected: float
) -> None:
    from riskbridge.harmonize.features import load_default_feature_spec

    table = default_table()
    lab = next(lab for lab in load_default_feature_spec().labs if lab.name == feature)
    entry = table.entry(loinc)
    assert entry is not None and entry.display, loinc
    assert loinc not in lab.loinc  # a variant: whether the spec reads it is a site decision
    assert entry.analyte is table.codes[lab.loinc[0]].analyte  # the same analyte, so the same constants
    result = normalize(observation(loinc, value, unit), table=table)
    assert isinstance(result, NormalizedValue), result
    assert result.unit == entry.unit
    assert converted(result.value, result.unit, loinc, target=lab.unit).value == pytest.approx(expected, rel=1e-9)


def test_spec_variants_cover_every_variant_in_the_table() -> None:
    # A code added to the table for a spec analyte gets a row above (and thus a conversion check).
    from riskbridge.harmonize.features import load_default_feature_spec

    table = default_table()
    spec = load_default_feature_spec()
    analytes = {table.codes[code].analyte.name for lab in spec.labs for code in lab.loinc}
    spec_codes = {code for lab in spec.labs for code in lab.loinc}
    variants = {code for code, entry in table.codes.items() if entry.analyte.name in analytes} - spec_codes
    already = {"26464-8", "30522-7", "14682-9", "2339-0", "14749-6", "15074-8", "2947-0"}  # before issue 14
    assert variants - already == {row[0] for row in SPEC_VARIANTS}


def test_a_variant_value_outside_the_plausible_range_is_excluded() -> None:
    # 5.5 sent as mg/dL on a glucometer code reads as 5.5 mg/dL: below 10 mg/dL, a unit error, not a patient
    assert excluded(normalize(observation("41653-7", 5.5, "mg/dL"))).reason is ExclusionReason.IMPLAUSIBLE
    # a hemoglobin of 135 g/L labelled mmol/L on the molar code: above 15.5 mmol/L (25 g/dL)
    assert isinstance(normalize(observation("59260-0", 135, "g/L")), NormalizedValue)
    assert excluded(normalize(observation("59260-0", 135, "mmol/L"))).reason is ExclusionReason.IMPLAUSIBLE
    # a lactate in mg/dL on a mass code is judged in mg/dL: 400 mg/dL is 44 mmol/L, above 40 mmol/L
    assert excluded(normalize(observation("14118-4", 400, "mg/dL"))).reason is ExclusionReason.IMPLAUSIBLE
