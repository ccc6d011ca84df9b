"""The clinical stage from Python: labs, notes and demographics of many patients, fetched in few FHIR searches and
turned into the feature spec's vectors, with the fate of every value recorded.

For each patient (a FHIR Patient id and the index time of its CT): Observations of the spec's LOINC codes in the
span of every window are fetched batched across patients; each is normalized to the feature's unit
(:mod:`riskbridge.harmonize.units`) and the window policy picks the value (:mod:`riskbridge.harmonize.windows`);
DocumentReference and DiagnosticReport notes of the lookback, and Conditions, give the comorbidity flags
(:mod:`riskbridge.harmonize.notes`); Patient gives age and sex. No Airflow here.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any

from riskbridge.connectors.fhir import FhirClient, code_filter, date_filter, subject_patient_id
from riskbridge.harmonize import notes as note_flags
from riskbridge.harmonize.features import (
    FeatureSpec,
    FeatureVector,
    LabFeature,
    build_vector,
    resolve_feature_spec,
)
from riskbridge.harmonize.units import LOINC_SYSTEM, Exclusion, UnitTable, default_table, load_table, loinc_codes
from riskbridge.harmonize.windows import Measurement, WindowSelection, parse_fhir_datetime, select_value
from riskbridge.settings import Settings

LOG = logging.getLogger(__name__)

UNUSABLE_NOTE_STATUSES = frozenset({"entered-in-error", "cancelled", "superseded"})


@dataclass(frozen=True)
class PatientIndex:
    """A patient to harmonize: the FHIR Patient id (from identity matching) and the CT's index time (aware)."""

    patient_id: str
    index_time: datetime


@dataclass(frozen=True)
class NoteDisposition:
    """Why a note was read or left out (``used``, ``status``, ``outside_lookback``, ``no_time``, ``no_text``)."""

    resource_type: str
    resource_id: str
    code: str


@dataclass
class ClinicalResult:
    """One patient's harmonized clinical inputs: the vector, and every decision behind it."""

    patient_id: str
    vector: FeatureVector
    labs: dict[str, WindowSelection] = field(default_factory=dict)
    notes: list[NoteDisposition] = field(default_factory=list)
    comorbidities: note_flags.PatientComorbidities | None = None

    @property
    def observation_ids(self) -> tuple[str, ...]:
        """The Observations behind the lab values (the RiskAssessment's basis)."""
        return tuple(ident for selection in self.labs.values() for ident in selection.used)

    @property
    def document_ids(self) -> tuple[str, ...]:
        """The DocumentReferences read for the note flags (the RiskAssessment's basis)."""
        return tuple(n.resource_id for n in self.notes if n.code == "used" and n.resource_type == "DocumentReference")


def _measurement(observation: Mapping[str, Any], loinc: str, unit: str, table: UnitTable) -> Measurement:
    """The Observation with its value in ``unit`` (the feature's), or None and the units module's reason."""
    normalized = table.normalize(observation)
    if isinstance(normalized, Exclusion):
        return Measurement(observation, None, str(normalized.reason))
    if normalized.unit != unit:
        converted = table.convert(normalized.value, normalized.unit, loinc, target=unit)
        if isinstance(converted, Exclusion):
            return Measurement(observation, None, str(converted.reason))
        return Measurement(observation, converted.value)
    return Measurement(observation, normalized.value)


def _age_years(birth_date: str | None, index_time: datetime) -> float | None:
    if not birth_date or len(birth_date) < 10:
        return None  # a partial birth date gives no reliable age
    try:
        born = date.fromisoformat(birth_date[:10])
    except ValueError:
        return None
    at = index_time.date()
    return float(at.year - born.year - ((at.month, at.day) < (born.month, born.day)))


def _sex_male(gender: str | None) -> float | None:
    return {"male": 1.0, "female": 0.0}.get(gender or "")


def _note_time(resource: Mapping[str, Any], zone: tzinfo | str) -> datetime | None:
    keys = ("date",) if resource.get("resourceType") == "DocumentReference" else ("effectiveDateTime", "issued")
    for key in keys:
        value = resource.get(key)
        if isinstance(value, str) and value.strip():
            try:
                return parse_fhir_datetime(value, zone).midpoint
            except ValueError:
                return None
    return None


def _span(patients: Sequence[PatientIndex], before: timedelta, after: timedelta) -> tuple[datetime, datetime]:
    moments = [p.index_time.astimezone(UTC) for p in patients]
    return min(moments) - before, max(moments) + after


class ClinicalStage:
    """Fetches and harmonizes the clinical inputs of a batch of patients for one feature spec."""

    @classmethod
    def from_settings(cls, client: FhirClient, settings: Settings) -> ClinicalStage:
        """The stage the settings describe: ``feature_spec``, ``site.timezone`` and ``units_table``."""
        if settings.site.timezone is None:
            raise ValueError("set site.timezone (RISKBRIDGE_SITE__TIMEZONE), e.g. 'America/New_York'")
        spec = resolve_feature_spec(settings.feature_spec)
        table = load_table(settings.units_table) if settings.units_table else None
        return cls(client, spec, settings.site.timezone, table)

    def __init__(
        self, client: FhirClient, spec: FeatureSpec, zone: tzinfo | str, table: UnitTable | None = None
    ) -> None:
        self.client = client
        self.spec = spec
        self.zone = zone
        self.table = table or default_table()

    def _observations(self, patients: Sequence[PatientIndex]) -> dict[str, list[dict[str, Any]]]:
        codes = sorted({code for lab in self.spec.labs for code in lab.loinc})
        if not codes:
            return {}
        before = max(lab.window.before for lab in self.spec.labs)
        after = max(lab.window.after for lab in self.spec.labs)
        start, end = _span(patients, before, after)
        params = [("code", code_filter(LOINC_SYSTEM, codes)), *(("date", d) for d in date_filter(start, end))]
        return self._by_patient("Observation", [p.patient_id for p in patients], params)

    def _measurements(self, lab: LabFeature, observations: Iterable[Mapping[str, Any]]) -> list[Measurement]:
        """The feature's Observations, each normalized to the feature's unit (or None with the reason)."""
        measurements = []
        for observation in observations:
            codes = [code for code in loinc_codes(observation) if code in lab.loinc]
            if codes:
                measurements.append(_measurement(observation, codes[0], lab.unit, self.table))
        return measurements

    def _by_patient(
        self, resource_type: str, ids: Iterable[str], params: Any = None
    ) -> dict[str, list[dict[str, Any]]]:
        grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for resource in self.client.search_by_patients(resource_type, ids, params):
            owner = subject_patient_id(resource)
            if owner is not None:
                grouped[owner].append(resource)
        return grouped

    def _notes(
        self, patient: PatientIndex, resources: Sequence[Mapping[str, Any]]
    ) -> tuple[list[tuple[str, str]], list[NoteDisposition]]:
        texts: list[tuple[str, str]] = []
        dispositions: list[NoteDisposition] = []
        first = patient.index_time - self.spec.note_lookback
        for resource in resources:
            kind, ident = str(resource.get("resourceType")), str(resource.get("id", ""))
            moment = _note_time(resource, self.zone)
            if str(resource.get("status", "")) in UNUSABLE_NOTE_STATUSES:
                code = "status"
            elif moment is None:
                code = "no_time"
            elif not first <= moment <= patient.index_time:
                code = "outside_lookback"
            else:
                parts = [note.text for note in self.client.note_texts(resource)]
                code = "used" if parts else "no_text"
                if parts:
                    texts.append((f"{kind}/{ident}", "\n".join(parts)))
            dispositions.append(NoteDisposition(kind, ident, code))
        return texts, dispositions

    def run(self, patients: Sequence[PatientIndex]) -> dict[str, ClinicalResult]:
        """Harmonize every patient of the batch; one :class:`ClinicalResult` per FHIR Patient id."""
        if not patients:
            return {}
        for patient in patients:
            if patient.index_time.tzinfo is None:
                raise ValueError(f"patient {patient.patient_id}: the index time must carry its offset")
        ids = [p.patient_id for p in patients]
        observations = self._observations(patients)
        start, end = _span(patients, self.spec.note_lookback, timedelta(0))
        note_params = [("date", d) for d in date_filter(start, end)]
        documents = self._by_patient("DocumentReference", ids, note_params)
        reports = self._by_patient("DiagnosticReport", ids)
        conditions = self._by_patient("Condition", ids)
        people = {
            str(resource.get("id")): resource
            for resource in self.client.search_by_patients("Patient", ids, patient_param="_id")
        }
        results: dict[str, ClinicalResult] = {}
        lab_values: dict[str, dict[str, float | None]] = {}
        demographics: dict[str, dict[str, float | None]] = {}
        note_texts: dict[str, list[tuple[str, str]]] = {}
        for patient in patients:
            pid = patient.patient_id
            mine = observations.get(pid, [])
            selections = {
                lab.name: select_value(lab.window, patient.index_time, self._measurements(lab, mine), self.zone)
                for lab in self.spec.labs
            }
            lab_values[pid] = {name: selection.value for name, selection in selections.items()}
            note_texts[pid], dispositions = self._notes(patient, [*documents.get(pid, []), *reports.get(pid, [])])
            person = people.get(pid, {})
            demographics[pid] = {
                "age_years": _age_years(person.get("birthDate"), patient.index_time),
                "sex_male": _sex_male(person.get("gender")),
            }
            results[pid] = ClinicalResult(pid, build_vector(self.spec, {}, None, {}), selections, dispositions)
        found = note_flags.extract_comorbidities_batch(note_texts, conditions)
        for pid, result in results.items():
            result.comorbidities = found.get(pid)
            flags = result.comorbidities.as_booleans(self.spec.flags) if result.comorbidities is not None else None
            result.vector = build_vector(self.spec, lab_values[pid], flags, demographics[pid])
        LOG.info("clinical: %d patients, %d Observations", len(patients), sum(len(v) for v in observations.values()))
        return results
