"""FalHook over real HTTP against the emulator, with connections from AIRFLOW_CONN_* variables."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest
import requests

from airflow_provider_fal.emulator import FalEmulator
from airflow_provider_fal.exceptions import (
    FalAuthError,
    FalConfigurationError,
    FalError,
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


# --------------------------------------------------------------------------- keys as pasted


def test_a_key_ending_in_a_newline_is_stripped_and_works(emulator, monkeypatch, logs):
    """Keys copied from files and secret stores often end in a newline; it must neither fail nor leak."""
    monkeypatch.setenv("AIRFLOW_CONN_FAL_DEFAULT", connection_json(emulator, api_key=f"  {API_KEY}\n"))
    hook = FalHook(retry_policy=FAST)
    assert hook.run("emulator/echo", {"a": 1}) == {"a": 1}
    assert hook.settings.api_key == API_KEY
    ok, message = FalHook().test_connection()
    assert ok, message
    assert API_KEY not in message + logs()


def test_fal_key_variable_ending_in_a_newline_is_stripped(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_FAL_DEFAULT", raising=False)
    monkeypatch.setenv("FAL_KEY", "env-secret-key-123\r\n")
    assert FalHook().settings.api_key == "env-secret-key-123"


@pytest.mark.parametrize(
    ("login", "password"),
    [(None, "test-key\n-inner-secret"), (None, "test-key\x00-inner-secret"), ("key id", "test-key-inner-secret")],
)
def test_a_key_with_inner_control_characters_is_refused_naming_the_connection(emulator, monkeypatch, login, password):
    conn = {"conn_type": "fal", "host": emulator.url, "login": login, "password": password}
    monkeypatch.setenv("AIRFLOW_CONN_FAL_PASTED", json.dumps(conn))
    with pytest.raises(FalConfigurationError) as raised:
        FalHook(fal_conn_id="fal_pasted").run("emulator/echo", {})
    message = str(raised.value)
    assert "'fal_pasted'" in message and "API key" in message
    assert "inner-secret" not in message and "key id" not in message
    assert emulator.requests == []
    ok, message = FalHook(fal_conn_id="fal_pasted").test_connection()
    assert not ok and "'fal_pasted'" in message and "inner-secret" not in message


def test_a_rejected_header_value_is_never_quoted(emulator, fal_connection):
    with pytest.raises(FalConfigurationError) as raised:
        FalHook(retry_policy=FAST).run("emulator/echo", {}, headers={"X-Fal-Token": "s3cr3t-token\u20ac"})
    assert "X-Fal-Token" in str(raised.value) and "s3cr3t-token" not in str(raised.value)
    assert emulator.requests == []


def test_a_malformed_scheme_in_the_connection_host_is_a_named_error(emulator, monkeypatch):
    conn = {"conn_type": "fal", "host": "http:/127.0.0.1:8765", "password": API_KEY}
    monkeypatch.setenv("AIRFLOW_CONN_FAL_SLASH", json.dumps(conn))
    with pytest.raises(FalConfigurationError, match="malformed scheme"):
        FalHook(fal_conn_id="fal_slash").run("emulator/echo", {})


# --------------------------------------------------------------------------- reflected forms of the key


class _EchoAuthHandler(BaseHTTPRequestHandler):
    """Answers every POST with an error that reflects the Authorization header in other encodings."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        value = self.headers.get("Authorization", "")
        key = value.removeprefix("Key ")
        reflected = f"b64={base64.b64encode(value.encode()).decode()} url={quote(key, safe='')}"
        if self.path.startswith("/json"):
            status, kind = 400, "application/json"
            escaped = "".join(f"\\u{ord(c):04x}" for c in key)  # the key spelled with JSON escapes
            body = '{"detail": "' + reflected + " escaped=" + escaped + '"}'
        else:
            status, kind, body = 500, "text/plain", f"upstream said: {reflected} raw={key}"
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echo_auth_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoAuthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def _redact(text: str) -> str:
    try:
        from airflow.sdk.log import redact
    except ImportError:  # Airflow 3.0
        from airflow.sdk.execution_time.secrets_masker import redact
    return redact(text)


def test_reflected_forms_of_the_key_are_scrubbed_and_masked(echo_auth_server, monkeypatch):
    conn = {"conn_type": "fal", "host": echo_auth_server, "login": "key-id", "password": "key-secret-9d8e"}
    monkeypatch.setenv("AIRFLOW_CONN_FAL_ECHO", json.dumps(conn))
    key = "key-id:key-secret-9d8e"
    forms = [key, quote(key, safe=""), base64.b64encode(f"Key {key}".encode()).decode()]
    hook = FalHook(fal_conn_id="fal_echo", retry_policy={"max_attempts": 1})
    for model in ("json/model", "text/model"):
        with pytest.raises(FalError) as raised:
            hook.run(model, {})
        texts = [str(raised.value), json.dumps(raised.value.to_dict())]
        assert raised.value.status_code in (400, 500) and "***" in texts[0]
        assert not [form for form in forms for text in texts if form in text], texts
        assert "key-secret-9d8e" not in " ".join(texts)
    # ... and Airflow's log masker knows every form, so a log line quoting one is masked too.
    for form in forms:
        assert form not in _redact(f"server said {form}.")


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"max_answer_mb": "lots"}, "'max_answer_mb' extra"),
        ({"max_download_mb": -1}, "'max_download_mb' extra"),
        ({"download_hosts": "ftp://media.example.com"}, "'download_hosts' extra"),
        ({"download_hosts": {"host": "x"}}, "'download_hosts' extra"),
    ],
)
def test_bad_limit_extras_are_named_before_any_request(emulator, monkeypatch, extra, named):
    monkeypatch.setenv("AIRFLOW_CONN_FAL_DEFAULT", connection_json(emulator, **extra))
    with pytest.raises(FalConfigurationError, match=named):
        FalHook().run("fal-ai/fast-sdxl", {"prompt": "p"})
    assert emulator.requests == []


def test_limit_extras_reach_the_client_and_the_downloader(emulator, monkeypatch):
    extras = {"max_answer_mb": "2", "max_download_mb": 1.5, "download_hosts": "media.example.com, *.cdn.example"}
    monkeypatch.setenv("AIRFLOW_CONN_FAL_DEFAULT", connection_json(emulator, **extras))
    hook = FalHook()
    assert hook.client.max_answer_bytes == 2 * 1024 * 1024
    limits = hook.download_limits()
    assert limits["max_bytes"] == int(1.5 * 1024 * 1024)
    limits["download_hosts"].check("https://media.example.com/a.png")
    limits["download_hosts"].check("https://x.cdn.example/a.png")
    limits["download_hosts"].check(f"{emulator.url}/files/a.png")
    limits["download_hosts"].check("https://v3.fal.media/files/a.png")
