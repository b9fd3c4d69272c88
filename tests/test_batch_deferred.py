"""Deferrable batches: one trigger polls every queued request of a batch; results come back in rounds.

Trigger-level tests run :class:`FalBatchTrigger` in an event loop against the emulator (the
connection through ``AIRFLOW_CONN_FAL_DEFAULT``, as in a triggerer); the DAG test runs a real
``airflow dags test`` (whose triggers run inline), counting submits and result reads from the
emulator's request log.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter

import pytest

from airflow_provider_fal.core.client import FalClient
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.exceptions import FalError, FalValidationError
from airflow_provider_fal.triggers.batch import BATCH_TRIGGER_PATH, FalBatchTrigger
from tests.conftest import API_KEY

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
MODEL = "fal-ai/flux/dev"


@pytest.fixture
def client(emulator):
    fal = FalClient(API_KEY, queue_url=emulator.queue_url, retry_policy=FAST)
    yield fal
    fal.close()


def batch_trigger(requests: dict[str, str], **kwargs) -> FalBatchTrigger:
    return FalBatchTrigger(requests=requests, model_id=MODEL, poll_interval=0.05, retry_policy=FAST, **kwargs)


async def first_event(trigger: FalBatchTrigger) -> dict:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("the trigger ended without an event")


def test_one_trigger_polls_the_whole_batch_and_hands_back_without_outputs(emulator, fal_connection, client):
    emulator.set_queue_timing(queue_wait=0, run_time=0.2)
    handles = [client.submit(MODEL, {"prompt": f"p{n}"}) for n in range(20)]
    handles.append(client.submit(MODEL, {"no_prompt": True}))  # accepted, fails with a 422 on its result
    requests = {str(n): handle.request_id for n, handle in enumerate(handles)}
    event = asyncio.run(first_event(batch_trigger(requests)))
    assert event["status"] == "ready" and sorted(event["ready"], key=int) == list(requests)
    for index, entry in event["ready"].items():
        assert entry["request_id"] == requests[index]
        assert "output" not in entry  # the worker fetches results; the trigger event stays small
    failure = FalError.from_dict(event["ready"]["20"]["failure"] or event["ready"]["20"].get("error"))
    assert failure is not None
    # nothing submitted, no result read by the trigger
    assert emulator.count("POST") == 21
    assert not [r for r in emulator.requests if r.method == "GET" and r.path.endswith(tuple(requests.values()))]
    print(f"21 requests, {event['polls']} status polls")


def test_a_restarted_batch_trigger_polls_again_and_never_submits(emulator, fal_connection, client):
    """A triggerer restart in the middle of a deferred 1,000-input batch: 0 resubmits, all results."""
    total = 1000
    emulator.set_queue_timing(queue_wait=0, run_time=6.0)
    handles = [client.submit(MODEL, {"prompt": f"p{n}"}) for n in range(total)]
    first = batch_trigger({str(n): h.request_id for n, h in enumerate(handles)}, concurrency=32)

    async def restart() -> dict:
        task = asyncio.create_task(first_event(first))
        while emulator.count("GET") < total:  # the first copy has polled every request once
            await asyncio.sleep(0.05)
        assert not task.done()
        task.cancel()  # a triggerer shutdown
        with pytest.raises(asyncio.CancelledError):
            await task
        classpath, kwargs = first.serialize()
        assert classpath == BATCH_TRIGGER_PATH
        json.dumps(kwargs)  # what the triggerer stores: plain JSON, no key
        assert API_KEY not in json.dumps(kwargs)
        return await first_event(FalBatchTrigger(**kwargs))

    event = asyncio.run(restart())
    assert len(event["ready"]) == total and all(entry["failure"] is None for entry in event["ready"].values())
    assert emulator.count("POST") == total and emulator.count("PUT") == 0  # no resubmit, no cancel
    print(f"{total} requests, restarted once: {emulator.count('GET')} status polls in all")


def test_ended_requests_are_handed_back_after_a_while_not_only_at_the_end(emulator, fal_connection, client):
    """Results of 10 KB or more expire 6 minutes after completion: the trigger hands back what
    ended once ``hand_back_after`` passed, while others still run."""
    emulator.set_queue_timing(queue_wait=0, run_time=0.1)
    quick = [client.submit(MODEL, {"prompt": f"quick{n}"}) for n in range(3)]
    emulator.set_queue_timing(queue_wait=0, run_time=30)
    slow = client.submit(MODEL, {"prompt": "slow"})
    requests = {str(n): h.request_id for n, h in enumerate([*quick, slow])}
    event = asyncio.run(first_event(batch_trigger(requests, hand_back_after=0.5)))
    assert sorted(event["ready"]) == ["0", "1", "2"]


def test_a_validation_error_on_the_result_is_read_by_the_worker(emulator, fal_connection, client):
    emulator.set_queue_timing(queue_wait=0, run_time=0.1)
    handle = client.submit(MODEL, {"no_prompt": True})
    event = asyncio.run(first_event(batch_trigger({"0": handle.request_id})))
    entry = event["ready"]["0"]
    from airflow_provider_fal.core.watch import FetchResult

    failure = FalError.from_dict(entry["failure"]) if entry.get("failure") else None
    with pytest.raises(FalValidationError, match="prompt: Field required"):
        client.fetch(handle, FetchResult(late=entry["late"], failure=failure))


DEFERRED_DAG = """
import json, os
import pendulum
from airflow.sdk import DAG, XComArg, task
from airflow_provider_fal.batch.manifest import read_manifest
from airflow_provider_fal.operators.batch import FalBatchRunOperator, SUMMARY_XCOM_KEY


class QuickHandBack(FalBatchRunOperator):
    hand_back_after = recorded_hand_back_after = 0.3  # several rounds of results in a short test


with DAG("fal_batch_deferred", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")) as dag:
    stored = QuickHandBack(
        task_id="stored",
        model_id="fal-ai/fast-sdxl",
        inputs=[{"prompt": f"stored {n}"} for n in range(24)],
        deferrable=True,
        poll_interval=0.1,
        output_path=os.environ["MEDIA"],
    )
    in_db = QuickHandBack(  # progress in the task's state / a Variable, over several rounds
        task_id="in_db",
        model_id="fal-ai/flux/dev",
        inputs=[{"prompt": f"in_db {n}"} for n in range(12)] + [{"no_prompt": True}],
        deferrable=True,
        poll_interval=0.1,
        max_failures=1,
    )

    @task
    def receive(stored_summary, in_db_results, in_db_summary):
        with open(os.environ["OUT"], "w") as handle:
            json.dump({"stored": stored_summary, "manifest": read_manifest(stored_summary["manifest"]),
                       "in_db": in_db_results, "in_db_summary": in_db_summary}, handle)

    receive(stored.output, in_db.output, XComArg(in_db, key=SUMMARY_XCOM_KEY))
"""


@pytest.mark.e2e
def test_a_deferrable_batch_submits_once_waits_in_the_triggerer_and_delivers_everything(
    emulator, fal_connection, run_dag, out_file, tmp_path
):
    media = tmp_path / "media"
    emulator.set_concurrency_limit(4)  # fal's queue drains 4 at a time: results come in over ~2 s
    emulator.set_queue_timing(queue_wait=0, run_time=0.3)
    # in_db's results end in waves 0.8 s apart, several times its 0.3 s hand-back, so its rounds
    # do not depend on how soon the trigger first polls on a loaded machine
    emulator.set_queue_timing(run_time=0.8, model_id="fal-ai/flux/dev")
    try:
        result = run_dag("fal_batch_deferred", DEFERRED_DAG, env={"OUT": str(out_file), "MEDIA": str(media)})
    finally:
        emulator.set_concurrency_limit(None)
    assert result.succeeded, result.output[-4000:]
    got = json.loads(out_file.read_text())

    posts = Counter(r.json.get("prompt") for r in emulator.requests if r.method == "POST" and r.json)
    assert all(count == 1 for count in posts.values()) and len(posts) == 24 + 12 + 1  # + the input without a prompt
    result_reads = Counter(
        r.path.rsplit("/", 1)[-1]
        for r in emulator.requests
        if r.method == "GET" and "/requests/" in r.path and not r.path.endswith("/status")
    )
    assert result_reads and max(result_reads.values()) == 1  # each result read once

    summary = got["stored"]
    assert summary["succeeded"] == 24 and summary["total"] == 24
    assert [line["index"] for line in got["manifest"]] == list(range(24))
    assert len(list(media.glob("stored__i*__images-0.*"))) == 24
    rounds = ended_rounds(result.output, "fal-ai/fast-sdxl")
    assert len(rounds) >= 2, rounds  # handed back in rounds while fal's queue drained
    # with output_path the trigger read every result and recorded it beside the media; the worker read none
    assert sum(recorded for _, recorded, _ in rounds) == 24 and all(unread == 0 for _, _, unread in rounds)

    entries = got["in_db"]
    assert [entry["ok"] for entry in entries] == [True] * 12 + [False]
    assert entries[12]["error"]["error"] == "FalValidationError" and "prompt" in entries[12]["error"]["message"]
    assert got["in_db_summary"]["failed"] == 1
    rounds = ended_rounds(result.output, "fal-ai/flux/dev")
    assert len(rounds) >= 2 and all(recorded == 0 for _, recorded, _ in rounds), rounds  # no folder: read by the task
    assert API_KEY not in result.output


def ended_rounds(log: str, model_id: str) -> list[tuple[int, int, int]]:
    """(ended, recorded by the trigger, read by the task) of every round a deferred batch logged.

    Airflow 3.0's ``dags test`` prints each task log line twice, in two formats: a line counts
    once per timestamp (to the millisecond).
    """
    pattern = rf"fal batch {re.escape(model_id)}: (\d+) requests ended: (\d+) results recorded by the trigger, (\d+)"
    rounds: dict[str, tuple[int, int, int]] = {}
    for line in log.splitlines():
        if match := re.search(pattern, line):
            when = "".join(re.findall(r"\d", line[: match.start()]))[:17]
            rounds.setdefault(when, tuple(int(group) for group in match.groups()))
    return list(rounds.values())


REMEMBERED_DAG = """
import os
from pathlib import Path
import pendulum
from airflow.sdk import DAG
from airflow_provider_fal.operators.batch import FalBatchRunOperator


class QuickHandBack(FalBatchRunOperator):
    hand_back_after = recorded_hand_back_after = 0.3


with DAG("fal_batch_remembered", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")) as dag:
    for name, output_path in (("stored", os.environ["MEDIA"]), ("in_db", None)):
        QuickHandBack(
            task_id=name,
            model_id="emulator/describe-file",
            inputs=[{"image_url": Path(os.environ["REF"]), "n": n} for n in range(12)],
            deferrable=True,
            poll_interval=0.1,
            output_path=output_path,
        )
"""


@pytest.mark.e2e
def test_later_rounds_record_results_without_preparing_the_inputs_again(emulator, fal_connection, run_dag, tmp_path):
    """Each round after a deferral resumes in a new operator: it takes the inputs' fingerprints
    from the batch's progress instead of validating, uploading and fingerprinting every input again
    (a local file input was uploaded to fal's CDN once per round)."""
    ref = tmp_path / "reference.png"
    ref.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2_000)  # above the upload threshold
    emulator.set_concurrency_limit(3)  # results come back over several rounds
    emulator.set_queue_timing(queue_wait=0, run_time=0.6)  # waves 0.6 s apart, twice the 0.3 s hand-back
    try:
        result = run_dag(
            "fal_batch_remembered", REMEMBERED_DAG, env={"REF": str(ref), "MEDIA": str(tmp_path / "media")}
        )
    finally:
        emulator.set_concurrency_limit(None)
    assert result.succeeded, result.output[-4000:]
    assert len(ended_rounds(result.output, "emulator/describe-file")) >= 4  # 2 tasks, >= 2 rounds each
    uploads = [r for r in emulator.requests if r.method == "POST" and r.path == "/files/upload"]
    assert len(uploads) == 2, len(uploads)  # one per task, in its first round only
    submits = Counter(r.json.get("n") for r in emulator.requests if r.method == "POST" and r.json and "n" in r.json)
    assert submits == Counter({n: 2 for n in range(12)})  # every input once per task
