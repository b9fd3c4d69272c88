"""A peer client keeps the emulator honest: fal's own Python client (``fal_client``) against it.

``fal_client`` builds ``https://`` URLs from module constants; each test points them at the
emulator with ``monkeypatch`` (undone afterwards). Every test checks both what ``fal_client``
returns or raises and what the emulator recorded. Contract: ``/work/shared/fal-api.md``.
"""

from __future__ import annotations

import time

import pytest

fal_client = pytest.importorskip("fal_client")
fal_client_module = pytest.importorskip("fal_client.client")

from airflow_provider_fal.emulator import FalEmulator  # noqa: E402

KEY = "peer-key-4b1d:s3cr3t"
MODEL = "fal-ai/flux/dev"  # a model id with a subpath: app id fal-ai/flux, endpoint path dev
APP = "fal-ai/flux"
PROMPT = "a lighthouse at dusk"


@pytest.fixture
def emu(monkeypatch):
    with FalEmulator(api_key=KEY) as emulator:
        monkeypatch.setattr(fal_client_module, "RUN_URL_FORMAT", f"{emulator.url}/")
        monkeypatch.setattr(fal_client_module, "QUEUE_URL_FORMAT", f"{emulator.queue_url}/")
        monkeypatch.setattr(fal_client_module, "REST_URL", emulator.url)
        monkeypatch.setattr(fal_client_module, "CDN_URL", emulator.url)
        monkeypatch.setattr(fal_client_module, "REALTIME_URL_FORMAT", emulator.url.replace("http", "ws", 1) + "/")
        monkeypatch.delenv("FAL_KEY", raising=False)
        yield emulator


@pytest.fixture
def client(emu):
    sync = fal_client.SyncClient(key=KEY)
    yield sync
    sync._client.close()


def calls(emu, prefix=""):
    """(method, path, status) of every recorded request under ``prefix``."""
    return [(r.method, r.path, r.status) for r in emu.requests if r.path.startswith(prefix)]


def queue_base(request_id, app=APP):
    return f"/queue/{app}/requests/{request_id}"


def assert_image_output(emu, output, prompt=PROMPT):
    assert output["prompt"] == prompt
    assert isinstance(output["seed"], int)
    assert output["has_nsfw_concepts"] == [False]
    [image] = output["images"]
    assert image["url"].startswith(f"{emu.url}/files/")
    assert image["content_type"] == "image/png"
    assert isinstance(image["width"], int) and isinstance(image["height"], int)
    assert image["file_name"].endswith(".png")


# --------------------------------------------------------------------------- synchronous run


def test_run_model_with_subpath(emu, client):
    output = client.run(MODEL, {"prompt": PROMPT})

    assert_image_output(emu, output)
    [record] = emu.requests
    assert (record.method, record.path, record.status) == ("POST", f"/{MODEL}", 200)
    assert record.json == {"prompt": PROMPT}
    assert record.headers["User-Agent"].startswith("fal-client/")
    assert "Authorization" not in record.headers  # the emulator never records the key

    # the same endpoint through run(path=...), and the output's media URL is served
    again = client.run(APP, {"prompt": PROMPT}, path="dev")
    assert again == output
    assert calls(emu)[-1] == ("POST", f"/{MODEL}", 200)
    image = client._client.get(output["images"][0]["url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG\r\n\x1a\n")


def test_run_start_timeout_504_is_not_retried(emu, client):
    emu.set_runner_wait(5.0, model_id=MODEL)

    with pytest.raises(fal_client.FalClientHTTPError) as raised:
        client.run(MODEL, {"prompt": PROMPT}, start_timeout=1.5)

    assert raised.value.status_code == 504
    assert raised.value.error_type == "request_timeout"
    assert raised.value.response_headers["x-fal-request-timeout-type"] == "user"
    [record] = emu.requests  # X-Fal-Request-Timeout-Type: user stops fal_client's retries
    assert (record.method, record.status) == ("POST", 504)
    assert record.headers["X-Fal-Request-Timeout"] == "1.5"


def test_ingress_error_is_retried_but_fal_error_is_not(emu, client):
    # an nginx page without x-fal-request-id: fal_client retries it
    emu.inject_fault(status=502, html=True, times=1, model_id=MODEL)
    assert_image_output(emu, client.run(MODEL, {"prompt": PROMPT}))
    assert calls(emu) == [("POST", f"/{MODEL}", 502), ("POST", f"/{MODEL}", 200)]

    # a 503 from fal itself (JSON, x-fal-request-id): not retried by fal_client
    emu.reset()
    emu.inject_fault(status=503, error_type="runner_disconnected", times=1, model_id=MODEL)
    with pytest.raises(fal_client.FalClientHTTPError) as raised:
        client.run(MODEL, {"prompt": PROMPT})
    assert raised.value.status_code == 503
    assert raised.value.error_type == "runner_disconnected"
    assert "x-fal-request-id" in raised.value.response_headers
    assert calls(emu) == [("POST", f"/{MODEL}", 503)]


def test_concurrency_limit_429_is_retried(emu, client, monkeypatch):
    monkeypatch.setattr(fal_client_module, "MAX_ATTEMPTS", 3)
    monkeypatch.setattr(fal_client_module, "BASE_DELAY", 0.01)
    emu.set_concurrency_limit(0)

    with pytest.raises(fal_client.FalClientHTTPError) as raised:
        client.run(MODEL, {"prompt": PROMPT})

    assert raised.value.status_code == 429
    assert raised.value.error_type == "concurrent_requests_limit"  # fal-api.md Concurrency
    assert raised.value.response_headers["x-fal-needs-retry"] == "1"
    assert calls(emu) == [("POST", f"/{MODEL}", 429)] * 3  # fal_client retries 429

    emu.set_concurrency_limit(None)
    emu.inject_fault(status=429, error_type="concurrent_requests_limit", needs_retry=True, times=2, model_id=MODEL)
    assert_image_output(emu, client.run(MODEL, {"prompt": PROMPT}))
    assert [status for _, _, status in calls(emu)][3:] == [429, 429, 200]


# --------------------------------------------------------------------------- queue


def test_submit_status_events_result(emu, client):
    emu.set_queue_timing(queue_wait=0.6, run_time=1.0, model_id=MODEL)

    handle = client.submit(MODEL, {"prompt": PROMPT})

    base = queue_base(handle.request_id)
    assert handle.status_url == f"{emu.url}{base}/status"
    assert handle.response_url == f"{emu.url}{base}"
    assert handle.cancel_url == f"{emu.url}{base}/cancel"
    queued = handle.status(with_logs=True)
    assert isinstance(queued, fal_client.Queued)
    assert queued.position == 0

    deadline = time.monotonic() + 10
    in_progress = queued
    while not isinstance(in_progress, fal_client.InProgress) and time.monotonic() < deadline:
        time.sleep(0.05)
        in_progress = handle.status(with_logs=True)
    assert isinstance(in_progress, fal_client.InProgress)
    assert isinstance(in_progress.logs, list) and in_progress.logs
    assert set(in_progress.logs[0]) == {"message", "level", "source", "timestamp"}

    events = list(handle.iter_events(with_logs=True, interval=0.05))
    assert all(isinstance(e, (fal_client.InProgress, fal_client.Completed)) for e in events)
    completed = events[-1]
    assert isinstance(completed, fal_client.Completed)
    assert completed.error is None and completed.error_type is None
    assert completed.metrics["inference_time"] > 0
    assert len(completed.logs) > len(in_progress.logs)
    assert [entry["level"] for entry in completed.logs] == ["INFO"] * len(completed.logs)

    output = handle.get()
    assert_image_output(emu, output)
    # the client-built handle (app id URL) sees the same request
    assert client.result(MODEL, handle.request_id) == output
    assert isinstance(client.status(MODEL, handle.request_id), fal_client.Completed)

    log = calls(emu)
    assert log[0] == ("POST", f"/queue/{MODEL}", 200)
    assert emu.requests[0].json == {"prompt": PROMPT}
    status_calls = [r for r in emu.requests if r.path == f"{base}/status"]
    assert status_calls[0].query == {"logs": "true"}
    assert [r.status for r in status_calls if r.query == {"logs": "true"}][-1] == 200
    assert {r.status for r in status_calls[:-2]} <= {200, 202}
    assert log.count(("GET", base, 200)) == 2
    assert all(path.startswith(("/queue/fal-ai/flux/", f"/queue/{MODEL}")) for _, path, _ in log)


def test_subscribe_reports_queue_updates(emu, client):
    emu.set_queue_timing(queue_wait=0.3, run_time=0.5, model_id=MODEL)
    enqueued, updates = [], []

    output = client.subscribe(
        MODEL,
        {"prompt": PROMPT},
        with_logs=True,
        interval=0.05,
        on_enqueue=enqueued.append,
        on_queue_update=updates.append,
    )

    assert_image_output(emu, output)
    [request_id] = enqueued
    kinds = [type(update) for update in updates]
    assert kinds[0] is fal_client.Queued and kinds[-1] is fal_client.Completed
    assert fal_client.InProgress in kinds
    assert kinds.count(fal_client.Completed) == 1
    assert updates[-1].logs  # with_logs=True reaches the status calls
    base = queue_base(request_id)
    log = calls(emu)
    assert log[0] == ("POST", f"/queue/{MODEL}", 200)
    assert log[-1] == ("GET", base, 200)
    assert {path for _, path, _ in log[1:-1]} == {f"{base}/status"}


def test_cancel_queued_request(emu, client):
    emu.set_queue_timing(queue_wait=30.0, model_id=MODEL)
    handle = client.submit(MODEL, {"prompt": PROMPT})
    assert isinstance(handle.status(), fal_client.Queued)

    handle.cancel()  # 202 CANCELLATION_REQUESTED: no exception

    base = queue_base(handle.request_id)
    assert calls(emu)[-1] == ("PUT", f"{base}/cancel", 202)
    completed = handle.status()
    assert isinstance(completed, fal_client.Completed)  # never processed: completes at once
    # a second cancel finds it completed: 400 ALREADY_COMPLETED, which fal_client raises
    with pytest.raises(fal_client.FalClientHTTPError) as raised:
        client.cancel(MODEL, handle.request_id)
    assert raised.value.status_code == 400
    assert raised.value.response.json() == {"status": "ALREADY_COMPLETED"}
    # an unknown request: 404
    with pytest.raises(fal_client.FalClientHTTPError) as unknown:
        client.cancel(MODEL, "00000000-0000-0000-0000-000000000000")
    assert unknown.value.status_code == 404
    assert calls(emu)[-2:] == [
        ("PUT", f"{base}/cancel", 400),
        ("PUT", f"{queue_base('00000000-0000-0000-0000-000000000000')}/cancel", 404),
    ]


def test_queue_position_while_the_account_limit_is_reached(emu, client):
    emu.set_concurrency_limit(1)
    emu.set_queue_timing(queue_wait=0.0, run_time=60.0, model_id=MODEL)
    first = client.submit(MODEL, {"prompt": PROMPT})
    second = client.submit(MODEL, {"prompt": PROMPT})
    third = client.submit(MODEL, {"prompt": PROMPT})

    assert isinstance(first.status(), fal_client.InProgress)
    assert (second.status(), third.status()) == (fal_client.Queued(position=0), fal_client.Queued(position=1))
    first.cancel()  # the running request stops (the app honours the signal): its slot goes to the next
    assert isinstance(second.status(), fal_client.InProgress)
    assert third.status() == fal_client.Queued(position=0)


def test_cancel_of_a_running_request_that_finishes_anyway(emu, client):
    emu.set_queue_timing(queue_wait=0.0, run_time=0.6, model_id=MODEL)
    emu.set_cancel_honoured(False, model_id=MODEL)  # the runner only gets a signal, and ignores it
    handle = client.submit(MODEL, {"prompt": PROMPT})
    assert isinstance(handle.status(), fal_client.InProgress)

    handle.cancel()  # 202 CANCELLATION_REQUESTED, not a fact

    assert isinstance(handle.status(), fal_client.InProgress)
    for _ in handle.iter_events(interval=0.05):
        pass
    assert_image_output(emu, handle.get())  # completed anyway (and billed): the result is there


def test_cancel_of_a_running_request_that_stops(emu, client):
    emu.set_queue_timing(queue_wait=0.0, run_time=60.0, model_id=MODEL)
    handle = client.submit(MODEL, {"prompt": PROMPT})
    assert isinstance(handle.status(), fal_client.InProgress)

    handle.cancel()

    assert isinstance(handle.status(), fal_client.Completed)
    with pytest.raises(fal_client.FalClientHTTPError) as raised:
        handle.get()
    assert raised.value.status_code == 499


def test_an_expired_result_is_404(monkeypatch):
    with FalEmulator(api_key=KEY, result_retention=0.3, large_result_retention=0.3) as emu:
        monkeypatch.setattr(fal_client_module, "QUEUE_URL_FORMAT", f"{emu.queue_url}/")
        client = fal_client.SyncClient(key=KEY)
        handle = client.submit(MODEL, {"prompt": PROMPT})
        for _ in handle.iter_events(interval=0.05):
            pass
        time.sleep(0.5)  # past the result's retention

        with pytest.raises(fal_client.FalClientHTTPError) as raised:
            handle.get()
        client._client.close()

    assert raised.value.status_code == 404  # fal_client's get() polls the status first: gone too
    method, path, status = calls(emu)[-1]
    assert (method, status) == ("GET", 404) and path.startswith(queue_base(handle.request_id))


# --------------------------------------------------------------------------- errors


def test_wrong_key_is_401(emu):
    wrong = fal_client.SyncClient(key="not-the-key")

    with pytest.raises(fal_client.FalClientHTTPError) as sync_error:
        wrong.run(MODEL, {"prompt": PROMPT})
    with pytest.raises(fal_client.FalClientHTTPError) as queue_error:
        wrong.submit(MODEL, {"prompt": PROMPT})
    wrong._client.close()

    for raised in (sync_error, queue_error):
        assert raised.value.status_code == 401
        assert "not-the-key" not in str(raised.value)
    assert calls(emu) == [("POST", f"/{MODEL}", 401), ("POST", f"/queue/{MODEL}", 401)]  # not retried


def _assert_missing_prompt(raised):
    assert raised.value.status_code == 422
    detail = raised.value.message  # fal_client passes the body's "detail" through: the field list
    assert isinstance(detail, list)
    assert [(e["loc"], e["type"]) for e in detail] == [(["body", "prompt"], "missing")]


def test_missing_field_sync_422(emu, client):
    with pytest.raises(fal_client.FalClientHTTPError) as raised:
        client.run(MODEL, {})

    _assert_missing_prompt(raised)
    [record] = emu.requests  # 422 is never retried
    assert (record.method, record.path, record.status, record.json) == ("POST", f"/{MODEL}", 422, {})


def test_missing_field_queue_422_from_result(emu, client):
    handle = client.submit(MODEL, {})  # fal accepts invalid input at submit

    completed = None
    for event in handle.iter_events(interval=0.05):
        completed = event
    assert isinstance(completed, fal_client.Completed)  # no FAILED status on fal's queue
    with pytest.raises(fal_client.FalClientHTTPError) as raised:
        handle.get()

    _assert_missing_prompt(raised)
    base = queue_base(handle.request_id)
    log = calls(emu)
    assert log[0] == ("POST", f"/queue/{MODEL}", 200)
    assert log[-2:] == [("GET", f"{base}/status", 200), ("GET", base, 422)]


# --------------------------------------------------------------------------- CDN upload


def test_upload_to_cdn(emu, client):
    url = client.upload(b"hello", "text/plain", file_name="hello.txt")

    assert client._client.get(url).content == b"hello"
    assert calls(emu)[0] == ("POST", "/storage/auth/token", 200)
    assert calls(emu)[1] == ("POST", "/files/upload", 200)


def test_upload_file_multipart_to_cdn(emu, client, tmp_path, monkeypatch):
    monkeypatch.setattr(fal_client_module, "MULTIPART_THRESHOLD", 1024)
    monkeypatch.setattr(fal_client_module, "MULTIPART_CHUNK_SIZE", 1000)
    path = tmp_path / "clip.bin"
    path.write_bytes(bytes(range(256)) * 10)  # 2,560 bytes: three parts

    url = client.upload_file(path)

    assert client._client.get(url).content == path.read_bytes()
    log = calls(emu)
    assert log[0] == ("POST", "/storage/auth/token", 200)
    assert log[1] == ("POST", "/files/upload/multipart", 200)
    assert sorted(m for m, _, s in log[2:5] if s == 200) == ["PUT", "PUT", "PUT"]
    assert log[5][0] == "POST" and log[5][1].endswith("/complete") and log[5][2] == 200
