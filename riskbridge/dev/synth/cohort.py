"""Generative model of the synthetic cohort and its ground truth (pure: no I/O, no clock, no global state).

:func:`build_cohort` turns ``(seed, patients, size, rates)`` into a list of :class:`PatientSpec` records that say
everything the writers need (identities, studies and series with their UIDs, lab observations with their raw
values, notes with their text) and everything the pipeline is expected to conclude (:func:`truth_record`).
The same arguments always give the same cohort: every random draw comes from a ``numpy`` generator seeded from
the seed and a fixed key, every UID is a hash of the cohort id and a fixed path, and every timestamp is an offset
from the cohort's anchor (:data:`ANCHOR` unless another winter date is given, so that cohorts can sit in windows
of their own). docs/synthetic-cohort.md describes the model, the edge cases and the truth schema.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime, timedelta, timezone
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from riskbridge.errors import ConfigurationError

GENERATOR_VERSION = "1.0.1"  # 1.0.1: sodium varies additively-small, not by 15% (values of 68-232 mmol/L)

# pydicom's UID root; with entropy sources generate_uid() is a hash, hence deterministic.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
SITE_TZ = timezone(timedelta(hours=-5))
# End (exclusive) of the index window; index CTs fall in the INDEX_WINDOW_DAYS days before it.
ANCHOR = datetime(2024, 1, 15, 0, 0, 0, tzinfo=SITE_TZ)
INDEX_WINDOW_DAYS = 14
# Default window policy the truth is computed for.
LAB_WINDOW = timedelta(hours=48)
NOTE_LOOKBACK = timedelta(days=365)

MRN_SYSTEM = "http://hospital.example/mrn"
PACS_ISSUER = "SYNTH_HOSP"
SITE_TIMEZONE = "America/New_York"  # the zone of the synthetic hospital (its times carry -05:00 in January)
SITE_PREFIX = "H1-"
# The radiology system's own patient IDs (edge case pacs_mrn_in_other_ids): an issuer no identity map knows.
RADIOLOGY_ISSUER = "SYNTH_RAD"
RADIOLOGY_PREFIX = "R"
SYNTH_ID_SYSTEM = "urn:riskbridge:synth"
INSTITUTION = "SYNTH GENERAL HOSPITAL"

QUARANTINE_CODES = ("identity_conflict", "identity_unmatched", "no_usable_series")
EDGE_CASE_CODES = (
    "pacs_id_leading_zeros",
    "pacs_id_site_prefix",
    "pacs_missing_issuer",
    "pacs_mrn_in_other_ids",
    "shared_mrn",
    "no_fhir_patient",
    "no_usable_series",
    "no_labs",
    "no_notes",
    "prior_study",
    "lab_entered_in_error",
    "lab_amended",
    "lab_censored",
    "lab_window_boundary",
    "note_entered_in_error",
)
# Edge cases a cohort has only when asked for (rate 0 by default), so the default cohorts stay as they were.
OPT_IN_EDGE_CASES = ("pacs_mrn_in_other_ids",)
USABLE_LAB_STATUSES = ("final", "amended", "corrected")


class CohortError(ConfigurationError, ValueError):
    """Raised for invalid cohort parameters (size, rates, patient count)."""


@dataclass(frozen=True)
class EdgeCaseRates:
    """Fraction of the cohort's patients that get each edge case (quota = floor(rate * patients + 0.5)).

    The first five are mutually exclusive (each patient gets at most one of them); the PACS-ID formats are
    mutually exclusive among themselves; the rest combine freely. Lab edge cases only go to patients with
    labs, the note edge case only to patients with notes. The defaults hit every case at least once in a
    30-patient cohort.
    """

    shared_mrn: float = 0.05
    no_fhir_patient: float = 0.05
    no_usable_series: float = 0.07
    no_labs: float = 0.07
    no_notes: float = 0.07
    pacs_id_leading_zeros: float = 0.10
    pacs_id_site_prefix: float = 0.10
    pacs_missing_issuer: float = 0.07
    # The PACS's PatientID is the radiology system's own ID; the MRN is only in OtherPatientIDsSequence.
    pacs_mrn_in_other_ids: float = 0.0
    prior_study: float = 0.10
    lab_entered_in_error: float = 0.15
    lab_amended: float = 0.15
    lab_censored: float = 0.10
    lab_window_boundary: float = 0.15
    note_entered_in_error: float = 0.10
    # Not edge cases, just study variety: a dose-report SR in the study, IV contrast.
    dose_report: float = 0.5
    contrast: float = 0.5

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise CohortError(f"rates.{item.name}: must be a number in [0, 1] (value {value!r})")
        exclusive = self.shared_mrn + self.no_fhir_patient + self.no_usable_series + self.no_labs + self.no_notes
        if exclusive > 1.0:
            raise CohortError("rates: shared_mrn + no_fhir_patient + no_usable_series + no_labs + no_notes > 1")
        formats = (
            self.pacs_id_leading_zeros
            + self.pacs_id_site_prefix
            + self.pacs_missing_issuer
            + self.pacs_mrn_in_other_ids
        )
        if formats > 1.0:
            raise CohortError("rates: the four PACS patient-ID formats add up to more than 1")


@dataclass(frozen=True)
class SizePreset:
    """Image geometry of a cohort size: matrix, thin-slice count, coronal-reformat slice count."""

    matrix: int
    n_thin: int
    n_coronal: int
    fov_mm: float = 360.0


SIZES: dict[str, SizePreset] = {
    "small": SizePreset(matrix=128, n_thin=64, n_coronal=32),
    "full": SizePreset(matrix=512, n_thin=128, n_coronal=80),
}


@dataclass(frozen=True)
class Scanner:
    """How one manufacturer's scanner names, numbers and encodes the series of a chest CT."""

    manufacturer: str
    model: str
    software: str
    thin_mm: float
    thick_mm: float
    lung_kernel: str
    soft_kernel: str
    localizer_kernel: str
    descriptions: dict[str, str]
    numbers: dict[str, int]
    signed: bool
    intercept: float
    padding: int | None
    weight: float


SCANNERS: tuple[Scanner, ...] = (
    Scanner(
        "SIEMENS",
        "SOMATOM Definition AS+",
        "syngo CT VA48A",
        1.0,
        5.0,
        "B70f",
        "B31f",
        "T20s",
        {
            "localizer": "Topogram  0.6  T20s",
            "thin_lung": "Thorax  1.0  B70f",
            "thin_soft": "Thorax  1.0  B31f",
            "thick_soft": "Thorax  5.0  B31f",
            "coronal": "Thorax COR  3.0  B31f",
            "dose_sr": "Dose Report",
        },
        {"localizer": 1, "thin_soft": 2, "thin_lung": 3, "thick_soft": 4, "coronal": 5, "dose_sr": 501},
        False,
        -1024.0,
        None,
        0.35,
    ),
    Scanner(
        "GE MEDICAL SYSTEMS",
        "Revolution CT",
        "revo_v1.0",
        1.25,
        5.0,
        "LUNG",
        "STANDARD",
        "STANDARD",
        {
            "localizer": "Scout",
            "thin_lung": "1.25mm Lung",
            "thin_soft": "1.25mm Std",
            "thick_soft": "5mm Std",
            "coronal": "Coronal 3mm",
            "dose_sr": "Dose Report",
        },
        {"localizer": 1, "thick_soft": 2, "thin_soft": 3, "thin_lung": 4, "coronal": 5, "dose_sr": 999},
        True,
        -1024.0,
        -2000,
        0.30,
    ),
    Scanner(
        "Philips",
        "iCT 256",
        "4.1.6",
        1.0,
        3.0,
        "L",
        "B",
        "B",
        {
            "localizer": "Surview",
            "thin_lung": "Lung 1mm",
            "thin_soft": "Chest 1mm",
            "thick_soft": "Chest 3mm",
            "coronal": "Chest Cor 3mm",
            "dose_sr": "Dose Info",
        },
        {"localizer": 1, "thick_soft": 2, "thin_soft": 3, "thin_lung": 4, "coronal": 5, "dose_sr": 1001},
        False,
        -1024.0,
        None,
        0.20,
    ),
    Scanner(
        "CANON_MEC",
        "Aquilion ONE",
        "V10.4",
        1.0,
        5.0,
        "FC86",
        "FC08",
        "FC10",
        {
            "localizer": "Scanogram",
            "thin_lung": "Lung 1.0 FC86",
            "thin_soft": "Body 1.0 FC08",
            "thick_soft": "Body 5.0 FC08",
            "coronal": "MPR COR 3.0",
            "dose_sr": "Dose Report",
        },
        {"localizer": 1, "thin_lung": 2, "thin_soft": 3, "thick_soft": 4, "coronal": 5, "dose_sr": 9000},
        True,
        0.0,
        None,
        0.15,
    ),
)
SCANNER_BY_NAME = {scanner.manufacturer: scanner for scanner in SCANNERS}

SERIES_IMAGE_TYPES: dict[str, tuple[str, ...]] = {
    "localizer": ("ORIGINAL", "PRIMARY", "LOCALIZER"),
    "thin_lung": ("ORIGINAL", "PRIMARY", "AXIAL"),
    "thin_soft": ("ORIGINAL", "PRIMARY", "AXIAL"),
    "thick_soft": ("ORIGINAL", "PRIMARY", "AXIAL"),
    "coronal": ("DERIVED", "SECONDARY", "REFORMATTED"),
    "dose_sr": (),
}
# The series the model is trained on: thin (<= 1.5 mm) ORIGINAL axial lung-kernel reconstruction.
CORRECT_SERIES_KIND = "thin_lung"


# --- labs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitSpelling:
    """One way a feed writes a lab unit: the text, the UCUM code sent (or None), factor to canonical, decimals."""

    unit: str
    code: str | None
    factor: float
    decimals: int


@dataclass(frozen=True)
class LabSpec:
    """A lab feature: LOINC code(s), display, canonical unit and the spellings feeds use."""

    feature: str
    loinc: str
    display: str
    canonical_unit: str
    spellings: tuple[UnitSpelling, ...]
    alt_loinc: tuple[tuple[str, str], ...] = ()


MW_CREATININE = 113.12  # g/mol
MW_GLUCOSE = 180.156  # g/mol

LABS: dict[str, LabSpec] = {
    "wbc": LabSpec(
        "wbc",
        "6690-2",
        "Leukocytes [#/volume] in Blood by Automated count",
        "10*3/uL",
        (
            UnitSpelling("10*3/uL", "10*3/uL", 1.0, 1),
            UnitSpelling("K/uL", "K/uL", 1.0, 1),
            UnitSpelling("x10^9/L", "10*9/L", 1.0, 1),
            UnitSpelling("10^3/uL", None, 1.0, 1),
            UnitSpelling("/uL", "/uL", 0.001, -1),
        ),
    ),
    "crp": LabSpec(
        "crp",
        "1988-5",
        "C reactive protein [Mass/volume] in Serum or Plasma",
        "mg/L",
        (
            UnitSpelling("mg/L", "mg/L", 1.0, 1),
            UnitSpelling("mg/dL", "mg/dL", 10.0, 2),
            UnitSpelling("mg/dl", None, 10.0, 2),
        ),
    ),
    "creatinine": LabSpec(
        "creatinine",
        "2160-0",
        "Creatinine [Mass/volume] in Serum or Plasma",
        "mg/dL",
        (
            UnitSpelling("mg/dL", "mg/dL", 1.0, 2),
            UnitSpelling("mg/dl", None, 1.0, 2),
            UnitSpelling("umol/L", "umol/L", MW_CREATININE / 10000.0, 0),
            UnitSpelling("µmol/L", "umol/L", MW_CREATININE / 10000.0, 0),
        ),
    ),
    "glucose": LabSpec(
        "glucose",
        "2345-7",
        "Glucose [Mass/volume] in Serum or Plasma",
        "mg/dL",
        (
            UnitSpelling("mg/dL", "mg/dL", 1.0, 0),
            UnitSpelling("mg/dl", None, 1.0, 0),
            UnitSpelling("mmol/L", "mmol/L", MW_GLUCOSE / 10.0, 1),
        ),
    ),
    "hemoglobin": LabSpec(
        "hemoglobin",
        "718-7",
        "Hemoglobin [Mass/volume] in Blood",
        "g/dL",
        (UnitSpelling("g/dL", "g/dL", 1.0, 1), UnitSpelling("g/dl", None, 1.0, 1), UnitSpelling("g/L", "g/L", 0.1, 0)),
    ),
    "lactate": LabSpec(
        "lactate",
        "2524-7",
        "Lactate [Moles/volume] in Serum or Plasma",
        "mmol/L",
        (
            UnitSpelling("mmol/L", "mmol/L", 1.0, 1),
            UnitSpelling("mmol/l", None, 1.0, 1),
            UnitSpelling("mEq/L", "meq/L", 1.0, 1),
        ),
        alt_loinc=(("32693-4", "Lactate [Moles/volume] in Blood"),),
    ),
    "sodium": LabSpec(
        "sodium",
        "2951-2",
        "Sodium [Moles/volume] in Serum or Plasma",
        "mmol/L",
        (
            UnitSpelling("mmol/L", "mmol/L", 1.0, 0),
            UnitSpelling("mEq/L", "meq/L", 1.0, 0),
            UnitSpelling("meq/L", None, 1.0, 0),
        ),
    ),
}
LAB_FEATURES = tuple(LABS)
# Index into LabSpec.spellings per feature for each reporting-lab profile.
LAB_PROFILES: dict[str, dict[str, int]] = {
    "ucum": {"wbc": 0, "crp": 0, "creatinine": 0, "glucose": 0, "hemoglobin": 0, "lactate": 0, "sodium": 0},
    "us": {"wbc": 1, "crp": 2, "creatinine": 1, "glucose": 1, "hemoglobin": 1, "lactate": 1, "sodium": 1},
    "si": {"wbc": 2, "crp": 0, "creatinine": 2, "glucose": 2, "hemoglobin": 2, "lactate": 0, "sodium": 0},
    "legacy": {"wbc": 4, "crp": 1, "creatinine": 3, "glucose": 0, "hemoglobin": 0, "lactate": 2, "sodium": 2},
}
# In-window availability of each analyte for a patient with labs.
LAB_AVAILABILITY = {
    "wbc": 0.95,
    "crp": 0.8,
    "creatinine": 0.95,
    "glucose": 0.9,
    "hemoglobin": 0.95,
    "lactate": 0.5,
    "sodium": 0.95,
}
# Healthy baseline (median) used for values far before the window.
LAB_BASELINE = {
    "wbc": 6.8,
    "crp": 3.0,
    "creatinine": 0.9,
    "glucose": 98.0,
    "hemoglobin": 13.8,
    "lactate": 1.1,
    "sodium": 140.0,
}
# Scale of the multiplicative noise of repeated and older draws: sodium is tightly regulated (15% noise made
# values of 68-232 mmol/L, which a plausibility check rightly rejects).
LAB_VARIABILITY = {feature: 1.0 for feature in LAB_BASELINE} | {"sodium": 0.15}
LAB_LIMITS = {
    "wbc": (1.0, 60.0),
    "crp": (0.2, 400.0),
    "creatinine": (0.3, 12.0),
    "glucose": (40.0, 700.0),
    "hemoglobin": (5.0, 19.5),
    "lactate": (0.2, 15.0),
    "sodium": (115.0, 160.0),
}
# Detection limits used by the censored edge case, in the canonical unit.
CRP_DETECTION_LIMIT = 5.0
LACTATE_DETECTION_LIMIT = 0.5

# --- notes -----------------------------------------------------------------------------------------------

COMORBIDITIES = ("diabetes", "copd", "heart_failure", "ckd", "hypertension", "prior_mi", "smoking")
COMORBIDITY_PREVALENCE = {
    "diabetes": 0.25,
    "copd": 0.2,
    "heart_failure": 0.15,
    "ckd": 0.15,
    "hypertension": 0.45,
    "prior_mi": 0.12,
    "smoking": 0.25,
}
ASSERTIONS = ("present", "historical", "negated", "family", "hypothetical")
# Sentences per (comorbidity, assertion); each is a sentence of its own in the note text.
PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "diabetes": {
        "present": ("Type 2 diabetes mellitus on metformin.", "Diabetes mellitus, diet controlled."),
        "historical": ("History of diabetes.",),
        "negated": ("Denies diabetes.", "No history of diabetes."),
        "family": ("Mother had diabetes.",),
        "hypothetical": ("Recheck HbA1c if symptoms of diabetes develop.",),
    },
    "copd": {
        "present": ("COPD on home inhalers.", "Chronic obstructive pulmonary disease, GOLD stage 2."),
        "historical": ("History of COPD.",),
        "negated": ("No history of COPD.", "Denies COPD."),
        "family": ("Father had COPD.",),
        "hypothetical": ("Obtain spirometry if symptoms of COPD develop.",),
    },
    "heart_failure": {
        "present": ("Heart failure with reduced ejection fraction.", "Congestive heart failure, NYHA class II."),
        "historical": ("History of heart failure.",),
        "negated": ("No evidence of heart failure.", "Denies heart failure."),
        "family": ("Father died of heart failure.",),
        "hypothetical": ("Return to clinic if symptoms of heart failure develop.",),
    },
    "ckd": {
        "present": ("Chronic kidney disease stage 3.", "CKD stage 3b, followed by nephrology."),
        "historical": ("History of chronic kidney disease.",),
        "negated": ("Negative for chronic kidney disease.", "No history of CKD."),
        "family": ("Sister has chronic kidney disease.",),
        "hypothetical": ("Monitor creatinine if chronic kidney disease develops.",),
    },
    "hypertension": {
        "present": ("Hypertension, well controlled on lisinopril.", "Essential hypertension."),
        "historical": ("History of hypertension.",),
        "negated": ("Denies hypertension.", "No history of hypertension."),
        "family": ("Family history of hypertension.",),
        "hypothetical": ("Recheck blood pressure if hypertension develops.",),
    },
    "prior_mi": {
        "present": ("Myocardial infarction in 2019 treated with PCI.", "Prior NSTEMI."),
        "historical": ("History of myocardial infarction.", "History of MI."),
        "negated": ("No prior myocardial infarction.", "Denies history of MI."),
        "family": ("Father had a myocardial infarction at 55.",),
        "hypothetical": ("Call 911 if symptoms of myocardial infarction occur.",),
    },
    "smoking": {
        "present": ("Current smoker, 30 pack-years.", "Active cigarette smoker."),
        "historical": (),
        "negated": ("Never smoker.", "Denies smoking."),
        "family": ("Mother is a smoker.",),
        "hypothetical": (),
    },
}
NOTE_TYPES = (
    ("11506-3", "Progress note"),
    ("34117-2", "History and physical note"),
    ("18842-5", "Discharge summary"),
)
CONSULT_NOTE = ("11488-4", "Consult note")
NOTE_CONTENT_TYPES = ("text/plain; charset=utf-8", "text/plain;charset=UTF-8")
LATIN1_CONTENT_TYPE = "text/plain; charset=ISO-8859-1"


def site_environment() -> dict[str, str]:
    """The ``RISKBRIDGE_*`` settings of the synthetic hospital: its time zone and identity rules.

    A site configures the same two things for its own PACS and EHR (docs/identity.md); the demo, the end-to-end
    tests and anyone pointing riskbridge at a loaded synthetic cohort use these.
    """
    return {
        "RISKBRIDGE_SITE__TIMEZONE": SITE_TIMEZONE,
        "RISKBRIDGE_IDENTITY__ISSUER_SYSTEMS": json.dumps({PACS_ISSUER: MRN_SYSTEM}),
        "RISKBRIDGE_IDENTITY__DEFAULT_ISSUER": PACS_ISSUER,
    }


# --- outcome model ---------------------------------------------------------------------------------------

OUTCOME_INTERCEPT = -1.25
COMORBIDITY_WEIGHTS = {
    "diabetes": 0.5,
    "copd": 0.7,
    "heart_failure": 0.8,
    "ckd": 0.5,
    "hypertension": 0.3,
    "prior_mi": 0.6,
    "smoking": 0.6,
}
# z = (transform(value) - center) / scale, then weight.
LAB_TERMS: dict[str, tuple[bool, float, float, float]] = {
    # feature: (log transform, center, scale, weight)
    "crp": (True, math.log(8.0), 1.0, 0.45),
    "wbc": (False, 8.0, 3.0, 0.35),
    "lactate": (False, 1.4, 0.6, 0.45),
    "creatinine": (True, 0.0, 0.3, 0.25),
    "hemoglobin": (False, 13.0, 1.8, -0.30),
    "glucose": (True, math.log(110.0), 0.25, 0.15),
    "sodium": (False, 139.0, 3.5, -0.20),
}
IMAGE_WEIGHT = 1.1
IMAGE_OFFSET = 1.2
AGE_WEIGHT = 0.03
NAMES_FAMILY = (
    "ALPHA",
    "BRAVO",
    "CHARLIE",
    "DELTA",
    "ECHO",
    "FOXTROT",
    "GOLF",
    "HOTEL",
    "INDIA",
    "JULIET",
    "KILO",
    "LIMA",
    "MIKE",
    "NOVEMBER",
    "OSCAR",
    "PAPA",
    "QUEBEC",
    "ROMEO",
    "SIERRA",
    "TANGO",
    "UNIFORM",
    "VICTOR",
    "WHISKEY",
    "XRAY",
    "YANKEE",
    "ZULU",
)
NAMES_GIVEN = ("ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE", "TEN", "ELEVEN", "TWELVE")


# Phantom anatomy in mm (LPS, axial plane centred on the isocentre), scaled per patient by body_scale.
ANATOMY: dict[str, float] = {
    "body_rx": 165.0,
    "body_ry": 115.0,
    "fat_mm": 14.0,
    "lung_x": 75.0,
    "lung_y": -5.0,
    "lung_rx": 52.0,
    "lung_ry": 80.0,
    "lung_rz": 170.0,
    "heart_x": 5.0,
    "heart_y": -35.0,
    "heart_r": 38.0,
    "aorta_x": 12.0,
    "aorta_y": 35.0,
    "aorta_r": 12.0,
    "spine_x": 0.0,
    "spine_y": 80.0,
    "spine_r": 18.0,
    "canal_y": 103.0,
    "canal_r": 7.0,
    "sternum_y": -100.0,
    "rib_r": 5.0,
}

# --- records ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nodule:
    """A spherical lung nodule: centre (x, y in mm LPS; z relative to the lung centre) and diameter (mm)."""

    offset: tuple[float, float, float]
    diameter_mm: float


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a study's thin reconstruction; other series are derived from it."""

    matrix: int
    pixel_mm: float
    thin_mm: float
    n_thin: int
    z_top: float
    thick_mm: float
    thick_group: int
    n_thick: int
    coronal_group: int
    n_coronal: int
    body_scale: float
    lung_center_z: float

    @property
    def origin_xy(self) -> float:
        """x (and y) of the centre of the first pixel: the grid is centred on the isocentre."""
        return -self.matrix * self.pixel_mm / 2.0 + self.pixel_mm / 2.0

    def z_of(self, k: int) -> float:
        """z (mm) of thin slice ``k`` (k = 0 is the most superior slice)."""
        return self.z_top - k * self.thin_mm


@dataclass(frozen=True)
class SeriesSpec:
    """One series of a study: identity, kind, naming and instance count."""

    uid: str
    kind: str
    number: int
    description: str
    kernel: str | None
    thickness_mm: float | None
    n_instances: int
    content_time: datetime

    @property
    def image_type(self) -> tuple[str, ...]:
        """DICOM ImageType values of this series' images (empty for the SR)."""
        return SERIES_IMAGE_TYPES[self.kind]


@dataclass(frozen=True)
class StudySpec:
    """One CT study of a patient (the index study or a prior)."""

    uid: str
    accession: str
    study_id: str
    start: datetime
    acquisition: datetime
    manufacturer: str
    contrast: bool
    is_index: bool
    frame_of_reference_uid: str
    geometry: Geometry
    series: tuple[SeriesSpec, ...]
    nodule_scale: float
    noise_seed: int
    dlp_mgycm: float

    @property
    def scanner(self) -> Scanner:
        """The scanner profile of this study."""
        return SCANNER_BY_NAME[self.manufacturer]


@dataclass(frozen=True)
class LabObservation:
    """One lab Observation as the FHIR feed carries it, plus its expected disposition."""

    id: str
    feature: str
    loinc: str
    display: str
    status: str
    effective: datetime
    utc: bool
    issued: datetime
    value: float | int | None
    value_string: str | None
    comparator: str | None
    unit: str | None
    ucum_code: str | None
    canonical_value: float | None
    censored: str | None
    note: str | None
    disposition: str


@dataclass(frozen=True)
class NoteDocument:
    """One clinical note (DocumentReference or DiagnosticReport.presentedForm) with its expected mentions."""

    id: str
    resource_type: str
    type_code: str
    type_display: str
    date: datetime
    status: str
    content_type: str
    text: str
    mentions: tuple[tuple[str, str], ...]
    disposition: str

    @property
    def charset(self) -> str:
        """The charset named in the content type (how the text is encoded in the attachment)."""
        return "iso-8859-1" if "8859" in self.content_type else "utf-8"


@dataclass(frozen=True)
class FhirPatient:
    """A FHIR Patient resource's content (the cohort patient or a duplicate sharing its MRN)."""

    id: str
    mrn: str
    family: str
    given: str
    birth_date: date
    sex: str
    synth_key: str


@dataclass
class PatientSpec:
    """Everything about one cohort patient (one PACS patient): what is written and what is expected."""

    index: int
    key: str
    mrn: str
    family: str
    given: str
    birth_date: date
    sex: str
    pacs_patient_id: str
    pacs_issuer: str | None
    identity_variant: str
    edge_cases: list[str]
    fhir_patients: list[FhirPatient]
    studies: list[StudySpec]
    nodules: list[Nodule]
    comorbidities: dict[str, bool]
    lab_state: dict[str, float]
    lab_profile: str
    labs: list[LabObservation] = field(default_factory=list)
    notes: list[NoteDocument] = field(default_factory=list)
    logit_components: dict[str, float] = field(default_factory=dict)
    probability: float = 0.0
    label: int = 0
    # OtherPatientIDsSequence: (PatientID, IssuerOfPatientID) pairs the images carry besides PatientID.
    pacs_other_ids: tuple[tuple[str, str], ...] = ()
    # The outcome as the EHR records it after the scan: the diagnosis (positives, within OUTCOME_HORIZON) and a
    # follow-up visit after the horizon (everyone), so labels can be derived from FHIR (docs/synthetic-cohort.md).
    outcome_onset: datetime | None = None
    follow_up: datetime | None = None

    @property
    def pacs_name(self) -> str:
        """DICOM PatientName (family^given, upper case)."""
        return f"SYNTH-{self.family}^{self.given}"

    @property
    def index_study(self) -> StudySpec:
        """The study the truth is about (inside the index window)."""
        return self.studies[0]

    @property
    def fhir_id(self) -> str | None:
        """The FHIR Patient id the PACS patient should link to (None when there is no FHIR Patient)."""
        return self.fhir_patients[0].id if self.fhir_patients else None

    @property
    def age_years(self) -> int:
        """Age at the index study."""
        return self.age_at(self.index_study.start.date())

    def age_at(self, when: date) -> int:
        """Age in whole years on the given day."""
        years = when.year - self.birth_date.year
        return years - ((when.month, when.day) < (self.birth_date.month, self.birth_date.day))


@dataclass
class Cohort:
    """A generated cohort: its parameters, id and patients."""

    seed: int
    size: str
    rates: EdgeCaseRates
    cohort_id: str
    patients: list[PatientSpec]
    lab_shift: dict[str, float] = field(default_factory=dict)
    anchor: datetime = ANCHOR

    @property
    def preset(self) -> SizePreset:
        """The size preset of this cohort."""
        return SIZES[self.size]


# --- helpers ---------------------------------------------------------------------------------------------


def _key_int(part: object) -> int:
    return part if isinstance(part, int) else zlib.crc32(str(part).encode())


def rng_for(seed: int, *keys: object) -> np.random.Generator:
    """A generator seeded by ``seed`` and a fixed key path (ints or strings), independent of call order."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=tuple(_key_int(k) for k in keys)))


def make_uid(cohort_id: str, *parts: object) -> str:
    """A deterministic DICOM UID for a path inside the cohort (hash of the cohort id and the parts)."""
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=["riskbridge-synth", cohort_id, *map(str, parts)])


def make_uuid(cohort_id: str, *parts: object) -> str:
    """A deterministic UUID (for bundle fullUrls) for a path inside the cohort."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "urn:riskbridge:synth:" + ":".join([cohort_id, *map(str, parts)])))


def cohort_id_for(
    seed: int,
    patients: int,
    size: str,
    rates: EdgeCaseRates,
    lab_shift: Mapping[str, float] | None = None,
    anchor: datetime = ANCHOR,
) -> str:
    """Eight hex digits naming a cohort: a hash of the generator version and all parameters."""
    params: dict[str, Any] = {
        "version": GENERATOR_VERSION, "seed": seed, "patients": patients, "size": size, "rates": asdict(rates)
    }  # fmt: skip
    # Each only when it differs from the default: the ids of earlier cohorts stay what they were. A moved cohort
    # gets UIDs of its own, because a PACS keeps the first copy of an instance it already holds.
    if lab_shift:
        params["lab_shift"] = dict(sorted(lab_shift.items()))
    if anchor != ANCHOR:
        params["anchor"] = anchor.date().isoformat()
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]


def quota(rate: float, n: int) -> int:
    """Number of patients out of ``n`` that get an edge case of the given rate (round half up)."""
    return math.floor(rate * n + 0.5)


def iso(moment: datetime) -> str:
    """ISO 8601 with seconds and numeric offset (how the truth writes times)."""
    return moment.isoformat(timespec="seconds")


def _floor_minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- assignment of edge cases ----------------------------------------------------------------------------


def _assign_edge_cases(seed: int, n: int, rates: EdgeCaseRates) -> list[set[str]]:
    rng = rng_for(seed, "assign")
    cases: list[set[str]] = [set() for _ in range(n)]
    order = rng.permutation(n)
    position = 0
    for code in ("shared_mrn", "no_fhir_patient", "no_usable_series", "no_labs", "no_notes"):
        for _ in range(quota(getattr(rates, code), n)):
            if position < n:
                cases[int(order[position])].add(code)
                position += 1
    order = rng.permutation(n)
    position = 0
    for code in ("pacs_id_leading_zeros", "pacs_id_site_prefix", "pacs_missing_issuer", "pacs_mrn_in_other_ids"):
        for _ in range(quota(getattr(rates, code), n)):
            if position < n:
                cases[int(order[position])].add(code)
                position += 1
    with_labs = [i for i in range(n) if not cases[i] & {"no_labs", "no_fhir_patient"}]
    with_notes = [i for i in range(n) if not cases[i] & {"no_notes", "no_fhir_patient"}]
    plan: tuple[tuple[str, list[int]], ...] = (
        ("prior_study", list(range(n))),
        ("lab_entered_in_error", with_labs),
        ("lab_amended", with_labs),
        ("lab_censored", with_labs),
        ("lab_window_boundary", with_labs),
        ("note_entered_in_error", with_notes),
        ("dose_report", list(range(n))),
        ("contrast", list(range(n))),
    )
    for code, eligible in plan:
        count = min(quota(getattr(rates, code), n), len(eligible))
        for i in sorted(int(j) for j in rng.permutation(np.array(eligible, dtype=int))[:count]):
            cases[i].add(code)
    return cases


def _variant_counter(cases: list[set[str]], code: str) -> dict[int, int]:
    """Ordinal of each patient among those with ``code``, so alternating variants both appear."""
    holders = [i for i, c in enumerate(cases) if code in c]
    return {i: rank for rank, i in enumerate(holders)}


# --- imaging ---------------------------------------------------------------------------------------------


def _pick_scanner(rng: np.random.Generator) -> Scanner:
    weights = np.array([s.weight for s in SCANNERS])
    return SCANNERS[int(rng.choice(len(SCANNERS), p=weights / weights.sum()))]


def _make_study(
    cohort_id: str,
    key: str,
    number: int,
    rng: np.random.Generator,
    preset: SizePreset,
    start: datetime,
    is_index: bool,
    usable: bool,
    dose_report: bool,
    contrast: bool,
    body_scale: float,
) -> StudySpec:
    scanner = _pick_scanner(rng)
    pixel = preset.fov_mm / preset.matrix
    n_thin = preset.n_thin
    thick_group = round(scanner.thick_mm / scanner.thin_mm)
    coronal_group = max(1, round(3.0 / pixel))
    z_top = float(-80.0 - round(float(rng.uniform(0.0, 40.0)), 1))
    coverage = n_thin * scanner.thin_mm
    geometry = Geometry(
        matrix=preset.matrix,
        pixel_mm=pixel,
        thin_mm=scanner.thin_mm,
        n_thin=n_thin,
        z_top=z_top,
        thick_mm=scanner.thick_mm,
        thick_group=thick_group,
        n_thick=n_thin // thick_group,
        coronal_group=coronal_group,
        n_coronal=preset.n_coronal,
        body_scale=body_scale,
        lung_center_z=z_top - coverage / 2.0 + float(rng.uniform(-10.0, 10.0)),
    )
    study_uid = make_uid(cohort_id, key, "study", number)
    acquisition = start + timedelta(seconds=75)
    kinds = ["localizer"]
    if is_index:
        kinds += ["thin_lung", "thin_soft"] if usable else []
        kinds += ["thick_soft", "coronal"]
    else:
        kinds += ["thin_lung", "thick_soft"]
    if dose_report:
        kinds.append("dose_sr")
    counts = {
        "localizer": 1,
        "thin_lung": n_thin,
        "thin_soft": n_thin,
        "thick_soft": geometry.n_thick,
        "coronal": geometry.n_coronal,
        "dose_sr": 1,
    }
    thickness = {
        "localizer": 0.6 if scanner.manufacturer == "SIEMENS" else scanner.thin_mm,
        "thin_lung": scanner.thin_mm,
        "thin_soft": scanner.thin_mm,
        "thick_soft": scanner.thick_mm,
        "coronal": round(coronal_group * pixel, 4),
        "dose_sr": None,
    }
    kernels = {
        "localizer": scanner.localizer_kernel,
        "thin_lung": scanner.lung_kernel,
        "thin_soft": scanner.soft_kernel,
        "thick_soft": scanner.soft_kernel,
        "coronal": scanner.soft_kernel,
        "dose_sr": None,
    }
    content_delay = {
        "localizer": 30,
        "thin_lung": 150,
        "thin_soft": 140,
        "thick_soft": 120,
        "coronal": 300,
        "dose_sr": 600,
    }
    series = tuple(
        SeriesSpec(
            uid=make_uid(cohort_id, key, "study", number, "series", kind),
            kind=kind,
            number=scanner.numbers[kind],
            description=scanner.descriptions[kind],
            kernel=kernels[kind],
            thickness_mm=thickness[kind],
            n_instances=counts[kind],
            content_time=start + timedelta(seconds=content_delay[kind]),
        )
        for kind in sorted(kinds, key=lambda k: scanner.numbers[k])
    )
    accession = f"RB{int(cohort_id[:6], 16) % 10000:04d}{int(key[1:]):05d}{number}"
    return StudySpec(
        uid=study_uid,
        accession=accession,
        study_id=str(number + 1),
        start=start,
        acquisition=acquisition,
        manufacturer=scanner.manufacturer,
        contrast=contrast,
        is_index=is_index,
        frame_of_reference_uid=make_uid(cohort_id, key, "study", number, "frame"),
        geometry=geometry,
        series=series,
        nodule_scale=1.0 if is_index else round(float(rng.uniform(0.55, 0.8)), 3),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
        dlp_mgycm=round(float(rng.uniform(180.0, 520.0)), 1),
    )


def lung_factor(z: float, lung_center_z: float) -> float:
    """Cross-section scale of the lungs at height ``z`` (1 at the lung centre, shrinking towards apex/base)."""
    return math.sqrt(max(0.0, 1.0 - ((z - lung_center_z) / ANATOMY["lung_rz"]) ** 2))


def _make_nodules(rng: np.random.Generator, geometry: Geometry) -> list[Nodule]:
    count = int(rng.choice(6, p=[0.3, 0.3, 0.2, 0.1, 0.06, 0.04]))
    nodules: list[Nodule] = []
    s = geometry.body_scale
    half_cover = geometry.n_thin * geometry.thin_mm / 2.0
    cover_mid = geometry.z_top - half_cover + geometry.thin_mm / 2.0
    while len(nodules) < count:
        diameter = float(np.clip(np.exp(rng.normal(math.log(7.0), 0.5)), 3.0, 30.0))
        radius = diameter / 2.0
        z = cover_mid + float(rng.uniform(-1.0, 1.0)) * (half_cover - radius - 4.0)
        f = lung_factor(z, geometry.lung_center_z)
        side = 1.0 if rng.random() < 0.5 else -1.0
        cx, cy = side * ANATOMY["lung_x"] * s, ANATOMY["lung_y"] * s
        rx, ry = ANATOMY["lung_rx"] * s * f - radius - 3.0, ANATOMY["lung_ry"] * s * f - radius - 3.0
        x = cx + float(rng.uniform(-1.0, 1.0)) * max(rx, 0.0)
        y = cy + float(rng.uniform(-1.0, 1.0)) * max(ry, 0.0)
        inside_lung = rx > 0 and ry > 0 and ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
        heart = math.hypot(x - ANATOMY["heart_x"] * s, y - ANATOMY["heart_y"] * s)
        if inside_lung and heart > ANATOMY["heart_r"] * s + radius + 3.0:
            offset = (round(x, 2), round(y, 2), round(z - geometry.lung_center_z, 2))
            nodules.append(Nodule(offset, round(diameter, 2)))
    return nodules


def nodule_center_lps(nodule: Nodule, study: StudySpec) -> tuple[float, float, float]:
    """The nodule centre in the patient coordinates (LPS, mm) of the given study."""
    x, y, dz = nodule.offset
    return (x, y, round(study.geometry.lung_center_z + dz, 2))


# --- labs ------------------------------------------------------------------------------------------------


def _lab_state(rng: np.random.Generator, acuity: float, comorbid: dict[str, bool], sex: str) -> dict[str, float]:
    def lognormal(median: float, shift: float, sd: float) -> float:
        return float(math.exp(math.log(median) + shift + rng.normal(0.0, sd)))

    state = {
        "wbc": lognormal(7.5, 0.25 * acuity, 0.2),
        "crp": lognormal(8.0, 0.9 * acuity, 0.7),
        "creatinine": lognormal(0.95, 0.1 * acuity + 0.5 * comorbid["ckd"], 0.18),
        "glucose": lognormal(105.0, 0.08 * acuity + 0.3 * comorbid["diabetes"], 0.15),
        "hemoglobin": float(
            13.5 - 0.5 * acuity - 1.0 * comorbid["ckd"] + (0.8 if sex == "M" else -0.8) + rng.normal(0.0, 1.2)
        ),
        "lactate": lognormal(1.3, 0.3 * acuity, 0.3),
        "sodium": float(139.0 - 1.2 * acuity - 1.5 * comorbid["heart_failure"] + rng.normal(0.0, 3.0)),
    }
    return {name: float(np.clip(value, *LAB_LIMITS[name])) for name, value in state.items()}


def _report(value: float, spelling: UnitSpelling) -> float | int:
    raw = value / spelling.factor
    if spelling.decimals < 0:
        step = 10 ** (-spelling.decimals)
        return max(step, round(raw / step) * step)
    if spelling.decimals == 0:
        return max(1, round(raw))
    return max(10.0**-spelling.decimals, round(raw, spelling.decimals))


@dataclass
class _Draw:
    feature: str
    effective: datetime
    value: float
    status: str = "final"
    utc: bool = False
    censor: str | None = None  # "crp_string" or "lactate_comparator"
    amended_from: float | None = None


def _make_labs(
    rng: np.random.Generator,
    p: PatientSpec,
    index_time: datetime,
    cases: set[str],
    ordinals: dict[str, int],
) -> list[LabObservation]:
    draws: list[_Draw] = []
    available = {f: bool(rng.random() < LAB_AVAILABILITY[f]) for f in LAB_FEATURES}
    if "lab_censored" in cases:
        available["crp" if ordinals["lab_censored"] % 2 == 0 else "lactate"] = True
    in_window: dict[str, list[_Draw]] = {}
    for feature in LAB_FEATURES:
        state = p.lab_state[feature]
        if available[feature]:
            hours = sorted((float(h) for h in rng.uniform(1.0, 46.0, int(rng.integers(1, 4)))), reverse=True)
            own = []
            for rank, h in enumerate(hours):
                last = rank == len(hours) - 1
                value = state * math.exp(rng.normal(0.0, (0.03 if last else 0.12) * LAB_VARIABILITY[feature]))
                own.append(_Draw(feature, _floor_minute(index_time - timedelta(hours=h)), value))
            in_window[feature] = own
            draws += own
        for _ in range(int(rng.integers(0, 3)) if available[feature] else int(rng.random() < 0.5)):
            days = float(rng.uniform(7.0, 90.0))
            value = LAB_BASELINE[feature] * math.exp(rng.normal(0.0, 0.15 * LAB_VARIABILITY[feature]))
            draws.append(_Draw(feature, _floor_minute(index_time - timedelta(days=days)), value))
        if rng.random() < 0.3:
            hours_after = float(rng.uniform(1.0, 72.0))
            value = state * math.exp(rng.normal(-0.1, 0.2) * LAB_VARIABILITY[feature])
            draws.append(_Draw(feature, _floor_minute(index_time + timedelta(hours=hours_after)), value))
    used_features: set[str] = set()

    def pick(preferred: tuple[str, ...]) -> str | None:
        for feature in preferred:
            if feature in in_window and feature not in used_features:
                used_features.add(feature)
                return feature
        return None

    if "lab_censored" in cases:
        censored = "crp" if ordinals["lab_censored"] % 2 == 0 else "lactate"
        used_features.add(censored)
        in_window[censored][-1].censor = "crp_string" if censored == "crp" else "lactate_comparator"
    if "lab_window_boundary" in cases:
        boundary_feature = pick(("sodium", "glucose", "hemoglobin", "creatinine", "wbc"))
        if boundary_feature is not None:
            feature = boundary_feature
            state = p.lab_state[feature]
            replaced = {id(draw) for draw in in_window[feature]}
            draws = [draw for draw in draws if id(draw) not in replaced]
            inside = ordinals["lab_window_boundary"] % 2 == 0
            boundary = [
                _Draw(
                    feature,
                    _floor_minute(index_time - timedelta(hours=48, minutes=30)),
                    LAB_BASELINE[feature] * math.exp(rng.normal(0.0, 0.1 * LAB_VARIABILITY[feature])),
                    utc=True,
                ),
                _Draw(
                    feature,
                    _floor_minute(index_time + timedelta(minutes=20)),
                    state * math.exp(rng.normal(0.0, 0.1 * LAB_VARIABILITY[feature])),
                    utc=True,
                ),
            ]
            if inside:
                boundary.append(
                    _Draw(feature, _floor_minute(index_time - timedelta(hours=47, minutes=30)), state, utc=True)
                )
            draws += boundary
            in_window[feature] = [d for d in boundary if index_time - LAB_WINDOW <= d.effective <= index_time]
    if "lab_entered_in_error" in cases:
        wrong_feature = pick(("wbc", "creatinine", "hemoglobin", "glucose", "sodium", "crp", "lactate"))
        if wrong_feature is not None:
            feature = wrong_feature
            latest = in_window[feature][-1]
            gap = (index_time - latest.effective).total_seconds()
            when = _floor_minute(latest.effective + timedelta(seconds=gap * float(rng.uniform(0.3, 0.8))))
            wrong = float(np.clip(p.lab_state[feature] * 2.5, *LAB_LIMITS[feature]))
            draws.append(_Draw(feature, when, wrong, status="entered-in-error"))
    if "lab_amended" in cases:
        amended_feature = pick(("creatinine", "wbc", "glucose", "hemoglobin", "sodium", "crp", "lactate"))
        if amended_feature is not None:
            latest = in_window[amended_feature][-1]
            latest.status = "amended" if ordinals["lab_amended"] % 2 == 0 else "corrected"
            latest.amended_from = latest.value * 1.3
    for draw in draws:
        draw.utc = draw.utc or bool(rng.random() < 0.3)
    return _finish_labs(rng, p, index_time, draws)


def _finish_labs(
    rng: np.random.Generator, p: PatientSpec, index_time: datetime, draws: list[_Draw]
) -> list[LabObservation]:
    # Distinct times per feature (a tie would make "latest" ambiguous).
    draws.sort(key=lambda d: (d.effective, LAB_FEATURES.index(d.feature)))
    seen: set[tuple[str, datetime]] = set()
    for draw in draws:
        while (draw.feature, draw.effective) in seen:
            draw.effective += timedelta(minutes=1)
        seen.add((draw.feature, draw.effective))
    draws.sort(key=lambda d: (d.effective, LAB_FEATURES.index(d.feature)))
    window_start = index_time - LAB_WINDOW
    latest_used: dict[str, _Draw] = {}
    for draw in draws:
        if draw.status in USABLE_LAB_STATUSES and window_start <= draw.effective <= index_time:
            latest_used[draw.feature] = draw
    profile = LAB_PROFILES[p.lab_profile]
    observations = []
    for number, draw in enumerate(draws, start=1):
        spec = LABS[draw.feature]
        if rng.random() < 0.8:
            spelling = spec.spellings[profile[draw.feature]]
        else:
            spelling = spec.spellings[int(rng.integers(0, len(spec.spellings)))]
        loinc, display = spec.loinc, spec.display
        if spec.alt_loinc and rng.random() < 0.4:
            loinc, display = spec.alt_loinc[0]
        value: float | int | None
        value_string = comparator = note = censored = None
        unit: str | None = spelling.unit
        code = spelling.code
        if draw.censor == "crp_string":
            value, unit, code = None, None, None
            value_string = f"<{CRP_DETECTION_LIMIT:g}"
            canonical: float | None = CRP_DETECTION_LIMIT
            censored = "<"
        elif draw.censor == "lactate_comparator":
            value, comparator, unit, code = LACTATE_DETECTION_LIMIT, "<", "mmol/L", "mmol/L"
            canonical = LACTATE_DETECTION_LIMIT
            censored = "<"
        else:
            value = _report(draw.value, spelling)
            canonical = round(float(value) * spelling.factor, 6)
        if draw.amended_from is not None:
            note = f"Result amended; previously reported as {_report(draw.amended_from, spelling)} {spelling.unit}."
        if draw.status == "entered-in-error":
            disposition = "entered_in_error"
        elif draw.effective > index_time:
            disposition = "after_index"
        elif draw.effective < window_start:
            disposition = "before_window"
        elif latest_used.get(draw.feature) is draw:
            disposition = "used"
        else:
            disposition = "superseded"
        issued = draw.effective + timedelta(minutes=int(rng.integers(20, 180)))
        if draw.status in ("amended", "corrected"):
            issued += timedelta(hours=6)
        observations.append(
            LabObservation(
                id=f"{p.fhir_patients[0].id}-obs-{number:03d}",
                feature=draw.feature,
                loinc=loinc,
                display=display,
                status=draw.status,
                effective=draw.effective,
                utc=draw.utc,
                issued=issued,
                value=value,
                value_string=value_string,
                comparator=comparator,
                unit=unit,
                ucum_code=code,
                canonical_value=canonical,
                censored=censored,
                note=note,
                disposition=disposition,
            )
        )
    return observations


# --- notes -----------------------------------------------------------------------------------------------


def _note_text(
    rng: np.random.Generator, p: PatientSpec, title: str, when: datetime, mentions: list[tuple[str, str]]
) -> str:
    phrases: dict[str, list[str]] = {"pmh": [], "social": [], "family": [], "ros": [], "plan": []}
    for comorbidity, assertion in mentions:
        options = PHRASES[comorbidity][assertion]
        sentence = options[int(rng.integers(0, len(options)))]
        if comorbidity == "smoking" and assertion in ("present", "negated"):
            phrases["social"].append(sentence)
        elif assertion in ("present", "historical"):
            phrases["pmh"].append(sentence)
        elif assertion == "negated":
            phrases["ros"].append(sentence)
        elif assertion == "family":
            phrases["family"].append(sentence)
        else:
            phrases["plan"].append(sentence)
    temperature = f"{float(rng.uniform(36.4, 38.6)):.1f}"
    lines = [
        f"{title.upper()} (synthetic, riskbridge cohort)",
        f"Patient: SYNTH-{p.family.title()}, {p.given.title()}   Date: {when.date().isoformat()}",
        "",
        "Chief complaint: cough and shortness of breath.",
        f"HPI: {p.age_at(when.date())}-year-old {'man' if p.sex == 'M' else 'woman'} with two weeks of cough. "
        f"Temperature {temperature} \u00b0C.",
    ]
    sections = (
        ("pmh", "Past medical history:"),
        ("social", "Social history:"),
        ("family", "Family history:"),
        ("ros", "Review of systems:"),
        ("plan", "Assessment and plan:"),
    )
    for name, header in sections:
        body = phrases[name] + (["CT chest ordered."] if name == "plan" else [])
        if name == "ros":
            body = ["Denies chest pain.", *body]
        if body:
            lines += ["", header, *body]
    return "\n".join(lines) + "\n"


def _make_notes(
    rng: np.random.Generator, p: PatientSpec, fhir_id: str, index_time: datetime, cases: set[str]
) -> list[NoteDocument]:
    present = [c for c in COMORBIDITIES if p.comorbidities[c]]
    absent = [c for c in COMORBIDITIES if not p.comorbidities[c]]
    n_in = int(rng.integers(1, 4))
    days = sorted((float(d) for d in rng.uniform(0.1, 360.0, n_in)), reverse=True)
    slots: list[list[tuple[str, str]]] = [[] for _ in range(n_in)]
    for c in present:
        if rng.random() < 0.9:
            historical = bool(PHRASES[c]["historical"]) and rng.random() < 0.3
            slots[int(rng.integers(0, n_in))].append((c, "historical" if historical else "present"))
    for c in absent:
        u = rng.random()
        assertion = "negated" if u < 0.3 else "family" if u < 0.45 else "hypothetical" if u < 0.55 else None
        if assertion is not None and PHRASES[c][assertion]:
            slots[int(rng.integers(0, n_in))].append((c, assertion))
    plan: list[tuple[datetime, str, list[tuple[str, str]]]] = [
        (index_time - timedelta(days=d), "current", slot) for d, slot in zip(days, slots, strict=True)
    ]
    trap = [c for c in absent if PHRASES[c]["present"]]
    if rng.random() < 0.3 and trap:
        chosen = [(str(c), "present") for c in rng.permutation(trap)[: int(rng.integers(1, 3))]]
        if rng.random() < 0.5:
            plan.append((index_time - timedelta(days=float(rng.uniform(400.0, 1500.0))), "current", chosen))
        else:
            plan.append((index_time + timedelta(days=float(rng.uniform(1.0, 20.0))), "current", chosen))
    if "note_entered_in_error" in cases:
        wrong = [(c, "present") for c in (trap or list(COMORBIDITIES))[:2]]
        plan.append((index_time - timedelta(days=float(rng.uniform(1.0, 30.0))), "entered-in-error", wrong))
    plan.sort(key=lambda item: item[0])
    consult = int(rng.integers(0, len(plan))) if rng.random() < 0.35 else -1
    notes = []
    for number, (when, status, mentions) in enumerate(plan, start=1):
        when = when.replace(microsecond=0)
        is_report = number - 1 == consult and status == "current"
        code, display = CONSULT_NOTE if is_report else NOTE_TYPES[int(rng.integers(0, len(NOTE_TYPES)))]
        latin1 = p.lab_profile == "legacy" and rng.random() < 0.5
        content_type = LATIN1_CONTENT_TYPE if latin1 else NOTE_CONTENT_TYPES[int(rng.integers(0, 2))]
        if status == "entered-in-error":
            disposition = "entered_in_error"
        elif when > index_time:
            disposition = "after_index"
        elif when < index_time - NOTE_LOOKBACK:
            disposition = "before_lookback"
        else:
            disposition = "used"
        kind = "DiagnosticReport" if is_report else "DocumentReference"
        notes.append(
            NoteDocument(
                id=f"{fhir_id}-{'rpt' if is_report else 'doc'}-{number:02d}",
                resource_type=kind,
                type_code=code,
                type_display=display,
                date=when,
                status=status,
                content_type=content_type,
                text=_note_text(rng, p, display, when, mentions),
                mentions=tuple(mentions),
                disposition=disposition,
            )
        )
    return notes


# --- outcome ---------------------------------------------------------------------------------------------


def image_signal(nodules: list[Nodule]) -> float:
    """Image term of the logit: grows with nodule count and size (1.1 * ln(1 + sum(d)/5) - 1.2)."""
    return IMAGE_WEIGHT * math.log1p(sum(n.diameter_mm for n in nodules) / 5.0) - IMAGE_OFFSET


def lab_signal(state: dict[str, float]) -> float:
    """Lab term of the logit: weighted standardized lab values (see LAB_TERMS)."""
    total = 0.0
    for feature, (log, center, scale, weight) in LAB_TERMS.items():
        value = math.log(state[feature]) if log else state[feature]
        total += weight * (value - center) / scale
    return total


def note_signal(comorbidities: dict[str, bool]) -> float:
    """Comorbidity term of the logit, centred on the expected value under the prevalences."""
    expected = sum(COMORBIDITY_WEIGHTS[c] * COMORBIDITY_PREVALENCE[c] for c in COMORBIDITIES)
    return sum(COMORBIDITY_WEIGHTS[c] for c in COMORBIDITIES if comorbidities[c]) - expected


# --- the cohort ------------------------------------------------------------------------------------------


def check_lab_shift(lab_shift: Mapping[str, float] | None) -> dict[str, float]:
    """The lab shift of a cohort, checked: lab feature -> factor (> 0) its true values are multiplied by."""
    shift = dict(lab_shift or {})
    for name, factor in shift.items():
        if name not in LAB_LIMITS:
            raise CohortError(f"lab_shift: {name!r} is not a lab of the cohort ({', '.join(LAB_LIMITS)})")
        if not isinstance(factor, int | float) or not 0.05 <= factor <= 20.0:
            raise CohortError(f"lab_shift.{name}: must be a factor from 0.05 to 20 (value {factor!r})")
    return shift


def anchor_at(day: date | None) -> datetime:
    """The anchor of a cohort whose index window ends (exclusive) at midnight starting ``day``: :data:`ANCHOR`
    for ``None``. The cohort writes its times with the fixed offset -05:00, which the synthetic hospital's zone
    (:data:`SITE_TIMEZONE`) keeps only in winter, so ``day`` must be in January or February."""
    if day is None:
        return ANCHOR
    if day.month not in (1, 2):
        raise CohortError(f"anchor: must be a day in January or February, when the site keeps -05:00 (value {day})")
    return datetime(day.year, day.month, day.day, tzinfo=SITE_TZ)


def build_cohort(
    seed: int,
    patients: int,
    size: str = "small",
    rates: EdgeCaseRates | None = None,
    lab_shift: Mapping[str, float] | None = None,
    anchor: date | None = None,
) -> Cohort:
    """Generate the cohort's specification (no files): identities, studies, labs, notes, outcome.

    ``lab_shift`` (lab -> factor) multiplies the patients' true lab values, within the plausible limits, before
    anything is drawn from them: a population that differs from the training one (the monitor's drift test). The
    outcome follows the shifted values, as it would in a sicker population. ``anchor`` moves the index window to
    the :data:`INDEX_WINDOW_DAYS` days before that day (:func:`anchor_at`), and the cohort gets an id of its own.
    """
    if size not in SIZES:
        raise CohortError(f"size: must be one of {', '.join(SIZES)} (value {size!r})")
    if not isinstance(patients, int) or patients < 1 or patients > 99999:
        raise CohortError(f"patients: must be an integer from 1 to 99999 (value {patients!r})")
    rates = rates or EdgeCaseRates()
    shift = check_lab_shift(lab_shift)
    preset = SIZES[size]
    moment = anchor_at(anchor)
    cohort_id = cohort_id_for(seed, patients, size, rates, shift, moment)
    cases = _assign_edge_cases(seed, patients, rates)
    ordinals = {
        code: _variant_counter(cases, code)
        for code in ("shared_mrn", "lab_censored", "lab_window_boundary", "lab_amended")
    }
    id_rng = rng_for(seed, "identity")
    duplicates = sum("shared_mrn" in c for c in cases)
    mrns = [str(1_000_000 + int(v)) for v in id_rng.choice(9_000_000, size=patients + duplicates, replace=False)]
    extra_mrns = iter(mrns[patients:])
    out: list[PatientSpec] = []
    for i in range(patients):
        rng = rng_for(seed, "patient", i)
        key = f"p{i + 1:05d}"
        mine = cases[i]
        sex = "M" if rng.random() < 0.5 else "F"
        family = NAMES_FAMILY[int(rng.integers(0, len(NAMES_FAMILY)))]
        given = NAMES_GIVEN[int(rng.integers(0, len(NAMES_GIVEN)))]
        age_days = int(rng.integers(40 * 365, 88 * 365))
        birth = (moment - timedelta(days=age_days)).date()
        mrn = mrns[i]
        if "pacs_id_leading_zeros" in mine:
            variant, pacs_id, issuer = "leading_zeros", mrn.zfill(10), PACS_ISSUER
        elif "pacs_id_site_prefix" in mine:
            variant, pacs_id, issuer = "site_prefix", SITE_PREFIX + mrn, PACS_ISSUER
        elif "pacs_missing_issuer" in mine:
            variant, pacs_id, issuer = "missing_issuer", mrn, None
        elif "pacs_mrn_in_other_ids" in mine:
            variant, pacs_id, issuer = "other_ids", RADIOLOGY_PREFIX + mrn, RADIOLOGY_ISSUER
        else:
            variant, pacs_id, issuer = "exact", mrn, PACS_ISSUER
        fhir_id = f"rb-{cohort_id}-{key}"
        fhir_patients: list[FhirPatient] = []
        if "no_fhir_patient" not in mine:
            fhir_patients.append(FhirPatient(fhir_id, mrn, family, given, birth, sex, key))
        if "shared_mrn" in mine:
            if ordinals["shared_mrn"][i] % 2 == 0:  # a duplicate chart of the same person
                fhir_patients.append(FhirPatient(f"{fhir_id}-dup", mrn, family, given, birth, sex, f"{key}-dup"))
            else:  # another person registered under the same MRN
                other_birth = (moment - timedelta(days=int(rng.integers(20 * 365, 90 * 365)))).date()
                other_family = NAMES_FAMILY[(NAMES_FAMILY.index(family) + 7) % len(NAMES_FAMILY)]
                fhir_patients.append(
                    FhirPatient(
                        f"{fhir_id}-dup",
                        mrn,
                        other_family,
                        given,
                        other_birth,
                        "F" if sex == "M" else "M",
                        f"{key}-dup",
                    )
                )
            next(extra_mrns)  # reserved so the MRN space of other patients does not depend on this case
        day = int(rng.integers(1, INDEX_WINDOW_DAYS + 1))
        start = moment - timedelta(days=day) + timedelta(seconds=int(rng.integers(7 * 3600, 22 * 3600)))
        body_scale = round(float(rng.uniform(0.88, 1.08)), 3)
        studies = [
            _make_study(
                cohort_id,
                key,
                0,
                rng,
                preset,
                start,
                True,
                "no_usable_series" not in mine,
                "dose_report" in mine,
                "contrast" in mine,
                body_scale,
            )
        ]
        if "prior_study" in mine:
            prior_start = start - timedelta(days=int(rng.integers(200, 500)), seconds=int(rng.integers(0, 20000)))
            studies.append(
                _make_study(
                    cohort_id,
                    key,
                    1,
                    rng,
                    preset,
                    prior_start,
                    False,
                    True,
                    bool(rng.random() < 0.5),
                    bool(rng.random() < 0.5),
                    body_scale,
                )
            )
        nodules = _make_nodules(rng, studies[0].geometry)
        comorbid = {c: bool(rng.random() < COMORBIDITY_PREVALENCE[c]) for c in COMORBIDITIES}
        acuity = float(rng.normal())
        state = _lab_state(rng, acuity, comorbid, sex)
        for name, factor in shift.items():
            state[name] = float(np.clip(state[name] * factor, *LAB_LIMITS[name]))
        if "lab_censored" in mine:
            if ordinals["lab_censored"][i] % 2 == 0:
                state["crp"] = round(float(rng.uniform(0.5, 4.5)), 2)
            else:
                state["lactate"] = round(float(rng.uniform(0.2, 0.45)), 2)
        profile = tuple(LAB_PROFILES)[int(rng.integers(0, len(LAB_PROFILES)))]
        patient = PatientSpec(
            index=i,
            key=key,
            mrn=mrn,
            family=family,
            given=given,
            birth_date=birth,
            sex=sex,
            pacs_patient_id=pacs_id,
            pacs_issuer=issuer,
            pacs_other_ids=((mrn, PACS_ISSUER),) if variant == "other_ids" else (),
            identity_variant=variant,
            edge_cases=[c for c in EDGE_CASE_CODES if c in mine],
            fhir_patients=fhir_patients,
            studies=studies,
            nodules=nodules,
            comorbidities=comorbid,
            lab_state=state,
            lab_profile=profile,
        )
        index_time = studies[0].acquisition
        if fhir_patients and "no_labs" not in mine:
            patient.labs = _make_labs(
                rng_for(seed, "labs", i),
                patient,
                index_time,
                mine,
                {code: ordinals[code].get(i, 0) for code in ordinals},
            )
        if fhir_patients and "no_notes" not in mine:
            patient.notes = _make_notes(rng_for(seed, "notes", i), patient, fhir_id, index_time, mine)
        components = {
            "intercept": OUTCOME_INTERCEPT,
            "image": image_signal(nodules),
            "labs": lab_signal(state),
            "notes": note_signal(comorbid),
            "demographics": AGE_WEIGHT * (patient.age_years - 65),
        }
        patient.logit_components = {k: round(v, 6) for k, v in components.items()}
        patient.probability = round(_sigmoid(sum(components.values())), 6)
        patient.label = int(rng_for(seed, "label", i).random() < patient.probability)
        timing = rng_for(seed, "outcome_time", i)
        acquired = patient.index_study.acquisition
        onset_days, follow_up_days = float(timing.uniform(20.0, 330.0)), float(timing.uniform(400.0, 700.0))
        patient.outcome_onset = _floor_minute(acquired + timedelta(days=onset_days)) if patient.label else None
        patient.follow_up = _floor_minute(acquired + timedelta(days=follow_up_days))
        out.append(patient)
    return Cohort(seed=seed, size=size, rates=rates, cohort_id=cohort_id, patients=out, lab_shift=shift, anchor=moment)


# --- ground truth ----------------------------------------------------------------------------------------


def _series_truth(study: StudySpec) -> list[dict[str, Any]]:
    return [
        {
            "uid": s.uid,
            "kind": s.kind,
            "number": s.number,
            "description": s.description,
            "kernel": s.kernel,
            "thickness_mm": s.thickness_mm,
            "image_type": "\\".join(s.image_type) or None,
            "instances": s.n_instances,
        }
        for s in study.series
    ]


def _study_truth(study: StudySpec) -> dict[str, Any]:
    return {
        "study_uid": study.uid,
        "accession": study.accession,
        "study_time": iso(study.start),
        "acquisition_time": iso(study.acquisition),
        "manufacturer": study.manufacturer,
        "contrast": study.contrast,
        "series": _series_truth(study),
    }


def expected_quarantine(p: PatientSpec) -> str | None:
    """The quarantine reason the pipeline must give (identity checks come before series selection)."""
    if "no_fhir_patient" in p.edge_cases:
        return "identity_unmatched"
    if "shared_mrn" in p.edge_cases:
        return "identity_conflict"
    if "no_usable_series" in p.edge_cases:
        return "no_usable_series"
    return None


def correct_series_uid(study: StudySpec) -> str | None:
    """SeriesInstanceUID of the series the model uses in this study (None when there is none)."""
    return next((s.uid for s in study.series if s.kind == CORRECT_SERIES_KIND), None)


def expected_labs(p: PatientSpec) -> dict[str, dict[str, Any] | None]:
    """Per lab feature: the value in its canonical unit the pipeline should use, or None (missing)."""
    result: dict[str, dict[str, Any] | None] = dict.fromkeys(LAB_FEATURES)
    for obs in p.labs:
        if obs.disposition == "used":
            result[obs.feature] = {
                "value": obs.canonical_value,
                "unit": LABS[obs.feature].canonical_unit,
                "loinc": obs.loinc,
                "observation_id": obs.id,
                "effective": iso(obs.effective),
                "censored": obs.censored,
            }
    return result


def expected_comorbidities(p: PatientSpec) -> dict[str, bool] | None:
    """Comorbidity flags extractable from usable notes (present or historical mention); None if no usable note."""
    used = [note for note in p.notes if note.disposition == "used"]
    if not used:
        return None
    flags = dict.fromkeys(COMORBIDITIES, False)
    for note in used:
        for comorbidity, assertion in note.mentions:
            if assertion in ("present", "historical"):
                flags[comorbidity] = True
    return flags


def truth_record(p: PatientSpec, cohort_id: str) -> dict[str, Any]:
    """The ground-truth JSON object of one patient (schema in docs/synthetic-cohort.md)."""
    quarantine = expected_quarantine(p)
    if "no_fhir_patient" in p.edge_cases:
        outcome = "unmatched"
    elif "shared_mrn" in p.edge_cases:
        outcome = "conflict"
    else:
        outcome = "matched"
    index = p.index_study
    return {
        "cohort_id": cohort_id,
        "patient_key": p.key,
        "pacs": {
            "patient_id": p.pacs_patient_id,
            "issuer": p.pacs_issuer,
            "name": p.pacs_name,
            "birth_date": p.birth_date.strftime("%Y%m%d"),
            "sex": p.sex,
            "other_ids": [list(pair) for pair in p.pacs_other_ids],
        },
        "mrn": p.mrn,
        "identity": {
            "outcome": outcome,
            "variant": p.identity_variant,
            "fhir_patient_id": p.fhir_id if outcome == "matched" else None,
            "candidate_fhir_patient_ids": [fp.id for fp in p.fhir_patients],
        },
        "quarantine": quarantine,
        "edge_cases": list(p.edge_cases),
        "index_time": iso(index.acquisition),
        "index_study": _study_truth(index),
        "prior_studies": [_study_truth(s) for s in p.studies[1:]],
        "correct_series_uid": correct_series_uid(index),
        "labs": expected_labs(p),
        "lab_observations": [
            {
                "id": o.id,
                "feature": o.feature,
                "loinc": o.loinc,
                "status": o.status,
                "effective": iso(o.effective),
                "raw": {
                    "value": o.value,
                    "value_string": o.value_string,
                    "comparator": o.comparator,
                    "unit": o.unit,
                    "code": o.ucum_code,
                },
                "canonical_value": o.canonical_value,
                "disposition": o.disposition,
            }
            for o in p.labs
        ],
        "comorbidities": expected_comorbidities(p),
        "notes": [
            {
                "id": n.id,
                "resource_type": n.resource_type,
                "date": iso(n.date),
                "status": n.status,
                "disposition": n.disposition,
                "mentions": [{"comorbidity": c, "assertion": a} for c, a in n.mentions],
            }
            for n in p.notes
        ],
        "image": {
            "manufacturer": index.manufacturer,
            "contrast": index.contrast,
            "nodules": [
                {"diameter_mm": n.diameter_mm, "center_lps": list(nodule_center_lps(n, index))} for n in p.nodules
            ],
        },
        "latent": {
            "comorbidities": dict(p.comorbidities),
            "labs": {k: round(v, 6) for k, v in p.lab_state.items()},
            "age_years": p.age_years,
        },
        "outcome": {
            "label": p.label,
            "probability": p.probability,
            "logit_components": p.logit_components,
            "onset": iso(p.outcome_onset) if p.outcome_onset is not None else None,
            "follow_up": iso(p.follow_up) if p.follow_up is not None else None,
        },
    }
