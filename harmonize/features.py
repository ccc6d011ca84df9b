"""The feature spec (versioned YAML) and the feature vector it defines: which labs in which unit, window and
policy, which note flags, which demographics, how missing values are imputed and masked, and the minimum-data
policy that decides whether a patient is scored or skipped, with the reasons.

The policy judges a patient by its modality pattern (:func:`modality_pattern`: which of image, labs and notes it
has, e.g. ``image+labs``): the fusion network masks absent modalities, so what matters is how well the model did on
patients with that pattern in cross-validation (the validated table its package carries), not how many features are
missing. Individual features can still be required.

The spec is the contract between harmonization and the model: a model is trained on one spec version and scores
only vectors built by it (:attr:`FeatureVector.spec` carries ``name@version``). Values arrive already selected and
normalized (:mod:`riskbridge.harmonize.windows`, :mod:`riskbridge.harmonize.units`,
:mod:`riskbridge.harmonize.notes`); this module orders them, imputes, masks and decides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from riskbridge.errors import ConfigurationError
from riskbridge.harmonize.windows import FeatureWindow, Policy
from riskbridge.records import MODALITIES, all_patterns, pattern_name
from riskbridge.settings import names_a_file

DEFAULT_SPEC = "chest_ct"
DEMOGRAPHICS = ("age_years", "sex_male")
# Every pattern a patient can have, the fullest first: image+labs+notes, image+labs, image+notes, image, labs+notes,
# labs, notes; and the name of having none of the modalities.
PATTERNS = tuple(all_patterns())
NO_MODALITY = pattern_name((False,) * len(MODALITIES))
DEFAULT_PATTERN_AUROC_FLOOR = 0.70
MINIMUM_DATA_KEYS = ("require_image", "required", "max_missing_fraction", "pattern_auroc_floor")


class FeatureSpecError(ConfigurationError, ValueError):
    """A feature spec is malformed; the message names the source and the offending entry."""


@dataclass(frozen=True)
class LabFeature:
    """One lab: the LOINC codes that count, the canonical unit, the window and policy, the imputed value."""

    name: str
    loinc: tuple[str, ...]
    unit: str
    window: FeatureWindow
    impute: float


@dataclass(frozen=True)
class DemographicFeature:
    """Age in years at the index time, or sex (1 male, 0 female), with the value imputed when unknown."""

    name: str
    impute: float


@dataclass(frozen=True)
class MinimumData:
    """When a patient is scored: an image if required, these features observed, not too much missing, and a
    modality pattern whose validated AUROC reaches ``pattern_auroc_floor`` (None: no pattern policy)."""

    require_image: bool = True
    required: tuple[str, ...] = ()
    max_missing_fraction: float = 1.0
    pattern_auroc_floor: float | None = DEFAULT_PATTERN_AUROC_FLOOR


@dataclass(frozen=True)
class FeatureSpec:
    """A versioned feature spec; ``names`` is the order of the tabular vector."""

    name: str
    version: int
    labs: tuple[LabFeature, ...]
    flags: tuple[str, ...]
    flag_impute: float
    note_lookback: timedelta
    demographics: tuple[DemographicFeature, ...]
    minimum: MinimumData
    description: str = ""

    @property
    def label(self) -> str:
        """``name@version``, as recorded with every vector and score."""
        return f"{self.name}@{self.version}"

    @property
    def names(self) -> tuple[str, ...]:
        """Feature names in vector order: labs, then note flags, then demographics."""
        return (
            *(lab.name for lab in self.labs),
            *self.flags,
            *(demographic.name for demographic in self.demographics),
        )

    def lab_for_loinc(self, loinc: str) -> LabFeature | None:
        """The lab feature a LOINC code feeds, or None."""
        return next((lab for lab in self.labs if loinc in lab.loinc), None)


@dataclass(frozen=True)
class FeatureVector:
    """The tabular input of one (patient, study): values in spec order, and which of them were observed."""

    spec: str
    names: tuple[str, ...]
    values: tuple[float, ...]
    observed: tuple[bool, ...]  # the missingness mask: False where the value is imputed

    @property
    def missing(self) -> tuple[str, ...]:
        """Names of the imputed features."""
        return tuple(name for name, seen in zip(self.names, self.observed, strict=True) if not seen)

    @property
    def missing_fraction(self) -> float:
        """The share of features that had to be imputed."""
        return len(self.missing) / len(self.names) if self.names else 0.0


@dataclass(frozen=True)
class ScoreDecision:
    """Score or skip, with the reasons when skipped; the vector is built either way (the ledger keeps it), and so
    is its modality pattern with the validated AUROC the model has for it (None: not validated)."""

    score: bool
    vector: FeatureVector
    pattern: str
    pattern_auroc: float | None
    reasons: tuple[str, ...] = ()


def build_vector(
    spec: FeatureSpec,
    labs: Mapping[str, float | None],
    flags: Mapping[str, bool | None] | None,
    demographics: Mapping[str, float | None],
) -> FeatureVector:
    """Order, impute and mask the values of one patient.

    ``labs`` maps a lab feature to its selected canonical value (None or absent: missing); ``flags`` maps a note
    flag to present/absent, and is None when the patient has no notes at all (every flag is then missing);
    ``demographics`` maps ``age_years``/``sex_male`` to a number or None. Unknown names are an error, so a
    renamed feature cannot silently turn into a missing one.
    """
    for given, known in ((labs, {lab.name for lab in spec.labs}), (demographics, set(DEMOGRAPHICS))):
        unknown = sorted(set(given) - known)
        if unknown:
            raise FeatureSpecError(f"{spec.label}: no such feature(s): {', '.join(unknown)}")
    if flags is not None:
        unknown = sorted(set(flags) - set(spec.flags))
        if unknown:
            raise FeatureSpecError(f"{spec.label}: no such note flag(s): {', '.join(unknown)}")
    values: list[float] = []
    observed: list[bool] = []

    def add(value: float | None, impute: float) -> None:
        seen = value is not None and math.isfinite(value)
        values.append(float(value) if seen and value is not None else impute)
        observed.append(seen)

    for lab in spec.labs:
        add(labs.get(lab.name), lab.impute)
    for flag in spec.flags:
        present = None if flags is None else flags.get(flag, False)
        add(None if present is None else float(present), spec.flag_impute)
    for demographic in spec.demographics:
        add(demographics.get(demographic.name), demographic.impute)
    return FeatureVector(spec.label, spec.names, tuple(values), tuple(observed))


def present_modalities(spec: FeatureSpec, vector: FeatureVector, image_available: bool) -> tuple[bool, bool, bool]:
    """Which modalities a patient has, in :data:`riskbridge.records.MODALITIES` order: the image when
    ``image_available``, labs when at least one lab (not a demographic) was observed, notes when the note flags were
    observed.

    The model's inputs (:func:`riskbridge.model.package.tabular_tensors`) use the same flags, so the pattern the
    policy judges is the one the network sees.
    """
    if vector.spec != spec.label or tuple(vector.names) != spec.names:
        raise FeatureSpecError(f"vector built by {vector.spec}, not {spec.label}")
    observed = dict(zip(vector.names, vector.observed, strict=True))
    labs = any(observed[lab.name] for lab in spec.labs)
    notes = any(observed[flag] for flag in spec.flags)
    return bool(image_available), labs, notes


def modality_pattern(spec: FeatureSpec, vector: FeatureVector, image_available: bool) -> str:
    """The patient's modality pattern (``image+labs+notes``, ``image+labs``, ..., ``none``): the modalities
    :func:`present_modalities` finds, named by :func:`riskbridge.records.pattern_name` as training names them."""
    return pattern_name(present_modalities(spec, vector, image_available))


def _below(value: float, floor: float) -> str:
    # Three decimals, or as many as it takes to read below the floor: 0.6996 rounded to 0.700 would not.
    for digits in range(3, 17):
        text = f"{value:.{digits}f}"
        if float(text) < floor:
            return text
    return repr(value)


def decide(
    spec: FeatureSpec,
    vector: FeatureVector,
    image_available: bool,
    *,
    patterns: Mapping[str, float] | None,
) -> ScoreDecision:
    """Apply the minimum-data policy: score, or skip with every reason that applies (stable reason codes).

    ``patterns`` is the model's validated AUROC per modality pattern
    (:func:`riskbridge.model.package.validated_patterns`); a pattern it lacks is not validated, and None (a model
    without the table) validates none. With ``pattern_auroc_floor`` set, a patient is scored only when its
    pattern's AUROC is at or above the floor.
    """
    pattern = modality_pattern(spec, vector, image_available)  # FeatureSpecError for a vector of another spec
    auroc = None if patterns is None else patterns.get(pattern)
    reasons: list[str] = []
    minimum = spec.minimum
    if minimum.require_image and not image_available:
        reasons.append("no_image")
    missing = set(vector.missing)
    reasons += [f"missing_required:{name}" for name in minimum.required if name in missing]
    if vector.missing_fraction > minimum.max_missing_fraction:
        reasons.append(f"too_much_missing:{vector.missing_fraction:.2f}>{minimum.max_missing_fraction:.2f}")
    floor = minimum.pattern_auroc_floor
    if floor is not None:
        if auroc is None:
            reasons.append(f"pattern_not_validated:{pattern}")
        elif auroc < floor:
            reasons.append(f"pattern_below_floor:{pattern}:{_below(auroc, floor)}<{floor:.3f}")
    return ScoreDecision(not reasons, vector, pattern, auroc, tuple(reasons))


# --- loading ----------------------------------------------------------------------------------------------------


def _require(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise FeatureSpecError(f"{where}: '{key}' is required")
    return mapping[key]


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FeatureSpecError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _duration(raw: Any, prefix: str, where: str) -> timedelta:
    if not isinstance(raw, dict):
        raise FeatureSpecError(f"{where}: window must be a mapping like {{before_hours: 48}}")
    total = timedelta(0)
    for key, value in raw.items():
        if not str(key).startswith(prefix):
            continue
        unit = str(key).removeprefix(prefix)
        if unit not in ("days", "hours", "minutes"):
            raise FeatureSpecError(f"{where}: unknown window key {key!r} (use {prefix}days/hours/minutes)")
        total += timedelta(**{unit: _number(value, f"{where}.{key}")})
    return total


def _lab(raw: Any, index: int, source: str) -> LabFeature:
    where = f"{source}: labs[{index}]"
    name = str(_require(raw, "name", where))
    where = f"{source}: lab '{name}'"
    allowed = {"name", "loinc", "unit", "window", "policy", "impute", "accept_preliminary"}
    extra = sorted(set(raw) - allowed)
    if extra:
        raise FeatureSpecError(f"{where}: unknown key(s) {', '.join(extra)}")
    codes = _require(raw, "loinc", where)
    if not isinstance(codes, list) or not codes or not all(isinstance(code, str) for code in codes):
        raise FeatureSpecError(f"{where}: loinc must be a non-empty list of codes")
    window_raw = _require(raw, "window", where)
    unknown = (
        sorted(k for k in window_raw if not str(k).startswith(("before_", "after_")))
        if isinstance(window_raw, dict)
        else []
    )
    if unknown:
        raise FeatureSpecError(f"{where}: unknown window key(s) {', '.join(unknown)}")
    policy_text = str(raw.get("policy", Policy.LATEST_BEFORE.value))
    try:
        policy = Policy(policy_text)
    except ValueError:
        choices = ", ".join(p.value for p in Policy)
        raise FeatureSpecError(f"{where}: unknown policy {policy_text!r} (one of {choices})") from None
    try:
        window = FeatureWindow(
            feature=name,
            before=_duration(window_raw, "before_", where),
            after=_duration(window_raw, "after_", where),
            policy=policy,
            accept_preliminary=bool(raw.get("accept_preliminary", True)),
        )
    except ValueError as exc:
        raise FeatureSpecError(f"{where}: {exc}") from None
    return LabFeature(name, tuple(codes), str(_require(raw, "unit", where)), window, _number(raw.get("impute"), where))


def _minimum_data(raw: Any, names: Sequence[str], source: str) -> MinimumData:
    where = f"{source}: minimum_data"
    if raw is None:
        return MinimumData()
    if not isinstance(raw, dict):
        raise FeatureSpecError(f"{where}: must be a mapping with {', '.join(MINIMUM_DATA_KEYS)}")
    extra = sorted(str(key) for key in set(raw) - set(MINIMUM_DATA_KEYS))
    if extra:
        raise FeatureSpecError(f"{where}: unknown key(s) {', '.join(extra)} (one of {', '.join(MINIMUM_DATA_KEYS)})")
    require_image = raw.get("require_image", True)
    if not isinstance(require_image, bool):
        raise FeatureSpecError(f"{where}.require_image: expected true or false, got {require_image!r}")
    required_raw = raw.get("required") or []
    if not isinstance(required_raw, list):
        raise FeatureSpecError(f"{where}.required: expected a list of feature names, got {required_raw!r}")
    required = tuple(str(name) for name in required_raw)
    unknown = sorted(set(required) - set(names))
    if unknown:
        raise FeatureSpecError(f"{where}.required names unknown feature(s): {', '.join(unknown)}")
    fraction = _number(raw.get("max_missing_fraction", 1.0), f"{where}.max_missing_fraction")
    if not 0.0 <= fraction <= 1.0:
        raise FeatureSpecError(f"{where}.max_missing_fraction must lie in [0, 1], got {fraction}")
    floor_raw = raw.get("pattern_auroc_floor", DEFAULT_PATTERN_AUROC_FLOOR)
    floor = None if floor_raw is None else _number(floor_raw, f"{where}.pattern_auroc_floor")
    if floor is not None and not 0.0 <= floor <= 1.0:
        raise FeatureSpecError(f"{where}.pattern_auroc_floor must lie in [0, 1] (an AUROC), got {floor}")
    return MinimumData(require_image, required, fraction, floor)


def parse_feature_spec(data: Any, source: str = "<spec>") -> FeatureSpec:
    """Validate a parsed YAML document as a feature spec; :class:`FeatureSpecError` names the offending entry."""
    if not isinstance(data, dict):
        raise FeatureSpecError(f"{source}: a feature spec is a mapping with name, version, labs, ...")
    extra = sorted(set(data) - {"name", "version", "description", "labs", "note_flags", "demographics", "minimum_data"})
    if extra:
        raise FeatureSpecError(f"{source}: unknown key(s) {', '.join(extra)}")
    version = _require(data, "version", source)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise FeatureSpecError(f"{source}: version must be a positive integer")
    labs = tuple(_lab(raw, index, source) for index, raw in enumerate(data.get("labs") or []))
    notes = data.get("note_flags") or {"flags": [], "impute": 0.0, "lookback_days": 365}
    flags = tuple(str(flag) for flag in notes.get("flags") or [])
    demographics = []
    for raw in data.get("demographics") or []:
        name = str(_require(raw, "name", f"{source}: demographics"))
        if name not in DEMOGRAPHICS:
            raise FeatureSpecError(f"{source}: demographic '{name}' is not one of {', '.join(DEMOGRAPHICS)}")
        demographics.append(DemographicFeature(name, _number(raw.get("impute"), f"{source}: demographic '{name}'")))
    names = [lab.name for lab in labs] + list(flags) + [d.name for d in demographics]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise FeatureSpecError(f"{source}: feature name(s) used twice: {', '.join(duplicates)}")
    minimum = _minimum_data(data.get("minimum_data"), names, source)
    return FeatureSpec(
        name=str(_require(data, "name", source)),
        version=version,
        labs=labs,
        flags=flags,
        flag_impute=_number(notes.get("impute", 0.0), f"{source}: note_flags.impute"),
        note_lookback=timedelta(days=_number(notes.get("lookback_days", 365), f"{source}: note_flags.lookback_days")),
        demographics=tuple(demographics),
        minimum=minimum,
        description=str(data.get("description", "")).strip(),
    )


def load_feature_spec(path: str | Path) -> FeatureSpec:
    """Read and validate a feature spec file."""
    path = Path(path)
    try:
        return parse_feature_spec(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
    except FileNotFoundError:
        raise FeatureSpecError(f"{path}: feature spec not found") from None
    except yaml.YAMLError as exc:
        raise FeatureSpecError(f"{path}: not valid YAML: {exc}") from None


def resolve_feature_spec(name_or_path: str) -> FeatureSpec:
    """Load the spec a ``feature_spec`` setting names: a shipped spec (``chest_ct``) or the path of a YAML file."""
    return load_feature_spec(name_or_path) if names_a_file(name_or_path) else load_default_feature_spec(name_or_path)


def load_default_feature_spec(name: str = DEFAULT_SPEC) -> FeatureSpec:
    """Load a feature spec shipped with riskbridge (``harmonize/data/features_<name>.yaml``)."""
    resource = resources.files("riskbridge.harmonize").joinpath("data", f"features_{name}.yaml")
    if not resource.is_file():
        raise FeatureSpecError(f"no shipped feature spec {name!r}")
    source = f"riskbridge.harmonize/data/features_{name}.yaml"
    return parse_feature_spec(yaml.safe_load(resource.read_text(encoding="utf-8")), source)
