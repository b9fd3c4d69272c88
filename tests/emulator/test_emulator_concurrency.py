"""The queue drains at the account's concurrency limit, as fal's does (fal-api.md Concurrency).

Over the limit a queued request waits ``IN_QUEUE`` with a real ``queue_position`` (never a 429);
it starts when a request in progress ends, in the order requests became ready; only a start
timeout drops it. Sync runs over the limit (queue requests in progress count) get 429.
"""

from __future__ import annotations

import time

import pytest
import requests

from airflow_provider_fal.emulator import FalEmulator

KEY = "test-key-concurrency"
MODEL = "fal-ai/fast-sdxl"
AUTH = {"Authorization": f"Key {KEY}"}


@pytest.fixture
def emu():
    with FalEmulator(api_key=KEY) as emulator:
        yield emulator


def submit(emu: FalEmulator, headers: dict[str, str] | None = None) -> dict:
    answer = requests.post(f"{emu.queue_url}/{MODEL}", json={"prompt": "x"}, headers={**AUTH, **(headers or {})})
    assert answer.status_code == 200, answer.text
    return answer.json()


def status(submitted: dict) -> dict:
    return requests.get(submitted["status_url"], headers=AUTH).json()


def states(handles: list[dict]) -> list[tuple[str, int | None]]:
    return [(body["status"], body.get("queue_position")) for body in map(status, handles)]


def cancel(submitted: dict) -> int:
    return requests.put(submitted["cancel_url"], headers=AUTH).status_code


def test_requests_over_the_limit_wait_in_queue_with_their_position(emu):
    emu.set_concurrency_limit(2)
    emu.set_queue_timing(queue_wait=0.0, run_time=60.0)

    handles = [submit(emu) for _ in range(4)]

    assert [h["queue_position"] for h in handles] == [0, 0, 0, 1]  # as each was submitted
    assert states(handles) == [("IN_PROGRESS", None), ("IN_PROGRESS", None), ("IN_QUEUE", 0), ("IN_QUEUE", 1)]
    # a slot that frees (here: a running request cancelled) goes to the first in line
    assert cancel(handles[0]) == 202
    assert states(handles) == [("COMPLETED", None), ("IN_PROGRESS", None), ("IN_PROGRESS", None), ("IN_QUEUE", 0)]
    # a queued request that is cancelled leaves the line without ever running
    assert cancel(handles[3]) == 202
    assert status(handles[3])["status"] == "COMPLETED"
    assert requests.get(handles[3]["response_url"], headers=AUTH).json()["error_type"] == "client_cancelled"


def test_a_request_cancelled_in_the_middle_of_the_line_moves_those_behind_it_up(emu):
    """Positions count only the requests still waiting ahead, whether or not one left the line."""
    emu.set_concurrency_limit(1)
    emu.set_queue_timing(queue_wait=0.0, run_time=60.0)
    handles = [submit(emu) for _ in range(6)]
    assert states(handles) == [("IN_PROGRESS", None)] + [("IN_QUEUE", n) for n in range(5)]
    assert cancel(handles[2]) == 202  # it stays listed, cancelled, until it reaches the head
    assert states(handles[3:]) == [("IN_QUEUE", 1), ("IN_QUEUE", 2), ("IN_QUEUE", 3)]
    assert cancel(handles[0]) == 202 and cancel(handles[1]) == 202  # the line moves past it
    assert states(handles[3:]) == [("IN_PROGRESS", None), ("IN_QUEUE", 0), ("IN_QUEUE", 1)]
    assert submit(emu)["queue_position"] == 2


def test_no_more_than_the_limit_run_at_once_and_all_complete(emu):
    emu.set_concurrency_limit(2)
    emu.set_queue_timing(queue_wait=0.0, run_time=0.3)

    handles = [submit(emu) for _ in range(6)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(status(h)["status"] != "COMPLETED" for h in handles):
        time.sleep(0.05)

    results = [requests.get(h["response_url"], headers=AUTH) for h in handles]
    assert [r.status_code for r in results] == [200] * 6
    runs = sorted((q.start_at, q.end_at) for q in emu.queue.all())
    assert len(runs) == 6
    for start, _ in runs:  # at every start, at most the limit run (the one starting included)
        assert sum(1 for s, e in runs if s <= start < e) <= 2
    starts = [q.start_at for q in sorted(emu.queue.all(), key=lambda q: q.seq)]
    assert starts == sorted(starts)  # first in, first served


def test_a_start_timeout_drops_a_request_still_waiting_for_a_slot(emu):
    emu.set_concurrency_limit(1)
    emu.set_queue_timing(queue_wait=0.0, run_time=60.0)
    running = submit(emu)
    waiting = submit(emu, {"X-Fal-Request-Timeout": "1.5"})
    assert states([running, waiting]) == [("IN_PROGRESS", None), ("IN_QUEUE", 0)]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and status(waiting)["status"] != "COMPLETED":
        time.sleep(0.1)

    result = requests.get(waiting["response_url"], headers=AUTH)
    assert result.status_code == 504
    assert result.headers["X-Fal-Request-Timeout-Type"] == "user"
    assert result.json()["error_type"] == "request_timeout"
    assert status(running)["status"] == "IN_PROGRESS"  # the one that had the slot runs on


def test_a_slot_freed_before_the_start_timeout_lets_the_waiting_request_run(emu):
    emu.set_concurrency_limit(1)
    emu.set_queue_timing(queue_wait=0.0, run_time=60.0)
    running = submit(emu)
    waiting = submit(emu, {"X-Fal-Request-Timeout": "30"})

    assert cancel(running) == 202

    assert states([running, waiting]) == [("COMPLETED", None), ("IN_PROGRESS", None)]


def test_a_zero_limit_holds_everything_until_the_limit_is_raised(emu):
    emu.set_concurrency_limit(0)
    emu.set_queue_timing(queue_wait=0.0, run_time=60.0)
    handles = [submit(emu) for _ in range(3)]
    assert states(handles) == [("IN_QUEUE", 0), ("IN_QUEUE", 1), ("IN_QUEUE", 2)]

    emu.set_concurrency_limit(1)

    assert states(handles) == [("IN_PROGRESS", None), ("IN_QUEUE", 0), ("IN_QUEUE", 1)]


def test_sync_runs_count_queue_requests_in_progress(emu):
    emu.set_concurrency_limit(1)
    emu.set_queue_timing(queue_wait=0.0, run_time=60.0)
    running = submit(emu)

    answer = requests.post(f"{emu.url}/{MODEL}", json={"prompt": "x"}, headers=AUTH)

    assert answer.status_code == 429
    assert answer.json()["error_type"] == "concurrent_requests_limit"
    assert answer.headers["X-Fal-Needs-Retry"] == "1"
    assert cancel(running) == 202
    assert requests.post(f"{emu.url}/{MODEL}", json={"prompt": "x"}, headers=AUTH).status_code == 200


def test_without_a_limit_every_request_runs_at_once(emu):
    emu.set_queue_timing(queue_wait=0.0, run_time=60.0)

    handles = [submit(emu) for _ in range(5)]

    assert states(handles) == [("IN_PROGRESS", None)] * 5
