"""FalQueueTrigger (run in a real asyncio loop, over real HTTP to the emulator) and the
operator's queue options that need no full DAG run."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import time

import pytest

from airflow_provider_fal.core import async_client
from airflow_provider_fal.core.client import FalClient
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.emulator import FalEmulator
from airflow_provider_fal.exceptions import (
    FalAuthError,
    FalConfigurationError,
    FalError,
    FalServerError,
    FalTimeoutError,
    FalValidationError,
)
from airflow_provider_fal.triggers import fal as trigger_module
from airflow_provider_fal.triggers.fal import FalQueueTrigger
from tests.conftest import API_KEY, REPO, connection_json
from tests.test_queue_client import recorded

FAST = {"max_attempts": 3, "initial_backoff": 0.01, "max_backoff": 0.05, "max_total_wait": 1.0}


@pytest.fixture
def client(emulator):
    fal = FalClient(API_KEY, queue_url=emulator.queue_url, retry_policy=FAST)
    yield fal
    fal.close()


def trigger_for(handle, **kwargs) -> FalQueueTrigger:
    return FalQueueTrigger(
        request=handle.to_dict(), poll_interval=kwargs.pop("poll_interval", 0.05), retry_policy=FAST, **kwargs
    )


def first_event(trigger: FalQueueTrigger) -> dict:
    async def main():
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(main())


def gets(emulator) -> list:
    return [r for r in emulator.requests if r.method == "GET"]


def test_serialize_returns_exactly_the_constructor_kwargs(emulator, client):
    emulator.set_queue_timing(queue_wait=60, run_time=0)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    kwargs = {
        "request": handle.to_dict(),
        "fal_conn_id": "fal_other",
        "poll_interval": 3.0,
        "deadline": 1_900_000_000.0,
        "deadline_reason": "poll_timeout of 60 s",
        "logs": False,
        "retry_policy": RetryPolicy(max_attempts=7).to_dict(),
        "timeout": 12.0,
    }
    trigger = FalQueueTrigger(**kwargs)
    path, serialized = trigger.serialize()
    assert (path, serialized) == ("airflow_provider_fal.triggers.fal.FalQueueTrigger", kwargs)
    assert set(serialized) == set(inspect.signature(FalQueueTrigger.__init__).parameters) - {"self"}
    assert FalQueueTrigger(**serialized).serialize() == (path, serialized)
    json.dumps(serialized)  # stored by Airflow as JSON
    assert API_KEY not in repr(serialized) and API_KEY not in repr(trigger)


def test_trigger_fetches_the_result_as_soon_as_fal_says_completed(emulator, fal_connection, client):
    emulator.set_queue_timing(queue_wait=0.2, run_time=0.4)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "a heron"})
    event = first_event(trigger_for(handle))
    result_path = f"/queue/fal-ai/flux/requests/{handle.request_id}"
    deadline = time.monotonic() + 10
    while not any(r.path == result_path for r in gets(emulator)) and time.monotonic() < deadline:
        time.sleep(0.01)  # the emulator records a request just after answering it
    trigger_gets = gets(emulator)
    assert event["status"] == "success" and event["request_id"] == handle.request_id
    assert event["output"] == client.result(handle).output
    assert event["request"] == handle.to_dict()

    status_path = "/queue" + handle.status_url.split("/queue", 1)[1]
    assert [r.status for r in trigger_gets if r.path == status_path][-1] == 200  # polled until COMPLETED
    assert [r.status for r in trigger_gets].count(200) == 2  # one COMPLETED poll, one result fetch ...
    assert trigger_gets[-2].path == status_path and trigger_gets[-2].status == 200
    assert trigger_gets[-1].path.endswith(f"/requests/{handle.request_id}")  # ... right after it
    assert emulator.count("PUT") == 0 and emulator.count("POST") == 1


def test_a_restarted_trigger_polls_the_same_request_and_never_submits(emulator, fal_connection, client):
    # Long enough that the first copy is still polling when it is stopped, even on a loaded
    # machine (with 1 s, a slow start could see COMPLETED and finish before the cancel).
    emulator.set_queue_timing(queue_wait=0, run_time=3.0)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    first = trigger_for(handle)

    async def restart() -> dict:
        task = asyncio.create_task(first_event_async(first))
        while len(gets(emulator)) < 2:  # the first copy is polling
            await asyncio.sleep(0.02)
        assert not task.done(), "the first copy finished before it could be stopped"
        task.cancel()  # what a triggerer shutdown does
        with pytest.raises(asyncio.CancelledError):
            await task
        classpath, kwargs = first.serialize()
        assert classpath == trigger_module.TRIGGER_PATH
        return await first_event_async(FalQueueTrigger(**kwargs))

    event = asyncio.run(restart())
    assert event["status"] == "success" and event["output"]["prompt"] == "x"
    assert emulator.count("POST") == 1  # only this test's own submit
    assert emulator.count("PUT") == 0  # a restart is not a kill: nothing was cancelled


async def first_event_async(trigger: FalQueueTrigger) -> dict:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("the trigger ended without an event")


def test_deadline_cancels_the_request_and_says_why(emulator, fal_connection, client):
    emulator.set_queue_timing(queue_wait=60, run_time=0)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    trigger = trigger_for(handle, deadline=time.time() + 0.3, deadline_reason="poll_timeout of 0.3 s")
    event = first_event(trigger)
    assert event["status"] == "error"
    error = FalError.from_dict(event["error"])
    assert isinstance(error, FalTimeoutError)
    assert "did not complete within poll_timeout of 0.3 s; the request was cancelled" in str(error)
    assert [r.status for r in emulator.requests if r.method == "PUT"] == [202]
    assert client.status(handle).error_type == "client_cancelled"


def test_completed_with_error_is_an_error_event(emulator, fal_connection, client):
    emulator.set_queue_timing(queue_wait=0, run_time=0.1)
    emulator.fail_queued(error="Runner ran out of memory", error_type="runner_server_error")
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    event = first_event(trigger_for(handle))
    error = FalError.from_dict(event["error"])
    assert isinstance(error, FalServerError) and not error.permanent and error.status_code == 500
    assert error.detail == "Runner ran out of memory" and error.error_type == "runner_server_error"
    # The result was read, as the sync path reads an answer: its status and body are the model's.
    assert any(r.path.endswith(f"/requests/{handle.request_id}") and r.status == 500 for r in gets(emulator))


def test_invalid_input_fails_the_trigger_with_the_field_list(emulator, fal_connection, client):
    emulator.set_queue_timing(queue_wait=0, run_time=0.1)
    handle = client.submit("fal-ai/flux/dev", {"no_prompt": True})
    error = FalError.from_dict(first_event(trigger_for(handle))["error"])
    assert isinstance(error, FalValidationError) and error.permanent and "prompt: Field required" in str(error)


def test_polls_back_off_through_429_and_transient_errors(emulator, fal_connection, client):
    emulator.set_queue_timing(queue_wait=0, run_time=0.1)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    # More failures in a row than one call's retry policy allows (3 attempts): the trigger
    # keeps polling with its own backoff instead of failing the task.
    emulator.inject_fault(status=429, error_type="rate_limited", times=3, model_id="fal-ai/flux/requests")
    emulator.inject_fault(status=503, times=2, model_id="fal-ai/flux/requests")
    emulator.inject_fault(status=502, html=True, times=1, model_id="fal-ai/flux/requests")
    event = first_event(trigger_for(handle))
    assert event["status"] == "success"
    assert [r.status for r in gets(emulator)][:7] == [429, 429, 429, 503, 503, 502, 200]


def test_auth_errors_end_the_trigger_without_leaking_keys(emulator, client, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_FAL_WRONG", connection_json(emulator, api_key="wrong-key-98765"))
    emulator.set_queue_timing(queue_wait=60, run_time=0)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    event = first_event(trigger_for(handle, fal_conn_id="fal_wrong"))
    error = FalError.from_dict(event["error"])
    assert isinstance(error, FalAuthError) and error.permanent and error.status_code == 401
    assert "wrong-key-98765" not in json.dumps(event) and API_KEY not in json.dumps(event)


def test_missing_connection_is_a_clear_error_event(emulator, client):
    emulator.set_queue_timing(queue_wait=60, run_time=0)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    event = first_event(trigger_for(handle, fal_conn_id="fal_nowhere"))
    error = FalError.from_dict(event["error"])
    assert isinstance(error, FalConfigurationError) and "fal_nowhere" in str(error) and "does not exist" in str(error)
    # The request runs on: the task fails retryably, says where the connection is missing, and a
    # retry reattaches (it is not failed for good while fal still works on a paid request).
    assert not error.permanent and "The triggerer needs the same fal connection as the workers" in str(error)
    assert error.request_id == handle.request_id and emulator.count("PUT") == 0


def test_on_kill_cancels_the_request(emulator, fal_connection, client):
    emulator.set_queue_timing(queue_wait=60, run_time=0)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    asyncio.run(trigger_for(handle).on_kill())
    assert [r.path for r in emulator.requests if r.method == "PUT"] == [
        f"/queue/fal-ai/flux/requests/{handle.request_id}/cancel"
    ]
    assert client.status(handle).error_type == "client_cancelled"


def test_many_triggers_in_one_loop_share_a_few_http_clients(emulator, fal_connection, client):
    emulator.set_queue_timing(queue_wait=0, run_time=0.5)
    handles = [client.submit("fal-ai/flux/dev", {"prompt": f"p{i}"}) for i in range(40)]
    shared_sizes: list[int] = []

    async def main() -> list[dict]:
        async def watch() -> None:
            while True:
                shared_sizes.append(len(async_client._SHARED))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        events = await asyncio.gather(*(first_event_async(trigger_for(h, poll_interval=0.1)) for h in handles))
        watcher.cancel()
        return events

    events = asyncio.run(main())
    assert [e["output"]["prompt"] for e in events] == [f"p{i}" for i in range(40)]
    assert 1 <= max(shared_sizes) <= async_client.POOL_SHARDS < 40  # a few shared clients for all 40
    assert async_client._SHARED == {}  # each closed when its last trigger left


def test_async_settings_match_the_sync_lookup(emulator, fal_connection):
    from airflow_provider_fal.hooks.fal import FalHook

    settings = asyncio.run(FalHook().aget_settings())
    assert settings == FalHook().settings
    assert settings.queue_url == emulator.queue_url and settings.api_key == API_KEY


# --------------------------------------------------------------------------- operator options


def test_queue_only_options_are_refused_in_synchronous_mode():
    from airflow_provider_fal.operators.fal import FalRunOperator

    for option in ({"priority": "low"}, {"webhook_url": "https://x.example/h"}, {"poll_timeout": 30}):
        with pytest.raises(FalConfigurationError, match="use_queue=True or deferrable=True"):
            FalRunOperator(task_id="t", model_id="fal-ai/flux/dev", **option)
    FalRunOperator(task_id="t", model_id="fal-ai/flux/dev", use_queue=True, priority="low", poll_timeout=30)


@pytest.mark.parametrize(
    ("option", "field"),
    [
        ({"poll_interval": "soon"}, "poll_interval"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"poll_timeout": -5}, "poll_timeout"),
        ({"priority": "urgent"}, "priority"),
        ({"webhook_url": "not a url"}, "webhook_url"),
    ],
)
def test_bad_queue_options_fail_the_task_before_any_request(emulator, fal_connection, option, field):
    from airflow_provider_fal._compat import AirflowFailException
    from airflow_provider_fal.operators.fal import FalRunOperator

    operator = FalRunOperator(
        task_id="t", model_id="fal-ai/flux/dev", arguments={"prompt": "x"}, use_queue=True, **option
    )
    with pytest.raises(AirflowFailException, match=field):
        operator.execute(context={})
    FalClient(API_KEY, queue_url=emulator.queue_url).submit("fal-ai/flux/dev", {"prompt": "sentinel"})
    # the sentinel is recorded after anything the operator might have sent
    assert [r.json for r in recorded(emulator, 1, path_prefix="/")] == [{"prompt": "sentinel"}]


def test_operator_on_kill_cancels_the_request_it_waits_for(emulator, fal_connection):
    from airflow_provider_fal.operators.fal import FalRunOperator

    emulator.set_queue_timing(queue_wait=60, run_time=0)
    operator = FalRunOperator(task_id="t", model_id="fal-ai/flux/dev", use_queue=True)
    operator._active_request = operator.hook.submit("fal-ai/flux/dev", {"prompt": "x"})
    operator.on_kill()
    cancels = [r for r in emulator.requests if r.method == "PUT"]
    assert len(cancels) == 1 and cancels[0].status == 202
    operator.on_kill()  # nothing left to cancel: no second call
    assert len([r for r in emulator.requests if r.method == "PUT"]) == 1


def test_deferrable_defaults_to_airflows_default_deferrable():
    code = (
        "from airflow_provider_fal.operators.fal import FalRunOperator;"
        "print(FalRunOperator(task_id='t', model_id='fal-ai/flux/dev').deferrable)"
    )
    for value, expected in (("true", "True"), ("false", "False")):
        env = {**os.environ, "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": value}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().splitlines()[-1] == expected


def test_trigger_keeps_polling_through_connection_failures_until_its_deadline():
    """fal out of reach (here: the emulator stopped) is a transient connection error: the
    trigger keeps polling with backoff instead of failing, and at its deadline says what
    happened, including that the cancel could not get through either."""
    with FalEmulator(api_key=API_KEY) as emu:
        fal = FalClient(API_KEY, queue_url=emu.queue_url, retry_policy=FAST)
        emu.set_queue_timing(queue_wait=60, run_time=0)
        handle = fal.submit("fal-ai/flux/dev", {"prompt": "x"})
        os.environ["AIRFLOW_CONN_FAL_RESTART"] = connection_json(emu)
    try:
        trigger = trigger_for(
            handle, fal_conn_id="fal_restart", deadline=time.time() + 1.0, deadline_reason="a test deadline"
        )
        event = first_event(trigger)  # connection refused on every poll
    finally:
        del os.environ["AIRFLOW_CONN_FAL_RESTART"]
    error = FalError.from_dict(event["error"])
    assert isinstance(error, FalTimeoutError) and "a test deadline" in str(error)
    assert "not cancelled" in str(error)  # the cancel could not get through either, and it says so


def test_a_status_poll_that_answers_500_once_does_not_end_the_deferred_task(emulator, fal_connection, client):
    emulator.set_queue_timing(queue_wait=0, run_time=0.3)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "survives"})
    emulator.inject_fault(status=500, error_type="internal_error", times=1)
    event = first_event(trigger_for(handle))
    assert event["status"] == "success" and event["output"]["prompt"] == "survives"
    polls = [r.status for r in gets(emulator) if r.path.endswith("/status")]
    assert polls[0] == 500 and polls[-1] == 200
    assert emulator.count("POST") == 1


def test_the_wait_limit_is_the_earlier_of_the_timeouts_and_the_default_never_cuts_execution_timeout():
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    from airflow_provider_fal.operators.fal import FalRunOperator

    started = datetime.now(timezone.utc)
    context = {"ti": SimpleNamespace(start_date=started)}

    def limit(**kwargs):
        operator = FalRunOperator(task_id="t", model_id="fal-ai/flux/dev", deferrable=True, **kwargs)
        deadline, name, reason = operator._deadline(context, operator.poll_timeout)
        return round(deadline - started.timestamp()), name, reason

    # A 3-hour execution_timeout is not cut short by the 1-hour default poll_timeout.
    assert limit(execution_timeout=timedelta(hours=3)) == (10800, "execution_timeout", "execution_timeout of 10800 s")
    assert limit(poll_timeout=60, execution_timeout=timedelta(hours=3))[1] == "poll_timeout"
    assert limit(poll_timeout=7200, execution_timeout=timedelta(minutes=5))[1] == "execution_timeout"
    assert limit() == (3600, "poll_timeout", "poll_timeout of 3600 s (the default)")


def test_a_request_fal_forgot_ends_the_trigger_retryably(emulator, fal_connection, client):
    emulator.set_queue_timing(queue_wait=0, run_time=5)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "x"})
    emulator.inject_fault(status=404, error_type=None, detail="Request not found", times=1, model_id="fal-ai/flux")
    error = FalError.from_dict(first_event(trigger_for(handle))["error"])
    assert type(error).__name__ == "FalResultExpiredError" and not error.permanent
    assert error.request_id == handle.request_id and "a new billed generation" in str(error)


def test_a_deadline_whose_cancel_the_app_ignores_delivers_the_billed_result(emulator, fal_connection, client):
    emulator.set_cancel_honoured(False)
    emulator.set_queue_timing(queue_wait=0, run_time=1.0)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "late"})
    event = first_event(trigger_for(handle, deadline=time.time() + 0.3, deadline_reason="poll_timeout of 0.3 s"))
    assert event["status"] == "success" and event["output"]["prompt"] == "late"
    assert emulator.count("PUT") == 1


def test_a_deadline_whose_cancel_answers_already_completed_delivers_the_result(emulator, fal_connection, client):
    """The bug of the three copies: the trigger used to report a timeout and drop this paid result."""
    emulator.complete_on_cancel(True)
    emulator.set_queue_timing(queue_wait=0, run_time=60)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "just finished"})
    event = first_event(trigger_for(handle, deadline=time.time() + 0.3, deadline_reason="poll_timeout of 0.3 s"))
    assert event["status"] == "success" and event["output"]["prompt"] == "just finished"
    cancels = [r for r in emulator.requests if r.method == "PUT"]
    assert [r.status for r in cancels] == [400]  # ALREADY_COMPLETED
