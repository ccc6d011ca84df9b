"""Hooks: Airflow Connections (given as AIRFLOW_CONN_* variables, JSON or URI) become riskbridge settings."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg2.extensions
import pytest
from pydantic import SecretStr

from riskbridge.airflow.hooks import (
    ConnectionSettingsError,
    FhirHook,
    PacsHook,
    RiskbridgeDbHook,
    connections_from_settings,
    settings_with_connections,
)
from riskbridge.settings import Settings


def _set_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, value: dict[str, object] | str) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", value if isinstance(value, str) else json.dumps(value))


@pytest.fixture
def site_settings(tmp_path: Path) -> Settings:
    """Settings unlike the defaults in every field a connection carries."""
    for name in ("ca.pem", "cert.pem", "key.pem", "smart.pem"):
        (tmp_path / name).write_text("PEM")
    return Settings(
        pacs={
            "host": "pacs.hospital.example",
            "port": 11112,
            "called_ae": "MAIN_PACS",
            "calling_ae": "RB_NIGHTLY",
            "scp_ae": "RB_STORE",
            "scp_port": 4006,
            "scp_bind_address": "10.1.2.3",
            "dicomweb_url": "https://pacs.hospital.example/dicom-web",
            "transport": "c-get",
            "workers": 3,
            "max_attempts": 5,
            "timeout_s": 60.0,
            "tls": {
                "ca_file": tmp_path / "ca.pem",
                "cert_file": tmp_path / "cert.pem",
                "key_file": tmp_path / "key.pem",
            },
        },
        fhir={
            "base_url": "https://ehr.hospital.example/fhir/r4",
            "auth": {
                "type": "oauth2",
                "token_url": "https://ehr.hospital.example/oauth2/token",
                "client_id": "riskbridge",
                "client_secret": "s3cret/with:odd@chars",
                "scope": "system/Observation.rs system/Patient.rs",
            },
            "page_size": 100,
            "search_method": "post",
        },
        database={"dsn": "postgresql://rb_user:p%40ss%2Fword@db.hospital.example:5433/ledger?sslmode=verify-full"},
    )


def test_settings_round_trip_through_connections(monkeypatch: pytest.MonkeyPatch, site_settings: Settings) -> None:
    connections = connections_from_settings(site_settings)
    assert set(connections) == {"pacs_default", "fhir_default", "riskbridge_db"}
    for conn_id, value in connections.items():
        _set_connection(monkeypatch, conn_id, value)

    rebuilt = settings_with_connections(Settings())

    assert rebuilt.pacs == site_settings.pacs
    assert rebuilt.fhir == site_settings.fhir
    assert rebuilt.fhir.auth.client_secret is not None
    assert rebuilt.fhir.auth.client_secret.get_secret_value() == "s3cret/with:odd@chars"
    rebuilt_dsn = psycopg2.extensions.parse_dsn(rebuilt.database.dsn.get_secret_value())
    assert rebuilt_dsn == psycopg2.extensions.parse_dsn(site_settings.database.dsn.get_secret_value())
    assert rebuilt_dsn["password"] == "p@ss/word"


def test_pacs_connection_in_uri_form_keeps_unset_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_connection(monkeypatch, "pacs_default", "riskbridge-pacs://pacs.example:104?called_ae=MAIN&workers=2")

    pacs = PacsHook().pacs_settings(Settings().pacs)

    assert (pacs.host, pacs.port, pacs.called_ae, pacs.workers) == ("pacs.example", 104, "MAIN", 2)
    assert pacs.calling_ae == Settings().pacs.calling_ae


def test_pacs_connection_sets_who_may_connect_and_how_much(monkeypatch: pytest.MonkeyPatch) -> None:
    """The storage SCP's peer allow-list, plaintext choice, handshake timeout and size limits come from the
    Connection too, and are validated as in the config file (a bad network names the key)."""
    extra = {
        "scp_bind_address": "10.20.0.5",
        "scp_allowed_peers": ["10.20.0.0/16"],
        "scp_allow_plaintext": True,
        "tls_handshake_timeout_s": 3,
        "max_pdu_kb": 512,
        "max_instance_mb": 64,
    }
    _set_connection(monkeypatch, "pacs_default", {"conn_type": "riskbridge_pacs", "host": "10.20.0.9", "extra": extra})
    pacs = PacsHook().pacs_settings(Settings().pacs)
    assert (pacs.scp_allowed_peers, pacs.scp_allow_plaintext) == (["10.20.0.0/16"], True)
    assert (pacs.tls_handshake_timeout_s, pacs.max_pdu_kb, pacs.max_instance_mb) == (3, 512, 64)
    refused = {**extra, "scp_allow_plaintext": False}
    _set_connection(
        monkeypatch, "pacs_default", {"conn_type": "riskbridge_pacs", "host": "10.20.0.9", "extra": refused}
    )
    with pytest.raises(ConnectionSettingsError, match="not a loopback address"):
        PacsHook().pacs_settings(Settings().pacs)


@pytest.mark.parametrize(
    ("connection", "message"),
    [
        ({"conn_type": "riskbridge_pacs", "host": "p", "extra": {"caled_ae": "X"}}, "unknown extra key(s) caled_ae"),
        ({"conn_type": "riskbridge_pacs", "host": "p", "extra": {"called_ae": "BAD AE!"}}, "called_ae"),
        ({"conn_type": "riskbridge_pacs", "host": "p", "extra": {"tls_ca_file": "/ca.pem"}}, "needs all of"),
        ({"conn_type": "riskbridge_pacs", "host": "p", "login": "me"}, "does not use login"),
        ({"conn_type": "riskbridge_pacs", "port": 104}, "host (the PACS) is not set"),
    ],
)
def test_bad_pacs_connection_names_the_problem(
    monkeypatch: pytest.MonkeyPatch, connection: dict[str, object], message: str
) -> None:
    _set_connection(monkeypatch, "pacs_default", connection)
    with pytest.raises(ConnectionSettingsError, match="'pacs_default'") as caught:
        PacsHook().pacs_settings()
    assert message in str(caught.value)


def test_fhir_connection_from_host_port_and_path_with_basic_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_connection(
        monkeypatch,
        "fhir_ehr",
        {
            "conn_type": "riskbridge_fhir",
            "host": "ehr.example",
            "port": 8443,
            "login": "svc",
            "password": "pw",
            "extra": {"path": "/fhir/r4/", "auth_type": "basic", "timeout_s": 5},
        },
    )

    fhir = FhirHook("fhir_ehr").fhir_settings()

    assert fhir.base_url == "https://ehr.example:8443/fhir/r4"
    assert fhir.auth.type == "basic" and fhir.auth.username == "svc"
    assert fhir.auth.password == SecretStr("pw")
    assert fhir.timeout_s == 5


def test_fhir_bearer_token_is_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_connection(
        monkeypatch,
        "fhir_default",
        {
            "conn_type": "riskbridge_fhir",
            "host": "http://127.0.0.1:48080/fhir",
            "password": "tok",
            "extra": {"auth_type": "bearer"},
        },
    )
    fhir = FhirHook().fhir_settings()
    assert fhir.base_url == "http://127.0.0.1:48080/fhir"
    assert fhir.auth.token == SecretStr("tok")


@pytest.mark.parametrize(
    ("connection", "message"),
    [
        ({"host": "https://ehr", "login": "u", "password": "p"}, "auth_type is not"),
        ({"host": "https://ehr", "login": "c", "password": "s", "extra": {"auth_type": "oauth2"}}, "token_url"),
        ({"host": "https://ehr", "password": "p", "extra": {"auth_type": "smart"}}, "does not use password"),
        ({"host": "https://ehr", "extra": {"auth_type": "kerberos"}}, "auth.type"),
        ({"host": "https://ehr", "extra": {"path": "/fhir"}}, "full URL"),
        ({"login": "u"}, "host (the FHIR base URL) is not set"),
    ],
)
def test_bad_fhir_connection_names_the_problem(
    monkeypatch: pytest.MonkeyPatch, connection: dict[str, object], message: str
) -> None:
    _set_connection(monkeypatch, "fhir_default", {"conn_type": "riskbridge_fhir", **connection})
    with pytest.raises(ConnectionSettingsError, match="'fhir_default'") as caught:
        FhirHook().fhir_settings()
    assert message in str(caught.value)


def test_ledger_connection_from_a_postgres_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_connection(monkeypatch, "riskbridge_db", "postgresql://rb:se%3Acret@db.example:5433/ledger?sslmode=require")

    dsn = RiskbridgeDbHook().database_settings().dsn.get_secret_value()

    assert psycopg2.extensions.parse_dsn(dsn) == {
        "user": "rb",
        "password": "se:cret",
        "host": "db.example",
        "port": "5433",
        "dbname": "ledger",
        "sslmode": "require",
    }


def test_ledger_connection_with_an_unknown_libpq_parameter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_connection(
        monkeypatch,
        "riskbridge_db",
        {"conn_type": "riskbridge_db", "host": "db", "schema": "l", "extra": {"sslmod": "x"}},
    )
    with pytest.raises(ConnectionSettingsError, match=r"not a valid PostgreSQL DSN.*sslmod"):
        RiskbridgeDbHook().database_settings()


def test_missing_connection_says_how_to_create_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_FHIR_DEFAULT", raising=False)
    with pytest.raises(ConnectionSettingsError, match="AIRFLOW_CONN_FHIR_DEFAULT"):
        FhirHook().fhir_settings()


def test_empty_connection_id_keeps_riskbridge_section(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_connection(monkeypatch, "pacs_default", {"conn_type": "riskbridge_pacs", "host": "pacs.example"})
    settings = Settings(airflow={"fhir_conn_id": "", "db_conn_id": ""})

    combined = settings_with_connections(settings)

    assert combined.pacs.host == "pacs.example"
    assert combined.fhir == settings.fhir
    assert combined.database == settings.database
