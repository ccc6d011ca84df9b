"""UCUM units read strictly (ucumvert) into riskbridge's own pint registry, where equivalents are their own dimension.

Plain pint reads ``10*3/uL`` as 30/uL; ucumvert parses UCUM's grammar. :func:`parse_ucum_unit` raises for a text
that is not UCUM, :func:`ucum_quantity` returns the reason instead (cached: parsing costs about a millisecond).
No rewriting happens here (``K/uL`` is kelvin per microliter); feed spellings are rewritten to UCUM by the unit
table first (:mod:`riskbridge.harmonize.units`). The registry and the grammar are built once per process.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["PURE_NUMBER_UNITS", "arbitrary_units", "parse_ucum_unit", "ucum_quantity"]

# pint units that are pure numbers: a factor, not a kind of thing. Every other dimensionless unit ([IU], [arb'U])
# is an arbitrary unit that converts only into itself. (Annotations such as {cells} never reach pint.)
PURE_NUMBER_UNITS = frozenset({"_10", "percent", "dimensionless"})


@lru_cache(maxsize=1)
def _ucum_machinery() -> tuple[Any, Any, Any]:
    """(pint registry, ucumvert parser, ucumvert transformer), built once: the grammar alone costs ~40 ms.

    The registry is our own, not pint's application registry (ucumvert's ``PintUcumRegistry.from_ucum`` would
    return quantities of the application registry, which must not be mixed with another registry's). It loads
    ucumvert's UCUM definitions with one change: equivalents get their own base dimension, so ``meq/L`` cannot
    silently become ``mmol/L`` (correct only for valence 1); the valence bridges them.
    """
    import pint
    import ucumvert
    from ucumvert import UcumToPintTransformer, get_ucum_parser

    definitions = (Path(ucumvert.__file__).parent / "pint_ucum_defs.txt").read_text(encoding="utf-8")
    ucumvert_equivalents = "equivalents = mol = eq"
    if ucumvert_equivalents not in definitions:
        # A ucumvert release that changed this line needs a look: refusing beats converting mEq wrongly.
        raise RuntimeError(f"ucumvert's pint definitions no longer contain {ucumvert_equivalents!r}")
    definitions = definitions.replace(ucumvert_equivalents, "equivalents = [equivalents] = eq")

    class _UcumRegistry(pint.UnitRegistry):
        def _after_init(self) -> None:
            super()._after_init()
            self._build_cache(self.load_definitions(definitions.splitlines()))

    registry = _UcumRegistry()
    return registry, get_ucum_parser(), UcumToPintTransformer(ureg=registry)


@lru_cache(maxsize=4096)
def ucum_quantity(ucum: str) -> Any:
    """The pint quantity (magnitude 1 x unit) of a strict UCUM string, or the error text when it is not UCUM."""
    from lark.exceptions import LarkError
    from pint.errors import PintError
    from ucumvert import parse_ucum

    registry, parser, transformer = _ucum_machinery()
    try:
        quantity = transformer.transform(parse_ucum(ucum, parser))
    except (LarkError, PintError, ValueError, TypeError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"not UCUM: {first_line}"
    if not isinstance(quantity, registry.Quantity):
        # An annotation alone ("{INR}") or a bare number is a pure number: the annotation names what is counted.
        quantity = registry.Quantity(1, "dimensionless")
    return quantity


def parse_ucum_unit(ucum: str) -> Any:
    """Parse a strict UCUM unit into a pint quantity of riskbridge's registry (magnitude 1).

    Raises ValueError when ``ucum`` is not UCUM. No rewriting happens here: ``K/uL`` is kelvin per microliter.
    """
    parsed = ucum_quantity(ucum)
    if isinstance(parsed, str):
        raise ValueError(f"{ucum!r}: {parsed}")
    return parsed


def arbitrary_units(quantity: Any) -> dict[str, float]:
    """The arbitrary (dimensionless but not pure-number) units of a quantity with their exponents: [IU], ..."""
    registry = quantity._REGISTRY
    found: dict[str, float] = {}
    for name, exponent in quantity.unit_items():
        if name not in PURE_NUMBER_UNITS and not registry.get_dimensionality(name):
            found[name] = exponent
    return found
