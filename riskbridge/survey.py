"""Feed survey: what a site's lab and note feeds send, judged the way the clinical stage would judge it.

``riskbridge survey --window A..B`` takes a sample of the window's cohort patients with the index times of their
CTs, fetches ALL their laboratory Observations (no code filter, so codes the feature spec does not use are seen
too) and their notes (:func:`fetch_survey_resources`), and classifies every resource with the clinical stage's
own functions (:func:`survey_resources`): the units table normalizes each value and converts it to the feature's
unit (:mod:`riskbridge.harmonize.units`), the feature's window and policy give each Observation its disposition
(:mod:`riskbridge.harmonize.windows`), and notes are read or left out by the stage's lookback and status rules
(:mod:`riskbridge.stages.clinical`). Nothing is written anywhere; onboarding a site starts here.

The :class:`Survey` says, per lab feature of the spec, which LOINC codes and unit spellings arrive and how often,
how many values convert, why the others do not (the units module's reason codes), how many lie outside the window
and what else the window excluded (entered in error, status, ...); which Observation codes map to no feature
(a known variant of a spec analyte in the units table, e.g. blood glucose 2339-0 while the spec reads 2345-7, or
a code the units table does not know); and what became of the notes. It holds codes, units, counts and shares
only: no patient id, name, identifier, value or date, so :meth:`Survey.lines` and :meth:`Survey.to_dict` can be
shown and shared. Which variants a feature reads stays a site decision (its feature spec's ``loinc`` lists).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any

from riskbridge.connectors.fhir import FhirClient, FhirError, date_filter, subject_patient_id
from riskbridge.connectors.fhir.notes import note_texts
from riskbridge.errors import ConfigurationError
from riskbridge.harmonize.features import FeatureSpec, LabFeature
from riskbridge.harmonize.units import LOINC_SYSTEM, UCUM_SYSTEM, UnitTable, default_table, loinc_codes
from riskbridge.harmonize.windows import Measurement, WindowReason, select_value

# The clinical stage's own per-value and per-note helpers, so the survey cannot drift from what a run decides.
from riskbridge.stages.clinical import UNUSABLE_NOTE_STATUSES, measurement_of, note_time

if TYPE_CHECKING:
    from riskbridge.ledger import Ledger
    from riskbridge.settings import Settings

__all__ = [
    "LAB_CATEGORY",
    "NOTE_RESOURCE_TYPES",
    "SURVEY_KIND",
    "FeatureSurvey",
    "NoteSurvey",
    "Survey",
    "SurveyScope",
    "UnmappedCode",
    "cohort_index_times",
    "fetch_survey_resources",
    "sample_patients",
    "survey_resources",
    "survey_window",
]

LOG = logging.getLogger(__name__)

LAB_CATEGORY = "laboratory"  # Observation.category token (any system: feeds use the HL7 one or their own)
NOTE_RESOURCE_TYPES = ("DocumentReference", "DiagnosticReport")
OUTSIDE_WINDOW = frozenset({WindowReason.BEFORE_WINDOW, WindowReason.AFTER_WINDOW})
# Window dispositions that are not exclusions by the window: the value was usable (or only its unit failed).
_NOT_WINDOW_EXCLUSIONS = frozenset({WindowReason.USED, WindowReason.SUPERSEDED, WindowReason.VALUE_UNUSABLE})
NO_UNIT = "(no unit)"
# Kinds of unmapped codes, in report order.
VARIANT = "variant"  # in the units table, same analyte as a spec feature, not in that feature's loinc list
TABLE_ONLY = "table_only"  # in the units table, an analyte no spec feature reads
UNKNOWN = "unknown"  # not LOINC, or a LOINC code the units table does not know
UNREADABLE = "unreadable"  # note disposition: an attachment could not be read (bad base64, Binary read failed)

ReadBinary = Callable[[str], tuple[bytes, str | None]]


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _counts(counter: Counter[str]) -> dict[str, int]:
    """A Counter as a dict, most common first (ties by key), for JSON."""
    return dict(sorted(counter.items(), key=lambda item: (-item[1], item[0])))


def _listing(counter: Counter[str], limit: int = 6) -> str:
    """``a x3, b x1`` with at most ``limit`` entries, the rest summed as ``+N more``."""
    items = list(_counts(counter).items())
    shown = ", ".join(f"{key} x{count}" for key, count in items[:limit])
    rest = sum(count for _, count in items[limit:])
    return shown + (f", +{rest} more" if rest else "") if items else "none"


@dataclass
class FeatureSurvey:
    """One lab feature of the spec: its Observations (those coded with one of its LOINC codes) and their fates.

    ``codes`` and ``units`` count Observations by LOINC code and unit spelling as sent. ``converted`` counts values
    the units table normalized and converted to the feature's unit; ``rejected`` counts the others by the units
    module's reason (``unit_unknown``, ``implausible``, ``unit_incompatible``, ...). Both count every Observation,
    whatever its time. ``window`` counts each Observation's disposition by the feature's window and policy (the
    first check that failed: ``used``, ``superseded``, ``before_window``, ``entered_in_error``, ...).
    ``patients_with_value``: patients for whom the feature got a value (it was not imputed).
    """

    feature: str
    unit: str
    loinc: tuple[str, ...]
    observations: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    units: Counter[str] = field(default_factory=Counter)
    converted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    window: Counter[str] = field(default_factory=Counter)
    patients_with_value: int = 0

    @property
    def converted_share(self) -> float | None:
        """The share of the feature's Observations with a usable value in its unit (None when there are none)."""
        return _share(self.converted, self.observations)

    @property
    def outside_window(self) -> int:
        """Observations before or after the feature's window."""
        return sum(self.window[str(code)] for code in OUTSIDE_WINDOW)

    @property
    def other_window(self) -> Counter[str]:
        """Window exclusions other than the window's edges: status, time, duplicates, outranked preliminaries."""
        skip = {str(code) for code in OUTSIDE_WINDOW | _NOT_WINDOW_EXCLUSIONS}
        return Counter({code: n for code, n in self.window.items() if code not in skip})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: counts, shares and the feature's settings."""
        return {
            "feature": self.feature,
            "unit": self.unit,
            "loinc": list(self.loinc),
            "observations": self.observations,
            "codes": _counts(self.codes),
            "units": _counts(self.units),
            "converted": self.converted,
            "converted_share": self.converted_share,
            "rejected": _counts(self.rejected),
            "outside_window": self.outside_window,
            "other_window": _counts(self.other_window),
            "window": _counts(self.window),
            "patients_with_value": self.patients_with_value,
        }


@dataclass
class UnmappedCode:
    """An Observation code that feeds no feature of the spec, with how often and in which units it came.

    ``kind``: ``variant`` (the units table knows it as the same analyte as a spec feature, which does not list it;
    ``features`` names them, ``convertible`` counts values that would convert to the first one's unit),
    ``table_only`` (the units table knows its analyte, no spec feature reads it) or ``unknown`` (not LOINC, or a
    LOINC code the units table does not know). ``display`` is the first coding display or code text seen.
    """

    system: str
    code: str
    display: str
    kind: str
    analyte: str | None = None
    features: tuple[str, ...] = ()
    count: int = 0
    units: Counter[str] = field(default_factory=Counter)
    convertible: int | None = None

    @property
    def key(self) -> str:
        """``system|code``, as a FHIR token search writes it."""
        return f"{self.system}|{self.code}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "system": self.system,
            "code": self.code,
            "display": self.display,
            "kind": self.kind,
            "analyte": self.analyte,
            "features": list(self.features),
            "count": self.count,
            "units": _counts(self.units),
            "convertible": self.convertible,
        }


@dataclass
class NoteSurvey:
    """The notes (DocumentReference, DiagnosticReport) by disposition, as the clinical stage decides it.

    ``dispositions``: ``used``, ``outside_lookback``, ``no_text``, ``no_time``, ``status`` (entered-in-error,
    cancelled, superseded) and ``unreadable`` (an attachment could not be read; the clinical stage would fail on
    it). ``patients_with_notes``: patients with at least one used note (the notes modality is present).
    """

    lookback_days: int
    total: int = 0
    resource_types: Counter[str] = field(default_factory=Counter)
    dispositions: Counter[str] = field(default_factory=Counter)
    patients_with_notes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "lookback_days": self.lookback_days,
            "total": self.total,
            "resource_types": _counts(self.resource_types),
            "dispositions": _counts(self.dispositions),
            "used_share": _share(self.dispositions["used"], self.total),
            "patients_with_notes": self.patients_with_notes,
        }


@dataclass
class Survey:
    """What a sample of patients' feeds hold for one feature spec: per feature, unmapped codes, and notes.

    Counts only: no patient id, identifier, value or date is kept, so every rendering can be shared.
    """

    spec: str
    patients: int
    observations: int
    features: tuple[FeatureSurvey, ...]
    unmapped: tuple[UnmappedCode, ...]
    notes: NoteSurvey

    @property
    def unmapped_count(self) -> int:
        """Observations whose code feeds no feature of the spec."""
        return sum(code.count for code in self.unmapped)

    @property
    def variant_count(self) -> int:
        """Unmapped Observations that the units table knows as a variant of a spec feature's analyte."""
        return sum(code.count for code in self.unmapped if code.kind == VARIANT)

    def feature(self, name: str) -> FeatureSurvey:
        """The survey of one lab feature; KeyError when the spec has no such lab."""
        for survey in self.features:
            if survey.feature == name:
                return survey
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``riskbridge survey --format json``)."""
        return {
            "spec": self.spec,
            "patients": self.patients,
            "observations": self.observations,
            "features": [feature.to_dict() for feature in self.features],
            "unmapped_count": self.unmapped_count,
            "variant_count": self.variant_count,
            "unmapped": [code.to_dict() for code in self.unmapped],
            "notes": self.notes.to_dict(),
        }

    def lines(self) -> list[str]:
        """Human-readable lines for the CLI: a header, one line per lab feature, the unmapped codes, the notes.

        Codes, units, counts and shares only (never a patient id, an identifier or a value).
        """
        out = [
            f"survey of {self.spec}: {self.patients} patients, {self.observations} laboratory Observations, "
            f"{self.notes.total} notes"
        ]
        for f in self.features:
            parts = [
                f"{f.feature} [{f.unit}; spec codes {', '.join(f.loinc)}]: {f.observations} Observations",
                f"codes {_listing(f.codes)}",
                f"units {_listing(f.units)}",
                f"converted {f.converted} ({_percent(f.converted, f.observations)})",
                f"rejected {_listing(f.rejected)}",
                f"outside window {f.outside_window}",
                f"other window exclusions {_listing(f.other_window)}",
                f"value for {f.patients_with_value} of {self.patients} patients "
                f"({_percent(f.patients_with_value, self.patients)})",
            ]
            out.append("; ".join(parts))
        out.append(
            f"unmapped: {self.unmapped_count} Observations of {len(self.unmapped)} codes feed no feature "
            f"({self.variant_count} are known variants of a spec analyte)"
        )
        for code in self.unmapped:
            if code.kind == VARIANT:
                what = f"variant of {', '.join(code.features)} (analyte {code.analyte}), not in the spec"
                tail = f"; {code.convertible} of {code.count} would convert"
            elif code.kind == TABLE_ONLY:
                what, tail = f"in the units table ({code.analyte}), no spec feature", ""
            else:
                what, tail = "unknown to the units table", ""
            display = f' "{code.display}"' if code.display else ""
            out.append(f"  {what}: {code.key}{display} x{code.count}; units {_listing(code.units)}{tail}")
        notes = self.notes
        out.append(
            f"notes (lookback {notes.lookback_days} days): {notes.total} ({_listing(notes.resource_types)}); "
            f"{_listing(notes.dispositions)}; notes for {notes.patients_with_notes} of {self.patients} patients "
            f"({_percent(notes.patients_with_notes, self.patients)})"
        )
        return out


# --- classification ---------------------------------------------------------------------------------------------


def _unit_sent(observation: Mapping[str, Any]) -> str:
    """The unit spelling an Observation came with: the Quantity's UCUM code, else its unit text; as sent."""
    quantity = observation.get("valueQuantity")
    if isinstance(quantity, Mapping):
        code, text = quantity.get("code"), quantity.get("unit")
        if isinstance(code, str) and code.strip() and quantity.get("system") == UCUM_SYSTEM:
            return code.strip()
        if isinstance(text, str) and text.strip():
            return text.strip()
        if isinstance(code, str) and code.strip():
            return code.strip()
        return NO_UNIT
    if "valueString" in observation:
        return "(valueString)"
    if "valueInteger" in observation:
        return NO_UNIT
    return "(no value)"


def _coding(observation: Mapping[str, Any]) -> tuple[str, str, str]:
    """(system, code, display) of an Observation: its first LOINC coding, else its first coding, else its text."""
    concept = observation.get("code") or {}
    codings = [c for c in concept.get("coding") or () if isinstance(c, Mapping) and isinstance(c.get("code"), str)]
    chosen = next((c for c in codings if c.get("system") == LOINC_SYSTEM), codings[0] if codings else None)
    text = concept.get("text")
    text = text if isinstance(text, str) else ""
    if chosen is None:
        return "", "(no code)", text
    display = chosen.get("display")
    return (
        str(chosen.get("system") or ""),
        str(chosen["code"]),
        display if isinstance(display, str) and display else text,
    )


def _feature_codes(spec: FeatureSpec) -> dict[str, LabFeature]:
    return {code: lab for lab in spec.labs for code in lab.loinc}


def _spec_analytes(spec: FeatureSpec, table: UnitTable) -> dict[str, list[LabFeature]]:
    """Analyte name -> the spec's lab features reading it (through any of their codes the table knows)."""
    analytes: dict[str, list[LabFeature]] = defaultdict(list)
    for lab in spec.labs:
        for code in lab.loinc:
            entry = table.entry(code)
            if entry is not None and lab not in analytes[entry.analyte.name]:
                analytes[entry.analyte.name].append(lab)
    return analytes


class _Unmapped:
    """Collects the Observations that feed no feature, per code."""

    def __init__(self, spec: FeatureSpec, table: UnitTable) -> None:
        self.table = table
        self.analytes = _spec_analytes(spec, table)
        self.codes: dict[tuple[str, str], UnmappedCode] = {}

    def add(self, observation: Mapping[str, Any]) -> None:
        system, code, display = _coding(observation)
        known = next((c for c in loinc_codes(observation) if self.table.entry(c) is not None), None)
        if known is not None:
            system, code = LOINC_SYSTEM, known
        item = self.codes.get((system, code))
        if item is None:
            item = self._new(system, code, display, known)
            self.codes[(system, code)] = item
        item.count += 1
        item.units[_unit_sent(observation)] += 1
        if item.kind == VARIANT and item.convertible is not None:
            lab = next(lab for lab in self.analytes[item.analyte or ""] if lab.name == item.features[0])
            if measurement_of(observation, code, lab.unit, self.table).value is not None:
                item.convertible += 1

    def _new(self, system: str, code: str, display: str, known: str | None) -> UnmappedCode:
        entry = self.table.entry(known) if known is not None else None
        if entry is None:
            return UnmappedCode(system, code, display, UNKNOWN)
        display = display or entry.display
        labs = self.analytes.get(entry.analyte.name, [])
        if labs:
            names = tuple(lab.name for lab in labs)
            return UnmappedCode(system, code, display, VARIANT, entry.analyte.name, names, convertible=0)
        return UnmappedCode(system, code, display, TABLE_ONLY, entry.analyte.name)

    def result(self) -> tuple[UnmappedCode, ...]:
        order = {VARIANT: 0, TABLE_ONLY: 1, UNKNOWN: 2}
        return tuple(sorted(self.codes.values(), key=lambda c: (order[c.kind], -c.count, c.system, c.code)))


def _note_disposition(
    resource: Mapping[str, Any], index: datetime, spec: FeatureSpec, zone: tzinfo | str, read_binary: ReadBinary
) -> str:
    """A note's disposition by the clinical stage's rules (status, time, lookback, text), or ``unreadable``."""
    moment = note_time(resource, zone)
    if str(resource.get("status", "")) in UNUSABLE_NOTE_STATUSES:
        return "status"
    if moment is None:
        return "no_time"
    if not index - spec.note_lookback <= moment <= index:
        return "outside_lookback"
    try:
        texts = note_texts(resource, read_binary)
    except (FhirError, ValueError):
        return UNREADABLE
    return "used" if texts else "no_text"


def _unread_binary(url: str) -> tuple[bytes, str | None]:
    """Stands in for a Binary read: the attachment counts as the text its contentType says, unread."""
    return b"", None


def survey_resources(
    spec: FeatureSpec,
    patients: Mapping[str, datetime],
    observations: Mapping[str, Sequence[Mapping[str, Any]]],
    notes: Mapping[str, Sequence[Mapping[str, Any]]],
    zone: tzinfo | str,
    table: UnitTable | None = None,
    *,
    read_binary: ReadBinary | None = None,
) -> Survey:
    """Classify a sample of patients' laboratory Observations and notes as the clinical stage would; no I/O.

    ``patients`` maps a FHIR Patient id to the index time of its CT (aware); ``observations`` and ``notes`` map it
    to all its laboratory Observations and its DocumentReference / DiagnosticReport resources (dicts, as the FHIR
    server returns them; see :func:`fetch_survey_resources`). ``zone`` is the site zone for times without an
    offset; ``table`` the units table (default: the package's). Each Observation coded with a spec feature's LOINC
    code is normalized, converted to the feature's unit and put through the feature's window around the index
    time; every other Observation is counted as unmapped by its code. A note attachment given by URL is read with
    ``read_binary`` (e.g. ``FhirClient.read_binary``); without it, it counts as the text its contentType says,
    unread. Raises ValueError for a naive index time.
    """
    table = table or default_table()
    for index in patients.values():
        if index.tzinfo is None or index.utcoffset() is None:
            raise ValueError("every index time must carry its offset")
    reader = read_binary or _unread_binary
    by_code = _feature_codes(spec)
    features = {lab.name: FeatureSurvey(lab.name, lab.unit, lab.loinc) for lab in spec.labs}
    unmapped = _Unmapped(spec, table)
    note_survey = NoteSurvey(lookback_days=spec.note_lookback.days)
    total = 0
    for patient_id, index in patients.items():
        mine = list(observations.get(patient_id, ()))
        total += len(mine)
        grouped: dict[str, list[tuple[str, Mapping[str, Any]]]] = defaultdict(list)
        for observation in mine:
            lab_code = next((c for c in loinc_codes(observation) if c in by_code), None)
            if lab_code is None:
                unmapped.add(observation)
            else:
                grouped[by_code[lab_code].name].append((lab_code, observation))
        for lab in spec.labs:
            # The clinical stage's grouping: a feature reads every Observation with one of its codes.
            items = [(c, o) for c, o in grouped.get(lab.name, ()) if c in lab.loinc]
            _survey_feature(features[lab.name], lab, index, items, table, zone)
        documents = list(notes.get(patient_id, ()))
        dispositions = [_note_disposition(note, index, spec, zone, reader) for note in documents]
        note_survey.total += len(documents)
        note_survey.resource_types.update(str(note.get("resourceType", "?")) for note in documents)
        note_survey.dispositions.update(dispositions)
        note_survey.patients_with_notes += "used" in dispositions
    return Survey(
        spec=spec.label,
        patients=len(patients),
        observations=total,
        features=tuple(features[lab.name] for lab in spec.labs),
        unmapped=unmapped.result(),
        notes=note_survey,
    )


def _survey_feature(
    survey: FeatureSurvey,
    lab: LabFeature,
    index: datetime,
    items: Iterable[tuple[str, Mapping[str, Any]]],
    table: UnitTable,
    zone: tzinfo | str,
) -> None:
    """Add one patient's Observations of one feature to its survey (units first, then the window)."""
    measurements: list[Measurement] = []
    for code, observation in items:
        measurement = measurement_of(observation, code, lab.unit, table)
        measurements.append(measurement)
        survey.observations += 1
        survey.codes[code] += 1
        survey.units[_unit_sent(observation)] += 1
        if measurement.value is not None:
            survey.converted += 1
        else:
            survey.rejected[measurement.value_reason or "no_value"] += 1
    selection = select_value(lab.window, index, measurements, zone)
    survey.window.update(str(d.code) for d in selection.dispositions)
    survey.patients_with_value += selection.value is not None


# --- fetching ---------------------------------------------------------------------------------------------------


def _by_patient(
    client: FhirClient, resource_type: str, ids: Sequence[str], params: list[tuple[str, str]]
) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for resource in client.search_by_patients(resource_type, ids, params):
        owner = subject_patient_id(resource)
        if owner is not None:
            grouped[owner].append(resource)
    return grouped


def fetch_survey_resources(
    client: FhirClient, patient_ids: Sequence[str], since: datetime | None
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """All laboratory Observations and all notes of these patients, grouped by FHIR Patient id.

    Observations: ``category=laboratory`` and no code filter (so the survey sees codes the spec does not use);
    notes: DocumentReference and DiagnosticReport. With ``since`` (aware; e.g. the window's start less the note
    lookback) every search is bounded by ``date=ge<since>``. Searches are batched across patients with the
    client's OR-lists (:meth:`FhirClient.search_by_patients`). Returns (observations, notes); a patient without
    resources has no key.
    """
    ids = list(dict.fromkeys(patient_ids))
    if not ids:
        return {}, {}
    dates = [("date", value) for value in date_filter(since)]
    observations = _by_patient(client, "Observation", ids, [("category", LAB_CATEGORY), *dates])
    notes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for resource_type in NOTE_RESOURCE_TYPES:
        for patient_id, resources in _by_patient(client, resource_type, ids, dates).items():
            notes[patient_id].extend(resources)
    return dict(observations), dict(notes)


# --- the cohort of a window -------------------------------------------------------------------------------------

SURVEY_KIND = "survey"
SURVEY_STAGES = "match"  # discover finds the window's CT studies, match ties them to FHIR Patients: nothing more


@dataclass(frozen=True)
class SurveyScope:
    """Which patients a survey sampled: the ledger run that found the cohort, its matched patients, the sample."""

    run_id: int
    studies: int
    matched_patients: int
    sampled: int


def cohort_index_times(ledger: Ledger, run_id: int, zone: str) -> dict[str, datetime]:
    """FHIR Patient id -> the index time of the patient's first CT of the run (matched studies only; the index
    time from StudyDate/StudyTime, as discover judges the window; studies without one are left out)."""
    from riskbridge.harmonize.windows import IndexTimeError, index_time_of_study
    from riskbridge.stages.match import study_ref

    with ledger.transaction() as cursor:
        cursor.execute(
            """SELECT s.*, d.fhir_patient_id FROM studies s JOIN identity_decisions d USING (run_id, study_uid)
               WHERE s.run_id = %s AND d.outcome = 'matched' ORDER BY s.study_uid""",
            (run_id,),
        )
        rows = cursor.fetchall()
    first: dict[str, datetime] = {}
    for row in rows:
        try:
            moment = index_time_of_study(study_ref(row), zone).moment
        except IndexTimeError:
            continue
        patient = str(row["fhir_patient_id"])
        if patient not in first or moment < first[patient]:
            first[patient] = moment
    return first


def sample_patients(patients: Iterable[str], size: int) -> list[str]:
    """A deterministic sample of ``size`` patient ids: the first by a hash of the id (the same cohort gives the same
    sample; the order says nothing about the patients)."""
    return sorted(patients, key=lambda patient: hashlib.sha256(patient.encode()).hexdigest())[:size]


def survey_window(
    settings: Settings,
    window: tuple[datetime, datetime],
    sample: int = 200,
    run_key: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[Survey, SurveyScope]:
    """Survey the feeds of the window's cohort (see the module docstring): a run of kind ``survey`` finds the CT
    studies and matches their patients (resumable by ``run_key``, default ``cli:survey:<window>``), then ``sample``
    of the matched patients' laboratory Observations and notes are fetched and classified. Nothing is retrieved or
    written to the FHIR server. ConfigurationError without a site zone."""
    from riskbridge.coverage import Interval
    from riskbridge.harmonize.units import load_table
    from riskbridge.pipeline import Pipeline

    zone = settings.site.timezone
    if zone is None:
        raise ConfigurationError("set site.timezone (RISKBRIDGE_SITE__TIMEZONE): a survey judges windows in site time")
    with Pipeline.from_settings(settings) as pipeline:
        key = run_key or f"cli:survey:{Interval(*window)}"
        run_id = pipeline.start_run(SURVEY_KIND, key, window, rescore=True)
        pipeline.run_stages(run_id, progress, until=SURVEY_STAGES)
        with pipeline.ledger.transaction() as cursor:
            cursor.execute("SELECT count(*) AS n FROM studies WHERE run_id = %s", (run_id,))
            studies = int(cursor.fetchone()["n"])
        index_times = cohort_index_times(pipeline.ledger, run_id, zone)
        chosen = sample_patients(index_times, sample)
        spec = pipeline.context.spec
        client = pipeline.context.fhir()
        longest = max([spec.note_lookback, *(lab.window.before for lab in spec.labs)])
        since = min((index_times[p] for p in chosen), default=window[0]) - longest - timedelta(days=30)
        observations, notes = fetch_survey_resources(client, chosen, since)
        table = load_table(settings.units_table) if settings.units_table else None
        result = survey_resources(
            spec, {p: index_times[p] for p in chosen}, observations, notes, zone, table, read_binary=client.read_binary
        )
        pipeline.finish_run(run_id)
    LOG.info("survey run %d: %d studies, %d matched patients, %d sampled", run_id, studies, len(index_times),
             len(chosen))  # fmt: skip
    return result, SurveyScope(run_id, studies, len(index_times), len(chosen))
