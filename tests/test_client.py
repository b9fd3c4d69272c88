"""FalClient against the offline fal emulator: real HTTP on 127.0.0.1, no mocks.

What fal would see is read back from the emulator's request records; what the client did
with the answer (error class, number of attempts, connections opened) from its exceptions,
logs and connection pool. The API key must not show up in any exception, repr or log record
in any of these tests (checked by the autouse fixture and :func:`expect`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
import pytest

from airflow_provider_fal import __version__
from airflow_provider_fal.core.async_client import AsyncQueueClient
from airflow_provider_fal.core.client import DEFAULT_READ_TIMEOUT, FalClient, FalResponse
from airflow_provider_fal.core.probe import check_credentials
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.exceptions import (
    FalAuthError,
    FalClientError,
    FalConfigurationError,
    FalConnectError,
    FalError,
    FalLockedAccountError,
    FalRateLimitError,
    FalRequestLostError,
    FalServerError,
    FalStartTimeoutError,
    FalTransientError,
    FalValidationError,
)
from tests.conftest import API_KEY, wait_until

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02, max_total_wait=5, max_retry_after=0.05)
WRONG_KEY = "wrong-key-5d1e0b"
SECRETS = (API_KEY, WRONG_KEY)
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
PROMPT = {"prompt": "a lighthouse at dusk"}


# --------------------------------------------------------------------------- helpers and fixtures


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog):
    """Every log record of every logger (urllib3 debug lines included) is free of the key."""
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        text = record.getMessage()
        if record.exc_info:
            text += "".join(traceback.format_exception(*record.exc_info))
        for secret in SECRETS:
            assert secret not in text, f"API key leaked into a log record of {record.name}"
    for secret in SECRETS:
        assert secret not in caplog.text


def make_client(emu, api_key: str = API_KEY, **kwargs) -> FalClient:
    kwargs.setdefault("retry_policy", FAST)
    return FalClient(api_key, run_url=emu.url, queue_url=emu.queue_url, **kwargs)


@pytest.fixture(autouse=True)
def quiet_emulator(request):
    """Start from an emulator with no records, including late ones of the previous test.

    The emulator records a request just after writing its answer, so the last record of the
    previous test can land after the ``emulator`` fixture's reset. Give it a moment, reset again.
    """
    if "emulator" in request.fixturenames:
        emulator = request.getfixturevalue("emulator")
        time.sleep(0.05)
        emulator.reset()


@pytest.fixture
def client(emulator):
    fal = make_client(emulator)
    yield fal
    fal.close()


def assert_no_secret(error: BaseException) -> None:
    """Neither the error nor anything chained to it (shown or suppressed) holds the key."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts = [str(current), repr(current), "".join(traceback.format_exception(current))]
        if isinstance(current, FalError):
            texts.append(json.dumps(current.to_dict(), default=str))
        for secret in SECRETS:
            assert not any(secret in text for text in texts), f"API key leaked via {type(current).__name__}"
        pending += [current.__cause__, current.__context__]


def expect(error_class: type[FalError], call, *args, **kwargs) -> FalError:
    """Run ``call`` expecting exactly ``error_class``; check the error holds no secret."""
    with pytest.raises(FalError) as caught:
        call(*args, **kwargs)
    assert type(caught.value) is error_class, f"{type(caught.value).__name__}: {caught.value}"
    assert_no_secret(caught.value)
    return caught.value


def settled(emu, count: int) -> list:
    """The emulator's records once ``count`` of them exist.

    The emulator appends a record just after writing the answer, so the client can see the
    answer a moment before the record exists. Every attempt the client makes happens before
    its call returns, so waiting for ``count`` (plus a short grace for any extra) is exact.
    """
    wait_until(lambda: len(emu.requests) >= count, interval=0.005)
    time.sleep(0.05)
    return emu.requests


def retry_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]


def closed_port() -> int:
    """A local port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pools(fal: FalClient) -> list:
    """urllib3's connection pools behind the client's session (one per host)."""
    manager = fal.session.get_adapter(fal.run_url).poolmanager
    return [manager.pools[key] for key in manager.pools.keys()]  # noqa: SIM118 (it cannot be iterated)


# --------------------------------------------------------------------------- success


def test_success_returns_output_and_request_id(client, emulator):
    response = client.run("fal-ai/fast-sdxl", PROMPT)
    assert isinstance(response, FalResponse) and response.status_code == 200
    image = response.output["images"][0]
    assert image["url"].startswith(f"{emulator.url}/files/") and image["content_type"] == "image/png"
    assert response.output["prompt"] == PROMPT["prompt"]
    assert UUID.match(response.request_id)
    assert response.headers["x-fal-request-id"] == response.request_id
    (record,) = settled(emulator, 1)
    assert (record.method, record.path, record.status, record.json) == ("POST", "/fal-ai/fast-sdxl", 200, PROMPT)
    assert API_KEY not in repr(response)


def test_the_body_is_the_arguments_as_json(client, emulator):
    arguments = {"prompt": "ünïcødé ✓", "nested": {"list": [1, 2.5, None, True]}, "empty": {}}
    assert client.run("emulator/echo", arguments).output == arguments
    assert client.run("emulator/echo", json.dumps({"prompt": "from a string"})).output == {"prompt": "from a string"}
    assert client.run("emulator/echo").output == {}
    records = settled(emulator, 3)
    assert [r.json for r in records] == [arguments, {"prompt": "from a string"}, {}]
    assert all(r.headers["Content-Type"] == "application/json" for r in records)


def test_subpath_model_ids_are_posted_to_their_path(client, emulator):
    client.run("fal-ai/flux/dev", PROMPT)
    client.run("fal-ai/flux/dev/image-to-image", PROMPT)
    assert [record.path for record in settled(emulator, 2)] == ["/fal-ai/flux/dev", "/fal-ai/flux/dev/image-to-image"]


def test_a_callers_header_replaces_the_sessions_of_the_same_name_in_any_case(client, emulator):
    client.run("fal-ai/fast-sdxl", PROMPT, headers={"user-AGENT": "nightly-dag/2"})
    (record,) = settled(emulator, 1)
    sent = [(name, value) for name, value in record.headers.items() if name.lower() == "user-agent"]
    assert sent == [("user-AGENT", "nightly-dag/2")]


def test_platform_headers_are_sent(client, emulator):
    client.run(
        "fal-ai/fast-sdxl",
        PROMPT,
        start_timeout=timedelta(seconds=90),
        object_lifecycle=3600,
        hint="runner-affinity-7",
        headers={"X-Fal-Store-IO": 0, "X-Custom-Trace": "abc"},
    )
    client.run("fal-ai/fast-sdxl", PROMPT, start_timeout="2.5", object_lifecycle="never")
    client.run("fal-ai/fast-sdxl", PROMPT)
    first, second, plain = (record.headers for record in settled(emulator, 3))
    assert first["X-Fal-Request-Timeout"] == "90"
    assert json.loads(first["X-Fal-Object-Lifecycle-Preference"]) == {"expiration_duration_seconds": 3600}
    assert first["X-Fal-Runner-Hint"] == "runner-affinity-7"
    assert first["X-Fal-Store-IO"] == "0" and first["X-Custom-Trace"] == "abc"
    assert second["X-Fal-Request-Timeout"] == "2.5"
    assert second["X-Fal-Object-Lifecycle-Preference"] == '{"expiration_duration_seconds":null}'
    assert not {name for name in plain if name.lower().startswith("x-fal-")}
    for headers in (first, second, plain):
        assert headers["User-Agent"] == f"airflow-provider-fal/{__version__}"
        assert headers["Accept"] == "application/json"


def test_authorization_is_sent_but_never_recorded(client, emulator):
    response = client.run("fal-ai/fast-sdxl", PROMPT)  # the emulator answers 401 without the right key
    assert response.status_code == 200
    (record,) = settled(emulator, 1)
    assert "authorization" not in {name.lower() for name in record.headers}
    assert API_KEY not in json.dumps(record.to_dict(), default=str)
    assert API_KEY not in repr(client) and API_KEY not in str(client)


def test_a_netrc_entry_does_not_replace_the_key(emulator, tmp_path, monkeypatch):
    """requests applies ~/.netrc credentials over session headers; a ``default`` entry matches any host."""
    netrc = tmp_path / "netrc"
    netrc.write_text("default login someone password netrc-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    fal = make_client(emulator)
    assert fal.run("emulator/echo", PROMPT).output == PROMPT
    assert "netrc-secret" not in repr(fal.session.auth) and API_KEY not in repr(fal.session.auth)


# --------------------------------------------------------------------------- errors sent once


def test_401_wrong_key(emulator):
    fal = make_client(emulator, api_key=WRONG_KEY)
    error = expect(FalAuthError, fal.run, "fal-ai/fast-sdxl", PROMPT)
    assert error.status_code == 401 and "API Key" in str(error)
    assert len(settled(emulator, 1)) == 1


def test_403_locked_account_verbatim(client, emulator):
    emulator.lock_account("Exhausted balance. Top up your balance at fal.ai/dashboard/billing.")
    error = expect(FalLockedAccountError, client.run, "fal-ai/fast-sdxl", PROMPT)
    assert (
        error.message == "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."
    )
    assert error.status_code == 403
    assert len(settled(emulator, 1)) == 1


def test_422_model_validation(client, emulator):
    error = expect(FalValidationError, client.run, "fal-ai/fast-sdxl", {"num_images": 2})
    assert "prompt: Field required" in str(error)
    assert error.errors[0]["loc"] == ["body", "prompt"]
    assert UUID.match(error.request_id)
    assert len(settled(emulator, 1)) == 1


def test_404_unknown_model(client, emulator):
    error = expect(FalClientError, client.run, "fal-ai/does-not-exist", PROMPT)
    assert error.status_code == 404 and "fal-ai/does-not-exist" in str(error)
    assert len(settled(emulator, 1)) == 1


def test_400_bad_request(client, emulator):
    emulator.inject_fault(status=400, error_type="bad_request", detail="Unsupported image format")
    error = expect(FalClientError, client.run, "fal-ai/fast-sdxl", PROMPT)
    assert (error.status_code, error.error_type) == (400, "bad_request")
    assert "Unsupported image format" in str(error)
    assert len(settled(emulator, 1)) == 1


def test_plain_500_is_not_retried(client, emulator, caplog):
    emulator.inject_fault(status=500, error_type="runner_server_error", times=None)
    error = expect(FalServerError, client.run, "fal-ai/fast-sdxl", PROMPT)
    assert error.error_type == "runner_server_error"
    assert len(settled(emulator, 1)) == 1
    assert not retry_logs(caplog)


def test_a_key_echoed_by_the_server_is_scrubbed(client, emulator):
    emulator.inject_fault(status=400, error_type="bad_request", detail=f"bad header Authorization: Key {API_KEY}")
    error = expect(FalClientError, client.run, "fal-ai/fast-sdxl", PROMPT)
    assert "Authorization: Key ***" in str(error)


@pytest.mark.parametrize("value", ["s3cr3t-token\n", " s3cr3t-token", "s3cr3t-token\u20ac"])
def test_a_header_the_http_library_refuses_is_reported_without_its_value(client, emulator, value):
    """``request`` takes headers as they are (no ``prepare_request`` checks): requests' own refusal
    quotes the value, which may be the key; ours never does."""
    error = expect(
        FalConfigurationError,
        client.request,
        "POST",
        f"{emulator.url}/emulator/echo",
        body=b"{}",
        headers={"X-Token": value},
    )
    assert "was not sent" in str(error) and "s3cr3t-token" not in str(error)
    assert emulator.requests == []


def test_the_async_client_reports_a_refused_header_without_its_value(emulator):
    async def poll() -> None:
        async with httpx.AsyncClient(headers={"X-Token": "s3cr3t-token\n"}) as http:
            queue = AsyncQueueClient(http, API_KEY, queue_url=emulator.queue_url, retry_policy=FAST)
            await queue.request("GET", f"{emulator.queue_url}/fal-ai/fast-sdxl/requests/abc/status")

    with pytest.raises(FalConfigurationError) as raised:
        asyncio.run(poll())
    assert "was not sent" in str(raised.value) and "s3cr3t-token" not in str(raised.value)
    assert emulator.requests == []


def test_a_client_key_is_stripped_and_a_broken_one_refused_without_echo(emulator):
    assert make_client(emulator, api_key=f"{API_KEY}\r\n").run("emulator/echo", PROMPT).output == PROMPT
    with pytest.raises(FalConfigurationError) as raised:
        make_client(emulator, api_key="abc\ndef-broken-secret")
    assert "api_key" in str(raised.value) and "broken-secret" not in str(raised.value)


# --------------------------------------------------------------------------- retried, then success


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ({"status": 503, "error_type": "runner_disconnected"}, "503 runner_disconnected"),
        ({"status": 502, "error_type": None, "html": True}, "502 Bad Gateway"),
        ({"status": 504, "error_type": "startup_timeout"}, "504 startup_timeout"),
        ({"status": 429, "error_type": "rate_limited", "retry_after": 0}, "429 rate limit"),
        ({"status": 500, "error_type": "runner_server_error", "needs_retry": True}, "500 X-Fal-Needs-Retry"),
        (
            {"status": 422, "error_type": None, "retryable": True, "detail": [{"loc": ["body"], "msg": "busy"}]},
            "422 X-Fal-Retryable",
        ),
    ],
)
def test_retryable_answers_are_retried_then_succeed(client, emulator, caplog, fault, kind):
    emulator.inject_fault(times=2, **fault)
    response = client.run("fal-ai/fast-sdxl", PROMPT)
    assert response.output["images"], kind
    records = settled(emulator, 3)
    assert [r.status for r in records] == [fault["status"], fault["status"], 200], kind
    assert all(r.json == PROMPT for r in records), "the same input is sent again"
    logs = retry_logs(caplog)
    assert len(logs) == 2
    assert "attempt 1 of 3" in logs[0] and "attempt 2 of 3" in logs[1]
    assert all(f"POST {emulator.url}/fal-ai/fast-sdxl failed" in line for line in logs)


def test_proxy_html_reason_is_logged(client, emulator, caplog):
    emulator.inject_fault(status=502, error_type=None, html=True)
    client.run("fal-ai/fast-sdxl", PROMPT)
    (line,) = retry_logs(caplog)
    assert "HTML error page from a proxy: 502 Bad Gateway" in line


def test_retries_exhausted_raise_the_transient_error(client, emulator, caplog):
    emulator.inject_fault(status=503, error_type="runner_scheduling_failure", times=None)
    error = expect(FalTransientError, client.run, "fal-ai/fast-sdxl", PROMPT)
    assert error.error_type == "runner_scheduling_failure" and error.retryable
    assert len(settled(emulator, 3)) == FAST.max_attempts
    assert len(retry_logs(caplog)) == FAST.max_attempts - 1


def test_concurrency_limit_429_exhausted(client, emulator):
    emulator.set_concurrency_limit(0)
    error = expect(FalRateLimitError, client.run, "fal-ai/fast-sdxl", PROMPT)
    assert error.status_code == 429
    assert [r.status for r in settled(emulator, 3)] == [429, 429, 429]


def test_a_long_retry_after_is_capped(client, emulator, caplog):
    emulator.inject_fault(status=429, error_type="rate_limited", retry_after=3600)
    client.run("fal-ai/fast-sdxl", PROMPT)  # would hang an hour if Retry-After were not capped
    (line,) = retry_logs(caplog)
    assert f"retrying in {FAST.max_retry_after:.2f} s" in line


def test_a_retry_policy_of_one_attempt_disables_retries(emulator):
    fal = make_client(emulator, retry_policy={"max_attempts": 1})
    emulator.inject_fault(status=503)
    expect(FalTransientError, fal.run, "fal-ai/fast-sdxl", PROMPT)
    assert len(settled(emulator, 1)) == 1


# --------------------------------------------------------------------------- timeouts and lost answers


def test_user_start_timeout_is_not_retried(client, emulator, caplog):
    emulator.set_runner_wait(3.0)
    error = expect(FalStartTimeoutError, client.run, "fal-ai/fast-sdxl", PROMPT, start_timeout=1)
    assert error.status_code == 504 and error.error_type == "request_timeout"
    assert "start_timeout" in str(error)
    (record,) = settled(emulator, 1)
    assert record.headers["X-Fal-Request-Timeout"] == "1"
    assert not retry_logs(caplog)


def test_connection_refused_is_retried_and_raises_connect_error(caplog):
    port = closed_port()
    fal = FalClient(API_KEY, run_url=f"http://127.0.0.1:{port}", retry_policy=FAST)
    error = expect(FalConnectError, fal.run, "fal-ai/fast-sdxl", PROMPT)
    assert error.retryable
    assert f"127.0.0.1:{port}" in str(error) and "refused" in str(error).lower()
    assert len(retry_logs(caplog)) == FAST.max_attempts - 1


def test_dropped_connection_after_send_is_lost_and_not_resent(client, emulator, caplog):
    emulator.inject_fault(drop_connection=True, times=None)
    error = expect(FalRequestLostError, client.run, "fal-ai/fast-sdxl", PROMPT)
    assert not error.retryable and "not resent" in str(error)
    (record,) = settled(emulator, 1)
    assert record.status is None and record.json == PROMPT
    assert not retry_logs(caplog)


def test_read_timeout_is_lost_and_not_resent(client, emulator, caplog):
    emulator.set_latency(2.0)
    error = expect(FalRequestLostError, client.run, "fal-ai/fast-sdxl", PROMPT, timeout=0.3)
    assert "read timeout of 0.3 s" in str(error)
    assert not retry_logs(caplog)
    emulator.set_latency(0)
    assert client.run("fal-ai/fast-sdxl", PROMPT).status_code == 200, "the client recovers"
    records = settled(emulator, 2)
    assert len(records) == 2 and [r.json for r in records] == [PROMPT, PROMPT]


def test_a_lost_answer_of_an_idempotent_request_is_retried(client, emulator, caplog):
    emulator.inject_fault(drop_connection=True)
    url = f"{emulator.queue_url}/fal-ai/fast-sdxl/requests/00000000-0000-0000-0000-000000000000/status"
    error = expect(FalClientError, client.request, "GET", url, idempotent=True)
    assert error.status_code == 404, "the second attempt got an answer"
    assert [r.status for r in settled(emulator, 2)] == [None, 404]
    assert len(retry_logs(caplog)) == 1


@pytest.mark.parametrize(
    ("timeout", "start_timeout", "client_timeout", "expected"),
    [
        (None, None, None, DEFAULT_READ_TIMEOUT),
        (None, 30.0, None, DEFAULT_READ_TIMEOUT + 30),
        (None, 30.0, 45, 45.0),
        ("12", 30.0, 45, 12.0),
    ],
)
def test_read_timeout_choice(emulator, timeout, start_timeout, client_timeout, expected):
    fal = make_client(emulator, timeout=client_timeout)
    assert fal.read_timeout(timeout, start_timeout) == expected


# --------------------------------------------------------------------------- one session


def test_one_session_and_one_connection_serve_every_call(client, emulator):
    assert client.session is client.session
    for _ in range(5):
        client.run("emulator/echo", PROMPT)
    (pool,) = pools(client)
    assert pool.num_requests == 5
    assert pool.num_connections == 1, "keep-alive: one TCP connection for all calls"
    ports = {conn.sock.getsockname()[1] for conn in list(pool.pool.queue) if conn is not None and conn.sock}
    assert len(ports) == 1
    client.run("emulator/echo", PROMPT)
    (again,) = pools(client)
    assert again is pool and pool.num_connections == 1
    assert {conn.sock.getsockname()[1] for conn in list(pool.pool.queue) if conn is not None and conn.sock} == ports


def test_a_dropped_connection_is_replaced(client, emulator):
    client.run("emulator/echo", PROMPT)
    emulator.inject_fault(drop_connection=True)
    expect(FalRequestLostError, client.run, "emulator/echo", PROMPT)
    client.run("emulator/echo", PROMPT)
    (pool,) = pools(client)
    assert pool.num_connections == 2 and pool.num_requests == 3


def test_threads_share_the_session_within_the_pool_size(emulator):
    fal = make_client(emulator, pool_maxsize=4)
    emulator.set_latency(0.05)
    with ThreadPoolExecutor(max_workers=4) as executor:
        outputs = list(executor.map(lambda n: fal.run("emulator/echo", {"n": n}).output, range(16)))
    assert outputs == [{"n": n} for n in range(16)]
    (pool,) = pools(fal)
    assert pool.num_requests == 16
    assert 1 <= pool.num_connections <= 4
    assert len(settled(emulator, 16)) == 16
    fal.close()


def test_threads_asking_for_the_session_at_once_get_the_same_one(emulator, monkeypatch):
    import airflow_provider_fal.core.client as client_module

    build = client_module.pooled_session

    def slow_build(*args, **kwargs):
        time.sleep(0.02)  # widen the window in which a second thread could build its own
        return build(*args, **kwargs)

    monkeypatch.setattr(client_module, "pooled_session", slow_build)
    fal = make_client(emulator, pool_maxsize=4)
    start = threading.Barrier(16)

    def session_of_a_thread(_: int) -> int:
        start.wait()
        return id(fal.session)

    with ThreadPoolExecutor(max_workers=16) as executor:
        sessions = set(executor.map(session_of_a_thread, range(16)))
    assert len(sessions) == 1, f"{len(sessions)} sessions were built; all but one leak their connections"
    fal.close()


PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def test_proxy_settings_from_the_environment_are_honoured(emulator, monkeypatch):
    """The session reads them once per host (not per call, as plain requests does), but reads them."""
    for name in (*PROXY_VARIABLES, "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    through_proxy = make_client(emulator, retry_policy={"max_attempts": 1})
    for _ in range(2):  # the first call reads the environment, the second uses what it read
        expect(FalConnectError, through_proxy.run, "emulator/echo", PROMPT)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = make_client(emulator, retry_policy={"max_attempts": 1})
    assert direct.run("emulator/echo", PROMPT).output == PROMPT
    assert len(settled(emulator, 1)) == 1, "the proxied attempts never reached the emulator"


def test_the_environment_is_read_once_per_host_for_streamed_calls_too(emulator, monkeypatch):
    """Every call streams its answer (``stream=True``, to bound its size): that must not bypass
    the once-per-host reading of proxy settings (it did: about a quarter of a queue call's CPU)."""
    import requests.sessions

    reads = []
    real = requests.sessions.get_environ_proxies
    monkeypatch.setattr(requests.sessions, "get_environ_proxies", lambda *a, **k: reads.append(a) or real(*a, **k))
    client = make_client(emulator)
    handles = [client.submit("emulator/echo", {**PROMPT, "seed": n}) for n in range(5)]
    for handle in handles:
        assert client.wait(handle, poll_interval=0.05).output["seed"] == handles.index(handle)
    assert client.run("emulator/echo", PROMPT).output == PROMPT
    hosts = {urlsplit(client.run_url).netloc, urlsplit(client.queue_url).netloc}
    assert len(reads) == len(hosts), reads  # 16 calls; the environment read once per host


def test_a_closed_pool_is_looked_up_again(client):
    """The session remembers each host's pool; one that was closed since (urllib3 1.x closes the
    pools its manager drops) is looked up again, not used."""
    assert client.run("emulator/echo", PROMPT).output == PROMPT
    dropped = pools(client)
    client.session.get_adapter(client.run_url).poolmanager.clear()
    for pool in dropped:  # what urllib3 1.x does to the pools its manager drops
        pool.close()
    assert client.run("emulator/echo", PROMPT).output == PROMPT


def test_close_releases_the_session(client):
    first = client.session
    client.close()
    assert client.session is not first


# --------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"model_id": "fal-ai/../admin"}, "model_id"),
        ({"model_id": "https://evil.example/x"}, "model_id"),
        ({"model_id": "fal-ai/flux\n"}, "model_id"),
        ({"arguments": ["not", "a", "dict"]}, "arguments"),
        ({"arguments": {"seed": float("nan")}}, "arguments"),
        ({"arguments": "{not json"}, "arguments"),
        ({"start_timeout": 0.5}, "start_timeout"),
        ({"start_timeout": "soon"}, "start_timeout"),
        ({"object_lifecycle": -1}, "object_lifecycle"),
        ({"hint": "a\r\nX-Evil: 1"}, "hint"),
        ({"headers": {"Authorization": "Key other"}}, "headers"),
        ({"headers": {"X-A": "b\r\nc"}}, "headers"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": "later"}, "timeout"),
    ],
)
def test_invalid_input_raises_before_any_request(client, emulator, kwargs, field):
    call = {"model_id": "fal-ai/fast-sdxl", "arguments": PROMPT, **kwargs}
    model_id, arguments = call.pop("model_id"), call.pop("arguments")
    error = expect(FalConfigurationError, client.run, model_id, arguments, **call)
    assert field in str(error)
    # A valid call afterwards is the only one the emulator ever saw.
    client.run("fal-ai/fast-sdxl", PROMPT)
    (record,) = settled(emulator, 1)
    assert record.path == "/fal-ai/fast-sdxl" and record.json == PROMPT


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"api_key": ""}, "API key"),
        ({"run_url": "ftp://fal.run"}, "run_url"),
        ({"queue_url": "https://queue.fal.run?x=1"}, "queue_url"),
        ({"retry_policy": {"max_attempts": 0}}, "max_attempts"),
        ({"timeout": 0}, "timeout"),
    ],
)
def test_invalid_client_settings(kwargs, field):
    settings = {"api_key": API_KEY, **kwargs}
    with pytest.raises(FalConfigurationError, match=field):
        FalClient(settings.pop("api_key"), **settings)


# --------------------------------------------------------------------------- credentials probe


def test_check_credentials_good_key(client, emulator):
    message = check_credentials(client)
    assert "accepted the API key" in message and API_KEY not in message
    (record,) = settled(emulator, 1)
    assert record.method == "GET" and record.path.startswith("/queue/fal-ai/fast-sdxl/requests/")
    assert record.path.endswith("/status"), "a status probe: no model runs, nothing is billed"


def test_check_credentials_bad_key(emulator):
    fal = make_client(emulator, api_key=WRONG_KEY)
    error = expect(FalAuthError, check_credentials, fal)
    assert error.status_code == 401
    assert len(settled(emulator, 1)) == 1


def test_check_credentials_locked_account(client, emulator):
    emulator.lock_account()
    error = expect(FalLockedAccountError, check_credentials, client)
    assert error.message.startswith("User is locked. Reason: Exhausted balance")
