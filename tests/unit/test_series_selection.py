"""Series selection without a server: every rule operator, orientation derivation, ranking and ties, missing
attributes, rule-file errors, the IMAGE-level completion step (against a fake C-FIND) and C-FIND answer parsing."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from riskbridge.connectors import query
from riskbridge.harmonize.series import (
    OBLIQUE,
    RuleSet,
    load_default_rules,
    load_rules,
    parse_rules_text,
    select_series,
    series_value,
    slice_orientation,
)
from riskbridge.records import SeriesRef
from riskbridge.settings import PacsSettings

STUDY = "1.2.826.0.1.3680043.8.498.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def tilted(degrees: float) -> tuple[float, ...]:
    """An axial slice tilted about the x axis (gantry tilt): the normal leans from z towards y."""
    angle = math.radians(degrees)
    return (1.0, 0.0, 0.0, 0.0, math.cos(angle), -math.sin(angle))


def make_series(uid: str, number: int | None = 1, **attributes: Any) -> SeriesRef:
    """A SeriesRef as a SERIES-level C-FIND would give it (Modality CT unless given)."""
    attributes.setdefault("Modality", "CT")
    return SeriesRef(
        study_uid=STUDY,
        series_uid=uid,
        modality=str(attributes["Modality"]),
        series_number=number,
        description=str(attributes.get("SeriesDescription", "")),
        instance_count=attributes.get("NumberOfSeriesRelatedInstances"),
        attributes=attributes,
    )


def chest_series(uid: str, number: int | None = 1, **overrides: Any) -> SeriesRef:
    """A series the shipped chest_ct rules accept, with ``overrides`` applied (None removes an attribute)."""
    attributes: dict[str, Any] = {
        "Modality": "CT",
        "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
        "ImageOrientationPatient": AXIAL,
        "SliceThickness": 1.0,
        "NumberOfSeriesRelatedInstances": 120,
        "ConvolutionKernel": "B70f",
        "BodyPartExamined": "CHEST",
    }
    attributes.update(overrides)
    return make_series(uid, number, **{k: v for k, v in attributes.items() if v is not None})


def one_rule(body: str, rank: str = "") -> RuleSet:
    """A rule set with the single rule ``body`` (YAML of the rule's keys) named ``r``."""
    indented = "\n".join(f"    {line}" for line in body.strip().splitlines())
    return parse_rules_text(f"name: test\nrules:\n  - name: r\n{indented}\n{rank}", "test.yaml")


def verdict(rule_set: RuleSet, **attributes: Any) -> str | None:
    """None when a series with ``attributes`` passes the rule set's rules, else the first failure reason."""
    failures = rule_set.failures(make_series("9.9", **attributes))
    return failures[0][1] if failures else None


@pytest.fixture(scope="module")
def chest() -> RuleSet:
    return load_default_rules()


# --- operators -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "value", "passes"),
    [
        ("attribute: Modality\nequals: CT", "CT", True),
        ("attribute: Modality\nequals: CT", "MR", False),
        ("attribute: Modality\nequals: CT", "ct", False),  # exact: use matches with (?i) for case-insensitive
        ("attribute: SliceThickness\nequals: 1", "1.0", True),  # numbers compare as numbers
        ("attribute: SliceThickness\nequals: 1", 1.0000001, False),
        ("attribute: ImageType\nequals: [ORIGINAL, PRIMARY, AXIAL]", ("ORIGINAL", "PRIMARY", "AXIAL"), True),
        ("attribute: ImageType\nequals: [ORIGINAL, PRIMARY, AXIAL]", ("ORIGINAL", "PRIMARY"), False),
        ("attribute: ImageType\nequals: ORIGINAL", ("ORIGINAL", "PRIMARY"), False),
        ("attribute: Manufacturer\none_of: [SIEMENS, Philips]", "Philips", True),
        ("attribute: Manufacturer\none_of: [SIEMENS, Philips]", "GE MEDICAL SYSTEMS", False),
        ("attribute: SeriesNumber\none_of: [2, 3]", 3, True),
        ("attribute: ConvolutionKernel\nmatches: '^B[67]0'", "B70f", True),
        ("attribute: ConvolutionKernel\nmatches: '^B[67]0'", "B31f", False),
        ("attribute: ConvolutionKernel\nmatches: ['^LUNG$', '^B70']", "LUNG", True),
        ("attribute: ConvolutionKernel\nmatches: '^Br40d\\\\3$'", ("Br40d", "3"), True),  # joined by backslash
        ("attribute: SeriesDescription\nnot_matches: '(?i)mip|mpr'", "Thorax MIP 10mm", False),
        ("attribute: SeriesDescription\nnot_matches: '(?i)mip|mpr'", "Thorax 1.0 B70f", True),
        ("attribute: SliceThickness\nmin: 0.5\nmax: 2.5", 0.5, True),  # both bounds inclusive
        ("attribute: SliceThickness\nmin: 0.5\nmax: 2.5", 2.5, True),
        ("attribute: SliceThickness\nmin: 0.5\nmax: 2.5", 2.51, False),
        ("attribute: SliceThickness\nmin: 0.5\nmax: 2.5", 0.49, False),
        ("attribute: SliceThickness\nmin: 0.5", "1.25", True),  # DS text is a number
        ("attribute: SliceThickness\nmin: 0.5", "thin", False),
        ("attribute: PixelSpacing\nmax: 1.0", (0.7, 0.7), True),
        ("attribute: PixelSpacing\nmax: 1.0", (0.7, 1.2), False),  # every value must lie in range
        ("attribute: ImageType\nincludes: [ORIGINAL, PRIMARY]", ("ORIGINAL", "PRIMARY", "AXIAL"), True),
        ("attribute: ImageType\nincludes: [ORIGINAL, PRIMARY]", ("DERIVED", "PRIMARY"), False),
        ("attribute: ImageType\nincludes: ORIGINAL", "ORIGINAL", True),  # a single value is a one-element set
        ("attribute: ImageType\nexcludes: [LOCALIZER]", ("ORIGINAL", "PRIMARY", "LOCALIZER"), False),
        ("attribute: ImageType\nexcludes: [LOCALIZER]", ("ORIGINAL", "PRIMARY", "AXIAL"), True),
        ("attribute: ImageOrientationPatient\norientation: axial", AXIAL, True),
        ("attribute: ImageOrientationPatient\norientation: axial", CORONAL, False),
        ("attribute: ImageOrientationPatient\norientation: [coronal, sagittal]", SAGITTAL, True),
        ("attribute: ImageOrientationPatient\norientation: axial\nmax_obliquity_deg: 30", tilted(20), True),
        ("attribute: ImageOrientationPatient\norientation: axial\nmax_obliquity_deg: 10", tilted(20), False),
        ("attribute: ImageOrientationPatient\norientation: axial", (1, 0, 0, 0, 1), False),  # five numbers
        ("attribute: ContrastBolusAgent\npresent: true", "IOHEXOL 350", True),
        ("attribute: ContrastBolusAgent\npresent: true", "", False),
        ("attribute: ContrastBolusAgent\npresent: false", "IOHEXOL 350", False),
        ("attribute: ContrastBolusAgent\npresent: false", None, True),
        ("attribute: ContrastBolusAgent\npresent: true\nmatches: '(?i)iohexol'", "Iohexol 300", True),
    ],
)
def test_each_operator_accepts_and_rejects_as_documented(rule: str, value: Any, passes: bool) -> None:
    rule_set = one_rule(rule)
    attribute = rule_set.rules[0].attribute
    attributes = {} if value is None else {attribute: value}
    if attribute == "Modality":
        attributes["Modality"] = value
    reason = verdict(rule_set, **attributes)
    assert (reason is None) == passes, reason


def test_a_rejection_reason_names_the_attribute_the_value_and_the_limit() -> None:
    thickness = one_rule("attribute: SliceThickness\nmin: 0.5\nmax: 2.5")
    assert verdict(thickness, SliceThickness=5.0) == "SliceThickness 5 is above max 2.5"
    image_type = one_rule("attribute: ImageType\nexcludes: [LOCALIZER]")
    assert verdict(image_type, ImageType=("ORIGINAL", "PRIMARY", "LOCALIZER")) == (
        "ImageType ORIGINAL\\PRIMARY\\LOCALIZER contains LOCALIZER"
    )
    tilt = one_rule("attribute: ImageOrientationPatient\nmax_obliquity_deg: 10")
    assert verdict(tilt, ImageOrientationPatient=tilted(20)) == "orientation axial is 20.0 deg oblique (max 10)"


@pytest.mark.parametrize("empty", [None, "", "  ", (), ("", "")])
def test_a_missing_or_empty_attribute_rejects_unless_the_rule_accepts_missing(empty: Any) -> None:
    strict = one_rule("attribute: ConvolutionKernel\nmatches: '^B'")
    lenient = one_rule("attribute: ConvolutionKernel\nmatches: '^B'\nmissing: accept")
    attributes = {} if empty is None else {"ConvolutionKernel": empty}
    assert verdict(strict, **attributes) == "ConvolutionKernel is missing"
    assert verdict(lenient, **attributes) is None
    assert verdict(lenient, ConvolutionKernel="LUNG") == "ConvolutionKernel LUNG does not match ^B"


def test_series_ref_fields_stand_in_for_attributes_the_answer_lacks() -> None:
    series = SeriesRef(STUDY, "1.1", modality="CT", series_number=4, description="Lung", instance_count=64)
    assert series_value(series, "Modality") == "CT"
    assert series_value(series, "SeriesNumber") == 4
    assert series_value(series, "NumberOfSeriesRelatedInstances") == 64
    assert series_value(series, "ConvolutionKernel") is None
    count_rule = one_rule("attribute: NumberOfSeriesRelatedInstances\nmin: 50")
    assert count_rule.failures(series) == []


# --- orientation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "plane", "obliquity"),
    [
        (AXIAL, "axial", 0.0),
        ((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0), "axial", 0.0),  # feet-first: normal points the other way
        (CORONAL, "coronal", 0.0),
        (SAGITTAL, "sagittal", 0.0),
        (tilted(20), "axial", 20.0),
        (tilted(44), "axial", 44.0),
        (tilted(50), "coronal", 40.0),  # past 45 degrees the y axis dominates
        (tilted(45), OBLIQUE, 45.0),  # no dominant axis
        ((0.7071068, 0.7071068, 0.0, 0.0, 0.0, -1.0), OBLIQUE, 45.0),  # between sagittal and coronal
        (("1", "0", "0", "0", "1", "0"), "axial", 0.0),  # DS text
    ],
)
def test_orientation_is_the_dominant_axis_of_the_slice_normal(
    orientation: tuple[Any, ...], plane: str, obliquity: float
) -> None:
    found_plane, found_obliquity = slice_orientation(orientation)
    assert found_plane == plane
    assert found_obliquity == pytest.approx(obliquity, abs=1e-4)


@pytest.mark.parametrize(
    "orientation", [None, (1, 0, 0, 0, 1), (1, 0, 0, 1, 0, 0), (0, 0, 0, 0, 0, 0), ("a", 0, 0, 0, 1, 0)]
)
def test_an_underivable_orientation_is_an_error_and_a_rejection(orientation: Any) -> None:
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        slice_orientation(orientation)
    rule = one_rule("attribute: ImageOrientationPatient\norientation: axial")
    assert verdict(rule, ImageOrientationPatient=orientation) is not None


def test_an_oblique_series_fails_every_plane() -> None:
    rule = one_rule("attribute: ImageOrientationPatient\norientation: [axial, coronal, sagittal]")
    shown = "\\".join(f"{v:g}" for v in tilted(45))
    assert verdict(rule, ImageOrientationPatient=tilted(45)) == (
        f"orientation oblique (from {shown}) is not axial or coronal or sagittal"
    )


# --- selection with the shipped chest_ct rules --------------------------------------------------------------


def siemens_study() -> list[SeriesRef]:
    """The series a Siemens chest CT sends, as in the synthetic cohort: the thin lung series is the right one."""
    return [
        chest_series(
            "1.1", 1, ImageType=("ORIGINAL", "PRIMARY", "LOCALIZER"), SliceThickness=0.6,
            NumberOfSeriesRelatedInstances=1, ConvolutionKernel="T20s", ImageOrientationPatient=CORONAL,
        ),
        chest_series("1.2", 2, ConvolutionKernel="B31f", NumberOfSeriesRelatedInstances=64),
        chest_series("1.3", 3, ConvolutionKernel="B70f", NumberOfSeriesRelatedInstances=64),
        chest_series("1.4", 4, ConvolutionKernel="B31f", SliceThickness=5.0, NumberOfSeriesRelatedInstances=12),
        chest_series(
            "1.5", 5, ImageType=("DERIVED", "SECONDARY", "REFORMATTED"), ImageOrientationPatient=CORONAL,
            SliceThickness=2.8, NumberOfSeriesRelatedInstances=32, ConvolutionKernel="B31f",
        ),
        make_series("1.6", 501, Modality="SR", NumberOfSeriesRelatedInstances=1),
    ]  # fmt: skip


def test_chest_rules_choose_the_thin_lung_series_and_explain_every_other(chest: RuleSet) -> None:
    result = select_series(STUDY, siemens_study(), chest)

    assert not result.skipped
    assert result.chosen is not None and result.chosen.series_uid == "1.3"
    assert result.chosen.rank == 1 and result.chosen.rule == "chest_ct@1"
    assert result.chosen.judged["orientation"] == "axial" and result.chosen.judged["ConvolutionKernel"] == "B70f"
    runner_up = result.decision_for("1.2")
    assert (runner_up.chosen, runner_up.rank, runner_up.rule) == (False, 2, "chest_ct@1")
    assert "behind the chosen series on ConvolutionKernel" in runner_up.reason
    rejected = {d.series_uid: d.rule for d in result.rejected}
    assert rejected == {
        "1.1": "not_localizer",
        "1.4": "slice_thickness",
        "1.5": "original_primary",
        "1.6": "modality_ct",
    }
    localizer = result.decision_for("1.1")
    assert localizer.judged["ImageType"] == ("ORIGINAL", "PRIMARY", "LOCALIZER")
    assert "enough_images: NumberOfSeriesRelatedInstances 1 is below min 50" in localizer.reason
    assert [d.series_uid for d in result.decisions] == ["1.3", "1.2", "1.1", "1.4", "1.5", "1.6"]
    assert result.rejected_by == {"not_localizer": 1, "slice_thickness": 1, "original_primary": 1, "modality_ct": 1}


def test_the_choice_does_not_depend_on_the_order_the_pacs_lists_series(chest: RuleSet) -> None:
    study = siemens_study()
    outcomes = {
        tuple((d.series_uid, d.rank, d.rule) for d in select_series(STUDY, list(order), chest).decisions)
        for order in itertools.permutations(study)
    }
    assert len(outcomes) == 1


def test_a_study_without_an_acceptable_series_is_skipped_with_the_rules_that_rejected(chest: RuleSet) -> None:
    study = [s for s in siemens_study() if s.series_uid not in ("1.2", "1.3")]
    result = select_series(STUDY, study, chest)

    assert result.skipped and result.chosen is None and result.accepted == ()
    assert len(result.decisions) == 4
    assert result.reason.startswith("skipped: none of the 4 series passes chest_ct@1")
    assert "slice_thickness 1" in result.reason and "modality_ct 1" in result.reason
    assert all(d.rank is None and not d.chosen for d in result.decisions)


def test_a_study_without_series_is_skipped(chest: RuleSet) -> None:
    result = select_series(STUDY, [], chest)
    assert result.skipped and result.decisions == ()
    assert result.reason == "skipped: the study has no series to judge by chest_ct@1"


def test_ranking_prefers_lung_kernel_then_thinnest_then_most_images(chest: RuleSet) -> None:
    study = [
        chest_series("2.1", 1, ConvolutionKernel="B31f", SliceThickness=0.6),  # thinnest, but soft kernel
        chest_series("2.2", 2, ConvolutionKernel="B60f", SliceThickness=2.0),
        chest_series("2.3", 3, ConvolutionKernel="B70f", SliceThickness=1.0, NumberOfSeriesRelatedInstances=200),
        chest_series("2.4", 4, ConvolutionKernel="B70f", SliceThickness=1.0, NumberOfSeriesRelatedInstances=300),
    ]
    result = select_series(STUDY, study, chest)
    assert [(d.series_uid, d.rank) for d in result.accepted] == [("2.4", 1), ("2.3", 2), ("2.2", 3), ("2.1", 4)]
    assert (
        "NumberOfSeriesRelatedInstances 200 vs NumberOfSeriesRelatedInstances 300" in result.decision_for("2.3").reason
    )
    assert "SliceThickness 2 vs SliceThickness 1" in result.decision_for("2.2").reason


def test_ties_go_to_the_lowest_series_number_then_the_series_uid(chest: RuleSet) -> None:
    study = [
        chest_series("3.9", None),
        chest_series("3.5", 7),
        chest_series("3.2", 7),
        chest_series("3.1", 12),
    ]
    result = select_series(STUDY, study, chest)
    assert [d.series_uid for d in result.accepted] == ["3.2", "3.5", "3.1", "3.9"]
    assert result.decision_for("3.5").reason.endswith(
        "tied with the chosen series on every ranking key; SeriesInstanceUID order decides"
    )
    assert "SeriesNumber 12 vs 7 decides" in result.decision_for("3.1").reason


def test_a_missing_ranking_value_ranks_last() -> None:
    rules = one_rule(
        "attribute: Modality\nequals: CT",
        "rank:\n  - attribute: SliceThickness\n    order: ascending\n"
        "  - attribute: ConvolutionKernel\n    prefer: ['^LUNG$']",
    )
    study = [
        make_series("4.1", 1),
        make_series("4.2", 2, SliceThickness=5.0),
        make_series("4.3", 3, SliceThickness=5.0, ConvolutionKernel="LUNG"),
        make_series("4.4", 4, SliceThickness=5.0, ConvolutionKernel="STANDARD"),
    ]
    result = select_series(STUDY, study, rules)
    # LUNG is the preference; STANDARD matches none (ranks after it); a missing kernel ranks after both.
    assert [d.series_uid for d in result.accepted] == ["4.3", "4.4", "4.2", "4.1"]
    assert "ConvolutionKernel STANDARD (no preference)" in result.decision_for("4.4").reason


def test_candidates_of_another_study_are_refused_and_duplicates_judged_once(chest: RuleSet) -> None:
    other = SeriesRef("9.9.9", "5.1", "CT", 1, attributes={})
    with pytest.raises(ValueError, match="belongs to another study"):
        select_series(STUDY, [other], chest)
    result = select_series(STUDY, [chest_series("5.2"), chest_series("5.2", 8)], chest)
    assert len(result.decisions) == 1
    with pytest.raises(KeyError):
        result.decision_for("5.3")


# --- what the completion step must fetch ---------------------------------------------------------------------


def test_needed_attributes_name_what_a_decision_lacks(chest: RuleSet) -> None:
    bare = chest_series("6.1", ConvolutionKernel=None, ImageOrientationPatient=None, BodyPartExamined=None)
    assert chest.needed_attributes(bare) == ("ImageOrientationPatient", "ConvolutionKernel", "BodyPartExamined")
    assert chest.needed_attributes(chest_series("6.2")) == ()
    # Already rejected on what the PACS returned (an SR; a thick series): nothing worth an IMAGE-level query.
    assert chest.needed_attributes(make_series("6.3", Modality="SR")) == ()
    assert chest.needed_attributes(chest_series("6.4", SliceThickness=5.0, ConvolutionKernel=None)) == ()


def test_rule_set_keywords_cover_rules_and_ranking_in_file_order(chest: RuleSet) -> None:
    assert chest.keywords == (
        "Modality",
        "ImageType",
        "ImageOrientationPatient",
        "SliceThickness",
        "NumberOfSeriesRelatedInstances",
        "ConvolutionKernel",
        "BodyPartExamined",
    )
    assert [rule.name for rule in chest.rules] == [
        "modality_ct",
        "original_primary",
        "not_localizer",
        "axial",
        "slice_thickness",
        "enough_images",
        "soft_or_lung_kernel",
        "chest_body_part",
    ]


class FakePacs:
    """Stands in for connectors.dicom.find: answers IMAGE-level C-FINDs from a list of instance attributes."""

    def __init__(self, instances: list[dict[str, Any]]) -> None:
        self.instances = instances
        self.queries: list[tuple[str, Dataset]] = []

    def find(self, pacs: PacsSettings, level: str, identifier: Dataset, timeout_s: float = 30.0) -> Iterator[Dataset]:
        self.queries.append((level, identifier))
        wanted_number = identifier.get("InstanceNumber")
        for attributes in self.instances:
            if wanted_number not in (None, "") and str(attributes.get("InstanceNumber")) != str(wanted_number):
                continue
            answer = Dataset()
            answer.QueryRetrieveLevel = level
            answer.StudyInstanceUID = identifier.StudyInstanceUID
            answer.SeriesInstanceUID = identifier.SeriesInstanceUID
            for element in identifier:
                if element.keyword not in (
                    "StudyInstanceUID",
                    "SeriesInstanceUID",
                    "InstanceNumber",
                    "QueryRetrieveLevel",
                ):
                    setattr(answer, element.keyword, attributes.get(element.keyword))
            answer.InstanceNumber = attributes.get("InstanceNumber")
            yield answer


def instances(count: int, first_number: int = 1) -> list[dict[str, Any]]:
    return [
        {
            "SOPInstanceUID": f"7.1.{n}",
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
            "InstanceNumber": n,
            "ConvolutionKernel": "B70f",
            "ImageOrientationPatient": list(AXIAL),
            "SliceThickness": "1.0",
        }
        for n in range(first_number + count - 1, first_number - 1, -1)  # PACS order need not be number order
    ]


def test_completion_fills_only_missing_keywords_from_instance_one(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakePacs(instances(64))
    monkeypatch.setattr(query, "find", fake.find)
    series = chest_series("7.1", ConvolutionKernel=None, ImageOrientationPatient=None, SliceThickness=1.25)

    completed = query.complete_series(
        PacsSettings(), series, ("ConvolutionKernel", "ImageOrientationPatient", "SliceThickness")
    )
    assert len(fake.queries) == 1
    level, identifier = fake.queries[0]
    assert level == "IMAGE" and identifier.InstanceNumber == 1
    assert "ConvolutionKernel" in identifier and "SliceThickness" not in identifier  # present values not asked
    assert completed.attributes["ConvolutionKernel"] == "B70f"
    assert completed.attributes["ImageOrientationPatient"] == AXIAL
    assert completed.attributes["SliceThickness"] == 1.25  # the SERIES-level value is kept
    assert query.complete_series(PacsSettings(), completed, ("ConvolutionKernel",)) is completed
    assert len(fake.queries) == 1


def test_completion_counts_instances_with_one_full_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakePacs(instances(64))
    monkeypatch.setattr(query, "find", fake.find)
    series = chest_series("7.2", NumberOfSeriesRelatedInstances=None, ConvolutionKernel=None)
    completed = query.complete_series(PacsSettings(), series, ("NumberOfSeriesRelatedInstances", "ConvolutionKernel"))
    assert len(fake.queries) == 1
    assert fake.queries[0][1].get("InstanceNumber") in (None, "")  # the whole series, not instance 1
    assert completed.instance_count == 64 and completed.attributes["NumberOfSeriesRelatedInstances"] == 64
    assert completed.attributes["ConvolutionKernel"] == "B70f"


def test_completion_falls_back_to_the_lowest_instance_number(monkeypatch: pytest.MonkeyPatch) -> None:
    numbered_from_five = instances(10, first_number=5)
    numbered_from_five[-1]["ConvolutionKernel"] = "B71f"  # instance 5 is listed last and differs
    fake = FakePacs(numbered_from_five)
    monkeypatch.setattr(query, "find", fake.find)
    completed = query.complete_series(
        PacsSettings(), chest_series("7.3", ConvolutionKernel=None), ("ConvolutionKernel",)
    )
    assert len(fake.queries) == 2  # InstanceNumber 1 matched nothing
    assert completed.attributes["ConvolutionKernel"] == "B71f"


def test_completed_series_are_judged_like_complete_ones(monkeypatch: pytest.MonkeyPatch, chest: RuleSet) -> None:
    fake = FakePacs(instances(64))
    monkeypatch.setattr(query, "find", fake.find)
    sparse = [
        chest_series("8.1", 3, ConvolutionKernel=None, ImageOrientationPatient=None),
        make_series("8.2", 501, Modality="SR", NumberOfSeriesRelatedInstances=1),
    ]
    completed = [
        query.complete_series(PacsSettings(), s, chest.needed_attributes(s)) if chest.needed_attributes(s) else s
        for s in sparse
    ]
    assert len(fake.queries) == 1  # the SR needed no IMAGE-level query
    result = select_series(STUDY, completed, chest)
    assert result.chosen is not None and result.chosen.series_uid == "8.1"
    assert select_series(STUDY, sparse, chest).skipped  # without completion the kernel is missing


# --- rule files ----------------------------------------------------------------------------------------------


def test_a_written_rule_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "contrast.yaml"
    path.write_text(
        "name: contrast_chest\nversion: 2024-01\nrules:\n"
        "  - name: contrast\n    attribute: ContrastBolusAgent\n    present: true\n"
        "rank:\n  - attribute: SliceThickness\n    order: descending\n"
    )
    rules = load_rules(path)
    assert (rules.label, rules.source, rules.keywords) == (
        "contrast_chest@2024-01",
        str(path),
        ("ContrastBolusAgent", "SliceThickness"),
    )
    result = select_series(
        STUDY,
        [
            make_series("9.1", 1, SliceThickness=1.0, ContrastBolusAgent="IOHEXOL 350"),
            make_series("9.2", 2, SliceThickness=3.0, ContrastBolusAgent="IOHEXOL 350"),
            make_series("9.3", 3, SliceThickness=5.0),
        ],
        rules,
    )
    assert result.chosen is not None and result.chosen.series_uid == "9.2"
    assert result.decision_for("9.3").reason == "contrast: ContrastBolusAgent is missing (must be present)"


# --- C-FIND answers and identifiers (connectors.query) -------------------------------------------------------


@pytest.mark.parametrize(
    ("span", "expected"),
    [
        ((date(2024, 1, 1), date(2024, 1, 14)), "20240101-20240114"),
        ((date(2024, 1, 1), None), "20240101-"),
        ((None, date(2023, 12, 31)), "-20231231"),
        ((None, None), ""),
        ((date(2024, 1, 3), date(2024, 1, 3)), "20240103-20240103"),
    ],
)
def test_dicom_date_ranges_allow_open_ends(span: tuple[date | None, date | None], expected: str) -> None:
    assert query.dicom_date_range(*span) == expected


def test_a_reversed_date_range_is_refused() -> None:
    with pytest.raises(ValueError, match="2024-01-14 is after 2024-01-01"):
        query.dicom_date_range(date(2024, 1, 14), date(2024, 1, 1))


EST = timezone(timedelta(hours=-5))


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (("20240103", "112835", "-0500"), datetime(2024, 1, 3, 11, 28, 35, tzinfo=EST)),
        (("20240103", "112835.25", "-0500"), datetime(2024, 1, 3, 11, 28, 35, 250000, tzinfo=EST)),
        (("20240103", "1128", "+0130"), datetime(2024, 1, 3, 11, 28, tzinfo=timezone(timedelta(minutes=90)))),
        (("20240103", "11:28:35", None), datetime(2024, 1, 3, 11, 28, 35)),  # naive: offset unknown
        (("20240103", "11", "bogus"), datetime(2024, 1, 3, 11)),
        (("20240103", None, "-0500"), datetime(2024, 1, 3, tzinfo=EST)),  # no time: midnight
        (("20240103", "112835", "+2500"), datetime(2024, 1, 3, 11, 28, 35)),  # impossible offset ignored
        ((None, "112835", "-0500"), None),
        (("2024-01-03", "112835", None), None),
        (("20240103", "256100", None), None),
    ],
)
def test_study_date_time_and_offset_become_one_datetime(parts: tuple[Any, Any, Any], expected: Any) -> None:
    assert query.parse_study_datetime(*parts) == expected


def study_answer() -> Dataset:
    answer = Dataset()
    answer.SpecificCharacterSet = "ISO_IR 100"
    answer.QueryRetrieveLevel = "STUDY"
    answer.RetrieveAETitle = "ORTHANC"
    answer.StudyInstanceUID = STUDY
    answer.StudyDate = "20240103"
    answer.StudyTime = "161938"
    answer.TimezoneOffsetFromUTC = "-0500"
    answer.AccessionNumber = "RB0001"
    answer.ModalitiesInStudy = ["CT", "SR"]
    answer.NumberOfStudyRelatedInstances = "178"
    answer.PatientName = "SYNTH-KILO^THREE"
    answer.PatientID = "9763929"
    answer.IssuerOfPatientID = "SYNTH_HOSP"
    answer.PatientBirthDate = "19750922"
    answer.PatientSex = "F"
    answer.StudyDescription = ""
    other = Dataset()
    other.PatientID = "H1-9763929"
    other.IssuerOfPatientID = "SITE1"
    answer.OtherPatientIDsSequence = Sequence([other])
    return answer


def test_a_study_answer_becomes_a_study_ref() -> None:
    study = query.study_from_answer(study_answer())
    assert study.study_uid == STUDY and study.accession == "RB0001"
    assert study.study_datetime == datetime(2024, 1, 3, 16, 19, 38, tzinfo=EST)
    assert study.timezone_offset == "-0500"
    assert study.modalities == ("CT", "SR") and study.instance_count == 178 and study.description == ""
    patient = study.patient
    assert (patient.patient_id, patient.issuer, patient.name, patient.birth_date, patient.sex) == (
        "9763929", "SYNTH_HOSP", "SYNTH-KILO^THREE", "19750922", "F"
    )  # fmt: skip
    assert patient.other_ids == (("H1-9763929", "SITE1"),)


def test_a_series_answer_keeps_every_attribute_as_plain_values() -> None:
    answer = Dataset()
    answer.QueryRetrieveLevel = "SERIES"
    answer.StudyInstanceUID = STUDY
    answer.SeriesInstanceUID = "1.3"
    answer.Modality = "CT"
    answer.SeriesNumber = "3"
    answer.SeriesDescription = "Thorax  1.0  B70f"
    answer.NumberOfSeriesRelatedInstances = "64"
    answer.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    answer.SliceThickness = "1.0"
    answer.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    answer.ConvolutionKernel = ""
    answer.ContrastBolusAgent = None

    series = query.series_from_answer(answer)
    assert (series.series_uid, series.modality, series.series_number, series.instance_count) == ("1.3", "CT", 3, 64)
    assert series.description == "Thorax  1.0  B70f"
    assert series.attributes["ImageType"] == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert series.attributes["SliceThickness"] == 1.0 and isinstance(series.attributes["SliceThickness"], float)
    assert series.attributes["ImageOrientationPatient"] == AXIAL
    assert series.attributes["ConvolutionKernel"] is None and series.attributes["ContrastBolusAgent"] is None
    assert "QueryRetrieveLevel" not in series.attributes


def test_find_studies_sends_matching_keys_and_empty_return_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, Dataset]] = []

    def fake_find(pacs: PacsSettings, level: str, identifier: Dataset, timeout_s: float = 30.0) -> Iterator[Dataset]:
        sent.append((level, identifier))
        yield study_answer()

    monkeypatch.setattr(query, "find", fake_find)
    found = list(query.find_studies(PacsSettings(), patient_id="9763929", study_date=(date(2024, 1, 1), None)))
    assert [s.study_uid for s in found] == [STUDY]
    level, identifier = sent[0]
    assert level == "STUDY"
    assert (identifier.PatientID, identifier.StudyDate, identifier.ModalitiesInStudy) == ("9763929", "20240101-", "CT")
    assert identifier.AccessionNumber in (None, "") and identifier.TimezoneOffsetFromUTC in (None, "")
    assert "OtherPatientIDsSequence" in identifier

    list(query.find_series(PacsSettings(), STUDY, "CT", keywords=("ContrastBolusRoute",)))
    level, identifier = sent[1]
    assert level == "SERIES" and identifier.Modality == "CT" and identifier.StudyInstanceUID == STUDY
    assert "ContrastBolusRoute" in identifier and "ConvolutionKernel" in identifier
    with pytest.raises(ValueError, match="'Kernel' is not a DICOM keyword"):
        list(query.find_series(PacsSettings(), STUDY, keywords=("Kernel",)))
