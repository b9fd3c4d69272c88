"""The batch engine (``airflow_provider_fal.batch``): real HTTP against the emulator, no Airflow.

Concurrency is checked from the emulator's own request records (when each request started
and finished on the server), never from wall-clock durations.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from airflow_provider_fal.batch.inputs import prepare_inputs
from airflow_provider_fal.batch.ledger import LOGGED_FAILURES
from airflow_provider_fal.batch.results import FailurePolicy, failures, outputs
from airflow_provider_fal.batch.runner import FalBatchRunner, coerce_max_concurrency
from airflow_provider_fal.batch.scheduling import MAX_POLL_DELAY, next_poll_delay
from airflow_provider_fal.core.client import FalClient, prepare_request
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.exceptions import FalConfigurationError
from tests.conftest import API_KEY

FAST_RETRIES = RetryPolicy(max_attempts=8, initial_backoff=0.02, max_backoff=0.2, max_total_wait=30)
ECHO = prepare_request("emulator/echo")


def make_client(emu, *, pool: int = 8, api_key: str = API_KEY, retry_policy: RetryPolicy = FAST_RETRIES) -> FalClient:
    return FalClient(api_key, run_url=emu.url, queue_url=emu.queue_url, pool_maxsize=pool, retry_policy=retry_policy)


def arguments(items):
    """The model inputs of prepared requests, as plain dicts."""
    return [dict(item.arguments) for item in items]


def echo(inputs):
    """``inputs`` prepared for the echo model."""
    return prepare_inputs(ECHO, inputs)


def sdxl(inputs):
    return prepare_inputs(prepare_request("fal-ai/fast-sdxl"), inputs)


def posts(emu, path: str = "/emulator/echo"):
    return [r for r in emu.requests if r.method == "POST" and r.path == path]


# --------------------------------------------------------------------------- inputs and settings


def test_inputs_accept_lists_json_text_and_python_literals():
    assert arguments(echo([{"prompt": "a"}, '{"prompt": "b"}'])) == [{"prompt": "a"}, {"prompt": "b"}]
    assert arguments(echo('[{"prompt": "a"}]')) == [{"prompt": "a"}]
    assert arguments(echo("[{'prompt': 'a'}]")) == [{"prompt": "a"}]  # how Jinja renders a list of dicts
    assert arguments(echo({"n": n} for n in range(3))) == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert echo([]) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "inputs is required"),
        ({"prompt": "a"}, "must be a list of model inputs"),
        (42, "must be a list of model inputs"),
        ("prompt: a cat", "neither a JSON list nor a Python list literal"),
    ],
)
def test_inputs_that_are_not_a_list_are_rejected_with_the_fix(value, expected):
    with pytest.raises(FalConfigurationError, match=expected):
        echo(value)


def test_every_bad_input_is_named_by_index_before_anything_is_sent():
    items = [{"prompt": "ok"}, "not json", 7, {"x": float("nan")}, *(["bad"] * 5)]
    with pytest.raises(FalConfigurationError) as caught:
        echo(items)
    message = str(caught.value)
    assert "8 of the 9 inputs are invalid; nothing was sent" in message
    assert "inputs[1] is a string that is not JSON" in message
    assert "inputs[2] must be a JSON object" in message
    assert "inputs[3] is not JSON-serialisable" in message
    assert "... and 3 more" in message


@pytest.mark.parametrize("good", [1, 8, "16", 256])
def test_max_concurrency_accepts_whole_numbers_in_range(good):
    assert coerce_max_concurrency(good) == int(good)


@pytest.mark.parametrize("bad", [0, 257, -1, True, 1.5, "eight", None])
def test_max_concurrency_rejects_anything_else(bad):
    with pytest.raises(FalConfigurationError, match="max_concurrency must be a whole number from 1 to 256"):
        coerce_max_concurrency(bad)


def test_failure_policy_limits():
    strict = FailurePolicy()
    assert strict.exceeded(0, 10) is None
    assert strict.exceeded(1, 10) == "1 of 10 inputs failed, more than max_failures=0"
    assert FailurePolicy(max_failures=2).exceeded(2, 10) is None
    assert FailurePolicy(max_failures=2).exceeded(3, 10) is not None
    rate = FailurePolicy(max_failure_rate=0.1)
    assert rate.exceeded(10, 100) is None  # a rate alone does not also impose max_failures=0
    assert "11.0%" in rate.exceeded(11, 100)
    both = FailurePolicy(max_failures=5, max_failure_rate=0.5)
    assert both.exceeded(6, 100) is not None and both.exceeded(3, 4) is not None and both.exceeded(2, 4) is None
    assert FailurePolicy(max_failure_rate=1).exceeded(100, 100) is None
    assert FailurePolicy(max_failure_rate=1).describe() == "never fail the batch; failed inputs are only reported"
    assert FailurePolicy(max_failures=3, fail_fast=True).describe() == "stop at once on more than 3 failed inputs"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_failures": -1}, "max_failures"),
        ({"max_failures": 1.5}, "max_failures"),
        ({"max_failures": True}, "max_failures"),
        ({"max_failure_rate": 1.5}, "max_failure_rate"),
        ({"max_failure_rate": float("nan")}, "max_failure_rate"),
        ({"max_failure_rate": "5%"}, "max_failure_rate"),
        ({"fail_fast": "yes"}, "fail_fast"),
    ],
)
def test_failure_policy_rejects_bad_settings_naming_the_field(kwargs, field):
    with pytest.raises(FalConfigurationError, match=field):
        FailurePolicy(**kwargs)


def test_a_pool_smaller_than_the_concurrency_is_refused(emulator):
    with pytest.raises(FalConfigurationError, match="pool_maxsize=16"):
        FalBatchRunner(make_client(emulator, pool=4), max_concurrency=16)


# --------------------------------------------------------------------------- scheduling


def test_poll_delay_backs_off_with_age_up_to_a_cap():
    assert next_poll_delay(2.0, 1.0) == 2.0
    assert next_poll_delay(2.0, 100.0) == 10.0
    assert next_poll_delay(2.0, 3600.0) == MAX_POLL_DELAY
    assert next_poll_delay(60.0, 3600.0) == 60.0


# --------------------------------------------------------------------------- synchronous batches


def test_results_come_back_in_input_order_one_request_each_with_bounded_concurrency(emulator):
    emulator.set_latency(0.05)
    inputs = [{"n": n} for n in range(60)]
    result = FalBatchRunner(make_client(emulator, pool=5), max_concurrency=5).run(echo(inputs))

    assert [entry["index"] for entry in result.results] == list(range(60))
    assert outputs(result.results) == inputs
    assert failures(result.results) == []
    assert result.succeeded == 60 and result.failed == 0 and result.stopped is None
    sent = posts(emulator)
    assert len(sent) == 60 and sorted(r.json["n"] for r in sent) == list(range(60))
    assert result.peak_in_flight == 5  # counted by the batch itself, as each request starts
    assert len({entry["request_id"] for entry in result.results}) == 60


def test_headers_and_start_timeout_are_sent_with_every_input(emulator):
    request = prepare_request(
        "emulator/echo", start_timeout=30, object_lifecycle=600, hint="h1", headers={"X-Fal-Store-IO": "0"}
    )
    FalBatchRunner(make_client(emulator), max_concurrency=4).run(prepare_inputs(request, [{"n": n} for n in range(6)]))
    for record in posts(emulator):
        headers = {k.lower(): v for k, v in record.headers.items()}
        assert headers["x-fal-request-timeout"] == "30"
        assert json.loads(headers["x-fal-object-lifecycle-preference"]) == {"expiration_duration_seconds": 600}
        assert headers["x-fal-runner-hint"] == "h1" and headers["x-fal-store-io"] == "0"
        assert "authorization" not in headers  # the emulator never records the key


def test_failed_inputs_get_structured_errors_and_transient_ones_are_retried(emulator):
    emulator.inject_fault(503, "runner_disconnected", times=3, model_id="fal-ai/fast-sdxl")
    inputs = [{"prompt": "" if n in (1, 4) else f"p{n}", "image_size": "square"} for n in range(6)]
    runner = FalBatchRunner(make_client(emulator), max_concurrency=2)
    result = runner.run(sdxl(inputs))

    assert [entry["ok"] for entry in result.results] == [True, False, True, True, False, True]
    assert [entry["output"]["prompt"] for entry in result.results if entry["ok"]] == ["p0", "p2", "p3", "p5"]
    error = result.results[1]["error"]
    assert set(error) == {
        "error",
        "message",
        "status_code",
        "error_type",
        "request_id",
        "detail",
        "permanent",
        "errors",
    }
    assert error["error"] == "FalValidationError" and error["status_code"] == 422 and error["permanent"] is True
    assert error["errors"] == error["detail"]  # the same shape as a trigger event's error (FalError.to_dict)
    assert error["detail"][0]["loc"] == ["body", "prompt"] and "prompt:" in error["message"]
    # Six inputs, three 503s retried; the 422s are not retried.
    assert len(posts(emulator, "/fal-ai/fast-sdxl")) == 6 + 3
    assert result.retried == 3 and result.transient_failures == 0
    assert result.errors_by_type == {"FalValidationError": 2}
    summary = result.summary()
    assert summary["succeeded"] == 4 and summary["failed"] == 2 and summary["not_run"] == 0
    assert runner.policy.exceeded(result.failed, result.total) is not None


def test_fail_fast_stops_sending_and_reports_unsent_inputs(emulator):
    inputs = [{"prompt": "" if n == 2 else f"p{n}"} for n in range(10)]
    runner = FalBatchRunner(
        make_client(emulator, pool=1), max_concurrency=1, failure_policy=FailurePolicy(fail_fast=True)
    )
    result = runner.run(sdxl(inputs))

    assert len(posts(emulator, "/fal-ai/fast-sdxl")) == 3  # inputs 0, 1 and the failing 2
    assert [entry["ok"] for entry in result.results[:3]] == [True, True, False]
    assert all(entry["error"]["error"] == "FalNotSentError" for entry in result.results[3:])
    assert result.not_run == 7 and result.failed == 8 and "fail_fast" in result.stopped


def test_fail_fast_with_a_rate_tolerates_failures_up_to_the_rate(emulator):
    inputs = [{"prompt": "" if n in (0, 5) else f"p{n}"} for n in range(20)]
    policy = FailurePolicy(max_failure_rate=0.1, fail_fast=True)  # 2 of 20 is allowed
    result = FalBatchRunner(make_client(emulator), max_concurrency=3, failure_policy=policy).run(sdxl(inputs))
    assert result.stopped is None and result.not_run == 0 and result.succeeded == 18


def test_a_wrong_key_stops_the_batch_and_never_leaks(emulator, caplog):
    caplog.set_level(logging.DEBUG)
    wrong_key = "wrong-key-0b8c1f5e"
    runner = FalBatchRunner(make_client(emulator, api_key=wrong_key), max_concurrency=2)
    result = runner.run(echo([{"n": n} for n in range(40)]))

    sent = len(posts(emulator))
    assert 1 <= sent <= 4  # the inputs already in flight when the first 401 came back
    assert result.succeeded == 0 and result.not_run == 40 - sent
    assert all(entry["error"]["error"] in ("FalAuthError", "FalNotSentError") for entry in result.results)
    assert "HTTP 401" in result.stopped
    text = json.dumps(result.results) + json.dumps(result.summary()) + caplog.text + repr(runner.client)
    assert wrong_key not in text and API_KEY not in text


def test_a_locked_account_stops_the_batch_with_fals_message(emulator):
    emulator.lock_account("Exhausted balance. Top up your balance at fal.ai/dashboard/billing.")
    result = FalBatchRunner(make_client(emulator, pool=1), max_concurrency=1).run(echo([{"n": n} for n in range(5)]))
    assert len(posts(emulator)) == 1 and result.not_run == 4
    error = result.results[0]["error"]
    assert error["error"] == "FalLockedAccountError"
    assert error["message"].startswith("User is locked. Reason: Exhausted balance.")


def test_429s_lower_the_concurrency_and_it_recovers_when_they_stop(emulator, caplog):
    caplog.set_level(logging.INFO, logger="airflow_provider_fal")
    emulator.set_latency(0.03)
    emulator.set_concurrency_limit(3)

    def lift_the_limit_later() -> None:  # after 100 inputs ran under the limit
        while sum(1 for r in emulator.requests if r.status == 200) < 100:
            time.sleep(0.01)
        emulator.set_concurrency_limit(None)
        lifted.set()

    lifted = threading.Event()
    watcher = threading.Thread(target=lift_the_limit_later, daemon=True)
    watcher.start()
    client = make_client(
        emulator, pool=12, retry_policy=RetryPolicy(max_attempts=20, initial_backoff=0.02, max_backoff=0.1)
    )
    result = FalBatchRunner(client, max_concurrency=12).run(echo([{"n": n} for n in range(400)]))
    watcher.join(5)

    assert result.succeeded == 400  # nothing lost to the 429s
    statuses = [r.status for r in posts(emulator)]
    assert statuses.count(200) == 400 and statuses.count(429) == result.rate_limited >= 5
    assert result.lowest_limit <= 3  # it came down to the account's limit (or below)
    assert result.final_limit == 12  # and went back up once the 429s stopped
    assert lifted.is_set()
    assert "retrying in" not in caplog.text  # per-attempt retry lines stay out of the log
    assert "rate-limited (429) answers" in caplog.text


def test_a_burst_past_the_account_limit_is_retried_as_slots_free_not_after_a_backoff(emulator):
    emulator.set_latency(0.2)
    emulator.set_concurrency_limit(3)
    # Retries may wait 0 s in all: one that waited for a backoff would stop, and its input fail.
    no_waiting = RetryPolicy(max_attempts=20, initial_backoff=30, max_backoff=30, max_total_wait=0)
    client = make_client(emulator, pool=12, retry_policy=no_waiting)
    result = FalBatchRunner(client, max_concurrency=12).run(echo([{"n": n} for n in range(30)]))

    assert result.succeeded == 30
    statuses = [r.status for r in posts(emulator)]
    assert statuses.count(200) == 30 and statuses.count(429) == result.rate_limited >= 1
    assert result.lowest_limit <= 3


def test_queue_submits_refused_with_429_still_back_off(emulator):
    emulator.set_latency(0.05)
    emulator.inject_fault(429, "rate_limited", times=1, model_id="emulator/echo")  # e.g. fal_max_queue_length
    no_waiting = RetryPolicy(max_attempts=20, initial_backoff=30, max_backoff=30, max_total_wait=0)
    runner = FalBatchRunner(make_client(emulator, pool=4, retry_policy=no_waiting), max_concurrency=4, use_queue=True)
    result = runner.run(echo([{"n": n} for n in range(4)]))

    assert result.rate_limited == 1 and result.succeeded == 3  # the refused submit was not sent again at once


def test_progress_is_logged_at_an_interval_not_per_request(emulator, caplog):
    caplog.set_level(logging.INFO, logger="airflow_provider_fal")
    emulator.set_latency(0.05)
    inputs = [{"prompt": "" if n % 4 == 0 else f"p{n}"} for n in range(100)]
    FalBatchRunner(make_client(emulator, pool=4), max_concurrency=4, progress_interval=0.2).run(sdxl(inputs))
    lines = [r.getMessage() for r in caplog.records if r.name == "airflow_provider_fal.batch.runner"]
    progress = [line for line in lines if line.startswith("fal batch fal-ai/fast-sdxl: ") and " done " in line]
    # 75 runs of 50 ms at 4 in flight take at least 0.9 s: at least one line before the end.
    assert any("ETA" in line and "in flight" in line for line in progress)
    assert progress[-1].startswith("fal batch fal-ai/fast-sdxl: 100/100 done (100%), 25 failed")
    assert len(lines) < 60  # not a line per request
    failure_lines = [line for line in lines if "failed: fal rejected the model input" in line]
    assert len(failure_lines) == LOGGED_FAILURES
    assert "failures by kind: FalValidationError x25" in lines[-1]


def test_cancel_sends_nothing_more_and_accounts_for_every_input(emulator):
    emulator.set_latency(0.05)
    runner = FalBatchRunner(make_client(emulator, pool=2), max_concurrency=2)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=runner.run(echo([{"n": n} for n in range(200)]))))
    thread.start()
    while len(posts(emulator)) < 10:
        time.sleep(0.01)
    runner.cancel("stopped by the test")
    thread.join(30)
    result = outcome["result"]
    assert result.stopped == "stopped by the test"
    assert result.succeeded == len(posts(emulator)) and result.not_run == 200 - result.succeeded > 0
    assert all(entry["ok"] or entry["error"]["error"] == "FalNotSentError" for entry in result.results)


def test_no_inputs_send_nothing(emulator):
    result = FalBatchRunner(make_client(emulator)).run(echo([]))
    assert result.results == [] and emulator.requests == []


# --------------------------------------------------------------------------- queue mode


def queue_records(emu):
    submits = [r for r in emu.requests if r.method == "POST" and r.path.startswith("/queue/")]
    polls = [r for r in emu.requests if r.method == "GET" and r.path.endswith("/status")]
    results = [
        r for r in emu.requests if r.method == "GET" and "/requests/" in r.path and not r.path.endswith("/status")
    ]
    cancels = [r for r in emu.requests if r.method == "PUT"]
    return submits, polls, results, cancels


def test_queue_mode_submits_all_polls_all_and_holds_no_connection_per_job(emulator):
    emulator.set_queue_timing(queue_wait=0.1, run_time=1.0)
    emulator.fail_queued("emulator/echo", error="Runner crashed", times=1)
    runner = FalBatchRunner(make_client(emulator, pool=2), max_concurrency=2, use_queue=True, poll_interval=0.1)
    result = runner.run(echo([{"n": n} for n in range(12)]))

    submits, polls, results, _ = queue_records(emulator)
    assert len(submits) == 12 and posts(emulator) == []  # nothing went to the synchronous endpoint
    assert sorted(r.json["n"] for r in submits) == list(range(12))
    failed = [entry for entry in result.results if not entry["ok"]]
    assert len(failed) == 1 and failed[0]["error"]["error"] == "FalServerError"  # the result read, as a sync 500
    assert failed[0]["error"]["error_type"] == "runner_server_error"
    assert [entry["output"] for entry in result.results if entry["ok"]] == [
        {"n": n} for n in range(12) if n != failed[0]["index"]
    ]
    assert len(results) == 12 and polls  # one result read per job: the failed one's carries its 500
    # Never more than 2 HTTP calls at once, while all 12 jobs were queued on fal together.
    assert result.peak_in_flight == 2
    assert max(r.finished for r in submits) < min(r.started for r in results)


def test_queue_mode_reports_a_rejected_submit(emulator):
    inputs = sdxl([{"prompt": "ok"}, {"prompt": ""}])
    runner = FalBatchRunner(make_client(emulator), max_concurrency=2, use_queue=True, poll_interval=0.05)
    result = runner.run(inputs)
    assert result.results[0]["ok"] and result.results[0]["output"]["prompt"] == "ok"
    assert result.results[1]["error"]["error"] == "FalValidationError"


def test_queue_mode_poll_timeout_cancels_the_job_on_fal(emulator):
    emulator.set_queue_timing(run_time=30.0)
    runner = FalBatchRunner(
        make_client(emulator), max_concurrency=2, use_queue=True, poll_interval=0.05, poll_timeout=0.3
    )
    result = runner.run(echo([{"n": n} for n in range(3)]))
    _, _, _, cancels = queue_records(emulator)
    assert len(cancels) == 3
    assert all(entry["error"]["error"] == "FalTimeoutError" for entry in result.results)
    assert "poll_timeout of 0.3 s" in result.results[0]["error"]["message"]


def test_queue_mode_poll_timeout_delivers_a_job_that_completed_as_it_was_cancelled(emulator):
    """A cancel answered ALREADY_COMPLETED: the job finished (and is billed), so its result is fetched."""
    emulator.set_queue_timing(run_time=30.0)
    emulator.complete_on_cancel(model_id="emulator/echo")
    runner = FalBatchRunner(
        make_client(emulator), max_concurrency=2, use_queue=True, poll_interval=0.05, poll_timeout=0.3
    )
    result = runner.run(echo([{"n": n} for n in range(3)]))

    _, polls, results, cancels = queue_records(emulator)
    assert len(cancels) == 3 and all(r.status == 400 for r in cancels)  # ALREADY_COMPLETED
    for cancel in cancels:  # the last status before each cancel still said IN_PROGRESS (202)
        request_id = cancel.path.split("/")[-2]
        before = [r for r in polls if request_id in r.path and r.started < cancel.started]
        assert before and before[-1].status == 202
    assert [entry["output"] for entry in result.results] == [{"n": n} for n in range(3)]
    assert all(entry["ok"] for entry in result.results) and len(results) == 3
    assert result.summary()["failed"] == 0 and result.errors_by_type == {}


def test_each_input_is_encoded_once_before_the_batch_runs(emulator, monkeypatch):
    from airflow_provider_fal.core import request as request_module

    calls = []
    real = request_module.encode_arguments
    monkeypatch.setattr(request_module, "encode_arguments", lambda *a: calls.append(a) or real(*a))
    items = echo([{"n": n} for n in range(5)])
    assert len(calls) == 5
    for use_queue in (False, True):
        result = FalBatchRunner(make_client(emulator), use_queue=use_queue, poll_interval=0.05).run(items)
        assert result.succeeded == 5
    assert len(calls) == 5  # sent as prepared, never encoded again
    sent = [r for r in emulator.requests if r.method == "POST"]
    assert len(sent) == 10 and sorted(r.json["n"] for r in sent) == sorted(list(range(5)) * 2)


def test_killing_a_queue_batch_cancels_its_jobs_on_fal(emulator):
    emulator.set_queue_timing(run_time=30.0)
    runner = FalBatchRunner(make_client(emulator, pool=3), max_concurrency=3, use_queue=True, poll_interval=0.05)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=runner.run(echo([{"n": n} for n in range(8)]))))
    thread.start()
    while len(queue_records(emulator)[1]) < 8:  # every job submitted and polled at least once
        time.sleep(0.01)
    runner.cancel("the task was killed", cancel_submitted=True)
    thread.join(30)
    submits, _, _, cancels = queue_records(emulator)
    assert len(submits) == 8 and len(cancels) == 8
    cancelled_ids = {r.path.split("/")[-2] for r in cancels}
    result = outcome["result"]
    assert {entry["request_id"] for entry in result.results} == cancelled_ids
    assert all(entry["error"]["error_type"] == "client_cancelled" for entry in result.results)
