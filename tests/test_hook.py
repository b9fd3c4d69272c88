"""FalHook over real HTTP against the emulator, with connections from AIRFLOW_CONN_* variables."""

from __future__ import annotations

import json

import pytest
import requests

from airflow_provider_fal.emulator import FalEmulator
from airflow_provider_fal.exceptions import (
    FalAuthError,
    FalConfigurationError,
    FalRequestLostError,
    FalStartTimeoutError,
)
from airflow_provider_fal.hooks.fal import FalHook
from tests.conftest import API_KEY, connection_json, wait_until

FAST = {"initial_backoff": 0.01, "max_backoff": 0.05}


def test_run_returns_the_model_output(emulator, fal_connection):
    hook = FalHook(retry_policy=FAST)
    output = hook.run("fal-ai/flux/schnell", {"prompt": "a boat", "image_size": "square", "seed": 3})
    image = output["images"][0]
    assert (image["width"], image["height"], image["content_type"]) == (512, 512, "image/png")
    download = requests.get(image["url"], timeout=10)
    assert download.headers["Content-Type"] == "image/png"
    assert download.content[:8] == b"\x89PNG\r\n\x1a\n"
    # Deterministic: the same input gives the same output.
    assert hook.run("fal-ai/flux/schnell", {"prompt": "a boat", "image_size": "square", "seed": 3})["seed"] == 3


def test_connection_is_resolved_once_and_one_session_is_reused(emulator, fal_connection, monkeypatch):
    hook = FalHook(retry_policy=FAST)
    assert hook.run("emulator/echo", {"a": 1}) == {"a": 1}
    session = hook.client.session
    # A later change of the connection does not affect a hook that already resolved it.
    monkeypatch.setenv("AIRFLOW_CONN_FAL_DEFAULT", connection_json(emulator, api_key="wrong"))
    assert hook.run("emulator/echo", {"a": 2}) == {"a": 2}
    assert hook.client.session is session
    # ... while a new hook does read it again.
    with pytest.raises(FalAuthError):
        FalHook(retry_policy=FAST).run("emulator/echo", {"a": 3})


def test_missing_connection_names_it_and_how_to_create_it(emulator, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_FAL_DEFAULT", raising=False)
    with pytest.raises(FalConfigurationError) as raised:
        FalHook(fal_conn_id="fal_nightly").run("emulator/echo", {})
    message = str(raised.value)
    assert "'fal_nightly' does not exist" in message
    assert "airflow connections add fal_nightly --conn-type fal" in message
    assert "AIRFLOW_CONN_FAL_NIGHTLY" in message
    assert emulator.requests == []


def test_connection_without_key_is_a_clear_error(emulator, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_FAL_EMPTY", json.dumps({"conn_type": "fal", "host": emulator.url}))
    with pytest.raises(FalConfigurationError, match="'fal_empty' has no API key"):
        FalHook(fal_conn_id="fal_empty").run("emulator/echo", {})
    assert emulator.requests == []


def test_fal_key_environment_fallback_for_the_default_connection(monkeypatch, logs):
    monkeypatch.delenv("AIRFLOW_CONN_FAL_DEFAULT", raising=False)
    monkeypatch.setenv("FAL_KEY", "env-secret-key-123")
    settings = FalHook().settings
    text = logs()
    assert settings.api_key == "env-secret-key-123"
    assert settings.run_url == "https://fal.run" and settings.queue_url == "https://queue.fal.run"
    assert "FAL_KEY environment variable" in text
    assert "env-secret-key-123" not in text + repr(settings) + repr(FalHook())
    # Only the default connection falls back; a named one must exist.
    with pytest.raises(FalConfigurationError):
        _ = FalHook(fal_conn_id="other").settings


def test_key_id_and_secret_form_uses_login(monkeypatch):
    with FalEmulator(api_key="key-id:key-secret") as emu:
        conn = {"conn_type": "fal", "host": emu.url, "login": "key-id", "password": "key-secret"}
        monkeypatch.setenv("AIRFLOW_CONN_FAL_PAIR", json.dumps(conn))
        assert FalHook(fal_conn_id="fal_pair").run("emulator/echo", {"ok": True}) == {"ok": True}


def test_connection_extras_set_start_timeout_and_read_timeout(emulator, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_FAL_DEFAULT", connection_json(emulator, start_timeout=45, timeout=0.5))
    hook = FalHook(retry_policy=FAST)
    hook.run("emulator/echo", {})
    assert emulator.requests[-1].headers.get("X-Fal-Request-Timeout") == "45"

    emulator.set_latency(2.0, model_id="emulator/echo")
    with pytest.raises(FalRequestLostError, match=r"read timeout of 0\.5 s"):
        hook.run("emulator/echo", {})
    assert wait_until(lambda: emulator.count(method="POST") == 2)
    assert not wait_until(lambda: emulator.count(method="POST") > 2, timeout=1.0), "a lost answer is never resent"


def test_start_timeout_expiry_is_not_retried(emulator, fal_connection):
    emulator.set_runner_wait(5.0)
    with pytest.raises(FalStartTimeoutError) as raised:
        FalHook(retry_policy=FAST).run("fal-ai/fast-sdxl", {"prompt": "x"}, start_timeout=1)
    assert raised.value.status_code == 504 and raised.value.permanent
    assert emulator.count(method="POST") == 1


def test_test_connection_tells_good_key_from_bad(emulator, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_FAL_DEFAULT", connection_json(emulator))
    ok, message = FalHook().test_connection()
    assert ok, message
    monkeypatch.setenv("AIRFLOW_CONN_FAL_DEFAULT", connection_json(emulator, api_key="not-the-key"))
    ok, message = FalHook().test_connection()
    assert not ok and "rejected the API key" in message
    assert "not-the-key" not in message
    # The probe never runs (or bills) a model.
    assert emulator.count(method="POST") == 0


def test_key_never_in_repr_or_errors(emulator, fal_connection, logs):
    hook = FalHook(retry_policy=FAST)
    emulator.inject_fault(status=503, error_type="runner_disconnected", times=1)
    hook.run("emulator/echo", {"x": 1})
    emulator.inject_fault(status=500, error_type="internal_error", detail=f"boom {API_KEY}")
    with pytest.raises(Exception) as raised:
        hook.run("emulator/echo", {"x": 1})
    texts = [repr(hook), repr(hook.client), repr(hook.settings), str(raised.value), logs()]
    assert all(API_KEY not in text for text in texts)
    assert "***" in str(raised.value), "a key echoed back by the server is scrubbed"
