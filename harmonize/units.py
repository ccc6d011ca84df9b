"""Lab values in the unit the model expects: a canonical UCUM unit per LOINC code, and the conversion into it.

The model learned every lab feature in one unit; feeds send the same analyte as ``mg/dL``, ``umol/L``, ``K/uL``,
``x10^9/L``, ``mEq/L`` or ``<5``. This module turns one FHIR Observation (a plain dict: this is a hot path) into a
:class:`NormalizedValue` in the canonical unit of its LOINC code, or an :class:`Exclusion` with a stable reason
code (:class:`ExclusionReason`). A value is never guessed: a unit that cannot be read is excluded, not assumed.

How a unit is read:

1. **Rewrite** real-world spellings to UCUM first (``K/uL`` -> ``10*3/uL``: ``K/uL`` is valid UCUM for kelvin
   per microliter), from ``harmonize/data/unit_rewrites.yaml`` plus the analyte's own aliases.
2. **Parse** strict UCUM with ucumvert into pint (plain pint reads ``10*3/uL`` as 30/uL). Equivalents are their
   own dimension here (ucumvert defines ``eq`` as ``mol``, right only for valence 1).
3. **Convert** to the canonical unit: directly when the dimensions agree, mass <-> amount of substance through
   the analyte's molar mass, equivalents <-> moles through its valence. Dimensionless units (``%``, ``mmol/mol``,
   ``{INR}``) convert into each other only when the analyte lists them, and UCUM's arbitrary units (``[IU]``)
   only into themselves, because pint sees all of them as plain numbers.
4. **Check** the canonical value against the code's plausibility range.

Parsing costs about a millisecond, so each :class:`Conversion` is cached per (unit, target unit, analyte) in the
:class:`UnitTable`; a cached lookup is a dict access. :func:`default_table` loads the package's tables once;
:func:`load_table` adds a site's own table file. docs/units.md documents the table format and every policy.

The table files (their format, validation and :class:`UnitTableError`) are read by
:mod:`riskbridge.harmonize.unit_table`, and UCUM text is parsed by :mod:`riskbridge.harmonize.ucum`; this module
converts and normalizes values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from riskbridge.harmonize.ucum import arbitrary_units, parse_ucum_unit, ucum_quantity
from riskbridge.harmonize.unit_table import (
    Analyte,
    LoincUnit,
    RewriteRule,
    UnitTableError,
    parse_table_documents,
    read_table_documents,
)

UCUM_SYSTEM = "http://unitsofmeasure.org"
LOINC_SYSTEM = "http://loinc.org"

# FHIR R4 Quantity.comparator values that mean "the true value lies beyond this limit".
CENSORING_COMPARATORS = frozenset({"<", "<=", ">", ">="})
# A numeric valueString as labs send it: an optional comparator, a number, an optional unit ("<5", ">= 60 mL/min").
# A decimal comma is not accepted: "1,200" could be 1.2 or 1200, and a value is never guessed.
VALUE_STRING = re.compile(r"^\s*(<=|>=|<|>|\u2264|\u2265)?\s*([+-]?(?:\d+(?:\.\d+)?|\.\d+))(?![\d.,])\s*(.*?)\s*$")
UNICODE_COMPARATORS = {"\u2264": "<=", "\u2265": ">="}
# Relative difference under which two readings of one value's unit (UCUM code vs display text) agree.
FACTOR_TOLERANCE = 1e-9
# Bound on cached conversions per table: feeds use a few dozen spellings, but a broken one could send free text.
CONVERSION_CACHE_LIMIT = 20_000


class ExclusionReason(StrEnum):
    """Why a value was not normalized. The codes are stable: they are stored in the ledger and counted in reports."""

    NO_VALUE = "no_value"  # no valueQuantity.value / valueString / valueInteger (dataAbsentReason, coded result)
    VALUE_UNPARSEABLE = "value_unparseable"  # a valueString that is not a number ("negative", "1,200", "see note")
    LOINC_UNKNOWN = "loinc_unknown"  # no LOINC coding, or none of its LOINC codes is in the table
    UNIT_MISSING = "unit_missing"  # a number with no unit, and the code declares no unit_when_missing
    UNIT_UNKNOWN = "unit_unknown"  # the unit is not UCUM after the rewrites
    UNIT_INCOMPATIBLE = "unit_incompatible"  # UCUM, but not convertible to the canonical unit for this analyte
    UNIT_CONFLICT = "unit_conflict"  # the UCUM code and the unit text say different things
    COMPARATOR = "comparator"  # a censored value ("<5") under the exclude policy, or the comparator "ad"
    IMPLAUSIBLE = "implausible"  # outside the code's plausibility range in the canonical unit


@dataclass(frozen=True, slots=True)
class Conversion:
    """How values in one unit spelling become values in a target unit for one analyte: ``value * factor``."""

    source_unit: str  # the spelling as the feed sent it
    ucum: str  # the UCUM unit it was read as, after the rewrites
    target_unit: str
    analyte: str
    factor: float
    via: str  # "same", "scale", "molar_mass", "valence" or "molar_mass+valence": what the factor relies on

    def apply(self, value: float) -> float:
        """``value`` in the target unit."""
        return value * self.factor


@dataclass(frozen=True, slots=True)
class NormalizedValue:
    """A lab value in the target (by default the canonical) unit of its LOINC code."""

    value: float
    unit: str
    loinc: str
    analyte: str
    raw_value: float
    raw_unit: str | None  # the unit spelling the conversion used (UCUM code or text); None when implied
    censored: str | None = None  # the comparator of a censored value ("<", "<=", ">", ">="): value is the limit
    factor: float = 1.0
    observation_id: str | None = None


@dataclass(frozen=True, slots=True)
class Exclusion:
    """A value that was not normalized, with a stable reason code and a human-readable detail."""

    reason: ExclusionReason
    detail: str
    loinc: str | None = None
    observation_id: str | None = None
    raw_value: Any = None
    raw_unit: str | None = None


@dataclass(frozen=True, slots=True)
class NormalizePolicy:
    """How :func:`normalize` treats censored values and values without a unit.

    ``censored="limit"`` (default) uses the detection limit as the value and records the comparator in
    :attr:`NormalizedValue.censored` (``<5`` becomes 5 with ``censored="<"``): the value carries the information
    that the result is low, which a missing value would lose, and the comparator lets the feature stage treat it
    differently. ``censored="exclude"`` excludes such values with the reason ``comparator``. The comparator
    ``ad`` ("sufficient to achieve this total") is always excluded.

    ``unit_from_reference_range`` (default on): a number without a unit (typically a valueString such as ``<5``)
    takes the unit of the Observation's referenceRange when all its low/high bounds state one and the same unit;
    the lab reports result and range in one unit. Off: such a value is excluded as ``unit_missing`` unless the
    LOINC entry declares ``unit_when_missing``.
    """

    censored: Literal["limit", "exclude"] = "limit"
    unit_from_reference_range: bool = True


DEFAULT_POLICY = NormalizePolicy()


# --- the table ----------------------------------------------------------------------------------------------


class UnitTable:
    """Canonical units per LOINC code, analyte constants and the unit rewrite rules, with a conversion cache.

    Build it with :func:`default_table` (the package's tables, loaded once) or :func:`load_table` /
    :meth:`from_files` (a site's own files on top). The table is immutable after construction; only its
    conversion cache grows. Conversions are computed lazily, on first use of a (unit, target, analyte).
    """

    def __init__(
        self,
        codes: Mapping[str, LoincUnit],
        exact_rewrites: Mapping[str, str],
        pattern_rewrites: Iterable[RewriteRule],
        sources: Iterable[str] = (),
    ) -> None:
        """A table from parsed entries; :meth:`from_files` reads them from YAML."""
        self.codes: dict[str, LoincUnit] = dict(codes)
        self.exact_rewrites: dict[str, str] = dict(exact_rewrites)
        self.pattern_rewrites: tuple[RewriteRule, ...] = tuple(pattern_rewrites)
        self.sources: tuple[str, ...] = tuple(sources)
        self._conversions: dict[tuple[str, str, str], Conversion | Exclusion] = {}

    # -- loading -----------------------------------------------------------------------------------------

    @classmethod
    def from_files(cls, *paths: str | Path, include_defaults: bool = True) -> UnitTable:
        """Load table files in order; later files add entries and override earlier ones of the same key.

        Each file may hold ``analytes``, ``codes``, ``exact`` and ``patterns`` (docs/units.md). With
        ``include_defaults`` the package's tables come first, so a site file holds only what it adds or
        changes. A later file's patterns run before earlier files' patterns (the site's rules win).
        """
        return cls._from_documents(read_table_documents(paths, include_defaults=include_defaults))

    @classmethod
    def _from_documents(cls, documents: list[tuple[str, Any]]) -> UnitTable:
        contents = parse_table_documents(documents)
        return cls(contents.codes, contents.exact_rewrites, contents.pattern_rewrites, sources=contents.sources)

    # -- lookups -----------------------------------------------------------------------------------------

    def entry(self, loinc: str) -> LoincUnit | None:
        """The table entry of a LOINC code, or None when the table does not know it."""
        return self.codes.get(loinc)

    def rewrite(self, unit: str, analyte: Analyte | None = None) -> str:
        """The UCUM text a feed's unit spelling is read as: analyte aliases, exact rewrites, then patterns."""
        text = unit.strip()
        if analyte is not None and (own := analyte.alias(text)) is not None:
            return own
        if text in self.exact_rewrites:
            return self.exact_rewrites[text]
        for rule in self.pattern_rewrites:
            text = rule.pattern.sub(rule.replacement, text)
        if analyte is not None and (own := analyte.alias(text)) is not None:
            return own
        return self.exact_rewrites.get(text, text)

    def conversion(self, unit: str, loinc: str, target: str | None = None) -> Conversion | Exclusion:
        """How to convert values in ``unit`` (a feed's spelling) for ``loinc`` into ``target`` (default: canonical).

        Cached per (unit, target, analyte): the same object comes back for every LOINC code of that analyte.
        An Exclusion (unknown LOINC or unit, incompatible unit) is cached too.
        """
        entry = self.codes.get(loinc)
        if entry is None:
            return Exclusion(ExclusionReason.LOINC_UNKNOWN, f"LOINC {loinc} is not in the unit table", loinc=loinc)
        key = (unit, target or entry.unit, entry.analyte.name)  # names are unique within a table
        cached = self._conversions.get(key)
        if cached is None:
            cached = self._compute_conversion(unit, key[1], entry.analyte)
            if len(self._conversions) < CONVERSION_CACHE_LIMIT:
                self._conversions[key] = cached
        return cached

    def _compute_conversion(self, unit: str, target: str, analyte: Analyte) -> Conversion | Exclusion:
        ucum = self.rewrite(unit, analyte)
        source_quantity = ucum_quantity(ucum)
        if isinstance(source_quantity, str):
            shown = f"{unit!r}" if ucum == unit else f"{unit!r} (rewritten {ucum!r})"
            return Exclusion(ExclusionReason.UNIT_UNKNOWN, f"{shown} is {source_quantity}", raw_unit=unit)
        target_quantity = ucum_quantity(target)
        if isinstance(target_quantity, str):
            return Exclusion(ExclusionReason.UNIT_UNKNOWN, f"target unit {target!r} is {target_quantity}")

        def incompatible(why: str) -> Exclusion:
            return Exclusion(
                ExclusionReason.UNIT_INCOMPATIBLE,
                f"{unit!r} ({ucum}) -> {target} for {analyte.name}: {why}",
                raw_unit=unit,
            )

        if not (source_quantity._is_multiplicative and target_quantity._is_multiplicative):
            return incompatible("offset units (temperatures) are not supported")
        if arbitrary_units(source_quantity) != arbitrary_units(target_quantity):
            return incompatible("arbitrary units convert only into themselves")
        if target_quantity.dimensionless and ucum != target:
            allowed = analyte.dimensionless_units
            if ucum not in allowed or target not in allowed:
                return incompatible(
                    "dimensionless units of different kinds (the analyte's dimensionless_units do not list both)"
                )
        if source_quantity.dimensionality == target_quantity.dimensionality:
            factor = float((source_quantity / target_quantity).to("dimensionless").magnitude)
            return Conversion(unit, ucum, target, analyte.name, factor, "same" if factor == 1.0 else "scale")
        source_dimensions = _substance_dimensionality(source_quantity)
        target_dimensions = _substance_dimensionality(target_quantity)
        if source_dimensions != target_dimensions:
            return incompatible(f"dimensions {source_quantity.dimensionality} vs {target_quantity.dimensionality}")
        try:
            source_substance, source_via = _as_substance(source_quantity, analyte)
            target_substance, target_via = _as_substance(target_quantity, analyte)
        except _MissingConstant as missing:
            return incompatible(f"needs the analyte's {missing}, which the table does not give")
        factor = float((source_substance / target_substance).to("dimensionless").magnitude)
        via = "+".join(sorted(source_via | target_via))
        return Conversion(unit, ucum, target, analyte.name, factor, via)

    def cached_conversions(self) -> int:
        """How many (unit, target, analyte) conversions the table has cached so far."""
        return len(self._conversions)

    # -- values ------------------------------------------------------------------------------------------

    def convert(
        self,
        value: float,
        unit: str | None,
        loinc: str,
        *,
        target: str | None = None,
        censored: str | None = None,
    ) -> NormalizedValue | Exclusion:
        """Convert one value to ``target`` (default: the code's canonical unit), checking plausibility.

        ``unit`` is a feed's spelling (rewritten before parsing); None uses the code's ``unit_when_missing``
        or excludes the value as ``unit_missing``. Plausibility is judged in the canonical unit whatever the
        target. ``censored`` is passed through to the result (see :class:`NormalizePolicy`).
        """
        entry = self.codes.get(loinc)
        if entry is None:
            return Exclusion(ExclusionReason.LOINC_UNKNOWN, f"LOINC {loinc} is not in the unit table", loinc=loinc)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return Exclusion(
                ExclusionReason.VALUE_UNPARSEABLE, f"not a finite number: {value!r}", loinc, raw_value=value
            )
        return self._convert(entry, float(value), unit, target, censored, None)

    def _convert(
        self,
        entry: LoincUnit,
        value: float,
        unit: str | None,
        target: str | None,
        censored: str | None,
        observation_id: str | None,
    ) -> NormalizedValue | Exclusion:
        loinc = entry.loinc
        if unit is None or not unit.strip():
            if entry.unit_when_missing is None:
                return Exclusion(ExclusionReason.UNIT_MISSING, "the value has no unit", loinc, observation_id, value)
            unit = entry.unit_when_missing
        canonical = self.conversion(unit, loinc)
        if isinstance(canonical, Exclusion):
            return replace(canonical, loinc=loinc, observation_id=observation_id, raw_value=value, raw_unit=unit)
        canonical_value = value * canonical.factor
        if not entry.is_plausible(canonical_value):
            return Exclusion(
                ExclusionReason.IMPLAUSIBLE,
                f"{canonical_value:g} {entry.unit} outside [{entry.plausible_low:g}, {entry.plausible_high:g}]"
                f" for {entry.analyte.name}",
                loinc,
                observation_id,
                value,
                unit,
            )
        chosen = canonical
        if target is not None and target != entry.unit:
            converted = self.conversion(unit, loinc, target)
            if isinstance(converted, Exclusion):
                return replace(converted, loinc=loinc, observation_id=observation_id, raw_value=value, raw_unit=unit)
            chosen = converted
        return NormalizedValue(
            value=value * chosen.factor,
            unit=chosen.target_unit,
            loinc=loinc,
            analyte=entry.analyte.name,
            raw_value=value,
            raw_unit=unit,
            censored=censored,
            factor=chosen.factor,
            observation_id=observation_id,
        )

    def normalize(
        self, observation: Mapping[str, Any], policy: NormalizePolicy = DEFAULT_POLICY
    ) -> NormalizedValue | Exclusion:
        """One FHIR Observation (a plain dict) to its value in the canonical unit of its LOINC code, or why not.

        Reads ``valueQuantity`` (value, comparator, UCUM code, unit text), ``valueString`` (``"<5"``,
        ``"7.2 mmol/L"``) or ``valueInteger``. The UCUM ``code`` (system http://unitsofmeasure.org) is
        authoritative; the ``unit`` text is used when there is no code or the code is not UCUM even after the
        rewrites, and a unit text that reads as a different unit than the code excludes the value
        (``unit_conflict``). Status and time are not judged here (that is the time-window stage).
        """
        observation_id = observation.get("id")
        entry = self._entry_of(observation)
        if entry is None:
            return Exclusion(
                ExclusionReason.LOINC_UNKNOWN,
                f"no LOINC code of the table among {loinc_codes(observation) or 'no LOINC coding'}",
                observation_id=observation_id,
            )
        loinc = entry.loinc
        value, comparator, code, text, problem = _read_value(observation)
        if problem is not None:
            return replace(problem, loinc=loinc, observation_id=observation_id)
        assert value is not None  # _read_value returns a value or a problem
        censored = None
        if comparator is not None:
            if comparator not in CENSORING_COMPARATORS:
                return Exclusion(
                    ExclusionReason.COMPARATOR, f"comparator {comparator!r}", loinc, observation_id, value, code or text
                )
            if policy.censored == "exclude":
                return Exclusion(
                    ExclusionReason.COMPARATOR,
                    f"censored value {comparator}{value:g} excluded by policy",
                    loinc,
                    observation_id,
                    value,
                    code or text,
                )
            censored = comparator
        if code is None and text is None and policy.unit_from_reference_range:
            code, text = _reference_range_unit(observation)
        unit = self._choose_unit(code, text, loinc)
        if isinstance(unit, Exclusion):
            return replace(unit, loinc=loinc, observation_id=observation_id, raw_value=value)
        return self._convert(entry, value, unit, None, censored, observation_id)

    def _entry_of(self, observation: Mapping[str, Any]) -> LoincUnit | None:
        for loinc in loinc_codes(observation):
            entry = self.codes.get(loinc)
            if entry is not None:
                return entry
        return None

    def _choose_unit(self, code: str | None, text: str | None, loinc: str) -> str | Exclusion | None:
        """The spelling to convert from: the UCUM code unless it is unreadable; a disagreeing text excludes."""
        if code is None:
            return text
        by_code = self.conversion(code, loinc)
        if isinstance(by_code, Exclusion):
            if by_code.reason is ExclusionReason.UNIT_UNKNOWN and text is not None:
                return text  # not UCUM even after the rewrites: the display text may still be readable
            return by_code
        if text is None or text == code:
            return code
        by_text = self.conversion(text, loinc)
        if isinstance(by_text, Conversion):
            if math.isclose(by_text.factor, by_code.factor, rel_tol=FACTOR_TOLERANCE):
                return code
        elif by_text.reason is ExclusionReason.UNIT_UNKNOWN:
            return code  # free display text ("thousand per microliter"): the code decides
        return Exclusion(
            ExclusionReason.UNIT_CONFLICT,
            f"UCUM code {code!r} and unit text {text!r} disagree",
            raw_unit=f"{code} | {text}",
        )


class _MissingConstant(Exception):
    """A dimension bridge needs a molar mass or valence the analyte does not have."""


def _substance_dimensionality(quantity: Any) -> dict[str, float]:
    """The quantity's dimensions with mass and equivalents counted as amount of substance (what a bridge reaches)."""
    merged: dict[str, float] = {}
    for dimension, exponent in quantity.dimensionality.items():
        key = "[substance]" if dimension in ("[mass]", "[equivalents]") else dimension
        merged[key] = merged.get(key, 0) + exponent
    return {dimension: exponent for dimension, exponent in merged.items() if exponent}


def _as_substance(quantity: Any, analyte: Analyte) -> tuple[Any, set[str]]:
    """``quantity`` with its mass and equivalents dimensions expressed as amount of substance of the analyte.

    mass^k becomes substance^k through the molar mass, equivalents^k through the valence; what was bridged is
    returned so a Conversion can say what its factor relies on.
    """
    registry = quantity._REGISTRY
    dimensions = quantity.dimensionality
    used: set[str] = set()
    mass_exponent = dimensions.get("[mass]", 0)
    if mass_exponent:
        if analyte.molar_mass is None:
            raise _MissingConstant("molar_mass")
        quantity = quantity * (registry.Quantity(1.0 / analyte.molar_mass, "mol/g") ** mass_exponent)
        used.add("molar_mass")
    equivalents_exponent = dimensions.get("[equivalents]", 0)
    if equivalents_exponent:
        if analyte.valence is None:
            raise _MissingConstant("valence")
        quantity = quantity * (registry.Quantity(1.0 / analyte.valence, "mol/eq") ** equivalents_exponent)
        used.add("valence")
    return quantity, used


# --- reading Observation dicts ------------------------------------------------------------------------------


def loinc_codes(observation: Mapping[str, Any]) -> list[str]:
    """The LOINC codes of an Observation dict's ``code`` (codings of other systems left out)."""
    code = observation.get("code") or {}
    return [
        coding["code"]
        for coding in code.get("coding") or ()
        if coding.get("system") == LOINC_SYSTEM and isinstance(coding.get("code"), str)
    ]


def _read_value(
    observation: Mapping[str, Any],
) -> tuple[float | None, str | None, str | None, str | None, Exclusion | None]:
    """(value, comparator, UCUM code, unit text, problem) of an Observation's value[x]."""
    quantity = observation.get("valueQuantity")
    if quantity is not None:
        value = quantity.get("value")
        code = quantity.get("code") if quantity.get("system") == UCUM_SYSTEM else None
        text = quantity.get("unit")
        unit_shown = code or text
        if value is None:
            return (
                None,
                None,
                None,
                None,
                Exclusion(ExclusionReason.NO_VALUE, "valueQuantity has no value", raw_unit=unit_shown),
            )
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            problem = Exclusion(ExclusionReason.VALUE_UNPARSEABLE, f"valueQuantity.value {value!r}", raw_value=value)
            return None, None, None, None, problem
        return float(value), quantity.get("comparator"), _blank_to_none(code), _blank_to_none(text), None
    if "valueString" in observation:
        raw = observation["valueString"]
        match = VALUE_STRING.match(raw) if isinstance(raw, str) else None
        if match is None:
            problem = Exclusion(
                ExclusionReason.VALUE_UNPARSEABLE, f"valueString {raw!r} is not a number", raw_value=raw
            )
            return None, None, None, None, problem
        comparator = UNICODE_COMPARATORS.get(match[1], match[1]) if match[1] else None
        return float(match[2]), comparator, None, _blank_to_none(match[3]), None
    if "valueInteger" in observation and not isinstance(observation["valueInteger"], bool):
        return float(observation["valueInteger"]), None, None, None, None
    absent = (observation.get("dataAbsentReason") or {}).get("coding") or [{}]
    why = absent[0].get("code")
    detail = f"no numeric value (dataAbsentReason {why})" if why else "no numeric value"
    return None, None, None, None, Exclusion(ExclusionReason.NO_VALUE, detail)


def _blank_to_none(text: Any) -> str | None:
    return text.strip() or None if isinstance(text, str) else None


def _reference_range_unit(observation: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(UCUM code, unit text) stated by every bound of the referenceRange, or (None, None) when they differ."""
    seen: set[tuple[str | None, str | None]] = set()
    for reference_range in observation.get("referenceRange") or ():
        for bound in ("low", "high"):
            quantity = reference_range.get(bound)
            if quantity:
                code = quantity.get("code") if quantity.get("system") == UCUM_SYSTEM else None
                seen.add((_blank_to_none(code), _blank_to_none(quantity.get("unit"))))
    if len(seen) != 1:
        return None, None
    return seen.pop()


# --- module-level API ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def default_table() -> UnitTable:
    """The package's unit table (loinc_units.yaml + unit_rewrites.yaml), loaded once per process."""
    return UnitTable.from_files()


def load_table(path: str | Path) -> UnitTable:
    """A site's table file on top of the package's tables (its entries add to and override the defaults)."""
    return UnitTable.from_files(path)


def convert(
    value: float, unit: str | None, loinc: str, *, target: str | None = None, table: UnitTable | None = None
) -> NormalizedValue | Exclusion:
    """Convert ``value`` in ``unit`` (any spelling) for ``loinc`` to ``target`` (default: canonical)."""
    return (table or default_table()).convert(value, unit, loinc, target=target)


def normalize(
    observation: Mapping[str, Any], *, table: UnitTable | None = None, policy: NormalizePolicy = DEFAULT_POLICY
) -> NormalizedValue | Exclusion:
    """One FHIR Observation dict to its canonical value or an Exclusion (see :meth:`UnitTable.normalize`)."""
    return (table or default_table()).normalize(observation, policy)


__all__ = [
    "DEFAULT_POLICY",
    "Analyte",
    "Conversion",
    "Exclusion",
    "ExclusionReason",
    "LoincUnit",
    "NormalizePolicy",
    "NormalizedValue",
    "RewriteRule",
    "UnitTable",
    "UnitTableError",
    "convert",
    "default_table",
    "load_table",
    "normalize",
    "parse_ucum_unit",
]
