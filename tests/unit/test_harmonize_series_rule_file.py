"""Series-selection rule files (riskbridge.harmonize.series_rule_file): every malformed file is refused with an
error naming the file and the rule, and YAML anchors and merge keys work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from riskbridge.harmonize.series_rule_file import RuleFileError, load_default_rules, load_rules, parse_rules_text
from riskbridge.harmonize.series_rules import RuleSet
from riskbridge.records import SeriesRef


def verdict(rule_set: RuleSet, **attributes: Any) -> str | None:
    """None when a series with ``attributes`` passes the rule set's rules, else the first failure reason."""
    series = SeriesRef("1.2.3", "9.9", "CT", 1, "", None, {"Modality": "CT", **attributes})
    failures = rule_set.failures(series)
    return failures[0][1] if failures else None


RULE = "  - name: thin\n    attribute: SliceThickness\n    max: 2.5\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nrules: [\n", r"bad\.yaml: not valid YAML at line \d+, column \d+"),
        ("- just\n- a list\n", r"bad\.yaml: a rule file is a mapping"),
        (f"name: x\nrulez:\n{RULE}", r"bad\.yaml: unknown top-level key\(s\) rulez"),
        (f"rules:\n{RULE}", r"bad\.yaml: 'name' \(the rule set's name\) is required"),
        ("name: x\nrules: []\n", r"bad\.yaml: 'rules' must be a non-empty list"),
        (f"name: x\nrules:\n{RULE}  - attribute: Modality\n    equals: CT\n", r"rule #2: 'name' is required"),
        (f"name: x\nrules:\n{RULE}{RULE}", r"rule #2 'thin': the name is used by an earlier rule"),
        (
            "name: x\nrules:\n  - name: ct\n    attribute: Modality\n    equal: CT\n",
            r"rule #1 'ct': unknown key\(s\) equal",
        ),
        (
            "name: x\nrules:\n  - name: k\n    attribute: ConvolutionKernal\n    matches: B\n",
            r"rule #1 'k': 'attribute' 'ConvolutionKernal' is not a DICOM keyword",
        ),
        ("name: x\nrules:\n  - name: k\n    attribute: ConvolutionKernel\n", r"rule #1 'k': has no operator"),
        (
            "name: x\nrules:\n  - name: k\n    attribute: ConvolutionKernel\n    matches: '(B'\n",
            r"rule #1 'k': 'matches' pattern '\(B' is not a valid regular expression",
        ),
        (
            "name: x\nrules:\n  - name: t\n    attribute: SliceThickness\n    min: 3\n    max: 2.5\n",
            r"rule #1 't': min 3 is greater than max 2.5",
        ),
        (
            "name: x\nrules:\n  - name: t\n    attribute: SliceThickness\n    min: thin\n",
            r"rule #1 't': 'min' must be a number",
        ),
        (
            "name: x\nrules:\n  - name: o\n    attribute: ImageOrientationPatient\n    orientation: axiall\n",
            r"rule #1 'o': 'orientation' must be one or more of axial, coronal, sagittal",
        ),
        (
            "name: x\nrules:\n  - name: o\n    attribute: SliceThickness\n    orientation: axial\n",
            r"rule #1 'o': 'orientation' and 'max_obliquity_deg' judge ImageOrientationPatient",
        ),
        (
            "name: x\nrules:\n  - name: c\n    attribute: ContrastBolusAgent\n    present: false\n    matches: I\n",
            r"rule #1 'c': 'present: false' cannot be combined",
        ),
        (
            "name: x\nrules:\n  - name: c\n    attribute: ContrastBolusAgent\n    present: maybe\n",
            r"rule #1 'c': 'present' must be true or false",
        ),
        (
            "name: x\nrules:\n  - name: k\n    attribute: ConvolutionKernel\n    matches: B\n    missing: ignore\n",
            r"rule #1 'k': 'missing' must be reject or accept",
        ),
        (
            "name: x\nrules:\n  - name: f\n    attribute: PatientSex\n    equals: NO\n",
            r"rule #1 'f': 'equals' value False was read by YAML as a boolean",
        ),
        (
            "name: x\nrules:\n  - name: t\n    attribute: SliceThickness\n    max: 2.5\n    max: 5\n",
            r"bad\.yaml: not valid YAML at line 6, column 5: key 'max' given twice",
        ),
        (
            f"name: x\nrules:\n{RULE}rank:\n  - attribute: SliceThickness\n",
            r"rank key #1 \(SliceThickness\): needs exactly one of 'order'",
        ),
        (
            f"name: x\nrules:\n{RULE}rank:\n  - attribute: SliceThickness\n    order: up\n",
            r"rank key #1 \(SliceThickness\): 'order' must be ascending or descending",
        ),
        (
            f"name: x\nrules:\n{RULE}rank:\n  - attribute: SliceThickness\n    order: ascending\n    prefer: [a]\n",
            r"rank key #1 \(SliceThickness\): needs exactly one of",
        ),
        (
            f"name: x\nrules:\n{RULE}rank:\n  - attribute: Kernel\n    prefer: [a]\n",
            r"rank key #1 \(Kernel\): 'attribute' 'Kernel' is not a DICOM keyword",
        ),
    ],
)
def test_a_malformed_rule_file_names_the_file_and_the_rule(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RuleFileError, match=message) as caught:
        load_rules(path)
    assert str(path) in str(caught.value)


def test_a_missing_rule_file_and_an_unknown_shipped_name_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError, match=r"no-such\.yaml: rule file not found"):
        load_rules(tmp_path / "no-such.yaml")
    with pytest.raises(RuleFileError, match=r"no shipped rule file 'head_ct' \(shipped: chest_ct"):
        load_default_rules("head_ct")


def test_yaml_anchors_and_merge_keys_share_rule_parts() -> None:
    rules = parse_rules_text(
        "name: merged\n"
        "rules:\n"
        "  - &thin {name: thin, attribute: SliceThickness, min: 0.5, max: 2.5}\n"
        "  - <<: *thin\n"
        "    name: thin_strict\n"
        "    max: 1.5\n",
        "merged.yaml",
    )
    assert [(rule.name, rule.maximum) for rule in rules.rules] == [("thin", 2.5), ("thin_strict", 1.5)]
    assert verdict(rules, SliceThickness=2.0) == "SliceThickness 2 is above max 1.5"
