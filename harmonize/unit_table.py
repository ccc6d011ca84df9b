"""The unit table's files: canonical UCUM unit and plausibility range per LOINC code, analyte constants, rewrites.

The package ships ``data/loinc_units.yaml`` (analytes and codes) and ``data/unit_rewrites.yaml`` (real-world
spellings to UCUM); a site adds its own file on top. :func:`read_table_documents` reads them in order and
:func:`parse_table_documents` validates and merges them into :class:`TableContents` (later files add entries and
override earlier ones of the same key; a later file's patterns run first). Table units are strict UCUM, checked
when the table loads; a malformed file raises :class:`UnitTableError` naming the file and the entry.
:class:`~riskbridge.harmonize.units.UnitTable` is built from the result. docs/units.md documents the format.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from riskbridge.errors import ConfigurationError
from riskbridge.harmonize.ucum import ucum_quantity

__all__ = [
    "PACKAGE_TABLES",
    "Analyte",
    "LoincUnit",
    "RewriteRule",
    "TableContents",
    "UnitTableError",
    "parse_table_documents",
    "read_table_documents",
]

PACKAGE_TABLES = ("loinc_units.yaml", "unit_rewrites.yaml")


class UnitTableError(ConfigurationError, ValueError):
    """A unit table file is malformed: names the file and the entry."""


@dataclass(frozen=True, slots=True)
class Analyte:
    """What is measured, shared by all LOINC codes of it: the constants that bridge dimensions."""

    name: str
    molar_mass: float | None = None  # g/mol: mass <-> amount of substance
    valence: int | None = None  # charge per particle: equivalents <-> moles
    dimensionless_units: frozenset[str] = frozenset()  # UCUM units of this analyte that convert into each other
    unit_aliases: tuple[tuple[str, str], ...] = ()  # (spelling, UCUM) rewritten for this analyte only

    def alias(self, unit: str) -> str | None:
        """The analyte's own rewrite of ``unit``, or None."""
        for spelling, ucum in self.unit_aliases:
            if spelling == unit:
                return ucum
        return None


@dataclass(frozen=True, slots=True)
class LoincUnit:
    """One LOINC code's entry: its analyte, canonical UCUM unit and plausibility range (in that unit)."""

    loinc: str
    analyte: Analyte
    unit: str
    plausible_low: float | None = None
    plausible_high: float | None = None
    unit_when_missing: str | None = None
    display: str = ""

    def is_plausible(self, canonical_value: float) -> bool:
        """Whether a value in the canonical unit lies inside the inclusive plausibility range."""
        if self.plausible_low is not None and canonical_value < self.plausible_low:
            return False
        return not (self.plausible_high is not None and canonical_value > self.plausible_high)


@dataclass(frozen=True, slots=True)
class RewriteRule:
    """A regular-expression rewrite of unit text (``re.sub`` over the whole text)."""

    pattern: re.Pattern[str]
    replacement: str


@dataclass(frozen=True, slots=True)
class TableContents:
    """The validated, merged entries of one or more table files, in the form :class:`UnitTable` takes them."""

    codes: dict[str, LoincUnit]
    exact_rewrites: dict[str, str]
    pattern_rewrites: list[RewriteRule]
    sources: list[str]


def read_table_documents(paths: Iterable[str | Path], include_defaults: bool = True) -> list[tuple[str, Any]]:
    """(source, parsed YAML) of each table file in order; with ``include_defaults`` the package's tables first."""
    documents: list[tuple[str, Any]] = []
    if include_defaults:
        package = resources.files("riskbridge.harmonize") / "data"
        for name in PACKAGE_TABLES:
            documents.append(
                (f"riskbridge.harmonize/data/{name}", yaml.safe_load(package.joinpath(name).read_text("utf-8")))
            )
    for path in paths:
        documents.append((str(path), yaml.safe_load(Path(path).read_text(encoding="utf-8"))))
    return documents


def parse_table_documents(documents: list[tuple[str, Any]]) -> TableContents:
    """Validate and merge parsed table files (see the module docstring); :class:`UnitTableError` names the entry."""
    analyte_specs: dict[str, tuple[str, dict[str, Any]]] = {}
    code_specs: dict[str, tuple[str, dict[str, Any]]] = {}
    exact: dict[str, str] = {}
    patterns: list[RewriteRule] = []
    for source, document in documents:
        if document is None:
            continue
        if not isinstance(document, dict):
            raise UnitTableError(f"{source}: a unit table is a mapping, got {type(document).__name__}")
        unknown = set(document) - {"version", "analytes", "codes", "exact", "patterns"}
        if unknown:
            raise UnitTableError(f"{source}: unknown top-level keys {sorted(unknown)}")
        for name, spec in (document.get("analytes") or {}).items():
            analyte_specs[str(name)] = (source, spec or {})
        for loinc, spec in (document.get("codes") or {}).items():
            code_specs[str(loinc)] = (source, spec or {})
        for spelling, ucum in (document.get("exact") or {}).items():
            exact[str(spelling).strip()] = str(ucum)
        own_patterns = []
        for number, rule in enumerate(document.get("patterns") or [], start=1):
            try:
                own_patterns.append(RewriteRule(re.compile(rule["match"]), str(rule["replace"])))
            except (KeyError, TypeError, re.error) as error:
                raise UnitTableError(f"{source}: pattern {number}: {error}") from error
        patterns = own_patterns + patterns
    analytes = {name: _analyte(name, source, spec) for name, (source, spec) in analyte_specs.items()}
    codes = {loinc: _code_entry(loinc, source, spec, analytes) for loinc, (source, spec) in code_specs.items()}
    return TableContents(codes, exact, patterns, sources=[source for source, _ in documents])


def _analyte(name: str, source: str, spec: Any) -> Analyte:
    if not isinstance(spec, dict):
        raise UnitTableError(f"{source}: analyte {name}: expected a mapping")
    unknown = set(spec) - {"molar_mass", "valence", "dimensionless_units", "unit_aliases", "note"}
    if unknown:
        raise UnitTableError(f"{source}: analyte {name}: unknown keys {sorted(unknown)}")
    molar_mass = spec.get("molar_mass")
    if molar_mass is not None and (not isinstance(molar_mass, int | float) or molar_mass <= 0):
        raise UnitTableError(f"{source}: analyte {name}: molar_mass must be a positive number (g/mol)")
    valence = spec.get("valence")
    if valence is not None and (not isinstance(valence, int) or isinstance(valence, bool) or valence <= 0):
        raise UnitTableError(f"{source}: analyte {name}: valence must be a positive integer (charge magnitude)")
    dimensionless = frozenset(str(unit) for unit in spec.get("dimensionless_units") or ())
    for unit in dimensionless:
        _require_ucum(unit, f"{source}: analyte {name}: dimensionless unit")
    aliases = tuple((str(spelling).strip(), str(ucum)) for spelling, ucum in (spec.get("unit_aliases") or {}).items())
    for _, ucum in aliases:
        _require_ucum(ucum, f"{source}: analyte {name}: alias target")
    return Analyte(name, float(molar_mass) if molar_mass is not None else None, valence, dimensionless, aliases)


def _code_entry(loinc: str, source: str, spec: Any, analytes: Mapping[str, Analyte]) -> LoincUnit:
    where = f"{source}: LOINC {loinc}"
    if not isinstance(spec, dict):
        raise UnitTableError(f"{where}: expected a mapping")
    unknown = set(spec) - {"analyte", "unit", "plausible", "unit_when_missing", "display"}
    if unknown:
        raise UnitTableError(f"{where}: unknown keys {sorted(unknown)}")
    if spec.get("analyte") not in analytes:
        raise UnitTableError(f"{where}: analyte {spec.get('analyte')!r} is not defined under analytes")
    if "unit" not in spec:
        raise UnitTableError(f"{where}: no canonical unit")
    unit = str(spec["unit"])
    _require_ucum(unit, f"{where}: canonical unit")
    low = high = None
    if spec.get("plausible") is not None:
        bounds = spec["plausible"]
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or not all(isinstance(bound, int | float) for bound in bounds)
            or bounds[0] > bounds[1]
        ):
            raise UnitTableError(f"{where}: plausible must be [low, high] with low <= high")
        low, high = float(bounds[0]), float(bounds[1])
    when_missing = spec.get("unit_when_missing")
    if when_missing is not None:
        _require_ucum(str(when_missing), f"{where}: unit_when_missing")
    return LoincUnit(
        loinc,
        analytes[spec["analyte"]],
        unit,
        low,
        high,
        str(when_missing) if when_missing is not None else None,
        str(spec.get("display", "")),
    )


def _require_ucum(unit: str, where: str) -> None:
    """Table units are strict UCUM (no rewriting): a typo fails when the table loads, not on the first value."""
    parsed = ucum_quantity(unit)
    if isinstance(parsed, str):
        raise UnitTableError(f"{where} {unit!r} is {parsed}")
