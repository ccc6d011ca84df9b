"""The provider entry point registers riskbridge's connection types with Airflow, the way Airflow's providers do."""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import airflow
import jsonschema
from airflow.providers_manager import ProvidersManager
from airflow.sdk.module_loading import import_string

from riskbridge.airflow.provider import get_provider_info

EXPECTED = {
    "riskbridge_pacs": ("riskbridge.airflow.hooks.PacsHook", "pacs_default"),
    "riskbridge_fhir": ("riskbridge.airflow.hooks.FhirHook", "fhir_default"),
    "riskbridge_db": ("riskbridge.airflow.hooks.RiskbridgeDbHook", "riskbridge_db"),
}


def test_entry_point_points_at_get_provider_info() -> None:
    points = [
        point
        for point in entry_points(group="apache_airflow_provider")
        if point.dist and point.dist.name == "riskbridge"
    ]
    assert [point.value for point in points] == ["riskbridge.airflow.provider:get_provider_info"]
    assert points[0].load() is get_provider_info


def test_provider_info_matches_airflow_schemas() -> None:
    info = get_provider_info()
    airflow_dir = Path(airflow.__file__).parent
    jsonschema.validate(info, json.loads((airflow_dir / "provider_info.schema.json").read_text()))
    # The stricter development schema describes conn-fields and ui-field-behaviour; check those parts against it.
    connection_types_schema = json.loads((airflow_dir / "provider.yaml.schema.json").read_text())["properties"][
        "connection-types"
    ]
    jsonschema.validate(info["connection-types"], connection_types_schema)


def test_hook_classes_agree_with_the_registered_types() -> None:
    for entry in get_provider_info()["connection-types"]:
        hook_class = import_string(entry["hook-class-name"])
        assert hook_class.conn_type == entry["connection-type"]
        assert (entry["hook-class-name"], hook_class.default_conn_name) == EXPECTED[entry["connection-type"]]


def test_airflow_registers_the_connection_types() -> None:
    manager = ProvidersManager()
    assert "riskbridge" in manager.providers
    hooks = manager.hooks
    for conn_type, (class_name, _) in EXPECTED.items():
        hook_info = hooks[conn_type]
        assert hook_info is not None and hook_info.hook_class_name == class_name
    assert "extra__riskbridge_pacs__called_ae" in manager.connection_form_widgets
    assert manager.field_behaviours["riskbridge_fhir"]["relabeling"]["host"] == "FHIR base URL"
