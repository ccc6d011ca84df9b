"""``riskbridge doctor``: can this installation reach its PACS, its FHIR server and its ledger database?

Each check is independent and reports OK or FAIL with the reason; one failing part never hides another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from riskbridge.connectors import db, dicom, fhir
from riskbridge.settings import Settings


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one doctor check."""

    name: str
    target: str
    ok: bool
    detail: str


def _check_pacs(settings: Settings) -> str:
    seconds = dicom.echo(settings.pacs)
    return f"C-ECHO from {settings.pacs.calling_ae} answered Success in {seconds * 1000:.0f} ms"


def _check_fhir(settings: Settings) -> str:
    info = fhir.capability(settings.fhir)
    return f"{info.name} {info.version}, FHIR {info.fhir_version}"


def _check_database(settings: Settings) -> str:
    return f"PostgreSQL {db.server_version(settings.database)}"


CHECKS: tuple[tuple[str, Callable[[Settings], str], Callable[[Settings], str]], ...] = (
    ("PACS (DICOM)", _check_pacs, lambda s: dicom.peer_name(s.pacs)),
    ("FHIR server", _check_fhir, lambda s: s.fhir.base_url),
    ("Ledger database", _check_database, lambda s: db.safe_dsn(s.database.dsn.get_secret_value())),
)

EXPECTED_ERRORS = (dicom.DicomError, fhir.FhirError, db.DatabaseError, OSError)


def run_checks(settings: Settings) -> list[CheckResult]:
    """Run every check and return one result each, in a fixed order."""
    results = []
    for name, check, target in CHECKS:
        try:
            results.append(CheckResult(name, target(settings), True, check(settings)))
        except EXPECTED_ERRORS as exc:
            results.append(CheckResult(name, target(settings), False, str(exc)))
    return results
