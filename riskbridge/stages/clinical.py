"""The clinical stage: labs, notes and demographics of many patients, fetched in few FHIR searches and turned into
the feature spec's vectors, with the fate of every value recorded.

For each patient (a FHIR Patient id and the index time of its CT): Observations of the spec's LOINC codes in the
span of every window are fetched batched across patients; each is normalized to the feature's unit
(:mod:`riskbridge.harmonize.units`) and the window policy picks the value (:mod:`riskbridge.harmonize.windows`);
DocumentReference and DiagnosticReport notes of the lookback, and Conditions, give the comorbidity flags
(:mod:`riskbridge.harmonize.notes`); Patient gives age and sex (:class:`ClinicalHarmonizer`).

The stage runs over chunks of retrieved studies; a patient with two studies (two index times) goes in two batches.
Each study's vector, every Observation's and every note's disposition and every comorbidity mention are recorded
in one transaction (``features``, ``clinical_values``, ``note_dispositions``, ``note_findings``).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any

import psycopg2.extras

from riskbridge.connectors.fhir import AttachmentError, FhirClient, code_filter, date_filter, subject_patient_id
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
from riskbridge.ledger import Ledger
from riskbridge.settings import Settings
from riskbridge.stages.base import Cursor, PipelineError, Progress, StageContext

LOG = logging.getLogger(__name__)

NAME = "clinical"

UNUSABLE_NOTE_STATUSES = frozenset({"entered-in-error", "cancelled", "superseded"})


@dataclass(frozen=True)
class PatientIndex:
    """A patient to harmonize: the FHIR Patient id (from identity matching) and the CT's index time (aware)."""

    patient_id: str
    index_time: datetime


@dataclass(frozen=True)
class NoteDisposition:
    """Why a note was read or left out (``used``, ``status``, ``outside_lookback``, ``no_time``, ``no_text``, or
    ``unreadable``: its attachment could not be read, the patient's other notes still count)."""

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


def measurement_of(observation: Mapping[str, Any], loinc: str, unit: str, table: UnitTable) -> Measurement:
    """The Observation with its value in ``unit`` (the feature's), or None and the units module's reason (also what
    ``riskbridge survey`` counts, so a survey and a night decide alike)."""
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


def note_time(resource: Mapping[str, Any], zone: tzinfo | str) -> datetime | None:
    """The time a note is judged by (a DocumentReference's ``date``, a DiagnosticReport's effective time or issue
    time) read in ``zone`` when it has no offset; None when it has none or it does not parse."""
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


class ClinicalHarmonizer:
    """Fetches and harmonizes the clinical inputs of a batch of patients for one feature spec."""

    @classmethod
    def from_settings(cls, client: FhirClient, settings: Settings) -> ClinicalHarmonizer:
        """The stage the settings describe: ``feature_spec``, ``site.timezone`` and ``units_table``."""
        if settings.site.timezone is None:
            raise PipelineError("set site.timezone (RISKBRIDGE_SITE__TIMEZONE), e.g. 'America/New_York'")
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
                measurements.append(measurement_of(observation, codes[0], lab.unit, self.table))
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
            moment = note_time(resource, self.zone)
            if str(resource.get("status", "")) in UNUSABLE_NOTE_STATUSES:
                code = "status"
            elif moment is None:
                code = "no_time"
            elif not first <= moment <= patient.index_time:
                code = "outside_lookback"
            else:
                try:
                    parts = [note.text for note in self.client.note_texts(resource)]
                except AttachmentError as exc:  # this note's attachment only; a failing server still fails the chunk
                    LOG.warning("clinical: %s/%s: note unreadable (%s)", kind, ident, exc.status or type(exc).__name__)
                    parts, code = [], "unreadable"
                else:
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
        index_times = {patient.patient_id: patient.index_time for patient in patients}
        found = note_flags.extract_comorbidities_batch(note_texts, conditions, None, index_times, self.zone)
        for pid, result in results.items():
            result.comorbidities = found.get(pid)
            flags = result.comorbidities.as_booleans(self.spec.flags) if result.comorbidities is not None else None
            result.vector = build_vector(self.spec, lab_values[pid], flags, demographics[pid])
        LOG.info("clinical: %d patients, %d Observations", len(patients), sum(len(v) for v in observations.values()))
        return results


# --- the stage --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClinicalTask:
    """A retrieved study whose clinical data is still to fetch: the matched FHIR Patient and the index time."""

    study_uid: str
    fhir_patient_id: str
    index_time: datetime


@dataclass(frozen=True)
class StoredVector:
    """A study's feature vector as the clinical stage stored it, with the FHIR ids behind it (the write-back's
    basis)."""

    study_uid: str
    fhir_patient_id: str
    vector: FeatureVector
    observation_ids: tuple[str, ...]
    document_ids: tuple[str, ...]


def feature_vector_of(row: Mapping[str, Any]) -> FeatureVector:
    """The :class:`FeatureVector` of a ``features`` row (its spec, names, values and observed flags)."""
    return FeatureVector(
        row["spec"],
        tuple(row["names"]),
        tuple(float(v) for v in row["feature_values"]),
        tuple(bool(v) for v in row["observed"]),
    )


def stored_vector(row: Mapping[str, Any]) -> StoredVector:
    """A ``features`` row (with any columns joined to it) as a :class:`StoredVector`."""
    return StoredVector(
        study_uid=row["study_uid"],
        fhir_patient_id=row["fhir_patient_id"],
        vector=feature_vector_of(row),
        observation_ids=tuple(row["observation_ids"]),
        document_ids=tuple(row["document_ids"]),
    )


def pending(ledger: Ledger, run_id: int) -> list[ClinicalTask]:
    """Retrieved studies of the run without a feature vector, with their patient and index time."""
    with ledger.transaction() as cursor:
        cursor.execute(
            """SELECT r.study_uid, d.fhir_patient_id, r.index_time FROM retrievals r
               JOIN identity_decisions d USING (run_id, study_uid)
               LEFT JOIN features f USING (run_id, study_uid)
               WHERE r.run_id = %s AND r.complete AND f.study_uid IS NULL ORDER BY r.study_uid""",
            (run_id,),
        )
        return [ClinicalTask(r["study_uid"], r["fhir_patient_id"], r["index_time"]) for r in cursor.fetchall()]


def record(ledger: Ledger, run_id: int, study_uid: str, result: ClinicalResult, units: Mapping[str, str]) -> bool:
    """Record a study's :class:`ClinicalResult` (for its patient): every Observation's disposition, every note's,
    every comorbidity mention, and the feature vector. ``units`` maps a lab feature to its canonical unit.
    Returns False when the study already had a vector (nothing is written then)."""
    vector = result.vector
    with ledger.transaction() as cursor:
        cursor.execute(
            """INSERT INTO features (run_id, study_uid, fhir_patient_id, spec, names, feature_values, observed,
                   observation_ids, document_ids) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT DO NOTHING""",
            (
                run_id,
                study_uid,
                result.patient_id,
                vector.spec,
                list(vector.names),
                list(vector.values),
                list(vector.observed),
                list(result.observation_ids),
                list(result.document_ids),
            ),
        )
        if not cursor.rowcount:
            return False
        rows = []
        for feature, selection in result.labs.items():
            for disposition in selection.dispositions:
                used = str(disposition.code) == "used"
                rows.append(
                    (
                        run_id,
                        study_uid,
                        feature,
                        disposition.observation_id,
                        str(disposition.code),
                        disposition.status,
                        disposition.time,
                        selection.value if used else None,
                        units.get(feature) if used else None,
                        disposition.detail,
                    )
                )
        psycopg2.extras.execute_values(
            cursor,
            """INSERT INTO clinical_values (run_id, study_uid, feature, observation_id, code, status, effective,
                   value, unit, detail) VALUES %s ON CONFLICT DO NOTHING""",
            rows,
        )
        psycopg2.extras.execute_values(
            cursor,
            """INSERT INTO note_dispositions (run_id, study_uid, resource_type, resource_id, code) VALUES %s
               ON CONFLICT DO NOTHING""",
            [(run_id, study_uid, n.resource_type, n.resource_id, n.code) for n in result.notes],
        )
        mentions = []
        if result.comorbidities is not None:
            for evidence in result.comorbidities.flags.values():
                for mention in evidence.mentions:
                    mentions.append(
                        (
                            run_id,
                            study_uid,
                            mention.note_id,
                            mention.flag,
                            mention.start,
                            mention.end,
                            str(mention.assertion),
                            mention.counts,
                        )
                    )
        psycopg2.extras.execute_values(
            cursor,
            """INSERT INTO note_findings (run_id, study_uid, note_id, flag, span_start, span_end, assertion,
                   counts) VALUES %s ON CONFLICT DO NOTHING""",
            mentions,
        )
    return True


def warm_up(context: StageContext) -> None:
    """Build the notes' spaCy pipeline (spaCy and medspaCy, whose imports reach nltk and scipy: about 4 s on the
    development VM) and load the unit table (pint's UCUM registry, about 1 s); both are kept for ``work``."""
    note_flags.build_pipeline(None)
    default_table()


def pending_items(context: StageContext, run_id: int) -> list[str]:
    """StudyInstanceUIDs retrieved and without a feature vector yet: the items the stage is chunked over."""
    return [task.study_uid for task in pending(context.ledger, run_id)]


def work(context: StageContext, run_id: int, items: Sequence[str] | None, progress: Progress | None) -> Counter[str]:
    """Fetch and harmonize the labs, notes and demographics of these studies' patients (batched FHIR searches),
    recording every value's and every note's fate and the feature vector."""
    counts: Counter[str] = Counter()
    ledger = context.ledger
    wanted = set(items) if items is not None else None
    tasks = [task for task in pending(ledger, run_id) if wanted is None or task.study_uid in wanted]
    if not tasks:
        return counts
    harmonizer = context.kept(NAME, lambda: ClinicalHarmonizer.from_settings(context.fhir(), context.settings))
    units = {lab.name: lab.unit for lab in harmonizer.spec.labs}
    # The harmonizer answers per patient: a patient with two studies (two index times) goes in two batches.
    batches: list[list[ClinicalTask]] = []
    for task in tasks:
        batch = next((b for b in batches if all(t.fhir_patient_id != task.fhir_patient_id for t in b)), None)
        if batch is None:
            batches.append([task])
        else:
            batch.append(task)
    done = 0
    for batch in batches:
        results = harmonizer.run([PatientIndex(t.fhir_patient_id, t.index_time) for t in batch])
        for task in batch:
            if record(ledger, run_id, task.study_uid, results[task.fhir_patient_id], units):
                counts["done"] += 1
        done += len(batch)
        if progress:
            progress(done, len(tasks))
    return counts


def counts(cursor: Cursor, run_id: int) -> Counter[str]:
    """Studies with a feature vector."""
    cursor.execute("SELECT count(*) AS n FROM features WHERE run_id = %s", (run_id,))
    return Counter(done=int(cursor.fetchone()["n"]))
