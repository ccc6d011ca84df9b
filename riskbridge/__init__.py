"""riskbridge: nightly imaging + EHR risk scoring, from DICOM and FHIR in to RiskAssessment out.

The package in layers (docs/architecture.md), each importing only from the layers below it:

- :mod:`riskbridge.settings`, :mod:`riskbridge.records`, :mod:`riskbridge.errors`: configuration, the records passed
  between the layers, and the one exception root :class:`~riskbridge.errors.RiskbridgeError`;
- :mod:`riskbridge.harmonize`: identity matching, series selection, time windows, units, notes, features (pure
  decisions, no I/O);
- :mod:`riskbridge.connectors` (DICOM, DICOMweb, FHIR, PostgreSQL I/O) and :mod:`riskbridge.model` (the fusion
  model: reading volumes, training, packages, scoring), side by side;
- :mod:`riskbridge.ledger`: the PostgreSQL ledger of runs, decisions and the write-back outbox;
- :mod:`riskbridge.stages`: one module per pipeline stage, and the ordered stage list;
- :mod:`riskbridge.pipeline`: a run over the stages; :mod:`riskbridge.airflow`: the DAG factory and hooks;
  :mod:`riskbridge.cli`: the ``riskbridge`` command; :mod:`riskbridge.dev`: synthetic cohort, sandbox, demo.

Nothing is imported here but the version: import the layer you use.
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("riskbridge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
