"""The one exception root of riskbridge and its few branches: catch :class:`RiskbridgeError` to catch them all.

Every module's own exception derives from one branch, so a caller can catch as broadly as it needs:

- :class:`ConfigurationError`: settings, rule files, feature specs, unit tables or a run request that cannot work
  as given. Fixing it means changing configuration, not retrying.
- :class:`PacsError`: the PACS (DIMSE or DICOMweb) refused, failed or answered something unusable.
- :class:`FhirServerError`: the FHIR server refused, failed or answered something unusable.
- :class:`DataError`: one study's data cannot be used (corrupt DICOM, no index time, an unreadable volume); the
  pipeline records these as a quarantine reason for that study and goes on.
- :class:`ModelError`: a model package is missing, tampered with or cannot score what it is given.
- :class:`LedgerError`: the ledger database is unreachable, inconsistent or at the wrong schema version.

Exceptions that also mean a standard Python condition keep that base too (a rule file error is still a
``ValueError``), so code that caught the standard one keeps working.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DataError",
    "FhirServerError",
    "LedgerError",
    "ModelError",
    "PacsError",
    "RiskbridgeError",
]


class RiskbridgeError(Exception):
    """The root of every error riskbridge raises on purpose."""


class ConfigurationError(RiskbridgeError):
    """Settings, rules, specs or a run request that cannot work as given; fix the configuration, do not retry."""


class PacsError(RiskbridgeError):
    """The PACS (C-ECHO/C-FIND/C-MOVE/C-GET or DICOMweb) refused, failed or answered something unusable."""


class FhirServerError(RiskbridgeError):
    """The FHIR server refused, failed or answered something unusable."""


class DataError(RiskbridgeError):
    """One item's data cannot be used; the pipeline quarantines the study with a reason and goes on."""


class ModelError(RiskbridgeError):
    """A model package is missing, tampered with, or cannot score what it is given."""


class LedgerError(RiskbridgeError):
    """The ledger database is unreachable, inconsistent, or at a schema version this code does not know."""
