"""Time windows without a server: index time from DICOM attributes, FHIR times (partial ones too), every status,
window and policy rule, then the synthetic cohort's ground truth: every value the truth uses is selected and every
planted out-of-window or entered-in-error value is excluded with its reason."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pydicom
import pytest
from pydicom.dataset import Dataset

from riskbridge.dev.synth import generate, read_truth
from riskbridge.dev.synth.cohort import LABS
from riskbridge.harmonize.windows import (
    FeatureWindow,
    IndexTimeError,
    Measurement,
    PartialTimes,
    Policy,
    WindowReason,
    WindowSelection,
    index_time,
    index_time_of_study,
    observation_time,
    parse_dicom_offset,
    parse_fhir_datetime,
    select_value,
)
from riskbridge.records import PacsPatient, StudyRef

EST = timezone(timedelta(hours=-5))
NEW_YORK = ZoneInfo("America/New_York")
T = datetime(2024, 1, 10, 12, 0, tzinfo=EST)
WINDOW = FeatureWindow("crp", before=timedelta(hours=48))


def obs(
    observation_id: str,
    effective: str | None = None,
    status: str | None = "final",
    issued: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A plain Observation dict with the elements windows read."""
    body: dict[str, Any] = {"resourceType": "Observation", "id": observation_id, **extra}
    if status is not None:
        body["status"] = status
    if effective is not None:
        body["effectiveDateTime"] = effective
    if issued is not None:
        body["issued"] = issued
    return body


def at(hours_from_t: float) -> str:
    """A FHIR dateTime (site offset) ``hours_from_t`` hours from T."""
    return (T + timedelta(hours=hours_from_t)).isoformat()


def select(
    observations: list[dict[str, Any]],
    window: FeatureWindow = WINDOW,
    values: dict[str, float | None] | None = None,
    index: datetime = T,
) -> WindowSelection:
    """Select with value 1.0, 2.0, ... in input order unless ``values`` says otherwise."""
    values = values or {}
    measurements = [
        Measurement(o, values.get(o["id"], float(k)), None if values.get(o["id"], 0) is not None else "unit_unknown")
        for k, o in enumerate(observations, start=1)
    ]
    return select_value(window, index, measurements, "America/New_York")


def codes(selection: WindowSelection) -> dict[str, WindowReason]:
    """Disposition code per Observation id."""
    return {d.observation_id: d.code for d in selection.dispositions}


# --- index time -----------------------------------------------------------------------------------------------


def test_parse_dicom_offset() -> None:
    assert parse_dicom_offset("-0500") == timezone(timedelta(hours=-5))
    assert parse_dicom_offset("+0530") == timezone(timedelta(hours=5, minutes=30))
    for bad in ("0500", "-05:00", "+1500", "-0560", ""):
        with pytest.raises(ValueError, match="offset"):
            parse_dicom_offset(bad)


def test_index_time_prefers_acquisition_datetime_with_the_dataset_offset() -> None:
    attributes = {
        "AcquisitionDateTime": "20240105152059",
        "AcquisitionDate": "20240105",
        "AcquisitionTime": "152000",
        "StudyDate": "20240105",
        "StudyTime": "151944",
        "TimezoneOffsetFromUTC": "-0500",
    }
    result = index_time(attributes, "UTC")
    assert result.moment == datetime(2024, 1, 5, 15, 20, 59, tzinfo=EST)
    assert (result.source, result.offset_source) == ("AcquisitionDateTime", "TimezoneOffsetFromUTC")


def test_acquisition_datetime_suffix_and_fraction_win() -> None:
    result = index_time({"AcquisitionDateTime": "20240105152059.25+0100", "TimezoneOffsetFromUTC": "-0500"}, "UTC")
    assert result.moment == datetime(2024, 1, 5, 15, 20, 59, 250000, tzinfo=timezone(timedelta(hours=1)))
    assert result.offset_source == "AcquisitionDateTime"


def test_index_time_falls_back_through_acquisition_date_time_to_study_date_time() -> None:
    date_only = {"AcquisitionDateTime": "20240105", "AcquisitionDate": "20240105", "AcquisitionTime": "1520"}
    result = index_time({**date_only, "TimezoneOffsetFromUTC": "+0000"}, "UTC")
    assert (result.moment, result.source) == (
        datetime(2024, 1, 5, 15, 20, tzinfo=UTC),
        "AcquisitionDate+AcquisitionTime",
    )
    study = index_time({"StudyDate": "2024.01.05", "StudyTime": "15:19:44", "TimezoneOffsetFromUTC": "-0500"}, "UTC")
    assert (study.moment, study.source) == (datetime(2024, 1, 5, 15, 19, 44, tzinfo=EST), "StudyDate+StudyTime")


def test_index_time_uses_the_site_zone_with_daylight_saving() -> None:
    winter = index_time({"StudyDate": "20240105", "StudyTime": "120000"}, "America/New_York")
    summer = index_time({"StudyDate": "20240705", "StudyTime": "120000"}, NEW_YORK)
    assert winter.offset_source == "site_zone"
    assert winter.moment.utcoffset() == timedelta(hours=-5)
    assert summer.moment.utcoffset() == timedelta(hours=-4)


def test_index_time_reads_a_pydicom_dataset() -> None:
    header = Dataset()
    header.AcquisitionDateTime = "20240105152059"
    header.TimezoneOffsetFromUTC = "-0500"
    assert index_time(header, "UTC").moment == datetime(2024, 1, 5, 15, 20, 59, tzinfo=EST)


@pytest.mark.parametrize(
    "attributes",
    [
        {},
        {"StudyDate": "20240105"},
        {"AcquisitionDateTime": "2024", "StudyTime": "120000"},
        {"StudyDate": "20240230", "StudyTime": "120000"},
        {"StudyDate": "20240105", "StudyTime": "250000"},
        {"StudyDate": "20240105", "StudyTime": "120000", "TimezoneOffsetFromUTC": "EST"},
    ],
)
def test_no_usable_index_time_raises(attributes: dict[str, str]) -> None:
    with pytest.raises(IndexTimeError):
        index_time(attributes, "UTC")


def test_index_time_of_study() -> None:
    patient = PacsPatient("1")
    wall = datetime(2024, 1, 5, 15, 19, 44)
    assert index_time_of_study(StudyRef("1.2", None, patient, wall, "-0500"), "UTC").moment == wall.replace(tzinfo=EST)
    in_zone = index_time_of_study(StudyRef("1.2", None, patient, wall, None), NEW_YORK)
    assert (in_zone.moment.utcoffset(), in_zone.offset_source) == (timedelta(hours=-5), "site_zone")
    aware = wall.replace(tzinfo=UTC)
    assert index_time_of_study(StudyRef("1.2", None, patient, aware, None), NEW_YORK).moment == aware
    with pytest.raises(IndexTimeError):
        index_time_of_study(StudyRef("1.2", None, patient, None, None), "UTC")
    with pytest.raises(IndexTimeError):
        index_time_of_study(StudyRef("1.2", None, patient, wall, "5"), "UTC")


# --- FHIR times -----------------------------------------------------------------------------------------------


def test_parse_fhir_instants() -> None:
    assert parse_fhir_datetime("2024-01-10T17:00:00Z", "UTC").start == T
    assert parse_fhir_datetime("2024-01-10T12:00:00-05:00", "UTC").start == T
    assert parse_fhir_datetime("2024-01-10T12:00:00.5-05:00", "UTC").start == T + timedelta(milliseconds=500)
    naive = parse_fhir_datetime("2024-01-10T12:00:00", NEW_YORK)  # no offset: read in the site zone
    assert naive.start == T and naive.exact


def test_parse_fhir_partial_dates_as_intervals() -> None:
    day = parse_fhir_datetime("2024-03-10", NEW_YORK)  # the spring-forward day has 23 hours
    assert (day.precision, day.exact) == ("day", False)
    assert day.end - day.start == timedelta(hours=23) - timedelta(microseconds=1)
    month = parse_fhir_datetime("2023-12", "UTC")
    assert (month.start, month.end) == (
        datetime(2023, 12, 1, tzinfo=ZoneInfo("UTC")),
        datetime(2023, 12, 31, 23, 59, 59, 999999, tzinfo=ZoneInfo("UTC")),
    )
    year = parse_fhir_datetime("2024", "UTC")
    assert year.precision == "year" and year.midpoint.month == 7
    for bad in ("2024-1-10", "10/01/2024", "2024-01-10T12", "2024-13", ""):
        with pytest.raises(ValueError, match=r"dateTime|month"):
            parse_fhir_datetime(bad, "UTC")


def test_observation_time_sources() -> None:
    assert observation_time(obs("a", at(0)), "UTC") is not None
    instant = observation_time({"effectiveInstant": "2024-01-10T17:00:00Z"}, "UTC")
    assert instant is not None and (instant.span.start, instant.source) == (T, "effectiveInstant")
    period = observation_time({"effectivePeriod": {"start": at(-30), "end": at(-2)}}, "UTC")
    assert period is not None and (period.span.start, period.source) == (T - timedelta(hours=2), "effectivePeriod.end")
    open_period = observation_time({"effectivePeriod": {"start": at(-30)}}, "UTC")
    assert open_period is not None and open_period.source == "effectivePeriod.start"
    issued = observation_time({"issued": at(-1)}, "UTC")
    assert issued is not None and issued.source == "issued"
    assert observation_time({"status": "final"}, "UTC") is None


# --- selection ------------------------------------------------------------------------------------------------


def test_latest_before_uses_the_latest_value_in_the_window_with_inclusive_bounds() -> None:
    observations = [
        obs("old", at(-49)),
        obs("start", at(-48)),
        obs("mid", at(-10)),
        obs("end", at(0)),
        obs("after", at(0.01)),
    ]
    result = select(observations)
    assert codes(result) == {
        "old": WindowReason.BEFORE_WINDOW,
        "start": WindowReason.SUPERSEDED,
        "mid": WindowReason.SUPERSEDED,
        "end": WindowReason.USED,
        "after": WindowReason.AFTER_WINDOW,
    }
    assert (result.value, result.used, result.time) == (4.0, ("end",), T)
    assert [d.observation_id for d in result.excluded] == ["old", "start", "mid", "after"]
    exactly_start = select([obs("start", at(-48))])
    assert exactly_start.used == ("start",)


def test_offsets_are_compared_as_instants() -> None:
    # 16:59Z is 11:59 at -05:00 (inside), 17:01Z is after T although its wall time reads earlier than 12:01 local.
    result = select([obs("inside", "2024-01-10T16:59:00Z"), obs("after", "2024-01-10T17:01:00Z")])
    assert codes(result) == {"inside": WindowReason.USED, "after": WindowReason.AFTER_WINDOW}


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ("entered-in-error", WindowReason.ENTERED_IN_ERROR),
        ("cancelled", WindowReason.CANCELLED),
        ("registered", WindowReason.NOT_RESULTED),
        ("unknown", WindowReason.STATUS_UNKNOWN),
        ("bogus", WindowReason.STATUS_UNKNOWN),
        (None, WindowReason.STATUS_UNKNOWN),
    ],
)
def test_unusable_statuses_are_excluded_and_the_previous_value_is_used(
    status: str | None, reason: WindowReason
) -> None:
    result = select([obs("earlier", at(-5)), obs("latest", at(-1), status=status)])
    assert codes(result) == {"earlier": WindowReason.USED, "latest": reason}
    assert result.value == 1.0
    latest = result.disposition_of("latest")
    assert latest is not None and latest.time == T - timedelta(hours=1)  # the time is kept for the record


@pytest.mark.parametrize("status", ["amended", "corrected"])
def test_amended_and_corrected_rank_with_final(status: str) -> None:
    result = select([obs("final", at(-5)), obs("fixed", at(-1), status=status)])
    assert result.used == ("fixed",)
    assert select([obs("fixed", at(-5), status=status), obs("final", at(-1))]).used == ("final",)


def test_preliminary_counts_only_without_a_final_value() -> None:
    outranked = select([obs("final", at(-20)), obs("prelim", at(-1), status="preliminary")])
    assert codes(outranked) == {"final": WindowReason.USED, "prelim": WindowReason.STATUS_OUTRANKED}
    alone = select([obs("prelim", at(-1), status="preliminary"), obs("older", at(-3), status="preliminary")])
    assert codes(alone) == {"prelim": WindowReason.USED, "older": WindowReason.SUPERSEDED}
    strict = replace(WINDOW, accept_preliminary=False)
    refused = select([obs("prelim", at(-1), status="preliminary")], strict)
    assert codes(refused) == {"prelim": WindowReason.PRELIMINARY_NOT_ACCEPTED} and refused.value is None
    # A preliminary value outside the window does not outrank anything and is excluded for its time.
    outside = select([obs("prelim", at(-60), status="preliminary"), obs("final", at(-1))])
    assert codes(outside) == {"prelim": WindowReason.BEFORE_WINDOW, "final": WindowReason.USED}


def test_nearest_looks_both_ways_and_ties_go_to_the_earlier_value() -> None:
    nearest = FeatureWindow("wbc", before=timedelta(hours=24), after=timedelta(hours=6), policy=Policy.NEAREST)
    result = select([obs("before", at(-3)), obs("after", at(2)), obs("late", at(7))], nearest)
    assert codes(result) == {
        "before": WindowReason.SUPERSEDED,
        "after": WindowReason.USED,
        "late": WindowReason.AFTER_WINDOW,
    }
    tie = select([obs("after", at(2)), obs("before", at(-2))], nearest)
    assert tie.used == ("before",)


def test_same_time_prefers_the_later_report_then_the_id() -> None:
    result = select([obs("b", at(-1), issued=at(-0.5)), obs("a", at(-1), issued=at(-0.2))])
    assert result.used == ("a",)
    assert select([obs("b", at(-1)), obs("a", at(-1))]).used == ("a",)


def test_mean_averages_every_value_in_the_window() -> None:
    mean = FeatureWindow("glucose", before=timedelta(hours=24), policy=Policy.MEAN)
    result = select([obs("x", at(-30)), obs("y", at(-2)), obs("z", at(-20))], mean, {"x": 100.0, "y": 4.0, "z": 6.0})
    assert result.value == 5.0
    assert result.used == ("z", "y")  # in time order
    assert result.time == T - timedelta(hours=2)
    assert codes(result)["x"] is WindowReason.BEFORE_WINDOW
    assert select([], mean).value is None


def test_values_that_could_not_be_normalized_are_excluded_with_the_units_reason() -> None:
    result = select(
        [obs("good", at(-5)), obs("bad", at(-1)), obs("nan", at(-2))], values={"bad": None, "nan": math.nan}
    )
    assert codes(result) == {
        "good": WindowReason.USED,
        "bad": WindowReason.VALUE_UNUSABLE,
        "nan": WindowReason.VALUE_UNUSABLE,
    }
    bad = result.disposition_of("bad")
    assert bad is not None and bad.detail == "unit_unknown"


def test_partial_dates_are_excluded_unless_contained_in_the_window() -> None:
    observations = [
        obs("day", "2024-01-09"),
        obs("today", "2024-01-10"),
        obs("old", "2024-01-01"),
        obs("month", "2024-01"),
    ]
    default = select(observations)
    assert set(codes(default).values()) == {WindowReason.TIME_IMPRECISE}
    assert default.value is None
    contained = select(observations, replace(WINDOW, partial_times=PartialTimes.CONTAINED))
    assert codes(contained) == {
        "day": WindowReason.USED,  # 9 January lies wholly between T-48h and T
        "today": WindowReason.TIME_IMPRECISE,  # the day of the scan reaches past T
        "old": WindowReason.BEFORE_WINDOW,
        "month": WindowReason.TIME_IMPRECISE,
    }
    used = contained.disposition_of("day")
    assert used is not None and used.time is not None
    assert abs(used.time - datetime(2024, 1, 9, 12, 0, tzinfo=NEW_YORK)) < timedelta(milliseconds=1)  # midday


def test_time_problems() -> None:
    result = select([obs("none"), obs("garbled", "yesterday"), obs("issued", issued=at(-1)), obs("ok", at(-3))])
    assert codes(result) == {
        "none": WindowReason.NO_TIME,
        "garbled": WindowReason.TIME_UNPARSEABLE,
        "issued": WindowReason.USED,  # issued stands in for a missing effective[x]
        "ok": WindowReason.SUPERSEDED,
    }
    no_issued = select([obs("issued", issued=at(-1))], replace(WINDOW, use_issued=False))
    assert codes(no_issued) == {"issued": WindowReason.NO_TIME}


def test_every_observation_gets_one_disposition_and_duplicates_are_named() -> None:
    observations = [obs("a", at(-2)), obs("a", at(-1)), obs("b", at(-3), status="entered-in-error")]
    result = select(observations)
    assert [(d.observation_id, d.code) for d in result.dispositions] == [
        ("a", WindowReason.USED),
        ("a", WindowReason.DUPLICATE),
        ("b", WindowReason.ENTERED_IN_ERROR),
    ]


def test_status_is_judged_before_time_and_value() -> None:
    result = select([obs("x", at(-60), status="entered-in-error")], values={"x": None})
    assert codes(result) == {"x": WindowReason.ENTERED_IN_ERROR}


def test_window_configuration_errors() -> None:
    with pytest.raises(ValueError, match="after must be 0"):
        FeatureWindow("crp", before=timedelta(hours=48), after=timedelta(hours=1))
    with pytest.raises(ValueError, match="negative"):
        FeatureWindow("crp", before=timedelta(hours=-1), policy=Policy.NEAREST)
    with pytest.raises(ValueError, match="aware"):
        select([], index=datetime(2024, 1, 10, 12))


# --- ground truth: the synthetic cohort -----------------------------------------------------------------------

COHORT_SEED = 31
COHORT_PATIENTS = 40
TRUTH_WINDOW = timedelta(hours=48)  # the window policy the truth is computed for (docs/synthetic-cohort.md)
FEATURE_BY_LOINC = {
    code: spec.feature for spec in LABS.values() for code in (spec.loinc, *(a for a, _ in spec.alt_loinc))
}
TRUTH_CODES = {
    "used": WindowReason.USED,
    "superseded": WindowReason.SUPERSEDED,
    "before_window": WindowReason.BEFORE_WINDOW,
    "after_index": WindowReason.AFTER_WINDOW,
    "entered_in_error": WindowReason.ENTERED_IN_ERROR,
}


@dataclass(frozen=True)
class CohortPatient:
    """One cohort patient as windows see it: index-series header, Observations by feature, the truth."""

    header: Dataset
    observations: dict[str, list[dict[str, Any]]]
    truth: dict[str, Any]


def _index_header(study_dir: Path) -> Dataset:
    """The header of an axial (non-localizer) CT image of the study: its acquisition is the index time."""
    for series_dir in sorted(study_dir.iterdir()):
        first = min(series_dir.iterdir())
        header = pydicom.dcmread(first, stop_before_pixels=True)
        if header.Modality == "CT" and "LOCALIZER" not in header.ImageType:
            return header
    raise AssertionError(f"no CT image series in {study_dir.name}")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[CohortPatient]]:
    out = tmp_path_factory.mktemp("windows") / "cohort"
    generate(out, patients=COHORT_PATIENTS, seed=COHORT_SEED)
    patients = []
    for truth in read_truth(out):
        bundle_file = out / "fhir" / f"{truth['patient_key']}.json"
        if not bundle_file.exists():
            continue
        by_feature: dict[str, list[dict[str, Any]]] = {}
        for entry in json.loads(bundle_file.read_text(encoding="utf-8"))["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] == "Observation":
                feature = FEATURE_BY_LOINC[resource["code"]["coding"][0]["code"]]
                by_feature.setdefault(feature, []).append(resource)
        header = _index_header(out / "dicom" / truth["index_study"]["study_uid"])
        patients.append(CohortPatient(header, by_feature, truth))
    yield patients


def _select_all(
    patient: CohortPatient, index: datetime, observations: dict[str, list[dict[str, Any]]] | None = None
) -> dict[str, WindowSelection]:
    """Each feature selected with the truth's window; values are the truth's canonical values (units is separate)."""
    canonical = {o["id"]: o["canonical_value"] for o in patient.truth["lab_observations"]}
    selections = {}
    for feature in LABS:
        window = FeatureWindow(feature, before=TRUTH_WINDOW)
        found = (observations if observations is not None else patient.observations).get(feature, [])
        measurements = [Measurement(o, canonical[o["id"]]) for o in found]
        selections[feature] = select_value(window, index, measurements, "America/New_York")
    return selections


def _assert_matches_truth(patient: CohortPatient, selections: dict[str, WindowSelection]) -> None:
    key = patient.truth["patient_key"]
    for feature, expected in patient.truth["labs"].items():
        selection = selections[feature]
        if expected is None:
            assert selection.value is None, (key, feature)
        else:
            assert selection.used == (expected["observation_id"],), (key, feature)
            assert selection.value == pytest.approx(expected["value"], rel=1e-12), (key, feature)
    for observation in patient.truth["lab_observations"]:
        disposition = selections[observation["feature"]].disposition_of(observation["id"])
        assert disposition is not None, (key, observation["id"])
        assert disposition.code is TRUTH_CODES[observation["disposition"]], (key, observation["id"], disposition)


def test_cohort_index_time_is_the_truth(cohort: list[CohortPatient]) -> None:
    for patient in cohort:
        result = index_time(patient.header, "UTC")
        assert result.moment == datetime.fromisoformat(patient.truth["index_time"]), patient.truth["patient_key"]
        assert (result.source, result.offset_source) == ("AcquisitionDateTime", "TimezoneOffsetFromUTC")
        # Without any offset in the header, the site zone (New York, January: -05:00) gives the same instant.
        bare = {k: patient.header.get(k) for k in ("AcquisitionDateTime", "StudyDate", "StudyTime")}
        assert index_time(bare, "America/New_York").moment == result.moment


def test_cohort_lab_selection_reproduces_the_truth(cohort: list[CohortPatient]) -> None:
    planted = {code: 0 for code in TRUTH_CODES}
    for patient in cohort:
        _assert_matches_truth(patient, _select_all(patient, index_time(patient.header, "UTC").moment))
        for observation in patient.truth["lab_observations"]:
            planted[observation["disposition"]] += 1
    print(f"windows on the synthetic cohort: dispositions reproduced {planted}")
    assert all(planted.values()), planted  # the cohort exercises every disposition


def test_cohort_selection_is_the_same_from_the_study_time(cohort: list[CohortPatient]) -> None:
    # The truth holds for any index time within 10 minutes of the acquisition, StudyDate+StudyTime included.
    for patient in cohort:
        study_only = {k: patient.header.get(k) for k in ("StudyDate", "StudyTime", "TimezoneOffsetFromUTC")}
        study_time = index_time(study_only, "UTC")
        assert study_time.source == "StudyDate+StudyTime"
        _assert_matches_truth(patient, _select_all(patient, study_time.moment))


def test_cohort_cancelled_results_fall_back_to_the_previous_value(cohort: list[CohortPatient]) -> None:
    # Cancel each used result in turn: it is excluded as cancelled and the latest superseded value takes its
    # place (or the feature goes missing when there was none).
    checked = 0
    for patient in cohort:
        index = index_time(patient.header, "UTC").moment
        for feature, expected in patient.truth["labs"].items():
            if expected is None:
                continue
            cancelled_id = expected["observation_id"]
            observations = {
                name: [{**o, "status": "cancelled"} if o["id"] == cancelled_id else o for o in found]
                for name, found in patient.observations.items()
            }
            selection = _select_all(patient, index, observations)[feature]
            disposition = selection.disposition_of(cancelled_id)
            assert disposition is not None and disposition.code is WindowReason.CANCELLED
            runners_up = [
                o
                for o in patient.truth["lab_observations"]
                if o["feature"] == feature and o["disposition"] == "superseded"
            ]
            if runners_up:
                previous = max(runners_up, key=lambda o: datetime.fromisoformat(o["effective"]))
                assert selection.used == (previous["id"],)
            else:
                assert selection.value is None
            checked += 1
    assert checked > 100
