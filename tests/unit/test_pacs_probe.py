"""The PACS probe (riskbridge.pacs_probe) on stand-in C-FIND answers: which attributes each level returns, the
transport ``auto`` picks, IMAGE-level completion, header sampling and what identity can see.

The stand-in is :class:`FakePacs`, a few studies, series and instances answered the way a PACS answers C-FIND (every
requested key comes back, empty unless that level returns it); it replaces the one C-FIND function under
:mod:`riskbridge.connectors.query`, so the query functions and the probe run as they do against a server. The C-GET
and DICOMweb questions are monkeypatched. The check against a real server (the sandbox Orthanc) is the integration
test, tests/integration/test_pacs_probe_sandbox.py.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from datetime import date
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from riskbridge import pacs_probe
from riskbridge.connectors import dicom, query
from riskbridge.harmonize.series import RuleSet, load_default_rules
from riskbridge.pacs_probe import Conclusion, PacsCapabilities, conclusions, probe
from riskbridge.settings import PacsSettings

# Long UIDs (60 characters, instances add ".N"): a report that cut identifiers short would show here.
STUDY = "1.2.826.0.1.3680043.8.498.1000000000000000000000000000000001"
OLD_STUDY = "1.2.826.0.1.3680043.8.498.1000000000000000000000000000000002"
LOCALIZER = "1.2.826.0.1.3680043.8.498.2000000000000000000000000000000001"
AXIAL = "1.2.826.0.1.3680043.8.498.2000000000000000000000000000000002"
TODAY = date(2026, 12, 7)

# What the C-FIND of a strict PACS returns: the standard query keys of each level (PS3.4 C.6.1.1), nothing else.
STRICT_STUDY = {"StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "PatientID", "PatientName",
                "ModalitiesInStudy", "StudyDescription"}  # fmt: skip
STRICT_SERIES = {"SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription"}
STRICT_IMAGE = {"SOPInstanceUID", "SOPClassUID", "InstanceNumber"}

AXIAL_HEADER: dict[str, Any] = {
    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "ConvolutionKernel": "B70f",
    "SliceThickness": "1.0",
    "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
    "BodyPartExamined": "CHEST",
}


def _study(uid: str, day: str, **extra: Any) -> dict[str, Any]:
    return {"StudyInstanceUID": uid, "StudyDate": day, "StudyTime": "101500", "PatientID": "P1",
            "PatientName": "A^B", "ModalitiesInStudy": ["CT"], "AccessionNumber": "ACC1",
            "StudyDescription": "CT CHEST", **extra}  # fmt: skip


def _archive(body_part: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """One study of this week and one of last year; the week's has a localizer (2 images) and an axial series (60)."""
    header = dict(AXIAL_HEADER) if body_part else {k: v for k, v in AXIAL_HEADER.items() if k != "BodyPartExamined"}
    studies = [
        _study(STUDY, "20261205", IssuerOfPatientID="HOSP", OtherPatientIDsSequence=[("X9", "OTHER")]),
        _study(OLD_STUDY, "20251101"),
    ]
    series = [
        {"StudyInstanceUID": STUDY, "SeriesInstanceUID": LOCALIZER, "Modality": "CT", "SeriesNumber": "1",
         "SeriesDescription": "Topogram", "NumberOfSeriesRelatedInstances": "2", "SliceThickness": "1.0",
         "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"], "ImageOrientationPatient": [0, 1, 0, 0, 0, -1],
         "ConvolutionKernel": "T20f"},
        {"StudyInstanceUID": STUDY, "SeriesInstanceUID": AXIAL, "Modality": "CT", "SeriesNumber": "2",
         "SeriesDescription": "Thorax 1.0 B70f", "NumberOfSeriesRelatedInstances": "60", **header},
    ]  # fmt: skip
    instances = [
        {"StudyInstanceUID": STUDY, "SeriesInstanceUID": s["SeriesInstanceUID"],
         "SOPInstanceUID": f"{s['SeriesInstanceUID']}.{n}", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
         "InstanceNumber": str(n), "Modality": "CT",
         **{k: v for k, v in s.items() if k in AXIAL_HEADER}}
        for s in series for n in range(1, int(s["NumberOfSeriesRelatedInstances"]) + 1)
    ]  # fmt: skip
    return studies, series, instances


def _matches(record: Mapping[str, Any], keyword: str, wanted: Any) -> bool:
    if keyword == "StudyDate" and "-" in str(wanted):
        start, _, end = str(wanted).partition("-")
        return (not start or record[keyword] >= start) and (not end or record[keyword] <= end)
    if keyword == "ModalitiesInStudy":
        return wanted in record.get(keyword, [])
    return str(record.get(keyword)) == str(wanted)


class FakePacs:
    """C-FIND answers from records: every requested key comes back, non-empty only where the level returns it
    (``returns[level]``; None: everything the record has). Matching keys match exactly, StudyDate by range."""

    def __init__(
        self,
        records: tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]],
        returns: Mapping[str, Collection[str] | None],
        fail: Collection[str] = (),
    ) -> None:
        self.records = dict(zip(("STUDY", "SERIES", "IMAGE"), records, strict=True))
        self.returns = returns
        self.fail = fail
        self.queries: list[str] = []

    def find(self, pacs: PacsSettings, level: str, identifier: Dataset, timeout_s: float = 30.0) -> Iterator[Dataset]:
        self.queries.append(level)
        if level in self.fail:
            raise dicom.DicomError(f"C-FIND {level} -> {dicom.peer_name(pacs)}: status 0xC001 (failed)")
        returned = self.returns.get(level)
        for record in self.records[level]:
            matching = [e for e in identifier if e.VR != "SQ" and e.value not in (None, "", [])]
            if not all(_matches(record, e.keyword, e.value) for e in matching):
                continue
            answer = Dataset()
            for element in identifier:
                keyword = element.keyword
                value = record.get(keyword) if returned is None or keyword in returned else None
                if element.VR == "SQ":
                    if returned is None or keyword in returned:
                        items = []
                        for patient_id, issuer in value or ():
                            item = Dataset()
                            item.PatientID, item.IssuerOfPatientID = patient_id, issuer
                            items.append(item)
                        setattr(answer, keyword, Sequence(items))
                    continue
                setattr(answer, keyword, element.value if element in matching else value)
            yield answer


@pytest.fixture
def rules() -> RuleSet:
    return load_default_rules()


def _run(
    monkeypatch: pytest.MonkeyPatch,
    rules: RuleSet,
    pacs_answers: FakePacs,
    *,
    c_get: bool = False,
    dicomweb: bool = False,
    study_uid: str | None = None,
    pacs: PacsSettings | None = None,
) -> PacsCapabilities:
    monkeypatch.setattr(query, "find", pacs_answers.find)
    monkeypatch.setattr(dicom, "find", pacs_answers.find)
    monkeypatch.setattr(pacs_probe, "accepts_c_get", lambda _: (c_get, "accepted" if c_get else "rejected"))
    monkeypatch.setattr(pacs_probe, "offers_dicomweb", lambda _: dicomweb)
    return probe(pacs or PacsSettings(), rules, study_uid, today=TODAY)


def _found(result: PacsCapabilities, topic: str) -> list[Conclusion]:
    return [conclusion for conclusion in conclusions(result) if conclusion.topic == topic]


def test_a_pacs_that_answers_everything_needs_no_completion_and_auto_picks_c_get(
    monkeypatch: pytest.MonkeyPatch, rules: RuleSet
) -> None:
    result = _run(monkeypatch, rules, FakePacs(_archive(), {}), c_get=True)
    assert result.study_uid == STUDY and "last 30 days" in result.study_source
    assert result.series_count == 2 and result.image_series_uid == AXIAL  # the image series, not the localizer
    assert set(rules.keywords) <= set(result.series.answered)
    assert result.completion_series == 0 and result.sampling_keywords == ()
    assert result.image_find and result.image.answers == 60
    assert result.instance_count_answered and result.instance_count_agrees is True
    assert result.auto_transport == "c-get"
    assert result.issuer_of_patient_id and result.other_patient_ids == "answered"
    assert all(conclusion.verdict == "ok" for conclusion in conclusions(result))


def test_a_strict_pacs_needs_image_level_completion_and_header_sampling_only_for_what_image_lacks(
    monkeypatch: pytest.MonkeyPatch, rules: RuleSet
) -> None:
    # SERIES level: the standard keys only; IMAGE level answers the rules' attributes except ConvolutionKernel.
    image = STRICT_IMAGE | {"ImageType", "SliceThickness", "ImageOrientationPatient", "Modality"}
    pacs_answers = FakePacs(_archive(), {"STUDY": STRICT_STUDY, "SERIES": STRICT_SERIES, "IMAGE": image})
    result = _run(monkeypatch, rules, pacs_answers)
    assert result.series.empty == tuple(k for k in result.series.requested if k not in STRICT_SERIES)
    assert result.completion_series == 2
    assert set(result.completion_keywords) == {"ImageType", "SliceThickness", "ImageOrientationPatient",
                                               "ConvolutionKernel", "NumberOfSeriesRelatedInstances",
                                               "BodyPartExamined"}  # fmt: skip
    assert "ConvolutionKernel" not in result.image_fills and "NumberOfSeriesRelatedInstances" in result.image_fills
    assert result.sampling_keywords == ("ConvolutionKernel", "BodyPartExamined")
    assert not result.instance_count_answered and result.auto_transport == "c-move"
    assert not result.issuer_of_patient_id and result.other_patient_ids == "absent"
    (sampling,) = _found(result, "header sampling")
    assert sampling.verdict == "note" and sampling.finding.startswith("ConvolutionKernel: returned at neither")
    (optional,) = _found(result, "optional attributes")
    assert optional.finding.startswith("BodyPartExamined")
    assert [c.verdict for c in _found(result, "instance count")] == ["note"]
    assert "C-MOVE needs the PACS to know" in _found(result, "transport (auto)")[0].finding


def test_header_sampling_switched_off_where_it_is_needed_is_a_problem(
    monkeypatch: pytest.MonkeyPatch, rules: RuleSet
) -> None:
    pacs_answers = FakePacs(_archive(), {"STUDY": STRICT_STUDY, "SERIES": STRICT_SERIES, "IMAGE": STRICT_IMAGE})
    pacs = PacsSettings().model_copy(update={"header_sampling": "off"})
    result = _run(monkeypatch, rules, pacs_answers, pacs=pacs)
    assert set(result.sampling_keywords) == {"ImageType", "SliceThickness", "ImageOrientationPatient",
                                             "ConvolutionKernel", "BodyPartExamined"}  # fmt: skip
    (sampling,) = _found(result, "header sampling")
    assert sampling.verdict == "problem" and "header_sampling = off" in sampling.finding


def test_without_a_recent_study_the_latest_ct_study_of_any_date_is_probed(
    monkeypatch: pytest.MonkeyPatch, rules: RuleSet
) -> None:
    studies, series, instances = _archive()
    pacs_answers = FakePacs(([studies[1]], series, instances), {})
    result = _run(monkeypatch, rules, pacs_answers)
    assert result.study_uid == OLD_STUDY and "none in the last 30 days" in result.study_source
    assert pacs_answers.queries[:2] == ["STUDY", "STUDY"]


def test_no_ct_study_at_all_is_a_problem_that_names_study(monkeypatch: pytest.MonkeyPatch, rules: RuleSet) -> None:
    result = _run(monkeypatch, rules, FakePacs(([], [], []), {}), dicomweb=True)
    assert result.study_uid is None and not result.study.asked
    found = conclusions(result)
    assert [c.topic for c in found] == ["sample study", "transport (auto)"]
    assert found[0].verdict == "problem" and "--study" in found[0].finding
    assert result.auto_transport == "dicomweb"


def test_a_given_study_is_probed_without_looking_for_one(monkeypatch: pytest.MonkeyPatch, rules: RuleSet) -> None:
    pacs_answers = FakePacs(_archive(), {})
    result = _run(monkeypatch, rules, pacs_answers, study_uid=OLD_STUDY)
    assert result.study_source == "given" and result.series_count == 0
    assert pacs_answers.queries == ["STUDY", "SERIES"]  # no series: nothing to ask at IMAGE level
    assert result.image.error == "not asked: the study has no series"


def test_a_failing_level_is_reported_and_the_others_are_still_asked(
    monkeypatch: pytest.MonkeyPatch, rules: RuleSet
) -> None:
    result = _run(monkeypatch, rules, FakePacs(_archive(), {}, fail={"IMAGE"}), c_get=True)
    assert result.image.error is not None and "0xC001" in result.image.error
    assert not result.image_find and result.series.error is None and result.study.error is None
    (image,) = _found(result, "IMAGE-level C-FIND")
    assert image.verdict == "problem"
    assert result.sampling_keywords == ()  # SERIES level answers every attribute the rules read


def test_other_patient_ids_returned_empty_is_told_apart_from_not_returned(
    monkeypatch: pytest.MonkeyPatch, rules: RuleSet
) -> None:
    studies, series, instances = _archive()
    studies[0] = {**studies[0], "OtherPatientIDsSequence": []}
    result = _run(monkeypatch, rules, FakePacs((studies, series, instances), {}))
    assert result.other_patient_ids == "empty"
    assert "OtherPatientIDsSequence" in result.study.empty


def test_a_series_count_that_disagrees_with_the_image_listing_is_a_problem(
    monkeypatch: pytest.MonkeyPatch, rules: RuleSet
) -> None:
    studies, series, instances = _archive()
    series[1] = {**series[1], "NumberOfSeriesRelatedInstances": "61"}
    result = _run(monkeypatch, rules, FakePacs((studies, series, instances), {}))
    assert result.instance_count_agrees is False
    assert "problem" in [c.verdict for c in _found(result, "instance count")]


def test_a_configured_transport_the_pacs_does_not_offer_is_a_problem(
    monkeypatch: pytest.MonkeyPatch, rules: RuleSet
) -> None:
    result = _run(monkeypatch, rules, FakePacs(_archive(), {}), pacs=PacsSettings(transport="c-get"))
    (configured,) = _found(result, "transport (configured)")
    assert configured.verdict == "problem" and "c-get" in configured.finding


def test_optional_keywords_are_those_whose_absence_decides_nothing(rules: RuleSet) -> None:
    assert pacs_probe.optional_keywords(rules) == ("BodyPartExamined",)
    assert pacs_probe.auto_transport(dicomweb=True, c_get=True) == "dicomweb"
    assert pacs_probe.auto_transport(dicomweb=False, c_get=True) == "c-get"
    assert pacs_probe.auto_transport(dicomweb=False, c_get=False) == "c-move"
