"""Airflow provider info: registers riskbridge's connection types (PACS, FHIR, ledger) with Airflow.

Airflow finds it through the ``apache_airflow_provider`` entry point in pyproject.toml and reads the connection
types without importing the hooks; the UI shows the fields declared here. Kept free of imports on purpose.
"""

from __future__ import annotations

from typing import Any

PACKAGE_NAME = "riskbridge"
HOOKS_MODULE = "riskbridge.airflow.hooks"


def get_provider_info() -> dict[str, Any]:
    """Return riskbridge's provider info in the form of Airflow's provider_info.schema.json."""
    return {
        "package-name": PACKAGE_NAME,
        "name": "riskbridge",
        "description": "Nightly imaging + EHR risk scoring: the PACS, FHIR server and ledger riskbridge connects to.",
        "hooks": [{"integration-name": "riskbridge", "python-modules": [HOOKS_MODULE]}],
        "connection-types": [
            {
                "connection-type": "riskbridge_pacs",
                "hook-class-name": f"{HOOKS_MODULE}.PacsHook",
                "hook-name": "riskbridge PACS (DICOM)",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login", "password"],
                    "relabeling": {"host": "PACS host", "port": "PACS DICOM port"},
                    "placeholders": {"host": "pacs.hospital.example", "port": "104"},
                },
                "conn-fields": {
                    "called_ae": _text("Called AE title", "The PACS's AE title."),
                    "calling_ae": _text("Calling AE title", "riskbridge's AE title, registered at the PACS."),
                    "scp_ae": _text("Storage SCP AE title", "C-MOVE destination; worker i adds i to the title."),
                    "scp_port": _integer("Storage SCP port", "Where riskbridge's storage SCP listens.", 1, 65535),
                    "scp_bind_address": _text("Storage SCP bind address", "The interface the SCP listens on."),
                    "dicomweb_url": _text("DICOMweb URL", "WADO-RS base URL, e.g. https://pacs.example/dicom-web."),
                    "transport": {
                        "label": "Transport",
                        "description": "How series are retrieved; auto picks the fastest the PACS supports.",
                        "schema": {"type": ["string", "null"], "enum": ["auto", "c-move", "c-get", "dicomweb"]},
                    },
                    "workers": _integer("Retrieval workers", "Parallel associations per retrieve task.", 1, 16),
                    "tls_ca_file": _text("TLS CA file", "PEM bundle that signs the PACS's certificate."),
                    "tls_cert_file": _text("TLS client certificate", "PEM certificate riskbridge presents."),
                    "tls_key_file": _text("TLS client key", "PEM private key of that certificate."),
                },
            },
            {
                "connection-type": "riskbridge_fhir",
                "hook-class-name": f"{HOOKS_MODULE}.FhirHook",
                "hook-name": "riskbridge FHIR server",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port"],
                    "relabeling": {
                        "host": "FHIR base URL",
                        "login": "Username or client id",
                        "password": "Password, bearer token or client secret",
                    },
                    "placeholders": {"host": "https://ehr.hospital.example/fhir/r4"},
                },
                "conn-fields": {
                    "auth_type": {
                        "label": "Auth type",
                        "description": "none, basic (login/password), bearer (password = token), oauth2 (client "
                        "credentials: login = client id, password = secret), smart (SMART Backend Services).",
                        "schema": {"type": ["string", "null"], "enum": ["none", "basic", "bearer", "oauth2", "smart"]},
                    },
                    "token_url": _text("Token URL", "OAuth2/SMART token endpoint."),
                    "scope": _text("Scope", "OAuth2/SMART scopes, e.g. system/Observation.rs system/Patient.rs."),
                    "private_key_file": _text("Private key file", "SMART: PEM key that signs the client assertion."),
                    "key_id": _text("Key id", "SMART: the kid of that key in the registered JWKS."),
                    "algorithm": {
                        "label": "Signing algorithm",
                        "description": "SMART client assertion algorithm.",
                        "schema": {"type": ["string", "null"], "enum": ["RS384", "ES384"]},
                    },
                },
            },
            {
                "connection-type": "riskbridge_db",
                "hook-class-name": f"{HOOKS_MODULE}.RiskbridgeDbHook",
                "hook-name": "riskbridge ledger (PostgreSQL)",
                "ui-field-behaviour": {
                    "relabeling": {"schema": "Database"},
                    "placeholders": {"port": "5432", "schema": "riskbridge", "extra": '{"sslmode": "verify-full"}'},
                },
            },
        ],
    }


def _text(label: str, description: str) -> dict[str, Any]:
    return {"label": label, "description": description, "schema": {"type": ["string", "null"]}}


def _integer(label: str, description: str, minimum: int, maximum: int) -> dict[str, Any]:
    return {
        "label": label,
        "description": description,
        "schema": {"type": ["integer", "null"], "minimum": minimum, "maximum": maximum},
    }
