"""The provider against a hostile fal or network path (tests/hostile_fal.py), not the emulator.

Garbled answers to polls, trickled and endless bodies, redirects and result URLs that point
at other hosts: each ends in a result or a named error, within a bounded time and size, and
nothing is paid twice.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from airflow_provider_fal.core.async_client import AsyncQueueClient, shared_http
from airflow_provider_fal.core.client import FalClient
from airflow_provider_fal.core.queue import QueueHandle
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.exceptions import FalAuthError
from tests.conftest import API_KEY
from tests.hostile_fal import Answer, HostileFal

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02, max_total_wait=5, max_retry_after=0.05)
MODEL = "fal-ai/flux"
REQUEST_ID = "0f6c2b1e-8d4e-4c1a-9b7e-2f5a6c7d8e9f"
BASE = f"/{MODEL}/requests/{REQUEST_ID}"
COMPLETED = Answer(body=json.dumps({"status": "COMPLETED", "request_id": REQUEST_ID}).encode())
RESULT = Answer(body=json.dumps({"images": []}).encode(), headers={"x-fal-request-id": REQUEST_ID})
GARBLED_POLLS = (
    Answer(body=b"<html><body>502 Bad Gateway</body></html>", headers={"Content-Type": "text/html"}),
    Answer(body=b"{not json"),
    Answer(body=b"{}"),
)


@pytest.fixture
def hostile():
    with HostileFal() as server:
        yield server


def handle_on(hostile: HostileFal) -> QueueHandle:
    return QueueHandle.rebuild(hostile.base_url, MODEL, REQUEST_ID)


# --------------------------------------------------------------------------- garbled polls


def test_garbled_answers_to_status_polls_are_polled_again_by_the_worker_wait(hostile):
    hostile.answer("GET", f"{BASE}/status", *GARBLED_POLLS, COMPLETED)
    hostile.answer("GET", BASE, RESULT)
    client = FalClient(API_KEY, run_url=hostile.base_url, queue_url=hostile.base_url, retry_policy=FAST)
    response = client.wait(handle_on(hostile), poll_interval=0.01, timeout=30)
    assert response.output == {"images": []}
    assert len(hostile.hits("GET", f"{BASE}/status")) == 4
    assert hostile.hits("PUT", f"{BASE}/cancel") == []


def test_garbled_answers_to_status_polls_are_polled_again_by_the_trigger_client(hostile):
    from airflow_provider_fal.core.watch import FetchResult, PollAfter, RequestWatch

    hostile.answer("GET", f"{BASE}/status", *GARBLED_POLLS, COMPLETED)
    hostile.answer("GET", BASE, RESULT)

    async def poll_until_done() -> object:
        handle = handle_on(hostile)
        watch = RequestWatch(handle, poll_interval=0.01)
        async with shared_http(API_KEY) as http:
            client = AsyncQueueClient(http, API_KEY, queue_url=hostile.base_url, retry_policy=FAST)
            while True:
                try:
                    step = watch.after_status(await client.status(handle))
                except Exception as error:  # what the trigger does with a failed poll
                    step = watch.after_poll_error(error)
                if isinstance(step, FetchResult):
                    return (await client.fetch(handle, step)).output
                assert isinstance(step, PollAfter), step
                await asyncio.sleep(step.seconds)

    assert asyncio.run(poll_until_done()) == {"images": []}


def test_a_wait_that_ends_on_a_permanent_poll_error_cancels_the_request(hostile):
    hostile.answer("GET", f"{BASE}/status", Answer(status=401, body=b'{"detail": "Unauthorized"}'))
    hostile.answer("PUT", f"{BASE}/cancel", Answer(status=202, body=b'{"status": "CANCELLATION_REQUESTED"}'))
    client = FalClient(API_KEY, run_url=hostile.base_url, queue_url=hostile.base_url, retry_policy=FAST)
    with pytest.raises(FalAuthError) as raised:
        client.wait(handle_on(hostile), poll_interval=0.01, timeout=30)
    assert len(hostile.hits("PUT", f"{BASE}/cancel")) == 1
    assert "asked to cancel" in str(raised.value) and "CANCELLATION_REQUESTED" in str(raised.value)
