"""The provider is registered with Airflow the way Airflow expects."""

from __future__ import annotations

import importlib
import json
from importlib.metadata import distribution, entry_points
from pathlib import Path

import airflow
import jsonschema
import pytest

from airflow_provider_fal.get_provider_info import get_provider_info
from airflow_provider_fal.hooks.fal import FalHook
from tests.conftest import airflow_cli


def test_provider_info_matches_the_schema_shipped_with_airflow():
    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)


def test_package_name_is_the_distribution_name_and_entry_point_is_registered():
    info = get_provider_info()
    assert distribution(info["package-name"]).metadata["Name"] == "airflow-provider-fal"
    (entry,) = [
        ep for ep in entry_points(group="apache_airflow_provider") if ep.value.startswith("airflow_provider_fal")
    ]
    assert entry.load() is get_provider_info


def test_every_module_and_class_named_in_provider_info_imports():
    info = get_provider_info()
    modules = [
        m
        for section in ("hooks", "operators", "triggers")
        for entry in info.get(section, [])
        for m in entry["python-modules"]
    ]
    for module in modules:
        importlib.import_module(module)
    for conn_type in info["connection-types"]:
        module, _, name = conn_type["hook-class-name"].rpartition(".")
        hook_class = getattr(importlib.import_module(module), name)
        assert hook_class.conn_type == conn_type["connection-type"] == "fal"
        assert hook_class.default_conn_name == "fal_default" and hook_class.conn_name_attr == "fal_conn_id"


def test_declarative_form_and_hook_form_agree():
    (declared,) = get_provider_info()["connection-types"]
    behaviour = declared["ui-field-behaviour"]
    from_hook = FalHook.get_ui_field_behaviour()
    assert behaviour["hidden-fields"] == from_hook["hidden_fields"] == ["schema", "port", "login"]
    assert behaviour["relabeling"] == from_hook["relabeling"]
    assert behaviour["relabeling"]["password"] == "API Key"
    assert behaviour["placeholders"] == from_hook["placeholders"]
    assert behaviour["placeholders"]["host"] == "https://fal.run"
    assert set(declared["conn-fields"]) == {"queue_url", "timeout", "start_timeout"}


def json_rows(stdout: str) -> list[dict]:
    """The JSON table an ``airflow ... --output json`` command printed (log lines may precede it)."""
    line = next(line for line in stdout.splitlines() if line.startswith("[{"))
    return json.loads(line)


@pytest.mark.e2e
def test_airflow_cli_lists_the_provider_and_the_fal_connection_type():
    providers = airflow_cli("providers", "list", "--output", "json")
    assert providers.returncode == 0, providers.stderr[-2000:]
    listed = {p["package_name"]: p for p in json_rows(providers.stdout)}
    assert "airflow-provider-fal" in listed

    hooks = airflow_cli("providers", "hooks", "--output", "json")
    assert hooks.returncode == 0, hooks.stderr[-2000:]
    rows = json_rows(hooks.stdout)
    fal_rows = [row for row in rows if row.get("connection_type") == "fal"]
    assert fal_rows and fal_rows[0]["class"] == "airflow_provider_fal.hooks.fal.FalHook"
    assert fal_rows[0]["package_name"] == "airflow-provider-fal"
