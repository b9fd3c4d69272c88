"""Tests of the offline fal emulator, over real HTTP on 127.0.0.1 (requests + pytest only)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from airflow_provider_fal.emulator import FalEmulator

KEY = "test-key-abc123:s3cr3t-value"
AUTH = {"Authorization": f"Key {KEY}"}
ZERO_ID = "00000000-0000-0000-0000-000000000000"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def emu():
    with FalEmulator(api_key=KEY) as emulator:
        yield emulator


@pytest.fixture
def http():
    with requests.Session() as session:
        session.headers.update(AUTH)
        yield session


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def read_png(data: bytes) -> tuple[int, int, bytes]:
    """Check a PNG's structure and CRCs; return width, height and the decompressed image data."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        offset += 12 + length
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (depth, colour) == (8, 2)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    return width, height, raw


# --------------------------------------------------------------------------- auth and errors


def test_missing_or_wrong_key_gives_401_without_echoing_it(emu):
    url = f"{emu.url}/fal-ai/fast-sdxl"
    for headers in ({}, {"Authorization": "Key wrong-key-value"}, {"Authorization": f"Bearer {KEY}"}):
        response = requests.post(url, json={"prompt": "x"}, headers=headers)
        assert response.status_code == 401
        assert response.json() == {"detail": "Unauthorized: invalid or missing API key"}
        assert "wrong-key-value" not in response.text and KEY not in response.text
        assert response.headers["x-fal-request-id"]
        assert response.headers["Content-Type"].startswith("application/json")


def test_key_id_secret_form_is_compared_as_a_string(emu, http):
    assert ":" in KEY
    response = http.post(f"{emu.url}/emulator/echo", json={"a": 1})
    assert response.status_code == 200 and response.json() == {"a": 1}
    wrong = requests.post(f"{emu.url}/emulator/echo", json={}, headers={"Authorization": "Key test-key-abc123"})
    assert wrong.status_code == 401


def test_locked_account_gives_403_verbatim(emu, http):
    emu.lock_account()
    response = http.post(f"{emu.url}/fal-ai/fast-sdxl", json={"prompt": "x"})
    assert response.status_code == 403
    reason = "Exhausted balance. Top up your balance at fal.ai/dashboard/billing."
    assert response.json() == {"detail": f"User is locked. Reason: {reason}"}
    assert http.post(f"{emu.queue_url}/fal-ai/fast-sdxl", json={"prompt": "x"}).status_code == 403
    emu.lock_account(reason="Custom reason.")
    assert http.post(f"{emu.url}/emulator/echo", json={}).json()["detail"] == "User is locked. Reason: Custom reason."
    emu.unlock_account()
    assert http.post(f"{emu.url}/emulator/echo", json={}).status_code == 200


def test_validation_errors_use_fals_list_shape(emu, http):
    url = f"{emu.url}/fal-ai/fast-sdxl"
    missing = http.post(url, json={})
    assert missing.status_code == 422
    assert missing.json() == {"detail": [{"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"}]}
    wrong_type = http.post(url, json={"prompt": 3}).json()["detail"][0]
    assert wrong_type["type"] == "string_type" and wrong_type["msg"] == "Input should be a valid string"
    too_many = http.post(url, json={"prompt": "x", "num_images": 5})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "num_images"]
    bad_size = http.post(url, json={"prompt": "x", "image_size": {"width": 10, "height": 512}})
    assert bad_size.json()["detail"][0]["loc"] == ["body", "image_size", "width"]
    for body in (b"[1, 2]", b"not json", b""):
        response = http.post(url, data=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and isinstance(response.json()["detail"], list)
    # fal's queue accepts the same input, runs it, and answers the 422 on the result GET
    emu.set_queue_timing(queue_wait=0, run_time=0)
    queued = http.post(f"{emu.queue_url}/fal-ai/fast-sdxl", json={})
    assert queued.status_code == 200
    status = http.get(queued.json()["status_url"]).json()
    assert status["status"] == "COMPLETED" and "error" not in status
    result = http.get(queued.json()["response_url"])
    assert result.status_code == 422 and result.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert result.headers["x-fal-request-id"] == queued.json()["request_id"]


def test_unknown_model_gives_404(emu, http):
    response = http.post(f"{emu.url}/fal-ai/does-not-exist", json={"prompt": "x"})
    assert response.status_code == 404
    assert response.json() == {"detail": "Application 'fal-ai/does-not-exist' not found"}
    assert http.post(f"{emu.queue_url}/someone/else/sub", json={}).status_code == 404
    assert http.post(f"{emu.url}/fal-ai/..", json={}).status_code == 404


def test_bad_headers_give_400_bad_request(emu, http):
    url = f"{emu.url}/emulator/echo"
    for headers in (
        {"X-Fal-Request-Timeout": "0.5"},
        {"X-Fal-Request-Timeout": "soon"},
        {"X-Fal-Request-Start-Timeout": "0"},
        {"X-Fal-Object-Lifecycle-Preference": "{not json"},
        {"X-Fal-Object-Lifecycle-Preference": '{"expiration_duration_seconds": -1}'},
    ):
        response = http.post(url, json={}, headers=headers)
        assert response.status_code == 400, headers
        assert response.json()["error_type"] == "bad_request"
        assert response.headers["X-Fal-Error-Type"] == "bad_request"
    ok = http.post(url, json={}, headers={"X-Fal-Request-Timeout": "1", "X-Fal-Store-IO": "0"})
    assert ok.status_code == 200
    assert emu.requests[-1].headers["X-Fal-Store-IO"] == "0"


# --------------------------------------------------------------------------- models and files


def test_text_to_image_is_deterministic_and_serves_valid_pngs(emu, http):
    body = {"prompt": "a red fox", "image_size": "landscape_4_3", "num_images": 2}
    first = http.post(f"{emu.url}/fal-ai/flux/schnell", json=body).json()
    second = http.post(f"{emu.url}/fal-ai/flux/schnell", json=body).json()
    assert first == second
    assert first["prompt"] == "a red fox" and first["has_nsfw_concepts"] == [False, False]
    assert isinstance(first["seed"], int) and isinstance(first["timings"]["inference"], float)
    images = first["images"]
    assert len(images) == 2 and images[0]["url"] != images[1]["url"]
    assert images[0]["url"].startswith(f"{emu.url}/files/")
    downloads = []
    for image in images:
        assert (image["width"], image["height"], image["content_type"]) == (1024, 768, "image/png")
        assert image["url"].endswith("/" + image["file_name"])
        response = requests.get(image["url"])  # no auth, like fal's CDN
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "image/png"
        assert int(response.headers["Content-Length"]) == len(response.content)
        width, height, raw = read_png(response.content)
        assert (width, height) == (1024, 768)
        assert len(raw) == height * (1 + 3 * width)
        downloads.append(response.content)
    assert downloads[0] != downloads[1]
    assert requests.get(images[0]["url"]).content == downloads[0]
    other = http.post(f"{emu.url}/fal-ai/flux/schnell", json={**body, "seed": 7}).json()
    assert other["seed"] == 7 and other["images"][0]["url"] != images[0]["url"]
    custom = http.post(f"{emu.url}/fal-ai/fast-sdxl", json={"prompt": "p", "image_size": {"width": 65, "height": 99}})
    width, height, _ = read_png(requests.get(custom.json()["images"][0]["url"]).content)
    assert (width, height) == (65, 99)


def test_any_llm_and_echo(emu, http):
    first = http.post(f"{emu.url}/fal-ai/any-llm", json={"prompt": "Why is the sky blue?"}).json()
    again = http.post(f"{emu.url}/fal-ai/any-llm", json={"prompt": "Why is the sky blue?"}).json()
    other = http.post(f"{emu.url}/fal-ai/any-llm", json={"prompt": "Why is grass green?"}).json()
    assert first == again and first["output"] != other["output"]
    assert first["partial"] is False and first["error"] is None
    assert http.post(f"{emu.url}/fal-ai/any-llm", json={}).status_code == 422
    body = {"nested": {"list": [1, "two", None]}, "flag": True}
    assert http.post(f"{emu.url}/emulator/echo/any/subpath", json=body).json() == body


def test_lifecycle_preference_expires_files(emu, http):
    short = http.post(
        f"{emu.url}/fal-ai/fast-sdxl",
        json={"prompt": "short lived", "image_size": "square"},
        headers={"X-Fal-Object-Lifecycle-Preference": json.dumps({"expiration_duration_seconds": 1})},
    )
    forever = http.post(
        f"{emu.url}/fal-ai/fast-sdxl",
        json={"prompt": "long lived", "image_size": "square"},
        headers={"X-Fal-Object-Lifecycle-Preference": json.dumps({"expiration_duration_seconds": None})},
    )
    short_url, long_url = short.json()["images"][0]["url"], forever.json()["images"][0]["url"]
    assert requests.get(short_url).status_code == 200
    time.sleep(1.1)
    assert requests.get(short_url).status_code == 404
    assert requests.get(long_url).status_code == 200


def test_add_file(emu):
    url = emu.add_file(b"hello", content_type="text/plain", name="hello.txt")
    response = requests.get(url)
    assert response.content == b"hello" and response.headers["Content-Type"].startswith("text/plain")
    big = emu.add_file(size=200_000, content_type="video/mp4")
    assert len(requests.get(big).content) == 200_000
    gone = emu.add_file(b"x", lifespan=0)
    assert requests.get(gone).status_code == 404
    assert requests.get(f"{emu.url}/files/nope/nope.bin").status_code == 404


def test_large_file_is_streamed_and_truncate_fault_truncates(emu, http):
    size = 3_000_000 + 123
    output = http.post(f"{emu.url}/emulator/file", json={"size_bytes": size}).json()
    video = output["video"]
    assert video["file_size"] == size and video["content_type"] == "video/mp4"
    with requests.get(video["url"], stream=True) as response:
        assert response.headers["Content-Length"] == str(size)
        assert response.headers["Content-Type"] == "video/mp4"
        digest, total = hashlib.sha256(), 0
        for chunk in response.iter_content(65536):
            digest.update(chunk)
            total += len(chunk)
    assert total == size
    again = hashlib.sha256(requests.get(video["url"]).content).hexdigest()
    assert again == digest.hexdigest()
    other = http.post(f"{emu.url}/emulator/file", json={"size_bytes": 10, "content_type": "audio/wav", "key": "audio"})
    assert other.json()["audio"]["file_name"].endswith(".wav")
    assert http.post(f"{emu.url}/emulator/file", json={"size_bytes": -1}).status_code == 422

    emu.set_file_fault("truncate")
    received = 0
    with (
        pytest.raises(requests.exceptions.RequestException),
        requests.get(video["url"], stream=True) as response,
    ):
        assert response.headers["Content-Length"] == str(size)
        for chunk in response.iter_content(65536):
            received += len(chunk)
    assert 0 < received < size

    emu.set_file_fault("slow", bytes_per_second=400_000)
    small = emu.add_file(size=100_000)
    assert len(requests.get(small).content) == 100_000
    emu.set_file_fault(None)
    assert len(requests.get(video["url"]).content) == size


# --------------------------------------------------------------------------- timeouts, faults, limits


def test_start_timeout_gives_user_504(emu, http):
    emu.set_runner_wait(3.0, model_id="emulator/echo")
    response = http.post(
        f"{emu.url}/emulator/echo",
        json={},
        headers={"X-Fal-Request-Timeout": "30", "X-Fal-Request-Start-Timeout": "1"},  # the latter wins
    )
    assert response.status_code == 504
    assert response.json() == {"detail": "Request timed out", "error_type": "request_timeout"}
    assert response.headers["X-Fal-Error-Type"] == "request_timeout"
    assert response.headers["X-Fal-Request-Timeout-Type"] == "user"
    # other models are not affected, and a runner that starts in time answers normally
    emu.set_runner_wait(0.2, model_id="emulator/echo")
    ok = http.post(f"{emu.url}/emulator/echo", json={"v": 1}, headers={"X-Fal-Request-Timeout": "1"})
    assert ok.status_code == 200 and ok.json() == {"v": 1}


def test_faults(emu, http):
    url = f"{emu.url}/emulator/echo"
    emu.inject_fault(status=503, error_type="runner_disconnected", times=2, needs_retry=True, retry_after=2)
    for _ in range(2):
        response = http.post(url, json={})
        assert response.status_code == 503
        assert response.json() == {"detail": "Runner disconnected", "error_type": "runner_disconnected"}
        assert response.headers["X-Fal-Error-Type"] == "runner_disconnected"
        assert response.headers["X-Fal-Needs-Retry"] == "1"
        assert response.headers["Retry-After"] == "2"
    assert http.post(url, json={}).status_code == 200

    emu.inject_fault(status=502, html=True)
    html = http.post(url, json={})
    assert html.status_code == 502 and html.headers["Content-Type"].startswith("text/html")
    assert "<title>502 Bad Gateway</title>" in html.text

    emu.inject_fault(drop_connection=True)
    with pytest.raises(requests.exceptions.ConnectionError):
        http.post(url, json={"dropped": True})
    assert http.post(url, json={}).status_code == 200

    emu.inject_fault(status=422, error_type=None, detail=[{"loc": ["body"], "msg": "m", "type": "t"}], retryable=True)
    response = http.post(url, json={})
    assert response.status_code == 422 and response.headers["X-Fal-Retryable"] == "true"
    assert "X-Fal-Error-Type" not in response.headers

    emu.inject_fault(status=504, error_type="request_timeout", timeout_type="user", headers={"X-Extra": "1"})
    response = http.post(url, json={})
    assert response.headers["X-Fal-Request-Timeout-Type"] == "user" and response.headers["X-Extra"] == "1"

    emu.inject_fault(status=500, error_type="internal_error", model_id="fal-ai/any-llm")
    assert http.post(url, json={}).status_code == 200  # another model: untouched
    assert http.post(f"{emu.url}/fal-ai/any-llm", json={"prompt": "x"}).status_code == 500


def test_concurrency_limit_gives_429(emu, http):
    emu.set_latency(0.5)
    emu.set_concurrency_limit(1)
    results: list[int] = []

    def slow_call():
        results.append(requests.post(f"{emu.url}/emulator/echo", json={}, headers=AUTH).status_code)

    thread = threading.Thread(target=slow_call)
    thread.start()
    wait_for(lambda: emu.state.in_flight >= 1)
    limited = http.post(f"{emu.url}/emulator/echo", json={})
    assert limited.status_code == 429
    assert limited.json() == {"detail": "Concurrent requests limit exceeded", "error_type": "concurrent_requests_limit"}
    assert limited.headers["X-Fal-Needs-Retry"] == "1"
    thread.join()
    assert results == [200]
    emu.set_concurrency_limit(None)
    emu.set_latency(0)
    assert http.post(f"{emu.url}/emulator/echo", json={}).status_code == 200


# --------------------------------------------------------------------------- queue


def test_queue_lifecycle(emu, http):
    emu.set_queue_timing(queue_wait=0.6, run_time=0.6)
    submit = http.post(f"{emu.queue_url}/fal-ai/fast-sdxl", json={"prompt": "queued", "image_size": "square"})
    assert submit.status_code == 200
    job = submit.json()
    second = http.post(f"{emu.queue_url}/fal-ai/fast-sdxl", json={"prompt": "second"}).json()
    assert job["status"] == "IN_QUEUE" and job["queue_position"] == 0 and second["queue_position"] == 1
    rid = job["request_id"]
    base = f"{emu.queue_url}/fal-ai/fast-sdxl/requests/{rid}"
    assert job["status_url"] == f"{base}/status"
    assert job["response_url"] == base and job["cancel_url"] == f"{base}/cancel"

    queued = http.get(job["status_url"])
    assert queued.status_code == 202 and queued.json()["status"] == "IN_QUEUE"
    assert queued.json()["queue_position"] == 0
    assert http.get(second["status_url"]).json()["queue_position"] == 1
    early = http.get(job["response_url"])
    assert early.status_code == 400 and early.json() == {"detail": "Request is still in progress"}

    seen_statuses, log_counts = ["IN_QUEUE"], []
    while True:
        response = http.get(job["status_url"], params={"logs": 1})
        status = response.json()["status"]
        seen_statuses.append(status)
        if status == "IN_PROGRESS":
            assert response.status_code == 202
            log_counts.append(len(response.json()["logs"]))
        if status == "COMPLETED":
            assert response.status_code == 200
            final = response.json()
            break
        time.sleep(0.05)
    assert seen_statuses.index("IN_QUEUE") < seen_statuses.index("IN_PROGRESS") < seen_statuses.index("COMPLETED")
    assert log_counts == sorted(log_counts) and log_counts[-1] > log_counts[0]
    assert final["logs"][-1]["message"] == "Done" and len(final["logs"]) > log_counts[-1]
    assert {"message", "level", "source", "timestamp"} <= set(final["logs"][0])
    assert final["metrics"]["inference_time"] > 0 and "error" not in final
    assert http.get(job["status_url"]).json()["logs"] is None  # logs only when asked

    result = http.get(job["response_url"])
    assert result.status_code == 200 and result.headers["x-fal-request-id"] == rid
    assert result.json()["images"][0]["width"] == 512
    assert requests.get(result.json()["images"][0]["url"]).status_code == 200

    cancel = http.put(job["cancel_url"])
    assert cancel.status_code == 400 and cancel.json() == {"status": "ALREADY_COMPLETED"}


def test_queue_cancel(emu, http):
    emu.set_queue_timing(queue_wait=5.0)
    job = http.post(f"{emu.queue_url}/emulator/echo", json={"x": 1}).json()
    cancel = http.put(job["cancel_url"])
    assert cancel.status_code == 202 and cancel.json() == {"status": "CANCELLATION_REQUESTED"}
    status = http.get(job["status_url"])
    assert status.status_code == 200
    assert status.json()["status"] == "COMPLETED"
    assert status.json()["error"] == "Request cancelled" and status.json()["error_type"] == "client_cancelled"
    assert http.put(job["cancel_url"]).status_code == 400
    assert http.get(job["response_url"]).json()["error_type"] == "client_cancelled"


def test_complete_on_cancel_answers_already_completed_and_keeps_the_result(emu, http):
    emu.set_queue_timing(run_time=30.0)
    emu.complete_on_cancel(model_id="emulator/echo")
    job = http.post(f"{emu.queue_url}/emulator/echo", json={"x": 1}).json()
    assert http.get(job["status_url"]).json()["status"] == "IN_PROGRESS"
    cancel = http.put(job["cancel_url"])
    assert cancel.status_code == 400 and cancel.json() == {"status": "ALREADY_COMPLETED"}
    status = http.get(job["status_url"]).json()
    assert status["status"] == "COMPLETED" and "error" not in status
    assert http.get(job["response_url"]).json() == {"x": 1}
    emu.complete_on_cancel(False)
    other = http.post(f"{emu.queue_url}/emulator/echo", json={"x": 2}).json()
    assert http.put(other["cancel_url"]).status_code == 202


def test_queue_subpath_model_uses_app_id_and_other_app_is_404(emu, http):
    job = http.post(f"{emu.queue_url}/fal-ai/flux/dev", json={"prompt": "x"}).json()
    rid = job["request_id"]
    assert job["status_url"] == f"{emu.queue_url}/fal-ai/flux/requests/{rid}/status"
    assert "/dev/" not in job["response_url"]
    assert http.get(job["status_url"]).status_code == 200
    assert http.get(f"{emu.queue_url}/fal-ai/flux/requests/{rid}").status_code == 200
    assert http.get(f"{emu.queue_url}/fal-ai/fast-sdxl/requests/{rid}/status").status_code == 404
    assert http.get(f"{emu.queue_url}/fal-ai/fast-sdxl/requests/{rid}").status_code == 404
    assert http.put(f"{emu.queue_url}/fal-ai/fast-sdxl/requests/{rid}/cancel").status_code == 404
    echo = http.post(f"{emu.queue_url}/emulator/echo/deep/sub/path", json={"k": "v"}).json()
    assert echo["response_url"].startswith(f"{emu.queue_url}/emulator/echo/requests/")
    assert http.get(echo["response_url"]).json() == {"k": "v"}


def test_connection_check_request(emu):
    url = f"{emu.queue_url}/fal-ai/fast-sdxl/requests/{ZERO_ID}/status"
    assert requests.get(url, headers={"Authorization": "Key bad"}).status_code == 401
    missing = requests.get(url, headers=AUTH)
    assert missing.status_code == 404 and missing.json() == {"detail": "Request not found"}


def test_result_retention():
    with FalEmulator(api_key=KEY, result_retention=1.2, large_result_retention=0.4) as emu:
        http = requests.Session()
        http.headers.update(AUTH)
        small = http.post(f"{emu.queue_url}/emulator/echo", json={"v": 1}).json()
        large = http.post(f"{emu.queue_url}/emulator/echo", json={"blob": "x" * 12_000}).json()
        assert http.get(small["response_url"]).status_code == 200
        assert http.get(large["response_url"]).status_code == 200
        time.sleep(0.5)
        assert http.get(large["response_url"]).status_code == 404
        assert http.get(large["status_url"]).status_code == 404
        assert http.get(small["response_url"]).status_code == 200
        time.sleep(0.8)
        gone = http.get(small["response_url"])
        assert gone.status_code == 404 and gone.json() == {"detail": "Request not found"}


def test_fail_queued(emu, http):
    emu.fail_queued(model_id="fal-ai/any-llm", error="CUDA out of memory", error_type="runner_server_error")
    failed = http.post(f"{emu.queue_url}/fal-ai/any-llm", json={"prompt": "x"}).json()
    fine = http.post(f"{emu.queue_url}/fal-ai/any-llm", json={"prompt": "x"}).json()
    status = http.get(failed["status_url"], params={"logs": "1"}).json()
    assert status["status"] == "COMPLETED"
    assert status["error"] == "CUDA out of memory" and status["error_type"] == "runner_server_error"
    assert status["logs"][-1]["level"] == "ERROR"
    result = http.get(failed["response_url"])
    assert result.status_code == 500
    assert result.json() == {"detail": "CUDA out of memory", "error_type": "runner_server_error"}
    assert http.get(fine["response_url"]).status_code == 200


def test_queue_start_timeout(emu, http):
    emu.set_queue_timing(queue_wait=5.0)
    job = http.post(f"{emu.queue_url}/emulator/echo", json={}, headers={"X-Fal-Request-Timeout": "1"}).json()
    assert http.get(job["status_url"]).json()["status"] == "IN_QUEUE"
    time.sleep(1.1)
    status = http.get(job["status_url"]).json()
    assert status["status"] == "COMPLETED" and status["error_type"] == "request_timeout"
    result = http.get(job["response_url"])
    assert result.status_code == 504 and result.headers["X-Fal-Request-Timeout-Type"] == "user"


def test_status_stream(emu, http):
    emu.set_queue_timing(queue_wait=0.5, run_time=0.4)
    job = http.post(f"{emu.queue_url}/emulator/echo", json={}).json()
    with http.get(job["status_url"] + "/stream", stream=True) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [json.loads(line[len(b"data: ") :]) for line in response.iter_lines() if line]
    statuses = [event["status"] for event in events]
    assert statuses[0] == "IN_QUEUE" and statuses[-1] == "COMPLETED" and "IN_PROGRESS" in statuses


def test_many_queued_requests(emu, http):
    emu.set_queue_timing(queue_wait=60.0)
    jobs = [http.post(f"{emu.queue_url}/emulator/echo", json={"i": i}).json() for i in range(300)]
    assert jobs[-1]["queue_position"] == 299
    assert http.get(jobs[150]["status_url"]).json()["queue_position"] == 150


# --------------------------------------------------------------------------- webhooks


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    _Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Receiver.received
    server.shutdown()
    server.server_close()


def test_webhooks(emu, http, receiver):
    hook_url, received = receiver
    emu.set_queue_timing(run_time=0.2)
    ok = http.post(f"{emu.queue_url}/fal-ai/any-llm", params={"fal_webhook": hook_url}, json={"prompt": "hi"})
    rid = ok.json()["request_id"]
    emu.fail_queued(error="boom")
    bad = http.post(f"{emu.queue_url}/fal-ai/any-llm", params={"fal_webhook": hook_url}, json={"prompt": "x"})
    http.post(f"{emu.queue_url}/emulator/echo", params={"fal_webhook": "http://example.com/hook"}, json={})
    wait_for(lambda: len(received) >= 2 and len(emu.webhooks) >= 3)
    by_id = {item["request_id"]: item for item in received}
    assert by_id[rid]["status"] == "OK" and by_id[rid]["error"] is None
    assert by_id[rid]["gateway_request_id"] == rid
    assert by_id[rid]["payload"] == http.get(ok.json()["response_url"]).json()
    failed = by_id[bad.json()["request_id"]]
    # fal's ERROR webhook names the status and carries the model's error body
    assert failed["status"] == "ERROR" and failed["error"] == "Invalid status code: 500"
    assert failed["payload"] == {"detail": "boom", "error_type": "runner_server_error"}
    ignored = [record for record in emu.webhooks if "example.com" in record.url]
    assert len(ignored) == 1 and not ignored[0].delivered and "ignored" in ignored[0].error
    assert len(received) == 2


def test_webhook_on_cancel(emu, http, receiver):
    hook_url, received = receiver
    emu.set_queue_timing(queue_wait=10.0)
    job = http.post(f"{emu.queue_url}/emulator/echo", params={"fal_webhook": hook_url}, json={}).json()
    http.put(job["cancel_url"])
    wait_for(lambda: received)
    assert received[0]["status"] == "ERROR" and received[0]["error"] == "Invalid status code: 499"
    assert received[0]["payload"]["detail"] == "Request cancelled"


# ----------------------------------------------------------------- control API, records, key hygiene


def test_control_api(emu, http):
    control = f"{emu.url}/_emulator"
    assert requests.get(f"{control}/health").json() == {"status": "ok"}  # open: a readiness check
    assert http.post(f"{control}/faults", json={"status": 503, "error_type": "runner_scheduling_failure"}).ok
    assert http.post(f"{emu.url}/emulator/echo", json={}).json()["error_type"] == "runner_scheduling_failure"
    assert http.post(f"{control}/lock", json={"reason": "Because."}).ok
    assert http.post(f"{emu.url}/emulator/echo", json={}).json() == {"detail": "User is locked. Reason: Because."}
    assert http.post(f"{control}/unlock").ok
    assert http.post(f"{control}/concurrency-limit", json={"limit": 0}).ok
    assert http.post(f"{emu.url}/emulator/echo", json={}).status_code == 429
    assert http.post(f"{control}/concurrency-limit", json={"limit": None}).ok
    assert http.post(f"{control}/latency", json={"seconds": 0.0, "model_id": "emulator/echo"}).ok
    assert http.post(f"{control}/runner-wait", json={"seconds": 0.0}).ok
    assert http.post(f"{control}/queue-timing", json={"queue_wait": 0.0, "run_time": None}).ok
    assert http.post(f"{control}/file-fault", json={"mode": None}).ok
    assert http.post(f"{control}/fail-queued", json={"error": "e", "times": 1}).ok
    assert http.post(f"{control}/latency", json={"seconds": -1}).status_code == 400
    assert http.post(f"{control}/latency", json={"bogus": 1}).status_code == 400
    assert http.post(f"{control}/nope").status_code == 404
    records = http.get(f"{control}/requests").json()
    assert [r["path"] for r in records] == ["/emulator/echo"] * 3
    assert [r["status"] for r in records] == [503, 403, 429]
    assert http.post(f"{control}/reset").ok
    assert http.get(f"{control}/requests").json() == []
    assert http.post(f"{emu.url}/emulator/echo", json={}).status_code == 200


def test_control_api_needs_the_key_or_the_control_token(http):
    token = "ctl-token-5e2a91"
    with FalEmulator(api_key=KEY, control_token=token) as emu:
        control = f"{emu.url}/_emulator"
        http.post(f"{emu.url}/emulator/echo", json={"prompt": "secret plans"})
        anonymous = [
            requests.post(f"{control}/lock", json={"reason": "x"}),
            requests.post(f"{control}/faults", json={"status": 500}),
            requests.delete(f"{control}/faults"),
            requests.get(f"{control}/requests"),
            requests.get(f"{control}/webhooks"),
            requests.post(f"{control}/reset"),
            requests.post(f"{control}/lock", headers={"Authorization": "Key wrong"}),
            requests.post(f"{control}/lock", headers={"X-Emulator-Control-Token": "wrong"}),
            requests.post(f"{control}/lock", headers={"Authorization": f"Bearer {token}"}),
        ]
        assert [answer.status_code for answer in anonymous] == [401] * len(anonymous)
        assert "control API needs" in anonymous[0].json()["detail"]
        assert "secret plans" not in anonymous[3].text
        assert http.post(f"{emu.url}/emulator/echo", json={}).status_code == 200  # nothing was changed
        assert emu.count() == 2

        by_token = {"X-Emulator-Control-Token": token}
        assert requests.post(f"{control}/lock", json={"reason": "Because."}, headers=by_token).ok
        assert http.post(f"{emu.url}/emulator/echo", json={}).status_code == 403
        # a locked account does not lock the control API out
        assert http.post(f"{control}/unlock").ok
        assert requests.get(f"{control}/requests", headers=by_token).json()[0]["json"] == {"prompt": "secret plans"}

    with FalEmulator(api_key=KEY) as emu:  # no token set: an empty token header is no credential
        answer = requests.post(f"{emu.url}/_emulator/reset", headers={"X-Emulator-Control-Token": ""})
        assert answer.status_code == 401


def test_records_and_count(emu, http):
    http.post(f"{emu.queue_url}/fal-ai/fast-sdxl", json={"prompt": "a"}, params={"fal_webhook": "http://x/"})
    http.post(f"{emu.url}/fal-ai/fast-sdxl", json={"prompt": "b"}, headers={"X-Fal-Runner-Hint": "r1"})
    assert emu.count(method="POST", path_prefix="/queue/fal-ai/fast-sdxl") == 1
    assert emu.count(method="POST") == 2 and emu.count() == 2
    queued, direct = emu.requests
    assert queued.query == {"fal_webhook": "http://x/"} and queued.json == {"prompt": "a"}
    assert direct.headers["X-Fal-Runner-Hint"] == "r1" and direct.status == 200
    assert direct.started <= direct.finished
    assert not any(name.lower() == "authorization" for name in direct.headers)


def test_key_never_leaks(caplog):
    caplog.set_level(logging.INFO, logger="airflow_provider_fal.emulator")
    with FalEmulator(api_key=KEY, log_requests=True) as emu:
        assert KEY not in repr(emu) and emu.url in repr(emu)
        bodies = [
            requests.post(f"{emu.url}/emulator/echo", json={}, headers=AUTH).text,
            requests.post(f"{emu.url}/fal-ai/x", json={}, headers={"Authorization": f"Key {KEY}x"}).text,
            requests.post(f"{emu.url}/emulator/echo", json={"leak": KEY}, headers=AUTH).text,
            requests.get(f"{emu.url}/q", params={"key": KEY}, headers={"X-Other": KEY, **AUTH}).text,
        ]
        records = json.dumps([record.to_dict() for record in emu.requests])
        control = requests.get(f"{emu.url}/_emulator/requests", headers=AUTH).text
    assert KEY not in "".join(bodies[:2]) + bodies[3]
    assert KEY not in records and KEY not in control
    assert "***" in records
    assert len(caplog.records) == 4
    assert all(KEY not in record.getMessage() for record in caplog.records)
    assert caplog.records[0].getMessage().startswith("POST /emulator/echo 200 ")


def test_records_keep_no_base64_form_of_the_key(emu, http):
    """Basic credentials, a token or a data: URI carrying the key, at every alignment and in both
    base64 alphabets, are redacted in the records (the Python API and /_emulator/requests)."""
    encoded = []
    for prefix in (b"", b"u", b"us", b"user:", b"api_key="):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded.append(encode(prefix + KEY.encode() + b";x").decode())
    basic = base64.b64encode(f"user:{KEY}".encode()).decode()
    http.post(
        f"{emu.url}/emulator/echo",
        json={"image_url": f"data:text/plain;base64,{encoded[6]}", "tokens": encoded},
        headers={"Proxy-Authorization": f"Basic {basic}", "X-Token": encoded[3]},
        params={"t": encoded[9]},
    )
    records = json.dumps([record.to_dict() for record in emu.requests])
    control = http.get(f"{emu.url}/_emulator/requests").text
    for text in (records, control):
        assert "***" in text
        for value in [basic, *encoded]:
            assert value not in text
    assert emu.requests[0].json["image_url"].startswith("data:text/plain;base64,")


# --------------------------------------------------------------------------- CLI


def test_cli_subprocess(tmp_path):
    ready = tmp_path / "ready.txt"
    env = {**os.environ, "FAL_EMULATOR_KEY": KEY, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_fal.emulator",
            "--port",
            "0",
            "--ready-file",
            str(ready),
            "--log-requests",
            "--queue-wait",
            "0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        wait_for(ready.exists, timeout=20)
        url = ready.read_text().strip()
        assert url.startswith("http://127.0.0.1:")
        assert requests.get(f"{url}/_emulator/health").json() == {"status": "ok"}
        assert requests.post(f"{url}/emulator/echo", json={"a": 1}, headers=AUTH).json() == {"a": 1}
        assert requests.post(f"{url}/emulator/echo", json={}, headers={"Authorization": "Key x"}).status_code == 401
        job = requests.post(f"{url}/queue/emulator/echo", json={}, headers=AUTH).json()
        assert job["status_url"].startswith(f"{url}/queue/emulator/echo/requests/")
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert stdout.splitlines()[0] == f"fal emulator listening on {url} (queue: {url}/queue)"
    assert "POST /emulator/echo 200" in stderr and "POST /emulator/echo 401" in stderr
    assert "WARNING" not in stderr
    assert KEY not in stdout and KEY not in stderr


def test_cli_warns_about_exposure_and_a_key_on_the_command_line(tmp_path):
    """--host 0.0.0.0 gets a warning and a banner that says it listens on all interfaces; --key
    gets a warning that it shows in ps; the default loopback run with the key from the
    environment gets no warning at all (test_cli_subprocess)."""
    ready = tmp_path / "ready.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("FAL_EMULATOR_KEY", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_fal.emulator",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--key",
            KEY,
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        wait_for(ready.exists, timeout=20)
        url = ready.read_text().strip()
        assert requests.post(f"{url}/_emulator/lock", json={}).status_code == 401
        assert requests.post(f"{url}/emulator/echo", json={"a": 1}, headers=AUTH).json() == {"a": 1}
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
    port = url.rsplit(":", 1)[1]
    assert stdout.splitlines()[0] == (
        f"fal emulator listening on all interfaces (0.0.0.0) port {port}; from this machine: {url} (queue: {url}/queue)"
    )
    assert "WARNING: --key is visible to every user of this machine (ps, /proc); set FAL_EMULATOR_KEY" in stderr
    assert "WARNING: --host 0.0.0.0 exposes the emulator beyond this machine" in stderr
    assert "/_emulator/" in stderr and "public default" not in stderr
    assert KEY not in stdout and KEY not in stderr
