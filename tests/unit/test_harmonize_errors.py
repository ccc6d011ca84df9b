"""Every public harmonize exception is a RiskbridgeError of its branch and keeps its standard base."""

from __future__ import annotations

from pathlib import Path

import pytest

from riskbridge.errors import ConfigurationError, DataError, RiskbridgeError
from riskbridge.harmonize import (
    features,
    notes,
    notes_rule_file,
    rule_file,
    series,
    series_rule_file,
    unit_table,
    units,
    windows,
)


@pytest.mark.parametrize(
    ("error", "branch", "standard"),
    [
        (rule_file.RuleFileError, ConfigurationError, ValueError),
        (unit_table.UnitTableError, ConfigurationError, ValueError),
        (features.FeatureSpecError, ConfigurationError, ValueError),
        (windows.IndexTimeError, DataError, ValueError),
    ],
)
def test_each_harmonize_exception_derives_from_its_branch_and_its_standard_base(
    error: type[Exception], branch: type[RiskbridgeError], standard: type[Exception]
) -> None:
    assert issubclass(error, branch) and issubclass(error, RiskbridgeError) and issubclass(error, standard)
    with pytest.raises(branch):
        raise error("x")


def test_old_import_paths_name_the_same_classes() -> None:
    # Series selection and notes rule files raise one RuleFileError; units re-exports its table's error.
    assert series.RuleFileError is notes.RuleFileError is rule_file.RuleFileError
    assert series_rule_file.RuleFileError is notes_rule_file.RuleFileError is rule_file.RuleFileError
    assert units.UnitTableError is unit_table.UnitTableError


def test_real_failures_raise_the_branch(tmp_path: Path) -> None:
    bad_table = tmp_path / "units.yaml"
    bad_table.write_text("units: {}\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="unknown top-level keys"):
        units.load_table(bad_table)
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        series_rule_file.parse_rules_text("name: x\nrules: [\n", "bad.yaml")
    with pytest.raises(ConfigurationError, match="version 2"):
        notes_rule_file.parse_rules({"version": 2, "flags": {}})
    with pytest.raises(ConfigurationError, match="no shipped feature spec"):
        features.load_default_feature_spec("no_such_spec")
    with pytest.raises(DataError, match="no AcquisitionDateTime"):
        windows.index_time({}, "UTC")
