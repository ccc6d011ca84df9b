"""UCUM parsing (riskbridge.harmonize.ucum): strict UCUM where plain pint misreads, equivalents kept apart from
moles, and text that is not UCUM refused (or its reason returned)."""

from __future__ import annotations

import pint
import pytest

from riskbridge.harmonize.ucum import arbitrary_units, parse_ucum_unit, ucum_quantity


def test_plain_pint_misreads_ten_to_the_third_and_ucum_parsing_does_not() -> None:
    # The reason for ucumvert: pint evaluates "10*3" as the arithmetic 10 x 3.
    assert pint.UnitRegistry().parse_expression("10*3/uL").to("1/uL").magnitude == pytest.approx(30.0)
    assert parse_ucum_unit("10*3/uL").to("1/uL").magnitude == pytest.approx(1000.0)
    assert parse_ucum_unit("10^3/uL").to("1/uL").magnitude == pytest.approx(1000.0)
    assert parse_ucum_unit("10*9/L").to("1/uL").magnitude == pytest.approx(1000.0)


def test_equivalents_are_their_own_dimension_not_moles() -> None:
    # ucumvert defines eq = mol; riskbridge's registry keeps them apart so the valence is never skipped.
    dimensions = parse_ucum_unit("meq/L").dimensionality
    assert "[equivalents]" in dimensions and "[substance]" not in dimensions


def test_parse_ucum_unit_rejects_non_ucum() -> None:
    with pytest.raises(ValueError, match="not UCUM"):
        parse_ucum_unit("mEq/L")


def test_ucum_quantity_returns_the_reason_instead_of_raising_and_is_cached() -> None:
    reason = ucum_quantity("mEq/L")
    assert isinstance(reason, str) and reason.startswith("not UCUM")
    assert ucum_quantity("mg/dL") is ucum_quantity("mg/dL")


def test_arbitrary_units_are_the_dimensionless_units_that_are_not_pure_numbers() -> None:
    assert arbitrary_units(parse_ucum_unit("[IU]/L"))
    assert not arbitrary_units(parse_ucum_unit("%"))
    assert not arbitrary_units(parse_ucum_unit("mmol/L"))
