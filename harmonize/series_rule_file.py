"""Series-selection rule files: the YAML read and validated into a :class:`~riskbridge.harmonize.series_rules.RuleSet`.

:func:`load_rules` reads a site's file, :func:`load_default_rules` one shipped with riskbridge
(``harmonize/rules/<name>.yaml``), :func:`parse_rules_text` / :func:`parse_rules` YAML text or its parsed content.
Every problem raises :class:`~riskbridge.harmonize.rule_file.RuleFileError` naming the file and the rule (or rank
key): a key given twice, an unknown key or operator, a misspelt DICOM keyword, a bad regular expression, ``min``
above ``max``. docs/series-selection.md has the format.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydicom.datadict import tag_for_keyword

from riskbridge.harmonize.rule_file import RuleFileError, read_rule_text
from riskbridge.harmonize.series_rules import (
    ORIENTATION_ATTRIBUTE,
    ORIENTATIONS,
    RULE_OPERATORS,
    RankKey,
    Rule,
    RuleSet,
)

__all__ = [
    "DEFAULT_RULES",
    "RuleFileError",
    "load_default_rules",
    "load_rules",
    "parse_rules",
    "parse_rules_text",
    "shipped_rule_files",
]

DEFAULT_RULES = "chest_ct"

_RULE_KEYS = ("name", "description", "attribute", "present", "missing", *RULE_OPERATORS)
_RANK_KEYS = ("attribute", "order", "prefer", "description")
_TOP_KEYS = ("name", "version", "description", "rules", "rank")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor" merges may be overridden by explicit keys, as YAML intends
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Problem(Exception):
    """A rule-file problem whose location (rule, rank key) the caller adds."""


def _keyword(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Problem(f"'attribute' must be a DICOM keyword such as SliceThickness (got {value!r})")
    if tag_for_keyword(value) is None:
        raise _Problem(f"'attribute' {value!r} is not a DICOM keyword (keywords are CamelCase, e.g. SliceThickness)")
    return value


def _scalar(value: Any, key: str) -> str | int | float:
    if isinstance(value, bool):
        raise _Problem(f"'{key}' value {value!r} was read by YAML as a boolean (yes/no/on/off): quote it")
    if not isinstance(value, str | int | float):
        raise _Problem(f"'{key}' values must be text or numbers (got {value!r})")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Problem(f"'{key}' must be a number (got {value!r})")
    return float(value)


def _strings(value: Any, key: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, str) and item for item in items):
        raise _Problem(f"'{key}' must be a text or a non-empty list of texts (got {value!r})")
    return tuple(items)


def _patterns(value: Any, key: str) -> tuple[re.Pattern[str], ...]:
    compiled = []
    for text in _strings(value, key):
        try:
            compiled.append(re.compile(text))
        except re.error as exc:
            raise _Problem(f"'{key}' pattern {text!r} is not a valid regular expression: {exc}") from None
    return tuple(compiled)


def _parse_rule(raw: Any) -> Rule:
    if not isinstance(raw, dict):
        raise _Problem(f"must be a mapping with name, attribute and operators (got {raw!r})")
    unknown = sorted(set(raw) - set(_RULE_KEYS))
    if unknown:
        raise _Problem(f"unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(_RULE_KEYS)})")
    attribute = _keyword(raw.get("attribute"))
    if not any(key in raw for key in (*RULE_OPERATORS, "present")):
        raise _Problem(f"has no operator (one of {', '.join(RULE_OPERATORS)}, present)")
    present = raw.get("present")
    if present is not None and not isinstance(present, bool):
        raise _Problem(f"'present' must be true or false (got {present!r})")
    if present is False and any(key in raw for key in RULE_OPERATORS):
        raise _Problem("'present: false' cannot be combined with operators on the value")
    missing = raw.get("missing", "reject")
    if missing not in ("reject", "accept"):
        raise _Problem(f"'missing' must be reject or accept (got {missing!r})")

    equals = raw.get("equals")
    if equals is not None:
        equals = tuple(_scalar(v, "equals") for v in equals) if isinstance(equals, list) else _scalar(equals, "equals")
    one_of = raw.get("one_of")
    if one_of is not None:
        if not isinstance(one_of, list) or not one_of:
            raise _Problem(f"'one_of' must be a non-empty list (got {one_of!r})")
        one_of = tuple(_scalar(v, "one_of") for v in one_of)
    minimum = _number(raw["min"], "min") if "min" in raw else None
    maximum = _number(raw["max"], "max") if "max" in raw else None
    if minimum is not None and maximum is not None and minimum > maximum:
        raise _Problem(f"min {minimum:g} is greater than max {maximum:g}")
    orientation = frozenset(_strings(raw["orientation"], "orientation")) if "orientation" in raw else frozenset()
    if orientation - set(ORIENTATIONS):
        raise _Problem(f"'orientation' must be one or more of {', '.join(ORIENTATIONS)} (got {raw['orientation']!r})")
    max_obliquity = _number(raw["max_obliquity_deg"], "max_obliquity_deg") if "max_obliquity_deg" in raw else None
    if max_obliquity is not None and not 0.0 <= max_obliquity <= 90.0:
        raise _Problem(f"'max_obliquity_deg' must lie between 0 and 90 (got {max_obliquity:g})")
    if (orientation or max_obliquity is not None) and attribute != ORIENTATION_ATTRIBUTE:
        raise _Problem(f"'orientation' and 'max_obliquity_deg' judge {ORIENTATION_ATTRIBUTE}, not {attribute}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _Problem("'description' must be text")
    return Rule(
        name=str(raw["name"]),
        attribute=attribute,
        description=description,
        equals=equals,
        one_of=one_of,
        matches=_patterns(raw["matches"], "matches") if "matches" in raw else (),
        not_matches=_patterns(raw["not_matches"], "not_matches") if "not_matches" in raw else (),
        minimum=minimum,
        maximum=maximum,
        includes=frozenset(_strings(raw["includes"], "includes")) if "includes" in raw else frozenset(),
        excludes=frozenset(_strings(raw["excludes"], "excludes")) if "excludes" in raw else frozenset(),
        orientation=orientation,
        max_obliquity_deg=max_obliquity,
        present=present,
        missing=missing,
    )


def _parse_rank_key(raw: Any) -> RankKey:
    if not isinstance(raw, dict):
        raise _Problem(f"must be a mapping with attribute and order or prefer (got {raw!r})")
    unknown = sorted(set(raw) - set(_RANK_KEYS))
    if unknown:
        raise _Problem(f"unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(_RANK_KEYS)})")
    attribute = _keyword(raw.get("attribute"))
    if ("order" in raw) == ("prefer" in raw):
        raise _Problem("needs exactly one of 'order' (ascending/descending) or 'prefer' (list of patterns)")
    order = raw.get("order")
    if order is not None and order not in ("ascending", "descending"):
        raise _Problem(f"'order' must be ascending or descending (got {order!r})")
    prefer = _patterns(raw["prefer"], "prefer") if "prefer" in raw else ()
    return RankKey(attribute=attribute, order=order, prefer=prefer, description=str(raw.get("description", "")))


def parse_rules(data: Any, source: str = "<rules>") -> RuleSet:
    """Build a :class:`RuleSet` from the parsed YAML of a rule file; :class:`RuleFileError` names file and rule."""
    if not isinstance(data, dict):
        raise RuleFileError(f"{source}: a rule file is a mapping with name, rules and rank (got {type(data).__name__})")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise RuleFileError(
            f"{source}: unknown top-level key(s) {', '.join(map(str, unknown))} (known: {', '.join(_TOP_KEYS)})"
        )
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RuleFileError(f"{source}: 'name' (the rule set's name) is required")
    version = data.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, str | int | float)):
        raise RuleFileError(f"{source}: 'version' must be text or a number (got {version!r})")
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise RuleFileError(f"{source}: 'rules' must be a non-empty list of rules")
    rules: list[Rule] = []
    for number, raw in enumerate(raw_rules, start=1):
        rule_name = raw.get("name") if isinstance(raw, dict) else None
        where = f"{source}: rule #{number}" + (f" {rule_name!r}" if rule_name else "")
        if not isinstance(rule_name, str) or not rule_name.strip():
            raise RuleFileError(f"{where}: 'name' is required (a short identifier recorded with each rejection)")
        if any(rule.name == rule_name for rule in rules):
            raise RuleFileError(f"{where}: the name is used by an earlier rule; rule names must be unique")
        try:
            rules.append(_parse_rule(raw))
        except _Problem as problem:
            raise RuleFileError(f"{where}: {problem}") from None
    raw_rank = data.get("rank", [])
    if not isinstance(raw_rank, list):
        raise RuleFileError(f"{source}: 'rank' must be a list of ranking keys")
    rank: list[RankKey] = []
    for number, raw in enumerate(raw_rank, start=1):
        attribute = raw.get("attribute") if isinstance(raw, dict) else None
        where = f"{source}: rank key #{number}" + (f" ({attribute})" if isinstance(attribute, str) else "")
        try:
            rank.append(_parse_rank_key(raw))
        except _Problem as problem:
            raise RuleFileError(f"{where}: {problem}") from None
    description = data.get("description", "")
    return RuleSet(
        name=name.strip(),
        rules=tuple(rules),
        rank=tuple(rank),
        version=str(version) if version is not None else None,
        description=str(description).strip(),
        source=source,
    )


def parse_rules_text(text: str, source: str = "<rules>") -> RuleSet:
    """Parse the YAML text of a rule file; :class:`RuleFileError` names the source and the line of a YAML error."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # safe: _StrictLoader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RuleFileError(f"{source}: not valid YAML{where}: {problem}") from None
    return parse_rules(data, source)


def load_rules(path: str | Path) -> RuleSet:
    """Read and validate a rule file; :class:`RuleFileError` names the file and the offending rule."""
    path = Path(path)
    return parse_rules_text(read_rule_text(path, "rule file"), str(path))


def shipped_rule_files() -> tuple[str, ...]:
    """Names of the rule files shipped with riskbridge (``harmonize/rules/<name>.yaml``)."""
    folder = resources.files("riskbridge.harmonize").joinpath("rules")
    return tuple(sorted(item.name.removesuffix(".yaml") for item in folder.iterdir() if item.name.endswith(".yaml")))


def load_default_rules(name: str = DEFAULT_RULES) -> RuleSet:
    """Load a rule file shipped with riskbridge by name (default ``chest_ct``)."""
    resource = resources.files("riskbridge.harmonize").joinpath("rules", f"{name}.yaml")
    if not resource.is_file():
        raise RuleFileError(f"no shipped rule file {name!r} (shipped: {', '.join(shipped_rule_files()) or 'none'})")
    return parse_rules_text(resource.read_text(encoding="utf-8"), f"riskbridge.harmonize/rules/{name}.yaml")
