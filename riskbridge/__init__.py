"""riskbridge: nightly imaging + EHR risk scoring, from DICOM and FHIR in to RiskAssessment out.

Subpackages: :mod:`riskbridge.connectors` (DICOM, FHIR, PostgreSQL I/O), :mod:`riskbridge.harmonize`
(identity, series selection, time windows, units, notes, features) and :mod:`riskbridge.model` (fusion model,
training, scoring). The core holds settings, the CLI, the sandbox and the synthetic cohort.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("riskbridge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
