"""The queue half of FalClient and FalHook, over real HTTP against the emulator's queue API.

Request timing comes from the emulator's queue settings (``set_queue_timing``), chosen so that
each asserted state holds with a wide margin: a request meant to be pending waits 60 s, one
meant to be done takes 0 s.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from airflow_provider_fal.core.client import FalClient
from airflow_provider_fal.core.queue import (
    ALREADY_COMPLETED,
    CANCELLATION_REQUESTED,
    COMPLETED,
    IN_PROGRESS,
    IN_QUEUE,
    QueueHandle,
    QueueProgress,
    is_under,
)
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.emulator import FalEmulator
from airflow_provider_fal.exceptions import (
    FalAuthError,
    FalClientError,
    FalConfigurationError,
    FalError,
    FalRateLimitError,
    FalRequestLostError,
    FalResultExpiredError,
    FalServerError,
    FalTimeoutError,
    FalValidationError,
)
from tests.conftest import API_KEY

FAST_RETRIES = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05, max_total_wait=1.0)
PENDING = 60.0  # seconds a request that must stay pending waits: far beyond any test


@pytest.fixture
def client(emulator):
    fal = FalClient(API_KEY, run_url=emulator.url, queue_url=emulator.queue_url, retry_policy=FAST_RETRIES)
    yield fal
    fal.close()


def recorded(emulator, count: int, method: str | None = None, path_prefix: str = "/queue/") -> list:
    """The emulator's records of ``method`` under ``path_prefix``, once ``count`` of them are there.

    The emulator records a request just after answering it, so a record can trail the answer
    by a moment; this waits for it (up to 10 s) instead of racing it.
    """
    deadline = time.monotonic() + 10
    while True:
        found = [
            r for r in emulator.requests if (method is None or r.method == method) and r.path.startswith(path_prefix)
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def queue_posts(emulator, count: int = 1, model_id: str = "fal-ai/flux/dev") -> list:
    return recorded(emulator, count, "POST", f"/queue/{model_id}")


def test_submit_sends_the_call_to_the_queue_and_returns_fals_urls(emulator, client):
    emulator.set_queue_timing(queue_wait=PENDING, run_time=0)
    handle = client.submit(
        "fal-ai/flux/dev",
        {"prompt": "a lighthouse"},
        start_timeout=120,
        object_lifecycle="never",
        hint="warm-1",
        priority="low",
        webhook_url="https://hooks.example.com/fal?x=1",
        headers={"X-Fal-Store-IO": "0"},
    )
    base = f"{emulator.queue_url}/fal-ai/flux/requests/{handle.request_id}"
    assert handle == QueueHandle(handle.request_id, "fal-ai/flux/dev", f"{base}/status", base, f"{base}/cancel")

    (post,) = queue_posts(emulator)
    assert post.json == {"prompt": "a lighthouse"}
    assert post.query == {"fal_webhook": "https://hooks.example.com/fal?x=1"}
    headers = {k.lower(): v for k, v in post.headers.items()}
    assert headers["x-fal-queue-priority"] == "low"
    assert headers["x-fal-request-timeout"] == "120"
    assert headers["x-fal-object-lifecycle-preference"] == '{"expiration_duration_seconds":null}'
    assert headers["x-fal-runner-hint"] == "warm-1"
    assert headers["x-fal-store-io"] == "0"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"model_id": "https://evil.example/x"}, "model_id"),
        ({"model_id": "fal-ai/../admin"}, "model_id"),
        ({"priority": "urgent"}, "priority"),
        ({"webhook_url": "ftp://hooks.example.com"}, "webhook_url"),
        ({"start_timeout": 0.5}, "start_timeout"),
        ({"arguments": ["not", "a", "dict"]}, "arguments"),
        ({"headers": {"Authorization": "Key other"}}, "headers"),
    ],
)
def test_bad_submit_input_fails_before_any_request(emulator, client, kwargs, field):
    call = {"model_id": "fal-ai/flux/dev", "arguments": {"prompt": "x"}, **kwargs}
    with pytest.raises(FalConfigurationError) as raised:
        client.submit(call.pop("model_id"), call.pop("arguments"), **call)
    assert field in str(raised.value)
    sentinel = client.submit("fal-ai/flux/dev", {"prompt": "sentinel"})  # recorded after anything earlier
    assert [r.path for r in recorded(emulator, 1, path_prefix="/")] == ["/queue/fal-ai/flux/dev"]
    assert recorded(emulator, 1)[0].json == {"prompt": "sentinel"} and sentinel.request_id


def test_status_walks_through_queue_progress_and_completion(emulator, client):
    emulator.set_queue_timing(queue_wait=PENDING, run_time=0)
    waiting = client.submit("fal-ai/flux/dev", {"prompt": "first"})
    queued = client.submit("fal-ai/flux/dev", {"prompt": "second"})
    emulator.set_queue_timing(queue_wait=0, run_time=PENDING)
    running = client.submit("fal-ai/flux/dev", {"prompt": "third"})
    emulator.set_queue_timing(queue_wait=0, run_time=0)
    done = client.submit("fal-ai/flux/dev", {"prompt": "fourth"})

    status = client.status(queued)
    assert (status.status, status.queue_position, status.completed) == (IN_QUEUE, 1, False)
    assert client.status(waiting).queue_position == 0
    status = client.status(running)
    assert status.status == IN_PROGRESS and status.logs and status.logs[0]["message"] == "Loading model"
    status = client.status(done)
    assert status.status == COMPLETED and status.completed and not status.failed
    assert [entry["message"] for entry in status.logs][-1] == "Done"
    assert "inference_time" in status.metrics
    assert client.status(done, logs=False).logs == ()

    polls = recorded(emulator, 5, "GET")
    assert [r.status for r in polls] == [202, 202, 202, 200, 200]
    assert [r.query for r in polls] == [{"logs": "1"}] * 4 + [{}]


def test_result_is_the_model_output(emulator, client):
    emulator.set_queue_timing(queue_wait=0, run_time=0)
    handle = client.submit("fal-ai/fast-sdxl", {"prompt": "a fox", "seed": 3})
    response = client.result(handle)
    assert response.request_id == handle.request_id
    assert response.output == client.run("fal-ai/fast-sdxl", {"prompt": "a fox", "seed": 3}).output


def test_cancel_pending_and_completed_requests(emulator, client):
    emulator.set_queue_timing(queue_wait=PENDING, run_time=0)
    pending = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    assert client.cancel(pending) == CANCELLATION_REQUESTED
    status = client.status(pending)
    assert status.failed and status.error_type == "client_cancelled"
    failure = status.failure(pending)  # classified by its error type, like a sync 499
    assert isinstance(failure, FalClientError) and failure.permanent
    assert client.cancel(pending) == ALREADY_COMPLETED
    cancels = recorded(emulator, 2, "PUT")
    assert [r.path for r in cancels] == [f"/queue/fal-ai/flux/requests/{pending.request_id}/cancel"] * 2
    assert [r.status for r in cancels] == [202, 400]


def test_wait_polls_until_completed_and_reports_each_status(emulator, client):
    emulator.set_queue_timing(queue_wait=0, run_time=0.3)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    seen = []
    response = client.wait(handle, poll_interval=0.05, on_status=seen.append)
    assert response.output["prompt"] == "x"
    assert seen[-1].status == COMPLETED
    assert all(s.status in (IN_QUEUE, IN_PROGRESS) for s in seen[:-1])
    assert len(recorded(emulator, len(seen), "GET", f"/queue/fal-ai/flux/requests/{handle.request_id}/status")) == len(
        seen
    )


def test_wait_times_out_cancels_and_says_so(emulator, client):
    emulator.set_queue_timing(queue_wait=PENDING, run_time=0)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    with pytest.raises(FalTimeoutError) as raised:
        client.wait(handle, timeout=0.2, poll_interval=0.05)
    assert "was cancelled" in str(raised.value) and handle.request_id in str(raised.value)
    assert len(recorded(emulator, 1, "PUT", f"/queue/fal-ai/flux/requests/{handle.request_id}/cancel")) == 1
    assert client.status(handle).error_type == "client_cancelled"


def test_completed_with_error_reads_the_result_like_a_sync_answer(emulator, client):
    """As fal's own client does: the result GET carries the model's status and body."""
    emulator.set_queue_timing(queue_wait=0, run_time=0)
    emulator.fail_queued(error="CUDA out of memory", error_type="runner_server_error")
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    with pytest.raises(FalServerError) as raised:
        client.wait(handle, poll_interval=0.05)
    error = raised.value
    assert error.detail == "CUDA out of memory" and error.error_type == "runner_server_error"
    assert error.request_id == handle.request_id and not error.permanent and error.status_code == 500
    assert "CUDA out of memory" in str(error) and "fal does not bill 5xx answers" in str(error)
    client.status(handle, logs=False)  # a sentinel: recorded after the result fetch wait() made
    gets = recorded(emulator, 3, "GET")
    assert [r.query for r in gets] == [{"logs": "1"}, {}, {}]
    assert gets[1].path.endswith(f"/requests/{handle.request_id}") and gets[1].status == 500


def test_invalid_input_is_accepted_by_the_queue_and_fails_on_the_result_read(emulator, client):
    """fal's queue takes any JSON object; the 422 with its field list comes from the result GET."""
    emulator.set_queue_timing(queue_wait=0, run_time=0.1)
    handle = client.submit("fal-ai/flux/dev", {"no_prompt": True})
    with pytest.raises(FalValidationError) as raised:
        client.wait(handle, poll_interval=0.05)
    assert "prompt: Field required" in str(raised.value) and raised.value.permanent
    assert raised.value.request_id == handle.request_id
    assert len(queue_posts(emulator)) == 1


def test_polls_are_retried_on_429_and_transient_errors(emulator, client):
    emulator.set_queue_timing(queue_wait=0, run_time=0)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    emulator.inject_fault(status=429, error_type="rate_limited", times=1, model_id="fal-ai/flux/requests")
    emulator.inject_fault(status=503, times=1, model_id="fal-ai/flux/requests")
    emulator.inject_fault(status=502, html=True, times=1, model_id="fal-ai/flux/requests")
    assert client.status(handle).completed
    statuses = [r.status for r in recorded(emulator, 4, "GET")]
    assert statuses == [429, 503, 502, 200]
    emulator.inject_fault(status=503, drop_connection=True, times=1, model_id="fal-ai/flux/requests")
    assert client.result(handle).output["prompt"] == "x"  # a lost GET answer is safe to ask again


def test_submit_follows_the_synchronous_retry_rules(emulator, client):
    emulator.set_queue_timing(queue_wait=PENDING, run_time=0)
    emulator.inject_fault(status=503, times=2, model_id="fal-ai/flux/dev")
    client.submit("fal-ai/flux/dev", {"prompt": "x"})
    assert [r.status for r in queue_posts(emulator, 3)] == [503, 503, 200]

    emulator.reset()
    emulator.inject_fault(status=503, drop_connection=True, times=1, model_id="fal-ai/flux/dev")
    with pytest.raises(FalRequestLostError):
        client.submit("fal-ai/flux/dev", {"prompt": "x"})
    assert len(queue_posts(emulator)) == 1  # a submit whose answer was lost may have queued: never resent

    emulator.reset()
    emulator.inject_fault(status=429, error_type="rate_limited", retryable=False, times=1, model_id="fal-ai/flux/dev")
    with pytest.raises(FalRateLimitError):
        client.submit("fal-ai/flux/dev", {"prompt": "x"})  # X-Fal-Retryable: false is obeyed on a submit too
    assert len(queue_posts(emulator)) == 1


def test_rebuilt_handle_uses_the_app_id_and_reaches_the_request(emulator, client):
    emulator.set_queue_timing(queue_wait=0, run_time=0)
    submitted = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    rebuilt = client.queue_handle("fal-ai/flux/dev", submitted.request_id)
    assert rebuilt == submitted
    assert "/dev/" not in rebuilt.status_url
    assert client.result(rebuilt).output["prompt"] == "x"
    with pytest.raises(FalConfigurationError, match="request_id"):
        client.queue_handle("fal-ai/flux/dev", "../../etc")


def test_urls_off_the_queue_host_are_never_used(emulator, client, caplog):
    emulator.set_queue_timing(queue_wait=0, run_time=0)
    real = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    foreign = {
        "request_id": real.request_id,
        "model_id": "fal-ai/flux/dev",
        "status_url": f"https://attacker.example/fal-ai/flux/requests/{real.request_id}/status",
        "response_url": f"{emulator.url}/other/fal-ai/flux/requests/{real.request_id}",
        "cancel_url": f"{emulator.queue_url}/fal-ai/flux/requests/{real.request_id}/cancel?key=1",
    }
    with caplog.at_level(logging.WARNING):
        assert client.status(foreign).completed
        assert client.result(foreign).output["prompt"] == "x"
    assert "attacker.example" in caplog.text
    paths = {r.path for r in recorded(emulator, 2, "GET")}
    assert paths == {real.status_url[len(emulator.url) :], real.response_url[len(emulator.url) :]}


def test_urls_of_a_foreign_host_are_warned_about_once_then_logged_at_debug(caplog):
    # a relay that rewrites hosts sends three foreign URLs per request: 10,000 submits must not
    # log 30,000 warnings
    relay = f"https://relay-{time.monotonic_ns()}.example"
    with caplog.at_level(logging.DEBUG, logger="airflow_provider_fal.core.queue"):
        for number in range(5):
            request_id = f"req-{number}"
            handle = QueueHandle.from_submit(
                {
                    "request_id": request_id,
                    "status_url": f"{relay}/fal-ai/flux/requests/{request_id}/status",
                    "response_url": f"{relay}/fal-ai/flux/requests/{request_id}",
                    "cancel_url": f"{relay}/fal-ai/flux/requests/{request_id}/cancel",
                },
                queue_url="https://queue.fal.run",
                model_id="fal-ai/flux/dev",
            )
            assert handle.status_url == f"https://queue.fal.run/fal-ai/flux/requests/{request_id}/status"
    about_relay = [record for record in caplog.records if relay in record.getMessage()]
    assert [record.levelno for record in about_relay] == [logging.WARNING] + [logging.DEBUG] * 14
    assert "Further URLs from " + relay in about_relay[0].getMessage()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://queue.fal.run/fal-ai/flux/requests/1/status", True),
        ("https://QUEUE.fal.run:443/fal-ai/flux/requests/1", True),
        ("http://queue.fal.run/fal-ai/flux/requests/1", False),
        ("https://queue.fal.run.evil.com/fal-ai/flux/requests/1", False),
        ("https://user:pw@queue.fal.run/fal-ai/flux/requests/1", False),
        ("https://queue.fal.run/fal-ai/flux/requests/../../x", False),
        ("https://queue.fal.run/fal-ai/flux/requests/1#x", False),
        ("https://queue.fal.run:8443/fal-ai/flux/requests/1", False),
        ("https://queue.fal.run", False),
        (None, False),
    ],
)
def test_is_under(url, expected):
    assert is_under(url, "https://queue.fal.run") is expected


def test_results_expire_after_fals_retention():
    with FalEmulator(api_key=API_KEY, result_retention=0.3, large_result_retention=0.3) as emu:
        fal = FalClient(API_KEY, queue_url=emu.queue_url, retry_policy=FAST_RETRIES)
        handle = fal.submit("fal-ai/flux/dev", {"prompt": "x"})
        assert fal.result(handle).output["prompt"] == "x"
        emu.wait(0.5)
        with pytest.raises(FalResultExpiredError) as raised:
            fal.result(handle)
        # Not permanent: the task's retry submits again, and the message says why (and that it was billed).
        assert raised.value.status_code == 404 and not raised.value.permanent
        assert raised.value.request_id == handle.request_id
        assert "most likely completed and was billed" in str(raised.value)


def test_api_key_never_appears_in_errors_or_reprs(emulator, client):
    emulator.set_queue_timing(queue_wait=PENDING, run_time=0)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    wrong = FalClient("wrong-key-123", queue_url=emulator.queue_url, retry_policy=FAST_RETRIES)
    with pytest.raises(FalAuthError) as raised:
        wrong.status(handle)
    for text in (str(raised.value), repr(raised.value), repr(handle), repr(client), repr(client.status(handle))):
        assert API_KEY not in text and "wrong-key-123" not in text
    with pytest.raises(FalTimeoutError) as timed_out:
        client.wait(handle, timeout=0.05, poll_interval=0.05)
    assert API_KEY not in str(timed_out.value)


def test_queue_calls_are_safe_from_many_threads(emulator, client):
    emulator.set_queue_timing(queue_wait=0, run_time=0.1)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            handle = client.submit("fal-ai/flux/dev", {"prompt": f"p{index}"})
            results[index] = client.wait(handle, poll_interval=0.05).output["prompt"]
        except BaseException as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert results == {i: f"p{i}" for i in range(12)}
    assert len(queue_posts(emulator, 12)) == 12


def test_progress_logs_each_runner_line_and_queue_move_once(emulator, client):
    emulator.set_queue_timing(queue_wait=PENDING, run_time=0)
    blocker = client.submit("fal-ai/flux/dev", {"prompt": "blocker"})
    emulator.set_queue_timing(queue_wait=0, run_time=0)
    done = client.submit("fal-ai/flux/dev", {"prompt": "done"})
    progress = QueueProgress()
    queued_lines = progress.updates(client.status(blocker)) + progress.updates(client.status(blocker))
    assert [message for _, message in queued_lines] == [f"fal request {blocker.request_id} is queued at position 0"]

    progress = QueueProgress()
    lines = []
    for _ in range(3):  # every poll returns all logs so far
        lines += [message for _, message in progress.updates(client.status(done))]
    runner = [line for line in lines if line.startswith("fal runner:")]
    assert [line.rsplit(" ", 2)[-2:] for line in runner[1:5]] == [["Step", f"{i}/4"] for i in range(1, 5)]
    assert len(runner) == 6 and len(set(runner)) == 6
    assert lines[-1] == f"fal request {done.request_id} is COMPLETED"


def test_errors_survive_a_round_trip_through_json(emulator, client):
    emulator.set_queue_timing(queue_wait=0, run_time=0)
    handle = client.submit("fal-ai/flux/dev", {"prompt": 5})
    with pytest.raises(FalValidationError) as raised:
        client.wait(handle, poll_interval=0.05)
    copy = FalError.from_dict(raised.value.to_dict())
    assert type(copy) is FalValidationError and copy.permanent and copy.errors == raised.value.errors
    assert str(copy) == str(raised.value)
    assert type(FalError.from_dict({"error": "NotAFalClass", "message": "m"})) is FalError


def test_hook_queue_methods_use_the_airflow_connection(emulator, fal_connection, caplog, capsys):
    from airflow_provider_fal.hooks.fal import FalHook

    emulator.set_queue_timing(queue_wait=0, run_time=0.3)
    hook = FalHook(retry_policy=FAST_RETRIES)
    handle = hook.submit("fal-ai/flux/dev", {"prompt": "via hook"}, priority="normal")
    assert handle.status_url.startswith(emulator.queue_url + "/")
    with caplog.at_level(logging.INFO):
        output = hook.wait(handle, poll_interval=0.05)
    assert output["prompt"] == "via hook"
    assert hook.client.result(handle.to_dict()).output == output
    assert hook.client.status(handle).completed
    assert hook.cancel(handle) == ALREADY_COMPLETED
    stdout = capsys.readouterr().out  # Airflow 3.3 logs through structlog to stdout, 3.0 to logging
    for logged in (caplog.text, stdout):
        assert API_KEY not in logged
    runner_lines = max(
        ([line for line in logged.splitlines() if "fal runner:" in line] for logged in (caplog.text, stdout)), key=len
    )
    assert len(runner_lines) == len(set(runner_lines)) == 6
    again = hook.submit("fal-ai/flux/dev", {"prompt": "again"})
    assert hook.wait(again, poll_interval=0.05)["prompt"] == "again"


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_a_status_poll_that_fails_once_is_polled_again(emulator, client, status):
    """A poll changes nothing on fal: a 500 (with a request id) on it is asked again, not the end."""
    emulator.set_queue_timing(queue_wait=0, run_time=0.3)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "polled"})
    emulator.inject_fault(status=status, error_type="internal_error" if status == 500 else None, times=1)
    assert client.wait(handle, poll_interval=0.05).output["prompt"] == "polled"
    polls = [r.status for r in recorded(emulator, 3, "GET") if r.path.endswith("/status")]
    assert polls[0] == status and polls[-1] == 200
    assert len(queue_posts(emulator)) == 1


def test_a_404_that_is_the_models_answer_stays_what_it_is(emulator, client):
    emulator.set_queue_timing(queue_wait=0, run_time=0)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    emulator.inject_fault(status=404, error_type=None, detail="image_url: not found", times=1, model_id="fal-ai/flux")
    with pytest.raises(FalClientError) as raised:
        client.result(handle)  # the status still answers: the request is known, the 404 is the model's
    assert type(raised.value) is FalClientError and "image_url: not found" in str(raised.value)


def test_a_running_request_that_ignores_the_cancel_is_delivered_not_dropped(emulator, client, caplog):
    """fal only signals a running request; one whose app does not stop completes and is billed."""
    emulator.set_cancel_honoured(False)
    emulator.set_queue_timing(queue_wait=0, run_time=1.0)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "finished anyway"})
    with caplog.at_level(logging.WARNING):
        response = client.wait(handle, timeout=0.3, poll_interval=0.05)
    assert response.output["prompt"] == "finished anyway"
    assert [r.status for r in recorded(emulator, 1, "PUT")] == [202]  # CANCELLATION_REQUESTED
    assert any("completed after its deadline although a cancel was requested" in r.message for r in caplog.records)


def test_a_queued_request_is_dropped_by_a_cancel_even_when_running_ones_ignore_it(emulator, client):
    emulator.set_cancel_honoured(False)
    emulator.set_queue_timing(queue_wait=PENDING, run_time=0)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "never ran"})
    with pytest.raises(FalTimeoutError) as raised:
        client.wait(handle, timeout=0.2, poll_interval=0.05)
    assert "the request was cancelled" in str(raised.value)
    assert client.status(handle).error_type == "client_cancelled"


def test_a_timeout_whose_cancel_answers_already_completed_returns_the_result(emulator, client):
    emulator.complete_on_cancel(True)
    emulator.set_queue_timing(queue_wait=0, run_time=60)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "just finished"})
    assert client.wait(handle, timeout=0.2, poll_interval=0.05).output["prompt"] == "just finished"
    assert [r.status for r in recorded(emulator, 1, "PUT")] == [400]  # ALREADY_COMPLETED
