"""Pure stage logic between the connectors and the model: identity, series selection, windows, units, notes.

Installed as :mod:`riskbridge.harmonize`. Every module decides; none does network or database I/O (they read their
own packaged YAML tables and rule files, and a site's files when configured), so all of it is tested without
servers. The modules, by concern:

- :mod:`~riskbridge.harmonize.identity`: which FHIR Patient a PACS patient is (its configuration in
  :mod:`~riskbridge.harmonize.identity_config`, name comparison in :mod:`~riskbridge.harmonize.identity_names`);
- :mod:`~riskbridge.harmonize.series`: which series of a study the model reads (the rules in
  :mod:`~riskbridge.harmonize.series_rules`, their YAML files in :mod:`~riskbridge.harmonize.series_rule_file`);
- :mod:`~riskbridge.harmonize.windows`: index time and which lab values belong to it;
- :mod:`~riskbridge.harmonize.units`: lab values in the canonical UCUM unit (the table files in
  :mod:`~riskbridge.harmonize.unit_table`, UCUM parsing in :mod:`~riskbridge.harmonize.ucum`);
- :mod:`~riskbridge.harmonize.notes`: comorbidity flags from notes and Conditions (the rule file in
  :mod:`~riskbridge.harmonize.notes_rule_file`);
- :mod:`~riskbridge.harmonize.features`: the feature spec, the vector and the minimum-data policy;
- :mod:`~riskbridge.harmonize.labels`: outcome labels from FHIR resources by a label spec (training, monitoring);
- :mod:`~riskbridge.harmonize.volume`: one CT series as a volume in Hounsfield units.

The main names of each are importable from here too (``from riskbridge.harmonize import select_series``). They are
loaded lazily, on first use, so importing one module does not import the others (notes needs spaCy and medspaCy,
volume torch and MONAI). ``RuleSet``, ``load_rules`` and ``parse_rules`` exist in both series selection and notes,
so they are imported from their module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from riskbridge.lazy import lazy_exports

if TYPE_CHECKING:
    from riskbridge.harmonize.features import (
        PATTERNS,
        FeatureSpec,
        FeatureSpecError,
        FeatureVector,
        ScoreDecision,
        build_vector,
        decide,
        load_default_feature_spec,
        load_feature_spec,
        modality_pattern,
        present_modalities,
        resolve_feature_spec,
    )
    from riskbridge.harmonize.identity import (
        IdentityConfig,
        IdentityMatch,
        Outcome,
        PatientDirectory,
        Reason,
        match_patient,
        match_studies,
    )
    from riskbridge.harmonize.labels import LabelDecision, LabelSpec, label_patient, load_label_spec
    from riskbridge.harmonize.notes import (
        FlagEvidence,
        PatientComorbidities,
        extract_comorbidities,
        extract_comorbidities_batch,
    )
    from riskbridge.harmonize.rule_file import RuleFileError
    from riskbridge.harmonize.series import SelectionResult, load_default_rules, select_series
    from riskbridge.harmonize.units import (
        Exclusion,
        ExclusionReason,
        NormalizedValue,
        NormalizePolicy,
        UnitTable,
        UnitTableError,
        convert,
        default_table,
        load_table,
        normalize,
    )
    from riskbridge.harmonize.volume import VolumeError, VolumeOptions
    from riskbridge.harmonize.windows import (
        FeatureWindow,
        IndexTimeError,
        Measurement,
        Policy,
        WindowReason,
        WindowSelection,
        index_time,
        index_time_of_study,
        select_value,
    )

# Public name -> the module (under riskbridge.harmonize) that defines it.
_EXPORTS: dict[str, str] = {
    # identity
    "IdentityConfig": "identity",
    "IdentityMatch": "identity",
    "Outcome": "identity",
    "PatientDirectory": "identity",
    "Reason": "identity",
    "match_patient": "identity",
    "match_studies": "identity",
    # series selection
    "RuleFileError": "rule_file",
    "SelectionResult": "series",
    "load_default_rules": "series",
    "select_series": "series",
    # windows
    "FeatureWindow": "windows",
    "IndexTimeError": "windows",
    "Measurement": "windows",
    "Policy": "windows",
    "WindowReason": "windows",
    "WindowSelection": "windows",
    "index_time": "windows",
    "index_time_of_study": "windows",
    "select_value": "windows",
    # units
    "Exclusion": "units",
    "ExclusionReason": "units",
    "NormalizePolicy": "units",
    "NormalizedValue": "units",
    "UnitTable": "units",
    "UnitTableError": "units",
    "convert": "units",
    "default_table": "units",
    "load_table": "units",
    "normalize": "units",
    # labels
    "LabelDecision": "labels",
    "LabelSpec": "labels",
    "label_patient": "labels",
    "load_label_spec": "labels",
    # notes
    "FlagEvidence": "notes",
    "PatientComorbidities": "notes",
    "extract_comorbidities": "notes",
    "extract_comorbidities_batch": "notes",
    # features
    "PATTERNS": "features",
    "FeatureSpec": "features",
    "FeatureSpecError": "features",
    "FeatureVector": "features",
    "ScoreDecision": "features",
    "build_vector": "features",
    "decide": "features",
    "load_default_feature_spec": "features",
    "load_feature_spec": "features",
    "modality_pattern": "features",
    "present_modalities": "features",
    "resolve_feature_spec": "features",
    # volume
    "VolumeError": "volume",
    "VolumeOptions": "volume",
}

__all__ = [
    "PATTERNS",
    "Exclusion",
    "ExclusionReason",
    "FeatureSpec",
    "FeatureSpecError",
    "FeatureVector",
    "FeatureWindow",
    "FlagEvidence",
    "IdentityConfig",
    "IdentityMatch",
    "IndexTimeError",
    "LabelDecision",
    "LabelSpec",
    "Measurement",
    "NormalizePolicy",
    "NormalizedValue",
    "Outcome",
    "PatientComorbidities",
    "PatientDirectory",
    "Policy",
    "Reason",
    "RuleFileError",
    "ScoreDecision",
    "SelectionResult",
    "UnitTable",
    "UnitTableError",
    "VolumeError",
    "VolumeOptions",
    "WindowReason",
    "WindowSelection",
    "build_vector",
    "convert",
    "decide",
    "default_table",
    "extract_comorbidities",
    "extract_comorbidities_batch",
    "index_time",
    "index_time_of_study",
    "label_patient",
    "load_default_feature_spec",
    "load_default_rules",
    "load_feature_spec",
    "load_label_spec",
    "load_table",
    "match_patient",
    "match_studies",
    "modality_pattern",
    "normalize",
    "present_modalities",
    "resolve_feature_spec",
    "select_series",
    "select_value",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
