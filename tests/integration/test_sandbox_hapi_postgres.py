"""A sandbox HAPI FHIR on PostgreSQL (``sandbox.hapi_database = "postgresql"``), in a sandbox of the test's own.

Starts only PostgreSQL and HAPI (under a minute and a half on 2 shared cores), on ports of its own beside the shared
sandbox's, the fault suite's and the FHIR benchmark's; it never touches another sandbox's processes. Checks that
HAPI keeps its resources in its own database of the sandbox cluster, that a transaction with a conditional create
behaves as on H2, and that the clinical stage's search shape (an OR-list of subjects with a code and a date filter)
answers exactly what it should.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment

from riskbridge.connectors.fhir import FhirClient, code_filter, date_filter, transaction_entry
from riskbridge.dev.sandbox import HAPI_POSTGRES_DATABASE, Sandbox
from riskbridge.settings import FhirSettings, Settings

pytestmark = pytest.mark.integration

HAPI_PORT = 27080
POSTGRES_PORT = 27432
LOINC = "http://loinc.org"
SYSTEM = "urn:riskbridge:test:hapi-postgres"


@pytest.fixture(scope="module")
def hapi_on_postgres() -> Iterator[Settings]:
    """The test's own PostgreSQL and HAPI FHIR on it; stopped and removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="riskbridge-hapi-pg-"))
    directory.chmod(0o755)  # the 'postgres' account must traverse it when the tests run as root
    # model_copy, not Settings(sandbox=...): riskbridge's environment overrides keyword arguments key by key, and
    # CI exports RISKBRIDGE_SANDBOX__DIR (the shared sandbox's): this sandbox would read, then stop, the shared one's
    # processes through their PID files.
    base = Settings()
    sandbox = base.sandbox.model_copy(
        update={
            "dir": directory / "sandbox",
            "hapi_database": "postgresql",
            "hapi_port": HAPI_PORT,
            "postgres_port": POSTGRES_PORT,
            "ready_timeout_s": 150,
        }
    )
    fhir = base.fhir.model_copy(update={"base_url": f"http://127.0.0.1:{HAPI_PORT}/fhir"})
    settings = base.model_copy(update={"sandbox": sandbox, "fhir": fhir})
    assert settings.sandbox.dir == directory / "sandbox"
    box = Sandbox(settings)
    try:
        statuses = box.up(only=["hapi-fhir"])
        assert [(status.name, status.state) for status in statuses] == [("hapi-fhir", "ready"), ("postgres", "ready")]
        yield settings
    finally:
        for part in box.select(["hapi-fhir"]):
            part.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _observation(patient: str, code: str, when: datetime, value: float) -> dict[str, object]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when.isoformat(),
        "valueQuantity": {"value": value, "unit": "mg/dL"},
    }


def test_hapi_keeps_its_resources_in_its_own_postgresql_database(hapi_on_postgres: Settings) -> None:
    settings = hapi_on_postgres
    index = datetime(2024, 3, 1, 12, tzinfo=UTC)
    patients = ["pg-a", "pg-b", "pg-c"]
    entries: list[dict[str, object]] = [
        {"resource": {"resourceType": "Patient", "id": pid}, "request": {"method": "PUT", "url": f"Patient/{pid}"}}
        for pid in patients
    ]
    wanted = [
        _observation("pg-a", "2160-0", index - timedelta(hours=3), 1.1),
        _observation("pg-b", "2160-0", index - timedelta(hours=30), 0.9),
    ]
    unwanted = [
        _observation("pg-a", "718-7", index - timedelta(hours=3), 13.5),  # another code
        _observation("pg-b", "2160-0", index - timedelta(days=10), 1.4),  # outside the window
        _observation("pg-c", "2160-0", index - timedelta(hours=2), 1.0),  # a patient not searched
    ]
    entries += [{"resource": o, "request": {"method": "POST", "url": "Observation"}} for o in wanted + unwanted]
    risk = RiskAssessment.model_validate(
        {
            "resourceType": "RiskAssessment",
            "status": "final",
            "identifier": [{"system": SYSTEM, "value": "one"}],
            "subject": {"reference": "Patient/pg-a"},
        }
    )
    with FhirClient(FhirSettings(base_url=settings.fhir.base_url)) as client:
        client.transaction(entries)
        found = list(
            client.search_by_patients(
                "Observation",
                ["pg-a", "pg-b"],
                {"code": code_filter(LOINC, ["2160-0"]), "date": date_filter(index - timedelta(hours=48), index)},
            )
        )
        assert sorted(o["valueQuantity"]["value"] for o in found) == [0.9, 1.1]
        created = client.transaction([transaction_entry(risk, if_none_exist=f"identifier={SYSTEM}|one")])
        again = client.transaction([transaction_entry(risk, if_none_exist=f"identifier={SYSTEM}|one")])
        assert [r.status for r in created + again] == [201, 200]

    connection = psycopg2.connect(
        host="127.0.0.1", port=settings.sandbox.postgres_port, user="riskbridge", dbname=HAPI_POSTGRES_DATABASE
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT res_type, count(*) FROM hfj_resource GROUP BY res_type ORDER BY res_type")
            assert cursor.fetchall() == [("Observation", 5), ("Patient", 3), ("RiskAssessment", 1)]
    finally:
        connection.close()
