"""A deferred batch's trigger reads each result as its request ends and records it beside the media.

fal keeps a result of 10 KB or more only 6 minutes after it ends (an hour when smaller). The
operator runs its real ``execute`` / ``execute_complete`` here and the trigger runs in an event
loop, as the triggerer runs it, against emulators whose result retention is cut to seconds:
results the trigger recorded are stored after fal forgot them, and none is read from fal twice.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from types import SimpleNamespace

import pytest

from airflow_provider_fal.batch.progress import DONE, FETCHED, BatchProgress, fetched_record
from airflow_provider_fal.batch.progress_stores import PROGRESS_FOLDER, DirectoryProgressStore
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.emulator import FalEmulator
from airflow_provider_fal.media.storage import LocalStore
from airflow_provider_fal.triggers.batch import FalBatchTrigger
from tests.conftest import API_KEY, connection_json

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
MODEL = "fal-ai/fast-sdxl"


class QuickHandBack:
    hand_back_after = recorded_hand_back_after = 0.3


def batch_operator(output_path, total: int, **kwargs):
    from airflow_provider_fal.operators.batch import FalBatchRunOperator

    class Operator(QuickHandBack, FalBatchRunOperator):
        pass

    return Operator(
        task_id="batch",
        model_id=MODEL,
        inputs=[{"prompt": f"p{n}"} for n in range(total)],
        deferrable=True,
        poll_interval=0.05,
        output_path=output_path,
        fal_retry_policy=FAST,
        **kwargs,
    )


def context() -> dict:
    ti = SimpleNamespace(
        task_id="batch", dag_id="dag", run_id="r1", map_index=-1, try_number=1, xcom_push=lambda **_: None
    )
    return {"ti": ti}


async def first_event(trigger: FalBatchTrigger) -> dict:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("the trigger ended without an event")


def deferred(step, *args):
    """The trigger ``step`` deferred with, or ``None`` when it returned (the batch is delivered)."""
    try:
        step(*args)
    except BaseException as error:  # TaskDeferred is not an Exception on Airflow 3.3
        if type(error).__name__ != "TaskDeferred":
            raise
        return error.trigger
    return None


@pytest.fixture
def short_lived(monkeypatch):
    """An emulator that forgets every result 1 s after its request ended (fal: 6 minutes or an hour)."""
    with FalEmulator(api_key=API_KEY, result_retention=1.0, large_result_retention=1.0) as emu:
        monkeypatch.setenv("AIRFLOW_CONN_FAL_DEFAULT", connection_json(emu))
        emu.set_queue_timing(queue_wait=0, run_time=0.2)
        yield emu


def test_results_the_trigger_recorded_are_stored_after_fal_forgot_them(short_lived, tmp_path):
    operator, ctx = batch_operator(str(tmp_path), 12), context()
    trigger = deferred(operator.execute, ctx)
    assert trigger is not None and trigger.results_at is not None
    assert API_KEY not in json.dumps(trigger.serialize()[1])
    rounds = recorded = 0
    while trigger is not None:
        rounds += 1
        event = asyncio.run(first_event(FalBatchTrigger(**trigger.serialize()[1])))
        assert event["ready"] == {} and event["recorded"] > 0  # recorded beside the media, not in the event
        recorded += event["recorded"]
        short_lived.wait(1.5)  # the task waited for a worker slot longer than fal keeps the results
        trigger = deferred(operator.execute_complete, ctx, event)
    lines = [json.loads(line) for line in (tmp_path / "batch__manifest.jsonl").read_text().splitlines()]
    assert [line["ok"] for line in lines] == [True] * 12, [line.get("error") for line in lines]
    assert all(line["output"]["images"][0]["stored_path"] for line in lines)
    assert len(list(tmp_path.glob("batch__i*__images-0.*"))) == 12
    reads = [r for r in short_lived.requests if r.method == "GET" and "/requests/" in r.path]
    result_reads = [r.path for r in reads if not r.path.endswith("/status")]
    assert len(result_reads) == len(set(result_reads)) == 12  # each read once, by the trigger
    assert short_lived.count("POST") == 12 and recorded == 12
    print(f"12 inputs, {rounds} rounds, every result read once by the trigger and stored after it expired on fal")


def test_a_trigger_restarted_after_fal_forgot_the_results_loses_none(short_lived, tmp_path):
    """The first copy of the trigger recorded every result, then its triggerer died before the
    event reached the task; by the time a new copy polls, fal has forgotten them (404 on their
    status). The new copy hands them back as failed, and the task stores the recorded results."""
    operator, ctx = batch_operator(str(tmp_path), 6), context()
    kwargs = deferred(operator.execute, ctx).serialize()[1]
    lost = asyncio.run(first_event(FalBatchTrigger(**kwargs)))  # recorded, then its event is lost
    assert lost["recorded"] == 6
    short_lived.wait(1.5)
    event = asyncio.run(first_event(FalBatchTrigger(**kwargs)))
    assert event["recorded"] == 0 and len(event["ready"]) == 6
    assert all("error" in entry for entry in event["ready"].values())  # fal no longer has them
    assert deferred(operator.execute_complete, ctx, event) is None
    lines = [json.loads(line) for line in (tmp_path / "batch__manifest.jsonl").read_text().splitlines()]
    assert [line["ok"] for line in lines] == [True] * 6, [line.get("error") for line in lines]
    assert short_lived.count("POST") == 6


def _folder(tmp_path):
    return next((tmp_path / PROGRESS_FOLDER).iterdir())


def test_a_folder_the_trigger_cannot_open_or_write_hands_results_back_unread(emulator, fal_connection, tmp_path):
    emulator.set_queue_timing(queue_wait=0, run_time=0.5)
    operator, ctx = batch_operator(str(tmp_path), 4), context()
    trigger = deferred(operator.execute, ctx)
    kwargs = trigger.serialize()[1]

    # no inputs remembered for this try: nothing to record the results under
    other_try = FalBatchTrigger(**{**kwargs, "attempt": 2})
    event = asyncio.run(first_event(other_try))
    assert sorted(event["ready"], key=int) == ["0", "1", "2", "3"]
    assert all("fetched" not in entry for entry in event["ready"].values())

    # opened, then the folder is gone (replaced by a file) before the first result is recorded
    async def lose_the_folder() -> dict:
        task = asyncio.create_task(first_event(FalBatchTrigger(**kwargs)))
        polled = emulator.count("GET")
        while emulator.count("GET") == polled:  # polling began: the folder was opened
            await asyncio.sleep(0.01)
        folder = _folder(tmp_path)
        shutil.rmtree(folder)
        folder.write_text("not a folder")
        return await task

    event = asyncio.run(lose_the_folder())
    assert sorted(event["ready"], key=int) == ["0", "1", "2", "3"]
    assert all("fetched" not in entry and entry["failure"] is None for entry in event["ready"].values())


def test_a_round_counts_failures_the_trigger_reported_apart_from_results_read_from_fal(
    emulator, fal_connection, tmp_path, logs
):
    emulator.set_queue_timing(queue_wait=0, run_time=0.1)
    operator, ctx = batch_operator(str(tmp_path), 2, max_failure_rate=1), context()
    kwargs = deferred(operator.execute, ctx).serialize()[1]
    # nowhere to record results (handed back unread), and fal does not know input 1's request (404)
    unknown = "00000000-0000-4000-8000-000000000000"
    kwargs = {**kwargs, "results_at": None, "requests": {**kwargs["requests"], "1": unknown}}
    event = asyncio.run(first_event(FalBatchTrigger(**kwargs)))
    assert "error" in event["ready"]["1"] and "error" not in event["ready"]["0"], event
    assert deferred(operator.execute_complete, ctx, event) is None
    assert "2 requests ended: 0 results recorded by the trigger, 1 read from fal now, 1 failed" in logs()
    lines = [json.loads(line) for line in (tmp_path / "batch__manifest.jsonl").read_text().splitlines()]
    assert [line["ok"] for line in lines] == [True, False]


def test_a_result_the_trigger_recorded_is_stored_by_a_retry_never_sent_again(tmp_path):
    """A worker that dies after the trigger recorded results: the next try stores them, sends nothing."""
    store = DirectoryProgressStore(LocalStore(tmp_path), "task")
    progress = BatchProgress(store, ["f0", "f1", "f2"], None, attempt=1)
    progress.submitted(0, "req-0")
    progress.submitted(1, "req-1")
    store.write_many(
        {
            0: fetched_record("f0", 1, "req-0", {"images": []}, 1.0),
            1: fetched_record("f-edited", 1, "req-1", {"images": []}, None),  # the input changed since
        }
    )
    resumed = BatchProgress(DirectoryProgressStore(LocalStore(tmp_path), "task"), ["f0", "f1", "f2"], None, 2).resume()
    assert resumed.unstored == {
        0: {"index": 0, "ok": True, "output": {"images": []}, "request_id": "req-0", "billed_units": 1.0}
    }
    assert resumed.submitted == {} and resumed.stale == 1 and not resumed.done
    assert FETCHED != DONE


def test_the_queue_pace_is_measured_from_positions_before_completions_come():
    """Completions are counted when a poll sees them, so early in a round they make fal's queue
    look slow (and its requests would be polled long after they ended); two positions of the
    same request measure how fast the line moves at once."""
    from airflow_provider_fal.triggers.queue_pace import MAX_QUEUED_POLL_DELAY, QueuePace

    now = [0.0]
    pace = QueuePace(rate_hint=None, clock=lambda: now[0])
    assert pace.rate is None and pace.queued_delay(400) is None
    pace.observe("7", 1000)
    now[0] = 0.5
    pace.observe("7", 980)  # too soon after the last position to measure
    now[0] = 2.0
    pace.completions = 12  # seen so far: 6 per second, far below the line's pace
    pace.observe("7", 920)
    assert pace.rate == pytest.approx(40.0)
    assert pace.queued_delay(400) == pytest.approx(0.9 * 400 / 40)
    assert pace.queued_delay(100_000) == MAX_QUEUED_POLL_DELAY
    now[0] = 4.0
    pace.observe("7", 880)  # slower now: a running average moves towards it
    assert 20.0 < pace.rate < 40.0
