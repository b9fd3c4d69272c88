"""fal unreachable (connection refused) while requests run: every waiter polls through it.

The emulator closes its port for a few seconds right after the submits; its queue keeps
running. The worker-side wait, the trigger and the batch's queue mode each end with every
result and each input submitted once (counted from the emulator's request log).
"""

from __future__ import annotations

import asyncio

from airflow_provider_fal.batch.inputs import prepare_inputs
from airflow_provider_fal.batch.runner import FalBatchRunner
from airflow_provider_fal.core.client import FalClient, prepare_request
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.triggers.fal import FalQueueTrigger
from tests.conftest import API_KEY

OUTAGE = 3.0
FAST = {"max_attempts": 3, "initial_backoff": 0.05, "max_backoff": 0.2, "max_total_wait": 1.0}


def client_for(emulator) -> FalClient:
    return FalClient(API_KEY, run_url=emulator.url, queue_url=emulator.queue_url, retry_policy=RetryPolicy(**FAST))


def submits(emulator) -> int:
    return emulator.count(method="POST", path_prefix="/queue/")


def test_a_worker_wait_polls_through_an_outage(emulator):
    emulator.set_queue_timing(run_time=1.0)
    client = client_for(emulator)
    try:
        handle = client.submit("fal-ai/fast-sdxl", {"prompt": "through"})
        emulator.refuse_connections(OUTAGE)
        result = client.wait(handle, poll_interval=0.2, timeout=120)
    finally:
        client.close()
    assert result.output["images"]
    assert submits(emulator) == 1


def test_a_trigger_polls_through_an_outage(emulator, fal_connection):
    emulator.set_queue_timing(run_time=1.0)
    client = client_for(emulator)
    handle = client.submit("fal-ai/fast-sdxl", {"prompt": "through"})
    client.close()
    emulator.refuse_connections(OUTAGE)
    trigger = FalQueueTrigger(request=handle.to_dict(), poll_interval=0.2, retry_policy=FAST)

    async def first_event() -> dict:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    event = asyncio.run(first_event())
    assert event["status"] == "success", event
    assert event["output"]["images"]
    assert submits(emulator) == 1


def test_a_queue_batch_polls_through_an_outage(emulator):
    emulator.set_queue_timing(run_time=1.0)
    inputs = [{"prompt": f"through {n}"} for n in range(6)]
    client = client_for(emulator)
    try:
        runner = FalBatchRunner(client, max_concurrency=6, use_queue=True, poll_interval=0.2)
        emulator.refuse_connections(OUTAGE)  # from 0.2 s on: the submits go out first
        result = runner.run(prepare_inputs(prepare_request("fal-ai/fast-sdxl"), inputs))
    finally:
        client.close()
    assert result.succeeded == 6, result.summary()
    assert submits(emulator) == 6
