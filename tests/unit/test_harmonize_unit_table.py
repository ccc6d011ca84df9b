"""Unit table files (riskbridge.harmonize.unit_table): the package's tables load, later files override earlier
ones, and a malformed file fails when it is loaded, naming the file and the entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from riskbridge.harmonize.unit_table import (
    PACKAGE_TABLES,
    UnitTableError,
    parse_table_documents,
    read_table_documents,
)


def test_the_package_tables_load_and_a_later_file_overrides(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "analytes:\n  creatinine: {molar_mass: 113.12}\n"
        "codes:\n  '2160-0': {analyte: creatinine, unit: mg/dL, plausible: [0.1, 5]}\n"
        "exact:\n  'mg/dl': 'mg/dL'\n"
        "patterns:\n  - {match: '^mgs/dL$', replace: 'mg/dL'}\n",
        encoding="utf-8",
    )
    documents = read_table_documents([site])
    assert [source for source, _ in documents] == [
        *(f"riskbridge.harmonize/data/{name}" for name in PACKAGE_TABLES),
        str(site),
    ]
    contents = parse_table_documents(documents)
    creatinine = contents.codes["2160-0"]
    assert (creatinine.unit, creatinine.plausible_high) == ("mg/dL", 5.0)
    assert contents.pattern_rewrites[0].pattern.pattern == "^mgs/dL$"  # the site's patterns run first
    assert contents.exact_rewrites["mg/dl"] == "mg/dL"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("codes:\n  '1-1': {analyte: nothing, unit: mg/dL}\n", "not defined"),
        ("analytes:\n  a: {}\ncodes:\n  '1-1': {analyte: a, unit: K/mikroL}\n", "canonical unit"),
        ("analytes:\n  a: {}\ncodes:\n  '1-1': {analyte: a, unit: mg/dL, plausible: [5, 1]}\n", "plausible"),
        ("analytes:\n  a: {valence: 0}\n", "valence"),
        ("analytes:\n  a: {molar_mass: -3}\n", "molar_mass"),
        ("analytes:\n  a: {molarmass: 3}\n", "unknown keys"),
        ("analytes:\n  a: {}\ncodes:\n  '1-1': {analyte: a}\n", "no canonical unit"),
        ("patterns:\n  - {match: '(', replace: x}\n", "pattern 1"),
        ("units: {}\n", "unknown top-level"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_malformed_tables_fail_when_loaded(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UnitTableError, match=message) as raised:
        parse_table_documents(read_table_documents([path], include_defaults=False))
    assert str(path) in str(raised.value)
