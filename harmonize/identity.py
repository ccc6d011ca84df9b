"""Identity matching: which FHIR Patient a PACS patient is, decided by rules that never guess.

A PACS patient (:class:`~riskbridge.records.PacsPatient`: PatientID, IssuerOfPatientID, OtherPatientIDsSequence,
PatientName, PatientBirthDate, PatientSex) is linked to a FHIR Patient in three steps (docs/identity.md):

1. **Exact identifier.** Every PACS identifier whose issuer maps to a FHIR identifier system (a missing issuer
   takes the site's default issuer) is normalized (whitespace, case, site prefix, leading zeros; configurable)
   and looked up. Every Patient found is followed along ``Patient.link`` type ``replaced-by`` (bounded depth,
   cycle-safe). An identifier that resolves to more than one distinct Patient, or identifiers that resolve to
   different Patients, are a *conflict*, never a match. A single resolved Patient that is inactive needs review.
2. **Demographic agreement.** Birth date, sex and name (rapidfuzz Jaro-Winkler on normalized family and given
   names) of the identifier-matched Patient must not disagree with the PACS; any disagreement is a *conflict*.
3. **Optional fallback** (off by default), only when no identifier resolved: Patients with the exact birth date
   are scored by name similarity; one clear candidate above the link threshold is linked, candidates in the review
   band (or several, or one whose MRN differs) *need review*, nothing else links.

The FHIR server is reached through injected callables (:class:`PatientDirectory`) that return plain FHIR Patient
dicts, so this module is pure and tested without a server. Every outcome carries stable reason codes
(:class:`Reason`). Logs name PACS patients by :func:`~riskbridge.records.uid_hash` of the PatientID only.

The site configuration (:class:`IdentityConfig` and its policies) lives in
:mod:`riskbridge.harmonize.identity_config`, name comparison (:func:`name_similarity`) in
:mod:`riskbridge.harmonize.identity_names`; both are importable from here too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import Any

from riskbridge.harmonize.identity_config import (
    DEFAULT_SITE_PREFIX_PATTERN,
    DemographicPolicy,
    FallbackPolicy,
    IdentifierNormalization,
    IdentityConfig,
)
from riskbridge.harmonize.identity_names import PatientResource, name_similarity, normalize_name, pacs_name_parts
from riskbridge.records import PacsPatient, StudyRef, uid_hash

__all__ = [
    "DEFAULT_SITE_PREFIX_PATTERN",
    "REPLACED_BY",
    "DemographicPolicy",
    "FallbackPolicy",
    "IdentifierNormalization",
    "IdentityConfig",
    "IdentityMatch",
    "Outcome",
    "PatientDirectory",
    "PatientResource",
    "Reason",
    "match_patient",
    "match_studies",
    "name_similarity",
    "normalize_name",
    "pacs_name_parts",
    "resolve_replacements",
]

LOG = logging.getLogger(__name__)

REPLACED_BY = "replaced-by"


class Outcome(StrEnum):
    """What identity matching concluded for one PACS patient (and so for each of its studies)."""

    MATCHED = "matched"
    NEEDS_REVIEW = "needs-review"
    UNMATCHED = "unmatched"
    CONFLICT = "conflict"


class Reason(StrEnum):
    """Stable reason codes recorded with every outcome (docs/identity.md lists which outcome each leads to)."""

    # How a link was found, and what was (or could not be) verified.
    IDENTIFIER_MATCH = "identifier_match"
    OTHER_IDENTIFIER_MATCH = "other_identifier_match"
    DEFAULT_ISSUER_APPLIED = "default_issuer_applied"
    IDENTIFIER_NORMALIZED = "identifier_normalized"
    REPLACED_BY_FOLLOWED = "replaced_by_followed"
    DEMOGRAPHICS_AGREE = "demographics_agree"
    BIRTH_DATE_PARTIAL = "birth_date_partial"
    BIRTH_DATE_UNVERIFIED = "birth_date_unverified"
    SEX_UNVERIFIED = "sex_unverified"
    NAME_UNVERIFIED = "name_unverified"
    FALLBACK_MATCH = "fallback_match"
    # Why an identifier could not be used or found.
    ISSUER_MISSING = "issuer_missing"
    ISSUER_UNMAPPED = "issuer_unmapped"
    IDENTIFIER_EMPTY = "identifier_empty"
    IDENTIFIER_NOT_FOUND = "identifier_not_found"
    FALLBACK_NO_BIRTH_DATE = "fallback_no_birth_date"
    FALLBACK_NO_CANDIDATE = "fallback_no_candidate"
    FALLBACK_BELOW_REVIEW_BAND = "fallback_below_review_band"
    # Conflicts.
    IDENTIFIER_MULTIPLE_PATIENTS = "identifier_multiple_patients"
    IDENTIFIERS_DISAGREE = "identifiers_disagree"
    BIRTH_DATE_MISMATCH = "birth_date_mismatch"
    SEX_MISMATCH = "sex_mismatch"
    NAME_MISMATCH = "name_mismatch"
    LINK_CYCLE = "link_cycle"
    LINK_CHAIN_TOO_LONG = "link_chain_too_long"
    LINK_TARGET_MISSING = "link_target_missing"
    LINK_AMBIGUOUS = "link_ambiguous"
    # Needs review.
    PATIENT_INACTIVE = "patient_inactive"
    FALLBACK_REVIEW_BAND = "fallback_review_band"
    FALLBACK_AMBIGUOUS = "fallback_ambiguous"
    FALLBACK_IDENTIFIER_MISMATCH = "fallback_identifier_mismatch"


# --- FHIR access ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientDirectory:
    """How identity matching reaches the FHIR server (plain FHIR Patient dicts in, nothing else).

    ``by_identifier(system, value)``: the Patients a token search ``identifier=system|value`` returns.
    ``read(id)``: the Patient with that id, or None when it does not exist (404/410), for following replaced-by.
    ``by_birth_date("YYYY-MM-DD")``: Patients born that day (``birthdate=`` search), needed only by the fallback.
    """

    by_identifier: Callable[[str, str], Sequence[PatientResource]]
    read: Callable[[str], PatientResource | None]
    by_birth_date: Callable[[str], Sequence[PatientResource]] | None = None


# --- result ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentityMatch:
    """The identity outcome for one PACS patient.

    ``fhir_patient_id`` is set only when ``outcome`` is matched; ``candidate_ids`` lists the Patients considered
    (after following replaced-by), for the reviewer; ``score`` is the best fallback name score when the fallback
    ran. ``reasons`` are :class:`Reason` codes, in the order they arose.
    """

    outcome: Outcome
    fhir_patient_id: str | None
    reasons: tuple[Reason, ...]
    candidate_ids: tuple[str, ...] = ()
    score: float | None = None

    @property
    def matched(self) -> bool:
        """True when the study may be linked to ``fhir_patient_id`` automatically."""
        return self.outcome is Outcome.MATCHED


# --- dates, sex -----------------------------------------------------------------------------------------------


def _pacs_birth_date(value: str | None) -> date | None:
    """A DICOM DA (YYYYMMDD, or the old YYYY.MM.DD form) as a date; None when missing or invalid."""
    text = (value or "").strip().replace(".", "")
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _fhir_birth_date(value: Any) -> tuple[int, ...] | None:
    """A FHIR date (YYYY, YYYY-MM or YYYY-MM-DD) as its known parts; None when missing or invalid."""
    if not isinstance(value, str):
        return None
    found = re.fullmatch(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?", value.strip())
    if found is None:
        return None
    return tuple(int(part) for part in found.groups() if part is not None)


_PACS_SEX = {"M": "male", "F": "female", "O": "other"}
_COMPARABLE_SEX = ("male", "female")


def _check_demographics(pacs: PacsPatient, patient: PatientResource, policy: DemographicPolicy) -> list[Reason]:
    """Reasons from comparing demographics: mismatches (conflicts) and unverified or partial checks."""
    reasons: list[Reason] = []
    if policy.check_birth_date:
        pacs_birth = _pacs_birth_date(pacs.birth_date)
        fhir_birth = _fhir_birth_date(patient.get("birthDate"))
        if pacs_birth is None or fhir_birth is None:
            reasons.append(Reason.BIRTH_DATE_UNVERIFIED)
        elif (pacs_birth.year, pacs_birth.month, pacs_birth.day)[: len(fhir_birth)] != fhir_birth:
            reasons.append(Reason.BIRTH_DATE_MISMATCH)
        elif len(fhir_birth) < 3:
            reasons.append(Reason.BIRTH_DATE_PARTIAL)
    if policy.check_sex:
        pacs_sex = _PACS_SEX.get((pacs.sex or "").strip().upper())
        fhir_sex = patient.get("gender")
        # Only male/female are compared: "other" and "unknown" say too little to contradict anything.
        if pacs_sex in _COMPARABLE_SEX and fhir_sex in _COMPARABLE_SEX:
            if pacs_sex != fhir_sex:
                reasons.append(Reason.SEX_MISMATCH)
        else:
            reasons.append(Reason.SEX_UNVERIFIED)
    if policy.check_name:
        similarity = name_similarity(pacs.name, patient)
        if similarity is None:
            reasons.append(Reason.NAME_UNVERIFIED)
        elif similarity < policy.name_threshold:
            reasons.append(Reason.NAME_MISMATCH)
    return reasons


_MISMATCHES = (Reason.BIRTH_DATE_MISMATCH, Reason.SEX_MISMATCH, Reason.NAME_MISMATCH)


# --- identifiers and links ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PacsIdentifier:
    """One PACS identifier mapped to a FHIR system, with its normalized value."""

    system: str
    raw: str
    normalized: str
    normalization: IdentifierNormalization
    primary: bool


def _pacs_identifiers(pacs: PacsPatient, config: IdentityConfig) -> tuple[list[_PacsIdentifier], list[Reason]]:
    """The PACS patient's identifiers that can be looked up, and why others cannot."""
    usable: list[_PacsIdentifier] = []
    reasons: list[Reason] = []
    entries = [(pacs.patient_id, pacs.issuer, True), *((value, issuer, False) for value, issuer in pacs.other_ids)]
    for value, issuer, primary in entries:
        if not (value or "").strip():
            if primary:
                reasons.append(Reason.IDENTIFIER_EMPTY)
            continue
        issuer_text = (issuer or "").strip()
        if not issuer_text:
            if config.default_issuer is None:
                reasons.append(Reason.ISSUER_MISSING)
                continue
            issuer_text = config.default_issuer
            reasons.append(Reason.DEFAULT_ISSUER_APPLIED)
        system = config.system_for(issuer_text)
        if system is None:
            reasons.append(Reason.ISSUER_UNMAPPED)
            continue
        normalization = config.normalization_for(issuer_text)
        normalized = normalization.normalize(value)
        if not normalized:
            reasons.append(Reason.IDENTIFIER_EMPTY)
            continue
        if normalized != value.strip():
            reasons.append(Reason.IDENTIFIER_NORMALIZED)
        usable.append(_PacsIdentifier(system, value.strip(), normalized, normalization, primary))
    return usable, reasons


def _search_values(identifier: _PacsIdentifier, widths: Iterable[int]) -> list[str]:
    """The values to search for: the normalized one, the value as sent, and zero-padded forms; no repeats."""
    values = [identifier.normalized, identifier.raw, *(identifier.normalized.zfill(width) for width in widths)]
    return list(dict.fromkeys(values))


def _carries(patient: PatientResource, identifier: _PacsIdentifier) -> bool:
    """True when the Patient has ``identifier``'s system with a value that normalizes to the same value."""
    return any(
        isinstance(entry, Mapping)
        and entry.get("system") == identifier.system
        and isinstance(entry.get("value"), str)
        and identifier.normalization.normalize(entry["value"]) == identifier.normalized
        for entry in patient.get("identifier") or []
    )


def _has_other_value(patient: PatientResource, identifier: _PacsIdentifier) -> bool:
    """True when the Patient has ``identifier``'s system but none of its values normalizes to the PACS value."""
    in_system = [
        entry
        for entry in patient.get("identifier") or []
        if isinstance(entry, Mapping) and entry.get("system") == identifier.system
    ]
    return bool(in_system) and not _carries(patient, identifier)


def _patient_id(patient: PatientResource) -> str | None:
    value = patient.get("id")
    return value if isinstance(value, str) and value and patient.get("resourceType", "Patient") == "Patient" else None


def _reference_id(reference: Any) -> str | None:
    """The Patient id in a reference (``Patient/x``, an absolute URL, or with ``/_history/n``); None otherwise."""
    if not isinstance(reference, str):
        return None
    found = re.search(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$", reference.strip())
    return found.group(1) if found else None


def _replaced_by_targets(patient: PatientResource) -> list[str | None]:
    """The targets of a Patient's replaced-by links (None for a link whose target is not a Patient reference)."""
    targets: list[str | None] = []
    for link in patient.get("link") or []:
        if isinstance(link, Mapping) and link.get("type") == REPLACED_BY:
            other = link.get("other")
            targets.append(_reference_id(other.get("reference")) if isinstance(other, Mapping) else None)
    return targets


def resolve_replacements(
    patient: PatientResource, read: Callable[[str], PatientResource | None], max_depth: int
) -> tuple[PatientResource | None, int, Reason | None]:
    """Follow ``replaced-by`` links from ``patient`` to the Patient that is in use.

    Returns ``(patient, links_followed, problem)``. ``problem`` is ``link_cycle`` (a Patient seen twice),
    ``link_chain_too_long`` (more than ``max_depth`` links), ``link_target_missing`` (the target cannot be read
    or is not a Patient reference) or ``link_ambiguous`` (several different replaced-by targets); the patient is
    None then. Other link types (``replaces``, ``refer``, ``seealso``) are not followed.
    """
    seen = {_patient_id(patient)}
    current = patient
    for depth in range(max_depth + 1):
        targets = set(_replaced_by_targets(current))
        if not targets:
            return current, depth, None
        if len(targets) > 1:
            return None, depth, Reason.LINK_AMBIGUOUS
        if depth == max_depth:
            return None, depth, Reason.LINK_CHAIN_TOO_LONG
        (target,) = targets
        if target is None:
            return None, depth, Reason.LINK_TARGET_MISSING
        if target in seen:
            return None, depth, Reason.LINK_CYCLE
        following = read(target)
        if following is None or _patient_id(following) is None:
            return None, depth, Reason.LINK_TARGET_MISSING
        seen.add(target)
        current = following
    raise AssertionError("unreachable: the loop returns at depth == max_depth")


def _resolve_all(
    found: Iterable[PatientResource], directory: PatientDirectory, max_depth: int
) -> tuple[dict[str, PatientResource], list[Reason]]:
    """Distinct Patients (by id) the found ones resolve to, and the reasons (links followed, link problems)."""
    resolved: dict[str, PatientResource] = {}
    reasons: list[Reason] = []
    for patient in found:
        final, followed, problem = resolve_replacements(patient, directory.read, max_depth)
        if problem is not None:
            reasons.append(problem)
            continue
        assert final is not None  # no problem means a Patient was reached
        final_id = _patient_id(final)
        if final_id is None:
            continue
        if followed:
            reasons.append(Reason.REPLACED_BY_FOLLOWED)
        resolved[final_id] = final
    return resolved, reasons


def _is_inactive(patient: PatientResource) -> bool:
    # Only an explicit false counts: registries commonly omit ``active`` on records that are in use.
    return patient.get("active") is False


def _dedupe(reasons: Iterable[Reason]) -> tuple[Reason, ...]:
    return tuple(dict.fromkeys(reasons))


_LINK_PROBLEMS = (Reason.LINK_CYCLE, Reason.LINK_CHAIN_TOO_LONG, Reason.LINK_TARGET_MISSING, Reason.LINK_AMBIGUOUS)


# --- matching -------------------------------------------------------------------------------------------------


def match_patient(pacs: PacsPatient, directory: PatientDirectory, config: IdentityConfig) -> IdentityMatch:
    """Decide which FHIR Patient ``pacs`` is: matched, needs-review, unmatched or conflict, with reasons.

    Raises ValueError when the fallback is enabled but ``directory.by_birth_date`` is missing.
    """
    if config.fallback.enabled and directory.by_birth_date is None:
        raise ValueError("the identity fallback is enabled but PatientDirectory.by_birth_date is not set")
    identifiers, reasons = _pacs_identifiers(pacs, config)
    by_identifier: list[tuple[_PacsIdentifier, dict[str, PatientResource]]] = []
    for identifier in identifiers:
        found: dict[str, PatientResource] = {}
        for value in _search_values(identifier, config.search_zero_padded_widths):
            for patient in directory.by_identifier(identifier.system, value):
                patient_id = _patient_id(patient)
                # Token search may be looser than our normalization (or the server fuzzier): keep exact carriers.
                if patient_id is not None and _carries(patient, identifier):
                    found[patient_id] = patient
        resolved, link_reasons = _resolve_all(found.values(), directory, config.max_link_depth)
        reasons += link_reasons
        if any(reason in _LINK_PROBLEMS for reason in link_reasons):
            # A Patient we found but cannot resolve may be the right one: linking any other would be a guess.
            return _finish(pacs, Outcome.CONFLICT, None, reasons, [*found, *resolved])
        if len(resolved) > 1:
            reasons.append(Reason.IDENTIFIER_MULTIPLE_PATIENTS)
            return _finish(pacs, Outcome.CONFLICT, None, reasons, list(resolved))
        if resolved:
            by_identifier.append((identifier, resolved))
    resolved_ids = {patient_id for _, resolved in by_identifier for patient_id in resolved}
    if len(resolved_ids) > 1:
        reasons.append(Reason.IDENTIFIERS_DISAGREE)
        return _finish(pacs, Outcome.CONFLICT, None, reasons, sorted(resolved_ids))
    if resolved_ids:
        (patient_id,) = resolved_ids
        patient = next(resolved[patient_id] for _, resolved in by_identifier)
        primary = any(identifier.primary for identifier, _ in by_identifier)
        reasons.append(Reason.IDENTIFIER_MATCH if primary else Reason.OTHER_IDENTIFIER_MATCH)
        return _judge_identified(pacs, patient_id, patient, reasons, config)
    if identifiers:
        reasons.append(Reason.IDENTIFIER_NOT_FOUND)
    if not config.fallback.enabled:
        return _finish(pacs, Outcome.UNMATCHED, None, reasons, [])
    return _fallback(pacs, identifiers, directory, config, reasons)


def _judge_identified(
    pacs: PacsPatient, patient_id: str, patient: PatientResource, reasons: list[Reason], config: IdentityConfig
) -> IdentityMatch:
    """The outcome for the one Patient the identifiers resolved to: demographics, then activity."""
    checks = _check_demographics(pacs, patient, config.demographics)
    reasons += checks
    if any(check in _MISMATCHES for check in checks):
        return _finish(pacs, Outcome.CONFLICT, None, reasons, [patient_id])
    if _is_inactive(patient):
        reasons.append(Reason.PATIENT_INACTIVE)
        return _finish(pacs, Outcome.NEEDS_REVIEW, None, reasons, [patient_id])
    reasons.append(Reason.DEMOGRAPHICS_AGREE)
    return _finish(pacs, Outcome.MATCHED, patient_id, reasons, [patient_id])


def _fallback(
    pacs: PacsPatient,
    identifiers: list[_PacsIdentifier],
    directory: PatientDirectory,
    config: IdentityConfig,
    reasons: list[Reason],
) -> IdentityMatch:
    """Jaro-Winkler on names among Patients with the exact birth date; a review band links nothing."""
    policy = config.fallback
    birth = _pacs_birth_date(pacs.birth_date)
    if birth is None:
        reasons.append(Reason.FALLBACK_NO_BIRTH_DATE)
        return _finish(pacs, Outcome.UNMATCHED, None, reasons, [])
    assert directory.by_birth_date is not None  # checked in match_patient
    found = {
        patient_id: patient
        for patient in directory.by_birth_date(birth.isoformat())
        if (patient_id := _patient_id(patient)) is not None
    }
    resolved, link_reasons = _resolve_all(found.values(), directory, config.max_link_depth)
    # A broken link among demographic look-alikes makes that candidate unusable, not the whole patient a conflict.
    reasons += [reason for reason in link_reasons if reason is Reason.REPLACED_BY_FOLLOWED]
    scored: list[tuple[float, str, PatientResource]] = []
    exact_birth = (birth.year, birth.month, birth.day)
    for patient_id, patient in resolved.items():
        if _fhir_birth_date(patient.get("birthDate")) != exact_birth:
            continue
        checks = _check_demographics(pacs, patient, DemographicPolicy(check_name=False, check_birth_date=False))
        if Reason.SEX_MISMATCH in checks:
            continue
        score = name_similarity(pacs.name, patient)
        if score is not None:
            scored.append((score, patient_id, patient))
    if not scored:
        reasons.append(Reason.FALLBACK_NO_CANDIDATE)
        return _finish(pacs, Outcome.UNMATCHED, None, reasons, [])
    scored.sort(key=lambda item: (-item[0], item[1]))
    best_score = scored[0][0]
    in_band = [item for item in scored if item[0] >= policy.review_threshold]
    if not in_band:
        reasons.append(Reason.FALLBACK_BELOW_REVIEW_BAND)
        return _finish(pacs, Outcome.UNMATCHED, None, reasons, [], best_score)
    candidate_ids = [patient_id for _, patient_id, _ in in_band]
    if len(in_band) > 1:
        reasons.append(Reason.FALLBACK_AMBIGUOUS)
        return _finish(pacs, Outcome.NEEDS_REVIEW, None, reasons, candidate_ids, best_score)
    score, patient_id, patient = in_band[0]
    review: list[Reason] = []
    if score < policy.link_threshold:
        review.append(Reason.FALLBACK_REVIEW_BAND)
    if any(_has_other_value(patient, identifier) for identifier in identifiers):
        # Same name and birth date but a different MRN in the same system: two people, or a registration error.
        review.append(Reason.FALLBACK_IDENTIFIER_MISMATCH)
    if _is_inactive(patient):
        review.append(Reason.PATIENT_INACTIVE)
    if review:
        return _finish(pacs, Outcome.NEEDS_REVIEW, None, [*reasons, *review], candidate_ids, score)
    reasons.append(Reason.FALLBACK_MATCH)
    return _finish(pacs, Outcome.MATCHED, patient_id, reasons, candidate_ids, score)


def _finish(
    pacs: PacsPatient,
    outcome: Outcome,
    patient_id: str | None,
    reasons: Iterable[Reason],
    candidate_ids: Iterable[str],
    score: float | None = None,
) -> IdentityMatch:
    result = IdentityMatch(outcome, patient_id, _dedupe(reasons), tuple(dict.fromkeys(candidate_ids)), score)
    LOG.info(
        "identity %s: %s (%s)",
        uid_hash(pacs.patient_id),
        outcome.value,
        ", ".join(reason.value for reason in result.reasons),
    )
    return result


def match_studies(
    studies: Iterable[StudyRef], directory: PatientDirectory, config: IdentityConfig
) -> dict[str, IdentityMatch]:
    """The identity outcome per StudyInstanceUID; a PACS patient with several studies is matched once."""
    by_patient: dict[PacsPatient, IdentityMatch] = {}
    outcomes: dict[str, IdentityMatch] = {}
    for study in studies:
        if study.patient not in by_patient:
            by_patient[study.patient] = match_patient(study.patient, directory, config)
        outcomes[study.study_uid] = by_patient[study.patient]
    return outcomes
