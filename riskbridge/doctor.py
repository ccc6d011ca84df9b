"""``riskbridge doctor``: can this installation reach its PACS, its FHIR server and its ledger database?

Each check is independent and reports OK or FAIL with the reason; one failing part never hides another. After the
checks come warnings about settings that work but weaken security (:func:`setting_warnings`): WARN rows, seen without
failing the command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from riskbridge.connectors import db, dicom, fhir
from riskbridge.errors import RiskbridgeError
from riskbridge.settings import DatabaseSettings, FhirSettings, PacsSettings, Settings


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one doctor check."""

    name: str
    target: str
    ok: bool
    detail: str
    warning: bool = False  # works, but a setting weakens security: shown as WARN, never fails the command

    @property
    def result(self) -> str:
        """OK, WARN or FAIL, as the command shows it."""
        return "FAIL" if not self.ok else "WARN" if self.warning else "OK"


def check_pacs(pacs: PacsSettings) -> str:
    """C-ECHO the PACS; the answer's time."""
    seconds = dicom.echo(pacs)
    return f"C-ECHO from {pacs.calling_ae} answered Success in {seconds * 1000:.0f} ms"


def check_fhir(fhir_settings: FhirSettings) -> str:
    """Read the FHIR server's CapabilityStatement; its name, version and FHIR version."""
    info = fhir.capability(fhir_settings)
    return f"{info.name} {info.version}, FHIR {info.fhir_version}"


def check_database(database: DatabaseSettings) -> str:
    """Connect to the ledger database; its server version."""
    return f"PostgreSQL {db.server_version(database)}"


def _checks(settings: Settings) -> list[tuple[str, Callable[[], str], str]]:
    """(name, check, target) of every check: each check reads only its own settings section."""
    return [
        ("PACS (DICOM)", lambda: check_pacs(settings.pacs), dicom.peer_name(settings.pacs)),
        ("FHIR server", lambda: check_fhir(settings.fhir), settings.fhir.base_url),
        ("Ledger database", lambda: check_database(settings.database),
         db.safe_dsn(settings.database.dsn.get_secret_value())),
    ]  # fmt: skip


EXPECTED_ERRORS = (RiskbridgeError, OSError)


def setting_warnings(settings: Settings) -> list[CheckResult]:
    """One row for each setting that was allowed on purpose but weakens security; none for the defaults."""
    pacs = settings.pacs
    warnings = []
    if pacs.scp_allow_plaintext and pacs.scp_plaintext_off_loopback():
        warnings.append(
            CheckResult(
                "Storage SCP (DICOM)",
                f"{pacs.scp_ae}@{pacs.scp_bind_address}:{pacs.scp_port}",
                True,
                "listens off loopback without TLS (pacs.scp_allow_plaintext = true): retrieved images cross "
                "the network unencrypted; configure [pacs.tls]",
                warning=True,
            )
        )
    return warnings


def run_checks(settings: Settings) -> list[CheckResult]:
    """Run every check and return one result each, in a fixed order, then the :func:`setting_warnings`."""
    results = []
    for name, check, target in _checks(settings):
        try:
            results.append(CheckResult(name, target, True, check()))
        except EXPECTED_ERRORS as exc:
            results.append(CheckResult(name, target, False, str(exc)))
    return results + setting_warnings(settings)
