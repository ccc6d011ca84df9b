"""The series-rule example in the README is a valid rule file that behaves as its comments say."""

from __future__ import annotations

import re
from pathlib import Path

from riskbridge.harmonize.series import parse_rules_text, select_series
from riskbridge.records import SeriesRef

README = Path(__file__).resolve().parents[2] / "README.md"


def _series(uid: str, number: int, kernel: str, thickness: float, contrast: str | None = None) -> SeriesRef:
    attributes = {
        "Modality": "CT",
        "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
        "ImageOrientationPatient": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        "SliceThickness": thickness,
        "NumberOfSeriesRelatedInstances": 200,
        "ConvolutionKernel": kernel,
        "ContrastBolusAgent": contrast,
        "SeriesNumber": number,
    }
    return SeriesRef("1.2.3", uid, "CT", number, "", 200, attributes)


def test_the_readme_rule_example_parses_and_selects_as_documented() -> None:
    block = re.search(r"```yaml\n(name: chest_ct_site.*?)```", README.read_text(), re.DOTALL)
    assert block is not None, "the README lost its rule example"
    rules = parse_rules_text(block.group(1), "README.md")
    candidates = [
        _series("1.2.3.1", 1, "B31f", 1.0),
        _series("1.2.3.2", 2, "B70f", 1.0),
        _series("1.2.3.3", 3, "B70f", 5.0),
        _series("1.2.3.4", 4, "B70f", 1.0, contrast="IOHEXOL"),
    ]
    result = select_series("1.2.3", candidates, rules)
    assert result.chosen is not None and result.chosen.series_uid == "1.2.3.2"  # lung kernel preferred
    assert result.decision_for("1.2.3.1").rank == 2
    assert result.decision_for("1.2.3.3").rule == "slice_thickness"
    assert result.decision_for("1.2.3.4").rule == "no_contrast"
