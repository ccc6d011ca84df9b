"""C-FIND queries against the sandbox's Orthanc and series selection on their answers, checked against the
synthetic cohort's ground truth: the right series for every patient, skipped studies with a reason, date-range
STUDY queries, IMAGE-level listings and the IMAGE-level completion of sparse SERIES answers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from riskbridge.connectors import dicom, query
from riskbridge.connectors.query import complete_series, find_complete_series, find_instances, find_series, find_studies
from riskbridge.dev.synth import EdgeCaseRates, LoadReport, generate, read_manifest, read_truth
from riskbridge.dev.synth.load import load_dicom
from riskbridge.harmonize.series import RuleSet, load_default_rules, select_series
from riskbridge.records import SeriesRef
from riskbridge.settings import PacsSettings, Settings

pytestmark = pytest.mark.integration

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# The rule of the shipped chest_ct rules that rejects each kind of synthetic series first.
REJECTING_RULE = {
    "localizer": "not_localizer",
    "thick_soft": "slice_thickness",
    "coronal": "original_primary",
    "dose_sr": "modality_ct",
}


@pytest.fixture(scope="module")
def cohort(sandbox: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight patients, two without a usable series and two with a prior study, loaded into Orthanc."""
    out = tmp_path_factory.mktemp("query-selection") / "cohort"
    generate(out, patients=8, seed=11, rates=EdgeCaseRates(no_usable_series=0.25, prior_study=0.25))
    manifest = read_manifest(out)
    report = LoadReport(cohort_id=manifest["cohort_id"])
    load_dicom(out, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", report)
    assert report.instances_sent == manifest["counts"]["instances"]
    return out


@pytest.fixture(scope="module")
def truth(cohort: Path) -> list[dict[str, Any]]:
    return read_truth(cohort)


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return load_default_rules()


def _studies(truth: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(patient record, study) for every study of the cohort, index studies first per patient."""
    for record in truth:
        for study in [record["index_study"], *record["prior_studies"]]:
            yield record, study


def _uid_of(study: dict[str, Any], kind: str) -> str:
    return next(series["uid"] for series in study["series"] if series["kind"] == kind)


def test_the_cohort_covers_every_scanner_and_both_selection_outcomes(truth: list[dict[str, Any]]) -> None:
    # Guards the test's own value: each vendor names kernels and numbers series differently.
    manufacturers = {study["manufacturer"] for _, study in _studies(truth)}
    assert manufacturers == {"SIEMENS", "GE MEDICAL SYSTEMS", "Philips", "CANON_MEC"}
    assert sum(record["correct_series_uid"] is None for record in truth) == 2
    assert sum(bool(record["prior_studies"]) for record in truth) == 2


def test_every_patient_gets_the_ground_truth_series_or_a_skip_with_reasons(
    sandbox: Settings, truth: list[dict[str, Any]], rules: RuleSet
) -> None:
    for record in truth:
        study = record["index_study"]
        found = list(find_studies(sandbox.pacs, accession=study["accession"]))
        assert [s.study_uid for s in found] == [study["study_uid"]], record["patient_key"]
        study_ref = found[0]
        expected_patient = record["pacs"]
        assert study_ref.patient.patient_id == expected_patient["patient_id"]
        assert study_ref.patient.issuer == expected_patient["issuer"]
        assert (study_ref.patient.name, study_ref.patient.birth_date, study_ref.patient.sex) == (
            expected_patient["name"],
            expected_patient["birth_date"],
            expected_patient["sex"],
        )
        assert study_ref.study_datetime == datetime.fromisoformat(study["study_time"])
        assert study_ref.study_datetime is not None and study_ref.study_datetime.utcoffset() == timedelta(hours=-5)
        assert "CT" in study_ref.modalities

        candidates = find_complete_series(
            sandbox.pacs, study_ref.study_uid, rules.needed_attributes, keywords=rules.keywords
        )
        result = select_series(study_ref.study_uid, candidates, rules)

        kinds = {series["uid"]: series["kind"] for series in study["series"]}
        assert {d.series_uid for d in result.decisions} == set(kinds), "every series of the study is judged"
        for decision in result.rejected:
            assert decision.rule == REJECTING_RULE[kinds[decision.series_uid]], decision.reason
            assert decision.judged, "the values judged are recorded"
        if record["correct_series_uid"] is None:
            assert record["quarantine"] == "no_usable_series"
            assert result.skipped and result.chosen is None
            assert result.reason.startswith(f"skipped: none of the {len(kinds)} series passes chest_ct@1")
        else:
            assert result.chosen is not None, result.reason
            assert result.chosen.series_uid == record["correct_series_uid"], record["patient_key"]
            assert [kinds[d.series_uid] for d in result.accepted] == ["thin_lung", "thin_soft"]
            assert result.chosen.judged["orientation"] == "axial"


def test_prior_studies_get_their_own_thin_lung_series(
    sandbox: Settings, truth: list[dict[str, Any]], rules: RuleSet
) -> None:
    priors = [study for record in truth for study in record["prior_studies"]]
    assert priors
    for study in priors:
        candidates = find_complete_series(sandbox.pacs, study["study_uid"], rules.needed_attributes)
        result = select_series(study["study_uid"], candidates, rules)
        assert result.chosen is not None and result.chosen.series_uid == _uid_of(study, "thin_lung")


def _cohort_hits(pacs: PacsSettings, truth: list[dict[str, Any]], **matching: Any) -> set[str]:
    """StudyInstanceUIDs of this cohort among the answers (the sandbox may hold other cohorts too)."""
    ours = {study["study_uid"] for _, study in _studies(truth)}
    return {study.study_uid for study in find_studies(pacs, **matching)} & ours


def test_study_date_ranges_closed_open_and_single_day(
    sandbox: Settings, cohort: Path, truth: list[dict[str, Any]]
) -> None:
    window = read_manifest(cohort)["index_window"]
    first_day = datetime.fromisoformat(window["start"]).date()
    last_day = datetime.fromisoformat(window["end"]).date() - timedelta(days=1)  # the window's end is exclusive
    index_uids = {record["index_study"]["study_uid"] for record in truth}
    prior_uids = {study["study_uid"] for record in truth for study in record["prior_studies"]}

    in_window = list(find_studies(sandbox.pacs, study_date=(first_day, last_day)))
    assert {s.study_uid for s in in_window} >= index_uids
    assert all(s.study_datetime is not None and first_day <= s.study_datetime.date() <= last_day for s in in_window)
    assert _cohort_hits(sandbox.pacs, truth, study_date=(first_day, last_day)) == index_uids
    assert _cohort_hits(sandbox.pacs, truth, study_date=(first_day, None)) == index_uids
    assert _cohort_hits(sandbox.pacs, truth, study_date=(None, first_day - timedelta(days=1))) == prior_uids

    one = truth[0]["index_study"]
    day = datetime.fromisoformat(one["study_time"]).date()
    same_day = {r["index_study"]["study_uid"] for r in truth if r["index_study"]["study_time"][:10] == day.isoformat()}
    assert _cohort_hits(sandbox.pacs, truth, study_date=(day, day)) == same_day
    assert _cohort_hits(sandbox.pacs, truth, study_date=(date(2030, 1, 1), None)) == set()


def test_patient_and_modality_matching(sandbox: Settings, truth: list[dict[str, Any]]) -> None:
    with_prior = next(record for record in truth if record["prior_studies"])
    expected = {with_prior["index_study"]["study_uid"], *(s["study_uid"] for s in with_prior["prior_studies"])}
    by_patient = _cohort_hits(
        sandbox.pacs, truth, patient_id=with_prior["pacs"]["patient_id"], issuer=with_prior["pacs"]["issuer"]
    )
    assert by_patient == expected

    with_dose_report = {
        study["study_uid"] for _, study in _studies(truth) if any(s["kind"] == "dose_sr" for s in study["series"])
    }
    assert with_dose_report
    assert _cohort_hits(sandbox.pacs, truth, modality="SR") == with_dose_report
    assert _cohort_hits(sandbox.pacs, truth, modality=None) == {study["study_uid"] for _, study in _studies(truth)}


def test_series_and_image_level_listings_match_the_files(sandbox: Settings, truth: list[dict[str, Any]]) -> None:
    study = next(
        record["index_study"]
        for record in truth
        if record["correct_series_uid"] and any(s["kind"] == "dose_sr" for s in record["index_study"]["series"])
    )
    listed = {series.series_uid: series for series in find_series(sandbox.pacs, study["study_uid"])}
    assert set(listed) == {series["uid"] for series in study["series"]}
    ct_only = {series.series_uid for series in find_series(sandbox.pacs, study["study_uid"], "CT")}
    assert ct_only == {series["uid"] for series in study["series"] if series["kind"] != "dose_sr"}

    for expected in study["series"]:
        series = listed[expected["uid"]]
        assert (series.series_number, series.description, series.instance_count) == (
            expected["number"],
            expected["description"],
            expected["instances"],
        )
        instances = list(find_instances(sandbox.pacs, study["study_uid"], expected["uid"], keywords=["SliceThickness"]))
        assert len(instances) == expected["instances"]
        assert len({i.sop_instance_uid for i in instances}) == expected["instances"]
        assert sorted(i.instance_number or 0 for i in instances) == list(range(1, expected["instances"] + 1))
        assert all(i.series_uid == expected["uid"] and i.study_uid == study["study_uid"] for i in instances)
        if expected["kind"] != "dose_sr":
            assert {i.sop_class_uid for i in instances} == {CT_IMAGE_STORAGE}
            assert all(i.attributes["SliceThickness"] == pytest.approx(expected["thickness_mm"]) for i in instances)

    thin = _uid_of(study, "thin_lung")
    numbered_one = list(find_instances(sandbox.pacs, study["study_uid"], thin, instance_number=1))
    assert [i.instance_number for i in numbered_one] == [1]


def _sparse(series: SeriesRef) -> SeriesRef:
    """The series as a PACS that answers these keys only at IMAGE level would describe it."""
    stripped = ("ConvolutionKernel", "ImageOrientationPatient", "SliceThickness", "NumberOfSeriesRelatedInstances")
    attributes = {k: v for k, v in series.attributes.items() if k not in stripped}
    return replace(series, attributes=attributes, instance_count=None)


def test_sparse_series_answers_are_completed_with_one_image_level_find_each(
    sandbox: Settings, truth: list[dict[str, Any]], rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = next(r for r in truth if r["correct_series_uid"])
    study_uid = record["index_study"]["study_uid"]
    full = {s.series_uid: s for s in find_series(sandbox.pacs, study_uid, keywords=rules.keywords)}
    sparse = [_sparse(series) for series in full.values()]
    assert select_series(study_uid, sparse, rules).skipped  # nothing judgeable without the stripped keys

    levels: list[str] = []

    def counting_find(
        pacs: PacsSettings, level: Any, identifier: Dataset, timeout_s: float = 30.0
    ) -> Iterator[Dataset]:
        levels.append(level)
        return dicom.find(pacs, level, identifier, timeout_s)

    monkeypatch.setattr(query, "find", counting_find)
    needing = [series for series in sparse if rules.needed_attributes(series)]
    completed = {
        series.series_uid: complete_series(sandbox.pacs, series, rules.needed_attributes(series)) if series in needing
        else series
        for series in sparse
    }  # fmt: skip
    assert levels == ["IMAGE"] * len(needing)
    kinds = {series["uid"]: series["kind"] for series in record["index_study"]["series"]}
    # The SR, the localizer and the reformat are rejected on what the SERIES answer still has: no extra query.
    assert {kinds[s.series_uid] for s in needing} == {"thin_lung", "thin_soft", "thick_soft"}

    for series in needing:
        uid, original = series.series_uid, full[series.series_uid]
        series = completed[uid]
        for keyword in ("ConvolutionKernel", "ImageOrientationPatient", "SliceThickness"):
            assert series.attributes[keyword] == original.attributes[keyword], (kinds[uid], keyword)
        assert series.instance_count == original.instance_count
    result = select_series(study_uid, completed.values(), rules)
    assert result.chosen is not None and result.chosen.series_uid == record["correct_series_uid"]
