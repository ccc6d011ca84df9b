"""The comorbidity rule file (``data/comorbidity_rules.yaml``, or a site's own): its flags, codes and ConText rules.

:func:`load_rules` reads and validates a rule file into a :class:`RuleSet` (cached per file); :func:`parse_rules`
validates its parsed YAML. A flag (:class:`FlagRule`) lists the phrases (:class:`TargetTerm`) that name it in a
note, look-alike phrases that do not, and the SNOMED CT / ICD-10-CM codes of Conditions that assert it; extra
ConText modifier rules (:class:`ContextRuleSpec`) are added to medspaCy's defaults. A file that does not follow the
format in docs/notes.md raises :class:`~riskbridge.harmonize.rule_file.RuleFileError`. No spaCy here: the
pipeline that uses these rules is :mod:`riskbridge.harmonize.notes`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from riskbridge.harmonize.rule_file import RuleFileError

__all__ = [
    "CONTEXT_DIRECTIONS",
    "CURRENT_CATEGORY",
    "HISTORICAL_CATEGORY",
    "KNOWN_CATEGORIES",
    "RULES_RESOURCE",
    "ContextRuleSpec",
    "FlagRule",
    "RuleFileError",
    "RuleSet",
    "TargetTerm",
    "load_rules",
    "parse_rules",
    "rule_file_key",
]

RULES_RESOURCE = "data/comorbidity_rules.yaml"

HISTORICAL_CATEGORY = "HISTORICAL"
# A rule-file category that cancels HISTORICAL ("Social history: current smoker").
CURRENT_CATEGORY = "CURRENT"
KNOWN_CATEGORIES = frozenset(
    {"NEGATED_EXISTENCE", "FAMILY", "HYPOTHETICAL", "POSSIBLE_EXISTENCE", HISTORICAL_CATEGORY, CURRENT_CATEGORY}
    | {"TERMINATE", "PSEUDO"}
)
CONTEXT_DIRECTIONS = frozenset({"FORWARD", "BACKWARD", "BIDIRECTIONAL", "TERMINATE", "PSEUDO"})


@dataclass(frozen=True)
class TargetTerm:
    """One way a note names a flag: a phrase (case-insensitive) or a spaCy token pattern."""

    literal: str
    pattern: tuple[Mapping[str, Any], ...] | None = None


@dataclass(frozen=True)
class FlagRule:
    """What sets one comorbidity flag: its text terms and the codes of Conditions that assert it."""

    name: str
    label: str
    historical_counts: bool
    coded_inactive_counts: bool
    targets: tuple[TargetTerm, ...]
    not_this: tuple[str, ...]
    snomed: frozenset[str]
    icd10cm_prefixes: tuple[str, ...]

    def matches_code(self, system_kind: str, code: str) -> bool:
        """True when a code of the given system kind ("snomed" or "icd10cm") asserts this flag."""
        if system_kind == "snomed":
            return code in self.snomed
        normalized = _normalize_icd(code)
        return any(normalized.startswith(prefix) for prefix in self.icd10cm_prefixes)


@dataclass(frozen=True)
class ContextRuleSpec:
    """A ConText modifier rule from the rule file (added to medspaCy's default English rules)."""

    literal: str
    category: str
    direction: str
    pattern: tuple[Mapping[str, Any], ...] | None = None
    allowed_types: tuple[str, ...] = ()
    max_scope: int | None = None
    why: str = ""


@dataclass(frozen=True)
class RuleSet:
    """The parsed rule file: flags, code systems, family section headers and extra ConText rules."""

    version: int
    flags: tuple[FlagRule, ...]
    snomed_systems: frozenset[str]
    icd10_systems: frozenset[str]
    family_section_headers: tuple[str, ...]
    context_rules: tuple[ContextRuleSpec, ...]
    source: str

    @property
    def flag_names(self) -> tuple[str, ...]:
        """The flag names in rule-file order."""
        return tuple(flag.name for flag in self.flags)

    def flag(self, name: str) -> FlagRule:
        """The rule of one flag by name (KeyError for an unknown name)."""
        for flag in self.flags:
            if flag.name == name:
                return flag
        raise KeyError(name)

    def system_kind(self, system: str | None) -> str | None:
        """ "snomed", "icd10cm" or None for a FHIR Coding.system URI."""
        if system in self.snomed_systems:
            return "snomed"
        if system in self.icd10_systems:
            return "icd10cm"
        return None


def _normalize_icd(code: str) -> str:
    """ICD-10 codes compare without dots and case ("I11.0" == "i110")."""
    return code.replace(".", "").strip().upper()


def _require(mapping: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in mapping:
        raise RuleFileError(f"{where}: missing '{key}'")
    value = mapping[key]
    if not isinstance(value, kind):
        raise RuleFileError(f"{where}.{key}: wrong type {type(value).__name__}")
    return value


def _check_keys(mapping: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(mapping) - allowed
    if unknown:
        raise RuleFileError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")


def _pattern(value: Any, where: str) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, list) or not value or not all(isinstance(token, dict) for token in value):
        raise RuleFileError(f"{where}.pattern: must be a non-empty list of spaCy token patterns")
    return tuple(value)


def _parse_target(item: Any, where: str) -> TargetTerm:
    if isinstance(item, str) and item.strip():
        return TargetTerm(literal=item.strip())
    if isinstance(item, dict):
        _check_keys(item, {"literal", "pattern"}, where)
        literal = _require(item, "literal", str, where)
        return TargetTerm(literal=literal, pattern=_pattern(item.get("pattern"), where))
    raise RuleFileError(f"{where}: a target is a phrase or a mapping {{literal, pattern}}")


def _parse_flag(name: str, body: Any, where: str) -> FlagRule:
    if not isinstance(body, dict):
        raise RuleFileError(f"{where}: must be a mapping")
    _check_keys(body, {"label", "historical_counts", "coded_inactive_counts", "targets", "not_this", "codes"}, where)
    targets = _require(body, "targets", list, where)
    if not targets:
        raise RuleFileError(f"{where}.targets: at least one target is needed")
    not_this = body.get("not_this", [])
    if not isinstance(not_this, list) or not all(isinstance(p, str) and p.strip() for p in not_this):
        raise RuleFileError(f"{where}.not_this: must be a list of phrases")
    codes = body.get("codes", {})
    if not isinstance(codes, dict):
        raise RuleFileError(f"{where}.codes: must be a mapping")
    _check_keys(codes, {"snomed", "icd10cm"}, f"{where}.codes")
    snomed = codes.get("snomed", [])
    icd = codes.get("icd10cm", [])
    for key, values in (("snomed", snomed), ("icd10cm", icd)):
        if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
            raise RuleFileError(f"{where}.codes.{key}: must be a list of quoted codes")
    return FlagRule(
        name=name,
        label=str(body.get("label", name)),
        historical_counts=bool(_require(body, "historical_counts", bool, where)),
        coded_inactive_counts=bool(body.get("coded_inactive_counts", False)),
        targets=tuple(_parse_target(item, f"{where}.targets[{i}]") for i, item in enumerate(targets)),
        not_this=tuple(p.strip() for p in not_this),
        snomed=frozenset(v.strip() for v in snomed),
        icd10cm_prefixes=tuple(_normalize_icd(v) for v in icd),
    )


def _parse_context_rule(item: Any, flag_names: Sequence[str], where: str) -> ContextRuleSpec:
    if not isinstance(item, dict):
        raise RuleFileError(f"{where}: must be a mapping")
    _check_keys(item, {"literal", "category", "direction", "pattern", "allowed_types", "max_scope", "why"}, where)
    literal = _require(item, "literal", str, where)
    category = _require(item, "category", str, where).upper()
    direction = _require(item, "direction", str, where).upper()
    if category not in KNOWN_CATEGORIES:
        raise RuleFileError(f"{where}.category: {category!r} is not one of {sorted(KNOWN_CATEGORIES)}")
    if direction not in CONTEXT_DIRECTIONS:
        raise RuleFileError(f"{where}.direction: {direction!r} is not one of {sorted(CONTEXT_DIRECTIONS)}")
    allowed = item.get("allowed_types", [])
    if not isinstance(allowed, list) or any(name not in flag_names for name in allowed):
        raise RuleFileError(f"{where}.allowed_types: must list flag names ({', '.join(flag_names)})")
    max_scope = item.get("max_scope")
    if max_scope is not None and (not isinstance(max_scope, int) or max_scope < 1):
        raise RuleFileError(f"{where}.max_scope: must be a positive integer")
    pattern = _pattern(item["pattern"], where) if "pattern" in item else None
    return ContextRuleSpec(
        literal=literal,
        category=category,
        direction=direction,
        pattern=pattern,
        allowed_types=tuple(allowed),
        max_scope=max_scope,
        why=str(item.get("why", "")),
    )


def parse_rules(document: Mapping[str, Any], source: str = "<memory>") -> RuleSet:
    """Validate a rule document (the YAML's content) and return the :class:`RuleSet` it describes."""
    if not isinstance(document, Mapping):
        raise RuleFileError(f"{source}: the rule file must be a mapping")
    _check_keys(document, {"version", "code_systems", "flags", "family_section_headers", "context_rules"}, source)
    version = _require(document, "version", int, source)
    if version != 1:
        raise RuleFileError(f"{source}: version {version} is not supported (1 is)")
    flags_doc = _require(document, "flags", dict, source)
    if not flags_doc:
        raise RuleFileError(f"{source}.flags: at least one flag is needed")
    flags = tuple(_parse_flag(str(name), body, f"{source}.flags.{name}") for name, body in flags_doc.items())
    systems = document.get("code_systems", {})
    if not isinstance(systems, dict):
        raise RuleFileError(f"{source}.code_systems: must be a mapping")
    _check_keys(systems, {"snomed", "icd10cm"}, f"{source}.code_systems")
    headers = document.get("family_section_headers", [])
    if not isinstance(headers, list) or not all(isinstance(h, str) and h.strip() for h in headers):
        raise RuleFileError(f"{source}.family_section_headers: must be a list of header names")
    names = [flag.name for flag in flags]
    context_doc = document.get("context_rules", [])
    if not isinstance(context_doc, list):
        raise RuleFileError(f"{source}.context_rules: must be a list")
    return RuleSet(
        version=version,
        flags=flags,
        snomed_systems=frozenset(systems.get("snomed", [])),
        icd10_systems=frozenset(systems.get("icd10cm", [])),
        family_section_headers=tuple(h.strip().lower() for h in headers),
        context_rules=tuple(
            _parse_context_rule(item, names, f"{source}.context_rules[{i}]") for i, item in enumerate(context_doc)
        ),
        source=source,
    )


def rule_file_key(path: str | Path | None) -> str | None:
    """One cache key per rule file however it is named (None is the packaged file)."""
    return None if path is None else str(Path(path).resolve())


def load_rules(path: str | Path | None = None) -> RuleSet:
    """Read and validate a rule file (default: the packaged ``data/comorbidity_rules.yaml``); cached per file."""
    return _load_rules(rule_file_key(path))


@lru_cache(maxsize=8)
def _load_rules(key: str | None) -> RuleSet:
    if key is None:
        text = resources.files("riskbridge.harmonize").joinpath(RULES_RESOURCE).read_text(encoding="utf-8")
        source = RULES_RESOURCE
    else:
        text = Path(key).read_text(encoding="utf-8")
        source = key
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RuleFileError(f"{source}: not valid YAML ({error})") from error
    return parse_rules(document, source)
