"""What Airflow's connection form gets for ``fal``, without a browser, on every Airflow version.

Airflow 3.2+ reads the form from provider info; 3.0/3.1 ask ``FalHook.get_ui_field_behaviour``
and ``get_connection_form_widgets`` (with their own stand-ins for WTForms's field classes). Both
paths must show the same form: labels, placeholders, hidden fields and extras. The browser
test (``test_connection_ui.py``) then checks the rendered form itself.
"""

from __future__ import annotations

import sys
import types

import pytest

from airflow_provider_fal.get_provider_info import fal_connection_form
from airflow_provider_fal.hooks.fal import EXTRA_QUEUE_URL, EXTRA_START_TIMEOUT, EXTRA_TIMEOUT, FalHook


def airflow_version() -> tuple[int, int]:
    from airflow import __version__

    major, minor = __version__.split(".")[:2]
    return int(major), int(minor)


def test_every_extra_the_hook_reads_is_a_labelled_optional_field():
    """(Hidden fields, labels and placeholders: tests/test_provider_registration.py.)"""
    fields = fal_connection_form()["conn-fields"]
    assert set(fields) == {EXTRA_QUEUE_URL, EXTRA_TIMEOUT, EXTRA_START_TIMEOUT}
    for name, spec in fields.items():
        assert spec["label"] and spec["description"], name
        assert "null" in spec["schema"]["type"], f"{name} must be optional"


def test_form_widgets_with_airflows_stand_in_for_wtforms(monkeypatch):
    """Airflow 3.0/3.1 read the widgets with their own field classes in place of WTForms's."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    stand_in = types.ModuleType("wtforms")
    stand_in.StringField = HookMetaService.MockStringField
    monkeypatch.setitem(sys.modules, "wtforms", stand_in)

    widgets = FalHook.get_connection_form_widgets()
    fields = fal_connection_form()["conn-fields"]
    assert set(widgets) == set(fields)
    for name, widget in widgets.items():
        assert isinstance(widget, HookMetaService.MockStringField)
        dumped = widget.param.dump()
        assert dumped["schema"]["title"] == fields[name]["label"]
        assert dumped["description"] == fields[name]["description"]


def test_form_widgets_need_wtforms(monkeypatch):
    monkeypatch.setitem(sys.modules, "wtforms", None)  # makes `import wtforms` raise ImportError
    assert FalHook.get_connection_form_widgets() == {}


@pytest.mark.skipif(airflow_version() < (3, 2), reason="Airflow 3.2+ serves the form from provider info")
def test_what_the_api_server_sends_the_ui():
    """The ``/ui/connections/hook_meta`` payload for ``fal``, from Airflow's own service code."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    (meta,) = [m for m in HookMetaService.hook_meta_data() if m.connection_type == "fal"]
    assert meta.hook_name == "fal.ai"
    standard = meta.standard_fields
    assert (standard.host.title, standard.host.placeholder, standard.host.hidden) == (
        "Base URL",
        "https://fal.run",
        False,
    )
    assert (standard.password.title, standard.password.hidden) == ("API Key", False)
    assert standard.login.hidden and standard.port.hidden and standard.url_schema.hidden
    fields = fal_connection_form()["conn-fields"]
    assert set(meta.extra_fields) == set(fields)
    for name, spec in fields.items():
        sent = meta.extra_fields[name]
        assert sent["schema"]["title"] == spec["label"]
        assert sent["description"] == spec["description"]
