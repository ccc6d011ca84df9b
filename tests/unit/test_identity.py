"""Identity matching without a server: every rule against an in-memory FHIR directory, then the synthetic cohort's
ground truth (PACS patients read from its DICOM headers, FHIR Patients from its bundles): precision must be 1.0."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
import pytest

from riskbridge.dev.synth import generate, read_truth
from riskbridge.harmonize.identity import (
    DemographicPolicy,
    FallbackPolicy,
    IdentifierNormalization,
    IdentityConfig,
    IdentityMatch,
    Outcome,
    PatientDirectory,
    Reason,
    match_patient,
    match_studies,
    resolve_replacements,
)
from riskbridge.records import PacsPatient, StudyRef

MRN = "http://hospital.example/mrn"
OTHER_SYSTEM = "http://clinic.example/id"
CONFIG = IdentityConfig(issuer_systems={"SYNTH_HOSP": MRN, "CLINIC": OTHER_SYSTEM}, default_issuer="SYNTH_HOSP")
FALLBACK = replace(CONFIG, fallback=FallbackPolicy(enabled=True))


def fhir_patient(
    patient_id: str,
    mrn: str | None = "1234567",
    family: str = "Synth-Echo",
    given: str = "Three",
    birth: str | None = "1951-11-05",
    gender: str | None = "male",
    active: bool | None = True,
    replaced_by: Sequence[str] = (),
    system: str = MRN,
) -> dict[str, Any]:
    """A FHIR Patient dict as the server returns it."""
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": patient_id,
        "name": [{"family": family, "given": [given]}],
    }
    if mrn is not None:
        patient["identifier"] = [{"system": system, "value": mrn}]
    if birth is not None:
        patient["birthDate"] = birth
    if gender is not None:
        patient["gender"] = gender
    if active is not None:
        patient["active"] = active
    if replaced_by:
        patient["link"] = [{"other": {"reference": target}, "type": "replaced-by"} for target in replaced_by]
    return patient


def pacs(
    patient_id: str = "1234567",
    issuer: str | None = "SYNTH_HOSP",
    name: str = "SYNTH-ECHO^THREE",
    birth: str | None = "19511105",
    sex: str | None = "M",
    other_ids: tuple[tuple[str, str | None], ...] = (),
) -> PacsPatient:
    """A PACS patient as a STUDY-level C-FIND gives it."""
    return PacsPatient(patient_id, issuer, other_ids, name, birth, sex)


@dataclass
class Directory:
    """An in-memory FHIR server: exact token search on identifier, read by id, search by birth date."""

    patients: Sequence[Mapping[str, Any]]
    searches: list[tuple[str, str]] = field(default_factory=list)

    def by_identifier(self, system: str, value: str) -> list[Mapping[str, Any]]:
        """Token search ``identifier=system|value`` (exact, as a server without normalization does it)."""
        self.searches.append((system, value))
        return [
            p
            for p in self.patients
            if any(i.get("system") == system and i.get("value") == value for i in p.get("identifier", []))
        ]

    def read(self, patient_id: str) -> Mapping[str, Any] | None:
        """Read by id; None for an unknown id (a 404)."""
        return next((p for p in self.patients if p["id"] == patient_id), None)

    def by_birth_date(self, birth: str) -> list[Mapping[str, Any]]:
        """Search ``birthdate=YYYY-MM-DD``."""
        return [p for p in self.patients if p.get("birthDate") == birth]

    def directory(self, with_birth_date_search: bool = True) -> PatientDirectory:
        """The callables identity matching is given."""
        return PatientDirectory(self.by_identifier, self.read, self.by_birth_date if with_birth_date_search else None)


def run(patient: PacsPatient, patients: Sequence[Mapping[str, Any]], config: IdentityConfig = CONFIG) -> IdentityMatch:
    """Match one PACS patient against an in-memory server holding ``patients``."""
    return match_patient(patient, Directory(patients).directory(), config)


# --- exact identifier ---------------------------------------------------------------------------------------


def test_exact_identifier_matches() -> None:
    result = run(pacs(), [fhir_patient("a")])
    assert result.outcome is Outcome.MATCHED and result.matched
    assert result.fhir_patient_id == "a"
    assert result.reasons == (Reason.IDENTIFIER_MATCH, Reason.DEMOGRAPHICS_AGREE)
    assert result.candidate_ids == ("a",)


@pytest.mark.parametrize("patient_id", ["0001234567", "H1-1234567", "h1-1234567", "123 4567"])
def test_normalized_identifier_matches(patient_id: str) -> None:
    result = run(pacs(patient_id=patient_id), [fhir_patient("a")])
    assert (result.outcome, result.fhir_patient_id) == (Outcome.MATCHED, "a")
    assert Reason.IDENTIFIER_NORMALIZED in result.reasons


def test_normalization_applies_to_the_fhir_value_too() -> None:
    # The server stores the MRN zero-padded; the padded search finds it and both sides normalize alike.
    stored = [fhir_patient("a", mrn="0001234567")]
    assert run(pacs(), stored).outcome is Outcome.UNMATCHED
    padded = replace(CONFIG, search_zero_padded_widths=(10,))
    assert run(pacs(), stored, padded).fhir_patient_id == "a"


def test_a_returned_patient_without_the_identifier_is_ignored() -> None:
    fuzzy = Directory([fhir_patient("a", mrn="7654321")])
    directory = PatientDirectory(lambda system, value: fuzzy.patients, fuzzy.read)  # a server that matches loosely
    result = match_patient(pacs(), directory, CONFIG)
    assert (result.outcome, result.reasons) == (Outcome.UNMATCHED, (Reason.IDENTIFIER_NOT_FOUND,))


def test_missing_issuer_takes_the_site_default() -> None:
    result = run(pacs(issuer=None), [fhir_patient("a")])
    assert result.fhir_patient_id == "a"
    assert Reason.DEFAULT_ISSUER_APPLIED in result.reasons
    no_default = IdentityConfig(issuer_systems={"SYNTH_HOSP": MRN})
    result = run(pacs(issuer=None), [fhir_patient("a")], no_default)
    assert (result.outcome, result.reasons) == (Outcome.UNMATCHED, (Reason.ISSUER_MISSING,))


def test_issuers_compare_case_insensitively_and_unmapped_issuers_are_not_guessed() -> None:
    assert run(pacs(issuer=" synth_hosp "), [fhir_patient("a")]).fhir_patient_id == "a"
    result = run(pacs(issuer="OTHER_HOSP"), [fhir_patient("a")])
    assert (result.outcome, result.reasons) == (Outcome.UNMATCHED, (Reason.ISSUER_UNMAPPED,))


def test_empty_identifier_is_unmatched() -> None:
    assert run(pacs(patient_id="  "), [fhir_patient("a")]).reasons == (Reason.IDENTIFIER_EMPTY,)
    assert Reason.IDENTIFIER_EMPTY in run(pacs(patient_id="H1-"), [fhir_patient("a")]).reasons


def test_per_issuer_normalization_override() -> None:
    config = replace(CONFIG, issuer_normalization={"clinic": IdentifierNormalization(strip_leading_zeros=False)})
    clinic = [fhir_patient("c", mrn="00042", system=OTHER_SYSTEM)]
    assert run(pacs(patient_id="00042", issuer="CLINIC"), clinic, config).fhir_patient_id == "c"
    # Without zero stripping "0042" and "00042" are different identifiers.
    assert run(pacs(patient_id="0042", issuer="CLINIC"), clinic, config).outcome is Outcome.UNMATCHED


def test_identifier_of_two_patients_is_a_conflict() -> None:
    twins = [fhir_patient("a"), fhir_patient("b")]
    result = run(pacs(), twins)
    assert result.outcome is Outcome.CONFLICT and result.fhir_patient_id is None
    assert Reason.IDENTIFIER_MULTIPLE_PATIENTS in result.reasons
    assert set(result.candidate_ids) == {"a", "b"}
    # The fallback never turns a conflict into a match.
    assert run(pacs(), twins, FALLBACK).outcome is Outcome.CONFLICT


def test_replaced_by_is_followed_and_merged_duplicates_are_one_patient() -> None:
    merged = [fhir_patient("old", active=False, replaced_by=["Patient/new"]), fhir_patient("new")]
    result = run(pacs(), merged)
    assert (result.outcome, result.fhir_patient_id) == (Outcome.MATCHED, "new")
    assert Reason.REPLACED_BY_FOLLOWED in result.reasons
    # Only the old record carries the MRN: the link still leads to the record in use.
    only_old = [fhir_patient("old", active=False, replaced_by=["Patient/new"]), fhir_patient("new", mrn=None)]
    assert run(pacs(), only_old).fhir_patient_id == "new"


def test_replaced_by_reference_forms() -> None:
    for reference in ("https://ehr.example/fhir/Patient/new", "Patient/new/_history/3"):
        linked = [fhir_patient("old", active=False, replaced_by=[reference]), fhir_patient("new", mrn=None)]
        assert run(pacs(), linked).fhir_patient_id == "new", reference


@pytest.mark.parametrize(
    ("patients", "reason"),
    [
        ([fhir_patient("a", replaced_by=["Patient/b"]), fhir_patient("b", mrn=None, replaced_by=["Patient/a"])],
         Reason.LINK_CYCLE),
        ([fhir_patient("a", replaced_by=["Patient/a"])], Reason.LINK_CYCLE),
        ([fhir_patient("a", replaced_by=["Patient/gone"])], Reason.LINK_TARGET_MISSING),
        ([fhir_patient("a", replaced_by=["Organization/x"])], Reason.LINK_TARGET_MISSING),
        ([fhir_patient("a", replaced_by=["Patient/b", "Patient/c"]), fhir_patient("b", mrn=None),
          fhir_patient("c", mrn=None)], Reason.LINK_AMBIGUOUS),
    ],
)  # fmt: skip
def test_broken_replaced_by_links_are_conflicts(patients: list[dict[str, Any]], reason: Reason) -> None:
    result = run(pacs(), patients)
    assert result.outcome is Outcome.CONFLICT
    assert reason in result.reasons


def test_replaced_by_chains_are_bounded() -> None:
    chain = [fhir_patient("p0", replaced_by=["Patient/p1"])]
    chain += [fhir_patient(f"p{k}", mrn=None, replaced_by=[f"Patient/p{k + 1}"]) for k in range(1, 6)]
    chain.append(fhir_patient("p6", mrn=None))
    assert run(pacs(), chain, replace(CONFIG, max_link_depth=6)).fhir_patient_id == "p6"
    result = run(pacs(), chain, replace(CONFIG, max_link_depth=5))
    assert result.outcome is Outcome.CONFLICT and Reason.LINK_CHAIN_TOO_LONG in result.reasons
    final, followed, problem = resolve_replacements(chain[0], Directory(chain).read, 6)
    assert final is not None and (final["id"], followed, problem) == ("p6", 6, None)


def test_inactive_patient_needs_review() -> None:
    result = run(pacs(), [fhir_patient("a", active=False)])
    assert (result.outcome, result.fhir_patient_id) == (Outcome.NEEDS_REVIEW, None)
    assert result.candidate_ids == ("a",)
    assert Reason.PATIENT_INACTIVE in result.reasons
    # A missing ``active`` is an active record.
    assert run(pacs(), [fhir_patient("a", active=None)]).outcome is Outcome.MATCHED


def test_other_patient_ids() -> None:
    clinic = fhir_patient("a", mrn="C-77", system=OTHER_SYSTEM)
    clinic_config = replace(CONFIG, normalization=IdentifierNormalization(site_prefix_pattern=None))
    found_by_other = run(pacs(patient_id="999", other_ids=(("C-77", "CLINIC"),)), [clinic], clinic_config)
    assert (found_by_other.outcome, found_by_other.fhir_patient_id) == (Outcome.MATCHED, "a")
    assert Reason.OTHER_IDENTIFIER_MATCH in found_by_other.reasons
    both = [fhir_patient("a"), fhir_patient("b", mrn="55", system=OTHER_SYSTEM)]
    disagree = run(pacs(other_ids=(("55", "CLINIC"),)), both)
    assert disagree.outcome is Outcome.CONFLICT and Reason.IDENTIFIERS_DISAGREE in disagree.reasons
    assert set(disagree.candidate_ids) == {"a", "b"}
    same = [
        {**fhir_patient("a"), "identifier": [*fhir_patient("a")["identifier"], {"system": OTHER_SYSTEM, "value": "55"}]}
    ]
    agree = run(pacs(other_ids=(("55", "CLINIC"),)), same)
    assert (agree.outcome, agree.fhir_patient_id) == (Outcome.MATCHED, "a")
    unmapped = run(pacs(other_ids=(("x", "NOWHERE"),)), [fhir_patient("a")])
    assert unmapped.fhir_patient_id == "a" and Reason.ISSUER_UNMAPPED in unmapped.reasons


# --- demographic agreement ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fhir_changes", "pacs_changes", "reason"),
    [
        ({"birth": "1951-11-06"}, {}, Reason.BIRTH_DATE_MISMATCH),
        ({"birth": "1952"}, {}, Reason.BIRTH_DATE_MISMATCH),
        ({"gender": "female"}, {}, Reason.SEX_MISMATCH),
        ({"family": "Synth-Lima"}, {}, Reason.NAME_MISMATCH),
        ({"given": "Seven"}, {}, Reason.NAME_MISMATCH),
        ({}, {"sex": "F"}, Reason.SEX_MISMATCH),
    ],
)
def test_demographic_disagreement_is_a_conflict(
    fhir_changes: dict[str, Any], pacs_changes: dict[str, Any], reason: Reason
) -> None:
    result = run(pacs(**pacs_changes), [fhir_patient("a", **fhir_changes)])
    assert (result.outcome, result.fhir_patient_id) == (Outcome.CONFLICT, None)
    assert reason in result.reasons and result.candidate_ids == ("a",)


@pytest.mark.parametrize(
    ("fhir_changes", "pacs_changes", "reason"),
    [
        ({"birth": "1951-11"}, {}, Reason.BIRTH_DATE_PARTIAL),
        ({"birth": None}, {}, Reason.BIRTH_DATE_UNVERIFIED),
        ({}, {"birth": "19511332"}, Reason.BIRTH_DATE_UNVERIFIED),
        ({"gender": "unknown"}, {}, Reason.SEX_UNVERIFIED),
        ({"gender": None}, {}, Reason.SEX_UNVERIFIED),
        ({}, {"sex": "O"}, Reason.SEX_UNVERIFIED),
        ({}, {"name": ""}, Reason.NAME_UNVERIFIED),
        ({"family": "Synth-Ecko"}, {}, Reason.DEMOGRAPHICS_AGREE),  # a typo is no disagreement
    ],
)
def test_unknown_or_partial_demographics_do_not_block_an_identifier_match(
    fhir_changes: dict[str, Any], pacs_changes: dict[str, Any], reason: Reason
) -> None:
    result = run(pacs(**pacs_changes), [fhir_patient("a", **fhir_changes)])
    assert (result.outcome, result.fhir_patient_id) == (Outcome.MATCHED, "a")
    assert reason in result.reasons


def test_demographic_checks_are_configurable() -> None:
    relaxed = replace(CONFIG, demographics=DemographicPolicy(check_sex=False, name_threshold=0.5))
    assert run(pacs(), [fhir_patient("a", gender="female", family="Synth-Lima")], relaxed).matched
    with pytest.raises(ValueError, match="name_threshold"):
        DemographicPolicy(name_threshold=1.5)


# --- fallback -------------------------------------------------------------------------------------------------


def look_alike(patient_id: str, **changes: Any) -> dict[str, Any]:
    """A Patient with the PACS patient's demographics but no MRN in the mapped system."""
    return fhir_patient(patient_id, mrn=None, **changes)


def test_fallback_is_off_by_default() -> None:
    assert not CONFIG.fallback.enabled
    result = run(pacs(patient_id="999"), [look_alike("a")])
    assert (result.outcome, result.reasons) == (Outcome.UNMATCHED, (Reason.IDENTIFIER_NOT_FOUND,))


def test_fallback_links_one_clear_candidate() -> None:
    result = run(pacs(patient_id="999"), [look_alike("a"), look_alike("b", birth="1951-11-06")], FALLBACK)
    assert (result.outcome, result.fhir_patient_id) == (Outcome.MATCHED, "a")
    assert Reason.FALLBACK_MATCH in result.reasons and result.score == 1.0


def test_fallback_review_band_links_nothing() -> None:
    result = run(pacs(patient_id="999", name="SMITH^JOHN"), [look_alike("a", family="Smyth", given="John")], FALLBACK)
    assert result.outcome is Outcome.NEEDS_REVIEW and result.fhir_patient_id is None
    assert Reason.FALLBACK_REVIEW_BAND in result.reasons and result.candidate_ids == ("a",)
    assert result.score is not None and 0.88 <= result.score < 0.97


@pytest.mark.parametrize(
    ("candidates", "reason", "outcome"),
    [
        ([look_alike("a"), look_alike("b")], Reason.FALLBACK_AMBIGUOUS, Outcome.NEEDS_REVIEW),
        ([fhir_patient("a", mrn="7654321")], Reason.FALLBACK_IDENTIFIER_MISMATCH, Outcome.NEEDS_REVIEW),
        ([look_alike("a", active=False)], Reason.PATIENT_INACTIVE, Outcome.NEEDS_REVIEW),
        ([look_alike("a", family="Synth-Lima")], Reason.FALLBACK_BELOW_REVIEW_BAND, Outcome.UNMATCHED),
        ([look_alike("a", gender="female")], Reason.FALLBACK_NO_CANDIDATE, Outcome.UNMATCHED),
        ([look_alike("a", birth="1951-11")], Reason.FALLBACK_NO_CANDIDATE, Outcome.UNMATCHED),
        ([], Reason.FALLBACK_NO_CANDIDATE, Outcome.UNMATCHED),
    ],
)
def test_fallback_outcomes(candidates: list[dict[str, Any]], reason: Reason, outcome: Outcome) -> None:
    result = run(pacs(patient_id="999"), candidates, FALLBACK)
    assert (result.outcome, result.fhir_patient_id) == (outcome, None)
    assert reason in result.reasons


def test_fallback_follows_replaced_by() -> None:
    merged = [look_alike("old", active=False, replaced_by=["Patient/new"]), look_alike("new", birth="1951-11-05")]
    result = run(pacs(patient_id="999"), merged, FALLBACK)
    assert (result.outcome, result.fhir_patient_id) == (Outcome.MATCHED, "new")


def test_fallback_needs_a_birth_date_and_a_search() -> None:
    result = run(pacs(patient_id="999", birth=None), [look_alike("a")], FALLBACK)
    assert (result.outcome, result.reasons[-1]) == (Outcome.UNMATCHED, Reason.FALLBACK_NO_BIRTH_DATE)
    with pytest.raises(ValueError, match="by_birth_date"):
        match_patient(pacs(), Directory([]).directory(with_birth_date_search=False), FALLBACK)
    with pytest.raises(ValueError, match="review_threshold"):
        FallbackPolicy(enabled=True, link_threshold=0.8, review_threshold=0.9)


def test_match_studies_matches_each_patient_once() -> None:
    directory = Directory([fhir_patient("a"), fhir_patient("b", mrn="2")])
    first, second = pacs(), pacs(patient_id="2")
    studies = [StudyRef(uid, None, who, None, None) for uid, who in (("1.1", first), ("1.2", first), ("1.3", second))]
    outcomes = match_studies(studies, directory.directory(), CONFIG)
    assert {uid: m.fhir_patient_id for uid, m in outcomes.items()} == {"1.1": "a", "1.2": "a", "1.3": "b"}
    assert len(directory.searches) == 2  # one search per distinct PACS patient (the value as sent equals the norm)


def test_logs_carry_no_identifying_values(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="riskbridge.harmonize.identity")
    run(pacs(patient_id="H1-1234567"), [fhir_patient("a")])
    run(pacs(patient_id="999"), [look_alike("a")], FALLBACK)
    assert "identity" in caplog.text
    text = re.sub(r"\b[0-9a-f]{12}\b", "<hash>", caplog.text)  # uid_hash tags may contain any digits
    for secret in ("1234567", "SYNTH-ECHO", "ECHO", "THREE", "1951", "999"):
        assert secret.lower() not in text.lower(), secret


# --- ground truth: the synthetic cohort -----------------------------------------------------------------------

COHORT_SEED = 23
COHORT_PATIENTS = 40


@dataclass(frozen=True)
class CohortView:
    """What identity matching sees of a generated cohort: studies from DICOM, Patients from FHIR, the truth."""

    studies: list[StudyRef]
    patients: list[dict[str, Any]]
    truth: list[dict[str, Any]]
    mrn_system: str
    issuer: str


def _first_file(folder: Path) -> Path:
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            return _first_file(Path(entry.path))
        if entry.name.endswith(".dcm"):
            return Path(entry.path)
    raise FileNotFoundError(folder)


def _pacs_patient(header: pydicom.Dataset) -> PacsPatient:
    others = tuple(
        (str(item.get("PatientID", "")), item.get("IssuerOfPatientID"))
        for item in header.get("OtherPatientIDsSequence", [])
    )
    return PacsPatient(
        patient_id=str(header.get("PatientID", "")),
        issuer=header.get("IssuerOfPatientID"),
        other_ids=others,
        name=str(header.get("PatientName", "")),
        birth_date=header.get("PatientBirthDate"),
        sex=header.get("PatientSex"),
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CohortView]:
    out = tmp_path_factory.mktemp("identity") / "cohort"
    generate(out, patients=COHORT_PATIENTS, seed=COHORT_SEED)
    studies = []
    for study_dir in sorted((out / "dicom").iterdir()):
        header = pydicom.dcmread(_first_file(study_dir), stop_before_pixels=True)
        studies.append(
            StudyRef(str(header.StudyInstanceUID), header.get("AccessionNumber"), _pacs_patient(header), None, None)
        )
    patients = [
        entry["resource"]
        for bundle in sorted((out / "fhir").glob("*.json"))
        for entry in json.loads(bundle.read_text(encoding="utf-8"))["entry"]
        if entry["resource"]["resourceType"] == "Patient"
    ]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    identity = manifest["identity"]
    yield CohortView(studies, patients, read_truth(out), identity["mrn_system"], identity["pacs_issuer"])


def _cohort_config(view: CohortView, **changes: Any) -> IdentityConfig:
    return replace(IdentityConfig(issuer_systems={view.issuer: view.mrn_system}, default_issuer=view.issuer), **changes)


def _score(view: CohortView, outcomes: Mapping[str, IdentityMatch]) -> tuple[float, float, int]:
    """(precision, recall, automatic links) of the matched outcomes against the truth, per PACS patient."""
    truth_by_study = {}
    for record in view.truth:
        for study in [record["index_study"], *record["prior_studies"]]:
            truth_by_study[study["study_uid"]] = record["identity"]
    assert set(outcomes) == set(truth_by_study)
    linked = [(uid, m) for uid, m in outcomes.items() if m.outcome is Outcome.MATCHED]
    correct = sum(m.fhir_patient_id == truth_by_study[uid]["fhir_patient_id"] for uid, m in linked)
    expected = sum(t["outcome"] == "matched" for t in truth_by_study.values())
    precision = correct / len(linked) if linked else 1.0
    return precision, correct / expected, len(linked)


def test_cohort_identity_precision_and_recall(cohort: CohortView) -> None:
    directory = Directory(cohort.patients)
    outcomes = match_studies(cohort.studies, directory.directory(), _cohort_config(cohort))
    precision, recall, linked = _score(cohort, outcomes)
    print(f"identity on the synthetic cohort: precision {precision:.3f}, recall {recall:.3f}, {linked} studies linked")
    assert precision == 1.0
    # The rules the truth assumes are exactly ours: every outcome (matched, conflict, unmatched) agrees.
    by_study = {s.study_uid: s for s in cohort.studies}
    for record in cohort.truth:
        uid = record["index_study"]["study_uid"]
        result = outcomes[uid]
        expected = record["identity"]
        assert (result.outcome.value, result.fhir_patient_id) == (expected["outcome"], expected["fhir_patient_id"]), (
            record["patient_key"],
            expected["variant"],
            result.reasons,
        )
        if expected["outcome"] == "conflict":
            assert Reason.IDENTIFIER_MULTIPLE_PATIENTS in result.reasons
            assert set(result.candidate_ids) == set(expected["candidate_fhir_patient_ids"])
        variant = expected["variant"]
        if expected["outcome"] == "matched" and variant in ("leading_zeros", "site_prefix"):
            assert Reason.IDENTIFIER_NORMALIZED in result.reasons
        if variant == "missing_issuer":
            assert by_study[uid].patient.issuer is None
            assert Reason.DEFAULT_ISSUER_APPLIED in result.reasons
    variants = {record["identity"]["variant"] for record in cohort.truth}
    outcomes_seen = {record["identity"]["outcome"] for record in cohort.truth}
    assert variants == {"exact", "leading_zeros", "site_prefix", "missing_issuer"}
    assert outcomes_seen == {"matched", "conflict", "unmatched"}
    assert recall == 1.0


def test_cohort_with_the_fallback_enabled_links_nothing_more(cohort: CohortView) -> None:
    config = _cohort_config(cohort, fallback=FallbackPolicy(enabled=True))
    outcomes = match_studies(cohort.studies, Directory(cohort.patients).directory(), config)
    precision, recall, _ = _score(cohort, outcomes)
    print(f"identity with the fallback: precision {precision:.3f}, recall {recall:.3f}")
    assert precision == 1.0
    unmatched = [r for r in cohort.truth if r["identity"]["outcome"] == "unmatched"]
    assert unmatched
    for record in unmatched:
        assert outcomes[record["index_study"]["study_uid"]].outcome is Outcome.UNMATCHED


def test_cohort_merged_duplicate_charts_link_to_the_surviving_chart(cohort: CohortView) -> None:
    # Merge each duplicate chart of the same person (same birth date and sex) into the original, as a registry
    # does: the duplicate becomes inactive with a replaced-by link. Those patients then match the original.
    by_id = {p["id"]: p for p in cohort.patients}
    merged_into: set[str] = set()
    patients = []
    for patient in cohort.patients:
        original = by_id.get(patient["id"].removesuffix("-dup"))
        same_person = original is not None and all(original.get(k) == patient.get(k) for k in ("birthDate", "gender"))
        if original is not None and original is not patient and same_person:
            link = {"other": {"reference": f"Patient/{original['id']}"}, "type": "replaced-by"}
            patient = {**patient, "active": False, "link": [link]}
            merged_into.add(original["id"])
        patients.append(patient)
    assert merged_into, "the cohort has no same-person duplicate chart; pick another seed"
    outcomes = match_studies(cohort.studies, Directory(patients).directory(), _cohort_config(cohort))
    for record in cohort.truth:
        result = outcomes[record["index_study"]["study_uid"]]
        candidates = record["identity"]["candidate_fhir_patient_ids"]
        if candidates and candidates[0] in merged_into:
            assert (result.outcome, result.fhir_patient_id) == (Outcome.MATCHED, candidates[0])
            assert Reason.REPLACED_BY_FOLLOWED in result.reasons
        else:
            expected = record["identity"]
            assert (result.outcome.value, result.fhir_patient_id) == (expected["outcome"], expected["fhir_patient_id"])
