"""Synthetic cohort with exact ground truth (``riskbridge synth``): CT studies for Orthanc, labs and notes for
a FHIR R4 server, identity and series edge cases, and a ground-truth JSONL every stage is tested against.

Public API: :func:`generate` writes a cohort to a directory, :func:`load` uploads it (idempotently),
:func:`load_dicom_into` C-STOREs its DICOM files to any PACS (the sandbox dcmqrscp),
:func:`read_truth` / :func:`read_manifest` read it back. docs/synthetic-cohort.md documents the model.
"""

from riskbridge.dev.synth.cohort import (
    EDGE_CASE_CODES,
    GENERATOR_VERSION,
    OPT_IN_EDGE_CASES,
    QUARANTINE_CODES,
    CohortError,
    EdgeCaseRates,
    site_environment,
)
from riskbridge.dev.synth.generate import CohortSummary, generate, read_manifest, read_truth
from riskbridge.dev.synth.load import LoadError, LoadReport, load, load_dicom_into

__all__ = [
    "EDGE_CASE_CODES",
    "GENERATOR_VERSION",
    "OPT_IN_EDGE_CASES",
    "QUARANTINE_CODES",
    "CohortError",
    "CohortSummary",
    "EdgeCaseRates",
    "LoadError",
    "LoadReport",
    "generate",
    "load",
    "load_dicom_into",
    "read_manifest",
    "read_truth",
    "site_environment",
]
